//! The virtio-fs device as the transport sees it: features, the config
//! space, its queues and their ioeventfds, activation (which starts the
//! device's event loop) and reset.

use std::path::Path;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::event_handler::{QueueState, Worker};
use super::memory_view;
use super::server::{new_server, FsServer};
use super::{FsError, CONFIG_SPACE_SIZE, NUM_QUEUES, QUEUE_SIZE, TAG_LEN, VIRTIO_ID_FS};
use crate::devices::virtio::mmio::FEATURE_VERSION_1;
use crate::devices::virtio::{ActivateError, VirtioDevice, VirtioState};

/// VIRTIO_RING_F_EVENT_IDX: the driver and device tell each other when to
/// notify, so a busy queue costs fewer exits and interrupts.
pub const FEATURE_EVENT_IDX: u64 =
    1 << virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

pub struct Fs {
    tag: String,
    virtio: VirtioState,
    server: Arc<FsServer>,
    worker: Worker,
}

impl Fs {
    /// A device exporting `dir` under `tag` (1 to 36 bytes).
    pub fn new(tag: &str, dir: &Path) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::BadTag(tag.to_string()));
        }
        let server = new_server(dir)?;
        let virtio = VirtioState::new(NUM_QUEUES, QUEUE_SIZE)
            .map_err(|e| FsError::Setup(protocols::error_chain(&e)))?;
        Ok(Self {
            tag: tag.to_string(),
            virtio,
            server,
            worker: Worker::spawn()
                .map_err(|e| FsError::Setup(format!("starting the virtio-fs thread: {e}")))?,
        })
    }

    /// The FUSE server (its limits and counters, for tests and fuzzing).
    pub fn server(&self) -> &Arc<FsServer> {
        &self.server
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1 | FEATURE_EVENT_IDX
    }

    fn virtio_state(&self) -> &VirtioState {
        &self.virtio
    }

    fn virtio_state_mut(&mut self) -> &mut VirtioState {
        &mut self.virtio
    }

    /// The config space: the tag (NUL-padded) and the number of request queues.
    fn config_space(&self) -> Vec<u8> {
        let mut config = vec![0u8; CONFIG_SPACE_SIZE];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&((NUM_QUEUES - 1) as u32).to_le_bytes());
        config
    }

    fn activate(&mut self, memory: GuestMemoryMmap) -> Result<(), ActivateError> {
        let view =
            memory_view::view_memory(&memory).map_err(|e| ActivateError::Backend(e.to_string()))?;
        let event_idx = self.virtio.acked_features & FEATURE_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(NUM_QUEUES);
        for (index, queue) in self.virtio.queues.iter().enumerate() {
            let mut queue = memory_view::view_queue(index, queue, &view).map_err(|e| {
                ActivateError::BadQueue {
                    index,
                    reason: e.to_string(),
                }
            })?;
            fuse_virtio_queue::QueueT::set_event_idx(&mut queue, event_idx);
            queues.push(queue);
        }
        let events = self
            .virtio
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        self.worker
            .serve(QueueState {
                memory: view,
                queues,
                events,
                interrupt: self.virtio.interrupt.clone(),
                server: self.server.clone(),
                broken: [false; NUM_QUEUES],
            })
            .map_err(|e| ActivateError::Backend(format!("the virtio-fs thread: {e}")))?;
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.worker.is_serving()
    }

    fn reset(&mut self) -> bool {
        self.worker.stop_serving();
        for queue in &mut self.virtio.queues {
            queue.reset();
        }
        self.virtio.acked_features = 0;
        true
    }
}
