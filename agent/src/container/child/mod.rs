//! The container's setup processes, in a fresh exec of the agent binary
//! (`microvm-agent __container-setup`) so that namespaces, mounts and
//! credentials are changed in a single-threaded process, never in the
//! multi-threaded agent.
//!
//! Stage 1 joins the container's cgroup, enters or creates its namespaces
//! and forks; the fork (stage 2) is the container process: PID 1 of a new
//! pid namespace for a container, or a member of the container's for an exec.
//! Stage 1 reports the fork's pid and exits; stage 2 reports `Ready`, waits
//! for `Start`, drops privileges and execs. Its close-on-exec channel end
//! closing tells the agent the exec happened.

mod mounts;
mod process;
pub mod seccomp;

use std::convert::Infallible;
use std::fs;
use std::path::PathBuf;

use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{fork, ForkResult};
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};
use serde::{Deserialize, Serialize};

use super::channel::{Channel, Failure, FromChild, ToChild};
use super::ContainerError;

/// Everything a setup process needs, sent by the agent.
#[derive(Debug, Serialize, Deserialize)]
pub struct SetupConfig {
    pub kind: SetupKind,
    /// The process to run.
    pub process: Process,
    /// The container's cgroup directory, joined before anything else.
    pub cgroup: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum SetupKind {
    /// A new container: its spec, with `root.path` resolved to an absolute
    /// guest path.
    Create { spec: Box<Spec>, rootfs: PathBuf },
    /// A process joining the running container whose init has `init_pid`.
    Exec {
        init_pid: i32,
        /// Namespaces of the container's (in setns order).
        namespaces: Vec<LinuxNamespaceType>,
        seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
    },
}

fn setup_error(what: impl std::fmt::Display) -> ContainerError {
    ContainerError::Setup(what.to_string())
}

/// Entry point of `microvm-agent __container-setup`. Never returns.
pub fn main() -> ! {
    // SAFETY: the agent starts this process with its channel end at fd 3.
    let channel = unsafe { Channel::inherited() };
    let failure = match run(&channel) {
        Ok(never) => match never {},
        Err(e) => Failure::from(e),
    };
    let _ = channel.send(&FromChild::Failed(failure));
    std::process::exit(1);
}

fn run(channel: &Channel) -> Result<Infallible, ContainerError> {
    let Some(ToChild::Setup(config)) = channel.receive()? else {
        return Err(setup_error("the agent sent no setup"));
    };
    // Joining the cgroup first puts every later process in it.
    fs::write(config.cgroup.join("cgroup.procs"), "0")
        .map_err(|e| setup_error(format!("joining cgroup {}: {e}", config.cgroup.display())))?;
    match &config.kind {
        SetupKind::Create { spec, .. } => enter_new_namespaces(channel, spec)?,
        SetupKind::Exec {
            init_pid,
            namespaces,
            ..
        } => join_namespaces(*init_pid, namespaces)?,
    }
    // SAFETY: this process is single-threaded (a fresh exec), so the child
    // may run any code after fork.
    match unsafe { fork() }.map_err(|e| setup_error(format!("fork: {e}")))? {
        ForkResult::Parent { child } => {
            channel.send(&FromChild::Pid {
                pid: child.as_raw(),
            })?;
            std::process::exit(0);
        }
        ForkResult::Child => match config.kind {
            SetupKind::Create { spec, rootfs } => {
                process::container_init(channel, &spec, &rootfs, &config.process)
            }
            SetupKind::Exec { seccomp, .. } => {
                process::exec_process(channel, &config.process, seccomp.as_ref())
            }
        },
    }
}

/// The clone flag of a namespace type; network namespaces are the VM's
/// (every container of a sandbox shares the guest's network, as in Kata).
fn clone_flag(kind: LinuxNamespaceType) -> Option<CloneFlags> {
    Some(match kind {
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Network | LinuxNamespaceType::Time => return None,
    })
}

/// /proc/PID/ns file name of a namespace type.
pub fn ns_file(kind: LinuxNamespaceType) -> &'static str {
    match kind {
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

/// Joins the spec's namespaces that name a path (a pod's containers join
/// its sandbox's IPC and UTS namespaces this way), then creates the others.
fn enter_new_namespaces(channel: &Channel, spec: &Spec) -> Result<(), ContainerError> {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|linux| linux.namespaces().clone())
        .unwrap_or_default();
    let mut to_join: Vec<_> = namespaces
        .iter()
        .filter_map(|ns| Some((ns.typ(), ns.path().clone()?)))
        .collect();
    // The user namespace first: it grants the rights to join the others.
    to_join.sort_by_key(|(kind, _)| *kind != LinuxNamespaceType::User);
    for (kind, path) in &to_join {
        let Some(flag) = clone_flag(*kind) else {
            continue;
        };
        let file = fs::File::open(path).map_err(|e| {
            setup_error(format!(
                "opening the {kind:?} namespace {}: {e}",
                path.display()
            ))
        })?;
        setns(&file, flag).map_err(|e| {
            setup_error(format!(
                "joining the {kind:?} namespace {}: {e}",
                path.display()
            ))
        })?;
        if *kind == LinuxNamespaceType::User {
            become_root()?;
        }
    }
    let kinds: Vec<LinuxNamespaceType> = namespaces
        .iter()
        .filter(|ns| ns.path().is_none())
        .map(|ns| ns.typ())
        .collect();
    if kinds.contains(&LinuxNamespaceType::User) {
        unshare(CloneFlags::CLONE_NEWUSER)
            .map_err(|e| setup_error(format!("creating the user namespace: {e}")))?;
        channel.send(&FromChild::MapIds {
            pid: nix::unistd::getpid().as_raw(),
        })?;
        match channel.receive()? {
            Some(ToChild::IdsMapped) => {}
            _ => {
                return Err(setup_error(
                    "the agent did not map the user namespace's ids",
                ))
            }
        }
        // Root of the new namespace from here on.
        become_root()?;
    }
    let mut flags = CloneFlags::empty();
    for kind in kinds {
        if kind != LinuxNamespaceType::User {
            if let Some(flag) = clone_flag(kind) {
                flags |= flag;
            }
        }
    }
    unshare(flags).map_err(|e| setup_error(format!("creating namespaces {flags:?}: {e}")))
}

fn join_namespaces(init_pid: i32, kinds: &[LinuxNamespaceType]) -> Result<(), ContainerError> {
    // Open them all first: after joining the mount namespace /proc may differ.
    let mut files = Vec::new();
    for &kind in kinds {
        let Some(flag) = clone_flag(kind) else {
            continue;
        };
        let path = format!("/proc/{init_pid}/ns/{}", ns_file(kind));
        let file = fs::File::open(&path)
            .map_err(|e| setup_error(format!("opening {path}: {e} (has the container ended?)")))?;
        files.push((kind, flag, file));
    }
    for (kind, flag, file) in files {
        setns(&file, flag)
            .map_err(|e| setup_error(format!("joining the {kind:?} namespace: {e}")))?;
    }
    if kinds.contains(&LinuxNamespaceType::User) {
        become_root()?;
    }
    Ok(())
}

/// Root of the user namespace just entered.
fn become_root() -> Result<(), ContainerError> {
    nix::unistd::setresgid(0.into(), 0.into(), 0.into())
        .map_err(|e| setup_error(format!("setresgid(0) in the user namespace: {e}")))?;
    nix::unistd::setresuid(0.into(), 0.into(), 0.into())
        .map_err(|e| setup_error(format!("setresuid(0) in the user namespace: {e}")))
}
