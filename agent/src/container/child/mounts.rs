//! The container's file system, as runc builds it: the rootfs bind-mounted
//! onto itself, the spec's mounts inside it, a /dev with the default
//! devices, pivot_root, then masked and read-only paths.

use std::fs;
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::statvfs::{statvfs, FsFlags};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};

use super::setup_error;
use crate::container::ContainerError;

/// The devices every container gets (as runc's defaults): name, major, minor.
const DEFAULT_DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// `path` inside `rootfs`, with `..` and symlinks not allowed to leave it
/// (lexically; the rootfs is not yet pivoted to).
pub fn inside(rootfs: &Path, path: &Path) -> PathBuf {
    let mut result = rootfs.to_path_buf();
    let mut depth = 0usize;
    for component in path.components() {
        match component {
            Component::Normal(name) => {
                result.push(name);
                depth += 1;
            }
            Component::ParentDir if depth > 0 => {
                result.pop();
                depth -= 1;
            }
            _ => {}
        }
    }
    result
}

fn mount_error(what: &str, target: &Path, e: nix::Error) -> ContainerError {
    setup_error(format!("mounting {what} on {}: {e}", target.display()))
}

/// Mount flags and leftover data of an option list.
pub fn parse_options(options: &[String]) -> (MsFlags, MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        let (set, clear) = match option.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "private" => {
                propagation |= MsFlags::MS_PRIVATE;
                continue;
            }
            "rprivate" => {
                propagation |= MsFlags::MS_PRIVATE | MsFlags::MS_REC;
                continue;
            }
            "slave" => {
                propagation |= MsFlags::MS_SLAVE;
                continue;
            }
            "rslave" => {
                propagation |= MsFlags::MS_SLAVE | MsFlags::MS_REC;
                continue;
            }
            "shared" => {
                propagation |= MsFlags::MS_SHARED;
                continue;
            }
            "rshared" => {
                propagation |= MsFlags::MS_SHARED | MsFlags::MS_REC;
                continue;
            }
            "unbindable" => {
                propagation |= MsFlags::MS_UNBINDABLE;
                continue;
            }
            "runbindable" => {
                propagation |= MsFlags::MS_UNBINDABLE | MsFlags::MS_REC;
                continue;
            }
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags |= set;
        flags &= !clear;
    }
    (flags, propagation, data.join(","))
}

fn create_mount_point(target: &Path, is_dir: bool) -> Result<(), ContainerError> {
    let created = if is_dir {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(target)
    } else {
        if let Some(parent) = target.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|e| {
                    setup_error(format!("creating mount point {}: {e}", parent.display()))
                })?;
        }
        match fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => Ok(()),
            Err(e) => Err(e),
        }
    };
    created.map_err(|e| setup_error(format!("creating mount point {}: {e}", target.display())))
}

