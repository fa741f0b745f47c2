//! The vsock device driven the way the Linux driver drives it: packets on
//! mock virtqueues in real guest memory, real host Unix sockets, and the
//! device's own event loop glue under a real `EventManager`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use vm_memory::{ByteValued, GuestMemoryMmap};

use super::muxer::{MAX_CONNECTIONS, MAX_PENDING_CONTROL};
use super::packet::*;
use super::*;
use crate::devices::virtio::test_driver::{guest_memory, Buffer, DeviceLoop, GuestDriver};

const GUEST_CID: u64 = 3;
const BUFFER_LEN: u32 = 4096 + HEADER_SIZE as u32;

/// The guest's vsock driver: packets in single-buffer chains on the rx and
/// tx queues (the event queue unused).
struct Guest<'a> {
    driver: GuestDriver<'a>,
    rx_seen: u16,
}

impl<'a> Guest<'a> {
    fn new(memory: &'a GuestMemoryMmap) -> Self {
        Self {
            driver: GuestDriver::new(memory, 3),
            rx_seen: 0,
        }
    }

    fn post_rx_buffers(&mut self, count: u16) {
        for _ in 0..count {
            self.driver.post(RX_QUEUE, &[Buffer::Writable(BUFFER_LEN)]);
        }
    }

    fn send(&mut self, header: PacketHeader, payload: &[u8]) {
        let mut header = header;
        header.len = payload.len() as u32;
        let packet = [header.as_slice(), payload].concat();
        self.driver.post(TX_QUEUE, &[Buffer::Readable(&packet)]);
    }

    /// Packets the device wrote into rx buffers since the last call.
    fn received(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        let mut packets = Vec::new();
        while self.rx_seen < self.driver.used_idx(RX_QUEUE) {
            let (id, len) = self.driver.used(RX_QUEUE, self.rx_seen);
            let (address, _) = self.driver.descriptor(RX_QUEUE, id as u16);
            let header = PacketHeader::from_slice(&self.driver.read(address, HEADER_SIZE))
                .copied()
                .unwrap();
            let payload = self
                .driver
                .read(address + HEADER_SIZE as u64, header.len as usize);
            assert_eq!(len as usize, HEADER_SIZE + payload.len());
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

/// The device on its event loop, listening on `path` in a scratch directory.
struct Harness {
    _dir: tempdir::Dir,
    path: PathBuf,
    device: DeviceLoop<Vsock>,
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
    fn new(guest: &Guest) -> Self {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("vsock.sock");
        let mut vsock = Vsock::new(GUEST_CID, path.clone()).unwrap();
        guest.driver.activate(&mut vsock, FEATURE_VERSION_1);
        Self {
            _dir: dir,
            path,
            device: DeviceLoop::new(vsock),
        }
    }

    /// A host process connecting to guest port `port`; returns the stream
    /// and the host port the device gave it, after the guest accepted.
    fn host_connect(&mut self, guest: &mut Guest, port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.path).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        self.device.settle();
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
        self.device.kick(TX_QUEUE);
        self.device.settle();
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

#[test]
fn a_host_connection_reaches_the_guest_and_carries_data_both_ways() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(16);
    let mut harness = Harness::new(&guest);
    let (mut host, host_port) = harness.host_connect(&mut guest, 1024);

    host.write_all(b"ping").unwrap();
    harness.device.settle();
    let packets = guest.received();
    assert_eq!(packets.len(), 1);
    assert_eq!({ packets[0].0.op }, OP_RW);
    assert_eq!(packets[0].1, b"ping");

    guest.send(from_guest(OP_RW, 1024, host_port), b"pong");
    harness.device.kick(TX_QUEUE);
    harness.device.settle();
    let mut got = [0u8; 4];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
}

#[test]
fn the_guest_refusing_a_connection_closes_the_host_socket() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(4);
    let mut harness = Harness::new(&guest);
    let mut host = UnixStream::connect(&harness.path).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    harness.device.settle();
    let (request, _) = guest.received()[0];
    guest.send(from_guest(OP_RST, 1024, request.src_port), b"");
    harness.device.kick(TX_QUEUE);
    harness.device.settle();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).unwrap(), 0, "the host should see EOF");
    assert_eq!(harness.device.lock().connection_count(), 0);
}

