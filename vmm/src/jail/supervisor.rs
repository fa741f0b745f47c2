//! The PID namespace split: the process the runtime started forks the VMM
//! proper as PID 1 of a new PID namespace (from where no other process of
//! the host can be seen or signalled) and stays behind as its supervisor:
//! it holds no capabilities, waits, and ends the way the VMM ended, so the
//! runtime's view (one child, its exit status, SIGKILL to end it) is
//! unchanged. Killing the supervisor kills the VMM (`PR_SET_PDEATHSIG`).
//!
//! When a seccomp filter killed the VMM (SIGSYS), the supervisor finds the
//! kernel's audit record of it (`type=1326`, on `/dev/kmsg`, opened before
//! the split) and prints the system call and the thread on stderr, which
//! the runtime keeps as the VM's log.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{check, JailError};

/// Step 1 of the jail. Returns in the VMM proper (PID 1 of a new PID
/// namespace); in the supervisor it never returns.
pub fn split_pid_namespace() -> Result<(), JailError> {
    // The kernel's log from now on (reading it needs privileges we drop).
    let kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_nonblocking()
        .open("/dev/kmsg")
        .ok();
    if let Some(kmsg) = &kmsg {
        // SAFETY: lseek on an fd we own.
        unsafe { libc::lseek(kmsg.as_raw_fd(), 0, libc::SEEK_END) };
    }
    // The VMM learns of a supervisor that died before it could ask to die
    // with it: the pipe's write end closes.
    let mut fds = [0; 2];
    check(
        // SAFETY: pipe2 writes two fds into the array we own.
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        || "a pipe".into(),
    )?;
    // SAFETY: both fds were just created and are owned by nothing else.
    let (alive_read, alive_write) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: unshare with a flag only.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) }, || {
        "a PID namespace".into()
    })?;
    // SAFETY: the process is single-threaded here (no thread is started
    // before the jail), so the child may go on as usual.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::Syscall {
            what: "forking the VMM".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        drop(alive_write);
        drop(kmsg);
        check(
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) },
            || "tying the VMM to its supervisor".into(),
        )?;
        let mut poll = libc::pollfd {
            fd: alive_read.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own, without waiting.
        if unsafe { libc::poll(&mut poll, 1, 0) } != 0 {
            // The supervisor is gone already.
            std::process::exit(1);
        }
        return Ok(());
    }
    drop(alive_read);
    supervise(pid, kmsg, alive_write)
}

/// Small helper so the open above reads as one expression.
trait NonBlocking {
    fn custom_flags_nonblocking(&mut self) -> &mut Self;
}

impl NonBlocking for std::fs::OpenOptions {
    fn custom_flags_nonblocking(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

fn supervise(vmm: libc::pid_t, kmsg: Option<std::fs::File>, alive: OwnedFd) -> ! {
    // Nothing the runtime passed on for the VMM (taps) stays open here.
    let mut keep = vec![alive.as_raw_fd()];
    keep.extend(kmsg.as_ref().map(|k| k.as_raw_fd()));
    close_all_but(&mut keep);
    // Nothing of the host's privileges stays with us.
    if let Err(e) = super::drop_caps(&caps::CapsHashSet::new()) {
        eprintln!("microvm-vmm: supervisor: {}", protocols::error_chain(&e));
    }
    // Its program was compiled before the split (`seccomp::prepare`).
    if let Err(e) = super::seccomp::install(super::seccomp::ThreadKind::Supervisor) {
        eprintln!("microvm-vmm: supervisor: {}", protocols::error_chain(&e));
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child, writing into a local.
        let rc = unsafe { libc::waitpid(vmm, &mut status, 0) };
        if rc == vmm {
            break;
        }
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            eprintln!(
                "microvm-vmm: supervisor: waiting for the VMM: {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
    if libc::WIFEXITED(status) {
        std::process::exit(libc::WEXITSTATUS(status));
    }
    let signal = libc::WTERMSIG(status);
    if signal == libc::SIGSYS {
        let record = kmsg.and_then(|kmsg| seccomp_record(kmsg, vmm));
        let mut stderr = std::io::stderr();
        let _ = match record {
            Some(record) => writeln!(
                stderr,
                "microvm-vmm: killed by its seccomp filter: system call {} in thread {}",
                record.syscall, record.comm
            ),
            None => writeln!(
                stderr,
                "microvm-vmm: killed by its seccomp filter (the kernel logged no record of it)"
            ),
        };
    }
    // End the way the VMM ended: the same signal, without a core dump.
    // SAFETY: resetting a signal's disposition and signalling ourselves.
    unsafe {
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::kill(libc::getpid(), signal);
    }
    std::process::exit(128 + signal)
}

/// Closes every fd above 2 not in `keep`.
fn close_all_but(keep: &mut [libc::c_int]) {
    keep.sort_unstable();
    let mut first = 3u32;
    for fd in keep.iter().map(|fd| *fd as u32) {
        if fd > first {
            // SAFETY: close_range on fds this process owns and no longer uses.
            unsafe { libc::syscall(libc::SYS_close_range, first, fd - 1, 0) };
        }
        first = first.max(fd + 1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) };
}

/// What the kernel's audit record of a seccomp kill says.
#[derive(Debug, PartialEq, Eq)]
pub struct SeccompRecord {
    pub syscall: u64,
    pub comm: String,
}

/// The last `type=1326` record of `pid` in the kernel log read from
/// `kmsg` (each read(2) of it is one record).
fn seccomp_record(mut kmsg: std::fs::File, pid: libc::pid_t) -> Option<SeccompRecord> {
    let mut found = None;
    let mut buffer = vec![0u8; 8192];
    // The record may be a moment behind the death.
    for _ in 0..50 {
        loop {
            match kmsg.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    let line = String::from_utf8_lossy(&buffer[..n]);
                    if let Some(record) = parse_record(&line, pid) {
                        found = Some(record);
                    }
                }
                // EPIPE: records were overwritten; go on with the next.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        if found.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    found
}

/// `… audit: type=1326 audit(…): … pid=N comm="vcpu0" … syscall=110 …`
fn parse_record(line: &str, pid: libc::pid_t) -> Option<SeccompRecord> {
    if !line.contains("type=1326") {
        return None;
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .map(str::to_string)
    };
    if field("pid=")?.parse::<libc::pid_t>().ok()? != pid {
        return None;
    }
    let comm: String = field("comm=")
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect();
    Some(SeccompRecord {
        syscall: field("syscall=")?.parse().ok()?,
        comm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernels_seccomp_record() {
        let line = "5,1234,5678,-;audit: type=1326 audit(1700000000.123:45): auid=4294967295 \
                    uid=0 gid=0 ses=4294967295 pid=4321 comm=\"vcpu0\" \
                    exe=\"/usr/bin/microvm-vmm\" sig=31 arch=c000003e syscall=110 compat=0 \
                    ip=0x7f code=0x80000000";
        assert_eq!(
            parse_record(line, 4321),
            Some(SeccompRecord {
                syscall: 110,
                comm: "\"vcpu0\"".into()
            })
        );
        assert_eq!(parse_record(line, 4322), None);
        assert_eq!(
            parse_record("audit: type=1400 pid=4321 syscall=1", 4321),
            None
        );
    }
}
