//! Mounts the shim makes on the host, all under the pod's shared directory
//! (whose mounts propagate into the VMM's namespace and so into the
//! guest): a container's rootfs as containerd describes it (usually one
//! overlay of snapshot layers), and the host files and directories its spec
//! bind-mounts (CRI's /etc/hosts, resolv.conf, volumes). Unmounted again
//! when the container goes, or by `delete` after a crash.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

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

/// Mounts `spec` on `target` (a directory that exists). A read-only bind
/// mount is remounted read-only, as bind mounts ignore MS_RDONLY at first.
pub fn mount_one(what: &str, spec: &MountSpec, target: &Path) -> Result<(), MountError> {
    let (flags, data) = parse_options(&spec.options);
    let data = data.join(",");
    let fail = |error| MountError::Mount {
        what: what.to_string(),
        kind: spec.kind.clone(),
        source_path: spec.source.clone(),
        target: target.to_path_buf(),
        error,
    };
    let kind = (!spec.kind.is_empty() && spec.kind != "bind").then_some(spec.kind.as_str());
    let flags = if spec.kind == "bind" {
        flags | MsFlags::MS_BIND
    } else {
        flags
    };
    mount(
        Some(spec.source.as_str()),
        target,
        kind,
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(fail)?;
    if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .map_err(|e| {
            let _ = umount2(target, MntFlags::MNT_DETACH);
            fail(e)
        })?;
    }
    Ok(())
}

/// Mounts a container's rootfs on `target`, creating it: containerd's
/// mounts in order (normally one overlay), or, when it sent none, a bind
/// of the bundle's own rootfs directory (`ctr run --rootfs`).
pub fn mount_rootfs(
    mounts: &[MountSpec],
    bundle_rootfs: &Path,
    target: &Path,
) -> Result<(), MountError> {
    std::fs::create_dir_all(target).map_err(|error| MountError::Prepare {
        path: target.to_path_buf(),
        error,
    })?;
    if mounts.is_empty() {
        if !bundle_rootfs.is_dir() {
            return Err(MountError::MissingSource(bundle_rootfs.to_path_buf()));
        }
        let bind = MountSpec {
            kind: "bind".into(),
            source: bundle_rootfs.display().to_string(),
            options: vec!["rbind".into()],
        };
        return mount_one("the bundle's rootfs", &bind, target);
    }
    for (index, spec) in mounts.iter().enumerate() {
        if let Err(e) = mount_one("the rootfs", spec, target) {
            for _ in 0..index {
                let _ = umount2(target, MntFlags::MNT_DETACH);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Bind-mounts the host path `source` (a file or a directory) on `target`,
/// creating an empty file or directory there first.
pub fn bind_into_share(source: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
    let meta = std::fs::metadata(source).map_err(|_| MountError::MissingSource(source.into()))?;
    let prepare = |error| MountError::Prepare {
        path: target.to_path_buf(),
        error,
    };
    if meta.is_dir() {
        std::fs::create_dir_all(target).map_err(prepare)?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(prepare)?;
        }
        std::fs::write(target, b"").map_err(prepare)?;
    }
    let mut options = vec!["rbind".to_string()];
    if read_only {
        options.push("ro".into());
    }
    let spec = MountSpec {
        kind: "bind".into(),
        source: source.display().to_string(),
        options,
    };
    mount_one("a bind mount of the spec", &spec, target)
}

/// Unmounts everything at or under `dir` (lazily: nothing in use blocks
/// it) and removes `dir`.
pub fn unmount_and_remove(dir: &Path) {
    for _ in 0..4 {
        let found = crate::mountinfo::mounts_under(dir);
        if found.is_empty() {
            break;
        }
        for mount_point in found {
            if let Err(e) = umount2(&mount_point, MntFlags::MNT_DETACH) {
                tracing::warn!("unmounting {}: {e}", mount_point.display());
            }
        }
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
        let err =
            bind_into_share(Path::new("/no/such/source"), Path::new("/tmp/x"), false).unwrap_err();
        assert!(err.to_string().contains("/no/such/source"), "{err}");
    }
}