#[test]
fn a_bad_connect_line_is_dropped_without_bothering_the_guest() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(4);
    let mut harness = Harness::new(&guest);
    let mut host = UnixStream::connect(&harness.path).unwrap();
    host.write_all(b"HELLO there\n").unwrap();
    harness.device.settle();
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
    let mut harness = Harness::new(&guest);
    let mut host = UnixStream::connect(&harness.path).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    harness.device.settle();
    let (request, _) = guest.received()[0];
    let mut response = from_guest(OP_RESPONSE, 1024, request.src_port);
    response.buf_alloc = 8;
    guest.send(response, b"");
    harness.device.kick(TX_QUEUE);
    harness.device.settle();

    host.write_all(&[b'x'; 20]).unwrap();
    harness.device.settle();
    let first: usize = guest.received().iter().map(|(_, data)| data.len()).sum();
    assert_eq!(first, 8, "the guest only had room for 8 bytes");

    let mut update = from_guest(OP_CREDIT_UPDATE, 1024, request.src_port);
    update.buf_alloc = 8;
    update.fwd_cnt = 8;
    guest.send(update, b"");
    harness.device.kick(TX_QUEUE);
    harness.device.settle();
    let second: usize = guest.received().iter().map(|(_, data)| data.len()).sum();
    assert_eq!(second, 8);
}

#[test]
fn rx_waits_for_guest_buffers() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(1);
    let mut harness = Harness::new(&guest);
    let mut host = UnixStream::connect(&harness.path).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    harness.device.settle();
    let (request, _) = guest.received()[0];
    guest.send(from_guest(OP_RESPONSE, 1024, request.src_port), b"");
    harness.device.kick(TX_QUEUE);
    harness.device.settle();
    host.write_all(b"later").unwrap();
    harness.device.settle();
    assert!(guest.received().is_empty(), "no rx buffer was free");
    guest.post_rx_buffers(1);
    harness.device.kick(RX_QUEUE);
    harness.device.settle();
    assert_eq!(guest.received()[0].1, b"later");
}

#[test]
fn a_host_close_shuts_the_guest_side_and_the_guest_reset_forgets_it() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(8);
    let mut harness = Harness::new(&guest);
    let (host, host_port) = harness.host_connect(&mut guest, 1024);
    drop(host);
    harness.device.settle();
    let packets = guest.received();
    assert_eq!(packets.len(), 1);
    assert_eq!({ packets[0].0.op }, OP_SHUTDOWN);
    assert_eq!({ packets[0].0.flags } & SHUTDOWN_SEND, SHUTDOWN_SEND);
    guest.send(from_guest(OP_RST, 1024, host_port), b"");
    harness.device.kick(TX_QUEUE);
    harness.device.settle();
    assert_eq!(harness.device.lock().connection_count(), 0);
}

#[test]
fn a_guest_close_flushes_then_resets() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(8);
    let mut harness = Harness::new(&guest);
    let (mut host, host_port) = harness.host_connect(&mut guest, 1024);
    guest.send(from_guest(OP_RW, 1024, host_port), b"last words");
    let mut shutdown = from_guest(OP_SHUTDOWN, 1024, host_port);
    shutdown.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    guest.send(shutdown, b"");
    harness.device.kick(TX_QUEUE);
    harness.device.settle();
    let mut got = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
    let packets = guest.received();
    assert_eq!({ packets.last().unwrap().0.op }, OP_RST);
    assert_eq!(harness.device.lock().connection_count(), 0);
}

