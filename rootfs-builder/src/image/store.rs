//! Where an image's files live: a directory (OCI layout, or an unpacked
//! docker-archive) or a tar archive of one (OCI archive, docker-archive).
//!
//! Archives are never extracted: their entries are indexed once (offsets and
//! sizes, seeking over the data) and blobs are read in place.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::error::ImageError;

/// Metadata files (index, manifests, configs) are read whole; bound them.
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// How many symlinks inside an archive we follow to find one file.
const MAX_ARCHIVE_LINKS: usize = 16;

pub enum Store {
    Dir(PathBuf),
    Tar(TarIndex),
}

pub struct TarIndex {
    path: PathBuf,
    entries: HashMap<String, TarEntry>,
}

enum TarEntry {
    File { offset: u64, size: u64 },
    Link(String),
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, ImageError> {
        let meta = std::fs::metadata(path).map_err(|e| ImageError::io(path, e))?;
        if meta.is_dir() {
            Ok(Store::Dir(path.to_path_buf()))
        } else {
            TarIndex::build(path).map(Store::Tar)
        }
    }

    /// The image path, for messages.
    pub fn path(&self) -> &Path {
        match self {
            Store::Dir(path) => path,
            Store::Tar(index) => &index.path,
        }
    }

    pub fn exists(&self, name: &str) -> bool {
        match self {
            Store::Dir(dir) => clean_name(name).is_some_and(|n| dir.join(n).is_file()),
            Store::Tar(index) => index.lookup(name).is_some(),
        }
    }

    /// Opens `name` (a relative path inside the image) and returns it with
    /// its size. `what` names the file for the error when it is missing.
    pub fn open_file(&self, name: &str, what: &str) -> Result<(Box<dyn Read>, u64), ImageError> {
        let missing = || ImageError::Missing {
            image: self.path().to_path_buf(),
            what: what.to_string(),
            location: name.to_string(),
        };
        let clean = clean_name(name).ok_or_else(|| ImageError::Invalid {
            image: self.path().to_path_buf(),
            what: what.to_string(),
            reason: format!("path {name:?} leaves the image"),
        })?;
        match self {
            Store::Dir(dir) => {
                let path = dir.join(&clean);
                let file = match File::open(&path) {
                    Ok(file) => file,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
                    Err(e) => return Err(ImageError::io(path, e)),
                };
                let meta = file.metadata().map_err(|e| ImageError::io(&path, e))?;
                if !meta.is_file() {
                    return Err(missing());
                }
                Ok((Box::new(file), meta.len()))
            }
            Store::Tar(index) => {
                let (offset, size) = index.lookup(&clean).ok_or_else(missing)?;
                let mut file =
                    File::open(&index.path).map_err(|e| ImageError::io(&index.path, e))?;
                file.seek(SeekFrom::Start(offset))
                    .map_err(|e| ImageError::io(&index.path, e))?;
                Ok((Box::new(file.take(size)), size))
            }
        }
    }

    /// Reads a small file whole (at most [`MAX_JSON_BYTES`]).
    pub fn read_small(&self, name: &str, what: &str) -> Result<Vec<u8>, ImageError> {
        let (reader, size) = self.open_file(name, what)?;
        if size > MAX_JSON_BYTES {
            return Err(ImageError::Invalid {
                image: self.path().to_path_buf(),
                what: what.to_string(),
                reason: format!("{size} bytes is too large for metadata"),
            });
        }
        let mut data = Vec::with_capacity(size as usize);
        reader
            .take(MAX_JSON_BYTES)
            .read_to_end(&mut data)
            .map_err(|e| ImageError::io(self.path().join(name), e))?;
        Ok(data)
    }
}

impl TarIndex {
    fn build(path: &Path) -> Result<TarIndex, ImageError> {
        let not_tar = |reason: String| ImageError::UnknownFormat {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = File::open(path).map_err(|e| ImageError::io(path, e))?;
        let len = file.metadata().map_err(|e| ImageError::io(path, e))?.len();
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic).map_err(|e| ImageError::io(path, e))?;
        if n >= 2 && magic[..2] == [0x1f, 0x8b] {
            return Err(not_tar(
                "a gzip-compressed file; decompress it first (gunzip)".into(),
            ));
        }
        if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
            return Err(not_tar(
                "a zstd-compressed file; decompress it first (unzstd)".into(),
            ));
        }
        file.seek(SeekFrom::Start(0))
            .map_err(|e| ImageError::io(path, e))?;

        let mut entries = HashMap::new();
        let mut archive = tar::Archive::new(file);
        let iter = archive.entries_with_seek().map_err(|e| {
            not_tar(format!(
                "neither a directory nor a readable tar archive ({e})"
            ))
        })?;
        for entry in iter {
            let entry = entry.map_err(|e| ImageError::TruncatedArchive {
                image: path.to_path_buf(),
                reason: format!("reading the tar headers: {e}"),
            })?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some(clean) = clean_name(&name) else {
                // Such an entry can never be referenced by us: skip it.
                continue;
            };
            let kind = entry.header().entry_type();
            if kind.is_file() || kind.is_contiguous() {
                let offset = entry.raw_file_position();
                let size = entry.size();
                if offset.saturating_add(size) > len {
                    return Err(ImageError::TruncatedArchive {
                        image: path.to_path_buf(),
                        reason: format!(
                            "entry {name:?} needs bytes {offset}..{} but the file has {len}",
                            offset + size
                        ),
                    });
                }
                entries.insert(clean, TarEntry::File { offset, size });
            } else if kind.is_symlink() || kind.is_hard_link() {
                let Some(target) = entry.link_name_bytes() else {
                    continue;
                };
                let target = String::from_utf8_lossy(&target).into_owned();
                // Symlinks are relative to their directory; hard links to the root.
                let resolved = if kind.is_symlink() && !target.starts_with('/') {
                    match clean.rsplit_once('/') {
                        Some((dir, _)) => format!("{dir}/{target}"),
                        None => target,
                    }
                } else {
                    target
                };
                if let Some(resolved) = clean_name(&resolved) {
                    entries.insert(clean, TarEntry::Link(resolved));
                }
            }
        }
        if entries.is_empty() {
            return Err(not_tar("an empty or unreadable tar archive".into()));
        }
        Ok(TarIndex {
            path: path.to_path_buf(),
            entries,
        })
    }

    fn lookup(&self, name: &str) -> Option<(u64, u64)> {
        let mut name = clean_name(name)?;
        for _ in 0..MAX_ARCHIVE_LINKS {
            match self.entries.get(&name)? {
                TarEntry::File { offset, size } => return Some((*offset, *size)),
                TarEntry::Link(target) => name = target.clone(),
            }
        }
        None
    }
}

/// Normalizes a path inside an image (`./a//b/../c` → `a/c`); `None` when it
/// climbs above the top or names the top itself. Paths here are names in an
/// archive or layout, resolved lexically, never against the host.
pub fn clean_name(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_names() {
        assert_eq!(clean_name("./index.json").as_deref(), Some("index.json"));
        assert_eq!(clean_name("/a//b/./c").as_deref(), Some("a/b/c"));
        assert_eq!(clean_name("a/../b").as_deref(), Some("b"));
        assert_eq!(clean_name("../etc/passwd"), None);
        assert_eq!(clean_name("a/../../b"), None);
        assert_eq!(clean_name("./"), None);
    }
}
