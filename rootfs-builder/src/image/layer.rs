//! Applying layer tars to a root directory: entries in order, whiteouts
//! (`.wh.NAME`) and opaque directories (`.wh..wh..opq`), hard links,
//! symlinks, device nodes (as root), modes, ownership (as root) and mtimes.
//!
//! Paths with `..` or a leading `/` are refused, and every write goes through
//! [`super::fs::Root`], which never follows a symlink found in the tree.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{File, FileTimes};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use tar::EntryType;

use super::error::ImageError;
use super::fs::{self, FsError, Root};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// A tar entry's path, checked.
#[derive(Debug, PartialEq, Eq)]
pub enum EntryPath {
    /// `/`, `.` or `./`: the root directory itself.
    Root,
    /// The components below the root (none is empty, `.` or `..`).
    Below(Vec<OsString>),
}

/// Splits a tar path into components, refusing `..` and absolute paths.
pub fn parse_entry_path(raw: &[u8]) -> Result<EntryPath, String> {
    let mut components = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path contains \"..\"".into()),
            part => components.push(OsStr::from_bytes(part).to_os_string()),
        }
    }
    if components.is_empty() {
        return Ok(EntryPath::Root);
    }
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    Ok(EntryPath::Below(components))
}

/// Deferred directory metadata: applied after all layers, deepest first, so
/// that a read-only directory can still be filled and its mtime sticks.
#[derive(Clone, Copy, Debug)]
struct DirMeta {
    mode: u32,
    mtime: Option<SystemTime>,
}

/// Ownership, mode and time of one entry (PAX records override the header).
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: Option<SystemTime>,
}

/// Unpacks layers, in order, into one root directory.
pub struct Unpacker {
    root: Root,
    image: PathBuf,
    privileged: bool,
    dirs: BTreeMap<PathBuf, DirMeta>,
    skipped_devices: usize,
}

/// Where an error happened.
struct At<'a> {
    image: &'a Path,
    layer: &'a str,
    entry: &'a str,
}

impl At<'_> {
    fn refused(&self, reason: impl Into<String>) -> ImageError {
        ImageError::Entry {
            image: self.image.to_path_buf(),
            layer: self.layer.to_string(),
            entry: self.entry.to_string(),
            reason: reason.into(),
        }
    }

    fn fs(&self, e: FsError) -> ImageError {
        match e {
            FsError::Refused(reason) => self.refused(reason),
            FsError::Io(source) => ImageError::EntryIo {
                image: self.image.to_path_buf(),
                layer: self.layer.to_string(),
                entry: self.entry.to_string(),
                source,
            },
        }
    }
}

impl Unpacker {
    /// `root` must exist; `image` is only used in messages.
    pub fn new(root: &Path, image: &Path) -> Result<Unpacker, ImageError> {
        Ok(Unpacker {
            root: Root::open(root).map_err(|e| ImageError::io(root, e))?,
            image: image.to_path_buf(),
            privileged: nix::unistd::geteuid().is_root(),
            dirs: BTreeMap::new(),
            skipped_devices: 0,
        })
    }

