//! The unpacked-rootfs cache and atomic directory creation.
//!
//! A cached rootfs lives at `<cache>/<chain id hex>/rootfs`. The chain ID is
//! computed from the layers' diff IDs (the uncompressed content, verified
//! while unpacking), so the same layers hit the same entry however the image
//! was packaged. Entries are built in `<cache>/.tmp-<pid>-<n>-<key>` and
//! renamed into place, so an entry that exists is complete.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::ImageError;
use super::fs::remove_tree;

/// Overrides the default cache directory.
pub const CACHE_ENV: &str = "MICROVM_IMAGE_CACHE";

const TEMP_PREFIX: &str = ".tmp-";

/// `$MICROVM_IMAGE_CACHE`, else `$XDG_CACHE_HOME/microvm/images`, else
/// `~/.cache/microvm/images`.
pub fn default_cache_dir() -> Result<PathBuf, ImageError> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty(CACHE_ENV) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("microvm/images"));
    }
    if let Some(home) = non_empty("HOME") {
        return Ok(PathBuf::from(home).join(".cache/microvm/images"));
    }
    Err(ImageError::NoCacheDir)
}

/// Creates the cache directory (mode 0700). Unpacked as root, images keep
/// their setuid-root binaries and device nodes: other host users must not
/// reach them, so a root-run cache that others can enter is made private.
pub fn create_private_dir(dir: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| ImageError::io(parent, e))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(ImageError::io(dir, e)),
    }
    let mode = std::fs::metadata(dir)
        .map_err(|e| ImageError::io(dir, e))?
        .permissions()
        .mode();
    if nix::unistd::geteuid().is_root() && mode & 0o077 != 0 {
        tracing::warn!(
            "{}: other users could enter it; making it private (0700)",
            dir.display()
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| ImageError::io(dir, e))?;
    }
    Ok(())
}

/// A fresh name for a temporary directory in `dir`.
pub fn temp_path(dir: &Path, tag: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    dir.join(format!(
        "{TEMP_PREFIX}{}-{n}{nanos:09}-{tag}",
        std::process::id()
    ))
}

/// Builds a directory at `dest` atomically: `build` fills a temporary
/// directory next to it, which is renamed to `dest` only when `build`
/// succeeds, and removed otherwise. Returns false, dropping the new copy,
/// when another process put a `dest` in place first.
pub fn build_atomically(
    dest: &Path,
    build: impl FnOnce(&Path) -> Result<(), ImageError>,
) -> Result<bool, ImageError> {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| ImageError::io(parent, e))?;
    let tag = dest
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let temp = temp_path(parent, &tag);
    std::fs::create_dir(&temp).map_err(|e| ImageError::io(&temp, e))?;
    let discard = |temp: &Path| {
        if let Err(e) = remove_tree(temp) {
            tracing::warn!("could not remove {}: {e}", temp.display());
        }
    };
    if let Err(e) = build(&temp) {
        discard(&temp);
        return Err(e);
    }
    match std::fs::rename(&temp, dest) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) => {
            discard(&temp);
            Ok(false)
        }
        Err(e) => {
            discard(&temp);
            Err(ImageError::io(dest, e))
        }
    }
}

/// Removes temporary directories that processes which have since died
/// left in `cache_dir`.
pub fn remove_stale_temps(cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(TEMP_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            tracing::debug!("removing stale {}", entry.path().display());
            let _ = remove_tree(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_atomically_and_cleans_up_failures() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("entry");
        let failed = build_atomically(&dest, |tmp| {
            std::fs::write(tmp.join("partial"), b"x").unwrap();
            Err(ImageError::NoCacheDir)
        });
        assert!(failed.is_err());
        assert!(!dest.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "temp dir left behind"
        );

        assert!(build_atomically(&dest, |tmp| {
            std::fs::write(tmp.join("done"), b"x").map_err(|e| ImageError::io(tmp, e))
        })
        .unwrap());
        assert!(dest.join("done").exists());
        // A second builder loses the race gracefully.
        assert!(!build_atomically(&dest, |tmp| {
            std::fs::write(tmp.join("other"), b"y").map_err(|e| ImageError::io(tmp, e))
        })
        .unwrap());
        assert!(!dest.join("other").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temps_of_dead_processes_go() {
        let dir = tempfile::tempdir().unwrap();
        // PID 0x7fffffff does not exist; our own temp dir stays.
        let stale = dir.path().join(".tmp-2147483647-1-x");
        let ours = temp_path(dir.path(), "x");
        std::fs::create_dir_all(stale.join("a/b")).unwrap();
        std::fs::create_dir(&ours).unwrap();
        remove_stale_temps(dir.path());
        assert!(!stale.exists());
        assert!(ours.exists());
    }
}
