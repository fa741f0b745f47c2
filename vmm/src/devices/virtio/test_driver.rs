//! What the device tests (fs, net, vsock) use to stand in for the guest and
//! the VMM around a device:
//! - [`GuestDriver`]: the guest's virtio driver: split virtqueues (the
//!   `virtio_queue` mocks) in real guest memory, the device's queues
//!   programmed from them as the MMIO transport would, descriptor chains
//!   posted by hand, the used rings read back;
//! - [`DeviceLoop`]: a device subscribed to an `EventManager` of its own, as
//!   the VMM runs it, with the guest's kicks and the loop run until idle;
//! - [`kick`]: the guest's notification of one queue, for devices that run
//!   their own event loop.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::VirtioDevice;

/// The size of every queue the driver sets up.
pub(crate) const QUEUE_LEN: u16 = 256;
/// The size of [`guest_memory`].
pub(crate) const MEMORY_SIZE: usize = 32 << 20;
/// Where queue `i` is laid out: at `i * QUEUE_STRIDE`.
const QUEUE_STRIDE: u64 = 0x1_0000;
/// Buffers are bump-allocated from here to the end of guest memory.
const BUFFERS: u64 = 0x10_0000;
/// VRING_DESC_F_NEXT: the chain goes on at the descriptor's `next`.
pub(crate) const NEXT: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
/// VRING_DESC_F_WRITE: the buffer is device-writable.
pub(crate) const WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
/// VRING_DESC_F_INDIRECT: the buffer is a table of descriptors.
pub(crate) const INDIRECT: u16 =
    virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
/// What device-writable buffers hold before the device writes them.
pub(crate) const POISON: u8 = 0xab;

/// Guest memory of [`MEMORY_SIZE`] bytes from address 0.
pub(crate) fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap()
}

/// A descriptor of a chain being posted.
pub(crate) enum Buffer<'b> {
    /// Device-readable, holding these bytes.
    Readable(&'b [u8]),
    /// Device-writable, this long, filled with [`POISON`].
    Writable(u32),
    /// A raw descriptor (address, length, flags without NEXT), pointing
    /// wherever the test likes.
    Raw(u64, u32, u16),
}

/// The guest's driver: one mock split queue of [`QUEUE_LEN`] per device
/// queue (queue `i` at `i * 0x10000`), chains posted by hand from buffers
/// bump-allocated in guest memory, and what the device used read back from
/// the used rings.
pub(crate) struct GuestDriver<'a> {
    memory: &'a GuestMemoryMmap,
    queues: Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
    /// Per queue: where in the descriptor table the next chain goes.
    next_desc: Vec<u16>,
    /// Per queue: how many chains were made available.
    posted: Vec<u16>,
    next_buffer: u64,
}

impl<'a> GuestDriver<'a> {
    /// A driver with `queues` queues in `memory`.
    pub(crate) fn new(memory: &'a GuestMemoryMmap, queues: usize) -> Self {
        assert!(
            queues as u64 * QUEUE_STRIDE <= BUFFERS,
            "{queues} queues overlap the buffers"
        );
        Self {
            memory,
            queues: (0..queues as u64)
                .map(|i| MockSplitQueue::create(memory, GuestAddress(i * QUEUE_STRIDE), QUEUE_LEN))
                .collect(),
            next_desc: vec![0; queues],
            posted: vec![0; queues],
            next_buffer: BUFFERS,
        }
    }

    /// Queue `queue` as the transport programs it from the driver's
    /// register writes: size, ring addresses, ready.
    pub(crate) fn device_queue(&self, queue: usize) -> Queue {
        use virtio_queue::QueueT;
        let mut device_queue: Queue = self.queues[queue].create_queue().unwrap();
        let used = self.used_addr(queue);
        device_queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        device_queue
    }

    /// Where `queue`'s used ring is: after the whole avail ring. (The
    /// mock's own used ring starts inside the avail ring of a 256-entry
    /// queue, at slot 128: virtio-queue's mock sizes the avail ring in
    /// entries, not bytes. A driver past 128 chains then found its avail
    /// slots overwritten by the device's used index.)
    fn used_addr(&self, queue: usize) -> u64 {
        let avail_end = self.avail_addr(queue) + 4 + 2 * QUEUE_LEN as u64 + 2;
        avail_end.next_multiple_of(4)
    }

    /// Programs every queue of `device` as the transport would, acks
    /// `features` and activates it.
    pub(crate) fn activate(&self, device: &mut dyn VirtioDevice, features: u64) {
        assert_eq!(
            device.queues().len(),
            self.queues.len(),
            "the driver sets up as many queues as the device has"
        );
        for (index, queue) in device.queues_mut().iter_mut().enumerate() {
            *queue = self.device_queue(index);
        }
        device.set_acked_features(features);
        device.activate(self.memory.clone()).unwrap();
    }

