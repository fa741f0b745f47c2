//! The default container rootfs: Debian's static busybox with a link per
//! applet, minimal /etc/passwd and /etc/group, and the empty directories a
//! container runtime mounts over. Usable directly as an OCI bundle's rootfs.
//!
//! There is deliberately no /etc/hostname, /etc/hosts or /etc/resolv.conf:
//! the runtime provides those per container.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::busybox;
use crate::image::{remove_tree, ImageError};

#[derive(Debug, Error)]
pub enum RootfsError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("listing busybox applets: {0}")]
    Applets(String),
    #[error(transparent)]
    Image(#[from] ImageError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
";

pub const GROUP: &str = "\
root:x:0:
user:x:1000:
nobody:x:65534:
";

/// (path, mode) of the directories, in creation order.
const DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("etc", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("tmp", 0o1777),
    ("run", 0o755),
    ("root", 0o700),
    ("home", 0o755),
    ("home/user", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
];

/// Builds the default rootfs from `busybox` (Debian's `/bin/busybox`) at
/// `out`, replacing what was there. The new tree is built next to `out` and
/// renamed into place.
pub fn build(busybox_path: &Path, out: &Path) -> Result<(), RootfsError> {
    let applets =
        busybox::applets(busybox_path).map_err(|e| RootfsError::Applets(format!("{e:#}")))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let name = out
        .file_name()
        .map_or_else(|| "rootfs".into(), |n| n.to_string_lossy().into_owned());
    let temp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = remove_tree(&temp);
    fs::create_dir(&temp).map_err(io_err(&temp))?;
    if let Err(e) = fill(busybox_path, &applets, &temp) {
        let _ = remove_tree(&temp);
        return Err(e);
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let had_old = match fs::rename(out, &old) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_err(out)(e)),
    };
    fs::rename(&temp, out).map_err(io_err(out))?;
    if had_old {
        remove_tree(&old).map_err(io_err(&old))?;
    }
    Ok(())
}

fn fill(busybox_path: &Path, applets: &[String], root: &Path) -> Result<(), RootfsError> {
    let privileged = nix::unistd::geteuid().is_root();
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).map_err(io_err(root))?;
    for (dir, mode) in DIRS {
        let path = root.join(dir);
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).map_err(io_err(&path))?;
    }
    if privileged {
        let home = root.join("home/user");
        std::os::unix::fs::chown(&home, Some(1000), Some(1000)).map_err(io_err(&home))?;
    }

    let target = root.join(busybox::GUEST_PATH);
    fs::copy(busybox_path, &target).map_err(io_err(&target))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).map_err(io_err(&target))?;
    for applet in applets {
        if applet == busybox::GUEST_PATH || applet.split('/').any(|c| c == ".." || c.is_empty()) {
            continue;
        }
        let link = root.join(applet);
        if let Some(dir) = link.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        symlink("/bin/busybox", &link).map_err(io_err(&link))?;
    }

    for (file, text, mode) in [("etc/passwd", PASSWD, 0o644), ("etc/group", GROUP, 0o644)] {
        let path = root.join(file);
        fs::write(&path, text).map_err(io_err(&path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io_err(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_busybox_rootfs() {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "/bin/busybox is missing: install busybox-static (scripts/setup.sh does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("rootfs");
        build(busybox, &out).unwrap();
        // Rebuilding replaces it cleanly.
        build(busybox, &out).unwrap();
        assert!(fs::metadata(out.join("bin/busybox")).unwrap().len() > 100_000);
        assert_eq!(
            fs::read_link(out.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert_eq!(
            fs::read_link(out.join("bin/ls")).unwrap(),
            Path::new("/bin/busybox")
        );
        let passwd = fs::read_to_string(out.join("etc/passwd")).unwrap();
        assert!(passwd.contains("root:x:0:0:"));
        assert!(passwd.contains(":1000:1000:"));
        assert!(passwd.contains("nobody:x:65534:"));
        assert!(!out.join("etc/hostname").exists());
        for dir in ["proc", "sys", "dev", "tmp", "run", "root", "home"] {
            assert!(out.join(dir).is_dir(), "{dir}");
            assert_eq!(
                fs::read_dir(out.join(dir)).unwrap().count() > 0,
                dir == "home",
                "{dir}"
            );
        }
        let tmp_mode = fs::metadata(out.join("tmp")).unwrap().permissions().mode();
        assert_eq!(tmp_mode & 0o7777, 0o1777);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temporary dirs left"
        );
    }
}
