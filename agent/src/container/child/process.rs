//! Stage 2: the container process itself, from the end of its setup to the
//! exec — console, hostname, rlimits, then (after `Start`) groups and ids,
//! capabilities, no_new_privs, seccomp, working directory, exec.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::str::FromStr;

use caps::{CapSet, Capability, CapsHashSet};
use nix::fcntl::OFlag;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::unistd::{dup2, setsid, Gid, Uid};
use oci_spec::runtime::{LinuxCapabilities, LinuxSeccomp, Process, Spec};

use super::{mounts, seccomp, setup_error};
use crate::container::channel::{Channel, FromChild, ToChild};
use crate::container::ContainerError;

/// PID 1 of a new container: builds its root, waits for `Start`, execs.
pub fn container_init(
    channel: &Channel,
    spec: &Spec,
    rootfs: &Path,
    process: &Process,
) -> Result<Infallible, ContainerError> {
    setsid().map_err(|e| setup_error(format!("setsid: {e}")))?;
    let bundle = rootfs.parent().unwrap_or(Path::new("/"));
    mounts::build_root(spec, rootfs, bundle)?;
    if process.terminal() == Some(true) {
        open_console(channel)?;
    }
    mounts::finish_root(spec)?;
    if let Some(hostname) = spec.hostname() {
        nix::unistd::sethostname(hostname)
            .map_err(|e| setup_error(format!("setting hostname {hostname:?}: {e}")))?;
    }
    if let Some(domainname) = spec.domainname() {
        set_domainname(domainname)?;
    }
    if let Some(linux) = spec.linux() {
        for (key, value) in linux.sysctl().clone().unwrap_or_default() {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            std::fs::write(&path, value.as_bytes())
                .map_err(|e| setup_error(format!("sysctl {key}: {e}")))?;
        }
    }
    let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
    prepare(process)?;
    channel.send(&FromChild::Ready)?;
    wait_for_start(channel)?;
    finish_and_exec(process, seccomp.as_ref())
}

/// An extra process in a running container (namespaces already joined).
pub fn exec_process(
    channel: &Channel,
    process: &Process,
    seccomp: Option<&LinuxSeccomp>,
) -> Result<Infallible, ContainerError> {
    setsid().map_err(|e| setup_error(format!("setsid: {e}")))?;
    if process.terminal() == Some(true) {
        open_console(channel)?;
    }
    prepare(process)?;
    channel.send(&FromChild::Ready)?;
    wait_for_start(channel)?;
    finish_and_exec(process, seccomp)
}

fn wait_for_start(channel: &Channel) -> Result<(), ContainerError> {
    match channel.receive()? {
        Some(ToChild::Start) => Ok(()),
        // The agent gave up on this container.
        None => std::process::exit(1),
        Some(other) => Err(setup_error(format!(
            "unexpected {other:?} while waiting to start"
        ))),
    }
}

fn set_domainname(name: &str) -> Result<(), ContainerError> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    let rc = unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        return Err(setup_error(format!(
            "setting domainname {name:?}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// A pty from the container's own devpts: the slave becomes our stdio and
/// controlling terminal, the master goes to the agent.
fn open_console(channel: &Channel) -> Result<(), ContainerError> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| setup_error(format!("opening /dev/ptmx: {e}")))?;
    grantpt(&master).map_err(|e| setup_error(format!("grantpt: {e}")))?;
    unlockpt(&master).map_err(|e| setup_error(format!("unlockpt: {e}")))?;
    let slave_path = ptsname_r(&master).map_err(|e| setup_error(format!("ptsname: {e}")))?;
    let slave: OwnedFd = nix::fcntl::open(
        slave_path.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        nix::sys::stat::Mode::empty(),
    )
    .map(|fd| {
        // SAFETY: open just returned this fd; nobody else owns it.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    })
    .map_err(|e| setup_error(format!("opening {slave_path}: {e}")))?;
    channel.send_with_fd(&FromChild::Console, Some(master.as_raw_fd()))?;
    drop(master);
    for target in 0..=2 {
        dup2(slave.as_raw_fd(), target).map_err(|e| setup_error(format!("dup2 console: {e}")))?;
    }
    drop(slave);
    // SAFETY: TIOCSCTTY on our own stdin takes an int argument; no memory involved.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
        return Err(setup_error(format!(
            "making {slave_path} the controlling terminal: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// What may happen before `Start`: rlimits and the OOM score.
fn prepare(process: &Process) -> Result<(), ContainerError> {
    for rlimit in process.rlimits().as_deref().unwrap_or_default() {
        let name = serde_json::to_value(rlimit.typ())
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let resource = rlimit_resource(&name)
            .ok_or_else(|| ContainerError::InvalidSpec(format!("unknown rlimit {name}")))?;
        let limit = libc::rlimit {
            rlim_cur: rlimit.soft(),
            rlim_max: rlimit.hard(),
        };
        // SAFETY: setrlimit reads the struct we pass; nothing else.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(setup_error(format!(
                "setting {name} to {}/{}: {}",
                rlimit.soft(),
                rlimit.hard(),
                std::io::Error::last_os_error()
            )));
        }
    }
    if let Some(score) = process.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", score.to_string())
            .map_err(|e| setup_error(format!("oom_score_adj {score}: {e}")))?;
    }
    Ok(())
}

fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    })
}

