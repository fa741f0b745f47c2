//! Mounts the shim makes on the host, all in the pod's private tree
//! (`mounts/`, which the guest sees read-only as the share, see
//! [`crate::sandbox`]; its mounts propagate into the VMM's namespace and so
//! into the guest), on handles made beneath it without following links
//! ([`crate::beneath`]), each `nosuid,nodev`: a container's rootfs as containerd describes it (usually one
//! overlay of snapshot layers), and the host files and directories its spec
//! bind-mounts (CRI's /etc/hosts, resolv.conf, volumes). Unmounted again
//! when the container goes, or by `delete` after a crash.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::beneath::{Dir, Handle};
use crate::fd_mount::{self, BindSource};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting {what} ({kind} {source_path}) on {target}")]
    Mount {
        what: String,
        kind: String,
        source_path: String,
        target: PathBuf,
        #[source]
        error: nix::Error,
    },
    #[error("preparing {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("bind source {0} does not exist on the host")]
    MissingSource(PathBuf),
    #[error("not binding {source_path} into the guest: {why}")]
    Refused { source_path: PathBuf, why: String },
}

/// One mount as containerd's `Mount` message gives it.
#[derive(Debug, Clone, Default)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// mount(8)-style options split into flags and file-system data.
pub fn parse_options(options: &[String]) -> (MsFlags, Vec<String>) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        let (set, clear) = match option.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "suid" | "dev" | "exec" | "async" | "defaults" => (MsFlags::empty(), MsFlags::empty()),
            other => {
                data.push(other.to_string());
                (MsFlags::empty(), MsFlags::empty())
            }
        };
        flags.insert(set);
        flags.remove(clear);
    }
    (flags, data)
}

