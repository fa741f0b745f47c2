//! Bind mounts made through descriptors (the kernel's mount API:
//! `open_tree`, `mount_setattr`, `move_mount`): the source is opened once
//! and judged by what it is (its canonical path, its file system), a
//! detached copy of it gets its restrictions on every mount of the tree
//! (`nosuid`, `nodev`, read-only: `AT_RECURSIVE`), and only then is it
//! attached, on a handle, so every copy that propagates from it (into the
//! VMM's namespace, to the guest) has them from its first moment.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// proc(5) and sysfs: never bound into a guest's share.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;
const SYSFS_MAGIC: i64 = 0x6265_6572;

/// Host trees no container may bind from the host: a guest has its own.
const KERNEL_TREES: [&str; 3] = ["/proc", "/sys", "/dev"];

fn cvt(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A bind source, open (`O_PATH`, links followed: the host names it), with
/// the canonical path the descriptor really is.
#[derive(Debug)]
pub struct BindSource {
    fd: OwnedFd,
    pub canonical: PathBuf,
    pub is_dir: bool,
}

impl BindSource {
    pub fn open(path: &Path) -> io::Result<BindSource> {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a plain open of a C string that lives across the call.
        let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let canonical = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        let is_dir = std::fs::File::from(fd.try_clone()?)
            .metadata()?
            .file_type()
            .is_dir();
        Ok(BindSource {
            fd,
            canonical,
            is_dir,
        })
    }

    /// Why binding this source into a guest is refused, if it is: it is
    /// (under) the host's /proc, /sys or /dev by its canonical path, a
    /// proc or sysfs mounted elsewhere, or a device node.
    pub fn refused(&self) -> Option<String> {
        if let Some(tree) = KERNEL_TREES
            .iter()
            .find(|tree| self.canonical.starts_with(tree))
        {
            return Some(format!("it is under the host's {tree}"));
        }
        // SAFETY: fstatfs fills the struct, which is plain data.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: our descriptor, a struct that lives across the call.
        if unsafe { libc::fstatfs(self.fd.as_raw_fd(), &mut fs) } == 0 {
            let magic = fs.f_type as i64;
            if magic == PROC_SUPER_MAGIC || magic == SYSFS_MAGIC {
                return Some("it is on a proc or sysfs".into());
            }
        }
        let meta = std::fs::File::from(self.fd.try_clone().ok()?)
            .metadata()
            .ok()?;
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_block_device() || meta.file_type().is_char_device() {
            return Some("it is a device node".into());
        }
        None
    }

    /// A detached copy of the source's mount (with those under it when
    /// `recursive`), with `nosuid`, `nodev` and, with `read_only`, `ro` set
    /// on every mount in it, ready for [`attach`].
    pub fn detached_copy(&self, recursive: bool, read_only: bool) -> io::Result<OwnedFd> {
        let recursive = if recursive { libc::AT_RECURSIVE } else { 0 };
        // SAFETY: our descriptor and a static empty C string.
        let tree = cvt(unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                self.fd.as_raw_fd(),
                c"".as_ptr(),
                (libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC) as libc::c_int
                    | libc::AT_EMPTY_PATH
                    | recursive,
            )
        })?;
        // SAFETY: a descriptor just returned to us.
        let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
        let mut attr_set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
        if read_only {
            attr_set |= libc::MOUNT_ATTR_RDONLY;
        }
        set_attributes(&tree, attr_set)?;
        Ok(tree)
    }
}

/// `mount_setattr(tree, "", AT_EMPTY_PATH | AT_RECURSIVE)` setting
/// `attr_set` on every mount of `tree`.
pub fn set_attributes(tree: &OwnedFd, attr_set: u64) -> io::Result<()> {
    // SAFETY: mount_attr is plain data; zeroed is a valid value.
    let mut attr: libc::mount_attr = unsafe { std::mem::zeroed() };
    attr.attr_set = attr_set;
    // SAFETY: our descriptor, a static C string and a struct that lives
    // across the call, with its size.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    })?;
    Ok(())
}

/// Attaches the detached `tree` on `target` (a handle, so no path is
/// resolved).
pub fn attach(tree: &OwnedFd, target: &OwnedFd) -> io::Result<()> {
    // SAFETY: our descriptors and static empty C strings.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_trees_are_refused_by_their_canonical_path() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("innocent");
        std::os::unix::fs::symlink("/proc/self", &link).unwrap();
        let source = BindSource::open(&link).unwrap();
        assert!(source.refused().is_some(), "{}", source.canonical.display());
        // The string filter this replaces let these through.
        for path in ["/etc/../proc/self", "//sys", "/./dev/shm/.."] {
            let source = BindSource::open(Path::new(path)).unwrap();
            assert!(source.refused().is_some(), "{path}");
        }
        let twisted = dir.path().join("twisted");
        std::os::unix::fs::symlink("/etc/../sys/kernel", &twisted).unwrap();
        let source = BindSource::open(&twisted).unwrap();
        assert_eq!(source.canonical, Path::new("/sys/kernel"));
        assert!(source.refused().is_some());
        let null = BindSource::open(Path::new("/dev/null")).unwrap();
        assert!(null.refused().is_some());
        let plain = BindSource::open(dir.path()).unwrap();
        assert_eq!(plain.refused(), None);
        assert!(plain.is_dir);
    }

    #[test]
    fn a_missing_source_is_an_error() {
        let err = BindSource::open(Path::new("/no/such/source")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
