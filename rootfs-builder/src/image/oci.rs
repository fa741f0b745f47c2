//! OCI image layouts (a directory, or a tar of one): `index.json` → (nested
//! indexes →) one image manifest → config and layers.

use oci_spec::image::{Arch, Descriptor, ImageIndex, ImageManifest, Os};

use super::digest::BlobDigest;
use super::error::ImageError;
use super::resolve::{config_and_layers, parse_digest, parse_json, read_verified, Resolved};
use super::store::Store;

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Nested indexes deeper than this are refused (they could loop).
const MAX_INDEX_DEPTH: usize = 4;

/// True when `store` looks like an OCI layout.
pub fn is_layout(store: &Store) -> bool {
    store.exists("index.json") && store.exists("oci-layout")
}

pub fn resolve(store: &Store, reference: Option<&str>) -> Result<Resolved, ImageError> {
    let layout = store.read_small("oci-layout", "oci-layout file")?;
    let layout: serde_json::Value = parse_json(store, &layout, "oci-layout file")?;
    if layout.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
        tracing::warn!(image = %store.path().display(), "unexpected imageLayoutVersion in oci-layout: {layout}");
    }
    let index = store.read_small("index.json", "index.json")?;
    let index: ImageIndex = parse_json(store, &index, "index.json")?;
    let mut descriptor = select(store, index.manifests(), reference, "index.json")?;
    for _ in 0..MAX_INDEX_DEPTH {
        let digest = descriptor_digest(store, &descriptor)?;
        let bytes = read_verified(
            store,
            &digest.blob_path(),
            &digest,
            Some(descriptor.size()),
            "manifest",
        )?;
        let what = format!("manifest {digest}");
        let value: serde_json::Value = parse_json(store, &bytes, &what)?;
        if value.get("manifests").is_some() {
            // A nested index (multi-platform image): pick the platform.
            let index: ImageIndex = parse_json(store, &bytes, &what)?;
            descriptor = select(store, index.manifests(), None, &what)?;
            continue;
        }
        let manifest: ImageManifest = parse_json(store, &bytes, &what)?;
        return from_manifest(store, &manifest, digest);
    }
    Err(ImageError::Invalid {
        image: store.path().to_path_buf(),
        what: "index.json".into(),
        reason: format!("image indexes nest deeper than {MAX_INDEX_DEPTH} levels"),
    })
}

fn from_manifest(
    store: &Store,
    manifest: &ImageManifest,
    manifest_digest: BlobDigest,
) -> Result<Resolved, ImageError> {
    let config = manifest.config();
    let config_digest = descriptor_digest(store, config)?;
    let config_bytes = read_verified(
        store,
        &config_digest.blob_path(),
        &config_digest,
        Some(config.size()),
        "image config",
    )?;
    let mut blobs = Vec::new();
    for (i, layer) in manifest.layers().iter().enumerate() {
        let media_type = layer.media_type().to_string();
        if media_type.contains("encrypted") {
            return Err(ImageError::Invalid {
                image: store.path().to_path_buf(),
                what: format!("manifest {manifest_digest} layer {i}"),
                reason: format!("unsupported layer media type {media_type}"),
            });
        }
        let digest = descriptor_digest(store, layer)?;
        blobs.push((digest.blob_path(), Some(digest), Some(layer.size())));
    }
    let (config, layers) = config_and_layers(store, &config_bytes, blobs)?;
    Ok(Resolved {
        config,
        layers,
        id: manifest_digest.to_string(),
    })
}

fn descriptor_digest(store: &Store, descriptor: &Descriptor) -> Result<BlobDigest, ImageError> {
    parse_digest(
        store,
        descriptor.digest().as_ref(),
        &format!("descriptor of {}", descriptor.media_type()),
    )
}

fn ref_names(descriptor: &Descriptor) -> Vec<&str> {
    let Some(annotations) = descriptor.annotations() else {
        return Vec::new();
    };
    [REF_NAME, CONTAINERD_NAME]
        .iter()
        .filter_map(|key| annotations.get(*key).map(String::as_str))
        .collect()
}

fn describe(descriptor: &Descriptor) -> String {
    let mut text = descriptor.digest().to_string();
    let names = ref_names(descriptor);
    if !names.is_empty() {
        text = format!("{} ({text})", names.join(", "));
    }
    if let Some(platform) = descriptor.platform() {
        text = format!("{text} [{}/{}]", platform.os(), platform.architecture());
    }
    text
}

/// Picks one manifest: the one `reference` names (by ref name annotation or
/// digest), then among several the linux/amd64 one.
fn select(
    store: &Store,
    manifests: &[Descriptor],
    reference: Option<&str>,
    what: &str,
) -> Result<Descriptor, ImageError> {
    let no_manifest = |reason: String| ImageError::NoManifest {
        image: store.path().to_path_buf(),
        reason,
    };
    let all: Vec<String> = manifests.iter().map(describe).collect();
    let mut candidates: Vec<&Descriptor> = manifests.iter().collect();
    if let Some(reference) = reference {
        candidates
            .retain(|d| ref_names(d).contains(&reference) || d.digest().to_string() == reference);
        if candidates.is_empty() {
            return Err(no_manifest(format!(
                "no manifest named {reference:?} in {what} (it has: {})",
                list(&all)
            )));
        }
    }
    if candidates.is_empty() {
        return Err(no_manifest(format!("{what} lists no manifests")));
    }
    if candidates.len() > 1 {
        let amd64: Vec<&Descriptor> = candidates
            .iter()
            .copied()
            .filter(|d| {
                d.platform()
                    .as_ref()
                    .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
            })
            .collect();
        let unspecified: Vec<&Descriptor> = candidates
            .iter()
            .copied()
            .filter(|d| d.platform().is_none())
            .collect();
        candidates = if !amd64.is_empty() {
            amd64
        } else if candidates.iter().all(|d| d.platform().is_some()) {
            return Err(no_manifest(format!(
                "no linux/amd64 manifest in {what} (it has: {})",
                list(&all)
            )));
        } else {
            unspecified
        };
    }
    match candidates.as_slice() {
        [one] => Ok((*one).clone()),
        several => Err(no_manifest(format!(
            "{what} has {} manifests that fit; choose one with --ref ({})",
            several.len(),
            list(&several.iter().map(|d| describe(d)).collect::<Vec<_>>())
        ))),
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".into()
    } else {
        items.join("; ")
    }
}
