//! Running one process in the guest through the agent — a guest-level
//! command, or a container's init from an OCI spec — and pumping its stdio
//! both ways while it runs (a terminal in raw mode with its size followed
//! when it is a TTY), forwarding signals, waiting for its end. A dead VM
//! breaks the agent connection at once, so nothing waits forever.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use protocols::agent;
use protocols::agent_ttrpc::AgentServiceClient;

use crate::health;
use crate::network::PodNetwork;
use crate::process_exit::ExitWatch;
use crate::sandbox::Sandbox;

/// A guest-level command (no container).
#[derive(Debug, Clone)]
pub struct GuestCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
}

/// A container to create and run to its end.
#[derive(Debug, Clone)]
pub struct ContainerLaunch {
    pub id: String,
    pub spec: oci_spec::runtime::Spec,
    /// The bundle's path inside the sandbox's share.
    pub bundle: String,
    /// The virtio-fs tag of the share.
    pub shared_fs_tag: String,
}

#[derive(Debug, Clone)]
pub enum Launch {
    Guest(GuestCommand),
    Container(Box<ContainerLaunch>),
}

impl Launch {
    fn argv(&self) -> Vec<String> {
        match self {
            Launch::Guest(command) => command.argv.clone(),
            Launch::Container(c) => c
                .spec
                .process()
                .as_ref()
                .and_then(|p| p.args().clone())
                .unwrap_or_default(),
        }
    }

    pub fn terminal(&self) -> bool {
        match self {
            Launch::Guest(_) => false,
            Launch::Container(c) => c
                .spec
                .process()
                .as_ref()
                .and_then(|p| p.terminal())
                .unwrap_or(false),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit code, with 128+N for death by signal N.
    Exited(u8),
    /// The program could not be started: a shell's exit code for that (127
    /// missing, 126 not executable) and the agent's message.
    CannotRun { code: u8, message: String },
}

/// The process the pumps talk to.
#[derive(Clone)]
struct Target {
    container_id: String,
    exec_id: String,
}

const GUEST_EXEC_ID: &str = "cmd";

/// Watches the VMM process; when it ends, shuts the agent stream down so
/// every pending agent call fails instead of waiting forever.
fn watch_vmm(vmm_pid: u32, stream: UnixStream, done: Arc<AtomicBool>) {
    let exit = ExitWatch::new(vmm_pid);
    thread::spawn(move || {
        while !done.load(Ordering::SeqCst) {
            // At the run's end the VMM is killed, which wakes us too.
            if exit.wait(None) {
                if !done.load(Ordering::SeqCst) {
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                }
                return;
            }
        }
    });
}

/// The guest stopped answering the agent's health checks while its VMM
/// lived on; the VM was killed.
#[derive(Debug, thiserror::Error)]
#[error("{0}; its VM was killed")]
pub struct GuestStuck(pub String);

/// What to do when the guest stops answering (see [`crate::health`]).
struct StuckGuest {
    limit: Duration,
    on_stuck: Box<dyn FnOnce(String) + Send>,
}

/// Runs `launch` in the guest of `sandbox`, whose agent is on `stream`,
/// with the guest's NICs configured (addresses, routes, neighbours) from
/// `network` before the command starts: right after the agent's
/// CreateSandbox for a container. A guest that stops answering health
/// checks for the sandbox's limit fails the run with [`GuestStuck`] (its
/// agent connection is broken, as a dead VM's is; the caller's dropping of
/// `sandbox` then kills the VMM).
///
/// `signals` ([`catch_signals`]) were caught since before the VM started:
/// one that came during the boot reaches the command once it runs, rather
/// than killing us with a VM half set up.
pub fn run_with_network(
    stream: UnixStream,
    launch: &Launch,
    sandbox: &mut Sandbox,
    network: Option<&PodNetwork>,
    signals: signal_hook::iterator::Signals,
) -> Result<Outcome> {
    let done = Arc::new(AtomicBool::new(false));
    watch_vmm(sandbox.vmm_pid(), stream.try_clone()?, done.clone());
    let stuck = Arc::new(Mutex::new(None::<String>));
    let stuck_guest = match sandbox.agent_unresponsive() {
        Some(limit) => {
            let (stuck, connection) = (stuck.clone(), stream.try_clone()?);
            Some(StuckGuest {
                limit,
                on_stuck: Box::new(move |why| {
                    *stuck.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    let _ = connection.shutdown(std::net::Shutdown::Both);
                }),
            })
        }
        None => None,
    };
    let result = run_connected(stream, launch, network, stuck_guest, signals).map(|finished| {
        if finished.guest_quiesced {
            sandbox.guest_quiesced();
        }
        finished.outcome
    });
    done.store(true, Ordering::SeqCst);
    if let Some(why) = stuck.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(GuestStuck(why).into());
    }
    result
}

/// Runs `launch` through an agent reached without a VM (an agent serving on
/// a Unix socket, e.g. for debugging the container engine on a host).
pub fn run_on_agent(stream: UnixStream, launch: &Launch) -> Result<Outcome> {
    let signals = catch_signals(launch.terminal())?;
    run_connected(stream, launch, None, None, signals).map(|finished| finished.outcome)
}

/// How a run through the agent ended.
struct Finished {
    outcome: Outcome,
    /// The agent answered Shutdown (see [`Sandbox::guest_quiesced`]).
    guest_quiesced: bool,
}

impl Finished {
    /// Asks the agent to end the guest, whose run ended with `outcome`.
    fn shutting_down(client: &AgentServiceClient, outcome: Outcome) -> Self {
        let shut_down = client.shutdown(
            protocols::quick_call(10),
            &agent::ShutdownRequest::default(),
        );
        Finished {
            outcome,
            guest_quiesced: shut_down.is_ok(),
        }
    }
}

/// A start failure as the shell would report it, or an error.
fn cannot_run(e: &ttrpc::Error, what: &str) -> Result<Outcome> {
    let message = protocols::error_message(e);
    if protocols::is_not_found(e) {
        return Ok(Outcome::CannotRun { code: 127, message });
    }
    if matches!(e, ttrpc::Error::RpcStatus(s) if s.code() == ttrpc::Code::PERMISSION_DENIED) {
        return Ok(Outcome::CannotRun { code: 126, message });
    }
    Err(failed(what, e))
}

/// The agent answered a request with an error: the guest is alive and the
/// error says all there is (the caller need not wait to see whether the VM
/// died).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct AgentRefused {
    what: String,
    message: String,
}

