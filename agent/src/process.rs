//! Processes the agent started: their pipes, exit status and lookup by
//! exec id (from the host) or pid (from the reaper).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
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
    #[error("starting {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("working directory {cwd}: {source}")]
    Cwd { cwd: String, source: io::Error },
    #[error("stdin of {0:?} is closed")]
    StdinClosed(String),
    #[error("{what} of {exec_id:?}: {source}")]
    Io {
        what: &'static str,
        exec_id: String,
        source: io::Error,
    },
    #[error("signal {signal} to {exec_id:?}: {source}")]
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

/// One started process.
pub struct Process {
    pub exec_id: String,
    pub pid: i32,
    stdin: Mutex<Option<ChildStdin>>,
    stdout: Mutex<Option<ChildStdout>>,
    stderr: Mutex<Option<ChildStderr>>,
    exit: Mutex<Option<Exit>>,
    exited: Condvar,
}

/// One read from an output pipe; the pipe is dropped at its EOF.
fn read_pipe<R: Read>(pipe: &mut Option<R>, buf: &mut [u8]) -> io::Result<usize> {
    let Some(reader) = pipe.as_mut() else {
        return Ok(0);
    };
    loop {
        match reader.read(buf) {
            Ok(0) => {
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
        lock(&self.stdin).take();
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
    by_id: HashMap<String, Arc<Process>>,
    running: HashMap<i32, Arc<Process>>,
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
        // SAFETY: setsid is async-signal-safe and touches no memory; the new
        // session keeps the host's signals for this process and its children.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid().map_err(io::Error::from)?;
                Ok(())
            });
        }
        // The table stays locked from spawn to insert, so the reaper cannot
        // route this pid's exit before the process is known.
        let mut tables = lock(&self.tables);
        if let Some(existing) = tables.by_id.get(exec_id) {
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
        let process = Arc::new(Process {
            exec_id: exec_id.to_string(),
            pid: child.id() as i32,
            stdin: Mutex::new(child.stdin.take()),
            stdout: Mutex::new(child.stdout.take()),
            stderr: Mutex::new(child.stderr.take()),
            exit: Mutex::new(None),
            exited: Condvar::new(),
        });
        // `child` is dropped without waiting: the reaper collects every child.
        tables.by_id.insert(exec_id.to_string(), process.clone());
        tables.running.insert(process.pid, process.clone());
        Ok(process)
    }

    pub fn get(&self, exec_id: &str) -> Result<Arc<Process>, ProcessError> {
        lock(&self.tables)
            .by_id
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ProcessError::UnknownProcess(exec_id.to_string()))
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
