//! OCI containers inside the guest, runc-style: create (namespaces,
//! mounts, cgroup; the init process waiting), start, exec, signals, stats,
//! pause/resume, update, remove. The setup itself runs in separate,
//! single-threaded processes ([`child`]); the agent drives them over a
//! [`channel::Channel`] and keeps their stdio in the [`ProcessTable`].

pub mod cgroup;
pub mod channel;
pub mod child;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType, LinuxResources, Process, Spec};

use crate::process::{Exit, Process as Proc, ProcessError, ProcessTable, Stdio3};
use cgroup::Cgroup;
use channel::{Channel, FromChild, ToChild};
use child::{SetupConfig, SetupKind};

/// The argument that makes the agent binary a container setup process.
pub const SETUP_ARG: &str = "__container-setup";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid OCI spec: {0}")]
    InvalidSpec(String),
    #[error("no container {0:?}")]
    NotFound(String),
    #[error("container {0:?} already exists")]
    Exists(String),
    #[error("container {id:?} is {state}, not {wanted}")]
    WrongState {
        id: String,
        state: &'static str,
        wanted: &'static str,
    },
    #[error("container setup: {0}")]
    Setup(String),
    #[error("exec: {0:?}: executable file not found in $PATH")]
    ExecNotFound(String),
    #[error("exec: {0:?}: permission denied")]
    ExecDenied(String),
    #[error("cgroup: {0}")]
    Cgroup(String),
    #[error(transparent)]
    Process(#[from] ProcessError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Paused,
    Stopped,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Running => "running",
            State::Paused => "paused",
            State::Stopped => "stopped",
        }
    }
}

struct Container {
    id: String,
    spec: Spec,
    cgroup: Cgroup,
    init: Arc<Proc>,
    /// The init's setup channel until it is started.
    pending_start: Mutex<Option<Channel>>,
    state: Mutex<State>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Container {
    fn state(&self) -> State {
        let mut state = lock(&self.state);
        if *state != State::Stopped && self.init.exit().is_some() {
            *state = State::Stopped;
        }
        *state
    }

    fn expect(&self, wanted: State) -> Result<(), ContainerError> {
        let state = self.state();
        if state != wanted {
            return Err(ContainerError::WrongState {
                id: self.id.clone(),
                state: state.name(),
                wanted: wanted.name(),
            });
        }
        Ok(())
    }

    fn namespaces(&self) -> Vec<LinuxNamespaceType> {
        let listed: Vec<LinuxNamespaceType> = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default()
            .iter()
            .map(|ns| ns.typ())
            .collect();
        // setns order: the user namespace first (it grants the rest), mount last.
        [
            LinuxNamespaceType::User,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Cgroup,
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Mount,
        ]
        .into_iter()
        .filter(|kind| listed.contains(kind))
        .collect()
    }
}

/// Every container of the sandbox.
/// What the OOM killer did in a container (see [`Containers::oom_report`]).
#[derive(Debug, Default)]
pub struct OomReport {
    /// The process asked about was a victim.
    pub process_killed: bool,
    /// OOM kills its cgroup counted.
    pub kills: u64,
    /// The victims the guest kernel named (`COMM (pid N)`).
    pub victims: Vec<String>,
}

pub struct Containers {
    processes: Arc<ProcessTable>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

/// A process being set up, before it is registered.
struct Launched {
    pid: i32,
    stdio: Stdio3,
    channel: Channel,
}

fn valid_id(id: &str) -> Result<(), ContainerError> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || id.starts_with('.')
    {
        return Err(ContainerError::InvalidSpec(format!(
            "container id {id:?} must be 1-128 characters of [A-Za-z0-9_.-]"
        )));
    }
    Ok(())
}

/// Parses and checks a spec the way runc does before touching anything.
pub fn parse_spec(spec_json: &str) -> Result<Spec, ContainerError> {
    let spec: Spec = serde_json::from_str(spec_json)
        .map_err(|e| ContainerError::InvalidSpec(format!("malformed config: {e}")))?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| ContainerError::InvalidSpec("no process".into()))?;
    check_process(process)?;
    if spec.root().is_none() {
        return Err(ContainerError::InvalidSpec("no root".into()));
    }
    if let Some(seccomp) = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        child::seccomp::compile(seccomp)?;
    }
    Ok(spec)
}