/// `what` failed with `e`: an [`AgentRefused`] when the agent answered,
/// else (no answer, a broken connection) a plain error.
fn failed(what: &str, e: &ttrpc::Error) -> anyhow::Error {
    let message = protocols::error_message(e);
    match e {
        ttrpc::Error::RpcStatus(_) => AgentRefused {
            what: what.to_string(),
            message,
        }
        .into(),
        _ => anyhow::anyhow!("{what}: {message}"),
    }
}

/// Gives the guest its network, if there is one to give.
fn configure_network(client: &AgentServiceClient, network: Option<&PodNetwork>) -> Result<()> {
    let Some(network) = network.filter(|n| !n.is_empty()) else {
        return Ok(());
    };
    network
        .configure_guest(client)
        .context("configuring the guest's network")?;
    tracing::debug!("guest network configured");
    Ok(())
}

fn run_connected(
    stream: UnixStream,
    launch: &Launch,
    network: Option<&PodNetwork>,
    stuck_guest: Option<StuckGuest>,
    signals: signal_hook::iterator::Signals,
) -> Result<Finished> {
    let client = AgentServiceClient::new(
        protocols::client_from_stream(stream)
            .map_err(|e| anyhow::anyhow!("agent connection: {e}"))?,
    );
    let health = stuck_guest
        .map(|s| health::watch_agent(client.clone(), s.limit, s.on_stuck))
        .transpose()
        .context("starting the agent's health checks")?;
    let argv = launch.argv();
    let terminal = launch.terminal();
    let target = match launch {
        Launch::Guest(command) => {
            configure_network(&client, network)?;
            let request = agent::ExecProcessRequest {
                exec_id: GUEST_EXEC_ID.into(),
                argv: command.argv.clone(),
                env: command
                    .env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
                cwd: command.cwd.clone(),
                ..Default::default()
            };
            if let Err(e) = client.exec_process(protocols::prompt_call(), &request) {
                let outcome = cannot_run(&e, &format!("starting {argv:?} in the guest"))?;
                return Ok(Finished::shutting_down(&client, outcome));
            }
            Target {
                container_id: String::new(),
                exec_id: GUEST_EXEC_ID.into(),
            }
        }
        Launch::Container(container) => {
            client
                .create_sandbox(
                    protocols::prompt_call(),
                    &agent::CreateSandboxRequest {
                        shared_fs_tag: container.shared_fs_tag.clone(),
                        ..Default::default()
                    },
                )
                .map_err(|e| failed("preparing the sandbox", &e))?;
            tracing::debug!("guest sandbox prepared");
            configure_network(&client, network)?;
            let spec_json = serde_json::to_string(&container.spec)?;
            client
                .create_container(
                    protocols::prompt_call(),
                    &agent::CreateContainerRequest {
                        container_id: container.id.clone(),
                        spec_json,
                        bundle: container.bundle.clone(),
                        ..Default::default()
                    },
                )
                .map_err(|e| failed("creating the container", &e))?;
            tracing::debug!("container {} created", container.id);
            Target {
                container_id: container.id.clone(),
                exec_id: container.id.clone(),
            }
        }
    };

    let _raw = if terminal { RawTerminal::enter() } else { None };
    let stdout = pump_output(&client, &target, false);
    let stderr = (!terminal).then(|| pump_output(&client, &target, true));

    if terminal {
        // The size is there before the process's first instruction.
        resize(&client, &target);
    }
    if let Launch::Container(container) = launch {
        let started = client.start_container(
            protocols::prompt_call(),
            &agent::StartContainerRequest {
                container_id: container.id.clone(),
                ..Default::default()
            },
        );
        if let Err(e) = started {
            let outcome = cannot_run(&e, &format!("starting {argv:?}"));
            remove_container(&client, &container.id);
            return Ok(Finished::shutting_down(&client, outcome?));
        }
        tracing::debug!("container {} started", container.id);
    }
    pump_input(&client, &target);
    forward_signals(signals, &client, &target, terminal);

    let wait = client
        .wait_process(
            protocols::unbounded_call(),
            &agent::WaitProcessRequest {
                container_id: target.container_id.clone(),
                exec_id: target.exec_id.clone(),
                ..Default::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("waiting for {argv:?}: {}", protocols::error_message(&e)))?;
    tracing::debug!("{argv:?} exited");
    for pump in std::iter::once(stdout).chain(stderr) {
        pump.join()
            .map_err(|_| anyhow::anyhow!("output pump panicked"))??;
    }
    let code = if wait.signal != 0 {
        128 + wait.signal
    } else {
        wait.status as u32
    };
    if let Some(report) = oom_report(&argv, &wait, code) {
        eprintln!("microvm: {report}");
    }
    if let Launch::Container(container) = launch {
        remove_container(&client, &container.id);
    }
    drop(health);
    Ok(Finished::shutting_down(
        &client,
        Outcome::Exited(code.min(255) as u8),
    ))
}

/// What the OOM killer did in the container, said as it happened: the
/// command itself killed, or others of the container's processes killed
/// while the command went on to exit `code`. None when it did nothing.
fn oom_report(argv: &[String], wait: &agent::WaitProcessResponse, code: u32) -> Option<String> {
    if wait.oom_killed {
        return Some(format!(
            "{argv:?} was killed by the OOM killer: the container ran out of memory"
        ));
    }
    let victims = match (wait.oom_kills, wait.oom_victims.is_empty()) {
        (0, _) => return None,
        (_, false) => guest_names(&wait.oom_victims),
        (1, true) => "a process".to_string(),
        (n, true) => format!("{n} processes"),
    };
    Some(format!(
        "the container ran out of memory: the OOM killer ended {victims}; \
         {argv:?} went on and exited with status {code}"
    ))
}

/// The guest's victim names for the user's terminal: they come from the
/// guest (a process picks its own name), so at most [`MAX_NAMED`] of them,
/// each cut to [`MAX_NAME`] characters, control characters escaped.
fn guest_names(names: &[String]) -> String {
    const MAX_NAMED: usize = 8;
    const MAX_NAME: usize = 64;
    let mut shown: Vec<String> = names
        .iter()
        .take(MAX_NAMED)
        .map(|name| {
            name.chars()
                .take(MAX_NAME)
                .flat_map(char::escape_default)
                .collect()
        })
        .collect();
    if names.len() > MAX_NAMED {
        shown.push(format!("{} more", names.len() - MAX_NAMED));
    }
    shown.join(", ")
}

fn remove_container(client: &AgentServiceClient, id: &str) {
    let request = agent::RemoveContainerRequest {
        container_id: id.to_string(),
        ..Default::default()
    };
    if let Err(e) = client.remove_container(protocols::quick_call(10), &request) {
        tracing::warn!("removing container {id}: {}", protocols::error_message(&e));
    }
}

/// Copies one output stream to ours until its EOF (an empty chunk).
fn pump_output(
    client: &AgentServiceClient,
    target: &Target,
    stderr: bool,
) -> thread::JoinHandle<Result<()>> {
    let client = client.clone();
    let request = agent::ReadStreamRequest {
        container_id: target.container_id.clone(),
        exec_id: target.exec_id.clone(),
        ..Default::default()
    };
    thread::spawn(move || -> Result<()> {
        let mut out: Box<dyn Write> = if stderr {
            Box::new(std::io::stderr())
        } else {
            Box::new(std::io::stdout())
        };
        loop {
            let chunk = protocols::read_output(&client, &request, stderr)
                .map_err(|e| anyhow::anyhow!(protocols::error_message(&e)))?;
            if chunk.data.is_empty() {
                return Ok(());
            }
            out.write_all(&chunk.data)?;
            out.flush()?;
        }
    })
}

/// Copies our stdin to the process; detached, since a terminal's stdin may
/// never end.
fn pump_input(client: &AgentServiceClient, target: &Target) {
    let client = client.clone();
    let target = target.clone();
    thread::spawn(move || {
        let mut input = std::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let request = agent::WriteStreamRequest {
                container_id: target.container_id.clone(),
                exec_id: target.exec_id.clone(),
                data: buf[..n].to_vec(),
                ..Default::default()
            };
            if client
                .write_stdin(protocols::unbounded_call(), &request)
                .is_err()
            {
                return;
            }
        }
        let request = agent::CloseStdinRequest {
            container_id: target.container_id.clone(),
            exec_id: target.exec_id.clone(),
            ..Default::default()
        };
        let _ = client.close_stdin(protocols::unbounded_call(), &request);
    });
}

