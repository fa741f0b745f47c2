//! Processes the agent started: their pipes, exit status and lookup by
//! exec id (from the host) or pid (from the reaper).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("no process {0:?}")]
    UnknownProcess(String),
    #[error("process {0:?} is still running")]
    AlreadyRunning(String),
    #[error("no command given")]
    EmptyArgv,
    #[error("{program}: command not found")]
    NotFound { program: String },
    #[error("{program}: permission denied")]
    PermissionDenied { program: String },
    #[error("starting {program}")]
    Spawn { program: String, source: io::Error },
    #[error("working directory {cwd}")]
    Cwd { cwd: String, source: io::Error },
    #[error("process {0:?} has no terminal")]
    NoTerminal(String),
    #[error("stdin of {0:?} is closed")]
    StdinClosed(String),
    #[error("{what} of {exec_id:?}")]
    Io {
        what: &'static str,
        exec_id: String,
        source: io::Error,
    },
    #[error("signal {signal} to {exec_id:?}")]
    Signal {
        exec_id: String,
        signal: i32,
        source: nix::Error,
    },
}

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub argv: Vec<String>,
    /// Exactly the process's environment, as `KEY=VALUE`.
    pub env: Vec<String>,
    /// "/" when empty.
    pub cwd: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A process's key: (container id, exec id); the container id is empty for
/// guest-level processes.
pub type ProcessKey = (String, String);

/// The host ends of a process's stdio: pipes, or one pty master for all
/// three (then `stdout` reads it, `stdin` writes it, `stderr` is None).
#[derive(Default)]
pub struct Stdio3 {
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    /// The pty master, for resizing.
    pub tty: Option<File>,
}

/// One started process.
pub struct Process {
    pub exec_id: String,
    /// Empty for guest-level processes.
    pub container_id: String,
    pub pid: i32,
    /// When it was started, on the kernel log's clock (see [`crate::oom`]).
    pub started_usec: u64,
    stdin: Mutex<Option<File>>,
    stdout: Mutex<Option<File>>,
    stderr: Mutex<Option<File>>,
    tty: Option<File>,
    exit: Mutex<Option<Exit>>,
    exited: Condvar,
}

