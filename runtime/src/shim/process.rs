//! A process of a container as containerd sees it: its stdio, its status
//! and, once it ended, its exit status and time. Waiters block on it.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime};

use containerd_shim_protos::types::task::Status;

use super::io::{Stdin, StdioPaths};

/// Exit status reported for processes of a VM that died under them.
pub const VM_DIED_EXIT: u32 = 255;

#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

#[derive(Debug)]
struct State {
    status: Status,
    exit: Option<Exit>,
    /// The guest pid, once started.
    pid: u32,
}

/// One process: a container's init (exec id empty) or an exec.
#[derive(Debug)]
pub struct Process {
    pub container_id: String,
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// Its stdin from containerd (closed by CloseIO).
    pub stdin: Stdin,
    state: Mutex<State>,
    changed: Condvar,
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, stdio: StdioPaths, stdin: Stdin) -> Self {
        Self {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stdio,
            stdin,
            state: Mutex::new(State {
                status: Status::CREATED,
                exit: None,
                pid: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> Status {
        self.lock().status
    }

    pub fn pid(&self) -> u32 {
        self.lock().pid
    }

    pub fn exit(&self) -> Option<Exit> {
        self.lock().exit
    }

    /// Running from now on, with guest pid `pid`.
    pub fn set_running(&self, pid: u32) {
        let mut state = self.lock();
        if state.exit.is_none() {
            state.status = Status::RUNNING;
            state.pid = pid;
        }
    }

    /// Paused or running again (the container's cgroup freezer).
    pub fn set_paused(&self, paused: bool) {
        let mut state = self.lock();
        if state.exit.is_none() {
            state.status = if paused {
                Status::PAUSED
            } else {
                Status::RUNNING
            };
        }
    }

    /// Records the end; true the first time only (the exit event is
    /// published once, by whoever records it).
    pub fn set_exited(&self, status: u32) -> bool {
        let mut state = self.lock();
        if state.exit.is_some() {
            return false;
        }
        state.status = Status::STOPPED;
        state.exit = Some(Exit {
            status,
            at: SystemTime::now(),
        });
        self.changed.notify_all();
        true
    }

    /// Blocks until the process ended.
    pub fn wait(&self) -> Exit {
        let mut state = self.lock();
        loop {
            if let Some(exit) = state.exit {
                return exit;
            }
            state = self
                .changed
                .wait_timeout(state, Duration::from_secs(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A protobuf timestamp of `at`.
pub fn timestamp(at: SystemTime) -> protobuf::well_known_types::timestamp::Timestamp {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let mut ts = protobuf::well_known_types::timestamp::Timestamp::new();
    ts.seconds = since.as_secs() as i64;
    ts.nanos = since.subsec_nanos() as i32;
    ts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_exit_wins_and_wakes_waiters() {
        let process = std::sync::Arc::new(Process::new(
            "c",
            "",
            StdioPaths::default(),
            Stdin::default(),
        ));
        let waiter = {
            let process = process.clone();
            std::thread::spawn(move || process.wait().status)
        };
        process.set_running(7);
        assert_eq!(process.status(), Status::RUNNING);
        assert!(process.set_exited(3));
        assert!(!process.set_exited(VM_DIED_EXIT));
        assert_eq!(waiter.join().unwrap(), 3);
        assert_eq!(process.status(), Status::STOPPED);
        process.set_paused(true);
        assert_eq!(
            process.status(),
            Status::STOPPED,
            "a dead process stays dead"
        );
    }
}