/// One mount of the spec, inside `rootfs`.
fn mount_entry(rootfs: &Path, bundle: &Path, entry: &Mount) -> Result<(), ContainerError> {
    let target = inside(rootfs, entry.destination());
    let options = entry.options().clone().unwrap_or_default();
    let (flags, propagation, data) = parse_options(&options);
    let kind = entry.typ().clone().unwrap_or_default();
    let is_bind = kind == "bind" || flags.contains(MsFlags::MS_BIND);
    if is_bind {
        let source = entry.source().clone().ok_or_else(|| {
            setup_error(format!(
                "bind mount {} has no source",
                entry.destination().display()
            ))
        })?;
        let source = if source.is_relative() {
            bundle.join(source)
        } else {
            source
        };
        let meta = fs::metadata(&source).map_err(|e| {
            setup_error(format!(
                "bind mount source {} for {}: {e}",
                source.display(),
                entry.destination().display()
            ))
        })?;
        create_mount_point(&target, meta.is_dir())?;
        let bind = MsFlags::MS_BIND | (flags & MsFlags::MS_REC);
        mount(Some(&source), &target, None::<&str>, bind, None::<&str>)
            .map_err(|e| mount_error(&source.display().to_string(), &target, e))?;
        // Flags other than bind/rec apply through a remount of the bind.
        let extra = flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            remount_bind(&target, extra)?;
        }
    } else {
        create_mount_point(&target, true)?;
        let kind = if kind == "cgroup" {
            "cgroup2".to_string()
        } else {
            kind
        };
        let source = entry
            .source()
            .clone()
            .unwrap_or_else(|| PathBuf::from(&kind));
        let data = if kind == "cgroup2" {
            String::new()
        } else {
            data
        };
        let result = mount(
            Some(&source),
            &target,
            Some(kind.as_str()),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        );
        match result {
            Ok(()) => {}
            // sysfs and cgroup2 are refused where the namespace does not
            // own them (e.g. a user namespace): bind the guest's instead, as runc does.
            Err(nix::Error::EPERM | nix::Error::EBUSY) if kind == "sysfs" || kind == "cgroup2" => {
                let host = if kind == "sysfs" {
                    "/sys"
                } else {
                    "/sys/fs/cgroup"
                };
                mount(
                    Some(host),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(|e| mount_error(host, &target, e))?;
                remount_bind(&target, flags)?;
            }
            Err(e) => return Err(mount_error(&kind, &target, e)),
        }
    }
    if !propagation.is_empty() {
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            propagation,
            None::<&str>,
        )
        .map_err(|e| mount_error("propagation", &target, e))?;
    }
    Ok(())
}

/// Remounts a bind mount with `flags`, keeping the flags it has to keep.
fn remount_bind(target: &Path, flags: MsFlags) -> Result<(), ContainerError> {
    let mut keep = MsFlags::empty();
    if let Ok(stat) = statvfs(target) {
        let have = stat.flags();
        for (fs_flag, ms_flag) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        ] {
            if have.contains(fs_flag) {
                keep |= ms_flag;
            }
        }
    }
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags | keep,
        None::<&str>,
    )
    .map_err(|e| mount_error("a remount", target, e))
}

fn has_mount_at(spec: &Spec, path: &str) -> bool {
    spec.mounts()
        .as_ref()
        .is_some_and(|mounts| mounts.iter().any(|m| m.destination() == Path::new(path)))
}

/// Builds the container's mount namespace and pivots into `rootfs`.
pub fn build_root(spec: &Spec, rootfs: &Path, bundle: &Path) -> Result<(), ContainerError> {
    let linux = spec.linux().clone().unwrap_or_default();
    // Nothing we mount may propagate back to the guest.
    let root_propagation = match linux.rootfs_propagation().as_deref() {
        Some("shared") => MsFlags::MS_SHARED,
        Some("slave") => MsFlags::MS_SLAVE,
        Some("unbindable") => MsFlags::MS_UNBINDABLE,
        _ => MsFlags::MS_PRIVATE,
    } | MsFlags::MS_REC;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| mount_error("private propagation", Path::new("/"), e))?;
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| mount_error("the rootfs", rootfs, e))?;

    if !has_mount_at(spec, "/dev") {
        let dev = inside(rootfs, Path::new("/dev"));
        create_mount_point(&dev, true)?;
        mount(
            Some("tmpfs"),
            &dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
            Some("mode=755,size=65536k"),
        )
        .map_err(|e| mount_error("tmpfs", &dev, e))?;
    }
    for entry in spec.mounts().as_deref().unwrap_or_default() {
        mount_entry(rootfs, bundle, entry)?;
    }
    let in_userns = linux.namespaces().as_ref().is_some_and(|n| {
        n.iter()
            .any(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::User)
    });
    create_devices(
        rootfs,
        linux.devices().as_deref().unwrap_or_default(),
        in_userns,
    )?;

    pivot(rootfs)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        root_propagation,
        None::<&str>,
    )
    .map_err(|e| mount_error("rootfs propagation", Path::new("/"), e))?;
    Ok(())
}

