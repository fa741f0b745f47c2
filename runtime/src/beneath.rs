//! Path operations beneath a directory that never follow a link: every
//! step is relative to a descriptor and resolved with `openat2`'s
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, so a
//! symlink (or a `..`) planted anywhere on the way fails the operation
//! instead of leading it elsewhere on the host. The shim creates the mount
//! points of a pod's containers this way.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// What every resolution refuses: leaving the directory, symlinks, and
/// proc's magic links.
const RESOLVE: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

/// A directory handle (`O_PATH`) and its path, for messages and for the
/// mount table.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// A file or directory found or made beneath a [`Dir`]: an `O_PATH`
/// handle, to mount on (`/proc/self/fd/N` or `move_mount`).
#[derive(Debug)]
pub struct Handle {
    pub fd: OwnedFd,
    pub path: PathBuf,
}

fn c_name(name: &std::ffi::OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `openat2(dir, name, flags | O_CLOEXEC, mode)` with [`RESOLVE`].
fn openat2(dir: BorrowedFd, name: &CString, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = u64::from(mode);
    how.resolve = RESOLVE;
    loop {
        // SAFETY: the name and the struct live across the call; the
        // returned descriptor, if any, is ours alone.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                name.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a descriptor just returned to us.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        let error = io::Error::last_os_error();
        // openat2 asks for a retry when a rename raced the resolution.
        if error.raw_os_error() != Some(libc::EAGAIN) {
            return Err(error);
        }
    }
}

/// The single names `relative` is made of: no root, `.` or `..`.
fn names(relative: &Path) -> io::Result<Vec<CString>> {
    relative
        .components()
        .map(|component| match component {
            Component::Normal(name) => c_name(name),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a plain relative path", relative.display()),
            )),
        })
        .collect()
}

impl Dir {
    /// A handle on `path`, a directory the caller made and trusts (no
    /// component of it is followed if it is a symlink at its end).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c_path = c_name(path.as_os_str())?;
        // SAFETY: a plain open of a C string that lives across the call.
        let fd = unsafe {
            libc::open(
                c_path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Dir {
            // SAFETY: a descriptor just returned to us.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory `relative` beneath this one, made (mode 0711, as the
    /// share's root: see `sandbox::share_dir`) where
    /// missing, one name at a time; fails on a symlink or anything other
    /// than a directory on the way.
    pub fn create_dirs(&self, relative: &Path) -> io::Result<Dir> {
        let mut current = Dir {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        };
        for name in names(relative)? {
            // SAFETY: mkdirat on a C string that lives across the call; it
            // never follows a link at the name.
            let rc = unsafe { libc::mkdirat(current.fd.as_raw_fd(), name.as_ptr(), 0o711) };
            if rc != 0 {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::AlreadyExists {
                    return Err(error);
                }
            }
            let fd = openat2(
                current.fd.as_fd(),
                &name,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?;
            current = Dir {
                fd,
                path: current
                    .path
                    .join(std::ffi::OsStr::from_bytes(name.as_bytes())),
            };
        }
        Ok(current)
    }

    /// A handle on the directory `relative` beneath this one, made where
    /// missing (see [`Dir::create_dirs`]).
    pub fn create_dir_handle(&self, relative: &Path) -> io::Result<Handle> {
        let dir = self.create_dirs(relative)?;
        Ok(Handle {
            fd: dir.fd,
            path: dir.path,
        })
    }

    /// A handle on the regular file `relative` beneath this one, made
    /// empty (mode 0600, its parents 0700) where missing; fails on a
    /// symlink or anything other than a regular file there.
    pub fn create_file_handle(&self, relative: &Path) -> io::Result<Handle> {
        let (parent, name) = match (relative.parent(), relative.file_name()) {
            (Some(parent), Some(name)) => (parent, name),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} names no file", relative.display()),
                ))
            }
        };
        let parent = self.create_dirs(parent)?;
        let c = c_name(name)?;
        // SAFETY: mknodat on a C string that lives across the call; it
        // makes a regular file and never follows a link at the name.
        let rc =
            unsafe { libc::mknodat(parent.fd.as_raw_fd(), c.as_ptr(), libc::S_IFREG | 0o600, 0) };
        if rc != 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::AlreadyExists {
                return Err(error);
            }
        }
        let fd = openat2(parent.fd.as_fd(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let meta = std::fs::File::from(fd.try_clone()?).metadata()?;
        if !meta.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a regular file", relative.display()),
            ));
        }
        Ok(Handle {
            fd,
            path: parent.path.join(name),
        })
    }
}

impl Handle {
    /// `/proc/self/fd/N`: the handle's object itself for mount(2), with
    /// no path resolution left.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_and_files_are_made_beneath() {
        let root = tempfile::tempdir().unwrap();
        let dir = Dir::open(root.path()).unwrap();
        let made = dir.create_dirs(Path::new("c1/mounts")).unwrap();
        assert_eq!(made.path(), root.path().join("c1/mounts"));
        assert!(root.path().join("c1/mounts").is_dir());
        let file = dir.create_file_handle(Path::new("c1/mounts/3")).unwrap();
        assert!(root.path().join("c1/mounts/3").is_file());
        assert_eq!(file.path, root.path().join("c1/mounts/3"));
        // Again: what exists is reused.
        dir.create_dirs(Path::new("c1/mounts")).unwrap();
        dir.create_file_handle(Path::new("c1/mounts/3")).unwrap();
    }

    #[test]
    fn a_planted_symlink_is_never_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let canary = outside.path().join("canary");
        std::fs::write(&canary, b"intact").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("c1")).unwrap();
        std::fs::create_dir(root.path().join("c2")).unwrap();
        std::os::unix::fs::symlink(&canary, root.path().join("c2/rootfs")).unwrap();
        std::os::unix::fs::symlink("/", root.path().join("c2/file")).unwrap();
        let dir = Dir::open(root.path()).unwrap();
        // A link is refused on the way (ELOOP) or opened as itself
        // (O_NOFOLLOW): then not a directory, or not a regular file.
        let refused = |err: io::Error| {
            assert!(
                matches!(err.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR))
                    || err.to_string().contains("is not a regular file"),
                "{err}"
            )
        };
        refused(dir.create_dirs(Path::new("c1/rootfs")).unwrap_err());
        refused(dir.create_dirs(Path::new("c2/rootfs")).unwrap_err());
        refused(
            dir.create_file_handle(Path::new("c1/mounts/0"))
                .unwrap_err(),
        );
        refused(dir.create_file_handle(Path::new("c2/file")).unwrap_err());
        refused(dir.create_file_handle(Path::new("c2/rootfs")).unwrap_err());
        assert!(!outside.path().join("rootfs").exists());
        assert_eq!(std::fs::read(&canary).unwrap(), b"intact");
    }

    #[test]
    fn escaping_names_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = Dir::open(root.path()).unwrap();
        for bad in ["../x", "/etc", "a/../../x", "."] {
            let err = dir.create_dirs(Path::new(bad)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}: {err}");
        }
        // A directory where a file is wanted, and the reverse.
        std::fs::create_dir(root.path().join("d")).unwrap();
        std::fs::write(root.path().join("f"), b"").unwrap();
        assert!(dir.create_file_handle(Path::new("d")).is_err());
        assert!(dir.create_dirs(Path::new("f")).is_err());
    }
}
