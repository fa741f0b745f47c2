//! Collects the exit status of every child, ours and orphans alike (as PID 1
//! every orphan in the guest becomes our child), and routes ours to their
//! waiters. SIGCHLD must be blocked in every thread ([`block_sigchld`] before
//! any thread starts) so this thread's `sigwait` is where it lands.

use std::sync::Arc;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::process::{Exit, ProcessTable};

/// Blocks SIGCHLD in the calling thread and every thread it starts later.
/// Child processes start with an empty mask (std's `Command` resets it).
pub fn block_sigchld() -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
}

/// Starts the reaper thread.
pub fn start(table: Arc<ProcessTable>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || {
            let mut set = SigSet::empty();
            set.add(Signal::SIGCHLD);
            loop {
                reap_all(&table);
                if let Err(e) = set.wait() {
                    tracing::error!("waiting for SIGCHLD: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        })?;
    Ok(())
}

fn reap_all(table: &ProcessTable) {
    loop {
        // Peek at an exited child without reaping it, then reap exactly that
        // one under the table lock.
        let pid = match waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(status) => match status.pid() {
                Some(pid) => pid,
                None => return,
            },
            Err(nix::Error::ECHILD) => return,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!("waitid: {e}");
                return;
            }
        };
        table.collect(pid.as_raw(), |pid| {
            match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => Some(Exit::Code(code)),
                Ok(WaitStatus::Signaled(_, signal, _)) => Some(Exit::Signal(signal as i32)),
                // Reaped meanwhile by std (a failed exec inside spawn).
                _ => None,
            }
        });
    }
}
