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
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
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

/// Why [`VirtioState::new`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VirtioStateError {
    #[error("creating the virtqueues")]
    Queue(#[source] virtio_queue::Error),
    #[error("creating the eventfds")]
    EventFd(#[from] std::io::Error),
}

/// The virtio state every device holds the same way: its virtqueues, their
/// ioeventfds, its interrupt line and the features the driver acked. A device
/// keeps one and hands it to [`VirtioDevice`] through `virtio_state(_mut)`,
/// which gives it the trait's accessors for free.
#[derive(Debug)]
pub struct VirtioState {
    /// The virtqueues, as the transport programmed them.
    pub queues: Vec<Queue>,
    /// One eventfd per queue (same index), which the guest's notifications
    /// signal (KVM ioeventfds).
    pub queue_events: Vec<EventFd>,
    /// Shared (`Arc`) so that a device serving its queues on a thread of its
    /// own can raise it from there.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver acked, within the device's offer; 0 until it
    /// writes them and again after a reset.
    pub acked_features: u64,
}

impl VirtioState {
    /// `num_queues` queues of at most `queue_size` entries, each with a
    /// non-blocking eventfd, a fresh interrupt line and nothing acked.
    pub fn new(num_queues: usize, queue_size: u16) -> Result<Self, VirtioStateError> {
        let queues = (0..num_queues)
            .map(|_| Queue::new(queue_size))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioStateError::Queue)?;
        let queue_events = (0..num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            queues,
            queue_events,
            interrupt: Arc::new(Interrupt::new()?),
            acked_features: 0,
        })
    }
}

/// Copies the bytes of a read-only config space at `offset` into `data`;
/// bytes past its end read as 0.
fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
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
    /// The device's queues, queue events, interrupt and acked features; the
    /// accessors below are built on it, so a device implements only this and
    /// [`VirtioDevice::virtio_state_mut`].
    fn virtio_state(&self) -> &VirtioState;
    /// The same state, mutable (the transport programs queues and features).
    fn virtio_state_mut(&mut self) -> &mut VirtioState;

    /// The features the driver acked (see [`VirtioDevice::set_acked_features`]).
    fn acked_features(&self) -> u64 {
        self.virtio_state().acked_features
    }
    /// Records the driver's features; bits the device does not offer are
    /// dropped (the driver must not accept them, virtio 1.2, 2.2).
    fn set_acked_features(&mut self, acked: u64) {
        let offered = self.avail_features();
        self.virtio_state_mut().acked_features = acked & offered;
    }
    /// The device's virtqueues; the transport programs their size, addresses
    /// and readiness from the driver's register writes.
    fn queues(&self) -> &[Queue] {
        &self.virtio_state().queues
    }
    /// The virtqueues, for the transport to program.
    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.virtio_state_mut().queues
    }
    /// One eventfd per queue, registered as ioeventfds by the VMM.
    fn queue_events(&self) -> &[EventFd] {
        &self.virtio_state().queue_events
    }
    /// The interrupt line: status register and irqfd.
    fn interrupt(&self) -> &Interrupt {
        &self.virtio_state().interrupt
    }
    /// The device-specific configuration space as the driver reads it.
    fn config_space(&self) -> Vec<u8>;
    /// A driver read of the config space (bytes past its end read as 0).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space(), offset, data);
    }
    /// A driver write to the config space: ignored, as the config of every
    /// device here is read-only to the driver.
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::guest_warn!(
            "virtio device type {}: ignoring a write to its read-only config space at {offset:#x}",
            self.device_type()
        );
    }
    /// Called once the driver sets DRIVER_OK with every queue ready.
    fn activate(&mut self, memory: GuestMemoryMmap) -> Result<(), ActivateError>;
    fn is_activated(&self) -> bool;
    /// The driver wrote 0 to Status: drop in-flight state. Returns false when
    /// the device cannot be reset (the transport then marks it NEEDS_RESET).
    fn reset(&mut self) -> bool {
        false
    }
}