    /// The guest address of a new buffer of `len` bytes (64-byte aligned).
    pub(crate) fn allocate(&mut self, len: u32) -> u64 {
        let address = self.next_buffer;
        self.next_buffer += (len as u64).next_multiple_of(64).max(64);
        assert!(
            self.next_buffer < self.memory_end(),
            "test buffers exhausted"
        );
        address
    }

    /// How many bytes [`Self::allocate`] can still hand out.
    pub(crate) fn free_buffer_space(&self) -> u64 {
        self.memory_end().saturating_sub(self.next_buffer)
    }

    /// Allocates buffers from the start again: for when the device has
    /// used every chain posted so far.
    pub(crate) fn reuse_buffers(&mut self) {
        self.next_buffer = BUFFERS;
    }

    fn memory_end(&self) -> u64 {
        self.memory.last_addr().0 + 1
    }

    /// Where in `queue`'s descriptor table the next chain goes.
    pub(crate) fn next_descriptor(&self, queue: usize) -> u16 {
        self.next_desc[queue]
    }

    /// Posts one chain of `buffers` on `queue` (writing the readable ones'
    /// bytes and poisoning the writable ones) and makes it available;
    /// returns its descriptors' (address, len). Chains are laid out one
    /// after another in the descriptor table, starting over at 0 where the
    /// table ends: every earlier chain must have been used by then.
    pub(crate) fn post(&mut self, queue: usize, buffers: &[Buffer]) -> Vec<(u64, u32)> {
        let first = if self.next_desc[queue] as usize + buffers.len() > QUEUE_LEN as usize {
            0
        } else {
            self.next_desc[queue]
        };
        let (descriptors, placed) = self.chain(buffers, first);
        self.publish(queue, first, &descriptors);
        placed
    }

    /// Posts one chain on `queue` as an indirect table (VRING_DESC_F_INDIRECT:
    /// the ring holds one descriptor pointing at a table of `buffers` in
    /// guest memory); returns the buffers' (address, len).
    pub(crate) fn post_indirect(&mut self, queue: usize, buffers: &[Buffer]) -> Vec<(u64, u32)> {
        let (descriptors, placed) = self.chain(buffers, 0);
        let table_len = (descriptors.len() * std::mem::size_of::<RawDescriptor>()) as u32;
        let table = self.allocate(table_len);
        for (i, descriptor) in descriptors.iter().enumerate() {
            let at = table + (i * std::mem::size_of::<RawDescriptor>()) as u64;
            self.memory
                .write_obj(*descriptor, GuestAddress(at))
                .unwrap();
        }
        let head = if self.next_desc[queue] >= QUEUE_LEN {
            0
        } else {
            self.next_desc[queue]
        };
        let indirect = SplitDescriptor::new(table, table_len, INDIRECT, 0);
        self.publish(queue, head, &[RawDescriptor::from(indirect)]);
        placed
    }

    /// The descriptors of a chain of `buffers` whose first descriptor has
    /// index `first` (buffers allocated and filled), and the buffers'
    /// (address, len).
    fn chain(&mut self, buffers: &[Buffer], first: u16) -> (Vec<RawDescriptor>, Vec<(u64, u32)>) {
        let mut descriptors = Vec::new();
        let mut placed = Vec::new();
        for (i, buffer) in buffers.iter().enumerate() {
            let (address, len, flags) = match buffer {
                Buffer::Readable(bytes) => {
                    let address = self.allocate(bytes.len() as u32);
                    self.memory
                        .write_slice(bytes, GuestAddress(address))
                        .unwrap();
                    (address, bytes.len() as u32, 0)
                }
                Buffer::Writable(len) => {
                    let address = self.allocate(*len);
                    self.memory
                        .write_slice(&vec![POISON; *len as usize], GuestAddress(address))
                        .unwrap();
                    (address, *len, WRITE)
                }
                Buffer::Raw(address, len, flags) => (*address, *len, *flags),
            };
            let index = first + i as u16;
            let (flags, next) = if i + 1 == buffers.len() {
                (flags, 0)
            } else {
                (flags | NEXT, index + 1)
            };
            descriptors.push(RawDescriptor::from(SplitDescriptor::new(
                address, len, flags, next,
            )));
            placed.push((address, len));
        }
        (descriptors, placed)
    }

    /// Stores `descriptors` in `queue`'s table from index `head` on, makes
    /// `head` available (the mock's own helper does not wrap the avail
    /// ring) and has the next chain start after them.
    pub(crate) fn publish(&mut self, queue: usize, head: u16, descriptors: &[RawDescriptor]) {
        let mock = &self.queues[queue];
        for (i, descriptor) in descriptors.iter().enumerate() {
            mock.desc_table()
                .store(head + i as u16, *descriptor)
                .unwrap();
        }
        let avail = self.avail_addr(queue);
        let idx: u16 = self.memory.read_obj(GuestAddress(avail + 2)).unwrap();
        let slot = avail + 4 + (idx % QUEUE_LEN) as u64 * 2;
        self.memory.write_obj(head, GuestAddress(slot)).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.memory
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
        self.next_desc[queue] = head + descriptors.len() as u16;
        self.posted[queue] = self.posted[queue].wrapping_add(1);
    }

