//! virtio-fs (device type 26): a host directory served to the guest by a
//! FUSE server inside the VMM (no external virtiofsd).
//!
//! - [`device`]: the virtio device: features, config space (tag and number
//!   of request queues), its queues, activation and reset;
//! - [`event_handler`]: the device's event loop, on a thread of its own
//!   (file I/O blocks, so it stays off the VMM's shared event loop): it
//!   waits on the queues' ioeventfds, serves what the driver queued and
//!   raises the interrupt;
//! - [`server`]: the backend: `fuse-backend-rs`'s passthrough file system
//!   and FUSE server, and one request served from one descriptor chain;
//! - [`guard`]: what the guest may not do to the host through the share
//!   (device nodes, set-ID bits, privileged extended attributes) and the
//!   cap on open handles;
//! - [`listings`]: directory reads served from a listing taken at their
//!   start, whose offsets removals do not move;
//! - [`memory_view`]: guest memory and queues in the FUSE server's types;
//! - [`request_limits`]: requests refused before the FUSE server sizes an
//!   allocation by them.
//!
//! # Why two versions of vm-memory and virtio-queue
//!
//! `fuse-backend-rs` 0.14 (the newest) is built on vm-memory 0.17 (it pins
//! `=0.17.1`, whatever features are chosen) and, for its virtio-fs
//! transport, virtio-queue 0.17; the workspace uses 0.18 of both. Its FUSE
//! server only reads requests from a `Reader` and writes replies to a
//! `Writer`, both made of vm-memory 0.17 slices. So the device keeps its
//! virtio state (transport-facing queues) in 0.18 types, and at activation
//! builds a 0.17 view of the *same* guest memory (regions over the VM's own
//! host mappings: nothing copied, nothing mapped twice) and 0.17 queues
//! programmed with the driver's ring addresses. Requests are then served
//! with zero copies of their payloads: READ replies are `preadv`'d from the
//! host file straight into the guest's buffers, WRITE payloads `pwritev`'d
//! straight from them. The other route (the server without its virtiofs
//! feature, over buffers gathered from 0.18 chains) would have needed
//! vm-memory 0.17 anyway and a bounce copy of every payload.

pub mod device;
pub mod event_handler;
pub mod guard;
pub mod listings;
pub mod memory_view;
pub mod request_limits;
pub mod round_trips;
pub mod server;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use device::Fs;

pub const VIRTIO_ID_FS: u32 = 26;
/// Queue 0 is the high-priority queue (FORGET, INTERRUPT), then the request queues.
pub const HIPRIO_QUEUE: usize = 0;
pub const REQUEST_QUEUE: usize = 1;
/// One high-priority queue and one request queue (Linux uses only the
/// first request queue anyway before 6.11).
pub const NUM_QUEUES: usize = 2;
/// Big enough for 1 MiB requests (256 pages, one descriptor each) with
/// several in flight.
pub const QUEUE_SIZE: u16 = 1024;
/// The tag field of the config space.
pub const TAG_LEN: usize = 36;
/// The config space: the tag, then `num_request_queues` (le32).
pub const CONFIG_SPACE_SIZE: usize = TAG_LEN + 4;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {0:?} must be 1 to {TAG_LEN} bytes")]
    BadTag(String),
    #[error("shared directory {path}: {reason}")]
    BadDirectory { path: PathBuf, reason: String },
    #[error("creating the virtio-fs device: {0}")]
    Setup(String),
}
