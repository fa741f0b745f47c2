//! The vsock device driven the way the Linux driver drives it: packets on
//! mock virtqueues in real guest memory, real host Unix sockets, and the
//! device's own event loop glue under a real `EventManager`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::packet::*;
use super::*;

const GUEST_CID: u64 = 3;
const QUEUE_LEN: u16 = 128;
const BUFFER_LEN: u32 = 4096 + HEADER_SIZE as u32;
const RX_BUFFERS: u64 = 0x10_0000;
const TX_BUFFERS: u64 = 0x80_0000;
const WRITE_ONLY: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

/// The guest side: a driver putting buffers on the queues and reading what
/// the device used.
struct Guest<'a> {
    memory: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    rx_posted: u16,
    rx_seen: u16,
    tx_posted: u16,
}

impl<'a> Guest<'a> {
    fn new(memory: &'a GuestMemoryMmap) -> Self {
        Self {
            memory,
            rx: MockSplitQueue::create(memory, GuestAddress(0), QUEUE_LEN),
            tx: MockSplitQueue::create(memory, GuestAddress(0x8000), QUEUE_LEN),
            rx_posted: 0,
            rx_seen: 0,
            tx_posted: 0,
        }
    }

    fn post_rx_buffers(&mut self, count: u16) {
        for _ in 0..count {
            let index = self.rx_posted;
            let desc = SplitDescriptor::new(
                RX_BUFFERS + index as u64 * BUFFER_LEN as u64,
                BUFFER_LEN,
                WRITE_ONLY,
                0,
            );
            self.rx
                .add_desc_chains(&[RawDescriptor::from(desc)], index)
                .unwrap();
            self.rx_posted += 1;
        }
    }

    fn send(&mut self, header: PacketHeader, payload: &[u8]) {
        let index = self.tx_posted;
        let address = TX_BUFFERS + index as u64 * 0x1_1000;
        let mut header = header;
        header.len = payload.len() as u32;
        self.memory
            .write_obj(header, GuestAddress(address))
            .unwrap();
        self.memory
            .write_slice(payload, GuestAddress(address + HEADER_SIZE as u64))
            .unwrap();
        let desc = SplitDescriptor::new(address, (HEADER_SIZE + payload.len()) as u32, 0, 0);
        self.tx
            .add_desc_chains(&[RawDescriptor::from(desc)], index)
            .unwrap();
        self.tx_posted += 1;
    }

    /// Packets the device wrote into rx buffers since the last call.
    fn received(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        let used = self.rx.used();
        let mut packets = Vec::new();
        while self.rx_seen < used.idx().load() {
            let element = used.ring().ref_at(self.rx_seen as usize).unwrap().load();
            let address = GuestAddress(RX_BUFFERS + element.id() as u64 * BUFFER_LEN as u64);
            let header: PacketHeader = self.memory.read_obj(address).unwrap();
            let mut payload = vec![0u8; header.len as usize];
            self.memory
                .read_slice(&mut payload, GuestAddress(address.0 + HEADER_SIZE as u64))
                .unwrap();
            assert_eq!(element.len() as usize, HEADER_SIZE + payload.len());
            packets.push((header, payload));
            self.rx_seen += 1;
        }
        packets
    }
}

fn from_guest(op: u16, guest_port: u32, host_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 256 * 1024,
        ..Default::default()
    }
}

struct Harness {
    _dir: tempdir::Dir,
    path: PathBuf,
    device: Arc<Mutex<Vsock>>,
    events: EventManager<Arc<Mutex<Vsock>>>,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "vsock-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Harness {
    fn new(memory: &GuestMemoryMmap, guest: &Guest) -> Self {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("vsock.sock");
        let mut vsock = Vsock::new(GUEST_CID, path.clone()).unwrap();
        vsock.queues[RX_QUEUE] = guest.rx.create_queue().unwrap();
        vsock.queues[TX_QUEUE] = guest.tx.create_queue().unwrap();
        vsock.queues[EVENT_QUEUE] = guest.tx.create_queue().unwrap();
        vsock.activate(memory.clone()).unwrap();
        let device = Arc::new(Mutex::new(vsock));
        let mut events = EventManager::new().unwrap();
        events.add_subscriber(device.clone());
        Self {
            _dir: dir,
            path,
            device,
            events,
        }
    }