#[test]
fn a_guest_connection_reaches_a_host_listener_on_path_underscore_port() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(8);
    let mut harness = Harness::new(&guest);
    let listener = UnixListener::bind(format!("{}_5000", harness.path.display())).unwrap();
    guest.send(from_guest(OP_REQUEST, 40000, 5000), b"");
    guest.send(from_guest(OP_RW, 40000, 5000), b"hello host");
    // Nobody listens on port 5001.
    guest.send(from_guest(OP_REQUEST, 40001, 5001), b"");
    harness.device.kick(TX_QUEUE);
    harness.device.settle();
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
    let mut harness = Harness::new(&guest);
    let mut spoofed = from_guest(OP_REQUEST, 40000, 5000);
    spoofed.src_cid = 7;
    guest.send(spoofed, b"");
    harness.device.kick(TX_QUEUE);
    harness.device.settle();
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

/// Sends `count` REQUESTs from guest ports `first_port..` to host port
/// `host_port`, in batches the queues hold, with an rx buffer for each
/// reply when `with_rx`; accepts what reaches `listener`. Returns every
/// packet the guest received.
fn connect_storm(
    guest: &mut Guest,
    harness: &mut Harness,
    listener: Option<&UnixListener>,
    accepted: &mut Vec<UnixStream>,
    first_port: u32,
    count: u32,
    with_rx: bool,
) -> Vec<PacketHeader> {
    let mut received = Vec::new();
    let mut sent = 0;
    while sent < count {
        // Under a host listener's backlog (128), accepted between batches.
        let batch = (count - sent).min(100);
        if with_rx {
            guest.post_rx_buffers(batch as u16);
        }
        for i in 0..batch {
            guest.send(from_guest(OP_REQUEST, first_port + sent + i, 5000), b"");
        }
        sent += batch;
        harness.device.kick(TX_QUEUE);
        harness.device.settle();
        if let Some(listener) = listener {
            while let Ok((stream, _)) = listener.accept() {
                accepted.push(stream);
            }
        }
        received.extend(guest.received().into_iter().map(|(header, _)| header));
    }
    received
}

#[test]
fn a_guest_connect_storm_stops_at_the_connection_cap_with_rsts() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    let mut harness = Harness::new(&guest);
    let listener = UnixListener::bind(format!("{}_5000", harness.path.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    let extra = 50;
    let total = MAX_CONNECTIONS as u32 + extra;
    let received = connect_storm(
        &mut guest,
        &mut harness,
        Some(&listener),
        &mut accepted,
        10_000,
        total,
        true,
    );
    let responses = received.iter().filter(|h| h.op == OP_RESPONSE).count();
    let resets: Vec<u32> = received
        .iter()
        .filter(|h| h.op == OP_RST)
        .map(|h| h.dst_port)
        .collect();
    assert_eq!(responses, MAX_CONNECTIONS);
    // The last ones asked are the ones refused.
    assert_eq!(
        resets,
        (10_000 + MAX_CONNECTIONS as u32..10_000 + total).collect::<Vec<_>>()
    );
    let device = harness.device.lock();
    assert_eq!(device.connection_count(), MAX_CONNECTIONS);
    assert_eq!(device.muxer().refused_connections(), extra as u64);
    drop(device);
    // A host connection beyond the cap is closed at once.
    let mut host = UnixStream::connect(&harness.path).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    harness.device.settle();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 8];
    // Closed with its CONNECT line unread: a reset, or EOF.
    match host.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the host connection should be closed: {other:?}"),
    }
    assert!(guest.received().is_empty());
    // A guest RST frees a place, which the next connection takes.
    guest.send(from_guest(OP_RST, 10_000, 5000), b"");
    guest.post_rx_buffers(1);
    guest.send(from_guest(OP_REQUEST, 9_999, 5000), b"");
    harness.device.kick(TX_QUEUE);
    harness.device.settle();
    let replies: Vec<(u16, u32)> = guest
        .received()
        .iter()
        .map(|(h, _)| (h.op, h.dst_port))
        .collect();
    assert_eq!(replies, vec![(OP_RESPONSE, 9_999)]);
}