    /// Applies one uncompressed layer tar. `layer` names it in messages.
    pub fn apply_layer(&mut self, reader: impl Read, layer: &str) -> Result<(), ImageError> {
        let image = self.image.clone();
        let stream_error = |source: io::Error| ImageError::LayerStream {
            image: image.clone(),
            layer: layer.to_string(),
            source,
        };
        let mut counted = CountingReader {
            inner: reader,
            count: 0,
        };
        let mut archive = tar::Archive::new(&mut counted);
        let mut written: HashSet<PathBuf> = HashSet::new();
        // Where the last entry's data ended, and the error that ended the stream.
        let mut data_end = 0u64;
        let mut stream_end = None;
        for entry in archive.entries().map_err(stream_error)? {
            let mut entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    stream_end = Some(e);
                    break;
                }
            };
            data_end = entry.raw_file_position() + entry.size();
            let raw = entry.path_bytes().into_owned();
            let name = String::from_utf8_lossy(&raw).into_owned();
            let at = At {
                image: &image,
                layer,
                entry: &name,
            };
            let path = parse_entry_path(&raw).map_err(|reason| at.refused(reason))?;
            let meta = entry_meta(&mut entry).map_err(|reason| at.refused(reason))?;
            let components = match path {
                EntryPath::Root => {
                    if entry.header().entry_type() != EntryType::Directory {
                        return Err(at.refused("the root can only be a directory"));
                    }
                    self.chown_at(self.root.fd(), OsStr::new("."), &meta)
                        .map_err(|e| at.fs(e))?;
                    self.dirs.insert(
                        PathBuf::new(),
                        DirMeta {
                            mode: meta.mode,
                            mtime: meta.mtime,
                        },
                    );
                    continue;
                }
                EntryPath::Below(components) => components,
            };
            let (parent, leaf) = components.split_at(components.len() - 1);
            let leaf = &leaf[0];
            let leaf_bytes = leaf.as_bytes();
            if leaf_bytes == OPAQUE_WHITEOUT.as_bytes() {
                self.opaque(parent, &written).map_err(|e| at.fs(e))?;
                mark_written(&mut written, parent);
                continue;
            }
            if leaf_bytes.starts_with(b".wh..wh.") {
                // Other AUFS metadata (.wh..wh.plnk, ...): never content.
                continue;
            }
            if let Some(target) = leaf_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
                if target.is_empty() || target == b"." || target == b".." {
                    return Err(at.refused("whiteout names nothing"));
                }
                self.whiteout(parent, OsStr::from_bytes(target))
                    .map_err(|e| at.fs(e))?;
                continue;
            }

            let parent_fd = self
                .root
                .dir(parent, true)
                .map_err(|e| at.fs(e))?
                .ok_or_else(|| at.refused("parent directory vanished"))?;
            let path: PathBuf = components.iter().collect();
            let kind = entry.header().entry_type();
            match kind {
                EntryType::Directory => {
                    self.make_dir(parent_fd.as_fd(), leaf, &meta)
                        .map_err(|e| at.fs(e))?;
                    self.dirs.insert(
                        path.clone(),
                        DirMeta {
                            mode: meta.mode,
                            mtime: meta.mtime,
                        },
                    );
                }
                EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                    self.forget_dirs(&path);
                    self.make_file(parent_fd.as_fd(), leaf, &meta, &mut entry, kind, &at)?;
                }
                EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| at.refused("symlink without a target"))?
                        .into_owned();
                    self.forget_dirs(&path);
                    fs::remove_all_at(parent_fd.as_fd(), leaf).map_err(|e| at.fs(e.into()))?;
                    nix::unistd::symlinkat(
                        OsStr::from_bytes(&target),
                        Some(parent_fd.as_raw_fd()),
                        leaf.as_os_str(),
                    )
                    .map_err(|e| at.fs(e.into()))?;
                    self.finish_special(parent_fd.as_fd(), leaf, &meta, false)
                        .map_err(|e| at.fs(e))?;
                }
                EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| at.refused("hard link without a target"))?
                        .into_owned();
                    self.forget_dirs(&path);
                    self.make_hard_link(parent_fd.as_fd(), leaf, &components, &target)
                        .map_err(|e| at.fs(e))?;
                }
                EntryType::Char | EntryType::Block | EntryType::Fifo => {
                    let made = self
                        .make_node(parent_fd.as_fd(), leaf, &meta, kind, &entry)
                        .map_err(|e| at.fs(e))?;
                    if made {
                        self.forget_dirs(&path);
                    }
                }
                EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink => {
                    continue;
                }
                other => {
                    return Err(at.refused(format!("unsupported entry type {other:?}")));
                }
            }
            mark_written(&mut written, &components);
        }
        if let Some(e) = stream_end {
            // Some writers (umoci 0.4.7's `insert`) end the stream right
            // after the last entry's data, without its padding and the
            // end-of-archive blocks. Every entry was complete (short data
            // is an error above, and the digests are checked): accept it.
            // Anything more, such as a partial header, is a truncation.
            let padded_end = data_end.div_ceil(512) * 512;
            if counted.count <= padded_end {
                tracing::warn!(
                    image = %self.image.display(),
                    "{layer}: the tar stream ends without end-of-archive blocks"
                );
            } else {
                return Err(stream_error(e));
            }
        }
        Ok(())
    }

    /// Applies the deferred directory modes and mtimes. Call once, after the
    /// last layer.
    pub fn finish(self) -> Result<(), ImageError> {
        if self.skipped_devices > 0 {
            tracing::info!(
                image = %self.image.display(),
                "skipped {} device nodes (creating them needs root)",
                self.skipped_devices
            );
        }
        // Reverse order visits children before their parents.
        for (path, meta) in self.dirs.iter().rev() {
            let components: Vec<OsString> = path.iter().map(OsStr::to_os_string).collect();
            let dir = match self.root.dir(&components, false) {
                Ok(Some(fd)) => File::from(fd),
                // Replaced by something else since, or gone: nothing to do.
                Ok(None) | Err(FsError::Refused(_)) => continue,
                Err(FsError::Io(e)) => return Err(ImageError::io(path, e)),
            };
            let full = || self.image.join(path);
            dir.set_permissions(std::fs::Permissions::from_mode(meta.mode & 0o7777))
                .map_err(|e| ImageError::io(full(), e))?;
            if let Some(mtime) = meta.mtime {
                dir.set_times(FileTimes::new().set_modified(mtime).set_accessed(mtime))
                    .map_err(|e| ImageError::io(full(), e))?;
            }
        }
        Ok(())
    }

    fn whiteout(&mut self, parent: &[OsString], name: &OsStr) -> Result<(), FsError> {
        // Nothing below a missing directory to delete.
        let Some(dir) = self.root.dir(parent, false)? else {
            return Ok(());
        };
        let path: PathBuf = parent
            .iter()
            .chain(std::iter::once(&name.to_os_string()))
            .collect();
        fs::remove_all_at(dir.as_fd(), name)?;
        self.forget_dirs(&path);
        Ok(())
    }

    fn opaque(&mut self, dir: &[OsString], written: &HashSet<PathBuf>) -> Result<(), FsError> {
        let fd = self
            .root
            .dir(dir, true)?
            .ok_or_else(|| FsError::Refused("opaque directory vanished".into()))?;
        let path: PathBuf = dir.iter().collect();
        for removed in fs::remove_except(fd.as_fd(), &path, written)? {
            self.forget_dirs(&removed);
        }
        Ok(())
    }

    /// Drops deferred metadata of directories at or below `path` (it was
    /// removed or replaced by a non-directory).
    fn forget_dirs(&mut self, path: &Path) {
        if self.dirs.range(path.to_path_buf()..).next().is_some() {
            self.dirs.retain(|dir, _| !dir.starts_with(path));
        }
    }

    fn make_dir(&self, parent: BorrowedFd<'_>, name: &OsStr, meta: &Meta) -> Result<(), FsError> {
        match fs::stat_at(parent, name)? {
            Some(stat) if fs::is_dir(&stat) => {}
            existing => {
                if existing.is_some() {
                    fs::remove_all_at(parent, name)?;
                }
                nix::sys::stat::mkdirat(
                    Some(parent.as_raw_fd()),
                    name,
                    Mode::from_bits_truncate(0o755),
                )?;
            }
        }
        self.chown_at(parent, name, meta)
    }

    #[allow(clippy::too_many_arguments)]
    fn make_file<R: Read>(
        &self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        meta: &Meta,
        entry: &mut tar::Entry<'_, R>,
        kind: EntryType,
        at: &At<'_>,
    ) -> Result<(), ImageError> {
        fs::remove_all_at(parent, name).map_err(|e| at.fs(e.into()))?;
        let fd = fs::open_at(
            parent,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| at.fs(e.into()))?;
        let mut file = File::from(fd);
        let expected = entry.size();
        let mut copied = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ImageError::LayerStream {
                        image: at.image.to_path_buf(),
                        layer: format!("{} (entry {:?})", at.layer, at.entry),
                        source,
                    })
                }
            };
            file.write_all(&buf[..n]).map_err(|e| at.fs(e.into()))?;
            copied += n as u64;
        }
        if kind != EntryType::GNUSparse && copied != expected {
            return Err(at.refused(format!(
                "truncated: the layer ends after {copied} of its {expected} bytes"
            )));
        }
        if self.privileged {
            std::os::unix::fs::fchown(&file, Some(meta.uid_u32()), Some(meta.gid_u32()))
                .map_err(|e| at.fs(e.into()))?;
        }
        // After chown, which clears setuid/setgid bits.
        file.set_permissions(std::fs::Permissions::from_mode(meta.mode & 0o7777))
            .map_err(|e| at.fs(e.into()))?;
        if let Some(mtime) = meta.mtime {
            file.set_times(FileTimes::new().set_modified(mtime).set_accessed(mtime))
                .map_err(|e| at.fs(e.into()))?;
        }
        Ok(())
    }

    fn make_hard_link(
        &self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        components: &[OsString],
        target: &[u8],
    ) -> Result<(), FsError> {
        let target_components = match parse_entry_path(target) {
            Ok(EntryPath::Below(c)) => c,
            Ok(EntryPath::Root) => return Err(FsError::Refused("hard link to the root".into())),
            Err(reason) => return Err(FsError::Refused(format!("hard link target: {reason}"))),
        };
        if target_components == components {
            return Err(FsError::Refused("hard link to itself".into()));
        }
        let (target_parent, target_leaf) = target_components.split_at(target_components.len() - 1);
        let target_name = &target_leaf[0];
        let missing = || {
            FsError::Refused(format!(
                "hard link target {} does not exist",
                fs::join(&target_components)
            ))
        };
        let target_dir = self.root.dir(target_parent, false)?.ok_or_else(missing)?;
        match fs::stat_at(target_dir.as_fd(), target_name)? {
            None => return Err(missing()),
            Some(stat) if fs::is_dir(&stat) => {
                return Err(FsError::Refused(format!(
                    "hard link target {} is a directory",
                    fs::join(&target_components)
                )))
            }
            Some(_) => {}
        }
        fs::remove_all_at(parent, name)?;
        // No AT_SYMLINK_FOLLOW: a symlink target is linked itself, not followed.
        nix::unistd::linkat(
            Some(target_dir.as_raw_fd()),
            target_name.as_os_str(),
            Some(parent.as_raw_fd()),
            name,
            AtFlags::empty(),
        )?;
        Ok(())
    }

    /// Creates a device node or FIFO. Device nodes need root: without it
    /// they are skipped (as rootless tools do) and this returns false.
    fn make_node<R: Read>(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        meta: &Meta,
        kind: EntryType,
        entry: &tar::Entry<'_, R>,
    ) -> Result<bool, FsError> {
        let node_kind = match kind {
            EntryType::Char => SFlag::S_IFCHR,
            EntryType::Block => SFlag::S_IFBLK,
            _ => SFlag::S_IFIFO,
        };
        if node_kind != SFlag::S_IFIFO && !self.privileged {
            tracing::debug!("skipping device node {name:?}: not root");
            self.skipped_devices += 1;
            return Ok(false);
        }
        let (major, minor) = if node_kind == SFlag::S_IFIFO {
            (0, 0)
        } else {
            let header = entry.header();
            let bad = |e: io::Error| FsError::Refused(format!("bad device number: {e}"));
            (
                header.device_major().map_err(bad)?.unwrap_or(0),
                header.device_minor().map_err(bad)?.unwrap_or(0),
            )
        };
        fs::remove_all_at(parent, name)?;
        nix::sys::stat::mknodat(
            Some(parent.as_raw_fd()),
            name,
            node_kind,
            Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(major.into(), minor.into()),
        )?;
        self.finish_special(parent, name, meta, true)?;
        Ok(true)
    }

    /// Ownership, mode (not for symlinks) and mtime of a node that cannot
    /// be opened safely (symlink, device, FIFO).
    fn finish_special(
        &self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        meta: &Meta,
        set_mode: bool,
    ) -> Result<(), FsError> {
        self.chown_at(parent, name, meta)?;
        if set_mode {
            // fchmodat cannot refuse to follow symlinks on Linux; this node
            // was created just now by us and is not one.
            nix::sys::stat::fchmodat(
                Some(parent.as_raw_fd()),
                name,
                Mode::from_bits_truncate(meta.mode & 0o7777),
                FchmodatFlags::FollowSymlink,
            )?;
        }
        if let Some(mtime) = meta.mtime {
            let since = mtime
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            let spec = TimeSpec::new(since.as_secs() as i64, since.subsec_nanos() as i64);
            nix::sys::stat::utimensat(
                Some(parent.as_raw_fd()),
                name,
                &spec,
                &spec,
                UtimensatFlags::NoFollowSymlink,
            )?;
        }
        Ok(())
    }

    fn chown_at(&self, parent: BorrowedFd<'_>, name: &OsStr, meta: &Meta) -> Result<(), FsError> {
        if self.privileged {
            nix::unistd::fchownat(
                Some(parent.as_raw_fd()),
                name,
                Some(Uid::from_raw(meta.uid_u32())),
                Some(Gid::from_raw(meta.gid_u32())),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        }
        Ok(())
    }
}

