//! The virtio-net device driven the way the Linux driver drives it: chains
//! on mock virtqueues in real guest memory, the device's own event-loop glue
//! under a real `EventManager`, and either a real tap in a netns of its own
//! (skipped, with the reason printed, where taps cannot be made) or a
//! SOCK_SEQPACKET socket pair standing in for it (logic that does not depend
//! on the kernel's tap).

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use virtio_bindings::virtio_net::*;
use virtio_queue::QueueT;

use super::device::{min_rx_len, AVAIL_FEATURES, FEATURE_EVENT_IDX};
use super::tap::{offload_for, Tap};
use super::test_tap::{self, TestTap};
use super::*;
use crate::devices::virtio::mmio::FEATURE_VERSION_1;
use crate::devices::virtio::test_driver::{
    guest_memory, Buffer, DeviceLoop, GuestDriver, MEMORY_SIZE, WRITE,
};
use crate::devices::virtio::VirtioDevice;

const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

const fn bit(b: u32) -> u64 {
    1 << b
}

/// What Linux 6.1 acks of our offer.
const LINUX_FEATURES: u64 = AVAIL_FEATURES;
/// The same without TSO (MTU-sized RX buffers suffice).
const SMALL_RX_FEATURES: u64 =
    AVAIL_FEATURES & !(bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6));

