//! The guest's side of the virtqueues, driven by fuzzer bytes: split queues
//! in guest memory (descriptor tables written through `virtio-queue`'s mock
//! tables), chains posted on them (well-formed buffers, raw descriptors
//! pointing anywhere with any flags, indirect tables), rings tampered with,
//! and the used rings checked against what was made available.
//!
//! The rings are laid out here rather than by `MockSplitQueue::create`:
//! in virtio-queue 0.18 that puts the used ring 256 bytes after the avail
//! ring's entries instead of 2 bytes per entry after, so with more than
//! 128 entries the two rings overlap (the first fuzz run found it: the
//! device's used elements read back as the guest's avail entries).

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::DescriptorTable;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Input;
use crate::devices::virtio::VirtioDevice;

/// The size of every queue the guest sets up.
pub const QUEUE_LEN: u16 = 256;
/// The guest's memory, from address 0.
pub const MEMORY_SIZE: usize = 2 << 20;
/// Queue `i` is laid out at `i * QUEUE_STRIDE`: its descriptor table (4
/// KiB), then its avail ring at +4 KiB and its used ring at +8 KiB.
const QUEUE_STRIDE: u64 = 0x4000;
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x2000;
/// Buffers are allocated from here to [`RAW_AREA`], round robin.
const BUFFERS: u64 = 0x1_0000;
/// Raw descriptors "near" guest memory point from here to 64 KiB past its
/// end: never at the rings or at the buffers of well-formed chains.
const RAW_AREA: u64 = MEMORY_SIZE as u64 - 0x1_0000;
/// The largest buffer a posted chain gets.
const MAX_BUFFER: u32 = 0x2_0000;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Fresh guest memory of [`MEMORY_SIZE`] bytes.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)])
        .expect("mapping the fuzzed guest's memory")
}

/// One descriptor of a chain being posted.
pub enum Segment<'a> {
    /// A device-readable buffer holding these bytes.
    Readable(&'a [u8]),
    /// A device-writable buffer of this many bytes.
    Writable(u32),
    /// A descriptor as is: any address, length, flags and next index.
    Raw(SplitDescriptor),
}

/// The guest's driver of `queues` queues in `memory`.
pub struct Driver<'m> {
    memory: &'m GuestMemoryMmap,
    /// Per queue: its descriptor table.
    queues: Vec<DescriptorTable<'m, GuestMemoryMmap>>,
    /// Per queue: where the next chain goes in the descriptor table.
    next_desc: Vec<u16>,
    /// Per queue: how many chains were made available.
    published: Vec<u16>,
    /// Per queue: the guest wrote its rings by hand, so the device may
    /// legitimately see more (or other) chains than were published.
    tampered: Vec<bool>,
    next_buffer: u64,
    /// How many chains [`Self::post_fuzzed`] posted.
    raw_chains: u64,
    /// Bumped whenever what was written to earlier buffers may have been
    /// overwritten: buffers reused, or descriptors that may point anywhere.
    generation: u64,
}

impl<'m> Driver<'m> {
    pub fn new(memory: &'m GuestMemoryMmap, queues: usize) -> Self {
        assert!(queues as u64 * QUEUE_STRIDE <= BUFFERS);
        Self {
            memory,
            queues: (0..queues as u64)
                .map(|i| DescriptorTable::new(memory, GuestAddress(i * QUEUE_STRIDE), QUEUE_LEN))
                .collect(),
            next_desc: vec![0; queues],
            published: vec![0; queues],
            tampered: vec![false; queues],
            next_buffer: BUFFERS,
            raw_chains: 0,
            generation: 0,
        }
    }

