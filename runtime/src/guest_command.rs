//! Running one command in the guest through the agent: start it, pump
//! stdin/stdout/stderr both ways while it runs, forward signals, wait for its
//! end. A dead VM breaks the agent connection at once, so nothing waits forever.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use protocols::agent;
use protocols::agent_ttrpc::AgentServiceClient;

use crate::sandbox::Sandbox;

/// What to run and how.
#[derive(Debug, Clone)]
pub struct GuestCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit code, with 128+N for death by signal N.
    Exited(u8),
    /// The program could not be started: a shell's exit code for that (127
    /// missing, 126 not executable) and the agent's message.
    CannotRun { code: u8, message: String },
}

const EXEC_ID: &str = "cmd";

fn no_timeout() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(0)
}

/// Watches the VMM process; when it ends, shuts the agent stream down so
/// every pending agent call fails instead of waiting forever.
fn watch_vmm(vmm_pid: u32, stream: UnixStream, done: Arc<AtomicBool>) {
    thread::spawn(move || {
        let stat = format!("/proc/{vmm_pid}/stat");
        while !done.load(Ordering::SeqCst) {
            let alive = std::fs::read_to_string(&stat)
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .map(|rest| !rest.trim_start().starts_with('Z'))
                        .unwrap_or(false)
                })
                .unwrap_or(false);
            if !alive {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
}

/// Runs `command` in the guest whose agent is on `stream`.
pub fn run(stream: UnixStream, command: &GuestCommand, sandbox: &mut Sandbox) -> Result<Outcome> {
    let done = Arc::new(AtomicBool::new(false));
    watch_vmm(sandbox.vmm_pid(), stream.try_clone()?, done.clone());
    let result = run_connected(stream, command);
    done.store(true, Ordering::SeqCst);
    result
}

fn run_connected(stream: UnixStream, command: &GuestCommand) -> Result<Outcome> {
    let client = AgentServiceClient::new(
        protocols::client_from_stream(stream)
            .map_err(|e| anyhow::anyhow!("agent connection: {e}"))?,
    );

    let request = agent::ExecProcessRequest {
        exec_id: EXEC_ID.into(),
        argv: command.argv.clone(),
        env: command
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        cwd: command.cwd.clone(),
        ..Default::default()
    };
    if let Err(e) = client.exec_process(no_timeout(), &request) {
        let message = protocols::error_message(&e);
        if protocols::is_not_found(&e) {
            return Ok(Outcome::CannotRun { code: 127, message });
        }
        if matches!(&e, ttrpc::Error::RpcStatus(s) if s.code() == ttrpc::Code::PERMISSION_DENIED) {
            return Ok(Outcome::CannotRun { code: 126, message });
        }
        return Err(anyhow::anyhow!(
            "starting {:?} in the guest: {message}",
            command.argv
        ));
    }

    // Output pumps: each ends at the stream's EOF (an empty chunk).
    let pump = |stderr: bool| {
        let client = client.clone();
        thread::spawn(move || -> Result<()> {
            let request = agent::ReadStreamRequest {
                exec_id: EXEC_ID.into(),
                ..Default::default()
            };
            let mut out: Box<dyn Write> = if stderr {
                Box::new(std::io::stderr())
            } else {
                Box::new(std::io::stdout())
            };
            loop {
                let chunk = if stderr {
                    client.read_stderr(no_timeout(), &request)
                } else {
                    client.read_stdout(no_timeout(), &request)
                }
                .map_err(|e| anyhow::anyhow!(protocols::error_message(&e)))?;
                if chunk.data.is_empty() {
                    return Ok(());
                }
                out.write_all(&chunk.data)?;
                out.flush()?;
            }
        })
    };
    let stdout = pump(false);
    let stderr = pump(true);

    // Stdin pump: detached, since a terminal's stdin may never end.
    {
        let client = client.clone();
        thread::spawn(move || {
            let mut input = std::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let request = agent::WriteStreamRequest {
                    exec_id: EXEC_ID.into(),
                    data: buf[..n].to_vec(),
                    ..Default::default()
                };
                if client.write_stdin(no_timeout(), &request).is_err() {
                    return;
                }
            }
            let request = agent::CloseStdinRequest {
                exec_id: EXEC_ID.into(),
                ..Default::default()
            };
            let _ = client.close_stdin(no_timeout(), &request);
        });
    }

    // Signals to this process go to the command.
    {
        let client = client.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
            signal_hook::consts::SIGQUIT,
        ])
        .context("installing signal handlers")?;
        thread::spawn(move || {
            for signal in signals.forever() {
                let request = agent::SignalProcessRequest {
                    exec_id: EXEC_ID.into(),
                    signal: signal as u32,
                    ..Default::default()
                };
                let _ = client.signal_process(no_timeout(), &request);
            }
        });
    }

    let wait = client
        .wait_process(
            no_timeout(),
            &agent::WaitProcessRequest {
                exec_id: EXEC_ID.into(),
                ..Default::default()
            },
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "waiting for {:?}: {}",
                command.argv,
                protocols::error_message(&e)
            )
        })?;
    for pump in [stdout, stderr] {
        pump.join()
            .map_err(|_| anyhow::anyhow!("output pump panicked"))??;
    }
    let code = if wait.signal != 0 {
        128 + wait.signal
    } else {
        wait.status as u32
    };
    let _ = client.shutdown(
        ttrpc::context::with_timeout(Duration::from_secs(2).as_nanos() as i64),
        &agent::ShutdownRequest::default(),
    );
    Ok(Outcome::Exited(code.min(255) as u8))
}
