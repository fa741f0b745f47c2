//! virtio-fs (device type 26): a host directory served to the guest by a
//! FUSE server inside the VMM (no external virtiofsd).
//!
//! - [`memory_view`]: guest memory and queues in the FUSE server's types;
//! - [`worker`]: the thread that serves the request queues (file I/O
//!   blocks, so it stays off the shared device event loop);
//! - this module: the virtio device, its config space and queues, and the
//!   host backend (`fuse-backend-rs`'s passthrough file system).

pub mod memory_view;
#[cfg(test)]
mod tests;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config as PassthroughConfig, PassthroughFs};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::FEATURE_VERSION_1;
use super::{ActivateError, Interrupt, VirtioDevice};
use worker::Worker;

pub const VIRTIO_ID_FS: u32 = 26;
/// Queue 0 is the high-priority queue (FORGET, INTERRUPT), then one request queue.
pub const HIPRIO_QUEUE: usize = 0;
pub const REQUEST_QUEUE: usize = 1;
const NUM_QUEUES: usize = 2;
pub const QUEUE_SIZE: u16 = 1024;
/// The tag field of the config space.
pub const TAG_LEN: usize = 36;

/// The FUSE file system every fs device serves.
pub type FsServer = Server<Arc<PassthroughFs>>;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {0:?} must be 1 to {TAG_LEN} bytes")]
    BadTag(String),
    #[error("shared directory {path}: {reason}")]
    BadDirectory { path: PathBuf, reason: String },
    #[error("creating the virtio-fs device: {0}")]
    Setup(String),
}

pub struct Fs {
    tag: String,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    acked_features: u64,
    server: Arc<FsServer>,
    worker: Option<Worker>,
}

/// The passthrough file system over `dir`.
fn passthrough(dir: &Path) -> Result<PassthroughFs, FsError> {
    let bad = |reason: String| FsError::BadDirectory {
        path: dir.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(dir).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a directory".into()));
    }
    let root_dir = dir
        .to_str()
        .ok_or_else(|| bad("the path is not UTF-8".into()))?
        .to_string();
    let config = PassthroughConfig {
        root_dir,
        // One guest owns the share: let it cache, revalidating on open.
        cache_policy: CachePolicy::Auto,
        writeback: true,
        xattr: true,
        do_import: true,
        ..Default::default()
    };
    let fs = PassthroughFs::new(config).map_err(|e| FsError::Setup(e.to_string()))?;
    fs.import().map_err(|e| bad(format!("opening it: {e}")))?;
    Ok(fs)
}

impl Fs {
    pub fn new(tag: &str, dir: &Path) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::BadTag(tag.to_string()));
        }
        let server = Arc::new(Server::new(Arc::new(passthrough(dir)?)));
        let queues = (0..NUM_QUEUES)
            .map(|_| Queue::new(QUEUE_SIZE))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| FsError::Setup(format!("{e:?}")))?;
        let queue_events = (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| FsError::Setup(e.to_string()))?;
        Ok(Self {
            tag: tag.to_string(),
            queues,
            queue_events,
            interrupt: Arc::new(Interrupt::new().map_err(|e| FsError::Setup(e.to_string()))?),
            acked_features: 0,
            server,
            worker: None,
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The config space: the tag (NUL-padded) and the number of request queues.
    fn config_space(&self) -> [u8; TAG_LEN + 4] {
        let mut config = [0u8; TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&((NUM_QUEUES - 1) as u32).to_le_bytes());
        config
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features();
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        let start = offset as usize;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = config.get(start + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::warn!("virtio-fs: ignoring a write to its read-only config at {offset}");
    }

    fn activate(&mut self, memory: GuestMemoryMmap) -> Result<(), ActivateError> {
        let view =
            memory_view::view_memory(&memory).map_err(|e| ActivateError::Backend(e.to_string()))?;
        let mut queues = Vec::new();
        for (index, queue) in self.queues.iter().enumerate() {
            let queue = memory_view::view_queue(index, queue, &view).map_err(|e| {
                ActivateError::BadQueue {
                    index,
                    reason: e.to_string(),
                }
            })?;
            queues.push(queue);
        }
        let events = self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        let worker = Worker::start(
            view,
            queues,
            events,
            self.interrupt.clone(),
            self.server.clone(),
        )
        .map_err(|e| ActivateError::Backend(format!("starting the virtio-fs thread: {e}")))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.worker.is_some()
    }

    fn reset(&mut self) -> bool {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        self.acked_features = 0;
        true
    }
}
