//! Virtio devices over MMIO.
//!
//! The contract between devices, the MMIO transport and the VMM core:
//! - A device implements [`VirtioDevice`] (its virtio state) and
//!   `event_manager::MutEventSubscriber` (its event-loop glue: queue events,
//!   backend sockets). The VMM wraps it in `Arc<Mutex<_>>`, hands one clone to
//!   an [`mmio::MmioTransport`] (reached by vCPU threads on MMIO exits) and
//!   subscribes the other to the event manager.
//! - The VMM registers each of `queue_events()[i]` with KVM as an ioeventfd on
//!   the transport's `QueueNotify` register (base + 0x50, datamatch `i`), and
//!   `interrupt().event` as an irqfd on the device's GSI. So the guest's
//!   notifications never stop a vCPU thread in userspace, and the device raises
//!   interrupts from the event loop without the transport.

pub mod fs;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_driver;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Bit in InterruptStatus: a used buffer was added to a queue.
pub const INTERRUPT_USED_RING: u32 = 0x1;
/// Bit in InterruptStatus: the configuration space changed.
pub const INTERRUPT_CONFIG: u32 = 0x2;

/// A device's interrupt line: the status register the guest reads and
/// acknowledges through the transport, and the irqfd that raises the GSI.
#[derive(Debug)]
pub struct Interrupt {
    pub status: AtomicU32,
    pub event: EventFd,
}

impl Interrupt {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.event.write(1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {index} is not valid: {reason}")]
    BadQueue { index: usize, reason: String },
    #[error("activating the device: {0}")]
    Backend(String),
}

/// Copies the bytes of a read-only config space at `offset` into `data`;
/// bytes past its end read as 0.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|start| start.checked_add(i))
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// What the MMIO transport needs from a virtio device.
pub trait VirtioDevice: Send {
    /// VIRTIO_ID_* of the device (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver (VIRTIO_F_VERSION_1 included).
    fn avail_features(&self) -> u64;
    fn acked_features(&self) -> u64;
    fn set_acked_features(&mut self, acked: u64);
    /// The device's virtqueues; the transport programs their size, addresses
    /// and readiness from the driver's register writes.
    fn queues(&self) -> &[Queue];
    fn queues_mut(&mut self) -> &mut [Queue];
    /// One eventfd per queue, registered as ioeventfds by the VMM.
    fn queue_events(&self) -> &[EventFd];
    fn interrupt(&self) -> &Interrupt;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Called once the driver sets DRIVER_OK with every queue ready.
    fn activate(&mut self, memory: GuestMemoryMmap) -> Result<(), ActivateError>;
    fn is_activated(&self) -> bool;
    /// The driver wrote 0 to Status: drop in-flight state. Returns false when
    /// the device cannot be reset (the transport then marks it NEEDS_RESET).
    fn reset(&mut self) -> bool {
        false
    }
}