fn cap_set(caps: &Option<oci_spec::runtime::Capabilities>) -> Result<CapsHashSet, ContainerError> {
    let mut set = CapsHashSet::new();
    for cap in caps.iter().flatten() {
        let name = format!("CAP_{cap}");
        let parsed = Capability::from_str(&name)
            .map_err(|_| ContainerError::InvalidSpec(format!("unknown capability {name}")))?;
        set.insert(parsed);
    }
    Ok(set)
}

fn caps_error(what: &str, e: caps::errors::CapsError) -> ContainerError {
    setup_error(format!("setting {what} capabilities: {e}"))
}

/// After `Start`: credentials, capabilities, no_new_privs, seccomp, cwd, exec.
fn finish_and_exec(
    process: &Process,
    seccomp: Option<&LinuxSeccomp>,
) -> Result<Infallible, ContainerError> {
    let no_new_privs = process.no_new_privileges() == Some(true);
    // Before any seccomp filter, which may not allow it.
    reset_signals()?;
    let filter = seccomp.map(seccomp::compile).transpose()?;
    // Without no_new_privs, loading a filter needs CAP_SYS_ADMIN: do it
    // while we still have it (as runc does).
    if !no_new_privs {
        if let Some(filter) = &filter {
            seccomp::install(filter)?;
        }
    }
    let user = process.user();
    let capabilities = process.capabilities().clone().unwrap_or_default();
    set_bounding(&capabilities)?;
    // Keep the permitted set across the uid change; it is set exactly below.
    nix::sys::prctl::set_keepcaps(true)
        .map_err(|e| setup_error(format!("PR_SET_KEEPCAPS: {e}")))?;
    let gid = Gid::from_raw(user.gid());
    let uid = Uid::from_raw(user.uid());
    let groups: Vec<Gid> = user
        .additional_gids()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(Gid::from_raw)
        .collect();
    if let Err(e) = nix::unistd::setgroups(&groups) {
        // A user namespace with setgroups denied cannot change groups.
        if !groups.is_empty() {
            return Err(setup_error(format!("setgroups {groups:?}: {e}")));
        }
    }
    nix::unistd::setresgid(gid, gid, gid)
        .map_err(|e| setup_error(format!("setting gid {gid}: {e}")))?;
    nix::unistd::setresuid(uid, uid, uid)
        .map_err(|e| setup_error(format!("setting uid {uid}: {e}")))?;
    if let Some(umask) = user.umask() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask));
    }
    set_capabilities(&capabilities)?;

    let mut env: Vec<String> = process.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", home_of(user.uid())));
    }
    let cwd = process.cwd();
    nix::unistd::chdir(cwd)
        .map_err(|e| setup_error(format!("working directory {}: {e}", cwd.display())))?;
    if no_new_privs {
        nix::sys::prctl::set_no_new_privs()
            .map_err(|e| setup_error(format!("PR_SET_NO_NEW_PRIVS: {e}")))?;
        if let Some(filter) = &filter {
            seccomp::install(filter)?;
        }
    }
    exec(process.args().as_deref().unwrap_or_default(), &env)
}

