//! The one error type of image handling. Every variant names what failed
//! (image path, blob digest, layer, tar entry) so that a message alone tells
//! the user where to look.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ImageError {
    /// An I/O error on a named file or directory of ours or of the image.
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// PATH is neither an OCI layout, an OCI archive nor a docker-archive.
    #[error("{path}: not a container image: {reason}")]
    UnknownFormat { path: PathBuf, reason: String },

    /// A blob or file the image refers to is not there.
    #[error("{image}: {what} is missing (no {location})")]
    Missing {
        image: PathBuf,
        what: String,
        location: String,
    },

    /// A blob whose content does not hash to the digest that names it.
    #[error("{image}: {what}: digest mismatch: expected {expected}, content is {actual}")]
    DigestMismatch {
        image: PathBuf,
        what: String,
        expected: String,
        actual: String,
    },

    /// A blob whose size differs from its descriptor's.
    #[error("{image}: {what}: size mismatch: descriptor says {expected} bytes, blob has {actual}")]
    SizeMismatch {
        image: PathBuf,
        what: String,
        expected: u64,
        actual: u64,
    },

    /// Something in the image's metadata that we cannot or will not use.
    #[error("{image}: {what}: {reason}")]
    Invalid {
        image: PathBuf,
        what: String,
        reason: String,
    },

    /// Malformed JSON (index, manifest, config, docker manifest.json).
    #[error("{image}: {what}: invalid JSON")]
    Json {
        image: PathBuf,
        what: String,
        #[source]
        source: serde_json::Error,
    },

    /// No manifest fits (the reference or platform is not in the image).
    #[error("{image}: {reason}")]
    NoManifest { image: PathBuf, reason: String },

    /// The image archive (OCI archive, docker-archive) ends early.
    #[error("{image}: archive is truncated: {reason}")]
    TruncatedArchive { image: PathBuf, reason: String },

    /// A layer's compressed or tar stream could not be read to its end.
    #[error("{image}: {layer}: reading the layer stream")]
    LayerStream {
        image: PathBuf,
        layer: String,
        #[source]
        source: io::Error,
    },

    /// A tar entry that is refused (path traversal, symlink escape, ...).
    #[error("{image}: {layer}: entry {entry:?}: {reason}")]
    Entry {
        image: PathBuf,
        layer: String,
        entry: String,
        reason: String,
    },

    /// A tar entry that could not be written.
    #[error("{image}: {layer}: entry {entry:?}")]
    EntryIo {
        image: PathBuf,
        layer: String,
        entry: String,
        #[source]
        source: io::Error,
    },

    /// The output directory already exists and is not empty.
    #[error("{path}: already exists and is not empty")]
    OutputExists { path: PathBuf },

    /// No cache directory could be found ($XDG_CACHE_HOME and $HOME unset).
    #[error("no image cache directory: set $XDG_CACHE_HOME or $HOME, or pass one")]
    NoCacheDir,
}

impl ImageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        ImageError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Errors of the image config's process rules ([`super::ImageConfig::process`]).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("no command to run: the image has no Entrypoint or Cmd and none was given")]
    NoCommand,
    #[error("working directory {0:?} is not an absolute path")]
    RelativeWorkingDir(String),
    #[error("environment entry {0:?} is not NAME=VALUE")]
    BadEnv(String),
}
