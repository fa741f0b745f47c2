//! The virtio-net target: a guest acking any features, sending TX chains
//! (frames with arbitrary vnet headers, split anyhow, or raw descriptors)
//! and posting RX chains, while frames arrive from the host. A
//! SOCK_SEQPACKET socket pair stands in for the tap (frames keep their
//! boundaries, as on a tap): no privileges or network namespace needed. The
//! device runs on its own event loop, as in the VMM.
//!
//! Checked: the used rings (see [`Driver::check_used`]); every frame the
//! device hands the host is a whole one (vnet header and Ethernet header at
//! least, at most a 64 KiB GSO frame); no descriptor outlives the device.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};

use super::driver::{guest_memory, Driver, Segment};
use super::{run_until_idle, Input};
use crate::devices::virtio::mmio::FEATURE_VERSION_1;
use crate::devices::virtio::net::device::{min_rx_len, AVAIL_FEATURES};
use crate::devices::virtio::net::tap::Tap;
use crate::devices::virtio::net::{
    Net, ETH_HLEN, MAX_FRAME_LEN, NUM_QUEUES, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN,
};
use crate::devices::virtio::VirtioDevice;

const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

/// A non-blocking SOCK_SEQPACKET pair: (the device's end, the host's).
pub(crate) fn socket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, which we own.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and nothing else owns them.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A device on a socket pair standing in for its tap; returns the host's end.
pub(crate) fn fake_net(mtu: u16) -> (Net, OwnedFd) {
    let (ours, peer) = socket_pair();
    let net = Net::with_tap(Tap::fake(ours), MAC, mtu).expect("creating the device");
    (net, peer)
}

/// Runs the net target on `data`.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mtu = input.pick(&[1500u16, 68, 9000, 65535]);
    let features = (input.u64() & AVAIL_FEATURES) | FEATURE_VERSION_1;
    let memory = guest_memory();
    let mut driver = Driver::new(&memory, NUM_QUEUES);
    let (mut net, peer) = fake_net(mtu);
    driver.program(&mut net, features);
    net.activate(memory.clone()).expect("activating");
    let device = Arc::new(Mutex::new(net));
    let mut events = EventManager::new().expect("an event manager");
    events.add_subscriber(device.clone());

    while !input.is_empty() {
        match input.u8() % 8 {
            0 => {
                let split = input.u8();
                let header = input.bytes(VNET_HDR_LEN);
                let len = input.u16() as usize % (MAX_FRAME_LEN + 64);
                let frame = [header, input.bytes(len)].concat();
                post_frame(&mut driver, &frame, split);
            }
            1 => {
                driver.post_fuzzed(TX_QUEUE, &mut input);
            }
            2 => {
                let min = min_rx_len(features, mtu) as u32;
                for _ in 0..=input.u8() % 4 {
                    let len = match input.u8() % 4 {
                        0 => min,
                        1 => min.saturating_sub(1),
                        _ => u32::from(input.u16()),
                    };
                    driver.post(RX_QUEUE, &[Segment::Writable(len)], input.bool());
                }
            }
            3 => {
                driver.post_fuzzed(RX_QUEUE, &mut input);
            }
            4 => {
                let len = input.u16() as usize % (MAX_FRAME_LEN + 64);
                let frame = input.bytes(len);
                // SAFETY: send reads `frame`, whose length we pass.
                let _ =
                    unsafe { libc::send(peer.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            }
            5 => drain_and_check(&peer),
            6 => {
                let queue = input.u8() as usize % NUM_QUEUES;
                driver.tamper(queue, &mut input);
            }
            _ => {
                let queue = input.u8() as usize % NUM_QUEUES;
                let _ = device.lock().unwrap().queue_events()[queue].write(1);
                run_until_idle(&mut events);
                driver.check_all_used();
            }
        }
    }
    let _ = device.lock().unwrap().queue_events()[TX_QUEUE].write(1);
    run_until_idle(&mut events);
    driver.check_all_used();
    drain_and_check(&peer);
}

/// Posts a TX frame as 1 to 3 readable buffers, maybe indirect.
fn post_frame(driver: &mut Driver, frame: &[u8], split: u8) {
    let indirect = split & 4 != 0;
    let header = VNET_HDR_LEN.min(frame.len());
    match split & 3 {
        0 => driver.post(TX_QUEUE, &[Segment::Readable(frame)], indirect),
        1 => driver.post(
            TX_QUEUE,
            &[
                Segment::Readable(&frame[..header]),
                Segment::Readable(&frame[header..]),
            ],
            indirect,
        ),
        2 => {
            let mid = (header + frame.len()) / 2;
            driver.post(
                TX_QUEUE,
                &[
                    Segment::Readable(&frame[..header]),
                    Segment::Readable(&frame[header..mid]),
                    Segment::Readable(&frame[mid..]),
                ],
                indirect,
            )
        }
        _ => driver.post(
            TX_QUEUE,
            // A device-writable buffer in a TX chain.
            &[Segment::Readable(frame), Segment::Writable(64)],
            indirect,
        ),
    };
}

/// Reads every frame the device sent to the host and checks its size.
fn drain_and_check(peer: &OwnedFd) {
    let mut frame = vec![0u8; MAX_FRAME_LEN + 1];
    loop {
        // SAFETY: recv writes at most `frame.len()` bytes into `frame`.
        let n = unsafe {
            libc::recv(
                peer.as_raw_fd(),
                frame.as_mut_ptr().cast(),
                frame.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            return;
        }
        let n = n as usize;
        assert!(
            (VNET_HDR_LEN + ETH_HLEN..=MAX_FRAME_LEN).contains(&n),
            "the device sent the host a {n}-byte frame"
        );
    }
}