/// An Ethernet frame of `len` bytes to `dst`, with a recognisable payload.
fn frame(dst: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&[0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
    frame.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental
    frame.extend((0..len - ETH_HLEN).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    frame
}

/// Frames the device dropped so far.
fn dropped(h: &DeviceLoop<Net>) -> u64 {
    h.lock().drops.total
}

/// A SOCK_SEQPACKET socket pair: (the device's end, the peer's).
fn fake_net_fds() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into `fds`.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: both fds are new and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A device on a socket pair standing in for the tap; returns the peer end.
fn fake_net() -> (Net, OwnedFd) {
    let (ours, peer) = fake_net_fds();
    (Net::with_tap(Tap::fake(ours), MAC, 1500).unwrap(), peer)
}

fn peer_send(peer: &OwnedFd, bytes: &[u8]) {
    // SAFETY: send reads `bytes`, whose length we pass.
    let n = unsafe { libc::send(peer.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    assert_eq!(n, bytes.len() as isize);
}

/// Every message waiting on the peer end.
fn peer_receive_all(peer: &OwnedFd) -> Vec<Vec<u8>> {
    let mut messages = Vec::new();
    let mut buffer = vec![0u8; 70_000];
    loop {
        // SAFETY: recv writes at most buffer.len() bytes into `buffer`.
        let n = unsafe {
            libc::recv(
                peer.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return messages;
        }
        messages.push(buffer[..n as usize].to_vec());
    }
}

/// A real tap, or None (and a printed reason) where none can be made.
fn real_tap(mtu: u32) -> Option<TestTap> {
    match test_tap::create(mtu) {
        Ok(tap) => Some(tap),
        Err(reason) => {
            eprintln!("skipping: {reason}");
            None
        }
    }
}

fn vnet_header_bytes(bytes: &[u8]) -> [u8; VNET_HDR_LEN] {
    bytes[..VNET_HDR_LEN].try_into().unwrap()
}

// ---------------------------------------------------------------------------
// Features, config space, offloads, configuration.

#[test]
fn offers_exactly_the_agreed_features() {
    let (net, _peer) = fake_net();
    let expected = [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_STATUS,
        virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
        virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC,
        32, // VIRTIO_F_VERSION_1
    ]
    .iter()
    .fold(0u64, |acc, b| acc | bit(*b));
    assert_eq!(net.avail_features(), expected);
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.avail_features() & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
    assert_eq!(net.queue_events().len(), 2);
    assert!(net.queues().iter().all(|q| q.max_size() == QUEUE_SIZE));
}

#[test]
fn acked_features_are_masked_by_the_offer() {
    let (mut net, _peer) = fake_net();
    net.set_acked_features(u64::MAX);
    assert_eq!(net.acked_features(), AVAIL_FEATURES);
    net.set_acked_features(bit(VIRTIO_NET_F_MRG_RXBUF) | FEATURE_VERSION_1);
    assert_eq!(net.acked_features(), FEATURE_VERSION_1);
}

#[test]
fn config_space_holds_mac_status_pairs_and_mtu() {
    let (net, _peer) = fake_net();
    let mut config = [0xffu8; 16];
    net.read_config(0, &mut config);
    assert_eq!(
        config,
        [
            0x02, 0x11, 0x22, 0x33, 0x44, 0x55, // mac
            0x01, 0x00, // status: LINK_UP
            0x01, 0x00, // max_virtqueue_pairs
            0xdc, 0x05, // mtu 1500
            0, 0, 0, 0, // beyond the end
        ]
    );
    let mut mtu = [0u8; 2];
    net.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 1500);
    let mut status = [0u8; 1];
    net.read_config(6, &mut status);
    assert_eq!(status, [VIRTIO_NET_S_LINK_UP as u8]);
    let mut far = [0xffu8; 4];
    net.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn config_space_writes_are_ignored_and_mtu_is_configurable() {
    let (ours, _peer) = fake_net_fds();
    let mut net = Net::with_tap(Tap::fake(ours), MAC, 9000).unwrap();
    net.write_config(0, &[0; 6]);
    let mut config = [0u8; CONFIG_SPACE_SIZE];
    net.read_config(0, &mut config);
    assert_eq!(config[..6], MAC);
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 9000);
}

#[test]
fn offloads_follow_what_the_guest_can_receive() {
    let csum = bit(VIRTIO_NET_F_GUEST_CSUM);
    let tso4 = bit(VIRTIO_NET_F_GUEST_TSO4);
    let tso6 = bit(VIRTIO_NET_F_GUEST_TSO6);
    let host = bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6);
    assert_eq!(offload_for(0), 0);
    assert_eq!(offload_for(host), 0, "HOST_* need no tap flag");
    assert_eq!(offload_for(csum), libc::TUN_F_CSUM);
    assert_eq!(offload_for(tso4 | tso6), 0, "TSO without checksum offload");
    assert_eq!(
        offload_for(csum | tso4),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4
    );
    assert_eq!(
        offload_for(csum | tso6),
        libc::TUN_F_CSUM | libc::TUN_F_TSO6
    );
    assert_eq!(
        offload_for(AVAIL_FEATURES),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
}

#[test]
fn rx_buffers_must_hold_a_whole_frame() {
    assert_eq!(min_rx_len(SMALL_RX_FEATURES, 1500), 12 + 14 + 1500);
    assert_eq!(min_rx_len(LINUX_FEATURES, 1500), 65562);
    assert_eq!(
        min_rx_len(FEATURE_VERSION_1 | bit(VIRTIO_NET_F_GUEST_TSO6), 1500),
        65562
    );
}

// ---------------------------------------------------------------------------
// Data path on the socket pair: guest-controlled input, notifications.

#[test]
fn bad_tx_chains_are_dropped_and_the_device_keeps_going() {
    let memory = guest_memory();
    let mut driver = GuestDriver::new(&memory, NUM_QUEUES);
    let (mut net, peer) = fake_net();
    driver.activate(&mut net, LINUX_FEATURES);
    let mut h = DeviceLoop::new(net);
    let good = [&[0u8; VNET_HDR_LEN][..], &frame([0xff; 6], 60, 1)].concat();
    // A device-writable buffer, one outside guest memory, one straddling
    // its end, a runt, one too long, then a good frame.
    driver.post(TX_QUEUE, &[Buffer::Writable(100)]);
    driver.post(TX_QUEUE, &[Buffer::Raw(1 << 40, 100, 0)]);
    driver.post(TX_QUEUE, &[Buffer::Raw(MEMORY_SIZE as u64 - 10, 100, 0)]);
    driver.post(TX_QUEUE, &[Buffer::Readable(&[0u8; 20])]);
    driver.post(
        TX_QUEUE,
        &[
            Buffer::Readable(&vec![0u8; 65536]),
            Buffer::Readable(&[0u8; 100]),
        ],
    );
    driver.post(
        TX_QUEUE,
        &[Buffer::Readable(&good[..30]), Buffer::Readable(&good[30..])],
    );
    h.kick(TX_QUEUE);
    h.settle();
    assert_eq!(driver.used_idx(TX_QUEUE), 6);
    for n in 0..6 {
        assert_eq!(driver.used(TX_QUEUE, n).1, 0);
    }
    assert_eq!(peer_receive_all(&peer), vec![good]);
    assert_eq!(dropped(&h), 5);
    assert!(h.interrupted());
}

#[test]
fn bad_rx_chains_are_returned_empty_and_the_frame_waits_for_a_good_one() {
    let memory = guest_memory();
    let mut driver = GuestDriver::new(&memory, NUM_QUEUES);
    let (mut net, peer) = fake_net();
    driver.activate(&mut net, SMALL_RX_FEATURES);
    let mut h = DeviceLoop::new(net);
    driver.post(RX_QUEUE, &[Buffer::Readable(&[0u8; 2048])]);
    driver.post(
        RX_QUEUE,
        &[Buffer::Writable(1024), Buffer::Readable(&[0u8; 1024])],
    );
    driver.post(RX_QUEUE, &[Buffer::Raw(1 << 40, 2048, WRITE)]);
    // The header straddles two descriptors: num_buffers lands in the second.
    let good = driver.post(RX_QUEUE, &[Buffer::Writable(8), Buffer::Writable(2048)]);
    let message = [&[0u8; VNET_HDR_LEN][..], &frame(MAC, 100, 2)].concat();
    peer_send(&peer, &message);
    h.run_until("the frame", || driver.used_idx(RX_QUEUE) == 4);
    for n in 0..3 {
        assert_eq!(driver.used(RX_QUEUE, n).1, 0);
    }
    assert_eq!(driver.used(RX_QUEUE, 3), (4, message.len() as u32));
    let received = driver.read_chain(&good, message.len());
    assert_eq!(&received[..10], &message[..10]);
    assert_eq!(&received[10..12], &1u16.to_le_bytes());
    assert_eq!(&received[12..], &message[12..]);
    assert_eq!(dropped(&h), 3);
}

#[test]
fn indirect_chains_carry_frames_both_ways() {
    // Linux posts its 64 KiB GSO RX buffers (header + 17 pages) and
    // multi-part TX frames as indirect tables when INDIRECT_DESC is agreed.
    let memory = guest_memory();
    let mut driver = GuestDriver::new(&memory, NUM_QUEUES);
    let (mut net, peer) = fake_net();
    driver.activate(&mut net, LINUX_FEATURES);
    let mut h = DeviceLoop::new(net);

    let sent = [&[0u8; VNET_HDR_LEN][..], &frame([0xff; 6], 3000, 3)].concat();
    driver.post_indirect(
        TX_QUEUE,
        &[
            Buffer::Readable(&sent[..VNET_HDR_LEN]),
            Buffer::Readable(&sent[VNET_HDR_LEN..1000]),
            Buffer::Readable(&sent[1000..]),
        ],
    );
    h.kick(TX_QUEUE);
    h.settle();
    assert_eq!(driver.used(TX_QUEUE, 0).1, 0);
    assert_eq!(peer_receive_all(&peer), vec![sent]);

    let mut big_buffer = vec![Buffer::Writable(VNET_HDR_LEN as u32)];
    big_buffer.extend((0..17).map(|_| Buffer::Writable(4096)));
    let placed = driver.post_indirect(RX_QUEUE, &big_buffer);
    let message = [&[0u8; VNET_HDR_LEN][..], &frame(MAC, 9000, 4)].concat();
    peer_send(&peer, &message);
    h.run_until("the frame", || driver.used_idx(RX_QUEUE) == 1);
    assert_eq!(driver.used(RX_QUEUE, 0).1, message.len() as u32);
    let received = driver.read_chain(&placed, message.len());
    assert_eq!(&received[10..12], &1u16.to_le_bytes());
    assert_eq!(&received[12..], &message[12..]);
    assert_eq!(dropped(&h), 0);
}

#[test]
fn event_idx_suppresses_tx_interrupts_until_used_event() {
    let memory = guest_memory();
    let mut driver = GuestDriver::new(&memory, NUM_QUEUES);
    let (mut net, peer) = fake_net();
    driver.activate(&mut net, LINUX_FEATURES);
    let mut h = DeviceLoop::new(net);
    let message = [&[0u8; VNET_HDR_LEN][..], &frame([0xff; 6], 60, 3)].concat();
    // The driver wants an interrupt once the second chain is used.
    driver.set_used_event(TX_QUEUE, 1);
    driver.post(TX_QUEUE, &[Buffer::Readable(&message)]);
    h.kick(TX_QUEUE);
    h.settle();
    assert_eq!(driver.used_idx(TX_QUEUE), 1);
    assert!(!h.interrupted(), "interrupted before used_event");
    // Drained: the device asks to be kicked for the next chain.
    assert_eq!(driver.avail_event(TX_QUEUE), 1);
    driver.post(TX_QUEUE, &[Buffer::Readable(&message)]);
    h.kick(TX_QUEUE);
    h.settle();
    assert_eq!(driver.used_idx(TX_QUEUE), 2);
    assert!(h.interrupted(), "no interrupt at used_event");
    assert_eq!(driver.avail_event(TX_QUEUE), 2);
    assert_eq!(peer_receive_all(&peer).len(), 2);
}

#[test]
fn without_event_idx_every_batch_interrupts() {
    let memory = guest_memory();
    let mut driver = GuestDriver::new(&memory, NUM_QUEUES);
    let (mut net, _peer) = fake_net();
    driver.activate(&mut net, LINUX_FEATURES & !FEATURE_EVENT_IDX);
    let mut h = DeviceLoop::new(net);
    let message = [&[0u8; VNET_HDR_LEN][..], &frame([0xff; 6], 60, 4)].concat();
    for _ in 0..2 {
        driver.post(TX_QUEUE, &[Buffer::Readable(&message)]);
        h.kick(TX_QUEUE);
        h.settle();
        assert!(h.interrupted());
    }
}

#[test]
fn event_idx_rx_asks_for_a_kick_when_out_of_buffers() {
    let memory = guest_memory();
    let mut driver = GuestDriver::new(&memory, NUM_QUEUES);
    let (mut net, peer) = fake_net();
    driver.activate(&mut net, SMALL_RX_FEATURES);
    let mut h = DeviceLoop::new(net);
    // Interrupt at the first used buffer.
    driver.set_used_event(RX_QUEUE, 0);
    driver.post(RX_QUEUE, &[Buffer::Writable(2048)]);
    let first = [&[0u8; VNET_HDR_LEN][..], &frame(MAC, 80, 5)].concat();
    let second = [&[0u8; VNET_HDR_LEN][..], &frame(MAC, 90, 6)].concat();
    peer_send(&peer, &first);
    peer_send(&peer, &second);
    h.run_until("the first frame", || driver.used_idx(RX_QUEUE) == 1);
    h.settle();
    assert!(h.interrupted());
    assert_eq!(driver.used_idx(RX_QUEUE), 1, "one buffer, one frame");
    assert_eq!(
        driver.avail_event(RX_QUEUE),
        1,
        "asks for a kick at the next buffer"
    );
    let placed = driver.post(RX_QUEUE, &[Buffer::Writable(2048)]);
    // used_event is still 0: no interrupt is due for the second buffer.
    h.kick(RX_QUEUE);
    h.settle();
    assert_eq!(driver.used_idx(RX_QUEUE), 2);
    assert!(!h.interrupted());
    let received = driver.read_chain(&placed, second.len());
    assert_eq!(&received[VNET_HDR_LEN..], &second[VNET_HDR_LEN..]);
}

#[test]
fn reset_stops_the_data_path_and_a_new_activation_restarts_it() {
    let memory = guest_memory();
    let mut driver = GuestDriver::new(&memory, NUM_QUEUES);
    let (mut net, peer) = fake_net();
    driver.activate(&mut net, LINUX_FEATURES);
    assert!(net.is_activated());
    assert!(net.reset());
    assert!(!net.is_activated());
    assert_eq!(net.acked_features(), 0);
    let mut h = DeviceLoop::new(net);
    let message = [&[0u8; VNET_HDR_LEN][..], &frame([0xff; 6], 60, 7)].concat();
    driver.post(TX_QUEUE, &[Buffer::Readable(&message)]);
    h.kick(TX_QUEUE);
    h.settle();
    assert!(peer_receive_all(&peer).is_empty(), "sent while reset");
    driver.activate(&mut *h.lock(), LINUX_FEATURES);
    h.kick(TX_QUEUE);
    h.settle();
    assert_eq!(peer_receive_all(&peer), vec![message]);
}

// ---------------------------------------------------------------------------
// A real tap.

/// A device on a test tap, TX and RX buffers for the tests to post.
fn tap_harness(
    tap: &mut TestTap,
    mtu: u16,
    features: u64,
    driver: &GuestDriver,
) -> DeviceLoop<Net> {
    let mut net = Net::with_tap(tap.tap.take().unwrap(), MAC, mtu).unwrap();
    driver.activate(&mut net, features);
    DeviceLoop::new(net)
}

/// A refused fd names itself and shows its cause once, also inside the
/// VMM's error (whose `{:#}` or chain the runtime prints).
#[test]
fn a_refused_tap_fd_shows_its_cause_once() {
    let devnull = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
    let err = Tap::from_fd(devnull).err().unwrap();
    // SAFETY: `devnull` is open and owned by nobody else (refused).
    drop(unsafe { OwnedFd::from_raw_fd(devnull) });
    assert_eq!(err.to_string(), format!("fd {devnull} is not a tap device"));
    let text = protocols::error_chain(&crate::vm::VmError::Net {
        index: 1,
        error: err,
    });
    let prefix = format!("virtio-net NIC 1: fd {devnull} is not a tap device: ");
    assert!(
        text.starts_with(&prefix) && text.len() > prefix.len(),
        "{text}"
    );
    assert_eq!(protocols::repeated_cause(&text), None, "{text}");
}

#[test]
fn an_inherited_tap_fd_is_checked_and_adopted() {
    let Some(tap) = real_tap(1500) else { return };
    let dup = tap.tap_dup.try_clone().unwrap().into_raw_fd();
    let adopted = Tap::from_fd(dup).unwrap();
    assert_eq!(adopted.name(), "mvnet0");
    let devnull = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
    assert!(matches!(
        Tap::from_fd(devnull),
        Err(NetError::NotATap { fd, .. }) if fd == devnull
    ));
    // Refused, so still ours to close.
    // SAFETY: `devnull` is open and owned by nobody else.
    drop(unsafe { OwnedFd::from_raw_fd(devnull) });
}

#[test]
fn the_kernel_takes_our_offloads_and_refuses_tso_without_csum() {
    let Some(tap) = real_tap(1500) else { return };
    let tap = tap.tap.unwrap();
    tap.set_offload(offload_for(AVAIL_FEATURES)).unwrap();
    tap.set_offload(0).unwrap();
    assert!(tap.set_offload(libc::TUN_F_TSO4).is_err());
}

#[test]
fn a_tx_frame_reaches_the_tap_byte_identical() {
    let Some(mut tap) = real_tap(1500) else {
        return;
    };
    let memory = guest_memory();
    let mut driver = GuestDriver::new(&memory, NUM_QUEUES);
    let mut h = tap_harness(&mut tap, 1500, LINUX_FEATURES, &driver);
    let sent = frame([0xff; 6], 1400, 8);
    // Header, then the frame gathered from three descriptors.
    driver.post(
        TX_QUEUE,
        &[
            Buffer::Readable(&[0u8; VNET_HDR_LEN]),
            Buffer::Readable(&sent[..14]),
            Buffer::Readable(&sent[14..700]),
            Buffer::Readable(&sent[700..]),
        ],
    );
    h.kick(TX_QUEUE);
    h.settle();
    assert_eq!(driver.used(TX_QUEUE, 0).1, 0);
    assert_eq!(tap.receive(), sent);
    assert_eq!(dropped(&h), 0);
    assert!(h.interrupted());
}

#[test]
fn a_frame_from_the_tap_lands_in_an_rx_chain_with_num_buffers_1() {
    let Some(mut tap) = real_tap(9000) else {
        return;
    };
    let memory = guest_memory();
    let mut driver = GuestDriver::new(&memory, NUM_QUEUES);
    let mut h = tap_harness(&mut tap, 9000, LINUX_FEATURES, &driver);
    // Linux's "big packet" layout: header descriptor, then pages.
    let mut buffers = vec![Buffer::Writable(VNET_HDR_LEN as u32)];
    buffers.extend((0..17).map(|_| Buffer::Writable(4096)));
    let placed = driver.post(RX_QUEUE, &buffers);
    h.kick(RX_QUEUE);
    let sent = frame(MAC, 6000, 9);
    tap.send(&sent);
    h.run_until("the frame", || driver.used_idx(RX_QUEUE) == 1);
    let (id, len) = driver.used(RX_QUEUE, 0);
    assert_eq!((id, len as usize), (0, VNET_HDR_LEN + sent.len()));
    let received = driver.read_chain(&placed, len as usize);
    // No offload info for a frame the host made whole; num_buffers = 1.
    assert_eq!(
        vnet_header_bytes(&received),
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    );
    assert_eq!(&received[VNET_HDR_LEN..], &sent[..]);
    assert!(h.interrupted());
}

#[test]
fn a_too_small_rx_chain_gets_used_length_0() {
    let Some(mut tap) = real_tap(1500) else {
        return;
    };
    let memory = guest_memory();
    let mut driver = GuestDriver::new(&memory, NUM_QUEUES);
    let mut h = tap_harness(&mut tap, 1500, SMALL_RX_FEATURES, &driver);
    // One byte short of a full-MTU frame, then big enough.
    driver.post(RX_QUEUE, &[Buffer::Writable(12 + 14 + 1499)]);
    let placed = driver.post(RX_QUEUE, &[Buffer::Writable(12 + 14 + 1500)]);
    let sent = frame(MAC, 64, 10);
    tap.send(&sent);
    h.run_until("the frame", || driver.used_idx(RX_QUEUE) == 2);
    assert_eq!(driver.used(RX_QUEUE, 0), (0, 0));
    assert_eq!(
        driver.used(RX_QUEUE, 1),
        (1, (VNET_HDR_LEN + sent.len()) as u32)
    );
    let received = driver.read_chain(&placed, VNET_HDR_LEN + sent.len());
    assert_eq!(&received[VNET_HDR_LEN..], &sent[..]);
    assert_eq!(dropped(&h), 1);
}

#[test]
fn a_frame_too_big_for_its_chain_is_dropped_not_cut() {
    // The tap's MTU exceeds the one the guest was given.
    let Some(mut tap) = real_tap(9000) else {
        return;
    };
    let memory = guest_memory();
    let mut driver = GuestDriver::new(&memory, NUM_QUEUES);
    let mut h = tap_harness(&mut tap, 1500, SMALL_RX_FEATURES, &driver);
    driver.post(RX_QUEUE, &[Buffer::Writable(2048)]);
    let second = driver.post(RX_QUEUE, &[Buffer::Writable(2048)]);
    tap.send(&frame(MAC, 3000, 11));
    let small = frame(MAC, 100, 12);
    tap.send(&small);
    h.run_until("both frames", || driver.used_idx(RX_QUEUE) == 2);
    assert_eq!(driver.used(RX_QUEUE, 0), (0, 0));
    assert_eq!(
        driver.used(RX_QUEUE, 1),
        (1, (VNET_HDR_LEN + small.len()) as u32)
    );
    let received = driver.read_chain(&second, VNET_HDR_LEN + small.len());
    assert_eq!(&received[VNET_HDR_LEN..], &small[..]);
    // What the cut frame left in the first buffer is not handed over.
    assert_eq!(dropped(&h), 1);
}

#[test]
fn without_rx_chains_frames_wait_for_a_chain_and_a_kick() {
    let Some(mut tap) = real_tap(1500) else {
        return;
    };
    let memory = guest_memory();
    let mut driver = GuestDriver::new(&memory, NUM_QUEUES);
    let mut h = tap_harness(&mut tap, 1500, LINUX_FEATURES, &driver);
    let frames: Vec<_> = (0..3).map(|i| frame(MAC, 200 + i, i as u8)).collect();
    for sent in &frames {
        tap.send(sent);
    }
    tap.wait_tap_readable();
    h.settle();
    assert_eq!(driver.used_idx(RX_QUEUE), 0);
    assert!(tap.tap_readable(0), "the frames must stay in the tap");
    assert!(!h.interrupted());
    // Buffers posted without a kick: nothing moves (the device is not polling).
    let buffers: Vec<_> = (0..3)
        .map(|_| driver.post(RX_QUEUE, &[Buffer::Writable(65562)]))
        .collect();
    h.settle();
    assert_eq!(driver.used_idx(RX_QUEUE), 0);
    // The kick brings all three, in order, with one interrupt.
    h.kick(RX_QUEUE);
    h.settle();
    assert_eq!(driver.used_idx(RX_QUEUE), 3);
    for (n, (sent, placed)) in frames.iter().zip(&buffers).enumerate() {
        let (_, len) = driver.used(RX_QUEUE, n as u16);
        assert_eq!(len as usize, VNET_HDR_LEN + sent.len());
        let received = driver.read_chain(placed, len as usize);
        assert_eq!(&received[VNET_HDR_LEN..], &sent[..]);
    }
    assert!(h.interrupted());
    assert!(!tap.tap_readable(0));
    // And the next frame comes on its own (tap edge), with a buffer ready.
    let placed = driver.post(RX_QUEUE, &[Buffer::Writable(65562)]);
    h.kick(RX_QUEUE);
    h.settle();
    let later = frame(MAC, 300, 20);
    tap.send(&later);
    h.run_until("the later frame", || driver.used_idx(RX_QUEUE) == 4);
    let received = driver.read_chain(&placed, VNET_HDR_LEN + later.len());
    assert_eq!(&received[VNET_HDR_LEN..], &later[..]);
}