    /// The guest kicks a queue.
    fn kick(&self, queue: usize) {
        self.device.lock().unwrap().queue_events[queue]
            .write(1)
            .unwrap();
    }

    /// Runs the event loop until it is idle.
    fn settle(&mut self) {
        while self.events.run_with_timeout(50).unwrap() > 0 {}
    }

    /// A host process connecting to guest port `port`; returns the stream
    /// and the host port the device gave it, after the guest accepted.
    fn host_connect(&mut self, guest: &mut Guest, port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.path).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        self.settle();
        let packets = guest.received();
        assert_eq!(packets.len(), 1, "{packets:?}");
        let (request, _) = packets[0];
        assert_eq!({ request.op }, OP_REQUEST);
        assert_eq!(
            ({ request.src_cid }, { request.dst_cid }),
            (HOST_CID, GUEST_CID)
        );
        assert_eq!({ request.dst_port }, port);
        assert!({ request.src_port } >= 1 << 30);
        guest.send(from_guest(OP_RESPONSE, port, request.src_port), b"");
        self.kick(TX_QUEUE);
        self.settle();
        let mut reply = [0u8; 64];
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let n = host.read(&mut reply).unwrap();
        assert_eq!(
            std::str::from_utf8(&reply[..n]).unwrap(),
            format!("OK {}\n", { request.src_port })
        );
        (host, request.src_port)
    }
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap()
}

#[test]
fn a_host_connection_reaches_the_guest_and_carries_data_both_ways() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(16);
    let mut harness = Harness::new(&memory, &guest);
    let (mut host, host_port) = harness.host_connect(&mut guest, 1024);

    host.write_all(b"ping").unwrap();
    harness.settle();
    let packets = guest.received();
    assert_eq!(packets.len(), 1);
    assert_eq!({ packets[0].0.op }, OP_RW);
    assert_eq!(packets[0].1, b"ping");

    guest.send(from_guest(OP_RW, 1024, host_port), b"pong");
    harness.kick(TX_QUEUE);
    harness.settle();
    let mut got = [0u8; 4];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
}

#[test]
fn the_guest_refusing_a_connection_closes_the_host_socket() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(4);
    let mut harness = Harness::new(&memory, &guest);
    let mut host = UnixStream::connect(&harness.path).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    harness.settle();
    let (request, _) = guest.received()[0];
    guest.send(from_guest(OP_RST, 1024, request.src_port), b"");
    harness.kick(TX_QUEUE);
    harness.settle();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).unwrap(), 0, "the host should see EOF");
    assert_eq!(harness.device.lock().unwrap().connection_count(), 0);
}

#[test]
fn a_bad_connect_line_is_dropped_without_bothering_the_guest() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(4);
    let mut harness = Harness::new(&memory, &guest);
    let mut host = UnixStream::connect(&harness.path).unwrap();
    host.write_all(b"HELLO there\n").unwrap();
    harness.settle();
    assert!(guest.received().is_empty());
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).unwrap(), 0);
}

#[test]
fn host_data_waits_for_guest_credit() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(16);
    let mut harness = Harness::new(&memory, &guest);
    let mut host = UnixStream::connect(&harness.path).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    harness.settle();
    let (request, _) = guest.received()[0];
    let mut response = from_guest(OP_RESPONSE, 1024, request.src_port);
    response.buf_alloc = 8;
    guest.send(response, b"");
    harness.kick(TX_QUEUE);
    harness.settle();

    host.write_all(&[b'x'; 20]).unwrap();
    harness.settle();
    let first: usize = guest.received().iter().map(|(_, data)| data.len()).sum();
    assert_eq!(first, 8, "the guest only had room for 8 bytes");

    let mut update = from_guest(OP_CREDIT_UPDATE, 1024, request.src_port);
    update.buf_alloc = 8;
    update.fwd_cnt = 8;
    guest.send(update, b"");
    harness.kick(TX_QUEUE);
    harness.settle();
    let second: usize = guest.received().iter().map(|(_, data)| data.len()).sum();
    assert_eq!(second, 8);
}