/// The signals we forward to the command (and SIGWINCH with a terminal),
/// caught and held until `forward_signals` delivers them: catch them from
/// before the process exists, so that one arriving while it starts is
/// forwarded once it runs rather than killing us.
pub fn catch_signals(terminal: bool) -> Result<signal_hook::iterator::Signals> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGWINCH};
    let mut wanted = vec![SIGINT, SIGTERM, SIGHUP, SIGQUIT];
    if terminal {
        wanted.push(SIGWINCH);
    }
    signal_hook::iterator::Signals::new(&wanted).context("installing signal handlers")
}

/// Signals to this process go to the command; with a terminal, size
/// changes (SIGWINCH) go to its pty.
fn forward_signals(
    mut signals: signal_hook::iterator::Signals,
    client: &AgentServiceClient,
    target: &Target,
    terminal: bool,
) {
    use signal_hook::consts::SIGWINCH;
    if terminal {
        resize(client, target);
    }
    let client = client.clone();
    let target = target.clone();
    thread::spawn(move || {
        for signal in signals.forever() {
            if signal == SIGWINCH {
                resize(&client, &target);
                continue;
            }
            let request = agent::SignalProcessRequest {
                container_id: target.container_id.clone(),
                exec_id: target.exec_id.clone(),
                signal: signal as u32,
                ..Default::default()
            };
            let _ = client.signal_process(protocols::unbounded_call(), &request);
        }
    });
}

