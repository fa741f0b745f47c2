//! docker-archive (`docker save`, `skopeo copy ... docker-archive:`):
//! `manifest.json` lists, per image, the config file and the layer tars.
//!
//! Nothing in `manifest.json` carries a digest, so: the config is checked
//! against its file name when that is a digest (`<hex>.json`,
//! `blobs/sha256/<hex>`), layers likewise, and every layer's uncompressed
//! content is checked against the config's `rootfs.diff_ids` while unpacking.

use serde::Deserialize;

use super::digest::BlobDigest;
use super::error::ImageError;
use super::resolve::{config_and_layers, parse_json, read_verified, Resolved};
use super::store::Store;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

pub fn is_archive(store: &Store) -> bool {
    store.exists("manifest.json")
}

pub fn resolve(store: &Store, reference: Option<&str>) -> Result<Resolved, ImageError> {
    let bytes = store.read_small("manifest.json", "manifest.json")?;
    let entries: Vec<Entry> = parse_json(store, &bytes, "manifest.json")?;
    let entry = select(store, &entries, reference)?;

    let config_bytes = match digest_in_name(&entry.config) {
        Some(digest) => read_verified(store, &entry.config, &digest, None, "image config")?,
        None => store.read_small(&entry.config, "image config")?,
    };
    let blobs = entry
        .layers
        .iter()
        .map(|name| {
            (
                name.clone(),
                digest_in_name(name).filter(|_| name.starts_with("blobs/")),
                None,
            )
        })
        .collect();
    let (config, layers) = config_and_layers(store, &config_bytes, blobs)?;
    Ok(Resolved {
        config,
        layers,
        id: entry.config.clone(),
    })
}

fn select<'a>(
    store: &Store,
    entries: &'a [Entry],
    reference: Option<&str>,
) -> Result<&'a Entry, ImageError> {
    let tags = |e: &Entry| e.repo_tags.clone().unwrap_or_default();
    let all: Vec<String> = entries
        .iter()
        .map(|e| match tags(e).as_slice() {
            [] => e.config.clone(),
            tags => tags.join(", "),
        })
        .collect();
    let matching: Vec<&Entry> = match reference {
        Some(reference) => entries
            .iter()
            .filter(|e| {
                e.config == reference || tags(e).iter().any(|t| same_reference(t, reference))
            })
            .collect(),
        None => entries.iter().collect(),
    };
    match matching.as_slice() {
        [one] => Ok(one),
        [] => Err(ImageError::NoManifest {
            image: store.path().to_path_buf(),
            reason: match reference {
                Some(reference) => format!(
                    "no image tagged {reference:?} in manifest.json (it has: {})",
                    all.join("; ")
                ),
                None => "manifest.json lists no images".into(),
            },
        }),
        _ => Err(ImageError::NoManifest {
            image: store.path().to_path_buf(),
            reason: format!(
                "manifest.json has {} images; choose one with --ref ({})",
                matching.len(),
                all.join("; ")
            ),
        }),
    }
}

/// `docker.io/library/busybox:latest` is also `library/busybox:latest`,
/// `busybox:latest` and `busybox`.
fn same_reference(tag: &str, reference: &str) -> bool {
    fn normalize(name: &str) -> String {
        let name = name.strip_prefix("docker.io/").unwrap_or(name);
        let name = name.strip_prefix("library/").unwrap_or(name);
        let last = name.rsplit('/').next().unwrap_or(name);
        if last.contains(':') || last.contains('@') {
            name.to_string()
        } else {
            format!("{name}:latest")
        }
    }
    tag == reference || normalize(tag) == normalize(reference)
}

/// `<hex>.json`, `<hex>.tar` or `blobs/sha256/<hex>` name their content's digest.
fn digest_in_name(name: &str) -> Option<BlobDigest> {
    if let Some(rest) = name.strip_prefix("blobs/") {
        let (algorithm, hex) = rest.split_once('/')?;
        return BlobDigest::parse(&format!("{algorithm}:{hex}")).ok();
    }
    let stem = name
        .strip_suffix(".json")
        .or_else(|| name.strip_suffix(".tar"))?;
    if stem.contains('/') {
        return None;
    }
    BlobDigest::parse(&format!("sha256:{stem}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert!(same_reference(
            "docker.io/library/busybox:latest",
            "busybox"
        ));
        assert!(same_reference(
            "docker.io/library/busybox:latest",
            "busybox:latest"
        ));
        assert!(!same_reference(
            "docker.io/library/busybox:latest",
            "busybox:1"
        ));
        assert!(same_reference("quay.io/a/b:1", "quay.io/a/b:1"));
        assert!(!same_reference("quay.io/a/b:1", "b:1"));
    }

    #[test]
    fn digests_in_names() {
        let hex = "0123456789abcdef".repeat(4);
        assert!(digest_in_name(&format!("{hex}.json")).is_some());
        assert!(digest_in_name(&format!("blobs/sha256/{hex}")).is_some());
        assert!(digest_in_name(&format!("{hex}/layer.tar")).is_none());
        assert!(digest_in_name("config.json").is_none());
    }
}