/// One read from an output pipe or pty master; it is dropped at its EOF
/// (a pty master reports EIO once the last slave fd closed).
fn read_pipe(pipe: &mut Option<File>, buf: &mut [u8]) -> io::Result<usize> {
    let Some(reader) = pipe.as_mut() else {
        return Ok(0);
    };
    loop {
        match reader.read(buf) {
            Ok(0) => {
                *pipe = None;
                return Ok(0);
            }
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                *pipe = None;
                return Ok(0);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Process {
    pub fn new(exec_id: &str, pid: i32, stdio: Stdio3) -> Process {
        Process {
            exec_id: exec_id.to_string(),
            container_id: String::new(),
            pid,
            started_usec: crate::oom::now_usec(),
            stdin: Mutex::new(stdio.stdin),
            stdout: Mutex::new(stdio.stdout),
            stderr: Mutex::new(stdio.stderr),
            tty: stdio.tty,
            exit: Mutex::new(None),
            exited: Condvar::new(),
        }
    }

    /// A container's process.
    pub fn in_container(container_id: &str, exec_id: &str, pid: i32, stdio: Stdio3) -> Process {
        Process {
            container_id: container_id.to_string(),
            ..Process::new(exec_id, pid, stdio)
        }
    }

    /// Up to `max` bytes of output, blocking until some is there; empty at EOF.
    /// Output stays readable after the process ended.
    pub fn read(&self, stream: Stream, max: usize) -> Result<Vec<u8>, ProcessError> {
        let mut buf = vec![0u8; max];
        let n = match stream {
            Stream::Stdout => read_pipe(&mut lock(&self.stdout), &mut buf),
            Stream::Stderr => read_pipe(&mut lock(&self.stderr), &mut buf),
        }
        .map_err(|source| ProcessError::Io {
            what: if stream == Stream::Stdout {
                "reading stdout"
            } else {
                "reading stderr"
            },
            exec_id: self.exec_id.clone(),
            source,
        })?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Writes all of `data` to stdin.
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), ProcessError> {
        let mut stdin = lock(&self.stdin);
        let pipe = stdin
            .as_mut()
            .ok_or_else(|| ProcessError::StdinClosed(self.exec_id.clone()))?;
        pipe.write_all(data).map_err(|source| ProcessError::Io {
            what: "writing stdin",
            exec_id: self.exec_id.clone(),
            source,
        })
    }

    pub fn close_stdin(&self) {
        if self.tty.is_some() {
            // A terminal has no stdin of its own to close: send EOF (^D).
            if let Some(master) = lock(&self.stdin).as_mut() {
                let _ = master.write_all(&[4]);
            }
            return;
        }
        lock(&self.stdin).take();
    }

    /// Sets the terminal size of a TTY process.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ProcessError> {
        let tty = self
            .tty
            .as_ref()
            .ok_or_else(|| ProcessError::NoTerminal(self.exec_id.clone()))?;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize struct, which we own.
        if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
            return Err(ProcessError::Io {
                what: "resizing the terminal",
                exec_id: self.exec_id.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Whether this process has a terminal.
    pub fn has_tty(&self) -> bool {
        self.tty.is_some()
    }

    pub fn signal(&self, signal: i32) -> Result<(), ProcessError> {
        if lock(&self.exit).is_some() {
            // Gone already; its pid may belong to someone else by now.
            return Ok(());
        }
        let signal_error = |source| ProcessError::Signal {
            exec_id: self.exec_id.clone(),
            signal,
            source,
        };
        let sig = nix::sys::signal::Signal::try_from(signal).map_err(signal_error)?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig).map_err(signal_error)
    }

    /// Blocks until the process ended.
    pub fn wait(&self) -> Exit {
        let mut exit = lock(&self.exit);
        loop {
            if let Some(exit) = *exit {
                return exit;
            }
            exit = self
                .exited
                .wait(exit)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        *lock(&self.exit)
    }

    fn set_exit(&self, exit: Exit) {
        *lock(&self.exit) = Some(exit);
        self.exited.notify_all();
    }
}

#[derive(Default)]
struct Tables {
    by_key: HashMap<ProcessKey, Arc<Process>>,
    running: HashMap<i32, Arc<Process>>,
}

fn guest_key(exec_id: &str) -> ProcessKey {
    (String::new(), exec_id.to_string())
}

/// Every process the agent started.
#[derive(Default)]
pub struct ProcessTable {
    tables: Mutex<Tables>,
}

impl ProcessTable {
    /// Starts a process in its own session with piped stdio.
    pub fn spawn(&self, exec_id: &str, spec: &Spec) -> Result<Arc<Process>, ProcessError> {
        let program = spec.argv.first().ok_or(ProcessError::EmptyArgv)?;
        let cwd = if spec.cwd.is_empty() {
            "/"
        } else {
            spec.cwd.as_str()
        };
        if let Err(source) = std::fs::metadata(cwd) {
            return Err(ProcessError::Cwd {
                cwd: cwd.to_string(),
                source,
            });
        }
        let mut command = Command::new(program);
        command
            .args(&spec.argv[1..])
            .env_clear()
            .envs(spec.env.iter().filter_map(|kv| kv.split_once('=')))
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: setsid and sigprocmask are async-signal-safe and touch no
        // memory but a local set; the new session keeps the host's signals
        // for this process and its children, and the empty mask undoes the
        // reaper's blocked SIGCHLD, which execve would pass on (a shell's
        // `wait` then waited for ever).
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid().map_err(io::Error::from)?;
                nix::sys::signal::sigprocmask(
                    nix::sys::signal::SigmaskHow::SIG_SETMASK,
                    Some(&nix::sys::signal::SigSet::empty()),
                    None,
                )
                .map_err(io::Error::from)?;
                Ok(())
            });
        }
        // The table stays locked from spawn to insert, so the reaper cannot
        // route this pid's exit before the process is known.
        let mut tables = lock(&self.tables);
        if let Some(existing) = tables.by_key.get(&guest_key(exec_id)) {
            if existing.exit().is_none() {
                return Err(ProcessError::AlreadyRunning(exec_id.to_string()));
            }
        }
        let mut child = command.spawn().map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ProcessError::NotFound {
                program: program.clone(),
            },
            io::ErrorKind::PermissionDenied => ProcessError::PermissionDenied {
                program: program.clone(),
            },
            _ => ProcessError::Spawn {
                program: program.clone(),
                source,
            },
        })?;
        let file = |fd: Option<OwnedFd>| fd.map(File::from);
        let process = Arc::new(Process::new(
            exec_id,
            child.id() as i32,
            Stdio3 {
                stdin: file(child.stdin.take().map(OwnedFd::from)),
                stdout: file(child.stdout.take().map(OwnedFd::from)),
                stderr: file(child.stderr.take().map(OwnedFd::from)),
                tty: None,
            },
        ));
        // `child` is dropped without waiting: the reaper collects every child.
        tables.by_key.insert(guest_key(exec_id), process.clone());
        tables.running.insert(process.pid, process.clone());
        Ok(process)
    }

    /// Registers a process started elsewhere (a container's). Call with the
    /// process unable to exit yet (it waits for its start), so the reaper
    /// cannot see its exit before it is known here.
    pub fn register(&self, key: ProcessKey, process: Arc<Process>) -> Result<(), ProcessError> {
        let mut tables = lock(&self.tables);
        if let Some(existing) = tables.by_key.get(&key) {
            if existing.exit().is_none() {
                return Err(ProcessError::AlreadyRunning(key.1));
            }
        }
        tables.by_key.insert(key, process.clone());
        tables.running.insert(process.pid, process);
        Ok(())
    }

    /// Forgets every process of a container.
    pub fn remove_container(&self, container_id: &str) {
        let mut tables = lock(&self.tables);
        tables
            .by_key
            .retain(|(container, _), _| container != container_id);
        tables
            .running
            .retain(|_, process| process.container_id != container_id);
    }

    pub fn get(&self, exec_id: &str) -> Result<Arc<Process>, ProcessError> {
        self.lookup(&guest_key(exec_id))
    }

    pub fn lookup(&self, key: &ProcessKey) -> Result<Arc<Process>, ProcessError> {
        lock(&self.tables).by_key.get(key).cloned().ok_or_else(|| {
            ProcessError::UnknownProcess(if key.0.is_empty() {
                key.1.clone()
            } else {
                format!("{}/{}", key.0, key.1)
            })
        })
    }

    /// Reaps `pid` with `reap` while no spawn is in flight, and hands its
    /// exit to its waiters if it is ours (orphans re-parented to PID 1 are
    /// not). Holding the table lock matters twice: a spawn inserts its pid
    /// before the reaper can look for it, and std's own reaping of a child
    /// whose exec failed (inside `spawn`) never races with ours.
    pub fn collect(&self, pid: i32, reap: impl FnOnce(i32) -> Option<Exit>) {
        let mut tables = lock(&self.tables);
        if let Some(exit) = reap(pid) {
            if let Some(process) = tables.running.remove(&pid) {
                process.set_exit(exit);
            }
        }
    }
}
