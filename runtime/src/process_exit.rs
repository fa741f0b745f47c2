//! Waiting for a process (a VMM) to end without polling it: a pidfd
//! (`pidfd_open(2)`, Linux 5.3) becomes readable when its process exits, so
//! a watcher sleeps in `poll(2)` until then and learns of the death at once.
//! Where pidfds are missing the watch falls back to looking at
//! `/proc/PID/stat` every 20 ms.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// How often a watcher without a pidfd looks.
const FALLBACK_INTERVAL: Duration = Duration::from_millis(20);

/// Tells when one process has exited.
pub struct ExitWatch {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl ExitWatch {
    /// A watch on process `pid`, which must not have been reaped yet (a
    /// child of ours still unwaited, or any process we know alive).
    pub fn new(pid: u32) -> Self {
        match pidfd_open(pid) {
            Ok(pidfd) => Self {
                pid,
                pidfd: Some(pidfd),
            },
            Err(e) => {
                tracing::debug!("pidfd_open({pid}): {e}; watching the process by polling");
                Self { pid, pidfd: None }
            }
        }
    }

    /// Waits until the process has exited (true) or `timeout` has passed
    /// (false; `None` waits for ever). Without a pidfd it looks every 20 ms
    /// and may return false early.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let Some(pidfd) = &self.pidfd else {
            std::thread::sleep(timeout.map_or(FALLBACK_INTERVAL, |t| t.min(FALLBACK_INTERVAL)));
            return !alive(self.pid);
        };
        let timeout_ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one pollfd we own, for the duration of the call.
            let ready = unsafe { libc::poll(&mut poll, 1, timeout_ms) };
            if ready >= 0 {
                return ready > 0;
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // Cannot wait: look, as without a pidfd.
                std::thread::sleep(FALLBACK_INTERVAL);
                return !alive(self.pid);
            }
        }
    }
}

/// Whether process `pid` exists and has not exited (a zombie has).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Instant;

    #[test]
    fn a_watch_wakes_when_its_process_exits_and_not_before() {
        let mut child = Command::new("sleep").arg("0.3").spawn().unwrap();
        let watch = ExitWatch::new(child.id());
        assert!(watch.pidfd.is_some(), "this kernel has pidfd_open");
        assert!(
            !watch.wait(Some(Duration::from_millis(50))),
            "still running"
        );
        let start = Instant::now();
        assert!(watch.wait(Some(Duration::from_secs(10))));
        assert!(start.elapsed() < Duration::from_secs(5));
        // Exited but not yet reaped, then reaped: readable either way.
        assert!(watch.wait(Some(Duration::ZERO)));
        child.wait().unwrap();
        assert!(watch.wait(None));
    }

    #[test]
    fn a_killed_process_is_seen_at_once() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let watch = ExitWatch::new(child.id());
        child.kill().unwrap();
        assert!(watch.wait(Some(Duration::from_secs(10))));
        child.wait().unwrap();
    }

    #[test]
    fn without_a_pidfd_the_watch_looks_at_proc() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let watch = ExitWatch {
            pid: child.id(),
            pidfd: None,
        };
        let start = Instant::now();
        assert!(!watch.wait(None), "still running");
        assert!(start.elapsed() < Duration::from_secs(1));
        child.kill().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !watch.wait(None) {
            assert!(Instant::now() < deadline, "the zombie is seen as exited");
        }
        child.wait().unwrap();
        assert!(watch.wait(None), "and so is a reaped process");
        // A process that does not exist (pid beyond pid_max) gets no pidfd
        // and is not alive.
        let none = ExitWatch::new(u32::MAX);
        assert!(none.pidfd.is_none());
        assert!(none.wait(None));
    }
}
