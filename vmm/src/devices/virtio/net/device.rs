//! The virtio-net device: features, the config space, its two queues,
//! activation and reset, and the data path between the queues and the tap.
//!
//! RX: a tap read goes straight into one popped guest chain (only read with
//! a chain in hand, so nothing is ever buffered here); TX: one guest chain
//! is one tap write. A chain the device cannot use (wrong direction, outside
//! guest memory, too small, too long) is returned with used length 0 and the
//! frame is dropped: the guest cannot stop or crash the device.

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use protocols::error_chain;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::iov::{Direction, IoVecBuffer};
use super::tap::{offload_for, Tap};
use super::{
    NetConfig, NetError, TapSource, CONFIG_SPACE_SIZE, DEFAULT_MTU, ETH_HLEN, MAX_FRAME_LEN,
    NUM_BUFFERS_OFFSET, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_ID_NET, VNET_HDR_LEN,
};
use crate::devices::virtio::mmio::FEATURE_VERSION_1;
use crate::devices::virtio::{ActivateError, VirtioDevice, VirtioState, INTERRUPT_USED_RING};

/// VIRTIO_RING_F_EVENT_IDX: the driver and device tell each other when to
/// notify, so a busy queue costs fewer exits and interrupts.
pub const FEATURE_EVENT_IDX: u64 =
    1 << virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// VIRTIO_RING_F_INDIRECT_DESC: a chain may sit in a table of its own, so a
/// guest RX buffer for 64 KiB GSO frames (header + 17 pages without
/// MRG_RXBUF) takes one ring slot instead of 19; the ring then holds 256 of
/// them rather than 13. `virtio-queue`'s chain iterator follows the tables.
pub const FEATURE_INDIRECT_DESC: u64 =
    1 << virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

const fn bit(bit: u32) -> u64 {
    1 << bit
}

/// Everything offered (no MRG_RXBUF, no indirect descriptors, one queue pair).
pub const AVAIL_FEATURES: u64 = FEATURE_VERSION_1
    | FEATURE_EVENT_IDX
    | FEATURE_INDIRECT_DESC
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_MTU)
    | bit(VIRTIO_NET_F_STATUS);

/// Frames handled per queue per event before yielding to the event loop
/// (the queue's own eventfd is re-signalled to come back).
const BUDGET: usize = QUEUE_SIZE as usize;

/// Failed tap reads in a row after which RX waits for the next tap edge.
const MAX_READ_ERRORS: usize = 8;

/// The smallest RX chain worth reading into: a whole frame must fit, 64 KiB
/// GSO frames when the guest takes TSO, else an MTU-sized one.
pub fn min_rx_len(acked_features: u64, mtu: u16) -> usize {
    if acked_features & (bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6)) != 0 {
        MAX_FRAME_LEN
    } else {
        VNET_HDR_LEN + ETH_HLEN + mtu as usize
    }
}

/// Comes back to a queue on the next event-loop pass (signals its eventfd).
fn reschedule(event: &EventFd) {
    if let Err(e) = event.write(1) {
        crate::guest_error!("virtio-net: rescheduling a queue: {e}");
    }
}

/// Dropped frames, logged at most once a second.
#[derive(Debug, Default)]
pub struct DropLog {
    pub total: u64,
    unreported: u64,
    last_report: Option<Instant>,
}

impl DropLog {
    fn note(&mut self, queue: &str, reason: fmt::Arguments) {
        self.total += 1;
        self.unreported += 1;
        let now = Instant::now();
        if self
            .last_report
            .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1))
        {
            crate::guest_warn!(
                "virtio-net: dropped {} {queue} frame(s); the last: {reason}",
                self.unreported
            );
            self.unreported = 0;
            self.last_report = Some(now);
        }
    }
}

pub struct Net {
    mac: [u8; 6],
    mtu: u16,
    pub(super) tap: Tap,
    pub(super) virtio: VirtioState,
    memory: Option<GuestMemoryMmap>,
    /// The tap may have frames: set on activation and on each tap edge,
    /// cleared when a read finds it empty.
    pub(super) tap_readable: bool,
    /// Scratch iovecs for the chain in hand (boxed: 4 KiB).
    iov: Box<IoVecBuffer>,
    pub(super) drops: DropLog,
}

