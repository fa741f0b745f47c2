//! Reading each layer blob once: checking its size, hashing it (compressed
//! digest and uncompressed diff ID) while it is decompressed and applied.
//! A mismatch fails the unpack; the caller throws the directory away.

use std::io::BufReader;
use std::path::Path;

use super::compress::decompress;
use super::digest::{Algorithm, HashingReader};
use super::error::ImageError;
use super::layer::Unpacker;
use super::resolve::LayerBlob;
use super::store::Store;

/// Applies `layers`, in order, to the existing directory `dest`.
pub fn unpack_layers(store: &Store, layers: &[LayerBlob], dest: &Path) -> Result<(), ImageError> {
    let mut unpacker = Unpacker::new(dest, store.path())?;
    for (i, layer) in layers.iter().enumerate() {
        let label = layer.label(i, layers.len());
        tracing::debug!(image = %store.path().display(), "unpacking {label}");
        apply_one(store, layer, &label, &mut unpacker)?;
    }
    unpacker.finish()
}

fn apply_one(
    store: &Store,
    layer: &LayerBlob,
    label: &str,
    unpacker: &mut Unpacker,
) -> Result<(), ImageError> {
    let image = store.path().to_path_buf();
    let (reader, size) = store.open_file(&layer.name, label)?;
    if let Some(expected) = layer.size {
        if size != expected {
            return Err(ImageError::SizeMismatch {
                image,
                what: label.to_string(),
                expected,
                actual: size,
            });
        }
    }
    let stream_error = |source| ImageError::LayerStream {
        image: image.clone(),
        layer: label.to_string(),
        source,
    };
    let algorithm = layer
        .digest
        .as_ref()
        .map_or(Algorithm::Sha256, |d| d.algorithm());
    let mut raw = HashingReader::new(reader, algorithm);
    let diff_digest = {
        let buffered = BufReader::with_capacity(256 * 1024, &mut raw);
        let decoded = decompress(buffered).map_err(stream_error)?;
        let mut diff = HashingReader::new(decoded, layer.diff_id.algorithm());
        unpacker.apply_layer(&mut diff, label)?;
        // The tar's end-of-archive blocks and padding count in the diff ID,
        // and reading to the end checks the compressed stream's trailer.
        diff.drain().map_err(stream_error)?;
        diff.finish().0
    };
    raw.drain().map_err(stream_error)?;
    let (raw_digest, raw_size) = raw.finish();
    if let Some(expected) = layer.size {
        if raw_size != expected {
            return Err(ImageError::SizeMismatch {
                image,
                what: label.to_string(),
                expected,
                actual: raw_size,
            });
        }
    }
    if let Some(expected) = &layer.digest {
        if raw_digest != expected.to_string() {
            return Err(ImageError::DigestMismatch {
                image,
                what: label.to_string(),
                expected: expected.to_string(),
                actual: raw_digest,
            });
        }
    }
    if diff_digest != layer.diff_id.to_string() {
        return Err(ImageError::DigestMismatch {
            image,
            what: format!("{label}: uncompressed content (the config's diff_id)"),
            expected: layer.diff_id.to_string(),
            actual: diff_digest,
        });
    }
    Ok(())
}
