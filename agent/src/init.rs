//! PID 1 duties: the guest's base mounts, its hostname, and ending the VM.

use std::path::Path;

use nix::mount::{mount, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("creating mount point {path}: {source}")]
    MountPoint {
        path: String,
        source: std::io::Error,
    },
    #[error("mounting {fstype} on {path}: {source}")]
    Mount {
        fstype: &'static str,
        path: &'static str,
        source: nix::Error,
    },
}

/// (source, target, fstype, flags, data) of every base mount, in order.
const MOUNTS: &[(&str, &str, &str, MsFlags, &str)] = &[
    (
        "proc",
        "/proc",
        "proc",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        "",
    ),
    (
        "sysfs",
        "/sys",
        "sysfs",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        "",
    ),
    (
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        "mode=0755",
    ),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        "newinstance,ptmxmode=0666,mode=0620",
    ),
    (
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        "mode=1777",
    ),
    (
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        "mode=0755",
    ),
    (
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        "mode=1777",
    ),
    (
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        "",
    ),
];

/// Mounts /proc, /sys, /dev (+pts, shm), /run, /tmp and the cgroup2
/// hierarchy; sets the hostname. Something already mounted is left alone.
pub fn setup() -> Result<(), InitError> {
    for &(source, target, fstype, flags, data) in MOUNTS {
        std::fs::create_dir_all(target).map_err(|source| InitError::MountPoint {
            path: target.to_string(),
            source,
        })?;
        let data = (!data.is_empty()).then_some(data);
        match mount(Some(source), Path::new(target), Some(fstype), flags, data) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(source) => {
                return Err(InitError::Mount {
                    fstype,
                    path: target,
                    source,
                })
            }
        }
    }
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    if let Err(e) = nix::unistd::sethostname("microvm") {
        tracing::warn!("setting the hostname: {e}");
    }
    Ok(())
}

/// Ends the VM: every other process is killed, file systems are synced and
/// the guest resets (the VMM exits on the reset). Never returns.
pub fn reset_vm() -> ! {
    // SAFETY: kill(-1) signals every process but ourselves; no memory involved.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    nix::unistd::sync();
    let error = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reached when reboot failed; PID 1 must not exit (that panics the kernel).
    tracing::error!("reboot failed: {error:?}");
    loop {
        std::thread::park();
    }
}
