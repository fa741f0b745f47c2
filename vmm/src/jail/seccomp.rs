//! One seccomp allow-list per kind of VMM thread, built with `seccompiler`
//! (as Firecracker's are) and installed by each thread on itself before it
//! touches anything the guest controls. A system call outside its thread's
//! list kills the whole process (`SECCOMP_RET_KILL_PROCESS`); the kernel's
//! audit log then names it (see [`super::supervisor`]).
//!
//! The lists were measured: every test of the project run with
//! `--seccomp log`, which logs instead of killing, and the kernel's
//! `type=1326` records collected (docs/design/vmm-jail.md says how to redo
//! it). Arguments are checked where the call could do more than the thread
//! needs: `ioctl` (the KVM and tap requests each thread makes), `fcntl`
//! (no lease or signal ownership games), `socket` (Unix only), `mmap` and
//! `mprotect` (never executable memory).

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The kinds of thread, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Starts the others, then waits for the VM's end.
    Main,
    /// Runs one vCPU: KVM_RUN and the port I/O and MMIO exits it brings
    /// (the devices' registers, virtqueue notifications, activation).
    Vcpu,
    /// The shared event loop: vsock (host Unix sockets), virtio-net (taps),
    /// the reset event.
    Devices,
    /// A virtio-fs server: file system calls on the share for the guest.
    Fs,
    /// The process the runtime started, left outside the VMM's PID
    /// namespace to wait for it (see `supervisor`).
    Supervisor,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Devices,
        ThreadKind::Fs,
        ThreadKind::Supervisor,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
            ThreadKind::Fs => "fs",
            ThreadKind::Supervisor => "supervisor",
        }
    }

    fn parse(text: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == text)
    }
}

/// What a thread outside its list gets (`--seccomp`).
pub use protocols::vmm::Seccomp as Mode;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter of the {0} threads")]
    Build(&'static str, #[source] seccompiler::Error),
    #[error("installing the seccomp filter of a {0} thread")]
    Install(&'static str, #[source] seccompiler::Error),
    #[error("setting no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
}

/// The compiled filters, one per kind, and the test hook.
struct Filters {
    programs: Vec<(ThreadKind, BpfProgram)>,
    violation: Option<Violation>,
}

/// Tests only (`MICROVM_TEST_SECCOMP_VIOLATION=KIND[@SECONDS]`): a thread
/// of KIND makes a forbidden call at its first chance after SECONDS, to
/// prove the filter and its reporting work.
#[derive(Debug, Clone, Copy)]
struct Violation {
    kind: ThreadKind,
    due: Instant,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Builds the filters for `mode` and sets `no_new_privs` (which installing
/// a filter without CAP_SYS_ADMIN needs, and which the jail wants anyway).
/// Call once, in the main thread, before any other thread starts.
pub fn prepare(mode: Mode) -> Result<(), SeccompError> {
    let violation = std::env::var("MICROVM_TEST_SECCOMP_VIOLATION")
        .ok()
        .and_then(|text| {
            let (kind, secs) = text.split_once('@').unwrap_or((&text, "0"));
            Some(Violation {
                kind: ThreadKind::parse(kind)?,
                due: Instant::now() + Duration::from_secs_f64(secs.parse().ok()?),
            })
        });
    let programs = match mode {
        Mode::Off => Vec::new(),
        Mode::On | Mode::Log => {
            set_no_new_privs()?;
            let on_mismatch = if mode == Mode::On {
                SeccompAction::KillProcess
            } else {
                SeccompAction::Log
            };
            ThreadKind::ALL
                .into_iter()
                .map(|kind| Ok((kind, compile(kind, on_mismatch.clone())?)))
                .collect::<Result<Vec<_>, SeccompError>>()?
        }
    };
    let _ = FILTERS.set(Filters {
        programs,
        violation,
    });
    Ok(())
}

fn set_no_new_privs() -> Result<(), SeccompError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SeccompError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Confines the calling thread to the list of `kind` (nothing when
/// [`prepare`] was not called, as in unit tests, or with `--seccomp off`).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    if let Some((_, program)) = filters.programs.iter().find(|(k, _)| *k == kind) {
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind.name(), e))?;
    }
    Ok(())
}

