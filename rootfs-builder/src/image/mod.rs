//! Container images from local files: an OCI image layout directory, an OCI
//! archive (a tar of one) or a docker-archive (`docker save`).
//!
//! [`Image::open`] finds the image (index → manifest, choosing by `--ref` or
//! linux/amd64) and reads its config, checking every blob it reads against
//! its digest and size. [`Image::unpack_to`] and [`Image::unpack_cached`]
//! apply the layers in order to a fresh directory, verifying each layer's
//! digest and diff ID as it streams, confined to that directory (see
//! [`layer`]). [`prepare`] is the one call a runtime needs: a cached rootfs
//! directory plus the image's run config.
//!
//! ```no_run
//! use rootfs_builder::image::{prepare, Overrides};
//! let image = prepare("busybox-oci".as_ref(), None, None)?;
//! let process = image.config.process(&Overrides::default())?;
//! println!("{} runs {:?}", image.rootfs.display(), process.args);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cache;
mod compress;
mod config;
mod digest;
mod docker;
mod error;
mod fs;
pub mod layer;
mod oci;
mod resolve;
mod store;
mod unpack;
mod user;

use std::path::{Path, PathBuf};

pub use cache::{default_cache_dir, CACHE_ENV};
pub use config::{ImageConfig, Overrides, ProcessSpec, DEFAULT_PATH};
pub use digest::chain_id;
pub use error::{ConfigError, ImageError};
pub use user::{resolve_user, ResolvedUser, UserError};

pub(crate) use fs::remove_tree;

use resolve::Resolved;
use store::Store;

/// The formats [`Image::open`] understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// An OCI image layout directory.
    OciLayout,
    /// A tar of an OCI image layout.
    OciArchive,
    /// A `docker save` tarball.
    DockerArchive,
    /// A `docker save` tarball, unpacked.
    DockerDirectory,
}

/// An image found and its metadata verified; layers are read on unpack.
pub struct Image {
    store: Store,
    resolved: Resolved,
    config: ImageConfig,
    format: Format,
    chain_id: Option<String>,
}

/// A rootfs ready to use, and how the image wants to be run.
#[derive(Clone, Debug)]
pub struct PreparedImage {
    /// The unpacked rootfs (in the cache: treat it as read-only, e.g. as
    /// the lower layer of an overlay, or copy it).
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    /// The layers' chain ID (`sha256:...`), `None` for an image without layers.
    pub chain_id: Option<String>,
    /// True when the rootfs was already in the cache.
    pub cache_hit: bool,
}

/// Opens the image at `path` (choosing the manifest named `reference`, if
/// given) and returns its rootfs from the cache at `cache_dir` (default:
/// [`default_cache_dir`]), unpacking it there first if needed.
pub fn prepare(
    path: &Path,
    reference: Option<&str>,
    cache_dir: Option<&Path>,
) -> Result<PreparedImage, ImageError> {
    let image = Image::open(path, reference)?;
    let cache_dir = match cache_dir {
        Some(dir) => dir.to_path_buf(),
        None => default_cache_dir()?,
    };
    let (rootfs, cache_hit) = image.unpack_cached(&cache_dir)?;
    Ok(PreparedImage {
        rootfs,
        config: image.config.clone(),
        chain_id: image.chain_id.clone(),
        cache_hit,
    })
}

impl Image {
    /// Finds the image at `path` and verifies its index, manifest and config.
    pub fn open(path: &Path, reference: Option<&str>) -> Result<Image, ImageError> {
        let store = Store::open(path)?;
        let is_dir = matches!(store, Store::Dir(_));
        let (resolved, format) = if oci::is_layout(&store) {
            let format = if is_dir {
                Format::OciLayout
            } else {
                Format::OciArchive
            };
            (oci::resolve(&store, reference)?, format)
        } else if docker::is_archive(&store) {
            let format = if is_dir {
                Format::DockerDirectory
            } else {
                Format::DockerArchive
            };
            (docker::resolve(&store, reference)?, format)
        } else {
            return Err(ImageError::UnknownFormat {
                path: path.to_path_buf(),
                reason: "no oci-layout and index.json (OCI layout) and no manifest.json (docker-archive)".into(),
            });
        };
        let config = ImageConfig::from(&resolved.config);
        let diff_ids: Vec<String> = resolved
            .layers
            .iter()
            .map(|l| l.diff_id.to_string())
            .collect();
        let chain_id = chain_id(diff_ids.iter().map(String::as_str));
        tracing::debug!(
            image = %path.display(),
            ?format,
            id = %resolved.id,
            layers = resolved.layers.len(),
            "opened image"
        );
        Ok(Image {
            store,
            resolved,
            config,
            format,
            chain_id,
        })
    }

