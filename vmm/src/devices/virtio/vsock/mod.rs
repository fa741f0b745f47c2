//! virtio-vsock (device type 19), bridged to host Unix sockets.
//!
//! - [`packet`]: the wire format;
//! - [`connection`]: one stream's state and flow control;
//! - [`muxer`]: the host backend (the hybrid-vsock Unix sockets);
//! - [`event_handler`]: the event-loop glue;
//! - this module: the virtio device itself and its queues.

pub mod connection;
pub mod event_handler;
pub mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::path::PathBuf;

use event_manager::EventOps;
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::mmio::FEATURE_VERSION_1;
use super::{ActivateError, VirtioDevice, VirtioState, VirtioStateError, INTERRUPT_USED_RING};
use muxer::Muxer;
use packet::{PacketHeader, HEADER_SIZE};

pub const VIRTIO_ID_VSOCK: u32 = 19;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
/// The largest payload we put in one rx packet.
const MAX_RX_PAYLOAD: usize = 64 * 1024;
/// The largest tx payload we accept (Linux sends at most 64 KiB).
const MAX_TX_PAYLOAD: usize = 64 * 1024;
/// Packets taken from the tx queue, or put on the rx queue, per pass of the
/// event loop, as virtio-net does: past it the queue's own eventfd is
/// signalled to come back after the loop served everything else.
pub const BUDGET: usize = QUEUE_SIZE as usize;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved: use 3 or above")]
    BadCid(u64),
    #[error("cannot listen on the vsock socket {path}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("creating the vsock device")]
    Setup(#[from] std::io::Error),
    #[error("vsock queues")]
    Queue(#[source] virtio_queue::Error),
}

pub struct Vsock {
    guest_cid: u64,
    virtio: VirtioState,
    memory: Option<GuestMemoryMmap>,
    muxer: Muxer,
    payload: Vec<u8>,
}

impl Vsock {
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        if guest_cid < 3 || guest_cid > u32::MAX as u64 {
            return Err(VsockError::BadCid(guest_cid));
        }
        let virtio = VirtioState::new(3, QUEUE_SIZE).map_err(|e| match e {
            VirtioStateError::Queue(e) => VsockError::Queue(e),
            VirtioStateError::EventFd(e) => VsockError::Setup(e),
        })?;
        Ok(Self {
            guest_cid,
            virtio,
            memory: None,
            muxer: Muxer::new(guest_cid, &uds_path)?,
            payload: Vec::with_capacity(MAX_RX_PAYLOAD),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Takes every packet the guest queued for sending.
    pub fn process_tx(&mut self, ops: &mut EventOps) {
        let Some(memory) = self.memory.as_ref() else {
            return;
        };
        let mut used_any = false;
        let mut served = 0;
        while let Some(chain) = self.virtio.queues[TX_QUEUE].pop_descriptor_chain(memory) {
            if served == BUDGET {
                self.virtio.queues[TX_QUEUE].go_to_previous_position();
                reschedule(&self.virtio.queue_events[TX_QUEUE]);
                break;
            }
            served += 1;
            let head = chain.head_index();
            match read_tx_packet(memory, chain, &mut self.payload) {
                Ok(header) => self.muxer.from_guest(&header, &self.payload, ops),
                Err(e) => crate::guest_warn!("vsock: dropped a malformed tx packet: {e}"),
            }
            if let Err(e) = self.virtio.queues[TX_QUEUE].add_used(memory, head, 0) {
                crate::guest_error!("vsock: returning a tx buffer: {e:?}");
            }
            used_any = true;
        }
        if used_any {
            self.signal_used();
        }
    }

    /// Fills the guest's rx buffers with whatever the host side has for it.
    pub fn process_rx(&mut self, ops: &mut EventOps) {
        let Some(memory) = self.memory.as_ref() else {
            return;
        };
        let mut used_any = false;
        let mut served = 0;
        while self.muxer.has_work_for_guest() {
            if served == BUDGET {
                reschedule(&self.virtio.queue_events[RX_QUEUE]);
                break;
            }
            served += 1;
            let Some(chain) = self.virtio.queues[RX_QUEUE].pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            let mut writer = match Writer::new(memory, chain) {
                Ok(writer) if writer.available_bytes() >= HEADER_SIZE => writer,
                Ok(_) | Err(_) => {
                    crate::guest_warn!("vsock: an rx buffer too small for a packet header");
                    let _ = self.virtio.queues[RX_QUEUE].add_used(memory, head, 0);
                    used_any = true;
                    continue;
                }
            };
            let room = (writer.available_bytes() - HEADER_SIZE).min(MAX_RX_PAYLOAD);
            let Some(header) = self.muxer.next_for_guest(&mut self.payload, room, ops) else {
                self.virtio.queues[RX_QUEUE].go_to_previous_position();
                break;
            };
            let written = writer
                .write_obj(header)
                .and_then(|()| writer.write_all(&self.payload))
                .map(|()| writer.bytes_written());
            let len = match written {
                Ok(len) => len as u32,
                Err(e) => {
                    crate::guest_error!("vsock: writing an rx packet: {e}");
                    0
                }
            };
            if let Err(e) = self.virtio.queues[RX_QUEUE].add_used(memory, head, len) {
                crate::guest_error!("vsock: returning an rx buffer: {e:?}");
            }
            used_any = true;
        }
        if used_any {
            self.signal_used();
        }
    }

    fn signal_used(&self) {
        if let Err(e) = self.virtio.interrupt.trigger(INTERRUPT_USED_RING) {
            crate::guest_error!("vsock: raising the interrupt: {e}");
        }
    }
}

/// Comes back to a queue on the next event-loop pass (signals its eventfd).
fn reschedule(event: &vmm_sys_util::eventfd::EventFd) {
    if let Err(e) = event.write(1) {
        crate::guest_error!("vsock: rescheduling a queue: {e}");
    }
}

/// Reads one tx packet: its header, and its payload into `payload`.
fn read_tx_packet(
    memory: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    payload: &mut Vec<u8>,
) -> Result<PacketHeader, String> {
    let mut reader = Reader::new(memory, chain).map_err(|e| format!("{e:?}"))?;
    let header: PacketHeader = reader
        .read_obj()
        .map_err(|e| format!("reading the header: {e}"))?;
    let len = header.len as usize;
    if len > MAX_TX_PAYLOAD || len > reader.available_bytes() {
        return Err(format!(
            "payload of {len} bytes, {} present (at most {MAX_TX_PAYLOAD})",
            reader.available_bytes()
        ));
    }
    payload.resize(len, 0);
    reader
        .read_exact(payload)
        .map_err(|e| format!("reading the payload: {e}"))?;
    Ok(header)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1
    }

    fn virtio_state(&self) -> &VirtioState {
        &self.virtio
    }

    fn virtio_state_mut(&mut self) -> &mut VirtioState {
        &mut self.virtio
    }

    /// The config space is the guest's CID (le64).
    fn config_space(&self) -> Vec<u8> {
        self.guest_cid.to_le_bytes().to_vec()
    }

    fn activate(&mut self, memory: GuestMemoryMmap) -> Result<(), ActivateError> {
        self.memory = Some(memory);
        // The guest fills rx and kicks it; the event loop takes it from there.
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.memory.is_some()
    }

    /// The driver let go of the device (it does so on reboot): forget the
    /// queues. Host connections stay until the VMM ends or they close.
    fn reset(&mut self) -> bool {
        self.memory = None;
        self.virtio.acked_features = 0;
        for queue in &mut self.virtio.queues {
            queue.reset();
        }
        true
    }
}

impl Vsock {
    /// Guest connections to host port P go to `<path>_P` instead of next
    /// to the listening socket (the jail sees that directory elsewhere).
    pub fn set_host_ports_path(&mut self, path: PathBuf) {
        self.muxer.set_host_ports_path(path);
    }

    /// Open host connections (for tests and diagnostics).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// The host backend (for tests, fuzzing and diagnostics: its counters
    /// and caps).
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }
}
