//! The FUSE server (`fuse-backend-rs`) reads requests and writes replies
//! through its own versions of vm-memory and virtio-queue (0.17), older than
//! the VMM's. This module gives it a view of the same guest memory in those
//! types: regions built over the very host mappings the VM uses, so no byte
//! is copied, and queues programmed with the addresses the driver gave.

use fuse_virtio_queue::QueueT as FuseQueueT;
use fuse_vm_memory::{GuestAddress as FuseGuestAddress, MmapRegion};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

/// Guest memory as fuse-backend-rs sees it.
pub type FuseMemory = fuse_vm_memory::GuestMemoryMmap<()>;
/// A virtqueue as fuse-backend-rs sees it.
pub type FuseQueue = fuse_virtio_queue::Queue;

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("guest memory region at {start:#x} has no host mapping")]
    NoHostAddress { start: u64 },
    #[error("describing guest memory region at {start:#x}: {reason}")]
    Region { start: u64, reason: String },
    #[error("queue {index}: {reason}")]
    Queue { index: usize, reason: String },
}

/// The 0.17 view of `memory`. It aliases the VM's mappings: it must not
/// outlive them (the VM's memory lives as long as the VMM process).
pub fn view_memory(memory: &GuestMemoryMmap) -> Result<FuseMemory, ViewError> {
    let mut regions = Vec::new();
    for region in memory.iter() {
        let start = region.start_addr().0;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| ViewError::NoHostAddress { start })?;
        let len = region.len() as usize;
        // SAFETY: `host..host+len` is the VM's live guest-memory mapping,
        // read-write and shared with KVM; it stays mapped for the life of
        // the VMM, and the view only reads and writes guest memory as the
        // VM's own mapping does.
        let mapping = unsafe {
            MmapRegion::build_raw(
                host,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| ViewError::Region {
            start,
            reason: e.to_string(),
        })?;
        let region = fuse_vm_memory::GuestRegionMmap::new(mapping, FuseGuestAddress(start))
            .ok_or_else(|| ViewError::Region {
                start,
                reason: "the region overflows the address space".into(),
            })?;
        regions.push(region);
    }
    FuseMemory::from_regions(regions).map_err(|e| ViewError::Region {
        start: 0,
        reason: e.to_string(),
    })
}

/// A 0.17 queue programmed like `queue` (size, ring addresses, event idx,
/// positions), checked against `memory`.
pub fn view_queue(
    index: usize,
    queue: &Queue,
    memory: &FuseMemory,
) -> Result<FuseQueue, ViewError> {
    let fail = |reason: String| ViewError::Queue { index, reason };
    let mut view = FuseQueue::new(queue.max_size()).map_err(|e| fail(format!("{e:?}")))?;
    view.set_size(queue.size());
    let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
    let (lo, hi) = split(queue.desc_table());
    view.set_desc_table_address(lo, hi);
    let (lo, hi) = split(queue.avail_ring());
    view.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(queue.used_ring());
    view.set_used_ring_address(lo, hi);
    view.set_event_idx(queue.event_idx_enabled());
    view.set_next_avail(queue.next_avail());
    view.set_next_used(queue.next_used());
    view.set_ready(queue.ready());
    if !view.is_valid(memory) {
        return Err(fail("its rings are not in guest memory".into()));
    }
    Ok(view)
}
