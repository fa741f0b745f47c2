//! What reading an image's metadata yields, whatever its format: the config
//! and the layers to unpack, in order, with what each must hash to.

use oci_spec::image::{Arch, ImageConfiguration, Os};

use super::digest::{digest_of, BlobDigest};
use super::error::ImageError;
use super::store::Store;

/// One layer of a resolved image.
#[derive(Clone, Debug)]
pub struct LayerBlob {
    /// Where the blob is in the store.
    pub name: String,
    /// What the blob itself must hash to, when something names it (always
    /// for OCI; for docker-archive only when the file is named by digest).
    pub digest: Option<BlobDigest>,
    /// The blob's size from its descriptor (OCI only).
    pub size: Option<u64>,
    /// What the uncompressed tar must hash to (the config's `rootfs.diff_ids`).
    pub diff_id: BlobDigest,
}

impl LayerBlob {
    /// A short name for messages: "layer 2/3 (sha256:...)".
    pub fn label(&self, index: usize, count: usize) -> String {
        let id = match &self.digest {
            Some(digest) => digest.to_string(),
            None => self.name.clone(),
        };
        format!("layer {}/{count} ({id})", index + 1)
    }
}

/// An image's metadata, verified.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub config: ImageConfiguration,
    pub layers: Vec<LayerBlob>,
    /// The manifest's digest (OCI) or the config's name (docker-archive).
    pub id: String,
}

/// Reads a blob whole and checks its size and digest.
pub fn read_verified(
    store: &Store,
    name: &str,
    digest: &BlobDigest,
    size: Option<u64>,
    what: &str,
) -> Result<Vec<u8>, ImageError> {
    let what = format!("{what} {digest}");
    let data = store.read_small(name, &what)?;
    if let Some(expected) = size {
        if data.len() as u64 != expected {
            return Err(ImageError::SizeMismatch {
                image: store.path().to_path_buf(),
                what,
                expected,
                actual: data.len() as u64,
            });
        }
    }
    let actual = digest_of(digest.algorithm(), &data);
    if actual != digest.to_string() {
        return Err(ImageError::DigestMismatch {
            image: store.path().to_path_buf(),
            what,
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(data)
}

pub fn parse_json<T: serde::de::DeserializeOwned>(
    store: &Store,
    data: &[u8],
    what: &str,
) -> Result<T, ImageError> {
    serde_json::from_slice(data).map_err(|source| ImageError::Json {
        image: store.path().to_path_buf(),
        what: what.to_string(),
        source,
    })
}

pub fn parse_digest(store: &Store, digest: &str, what: &str) -> Result<BlobDigest, ImageError> {
    BlobDigest::parse(digest).map_err(|reason| ImageError::Invalid {
        image: store.path().to_path_buf(),
        what: what.to_string(),
        reason,
    })
}

/// Parses the image config and pairs its diff IDs with the layer blobs.
pub fn config_and_layers(
    store: &Store,
    config_bytes: &[u8],
    blobs: Vec<(String, Option<BlobDigest>, Option<u64>)>,
) -> Result<(ImageConfiguration, Vec<LayerBlob>), ImageError> {
    let config: ImageConfiguration = parse_json(store, config_bytes, "image config")?;
    check_platform(store, &config)?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != blobs.len() {
        return Err(ImageError::Invalid {
            image: store.path().to_path_buf(),
            what: "image config".into(),
            reason: format!(
                "rootfs.diff_ids lists {} layers but the manifest has {}",
                diff_ids.len(),
                blobs.len()
            ),
        });
    }
    let mut layers = Vec::with_capacity(blobs.len());
    for (i, ((name, digest, size), diff_id)) in blobs.into_iter().zip(diff_ids).enumerate() {
        let diff_id = parse_digest(store, diff_id, &format!("image config diff_ids[{i}]"))?;
        layers.push(LayerBlob {
            name,
            digest,
            size,
            diff_id,
        });
    }
    Ok((config, layers))
}

/// Our guests are linux/amd64: refuse an image built for anything else.
fn check_platform(store: &Store, config: &ImageConfiguration) -> Result<(), ImageError> {
    if *config.os() != Os::Linux || *config.architecture() != Arch::Amd64 {
        return Err(ImageError::Invalid {
            image: store.path().to_path_buf(),
            what: "image config".into(),
            reason: format!(
                "the image is for {}/{}, microVM guests run linux/amd64",
                config.os(),
                config.architecture()
            ),
        });
    }
    Ok(())
}