/// Mounts `spec` on the directory `target` (a handle: no path is
/// resolved). A bind goes through [`fd_mount`] (restricted before it is
/// attached); any other file system is mounted `nosuid,nodev` on the
/// handle's `/proc/self/fd/N`.
pub fn mount_one(what: &str, spec: &MountSpec, target: &Handle) -> Result<(), MountError> {
    let (flags, data) = parse_options(&spec.options);
    let data = data.join(",");
    let fail = |error| MountError::Mount {
        what: what.to_string(),
        kind: spec.kind.clone(),
        source_path: spec.source.clone(),
        target: target.path.clone(),
        error,
    };
    if spec.kind == "bind" || flags.contains(MsFlags::MS_BIND) {
        let source = BindSource::open(Path::new(&spec.source))
            .map_err(|_| MountError::MissingSource(spec.source.clone().into()))?;
        let tree = source
            .detached_copy(
                flags.contains(MsFlags::MS_REC),
                flags.contains(MsFlags::MS_RDONLY),
            )
            .map_err(|e| fail(errno(e)))?;
        return fd_mount::attach(&tree, &target.fd).map_err(|e| fail(errno(e)));
    }
    let kind = (!spec.kind.is_empty()).then_some(spec.kind.as_str());
    mount(
        Some(spec.source.as_str()),
        &target.proc_path(),
        kind,
        flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(fail)
}

fn errno(error: std::io::Error) -> nix::Error {
    nix::Error::from_raw(error.raw_os_error().unwrap_or(libc::EIO))
}

/// Mounts a container's rootfs on `rootfs` beneath `container` (its
/// directory in the pod's private tree), creating it: containerd's mounts
/// in order (normally one overlay), or, when it sent none, a bind of the
/// bundle's own rootfs directory (`ctr run --rootfs`).
pub fn mount_rootfs(
    mounts: &[MountSpec],
    bundle_rootfs: &Path,
    container: &Dir,
) -> Result<(), MountError> {
    let relative = Path::new(ROOTFS);
    let target_path = container.path().join(relative);
    let prepare = |error| MountError::Prepare {
        path: target_path.clone(),
        error,
    };
    if mounts.is_empty() {
        if !bundle_rootfs.is_dir() {
            return Err(MountError::MissingSource(bundle_rootfs.to_path_buf()));
        }
        let bind = MountSpec {
            kind: "bind".into(),
            source: bundle_rootfs.display().to_string(),
            options: vec!["rbind".into()],
        };
        let target = container.create_dir_handle(relative).map_err(prepare)?;
        return mount_one("the bundle's rootfs", &bind, &target);
    }
    for (index, spec) in mounts.iter().enumerate() {
        // Opened anew each time: the top of what is mounted there so far.
        let mounted = container
            .create_dir_handle(relative)
            .map_err(prepare)
            .and_then(|target| mount_one("the rootfs", spec, &target));
        if let Err(e) = mounted {
            for _ in 0..index {
                let _ = umount2(
                    &target_path,
                    MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW,
                );
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Where a container's rootfs is, in its directory of the share.
pub const ROOTFS: &str = "rootfs";

/// Bind-mounts the host path `source` (a file or a directory) on
/// `relative` beneath `container` (its directory in the pod's private
/// tree), creating an empty file or directory there first; `nosuid`,
/// `nodev` and, with `read_only`, read-only all the way down. A source
/// that is (under) the host's /proc, /sys or /dev, by its canonical path,
/// is refused.
pub fn bind_into_share(
    source: &Path,
    container: &Dir,
    relative: &Path,
    read_only: bool,
) -> Result<(), MountError> {
    let target_path = container.path().join(relative);
    let opened = BindSource::open(source).map_err(|_| MountError::MissingSource(source.into()))?;
    if let Some(why) = opened.refused() {
        return Err(MountError::Refused {
            source_path: source.into(),
            why,
        });
    }
    let prepare = |error| MountError::Prepare {
        path: target_path.clone(),
        error,
    };
    let target = if opened.is_dir {
        container.create_dir_handle(relative)
    } else {
        container.create_file_handle(relative)
    }
    .map_err(prepare)?;
    let fail = |error: std::io::Error| MountError::Mount {
        what: "a bind mount of the spec".into(),
        kind: "bind".into(),
        source_path: opened.canonical.display().to_string(),
        target: target_path.clone(),
        error: errno(error),
    };
    let tree = opened.detached_copy(true, read_only).map_err(fail)?;
    fd_mount::attach(&tree, &target.fd).map_err(fail)
}

/// Unmounts everything at or under `dir` (lazily: nothing in use blocks
/// it; never following a link at a mount point).
pub fn unmount_under(dir: &Path) {
    for _ in 0..4 {
        let found = crate::mountinfo::mounts_under(dir);
        if found.is_empty() {
            break;
        }
        for mount_point in found {
            if let Err(e) = umount2(
                &mount_point,
                MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW,
            ) {
                tracing::warn!("unmounting {}: {e}", mount_point.display());
            }
        }
    }
}

/// Unmounts everything at or under `dir` and removes `dir`, unless
/// something stays mounted there (removing would then reach into it).
pub fn unmount_and_remove(dir: &Path) {
    unmount_under(dir);
    let left = crate::mountinfo::mounts_under(dir);
    if !left.is_empty() {
        tracing::warn!(
            "not removing {}: still mounted there: {left:?}",
            dir.display()
        );
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let options: Vec<String> = ["ro", "nosuid", "lowerdir=/a:/b", "upperdir=/u", "index=off"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, data) = parse_options(&options);
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(data, ["lowerdir=/a:/b", "upperdir=/u", "index=off"]);
        let (flags, _) = parse_options(&["ro".to_string(), "rw".to_string(), "rbind".to_string()]);
        assert_eq!(flags, MsFlags::MS_BIND | MsFlags::MS_REC);
    }

    #[test]
    fn a_missing_bind_source_is_named() {
        let root = tempfile::tempdir().unwrap();
        let dir = Dir::open(root.path()).unwrap();
        let err =
            bind_into_share(Path::new("/no/such/source"), &dir, Path::new("x"), false).unwrap_err();
        assert!(err.to_string().contains("/no/such/source"), "{err}");
    }

    #[test]
    fn kernel_trees_are_not_bound_whatever_their_spelling() {
        let root = tempfile::tempdir().unwrap();
        let dir = Dir::open(root.path()).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink("/etc/../proc", &link).unwrap();
        for source in [Path::new("/./sys/kernel"), &link, Path::new("/dev/null")] {
            let err = bind_into_share(source, &dir, Path::new("x"), true).unwrap_err();
            assert!(matches!(err, MountError::Refused { .. }), "{err}");
        }
        assert!(!root.path().join("x").exists(), "no mount point was made");
    }
}