impl Net {
    /// A NIC on the tap `config` names.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let tap = match &config.tap {
            TapSource::Fd(fd) => Tap::from_fd(*fd)?,
            TapSource::Name(name) => Tap::open_named(name)?,
        };
        Self::with_tap(tap, config.mac, config.mtu.unwrap_or(DEFAULT_MTU))
    }

    pub fn with_tap(tap: Tap, mac: [u8; 6], mtu: u16) -> Result<Self, NetError> {
        let virtio = VirtioState::new(NUM_QUEUES, QUEUE_SIZE)
            .map_err(|e| NetError::Setup(error_chain(&e)))?;
        Ok(Self {
            mac,
            mtu,
            tap,
            virtio,
            memory: None,
            tap_readable: false,
            iov: Box::default(),
            drops: DropLog::default(),
        })
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Raises the queue's interrupt if the driver wants to hear about it.
    fn signal_used(&mut self, index: usize) {
        let Some(memory) = self.memory.as_ref() else {
            return;
        };
        if self.virtio.queues[index]
            .needs_notification(memory)
            .unwrap_or(true)
        {
            if let Err(e) = self.virtio.interrupt.trigger(INTERRUPT_USED_RING) {
                crate::guest_error!("virtio-net: raising the interrupt: {e}");
            }
        }
    }

    /// Moves frames from the tap into the guest's RX chains, as long as
    /// both have some.
    pub fn process_rx(&mut self) {
        let Some(memory) = self.memory.as_ref() else {
            return;
        };
        let queue = &mut self.virtio.queues[RX_QUEUE];
        let min_len = min_rx_len(self.virtio.acked_features, self.mtu);
        let mut used = 0usize;
        let mut rechecked = false;
        let mut read_errors = 0;
        while self.tap_readable {
            if used == BUDGET {
                // tap_readable stays set: the self-kick resumes reading.
                reschedule(&self.virtio.queue_events[RX_QUEUE]);
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                // Out of buffers: ask for a kick when the driver adds some,
                // and look once more in case it just did.
                match queue.enable_notification(memory) {
                    Ok(true) if !rechecked => {
                        rechecked = true;
                        continue;
                    }
                    Ok(true) => {
                        crate::guest_debug!("virtio-net: rx ring announces buffers it lacks")
                    }
                    Ok(false) => {}
                    Err(e) => crate::guest_error!("virtio-net: enabling rx notifications: {e}"),
                }
                break;
            };
            rechecked = false;
            let head = chain.head_index();
            let len = match self.iov.fill(memory, chain, Direction::Write) {
                Ok(capacity) if capacity >= min_len => {
                    match self.tap.readv(self.iov.iovecs_with_sink()) {
                        Ok(n) if (VNET_HDR_LEN..=capacity).contains(&n) => {
                            // The tap leaves num_buffers alone; without
                            // MRG_RXBUF it must read 1.
                            self.iov.write_at(NUM_BUFFERS_OFFSET, &1u16.to_le_bytes());
                            n as u32
                        }
                        Ok(n) => {
                            self.drops.note(
                                "rx",
                                format_args!("a {n}-byte frame cut to a {capacity}-byte buffer"),
                            );
                            0
                        }
                        Err(e) => {
                            // Keep the chain for the next frame.
                            queue.go_to_previous_position();
                            if e.kind() == io::ErrorKind::WouldBlock {
                                self.tap_readable = false;
                                break;
                            }
                            // The frame is lost (EINVAL: a header the tap
                            // could not build); more may follow, unless
                            // the tap itself is broken.
                            self.drops.note("rx", format_args!("reading the tap: {e}"));
                            read_errors += 1;
                            if read_errors == MAX_READ_ERRORS {
                                self.tap_readable = false;
                                break;
                            }
                            continue;
                        }
                    }
                }
                Ok(capacity) => {
                    self.drops.note(
                        "rx",
                        format_args!("a {capacity}-byte buffer, {min_len} needed"),
                    );
                    0
                }
                Err(e) => {
                    self.drops.note("rx", format_args!("bad buffer: {e}"));
                    0
                }
            };
            if let Err(e) = queue.add_used(memory, head, len) {
                crate::guest_error!("virtio-net: returning rx buffer {head}: {e}");
            }
            used += 1;
        }
        if used > 0 {
            self.signal_used(RX_QUEUE);
        }
    }

    /// Sends every frame the guest queued on TX to the tap.
    pub fn process_tx(&mut self) {
        let Some(memory) = self.memory.as_ref() else {
            return;
        };
        let queue = &mut self.virtio.queues[TX_QUEUE];
        let mut used = 0usize;
        let mut exhausted = false;
        loop {
            // Without EVENT_IDX this sets VRING_USED_F_NO_NOTIFY: no kicks
            // while the device is draining the ring anyway.
            if let Err(e) = queue.disable_notification(memory) {
                crate::guest_error!("virtio-net: disabling tx notifications: {e}");
            }
            let mut served = 0usize;
            while let Some(chain) = queue.pop_descriptor_chain(memory) {
                let head = chain.head_index();
                match self.iov.fill(memory, chain, Direction::Read) {
                    Ok(len) if (VNET_HDR_LEN + ETH_HLEN..=MAX_FRAME_LEN).contains(&len) => {
                        if let Err(e) = self.tap.writev(self.iov.iovecs()) {
                            self.drops
                                .note("tx", format_args!("writing to the tap: {e}"));
                        }
                    }
                    Ok(len) => self
                        .drops
                        .note("tx", format_args!("a frame of {len} bytes")),
                    Err(e) => self.drops.note("tx", format_args!("bad buffer: {e}")),
                }
                if let Err(e) = queue.add_used(memory, head, 0) {
                    crate::guest_error!("virtio-net: returning tx buffer {head}: {e}");
                }
                served += 1;
                if used + served == BUDGET {
                    exhausted = true;
                    break;
                }
            }
            used += served;
            if exhausted {
                break;
            }
            match queue.enable_notification(memory) {
                // More came while notifications were off.
                Ok(true) if served > 0 => continue,
                Ok(true) => {
                    crate::guest_debug!("virtio-net: tx ring announces chains it lacks");
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    crate::guest_error!("virtio-net: enabling tx notifications: {e}");
                    break;
                }
            }
        }
        if exhausted {
            reschedule(&self.virtio.queue_events[TX_QUEUE]);
        }
        if used > 0 {
            self.signal_used(TX_QUEUE);
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn virtio_state(&self) -> &VirtioState {
        &self.virtio
    }

    fn virtio_state_mut(&mut self) -> &mut VirtioState {
        &mut self.virtio
    }

    fn config_space(&self) -> Vec<u8> {
        let mut config = vec![0u8; CONFIG_SPACE_SIZE];
        config[0..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        // max_virtqueue_pairs: only read with MQ, which is not offered.
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        config
    }

    fn activate(&mut self, memory: GuestMemoryMmap) -> Result<(), ActivateError> {
        let event_idx = self.virtio.acked_features & FEATURE_EVENT_IDX != 0;
        for queue in &mut self.virtio.queues {
            queue.set_event_idx(event_idx);
        }
        self.tap
            .set_offload(offload_for(self.virtio.acked_features))
            .map_err(|e| ActivateError::Backend(error_chain(&e)))?;
        self.memory = Some(memory);
        // Frames may have queued up before: read them once RX buffers come.
        self.tap_readable = true;
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.memory.is_some()
    }

    fn reset(&mut self) -> bool {
        if let Err(e) = self.tap.set_offload(0) {
            crate::guest_warn!("virtio-net: {}", error_chain(&e));
        }
        self.memory = None;
        self.tap_readable = false;
        self.virtio.acked_features = 0;
        for queue in &mut self.virtio.queues {
            queue.reset();
        }
        true
    }
}