#[test]
fn control_packets_for_a_guest_that_takes_no_replies_stop_at_their_cap() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    let mut harness = Harness::new(&guest);
    // Nobody listens on port 5000: each REQUEST earns a RST, and the guest
    // posts no rx buffer to take them.
    let extra = 44;
    let received = connect_storm(
        &mut guest,
        &mut harness,
        None,
        &mut Vec::new(),
        10_000,
        MAX_PENDING_CONTROL as u32 + extra,
        false,
    );
    assert!(received.is_empty());
    let device = harness.device.lock();
    assert_eq!(device.muxer().pending_control(), MAX_PENDING_CONTROL);
    assert_eq!(device.muxer().dropped_control(), extra as u64);
    assert_eq!(device.connection_count(), 0);
    drop(device);
    // Given buffers, the guest gets the RSTs that were kept, no more.
    guest.post_rx_buffers(200);
    harness.device.kick(RX_QUEUE);
    harness.device.settle();
    let mut resets = guest.received().len();
    guest.post_rx_buffers(100);
    harness.device.kick(RX_QUEUE);
    harness.device.settle();
    resets += guest.received().len();
    assert_eq!(resets, MAX_PENDING_CONTROL);
    assert_eq!(harness.device.lock().muxer().pending_control(), 0);
}

fn listen_with_backlog(path: &str, backlog: usize) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &UnixAddr::new(path).unwrap(),
    )
    .unwrap();
    listen(&fd, Backlog::new(backlog as i32).unwrap()).unwrap();
    fd
}

#[test]
fn a_host_listener_that_does_not_accept_gets_rsts_without_blocking_the_device() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    let mut harness = Harness::new(&guest);
    // Never accepted: its backlog (of 16) fills, and a blocking connect
    // would then wait for an accept that never comes.
    let path = format!("{}_5000", harness.path.display());
    let _listener = listen_with_backlog(&path, 16);
    let received = connect_storm(
        &mut guest,
        &mut harness,
        None,
        &mut Vec::new(),
        10_000,
        400,
        true,
    );
    let responses = received.iter().filter(|h| h.op == OP_RESPONSE).count();
    let resets = received.iter().filter(|h| h.op == OP_RST).count();
    assert_eq!(responses + resets, 400);
    assert!(
        resets > 0,
        "the backlog never filled ({responses} accepted)"
    );
}

#[test]
fn busy_connections_take_turns_on_the_rx_queue() {
    let memory = guest_memory();
    let mut guest = Guest::new(&memory);
    guest.post_rx_buffers(2);
    let mut harness = Harness::new(&guest);
    let (mut first, first_port) = harness.host_connect(&mut guest, 1024);
    let (mut second, second_port) = harness.host_connect(&mut guest, 1025);
    // Both have far more than the guest's buffers take, and are known to
    // have it before the guest has room for any.
    first.write_all(&[1u8; 64 * 1024]).unwrap();
    second.write_all(&[2u8; 64 * 1024]).unwrap();
    harness.device.settle();
    guest.post_rx_buffers(8);
    harness.device.kick(RX_QUEUE);
    harness.device.settle();
    let sources: Vec<u32> = guest
        .received()
        .iter()
        .filter(|(h, _)| h.op == OP_RW)
        .map(|(h, _)| h.src_port)
        .collect();
    assert!(sources.len() >= 6, "{sources:?}");
    let from_first = sources.iter().filter(|&&p| p == first_port).count();
    let from_second = sources.iter().filter(|&&p| p == second_port).count();
    assert!(from_first.abs_diff(from_second) <= 1, "{sources:?}");
    assert!(
        sources.windows(2).all(|pair| pair[0] != pair[1]),
        "one connection served twice in a row: {sources:?}"
    );
}