/// The test hook: when this thread's kind is the one named in
/// `MICROVM_TEST_SECCOMP_VIOLATION` and its time has come, makes a call no
/// list allows (`getppid`). Costs one load when no test asked.
#[inline]
pub fn test_violation(kind: ThreadKind) {
    if let Some(Violation { kind: target, due }) = FILTERS.get().and_then(|f| f.violation) {
        if target == kind && Instant::now() >= due {
            tracing::warn!(
                "test: making a forbidden system call from a {} thread",
                kind.name()
            );
            // SAFETY: getppid takes no arguments and touches no memory.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
    }
}

/// When the test hook aims at `kind`, the time until it is due.
pub fn test_violation_due(kind: ThreadKind) -> Option<Duration> {
    let violation = FILTERS.get()?.violation?;
    (violation.kind == kind).then(|| violation.due.saturating_duration_since(Instant::now()))
}

/// The number of system calls on each kind's list (for the docs and logs).
pub fn list_sizes() -> Vec<(ThreadKind, usize)> {
    ThreadKind::ALL
        .into_iter()
        .map(|kind| (kind, rules(kind).len()))
        .collect()
}

fn compile(kind: ThreadKind, on_mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules(kind),
        on_mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind.name(), e.into()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(kind.name(), e.into()))
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// A condition on argument `index` (a 64-bit compare).
fn arg(index: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .expect("argument indexes here are below 6")
}

/// One rule per value: argument `index` equals one of `values`.
fn any_of(index: u8, values: &[u64]) -> Vec<SeccompRule> {
    values
        .iter()
        .map(|v| {
            SeccompRule::new(vec![arg(index, SeccompCmpOp::Eq, *v)])
                .expect("a rule with one condition")
        })
        .collect()
}

fn allow(rules: &mut Rules, calls: &[libc::c_long]) {
    for call in calls {
        rules.insert(*call, Vec::new());
    }
}

/// What every thread needs: memory (never executable), futexes, signals
/// for a clean abort, its own exit, time, logging to stderr.
fn common() -> Rules {
    let mut rules = Rules::new();
    allow(
        &mut rules,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_close,
            libc::SYS_futex,
            libc::SYS_munmap,
            libc::SYS_madvise,
            libc::SYS_mremap,
            libc::SYS_brk,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigaction,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_sched_yield,
            libc::SYS_getrandom,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_restart_syscall,
            libc::SYS_gettid,
            libc::SYS_getpid,
            // abort() after a panic: a signal to ourselves (in our own PID
            // namespace there is nobody else to reach).
            libc::SYS_tgkill,
        ],
    );
    let not_exec = |index| {
        SeccompRule::new(vec![arg(
            index,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )])
        .expect("a rule with one condition")
    };
    rules.insert(libc::SYS_mmap, vec![not_exec(2)]);
    rules.insert(libc::SYS_mprotect, vec![not_exec(2)]);
    rules
}

/// fcntl commands any thread may use: flags and close-on-exec.
const FCNTL_BASIC: &[u64] = &[
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_DUPFD_CLOEXEC as u64,
];

// KVM and tap ioctls (linux/kvm.h, linux/if_tun.h).
const KVM_RUN: u64 = 0xae80;
const KVM_IRQ_LINE_STATUS: u64 = 0xc008_ae67;
const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
const FIONBIO: u64 = libc::FIONBIO;
const FIOCLEX: u64 = libc::FIOCLEX;