/// The container's process starts as runc starts it: no signal blocked,
/// every disposition the default. This setup process is a Rust program
/// (its runtime ignores SIGPIPE) started by the agent (which blocks
/// SIGCHLD for its reaper), and a mask and ignored signals survive
/// execve: a shell's `wait` for a background job then waited for ever,
/// and `yes | head` got EPIPE instead of SIGPIPE.
fn reset_signals() -> Result<(), ContainerError> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for signal in Signal::iterator().filter(|s| !matches!(s, Signal::SIGKILL | Signal::SIGSTOP)) {
        // SAFETY: installing the default disposition runs no code of ours.
        unsafe { sigaction(signal, &default) }
            .map_err(|e| setup_error(format!("resetting {signal}: {e}")))?;
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| setup_error(format!("unblocking signals: {e}")))
}

fn set_bounding(capabilities: &LinuxCapabilities) -> Result<(), ContainerError> {
    let keep = cap_set(capabilities.bounding())?;
    for cap in caps::all() {
        if !keep.contains(&cap) {
            match caps::drop(None, CapSet::Bounding, cap) {
                Ok(()) => {}
                // Capabilities newer than this kernel are not there to drop.
                Err(_) if !caps::runtime::thread_all_supported().contains(&cap) => {}
                Err(e) => return Err(caps_error("bounding", e)),
            }
        }
    }
    Ok(())
}

fn set_capabilities(capabilities: &LinuxCapabilities) -> Result<(), ContainerError> {
    let permitted = cap_set(capabilities.permitted())?;
    let effective = cap_set(capabilities.effective())?;
    let inheritable = cap_set(capabilities.inheritable())?;
    let ambient = cap_set(capabilities.ambient())?;
    // Each capset must keep effective within permitted and inheritable
    // within what permitted allows: shrink in this order.
    caps::set(None, CapSet::Inheritable, &inheritable).map_err(|e| caps_error("inheritable", e))?;
    caps::set(None, CapSet::Effective, &effective).map_err(|e| caps_error("effective", e))?;
    caps::set(None, CapSet::Permitted, &permitted).map_err(|e| caps_error("permitted", e))?;
    caps::clear(None, CapSet::Ambient).map_err(|e| caps_error("ambient", e))?;
    for cap in ambient {
        // As runc: an ambient capability that is not both permitted and
        // inheritable cannot be raised; that is not fatal.
        if let Err(e) = caps::raise(None, CapSet::Ambient, cap) {
            tracing::debug!("not raising ambient {cap}: {e}");
        }
    }
    Ok(())
}

/// The user's home directory from the container's /etc/passwd, "/" when
/// it has none (as runc does when the spec sets no HOME).
fn home_of(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 6 && fields[2].parse() == Ok(uid)).then(|| fields[5].to_string())
        })
        .filter(|home| !home.is_empty())
        .unwrap_or_else(|| "/".to_string())
}

/// Finds argv[0] on the process's PATH and execs it; returns only on failure.
fn exec(args: &[String], env: &[String]) -> Result<Infallible, ContainerError> {
    let program = args
        .first()
        .ok_or_else(|| ContainerError::InvalidSpec("process.args is empty".into()))?;
    let path_var = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let candidates: Vec<String> = if program.contains('/') {
        vec![program.clone()]
    } else {
        path_var
            .split(':')
            .map(|dir| format!("{}/{program}", if dir.is_empty() { "." } else { dir }))
            .collect()
    };
    let to_c = |s: &str| {
        CString::new(s)
            .map_err(|_| ContainerError::InvalidSpec(format!("{s:?} contains a NUL byte")))
    };
    let argv = args
        .iter()
        .map(|a| to_c(a))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = env.iter().map(|e| to_c(e)).collect::<Result<Vec<_>, _>>()?;
    let mut last = nix::Error::ENOENT;
    for candidate in &candidates {
        let path = to_c(candidate)?;
        match nix::unistd::execve(&path, &argv, &envp) {
            Err(nix::Error::ENOENT) | Err(nix::Error::ENOTDIR) => continue,
            Err(e) => {
                last = e;
                if e == nix::Error::EACCES {
                    continue;
                }
                break;
            }
            Ok(never) => match never {},
        }
    }
    Err(match last {
        nix::Error::ENOENT => ContainerError::ExecNotFound(program.clone()),
        nix::Error::EACCES => ContainerError::ExecDenied(program.clone()),
        e => setup_error(format!("exec {program:?}: {e}")),
    })
}
