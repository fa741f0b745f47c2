//! A writer (and a small reader) for "newc" cpio archives, the format the
//! Linux kernel unpacks as an initramfs.
//!
//! The writer is deterministic: entries are written sorted by path, every
//! entry has uid/gid 0 and mtime 0, and inode numbers are assigned in write
//! order. Two archives built from the same entries are byte-identical.
//! Missing parent directories are added (mode 0755).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("invalid archive path {0:?}: must be relative, without '.', '..' or empty components")]
    InvalidPath(String),
    #[error("{path:?} is added twice to the archive")]
    Duplicate { path: String },
    #[error("{path:?} is a {kind} but must be a directory to hold other entries")]
    NotADirectory { path: String, kind: &'static str },
    #[error("cannot read {path}")]
    ReadSource { path: PathBuf, source: io::Error },
    #[error("{path} changed size while it was archived (expected {expected} bytes, got {actual})")]
    SourceChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{0} is larger than the 4 GiB a newc entry can hold")]
    TooLarge(String),
    #[error("malformed cpio archive: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Where a regular file's contents come from.
#[derive(Debug, Clone)]
enum FileData {
    Bytes(Vec<u8>),
    /// Read from the host when the archive is written.
    HostFile(PathBuf),
}

#[derive(Debug, Clone)]
enum Node {
    Dir,
    File(FileData),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
    BlockDev { major: u32, minor: u32 },
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::Dir => "directory",
            Node::File(_) => "file",
            Node::Symlink(_) => "symlink",
            Node::CharDev { .. } => "character device",
            Node::BlockDev { .. } => "block device",
        }
    }

    fn type_bits(&self) -> u32 {
        match self {
            Node::Dir => S_IFDIR,
            Node::File(_) => S_IFREG,
            Node::Symlink(_) => S_IFLNK,
            Node::CharDev { .. } => S_IFCHR,
            Node::BlockDev { .. } => S_IFBLK,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    node: Node,
    permissions: u32,
}

/// An initramfs under construction.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

/// Turns "/a/b" or "a/b/" into "a/b", rejecting anything that could escape
/// the archive root.
fn normalize(path: &str) -> Result<String, CpioError> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return Err(CpioError::InvalidPath(path.to_string()));
    }
    for component in trimmed.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return Err(CpioError::InvalidPath(path.to_string()));
        }
    }
    Ok(trimmed.to_string())
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries, including implied parent directories.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn insert(&mut self, path: &str, node: Node, permissions: u32) -> Result<(), CpioError> {
        let path = normalize(path)?;
        // Make sure every ancestor exists and is a directory.
        let mut end = 0;
        while let Some(pos) = path[end..].find('/') {
            let parent = &path[..end + pos];
            match self.entries.get(parent) {
                Some(Entry {
                    node: Node::Dir, ..
                }) => {}
                Some(other) => {
                    return Err(CpioError::NotADirectory {
                        path: parent.to_string(),
                        kind: other.node.kind(),
                    })
                }
                None => {
                    self.entries.insert(
                        parent.to_string(),
                        Entry {
                            node: Node::Dir,
                            permissions: 0o755,
                        },
                    );
                }
            }
            end += pos + 1;
        }
        match self.entries.get_mut(&path) {
            // An explicit directory may restate one that was implied.
            Some(existing) if matches!((&existing.node, &node), (Node::Dir, Node::Dir)) => {
                existing.permissions = permissions & 0o7777;
                Ok(())
            }
            Some(_) => Err(CpioError::Duplicate { path }),
            None => {
                self.entries.insert(
                    path,
                    Entry {
                        node,
                        permissions: permissions & 0o7777,
                    },
                );
                Ok(())
            }
        }
    }

    pub fn add_dir(&mut self, path: &str, permissions: u32) -> Result<(), CpioError> {
        self.insert(path, Node::Dir, permissions)
    }

    pub fn add_file(
        &mut self,
        path: &str,
        permissions: u32,
        contents: impl Into<Vec<u8>>,
    ) -> Result<(), CpioError> {
        self.insert(
            path,
            Node::File(FileData::Bytes(contents.into())),
            permissions,
        )
    }

    /// Adds a host file, read when the archive is written. The permissions
    /// are taken from the host file.
    pub fn add_host_file(&mut self, path: &str, source: &Path) -> Result<(), CpioError> {
        let metadata = std::fs::metadata(source).map_err(|source_err| CpioError::ReadSource {
            path: source.to_path_buf(),
            source: source_err,
        })?;
        if !metadata.is_file() {
            return Err(CpioError::ReadSource {
                path: source.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        use std::os::unix::fs::PermissionsExt;
        let permissions = metadata.permissions().mode();
        self.insert(
            path,
            Node::File(FileData::HostFile(source.to_path_buf())),
            permissions,
        )
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.insert(path, Node::Symlink(target.to_string()), 0o777)
    }

    pub fn add_char_device(
        &mut self,
        path: &str,
        permissions: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.insert(path, Node::CharDev { major, minor }, permissions)
    }

    pub fn add_block_device(
        &mut self,
        path: &str,
        permissions: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.insert(path, Node::BlockDev { major, minor }, permissions)
    }

    /// Writes the archive to `out`.
    pub fn write_to(&self, out: &mut impl Write) -> Result<(), CpioError> {
        let mut writer = CountingWriter {
            inner: out,
            written: 0,
        };
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let mode = entry.node.type_bits() | entry.permissions;
            let (rdev_major, rdev_minor) = match entry.node {
                Node::CharDev { major, minor } | Node::BlockDev { major, minor } => (major, minor),
                _ => (0, 0),
            };
            let nlink = if matches!(entry.node, Node::Dir) {
                2
            } else {
                1
            };
            match &entry.node {
                Node::File(FileData::Bytes(bytes)) => {
                    let size = size_u32(path, bytes.len() as u64)?;
                    write_header(
                        &mut writer,
                        ino,
                        mode,
                        nlink,
                        size,
                        rdev_major,
                        rdev_minor,
                        path,
                    )?;
                    writer.write_all(bytes)?;
                }
                Node::File(FileData::HostFile(source)) => {
                    let read_err = |e| CpioError::ReadSource {
                        path: source.clone(),
                        source: e,
                    };
                    let mut file = File::open(source).map_err(read_err)?;
                    let expected = file.metadata().map_err(read_err)?.len();
                    let size = size_u32(path, expected)?;
                    write_header(
                        &mut writer,
                        ino,
                        mode,
                        nlink,
                        size,
                        rdev_major,
                        rdev_minor,
                        path,
                    )?;
                    let actual =
                        io::copy(&mut (&mut file).take(expected), &mut writer).map_err(read_err)?;
                    if actual != expected {
                        return Err(CpioError::SourceChanged {
                            path: source.clone(),
                            expected,
                            actual,
                        });
                    }
                }
                Node::Symlink(target) => {
                    let size = size_u32(path, target.len() as u64)?;
                    write_header(
                        &mut writer,
                        ino,
                        mode,
                        nlink,
                        size,
                        rdev_major,
                        rdev_minor,
                        path,
                    )?;
                    writer.write_all(target.as_bytes())?;
                }
                Node::Dir | Node::CharDev { .. } | Node::BlockDev { .. } => {
                    write_header(
                        &mut writer,
                        ino,
                        mode,
                        nlink,
                        0,
                        rdev_major,
                        rdev_minor,
                        path,
                    )?;
                }
            }
            writer.pad4()?;
        }
        write_header(&mut writer, 0, 0, 1, 0, 0, 0, TRAILER)?;
        writer.pad4()?;
        writer.flush()?;
        Ok(())
    }

    /// Writes the archive to a file at `path` (replaced atomically).
    pub fn write_file(&self, path: &Path) -> Result<(), CpioError> {
        let tmp = path.with_extension("partial");
        let result = (|| {
            let mut out = BufWriter::new(File::create(&tmp)?);
            self.write_to(&mut out)?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn size_u32(path: &str, size: u64) -> Result<u32, CpioError> {
    u32::try_from(size).map_err(|_| CpioError::TooLarge(path.to_string()))
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    written: u64,
}

impl<W: Write> CountingWriter<'_, W> {
    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.write_all(&[0u8; 3][..pad])
    }
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[allow(clippy::too_many_arguments)]
fn write_header<W: Write>(
    out: &mut CountingWriter<'_, W>,
    ino: u32,
    mode: u32,
    nlink: u32,
    file_size: u32,
    rdev_major: u32,
    rdev_minor: u32,
    name: &str,
) -> io::Result<()> {
    let name_size = name.len() as u32 + 1;
    let fields = [
        ino, mode, 0, // uid
        0, // gid
        nlink, 0, // mtime
        file_size, 0, // devmajor
        0, // devminor
        rdev_major, rdev_minor, name_size, 0, // check
    ];
    let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 1);
    header.extend_from_slice(MAGIC);
    for field in fields {
        header.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    header.extend_from_slice(name.as_bytes());
    header.push(0);
    out.write_all(&header)?;
    out.pad4()
}

/// What a parsed archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
    BlockDev { major: u32, minor: u32 },
}

/// One entry read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEntry {
    pub path: String,
    pub permissions: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    pub kind: EntryKind,
}

/// Reads every entry of a newc archive (up to its trailer).
pub fn parse(bytes: &[u8]) -> Result<Vec<ParsedEntry>, CpioError> {
    let bad = |what: String| CpioError::Malformed(what);
    let align = |n: usize| (n + 3) & !3;
    let mut offset = 0usize;
    let mut entries = Vec::new();
    loop {
        let header = bytes
            .get(offset..offset + HEADER_LEN)
            .ok_or_else(|| bad(format!("truncated header at offset {offset}")))?;
        if &header[..6] != MAGIC {
            return Err(bad(format!("bad magic at offset {offset}")));
        }
        let field = |i: usize| -> Result<u32, CpioError> {
            let text = std::str::from_utf8(&header[6 + i * 8..14 + i * 8])
                .map_err(|_| bad(format!("non-ASCII header field at offset {offset}")))?;
            u32::from_str_radix(text, 16)
                .map_err(|_| bad(format!("bad hex field {text:?} at offset {offset}")))
        };
        let mode = field(1)?;
        let (uid, gid, mtime) = (field(2)?, field(3)?, field(5)?);
        let file_size = field(6)? as usize;
        let (rdev_major, rdev_minor) = (field(9)?, field(10)?);
        let name_size = field(11)? as usize;
        if name_size == 0 {
            return Err(bad(format!("empty name at offset {offset}")));
        }
        let name_start = offset + HEADER_LEN;
        let name_bytes = bytes
            .get(name_start..name_start + name_size - 1)
            .ok_or_else(|| bad(format!("truncated name at offset {offset}")))?;
        let path = String::from_utf8(name_bytes.to_vec())
            .map_err(|_| bad(format!("non-UTF-8 name at offset {offset}")))?;
        let data_start = align(name_start + name_size);
        let data = bytes
            .get(data_start..data_start + file_size)
            .ok_or_else(|| bad(format!("truncated data of {path:?}")))?;
        offset = align(data_start + file_size);
        if path == TRAILER {
            return Ok(entries);
        }
        let kind = match mode & S_IFMT {
            S_IFDIR => EntryKind::Dir,
            S_IFREG => EntryKind::File(data.to_vec()),
            S_IFLNK => EntryKind::Symlink(
                String::from_utf8(data.to_vec())
                    .map_err(|_| bad(format!("non-UTF-8 symlink target of {path:?}")))?,
            ),
            S_IFCHR => EntryKind::CharDev {
                major: rdev_major,
                minor: rdev_minor,
            },
            S_IFBLK => EntryKind::BlockDev {
                major: rdev_major,
                minor: rdev_minor,
            },
            other => return Err(bad(format!("unsupported file type {other:o} of {path:?}"))),
        };
        entries.push(ParsedEntry {
            path,
            permissions: mode & 0o7777,
            uid,
            gid,
            mtime,
            kind,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Archive {
        let mut archive = Archive::new();
        archive
            .add_file("bin/init", 0o755, b"#!init".to_vec())
            .unwrap();
        archive.add_symlink("bin/sh", "busybox").unwrap();
        archive.add_char_device("dev/console", 0o600, 5, 1).unwrap();
        archive.add_block_device("dev/vda", 0o660, 254, 0).unwrap();
        archive.add_dir("proc", 0o555).unwrap();
        archive
            .add_file("etc/odd-size", 0o644, vec![7u8; 5])
            .unwrap();
        archive
    }

    fn bytes_of(archive: &Archive) -> Vec<u8> {
        let mut out = Vec::new();
        archive.write_to(&mut out).unwrap();
        out
    }

    #[test]
    fn round_trips_every_kind_of_entry() {
        let entries = parse(&bytes_of(&sample())).unwrap();
        let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/init",
                "bin/sh",
                "dev",
                "dev/console",
                "dev/vda",
                "etc",
                "etc/odd-size",
                "proc"
            ]
        );
        let find = |p: &str| entries.iter().find(|e| e.path == p).unwrap();
        assert_eq!(find("bin").kind, EntryKind::Dir);
        assert_eq!(find("bin").permissions, 0o755);
        assert_eq!(find("bin/init").kind, EntryKind::File(b"#!init".to_vec()));
        assert_eq!(find("bin/sh").kind, EntryKind::Symlink("busybox".into()));
        assert_eq!(
            find("dev/console").kind,
            EntryKind::CharDev { major: 5, minor: 1 }
        );
        assert_eq!(find("dev/console").permissions, 0o600);
        assert_eq!(
            find("dev/vda").kind,
            EntryKind::BlockDev {
                major: 254,
                minor: 0
            }
        );
        assert_eq!(find("proc").permissions, 0o555);
        assert_eq!(find("etc/odd-size").kind, EntryKind::File(vec![7u8; 5]));
        assert!(entries
            .iter()
            .all(|e| e.uid == 0 && e.gid == 0 && e.mtime == 0));
    }

    #[test]
    fn output_is_deterministic_and_aligned() {
        let first = bytes_of(&sample());
        // Same entries added in another order.
        let mut reordered = Archive::new();
        reordered.add_dir("proc", 0o555).unwrap();
        reordered
            .add_file("etc/odd-size", 0o644, vec![7u8; 5])
            .unwrap();
        reordered
            .add_block_device("dev/vda", 0o660, 254, 0)
            .unwrap();
        reordered
            .add_char_device("dev/console", 0o600, 5, 1)
            .unwrap();
        reordered.add_symlink("bin/sh", "busybox").unwrap();
        reordered
            .add_file("bin/init", 0o755, b"#!init".to_vec())
            .unwrap();
        assert_eq!(first, bytes_of(&reordered));
        assert_eq!(first.len() % 4, 0);
    }

    #[test]
    fn host_files_are_read_at_write_time() {
        let dir = std::env::temp_dir().join(format!("cpio-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join("payload");
        std::fs::write(&source, b"first").unwrap();
        let mut archive = Archive::new();
        archive.add_host_file("payload", &source).unwrap();
        std::fs::write(&source, b"second version").unwrap();
        let entries = parse(&bytes_of(&archive)).unwrap();
        assert_eq!(entries[0].kind, EntryKind::File(b"second version".to_vec()));
        let out = dir.join("out.cpio");
        archive.write_file(&out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), bytes_of(&archive));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_paths_that_escape_or_clash() {
        let mut archive = Archive::new();
        for bad in ["", "/", "../etc", "a/../../b", "a//b", "./a"] {
            assert!(
                matches!(archive.add_dir(bad, 0o755), Err(CpioError::InvalidPath(_))),
                "{bad:?} was accepted"
            );
        }
        archive.add_file("a", 0o644, Vec::new()).unwrap();
        assert!(matches!(
            archive.add_file("a", 0o644, Vec::new()),
            Err(CpioError::Duplicate { .. })
        ));
        assert!(matches!(
            archive.add_file("a/b", 0o644, Vec::new()),
            Err(CpioError::NotADirectory { .. })
        ));
        assert!(matches!(
            archive.add_host_file("x", Path::new("/nonexistent/file")),
            Err(CpioError::ReadSource { .. })
        ));
    }

    #[test]
    fn parse_rejects_truncated_archives() {
        let bytes = bytes_of(&sample());
        for cut in [0, 50, 120, bytes.len() - 8] {
            assert!(parse(&bytes[..cut]).is_err(), "cut at {cut} parsed");
        }
    }
}
