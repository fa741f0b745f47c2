//! File-system operations confined to one directory tree.
//!
//! Every path is walked one component at a time from an open descriptor of
//! the root with `openat(O_DIRECTORY | O_NOFOLLOW)`, and leaves are created
//! and removed with the `*at` calls that never follow a final symlink. A
//! symlink (or any non-directory) in the middle of a path is an error, so
//! nothing an image contains can redirect a write outside the root.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstatat, FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

/// Why a path could not be used.
#[derive(Debug)]
pub enum FsError {
    /// Refused for safety or because the tree has the wrong shape there.
    Refused(String),
    Io(io::Error),
}

impl From<io::Error> for FsError {
    fn from(e: io::Error) -> Self {
        FsError::Io(e)
    }
}

impl From<Errno> for FsError {
    fn from(e: Errno) -> Self {
        FsError::Io(e.into())
    }
}

/// Opens `name` in `dir` without following a final symlink.
pub fn open_at(dir: BorrowedFd<'_>, name: &OsStr, flags: OFlag, mode: Mode) -> io::Result<OwnedFd> {
    let fd: RawFd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        mode,
    )?;
    // SAFETY: `openat` just returned this descriptor and nothing else owns it,
    // so the OwnedFd becomes its only owner and closes it exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens directory `name` in `dir`; a symlink there fails (ELOOP/ENOTDIR).
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    open_at(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    )
}

/// `lstat` of `name` in `dir`; `None` when there is nothing there.
pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<FileStat>> {
    match fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(stat)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn is_dir(stat: &FileStat) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

pub fn is_symlink(stat: &FileStat) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
}

/// An open directory that paths are resolved inside.
pub struct Root {
    fd: OwnedFd,
}

impl Root {
    pub fn open(path: &Path) -> io::Result<Root> {
        let file = File::open(path)?;
        if !file.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            ));
        }
        Ok(Root { fd: file.into() })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens the directory at `components` (relative to the root), never
    /// following a symlink. Missing directories are created (mode 0755)
    /// when `create`, else the answer is `None`.
    pub fn dir(&self, components: &[OsString], create: bool) -> Result<Option<OwnedFd>, FsError> {
        let mut current = self.fd.try_clone()?;
        for (i, name) in components.iter().enumerate() {
            let next = match open_dir_at(current.as_fd(), name) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    if !create {
                        return Ok(None);
                    }
                    match nix::sys::stat::mkdirat(
                        Some(current.as_raw_fd()),
                        name.as_os_str(),
                        Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    open_dir_at(current.as_fd(), name)
                        .map_err(|e| self.explain(current.as_fd(), components, i, e))?
                }
                Err(e) => return Err(self.explain(current.as_fd(), components, i, e)),
            };
            current = next;
        }
        Ok(Some(current))
    }

    /// Turns a failed directory open into a message saying which component
    /// is a symlink or not a directory.
    fn explain(
        &self,
        parent: BorrowedFd<'_>,
        components: &[OsString],
        i: usize,
        e: io::Error,
    ) -> FsError {
        let prefix = join(&components[..=i]);
        match stat_at(parent, &components[i]) {
            Ok(Some(stat)) if is_symlink(&stat) => FsError::Refused(format!(
                "{prefix} is a symlink; refusing to write through it"
            )),
            Ok(Some(stat)) if !is_dir(&stat) => {
                FsError::Refused(format!("{prefix} is not a directory"))
            }
            _ => FsError::Io(e),
        }
    }
}

pub fn join(components: &[OsString]) -> String {
    let path: PathBuf = components.iter().collect();
    path.display().to_string()
}

/// Removes `name` in `dir`, recursively when it is a directory, never
/// following symlinks. Nothing there is not an error.
pub fn remove_all_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let Some(stat) = stat_at(dir, name)? else {
        return Ok(());
    };
    if is_dir(&stat) {
        let child = open_dir_at(dir, name)?;
        for entry in list_dir(child.as_fd())? {
            remove_all_at(child.as_fd(), &entry)?;
        }
        drop(child);
        nix::unistd::unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir)?;
    } else {
        nix::unistd::unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir)?;
    }
    Ok(())
}

/// The names in an open directory (without `.` and `..`).
pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut handle = Dir::openat(
        Some(dir.as_raw_fd()),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in handle.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

/// Removes everything below `dir` (at `path`, relative to the root) that is
/// not in `keep`, descending into kept directories: what an opaque whiteout
/// does to the layers below.
pub fn remove_except(
    dir: BorrowedFd<'_>,
    path: &Path,
    keep: &HashSet<PathBuf>,
) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for name in list_dir(dir)? {
        let child = path.join(&name);
        if !keep.contains(&child) {
            remove_all_at(dir, &name)?;
            removed.push(child);
        } else if stat_at(dir, &name)?.is_some_and(|s| is_dir(&s)) {
            let fd = open_dir_at(dir, &name)?;
            removed.extend(remove_except(fd.as_fd(), &child, keep)?);
        }
    }
    Ok(removed)
}

/// Removes a directory tree of ours (a partial unpack, a stale temporary
/// directory). Unlike [`std::fs::remove_dir_all`] it also copes with
/// directories left without write permission when not running as root.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_writable(path)?;
            std::fs::remove_dir_all(path)
        }
        Err(e) => Err(e),
    }
}

fn make_writable(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(path)? {
            make_writable(&entry?.path())?;
        }
    }
    Ok(())
}