/// Gives the process's pty our terminal's size.
fn resize(client: &AgentServiceClient, target: &Target) {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize struct, which we own.
    if unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut size) } != 0 || size.ws_row == 0 {
        return;
    }
    let request = agent::ResizeTtyRequest {
        container_id: target.container_id.clone(),
        exec_id: target.exec_id.clone(),
        rows: size.ws_row as u32,
        cols: size.ws_col as u32,
        ..Default::default()
    };
    let _ = client.resize_tty(protocols::quick_call(10), &request);
}

/// Our terminal in raw mode while a TTY process runs; restored on drop.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn guest_victim_names_are_bounded_and_escaped() {
        let mut names = vec!["tail (pid 53)".to_string(), "\x1b[2Jx".repeat(40)];
        names.extend((0..20).map(|i| format!("p{i}")));
        let shown = super::guest_names(&names);
        assert!(shown.starts_with("tail (pid 53), \\u{1b}[2Jx"), "{shown}");
        assert!(!shown.contains('\x1b'), "{shown}");
        assert!(shown.ends_with(", p5, 14 more"), "{shown}");
        assert!(shown.len() < 600, "{shown}");
    }

    use std::io::Read;
    use std::time::Instant;

    use super::*;

    /// A stuck guest (here an "agent" that takes requests and answers none)
    /// fails the run once the deadline of its first call passes; it does not hang it.
    #[test]
    fn a_stuck_agent_fails_the_run_instead_of_hanging_it() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let sink = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while matches!(theirs.read(&mut buf), Ok(n) if n > 0) {}
        });
        let launch = Launch::Guest(GuestCommand {
            argv: vec!["true".into()],
            env: Vec::new(),
            cwd: "/".into(),
        });
        let started = Instant::now();
        let error = run_on_agent(ours, &launch).unwrap_err();
        let waited = started.elapsed();
        let text = format!("{error:#}");
        assert!(text.contains("did not answer in time"), "{text}");
        assert!(
            waited >= Duration::from_secs(protocols::PROMPT_CALL_SECS)
                && waited < Duration::from_secs(protocols::PROMPT_CALL_SECS + 15),
            "gave up after {waited:?}"
        );
        sink.join().unwrap();
    }
}