fn rules(kind: ThreadKind) -> Rules {
    let mut rules = common();
    match kind {
        ThreadKind::Main => {
            allow(
                &mut rules,
                &[
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    // The vsock socket's removal at the end (unjailed runs).
                    libc::SYS_unlink,
                ],
            );
            rules.insert(libc::SYS_fcntl, any_of(1, FCNTL_BASIC));
        }
        ThreadKind::Vcpu => {
            // Device activation hands eventfds to the device threads.
            allow(&mut rules, &[libc::SYS_eventfd2, libc::SYS_dup]);
            rules.insert(libc::SYS_fcntl, any_of(1, FCNTL_BASIC));
            rules.insert(
                libc::SYS_ioctl,
                any_of(
                    1,
                    &[
                        KVM_RUN,
                        KVM_IRQ_LINE_STATUS,
                        KVM_SET_GSI_ROUTING,
                        TUNSETOFFLOAD,
                        TUNSETVNETHDRSZ,
                        FIONBIO,
                        FIOCLEX,
                    ],
                ),
            );
        }
        ThreadKind::Devices => {
            allow(
                &mut rules,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_readv,
                    libc::SYS_writev,
                    libc::SYS_recvfrom,
                    libc::SYS_recvmsg,
                    libc::SYS_sendto,
                    libc::SYS_sendmsg,
                    libc::SYS_accept4,
                    libc::SYS_connect,
                    libc::SYS_shutdown,
                    libc::SYS_getsockopt,
                    libc::SYS_eventfd2,
                ],
            );
            rules.insert(libc::SYS_fcntl, any_of(1, FCNTL_BASIC));
            rules.insert(
                libc::SYS_ioctl,
                any_of(1, &[FIONBIO, FIOCLEX, TUNSETOFFLOAD, TUNSETVNETHDRSZ]),
            );
            // Guest connections to host ports: Unix stream sockets only.
            rules.insert(
                libc::SYS_socket,
                vec![
                    SeccompRule::new(vec![arg(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)])
                        .expect("a rule with one condition"),
                ],
            );
        }
        ThreadKind::Fs => {
            allow(
                &mut rules,
                &[
                    libc::SYS_epoll_create1,
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_eventfd2,
                    libc::SYS_openat,
                    libc::SYS_newfstatat,
                    libc::SYS_fstat,
                    libc::SYS_statx,
                    libc::SYS_lseek,
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_preadv,
                    libc::SYS_pwritev,
                    libc::SYS_preadv2,
                    libc::SYS_pwritev2,
                    libc::SYS_readv,
                    libc::SYS_writev,
                    libc::SYS_getdents64,
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                    libc::SYS_fallocate,
                    libc::SYS_ftruncate,
                    libc::SYS_fchmod,
                    libc::SYS_fchmodat,
                    libc::SYS_fchown,
                    libc::SYS_fchownat,
                    libc::SYS_utimensat,
                    libc::SYS_linkat,
                    libc::SYS_symlinkat,
                    libc::SYS_readlinkat,
                    libc::SYS_renameat,
                    libc::SYS_renameat2,
                    libc::SYS_unlinkat,
                    libc::SYS_mkdirat,
                    libc::SYS_mknodat,
                    libc::SYS_fgetxattr,
                    libc::SYS_fsetxattr,
                    libc::SYS_flistxattr,
                    libc::SYS_fremovexattr,
                    libc::SYS_getxattr,
                    libc::SYS_setxattr,
                    libc::SYS_listxattr,
                    libc::SYS_removexattr,
                    libc::SYS_lgetxattr,
                    libc::SYS_lsetxattr,
                    libc::SYS_llistxattr,
                    libc::SYS_lremovexattr,
                    libc::SYS_fstatfs,
                    libc::SYS_statfs,
                    libc::SYS_copy_file_range,
                    libc::SYS_flock,
                    libc::SYS_faccessat,
                    libc::SYS_faccessat2,
                    libc::SYS_dup,
                    // Acting for the guest's users, per request and thread.
                    libc::SYS_setresuid,
                    libc::SYS_setresgid,
                    libc::SYS_capget,
                    libc::SYS_capset,
                    libc::SYS_umask,
                ],
            );
            let mut fcntl = FCNTL_BASIC.to_vec();
            fcntl.extend([
                libc::F_GETLK as u64,
                libc::F_SETLK as u64,
                libc::F_SETLKW as u64,
                libc::F_OFD_GETLK as u64,
                libc::F_OFD_SETLK as u64,
                libc::F_OFD_SETLKW as u64,
            ]);
            rules.insert(libc::SYS_fcntl, any_of(1, &fcntl));
            rules.insert(libc::SYS_ioctl, any_of(1, &[FIONBIO, FIOCLEX]));
        }
        ThreadKind::Supervisor => {
            // Waiting, reading the kernel log, ending as the VMM ended.
            allow(
                &mut rules,
                &[
                    libc::SYS_wait4,
                    libc::SYS_waitid,
                    libc::SYS_lseek,
                    libc::SYS_prlimit64,
                    libc::SYS_setrlimit,
                    libc::SYS_kill,
                ],
            );
            rules.insert(libc::SYS_fcntl, any_of(1, FCNTL_BASIC));
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_compiles() {
        for kind in ThreadKind::ALL {
            let program = compile(kind, SeccompAction::KillProcess).unwrap();
            eprintln!(
                "{}: {} system calls, {} BPF instructions",
                kind.name(),
                rules(kind).len(),
                program.len()
            );
        }
    }

    #[test]
    fn no_list_allows_starting_processes_or_threads() {
        for kind in ThreadKind::ALL {
            let rules = rules(kind);
            for call in [
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_getppid,
                libc::SYS_open_by_handle_at,
                libc::SYS_name_to_handle_at,
            ] {
                assert!(!rules.contains_key(&call), "{kind:?} allows {call}");
            }
        }
    }

    /// A filtered thread of a child process is killed by a call outside
    /// its list, and the process dies of SIGSYS.
    #[test]
    fn a_call_outside_the_list_kills_the_process() {
        // SAFETY: the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let program = compile(ThreadKind::Vcpu, SeccompAction::KillProcess).unwrap();
            // SAFETY: as above.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: as above.
                unsafe { libc::_exit(3) };
            }
            // SAFETY: as above.
            unsafe {
                libc::syscall(libc::SYS_getppid);
                libc::_exit(0)
            };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