#[test]
fn rx_waits_for_guest_buffers() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(1);
    let mut harness = Harness::new(&memory, &guest);
    let mut host = UnixStream::connect(&harness.path).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    harness.settle();
    let (request, _) = guest.received()[0];
    guest.send(from_guest(OP_RESPONSE, 1024, request.src_port), b"");
    harness.kick(TX_QUEUE);
    harness.settle();
    host.write_all(b"later").unwrap();
    harness.settle();
    assert!(guest.received().is_empty(), "no rx buffer was free");
    guest.post_rx_buffers(1);
    harness.kick(RX_QUEUE);
    harness.settle();
    assert_eq!(guest.received()[0].1, b"later");
}

#[test]
fn a_host_close_shuts_the_guest_side_and_the_guest_reset_forgets_it() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(8);
    let mut harness = Harness::new(&memory, &guest);
    let (host, host_port) = harness.host_connect(&mut guest, 1024);
    drop(host);
    harness.settle();
    let packets = guest.received();
    assert_eq!(packets.len(), 1);
    assert_eq!({ packets[0].0.op }, OP_SHUTDOWN);
    assert_eq!({ packets[0].0.flags } & SHUTDOWN_SEND, SHUTDOWN_SEND);
    guest.send(from_guest(OP_RST, 1024, host_port), b"");
    harness.kick(TX_QUEUE);
    harness.settle();
    assert_eq!(harness.device.lock().unwrap().connection_count(), 0);
}

#[test]
fn a_guest_close_flushes_then_resets() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(8);
    let mut harness = Harness::new(&memory, &guest);
    let (mut host, host_port) = harness.host_connect(&mut guest, 1024);
    guest.send(from_guest(OP_RW, 1024, host_port), b"last words");
    let mut shutdown = from_guest(OP_SHUTDOWN, 1024, host_port);
    shutdown.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    guest.send(shutdown, b"");
    harness.kick(TX_QUEUE);
    harness.settle();
    let mut got = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
    let packets = guest.received();
    assert_eq!({ packets.last().unwrap().0.op }, OP_RST);
    assert_eq!(harness.device.lock().unwrap().connection_count(), 0);
}

#[test]
fn a_guest_connection_reaches_a_host_listener_on_path_underscore_port() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(8);
    let mut harness = Harness::new(&memory, &guest);
    let listener = UnixListener::bind(format!("{}_5000", harness.path.display())).unwrap();
    guest.send(from_guest(OP_REQUEST, 40000, 5000), b"");
    guest.send(from_guest(OP_RW, 40000, 5000), b"hello host");
    // Nobody listens on port 5001.
    guest.send(from_guest(OP_REQUEST, 40001, 5001), b"");
    harness.kick(TX_QUEUE);
    harness.settle();
    let packets = guest.received();
    let ops: Vec<(u16, u32)> = packets.iter().map(|(h, _)| (h.op, h.dst_port)).collect();
    assert_eq!(ops, vec![(OP_RESPONSE, 40000), (OP_RST, 40001)]);
    let (mut accepted, _) = listener.accept().unwrap();
    let mut got = [0u8; 10];
    accepted.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");
}

#[test]
fn packets_with_foreign_cids_are_dropped() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(4);
    let mut harness = Harness::new(&memory, &guest);
    let mut spoofed = from_guest(OP_REQUEST, 40000, 5000);
    spoofed.src_cid = 7;
    guest.send(spoofed, b"");
    harness.kick(TX_QUEUE);
    harness.settle();
    assert!(guest.received().is_empty());
}

#[test]
fn bad_cids_and_busy_paths_are_named() {
    let dir = tempdir::Dir::new();
    let path = dir.0.join("v.sock");
    assert!(matches!(
        Vsock::new(2, path.clone()),
        Err(VsockError::BadCid(2))
    ));
    let _first = Vsock::new(3, path.clone()).unwrap();
    let err = Vsock::new(3, path.clone()).err().unwrap();
    assert!(err.to_string().contains("v.sock"), "{err}");
}