/// What is left after pivot_root and the console: masked and read-only
/// paths, and a read-only rootfs.
pub fn finish_root(spec: &Spec) -> Result<(), ContainerError> {
    let linux = spec.linux().clone().unwrap_or_default();
    for path in linux.masked_paths().as_deref().unwrap_or_default() {
        mask(Path::new(path))?;
    }
    for path in linux.readonly_paths().as_deref().unwrap_or_default() {
        let path = Path::new(path);
        match mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ) {
            Ok(()) => remount_bind(path, MsFlags::MS_RDONLY | MsFlags::MS_REC)?,
            Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(mount_error("a read-only bind", path, e)),
        }
    }
    if spec
        .root()
        .as_ref()
        .is_some_and(|root| root.readonly() == Some(true))
    {
        remount_bind(Path::new("/"), MsFlags::MS_RDONLY)?;
    }
    Ok(())
}

fn mask(path: &Path) -> Result<(), ContainerError> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(_) => return Ok(()),
    };
    let result = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    result.map_err(|e| mount_error("a mask", path, e))
}

fn create_devices(
    rootfs: &Path,
    devices: &[LinuxDevice],
    in_userns: bool,
) -> Result<(), ContainerError> {
    let dev = inside(rootfs, Path::new("/dev"));
    for (name, major, minor) in DEFAULT_DEVICES {
        let target = dev.join(name);
        if in_userns {
            bind_device(&Path::new("/dev").join(name), &target)?;
        } else {
            make_node(&target, SFlag::S_IFCHR, *major, *minor, 0o666, None)?;
        }
    }
    for device in devices {
        let target = inside(rootfs, device.path());
        let kind = match device.typ() {
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            _ => SFlag::S_IFCHR,
        };
        if in_userns {
            bind_device(device.path(), &target)?;
        } else {
            let owner = Some((device.uid().unwrap_or(0), device.gid().unwrap_or(0)));
            let mode = device.file_mode().unwrap_or(0o666);
            make_node(
                &target,
                kind,
                device.major() as u64,
                device.minor() as u64,
                mode,
                owner,
            )?;
        }
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
        ("core", "/proc/kcore"),
    ] {
        let path = dev.join(link);
        if fs::symlink_metadata(&path).is_err() {
            symlink(target, &path)
                .map_err(|e| setup_error(format!("creating {}: {e}", path.display())))?;
        }
    }
    Ok(())
}

fn make_node(
    target: &Path,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), ContainerError> {
    let _ = fs::remove_file(target);
    if let Some(parent) = target.parent() {
        let _ = fs::create_dir_all(parent);
    }
    mknod(
        target,
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )
    .map_err(|e| setup_error(format!("creating device {}: {e}", target.display())))?;
    // mknod's mode is filtered by the umask; set it exactly.
    nix::sys::stat::fchmodat(
        None,
        target,
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(|e| setup_error(format!("chmod {}: {e}", target.display())))?;
    if let Some((uid, gid)) = owner {
        nix::unistd::chown(target, Some(uid.into()), Some(gid.into()))
            .map_err(|e| setup_error(format!("chown {}: {e}", target.display())))?;
    }
    Ok(())
}

fn bind_device(source: &Path, target: &Path) -> Result<(), ContainerError> {
    create_mount_point(target, false)?;
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| mount_error(&source.display().to_string(), target, e))
}

/// pivot_root into `rootfs`, with the old root stacked on it and detached.
fn pivot(rootfs: &Path) -> Result<(), ContainerError> {
    nix::unistd::chdir(rootfs)
        .map_err(|e| setup_error(format!("entering {}: {e}", rootfs.display())))?;
    nix::unistd::pivot_root(".", ".")
        .map_err(|e| setup_error(format!("pivot_root to {}: {e}", rootfs.display())))?;
    umount2(".", MntFlags::MNT_DETACH)
        .map_err(|e| setup_error(format!("detaching the old root: {e}")))?;
    nix::unistd::chdir("/").map_err(|e| setup_error(format!("chdir /: {e}")))?;
    Ok(())
}