    pub fn path(&self) -> &Path {
        self.store.path()
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// How the image wants to be run.
    pub fn config(&self) -> &ImageConfig {
        &self.config
    }

    /// The manifest digest (OCI) or config file name (docker-archive).
    pub fn id(&self) -> &str {
        &self.resolved.id
    }

    pub fn layer_count(&self) -> usize {
        self.resolved.layers.len()
    }

    /// The chain ID of the layers (`sha256:...`): what the cache is keyed by.
    pub fn chain_id(&self) -> Option<&str> {
        self.chain_id.as_deref()
    }

    /// The cache entry name: the chain ID's hex, or `empty` for no layers.
    pub fn cache_key(&self) -> String {
        match &self.chain_id {
            Some(id) => id
                .split_once(':')
                .map_or(id.as_str(), |(_, hex)| hex)
                .to_string(),
            None => "empty".into(),
        }
    }

    /// Unpacks the layers into `out`, which must not exist or be an empty
    /// directory. On any error nothing is left at `out`.
    pub fn unpack_to(&self, out: &Path) -> Result<(), ImageError> {
        if let Ok(mut entries) = std::fs::read_dir(out) {
            if entries.next().is_some() {
                return Err(ImageError::OutputExists {
                    path: out.to_path_buf(),
                });
            }
        } else if std::fs::symlink_metadata(out).is_ok() {
            return Err(ImageError::OutputExists {
                path: out.to_path_buf(),
            });
        }
        let placed = cache::build_atomically(out, |dir| self.unpack_into(dir))?;
        if !placed {
            return Err(ImageError::OutputExists {
                path: out.to_path_buf(),
            });
        }
        Ok(())
    }

    /// Returns the rootfs for this image's layers from `cache_dir`,
    /// unpacking it there first when missing; the flag says it was a hit.
    pub fn unpack_cached(&self, cache_dir: &Path) -> Result<(PathBuf, bool), ImageError> {
        let entry = cache_dir.join(self.cache_key());
        let rootfs = entry.join("rootfs");
        if std::fs::symlink_metadata(&rootfs).is_ok_and(|m| m.is_dir()) {
            tracing::debug!(rootfs = %rootfs.display(), "image cache hit");
            return Ok((rootfs, true));
        }
        cache::create_private_dir(cache_dir)?;
        cache::remove_stale_temps(cache_dir);
        let started = std::time::Instant::now();
        cache::build_atomically(&entry, |dir| {
            let rootfs = dir.join("rootfs");
            std::fs::create_dir(&rootfs).map_err(|e| ImageError::io(&rootfs, e))?;
            self.unpack_into(&rootfs)?;
            let about = serde_json::json!({
                "chain_id": self.chain_id,
                "image": self.path(),
                "id": self.id(),
                "layers": self.resolved.layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
            });
            let about_path = dir.join("image.json");
            std::fs::write(&about_path, about.to_string())
                .map_err(|e| ImageError::io(about_path, e))
        })?;
        tracing::info!(
            rootfs = %rootfs.display(),
            "unpacked {} layers in {:?}",
            self.layer_count(),
            started.elapsed()
        );
        Ok((rootfs, false))
    }

    /// Applies the layers to the existing, empty directory `dir`.
    fn unpack_into(&self, dir: &Path) -> Result<(), ImageError> {
        unpack::unpack_layers(&self.store, &self.resolved.layers, dir)
    }
}
