//! PID 1 duties: the guest's base mounts, its hostname, and ending the VM.

use std::path::Path;

use nix::mount::{mount, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("creating mount point {path}")]
    MountPoint {
        path: String,
        source: std::io::Error,
    },
    #[error("mounting {fstype} on {path}")]
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

/// Where the sandbox's shared file system is mounted in the guest.
pub use protocols::GUEST_SHARED_DIR as SHARED_DIR;

/// Moves the root off the initramfs: pivot_root (which containers need)
/// refuses to work while the root is the kernel's rootfs, so the root
/// becomes a bind mount of itself, as switch_root does with a real root.
fn leave_initramfs() -> Result<(), InitError> {
    const NEW_ROOT: &str = "/.root";
    std::fs::create_dir_all(NEW_ROOT).map_err(|source| InitError::MountPoint {
        path: NEW_ROOT.into(),
        source,
    })?;
    let failed = |what: &'static str| {
        move |source| InitError::Mount {
            fstype: what,
            path: "/",
            source,
        }
    };
    mount(
        Some("/"),
        NEW_ROOT,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(failed("bind"))?;
    nix::unistd::chdir(NEW_ROOT).map_err(failed("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(failed("move"))?;
    nix::unistd::chroot(".").map_err(failed("chroot"))?;
    nix::unistd::chdir("/").map_err(failed("chdir"))?;
    Ok(())
}

/// Mounts the sandbox's virtio-fs share (tag `tag`) at [`SHARED_DIR`].
pub fn mount_shared_fs(tag: &str) -> Result<std::path::PathBuf, InitError> {
    std::fs::create_dir_all(SHARED_DIR).map_err(|source| InitError::MountPoint {
        path: SHARED_DIR.into(),
        source,
    })?;
    match mount(
        Some(tag),
        SHARED_DIR,
        Some("virtiofs"),
        MsFlags::MS_NODEV,
        None::<&str>,
    ) {
        Ok(()) => {}
        Err(nix::Error::EBUSY) => return Ok(SHARED_DIR.into()),
        Err(source) => {
            return Err(InitError::Mount {
                fstype: "virtiofs",
                path: SHARED_DIR,
                source,
            })
        }
    }
    if let Err(e) = set_read_ahead(Path::new(SHARED_DIR), SHARED_FS_READ_AHEAD_KB) {
        tracing::warn!("raising the shared file system's readahead: {e}");
    }
    Ok(SHARED_DIR.into())
}

/// Readahead of the shared file system. The kernel's default of 128 KiB
/// splits a sequential read into FUSE requests of 128 KiB although the
/// device takes 1 MiB (256 pages) per request, and every request is a round
/// trip to the VMM: 1 MiB read 256 MiB in 2.0 s instead of 5.4 s in the test
/// host (4 and 16 MiB gained nothing more).
const SHARED_FS_READ_AHEAD_KB: u32 = 1024;

/// Sets the readahead of the (FUSE) file system mounted at `path`, through
/// its backing device info, which sysfs names after the mount's device
/// number.
fn set_read_ahead(path: &Path, kib: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)?.dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    std::fs::write(&knob, kib.to_string())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{knob}: {e}")))
}

pub fn unmount_shared_fs(path: &Path) {
    if let Err(e) = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        tracing::warn!("unmounting {}: {e}", path.display());
    }
}

/// Mounts /proc, /sys, /dev (+pts, shm), /run, /tmp and the cgroup2
/// hierarchy; sets the hostname. Something already mounted is left alone.
pub fn setup() -> Result<(), InitError> {
    leave_initramfs()?;
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
    // A pod's containers share the guest's network namespace and reach
    // each other on localhost.
    if let Err(e) = bring_up_loopback() {
        tracing::warn!("bringing up lo: {e}");
    }
    Ok(())
}

/// Sets `lo` up (SIOCGIFFLAGS / SIOCSIFFLAGS on a datagram socket).
fn bring_up_loopback() -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: the ioctls read and write `request`, a valid ifreq.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Kills every process but PID 1 and writes every file system's dirty data
/// back (through virtio-fs, to the host's files).
pub fn quiesce() {
    // SAFETY: kill(-1) signals every process but ourselves; no memory involved.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    nix::unistd::sync();
}

/// Ends the VM: every other process is killed, file systems are synced and
/// the guest resets (the VMM exits on the reset). Never returns.
pub fn reset_vm() -> ! {
    quiesce();
    reboot()
}

/// Resets the guest (the VMM exits on the reset), once [`quiesce`]d. Never
/// returns.
pub fn reboot() -> ! {
    let error = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reached when reboot failed; PID 1 must not exit (that panics the kernel).
    tracing::error!("reboot failed: {error:?}");
    loop {
        std::thread::park();
    }
}