impl Meta {
    fn uid_u32(&self) -> u32 {
        u32::try_from(self.uid).unwrap_or(u32::MAX - 1)
    }

    fn gid_u32(&self) -> u32 {
        u32::try_from(self.gid).unwrap_or(u32::MAX - 1)
    }
}

/// Counts the bytes of the tar stream the `tar` crate consumed.
struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Records `components` and all its ancestors as written by this layer (an
/// opaque whiteout later in the layer keeps them).
fn mark_written(written: &mut HashSet<PathBuf>, components: &[OsString]) {
    let mut path = PathBuf::new();
    for component in components {
        path.push(component);
        written.insert(path.clone());
    }
}

fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
    let header = entry.header();
    let mode = header.mode().map_err(|e| format!("bad mode: {e}"))?;
    let mut uid = header.uid().map_err(|e| format!("bad uid: {e}"))?;
    let mut gid = header.gid().map_err(|e| format!("bad gid: {e}"))?;
    let mut mtime = header
        .mtime()
        .ok()
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
    if let Some(extensions) = entry
        .pax_extensions()
        .map_err(|e| format!("bad PAX header: {e}"))?
    {
        for extension in extensions {
            let extension = extension.map_err(|e| format!("bad PAX header: {e}"))?;
            let (Ok(key), Ok(value)) = (extension.key(), extension.value()) else {
                continue;
            };
            match key {
                "uid" => {
                    uid = value
                        .parse()
                        .map_err(|_| format!("bad PAX uid {value:?}"))?
                }
                "gid" => {
                    gid = value
                        .parse()
                        .map_err(|_| format!("bad PAX gid {value:?}"))?
                }
                "mtime" => mtime = parse_pax_time(value).or(mtime),
                _ => {}
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime,
    })
}

/// `1700000000.25` → a time; negative or malformed times are ignored.
fn parse_pax_time(value: &str) -> Option<SystemTime> {
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    let secs: u64 = secs.parse().ok()?;
    let mut nanos = 0u32;
    if !frac.is_empty() {
        let digits: String = frac.chars().take(9).collect();
        let scale = 10u32.pow(9 - digits.len() as u32);
        nanos = digits.parse::<u32>().ok()? * scale;
    }
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn below(parts: &[&str]) -> EntryPath {
        EntryPath::Below(parts.iter().map(OsString::from).collect())
    }

    #[test]
    fn entry_paths() {
        assert_eq!(parse_entry_path(b"./a/b/"), Ok(below(&["a", "b"])));
        assert_eq!(parse_entry_path(b"a//./b"), Ok(below(&["a", "b"])));
        assert_eq!(parse_entry_path(b"/"), Ok(EntryPath::Root));
        assert_eq!(parse_entry_path(b"./"), Ok(EntryPath::Root));
        assert!(parse_entry_path(b"/etc/passwd").is_err());
        assert!(parse_entry_path(b"../x").is_err());
        assert!(parse_entry_path(b"a/../../x").is_err());
        assert!(parse_entry_path(b"a/..").is_err());
    }

    #[test]
    fn pax_times() {
        let t = parse_pax_time("1700000000.25").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
            Duration::new(1_700_000_000, 250_000_000)
        );
        assert!(parse_pax_time("-5").is_none());
        assert!(parse_pax_time("x").is_none());
    }
}