    /// How many chains were made available on `queue`.
    pub(crate) fn posted(&self, queue: usize) -> u16 {
        self.posted[queue]
    }

    /// The guest address of `queue`'s avail ring.
    pub(crate) fn avail_addr(&self, queue: usize) -> u64 {
        self.queues[queue].avail_addr().0
    }

    /// Descriptor `index` of `queue`'s table: (address, length).
    pub(crate) fn descriptor(&self, queue: usize, index: u16) -> (u64, u32) {
        let descriptor =
            SplitDescriptor::from(self.queues[queue].desc_table().load(index).unwrap());
        (descriptor.addr().0, descriptor.len())
    }

    /// The used ring's index of `queue`.
    pub(crate) fn used_idx(&self, queue: usize) -> u16 {
        self.memory
            .read_obj(GuestAddress(self.used_addr(queue) + 2))
            .unwrap()
    }

    /// Used element `n` of `queue`: (head index, used length).
    pub(crate) fn used(&self, queue: usize, n: u16) -> (u32, u32) {
        let ring = self.used_addr(queue) + 4 + (n % QUEUE_LEN) as u64 * 8;
        let id: u32 = self.memory.read_obj(GuestAddress(ring)).unwrap();
        let len: u32 = self.memory.read_obj(GuestAddress(ring + 4)).unwrap();
        (id, len)
    }

    /// Waits (at most 10 s) until `queue`'s used index reaches `count`: for
    /// devices that serve their queues on a thread of their own.
    pub(crate) fn wait_used(&self, queue: usize, count: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx(queue) != count {
            assert!(
                Instant::now() < deadline,
                "queue {queue}: {} of {count} chains used",
                self.used_idx(queue)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// `len` bytes of guest memory at `address`.
    pub(crate) fn read(&self, address: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        self.memory
            .read_slice(&mut bytes, GuestAddress(address))
            .unwrap();
        bytes
    }

    /// The first `len` bytes of a posted chain's buffers (as [`Self::post`]
    /// returned them).
    pub(crate) fn read_chain(&self, placed: &[(u64, u32)], len: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        for &(address, size) in placed {
            let take = (len - bytes.len()).min(size as usize);
            bytes.extend(self.read(address, take));
        }
        assert_eq!(bytes.len(), len, "the chain is shorter than {len} bytes");
        bytes
    }

    /// EVENT_IDX: sets the driver's used_event of `queue` (interrupt once
    /// the used index passes it).
    pub(crate) fn set_used_event(&self, queue: usize, value: u16) {
        let address = self.avail_addr(queue) + 4 + QUEUE_LEN as u64 * 2;
        self.memory.write_obj(value, GuestAddress(address)).unwrap();
    }

    /// EVENT_IDX: the device's avail_event of `queue` (kick once the avail
    /// index passes it).
    pub(crate) fn avail_event(&self, queue: usize) -> u16 {
        let address = self.used_addr(queue) + 4 + QUEUE_LEN as u64 * 8;
        self.memory.read_obj(GuestAddress(address)).unwrap()
    }
}

/// The guest notifies `device`'s queue `queue`: writes the queue's eventfd,
/// as KVM does when the guest writes QueueNotify.
pub(crate) fn kick(device: &dyn VirtioDevice, queue: usize) {
    device.queue_events()[queue].write(1).unwrap();
}

/// A device as the VMM runs it: shared behind a mutex and subscribed to an
/// event manager (here one of its own, run by the test).
pub(crate) struct DeviceLoop<D: VirtioDevice + MutEventSubscriber> {
    device: Arc<Mutex<D>>,
    events: EventManager<Arc<Mutex<D>>>,
}

impl<D: VirtioDevice + MutEventSubscriber> DeviceLoop<D> {
    /// Subscribes `device` to a new event manager.
    pub(crate) fn new(device: D) -> Self {
        let device = Arc::new(Mutex::new(device));
        let mut events = EventManager::new().unwrap();
        events.add_subscriber(device.clone());
        Self { device, events }
    }

    /// The device, locked (as the transport or the event loop hold it).
    pub(crate) fn lock(&self) -> MutexGuard<'_, D> {
        self.device.lock().unwrap()
    }

    /// The guest kicks `queue` (see [`kick`]); the device sees it at the
    /// next run of the loop.
    pub(crate) fn kick(&self, queue: usize) {
        kick(&*self.lock(), queue);
    }

    /// Runs the event loop until it is idle (nothing happened for 50 ms).
    pub(crate) fn settle(&mut self) {
        while self.events.run_with_timeout(50).unwrap() > 0 {}
    }

    /// Runs the event loop until `done` (at most 5 s, or the test fails
    /// naming `what` it waited for).
    pub(crate) fn run_until(&mut self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.events.run_with_timeout(50).unwrap();
        }
    }

    /// Whether the device raised its interrupt since the last call.
    pub(crate) fn interrupted(&self) -> bool {
        self.lock().interrupt().event.read().is_ok()
    }
}