    pub fn memory(&self) -> &'m GuestMemoryMmap {
        self.memory
    }

    /// Queue `index` as the transport programs it from the driver's
    /// register writes (size, ring addresses, ready).
    pub fn device_queue(&self, index: usize) -> Queue {
        let mut queue = Queue::new(QUEUE_LEN).expect("a valid queue size");
        queue.set_size(QUEUE_LEN);
        let (desc, avail, used) = self.ring_addresses(index);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        queue
    }

    /// Programs every queue of `device` and acks `features` (what the
    /// transport does before it activates a device).
    pub fn program(&self, device: &mut dyn VirtioDevice, features: u64) {
        for (index, queue) in device.queues_mut().iter_mut().enumerate() {
            if index < self.queues.len() {
                *queue = self.device_queue(index);
            }
        }
        device.set_acked_features(features);
    }

    /// (descriptor table, avail ring, used ring) addresses of queue `index`.
    pub fn ring_addresses(&self, index: usize) -> (u64, u64, u64) {
        let desc = (index % self.queues.len()) as u64 * QUEUE_STRIDE;
        (desc, desc + AVAIL_OFFSET, desc + USED_OFFSET)
    }

    /// A guest buffer of `len` bytes (capped at [`MAX_BUFFER`]); buffers
    /// are reused round robin, as a driver recycles used ones.
    fn allocate(&mut self, len: u32) -> u64 {
        let len = u64::from(len.min(MAX_BUFFER)).next_multiple_of(64).max(64);
        if self.next_buffer + len > RAW_AREA {
            self.next_buffer = BUFFERS;
            self.generation += 1;
        }
        let address = self.next_buffer;
        self.next_buffer += len;
        address
    }

    /// Posts a chain of `segments` on `queue` (in an indirect table when
    /// `indirect`) and makes it available; returns its head index and the
    /// (address, length) of its first buffer.
    pub fn post(&mut self, queue: usize, segments: &[Segment], indirect: bool) -> (u16, u64, u32) {
        let mut descriptors = Vec::with_capacity(segments.len());
        for (i, segment) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            let linked = |address: u64, len: u32, flags: u16| {
                let (flags, next) = if last {
                    (flags, 0)
                } else {
                    (flags | NEXT, i as u16 + 1)
                };
                (address, len, flags, next)
            };
            let (address, len, flags, next) = match segment {
                Segment::Readable(bytes) => {
                    let len = (bytes.len() as u32).min(MAX_BUFFER);
                    let address = self.allocate(len);
                    self.memory
                        .write_slice(&bytes[..len as usize], GuestAddress(address))
                        .expect("buffers lie in guest memory");
                    linked(address, len, 0)
                }
                Segment::Writable(len) => {
                    let len = (*len).min(MAX_BUFFER);
                    linked(self.allocate(len), len, WRITE)
                }
                Segment::Raw(raw) => (raw.addr().0, raw.len(), raw.flags(), raw.next()),
            };
            descriptors.push((address, len, flags, next));
        }
        let first = descriptors
            .first()
            .map_or((0, 0), |&(address, len, _, _)| (address, len));
        if indirect {
            let table_len = (descriptors.len() * std::mem::size_of::<RawDescriptor>()) as u32;
            let table = self.allocate(table_len);
            for (i, &(address, len, flags, next)) in descriptors.iter().enumerate() {
                let at = table + (i * std::mem::size_of::<RawDescriptor>()) as u64;
                let raw = RawDescriptor::from(SplitDescriptor::new(address, len, flags, next));
                self.memory
                    .write_obj(raw, GuestAddress(at))
                    .expect("buffers lie in guest memory");
            }
            descriptors = vec![(table, table_len, INDIRECT, 0)];
        }
        let head = self.publish(queue, &descriptors);
        (head, first.0, first.1)
    }

    /// Stores a chain's descriptors in `queue`'s table (their `next`
    /// indexes, relative to the chain, made absolute) and makes its head
    /// available.
    fn publish(&mut self, queue: usize, descriptors: &[(u64, u32, u16, u16)]) -> u16 {
        let count = descriptors.len().min(QUEUE_LEN as usize) as u16;
        let head = if self.next_desc[queue] + count > QUEUE_LEN {
            0
        } else {
            self.next_desc[queue]
        };
        let table = &self.queues[queue];
        for (i, &(address, len, flags, next)) in descriptors.iter().take(count as usize).enumerate()
        {
            let next = if flags & NEXT != 0 && next == i as u16 + 1 {
                head + next
            } else {
                next
            };
            let raw = RawDescriptor::from(SplitDescriptor::new(address, len, flags, next));
            table
                .store(head + i as u16, raw)
                .expect("the index is within the table");
        }
        let (_, avail, _) = self.ring_addresses(queue);
        let idx: u16 = self.read_obj(avail + 2);
        self.write_obj(avail + 4 + u64::from(idx % QUEUE_LEN) * 2, head);
        self.write_obj(avail + 2, idx.wrapping_add(1));
        self.next_desc[queue] = head + count;
        self.published[queue] = self.published[queue].wrapping_add(1);
        head
    }

    /// Posts a chain the fuzzer shapes entirely: up to 8 descriptors, each
    /// a readable buffer of its bytes, a writable buffer or a raw
    /// descriptor, directly in the ring or in an indirect table.
    /// Returns its head index.
    pub fn post_fuzzed(&mut self, queue: usize, input: &mut Input) -> u16 {
        self.raw_chains += 1;
        let shape = input.u8();
        let count = 1 + (shape & 7) as usize;
        let indirect = shape & 0x80 != 0;
        let mut segments = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = input.u8();
            segments.push(match kind % 4 {
                0 => {
                    let len = input.u16() as usize;
                    Segment::Readable(input.bytes(len))
                }
                1 | 2 => Segment::Writable(u32::from(input.u16())),
                _ => {
                    let address = if kind & 0x10 != 0 {
                        let address = input.u64();
                        if address < RAW_AREA {
                            // It may point at the rings or other buffers.
                            self.mark_tampered();
                        }
                        address
                    } else {
                        // Both sides of the end of guest memory.
                        RAW_AREA + u64::from(input.u32()) % 0x2_0000
                    };
                    let len = if kind & 0x20 != 0 {
                        input.u32()
                    } else {
                        u32::from(input.u16())
                    };
                    Segment::Raw(SplitDescriptor::new(address, len, input.u16(), input.u16()))
                }
            });
        }
        self.post(queue, &segments, indirect).0
    }

    /// The guest writes `queue`'s rings by hand: its avail index, an avail
    /// slot, a descriptor, or the ring's flags and event index.
    /// A raw descriptor may point at any ring: every queue counts as
    /// tampered with afterwards.
    pub fn tamper(&mut self, queue: usize, input: &mut Input) {
        self.mark_tampered();
        let (_, avail, used) = self.ring_addresses(queue);
        match input.u8() % 5 {
            0 => self.write_obj(avail + 2, input.u16()),
            1 => {
                let slot = u64::from(input.u16() % QUEUE_LEN);
                self.write_obj(avail + 4 + slot * 2, input.u16());
            }
            2 => {
                let index = input.u16() % QUEUE_LEN;
                let raw = RawDescriptor::from(SplitDescriptor::new(
                    input.u64(),
                    input.u32(),
                    input.u16(),
                    input.u16(),
                ));
                let _ = self.queues[queue].store(index, raw);
            }
            3 => self.write_obj(avail, input.u16()),
            _ => {
                // used_event (at the avail ring's end), or the used ring's
                // own index and flags, which only the device should write.
                let at = match input.u8() % 3 {
                    0 => avail + 4 + u64::from(QUEUE_LEN) * 2,
                    1 => used + 2,
                    _ => used,
                };
                self.write_obj(at, input.u16());
            }
        }
    }

    /// How many chains [`Self::post_fuzzed`] posted.
    pub fn raw_chains(&self) -> u64 {
        self.raw_chains
    }

    /// The guest reprogrammed the queues (a device reset and setup): the
    /// device starts over on rings that already hold chains, so they are
    /// no longer checked against what was published.
    pub fn mark_tampered(&mut self) {
        self.tampered.fill(true);
        self.generation += 1;
    }

    /// Changes whenever buffers written earlier may have been overwritten
    /// since (see [`Self::post`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the guest wrote `queue`'s rings by hand.
    pub fn tampered(&self, queue: usize) -> bool {
        self.tampered[queue]
    }

    /// How many chains the device returned on `queue`.
    pub fn used_idx(&self, queue: usize) -> u16 {
        self.read_obj(self.ring_addresses(queue).2 + 2)
    }

    /// Used element `n` of `queue`: (head index, used length).
    pub fn used(&self, queue: usize, n: u16) -> (u32, u32) {
        let at = self.ring_addresses(queue).2 + 4 + u64::from(n % QUEUE_LEN) * 8;
        (self.read_obj(at), self.read_obj(at + 4))
    }

    /// Checks `queue`'s used ring: a device returns at most the chains it
    /// was given, each by a head index within the queue.
    pub fn check_used(&self, queue: usize) {
        if self.tampered[queue] {
            return;
        }
        let used = self.used_idx(queue);
        assert!(
            used <= self.published[queue],
            "queue {queue}: {used} chains used, {} made available",
            self.published[queue]
        );
        for n in 0..used.min(QUEUE_LEN) {
            let (id, _) = self.used(queue, n);
            assert!(
                id < u32::from(QUEUE_LEN),
                "queue {queue}: used element {n} names head {id}"
            );
        }
    }

    /// Checks every queue's used ring (see [`Self::check_used`]).
    pub fn check_all_used(&self) {
        for queue in 0..self.queues.len() {
            self.check_used(queue);
        }
    }

    /// `len` bytes of guest memory at `address` (fewer past its end).
    pub fn read(&self, address: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        let _ = self.memory.read_slice(&mut bytes, GuestAddress(address));
        bytes
    }

    fn read_obj<T: vm_memory::ByteValued>(&self, address: u64) -> T {
        self.memory
            .read_obj(GuestAddress(address))
            .expect("the rings lie in guest memory")
    }

    fn write_obj<T: vm_memory::ByteValued>(&self, address: u64, value: T) {
        self.memory
            .write_obj(value, GuestAddress(address))
            .expect("the rings lie in guest memory");
    }
}
