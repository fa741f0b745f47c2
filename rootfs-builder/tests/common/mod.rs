//! Builders for test images: layer tars (including malicious entries that
//! the `tar` crate's safe API refuses to write), OCI layouts, OCI archives
//! and docker-archives, and a tree snapshot to compare unpacked results.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

pub fn hex(digest: &str) -> &str {
    digest.split_once(':').unwrap().1
}

/// A layer tar under construction.
pub struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

pub const MTIME: u64 = 1_600_000_000;

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, name: &str, mode: u32) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        // Raw name bytes: `set_path` would refuse `..` and absolute paths.
        let name_field = &mut header.as_old_mut().name;
        assert!(name.len() < name_field.len(), "test name too long");
        name_field.fill(0);
        name_field[..name.len()].copy_from_slice(name.as_bytes());
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header.set_size(0);
        header
    }

    pub fn dir(mut self, name: &str, mode: u32) -> Self {
        let mut header = Self::header(tar::EntryType::Directory, name, mode);
        header.set_cksum();
        self.builder.append(&header, &[][..]).unwrap();
        self
    }

    pub fn file(self, name: &str, content: &[u8], mode: u32) -> Self {
        self.file_owned(name, content, mode, 0, 0)
    }

    pub fn file_owned(mut self, name: &str, content: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut header = Self::header(tar::EntryType::Regular, name, mode);
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_size(content.len() as u64);
        header.set_cksum();
        self.builder.append(&header, content).unwrap();
        self
    }

    pub fn symlink(mut self, name: &str, target: &str) -> Self {
        let mut header = Self::header(tar::EntryType::Symlink, name, 0o777);
        header.set_link_name_literal(target).unwrap();
        header.set_cksum();
        self.builder.append(&header, &[][..]).unwrap();
        self
    }

    pub fn hardlink(mut self, name: &str, target: &str) -> Self {
        let mut header = Self::header(tar::EntryType::Link, name, 0o644);
        header.set_link_name_literal(target).unwrap();
        header.set_cksum();
        self.builder.append(&header, &[][..]).unwrap();
        self
    }

    pub fn char_device(mut self, name: &str, major: u32, minor: u32) -> Self {
        let mut header = Self::header(tar::EntryType::Char, name, 0o666);
        header.set_device_major(major).unwrap();
        header.set_device_minor(minor).unwrap();
        header.set_cksum();
        self.builder.append(&header, &[][..]).unwrap();
        self
    }

    pub fn fifo(mut self, name: &str) -> Self {
        let mut header = Self::header(tar::EntryType::Fifo, name, 0o640);
        header.set_cksum();
        self.builder.append(&header, &[][..]).unwrap();
        self
    }

    /// An empty regular file: how whiteouts are written.
    pub fn marker(self, name: &str) -> Self {
        self.file(name, b"", 0o644)
    }

    pub fn tar(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub fn compress(tar: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar).unwrap();
            gz.finish().unwrap()
        }
        #[cfg(feature = "zstd")]
        Compression::Zstd => {
            ruzstd::encoding::compress_to_vec(tar, ruzstd::encoding::CompressionLevel::Fastest)
        }
        #[cfg(not(feature = "zstd"))]
        Compression::Zstd => panic!("built without the zstd feature"),
    }
}

/// The run config part of an image config.
pub fn run_config() -> serde_json::Value {
    serde_json::json!({
        "Entrypoint": ["/bin/entry"],
        "Cmd": ["--serve", "8080"],
        "Env": ["PATH=/usr/bin:/bin", "MODE=test"],
        "WorkingDir": "/srv",
        "User": "1000:1000",
    })
}

pub fn config_json(tars: &[Vec<u8>], arch: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = tars.iter().map(|t| sha256(t)).collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": run_config(),
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

pub fn write_blob(layout: &Path, data: &[u8]) -> (String, u64) {
    let digest = sha256(data);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(hex(&digest)), data).unwrap();
    (digest, data.len() as u64)
}

/// Writes a manifest (and its config and layers) into the layout; returns
/// the manifest descriptor (without annotations or platform).
pub fn write_manifest(
    layout: &Path,
    tars: &[Vec<u8>],
    compression: Compression,
    arch: &str,
) -> serde_json::Value {
    let (config_digest, config_size) = write_blob(layout, &config_json(tars, arch));
    let media_type = match compression {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    };
    let layers: Vec<serde_json::Value> = tars
        .iter()
        .map(|tar| {
            let (digest, size) = write_blob(layout, &compress(tar, compression));
            serde_json::json!({"mediaType": media_type, "digest": digest, "size": size})
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": layers,
    }))
    .unwrap();
    let (digest, size) = write_blob(layout, &manifest);
    serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size})
}

pub fn write_index(layout: &Path, manifests: Vec<serde_json::Value>) {
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

/// An OCI layout with one manifest, tagged `latest`.
pub fn oci_layout(layout: &Path, tars: &[Vec<u8>], compression: Compression) {
    let mut descriptor = write_manifest(layout, tars, compression, "amd64");
    descriptor["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "latest"});
    write_index(layout, vec![descriptor]);
}

/// The blob path of the `i`th layer of the single manifest of a layout.
pub fn layer_blob(layout: &Path, i: usize) -> std::path::PathBuf {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(hex(manifest_digest))).unwrap(),
    )
    .unwrap();
    let digest = manifest["layers"][i]["digest"].as_str().unwrap();
    layout.join("blobs/sha256").join(hex(digest))
}

/// A tar of the layout directory (what `skopeo copy ... oci-archive:` makes).
pub fn oci_archive(layout: &Path, archive: &Path) {
    let mut builder = tar::Builder::new(std::fs::File::create(archive).unwrap());
    builder.append_dir_all(".", layout).unwrap();
    builder.finish().unwrap();
}

fn append_bytes(builder: &mut tar::Builder<std::fs::File>, name: &str, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    builder.append_data(&mut header, name, data).unwrap();
}

/// A `docker save`-style archive, old layout: `<id>/layer.tar`, `<hex>.json`.
pub fn docker_archive(archive: &Path, tars: &[Vec<u8>], tag: &str) {
    let mut builder = tar::Builder::new(std::fs::File::create(archive).unwrap());
    let config = config_json(tars, "amd64");
    let config_name = format!("{}.json", hex(&sha256(&config)));
    append_bytes(&mut builder, &config_name, &config);
    let mut layer_names = Vec::new();
    for (i, tar) in tars.iter().enumerate() {
        let name = format!("{:064x}/layer.tar", i + 1);
        append_bytes(&mut builder, &name, tar);
        layer_names.push(name);
    }
    let manifest =
        serde_json::json!([{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]);
    append_bytes(
        &mut builder,
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    builder.finish().unwrap();
}

/// What is at each path below `root`: kind, mode, content, link target.
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let what = if meta.file_type().is_symlink() {
            format!(
                "symlink -> {}",
                std::fs::read_link(&path).unwrap().display()
            )
        } else if meta.is_dir() {
            walk(root, &path, out);
            format!("dir {mode:o}")
        } else if meta.is_file() {
            format!(
                "file {mode:o} {} {}",
                sha256(&std::fs::read(&path).unwrap()),
                meta.mtime()
            )
        } else {
            format!("other {mode:o} {:x}", meta.rdev())
        };
        out.insert(rel, what);
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