fn check_process(process: &Process) -> Result<(), ContainerError> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(ContainerError::InvalidSpec("process.args is empty".into()));
    }
    if !process.cwd().is_absolute() {
        return Err(ContainerError::InvalidSpec(format!(
            "process.cwd {} is not absolute",
            process.cwd().display()
        )));
    }
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ContainerError::Setup(format!("creating a pipe: {e}")))
}

fn write_id_map(pid: i32, file: &str, mappings: &[LinuxIdMapping]) -> Result<(), ContainerError> {
    let text: String = mappings
        .iter()
        .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
        .collect();
    std::fs::write(format!("/proc/{pid}/{file}"), text)
        .map_err(|e| ContainerError::Setup(format!("writing {file} of {pid}: {e}")))
}

impl Containers {
    pub fn new(processes: Arc<ProcessTable>) -> Self {
        Self {
            processes,
            containers: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))
    }

    /// `runc create`: returns the init's pid.
    pub fn create(&self, id: &str, spec_json: &str, bundle: &Path) -> Result<i32, ContainerError> {
        valid_id(id)?;
        if lock(&self.containers).contains_key(id) {
            return Err(ContainerError::Exists(id.to_string()));
        }
        let spec = parse_spec(spec_json)?;
        let root = spec.root().as_ref().expect("checked by parse_spec");
        let rootfs = if root.path().is_absolute() {
            root.path().clone()
        } else {
            bundle.join(root.path())
        };
        if !rootfs.is_dir() {
            return Err(ContainerError::InvalidSpec(format!(
                "rootfs {} does not exist or is not a directory",
                rootfs.display()
            )));
        }
        let process = spec.process().clone().expect("checked by parse_spec");
        let cgroup = Cgroup::create(id)?;
        let result = (|| {
            if let Some(resources) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
                cgroup.apply(resources)?;
            }
            let mappings = spec.linux().clone().unwrap_or_default();
            let config = SetupConfig {
                kind: SetupKind::Create {
                    spec: Box::new(spec.clone()),
                    rootfs,
                },
                process: process.clone(),
                cgroup: cgroup.path().to_path_buf(),
            };
            self.launch(config, process.terminal() == Some(true), |pid| {
                write_id_map(
                    pid,
                    "uid_map",
                    mappings.uid_mappings().as_deref().unwrap_or_default(),
                )?;
                write_id_map(
                    pid,
                    "gid_map",
                    mappings.gid_mappings().as_deref().unwrap_or_default(),
                )
            })
        })();
        let launched = match result {
            Ok(launched) => launched,
            Err(e) => {
                let _ = cgroup.kill_all();
                let _ = cgroup.remove();
                return Err(e);
            }
        };
        let init = Arc::new(Proc::in_container(id, id, launched.pid, launched.stdio));
        if let Err(e) = self
            .processes
            .register((id.to_string(), id.to_string()), init.clone())
        {
            let _ = cgroup.kill_all();
            let _ = cgroup.remove();
            return Err(e.into());
        }
        let pid = init.pid;
        lock(&self.containers).insert(
            id.to_string(),
            Arc::new(Container {
                id: id.to_string(),
                spec,
                cgroup,
                init,
                pending_start: Mutex::new(Some(launched.channel)),
                state: Mutex::new(State::Created),
            }),
        );
        Ok(pid)
    }

    /// Starts a setup process and drives it until its process is ready.
    fn launch(
        &self,
        config: SetupConfig,
        terminal: bool,
        map_ids: impl Fn(i32) -> Result<(), ContainerError>,
    ) -> Result<Launched, ContainerError> {
        let (ours, theirs) = Channel::pair()?;
        let mut command = Command::new("/proc/self/exe");
        command.arg(SETUP_ARG);
        let mut stdio = Stdio3::default();
        if terminal {
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        } else {
            let (stdin_r, stdin_w) = pipe()?;
            let (stdout_r, stdout_w) = pipe()?;
            let (stderr_r, stderr_w) = pipe()?;
            command
                .stdin(Stdio::from(stdin_r))
                .stdout(Stdio::from(stdout_w))
                .stderr(Stdio::from(stderr_w));
            stdio.stdin = Some(File::from(stdin_w));
            stdio.stdout = Some(File::from(stdout_r));
            stdio.stderr = Some(File::from(stderr_r));
        }
        let child_fd = theirs.raw_fd();
        // SAFETY: dup2 is async-signal-safe; it gives the child its channel
        // end at the agreed fd (and dup2 clears close-on-exec there).
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(child_fd, channel::CHILD_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // The child is reaped by the reaper thread like every other.
        command
            .spawn()
            .map_err(|e| ContainerError::Setup(format!("starting the setup process: {e}")))?;
        // Dropping the command closes our copies of the child's ends.
        drop(command);
        drop(theirs);
        ours.send(&ToChild::Setup(Box::new(config)))?;
        let mut pid = None;
        let mut ready = false;
        loop {
            match ours.receive_with_fd::<FromChild>()? {
                Some((FromChild::MapIds { pid }, _)) => {
                    map_ids(pid)?;
                    ours.send(&ToChild::IdsMapped)?;
                }
                Some((FromChild::Pid { pid: child }, _)) => {
                    pid = Some(child);
                    if ready {
                        break;
                    }
                }
                Some((FromChild::Console, fd)) => {
                    let master = fd.ok_or_else(|| {
                        ContainerError::Setup("the console message carried no pty".into())
                    })?;
                    let master = File::from(master);
                    stdio.stdin = Some(master.try_clone().map_err(|e| {
                        ContainerError::Setup(format!("duplicating the pty master: {e}"))
                    })?);
                    stdio.stdout = Some(master.try_clone().map_err(|e| {
                        ContainerError::Setup(format!("duplicating the pty master: {e}"))
                    })?);
                    stdio.tty = Some(master);
                }
                // Stage 1 (Pid) and stage 2 (Ready) write independently:
                // either may come first.
                Some((FromChild::Ready, _)) => {
                    ready = true;
                    if pid.is_some() {
                        break;
                    }
                }
                Some((FromChild::Failed(failure), _)) => return Err(failure.into()),
                None => {
                    return Err(ContainerError::Setup(
                        "the setup process ended without a word".into(),
                    ))
                }
            }
        }
        let pid = pid.ok_or_else(|| ContainerError::Setup("no pid was reported".into()))?;
        Ok(Launched {
            pid,
            stdio,
            channel: ours,
        })
    }

    /// Tells a waiting process to exec and reports how that went.
    fn release(channel: Channel) -> Result<(), ContainerError> {
        channel.send(&ToChild::Start)?;
        match channel.receive::<FromChild>()? {
            None => Ok(()),
            Some(FromChild::Failed(failure)) => Err(failure.into()),
            Some(other) => Err(ContainerError::Setup(format!(
                "unexpected {other:?} after start"
            ))),
        }
    }

    /// `runc start`.
    pub fn start(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        container.expect(State::Created)?;
        let channel =
            lock(&container.pending_start)
                .take()
                .ok_or_else(|| ContainerError::WrongState {
                    id: id.to_string(),
                    state: "starting",
                    wanted: "created",
                })?;
        Self::release(channel)?;
        *lock(&container.state) = State::Running;
        Ok(())
    }

    /// `runc exec`: an extra process in a running container; returns its pid.
    pub fn exec(&self, id: &str, exec_id: &str, process_json: &str) -> Result<i32, ContainerError> {
        let container = self.get(id)?;
        container.expect(State::Running)?;
        if exec_id.is_empty() || exec_id == id {
            return Err(ContainerError::InvalidSpec(format!(
                "exec id {exec_id:?} must be set and differ from the container id"
            )));
        }
        let process: Process = serde_json::from_str(process_json)
            .map_err(|e| ContainerError::InvalidSpec(format!("malformed process: {e}")))?;
        check_process(&process)?;
        let seccomp = container
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.seccomp().clone());
        let config = SetupConfig {
            kind: SetupKind::Exec {
                init_pid: container.init.pid,
                namespaces: container.namespaces(),
                seccomp,
            },
            process: process.clone(),
            cgroup: container.cgroup.path().to_path_buf(),
        };
        let launched = self.launch(config, process.terminal() == Some(true), |_| {
            Err(ContainerError::Setup(
                "an exec cannot create a user namespace".into(),
            ))
        })?;
        let proc = Arc::new(Proc::in_container(
            id,
            exec_id,
            launched.pid,
            launched.stdio,
        ));
        self.processes
            .register((id.to_string(), exec_id.to_string()), proc.clone())?;
        Self::release(launched.channel)?;
        Ok(proc.pid)
    }

    /// Signals the init (or with `all`, every process of the container).
    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        if all {
            let sig = nix::sys::signal::Signal::try_from(signal)
                .map_err(|e| ContainerError::InvalidSpec(format!("signal {signal}: {e}")))?;
            for pid in container.cgroup.pids() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
            }
            return Ok(());
        }
        let exec_id = if exec_id.is_empty() { id } else { exec_id };
        let process = self
            .processes
            .lookup(&(id.to_string(), exec_id.to_string()))?;
        process.signal(signal)?;
        Ok(())
    }

    /// What the OOM killer did in container `id` so far, and whether
    /// `process` (of that container, ended) was its victim.
    pub fn oom_report(&self, id: &str, process: &Proc) -> OomReport {
        let Ok(container) = self.get(id) else {
            return OomReport::default();
        };
        let kills = container.cgroup.oom_kills();
        if kills == 0 {
            return OomReport::default();
        }
        let logged = crate::oom::kills();
        let is_victim = |kill: &crate::oom::OomKill| {
            kill.pid == process.pid as u32 && kill.at_usec + 100_000 >= process.started_usec
        };
        let killed_by_signal_9 = matches!(process.exit(), Some(Exit::Signal(libc::SIGKILL)));
        let process_killed =
            killed_by_signal_9 && (logged.iter().any(is_victim) || logged.is_empty());
        let root = Path::new(cgroup::ROOT);
        let victims = logged
            .iter()
            .filter(|kill| {
                is_victim(kill)
                    || kill.memcg.as_deref().is_some_and(|memcg| {
                        crate::oom::in_cgroup(memcg, root, container.cgroup.path())
                    })
            })
            .map(ToString::to_string)
            .collect();
        OomReport {
            process_killed,
            kills,
            victims,
        }
    }

    pub fn pids(&self, id: &str) -> Result<Vec<u32>, ContainerError> {
        Ok(self.get(id)?.cgroup.pids())
    }

    pub fn stats(
        &self,
        id: &str,
    ) -> Result<protocols::agent::StatsContainerResponse, ContainerError> {
        Ok(self.get(id)?.cgroup.stats())
    }

    pub fn pause(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        container.expect(State::Running)?;
        container.cgroup.freeze(true)?;
        *lock(&container.state) = State::Paused;
        Ok(())
    }

    pub fn resume(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        container.expect(State::Paused)?;
        container.cgroup.freeze(false)?;
        *lock(&container.state) = State::Running;
        Ok(())
    }

    pub fn update(&self, id: &str, resources_json: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let resources: LinuxResources = serde_json::from_str(resources_json)
            .map_err(|e| ContainerError::InvalidSpec(format!("malformed resources: {e}")))?;
        container.cgroup.apply(&resources)
    }

    /// Kills whatever still runs in the container and forgets it.
    pub fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        if container.cgroup.is_frozen() {
            let _ = container.cgroup.freeze(false);
        }
        // A created-but-unstarted init ends when its channel closes.
        lock(&container.pending_start).take();
        container.cgroup.kill_all()?;
        if container.init.exit().is_none() {
            // Its exit is collected by the reaper; wait for it briefly.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while container.init.exit().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        container.cgroup.remove()?;
        self.processes.remove_container(id);
        lock(&self.containers).remove(id);
        Ok(())
    }

    /// Removes every container.
    pub fn remove_all(&self) {
        let ids: Vec<String> = lock(&self.containers).keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.remove(&id) {
                tracing::warn!("removing container {id}: {}", protocols::error_chain(&e));
            }
        }
    }

    /// How the container's init ended, if it did.
    pub fn init_exit(&self, id: &str) -> Option<Exit> {
        self.get(id).ok().and_then(|c| c.init.exit())
    }
}

/// The bundle directory of a container id inside the shared directory.
pub fn bundle_in_share(share: &Path, bundle: &str) -> PathBuf {
    if bundle.starts_with('/') {
        PathBuf::from(bundle)
    } else {
        share.join(bundle)
    }
}
