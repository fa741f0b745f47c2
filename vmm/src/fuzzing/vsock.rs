//! The vsock target: a guest sending packets with arbitrary headers, ops,
//! ports and credit on TX, posting (and botching) RX buffers, while host
//! programs connect through the device's Unix socket, listen on host ports,
//! write, read and hang up. The device runs on its own event loop, as in
//! the VMM.
//!
//! Checked: the used rings (see [`Driver::check_used`]); every RX packet
//! the device writes is a well-formed one from the host to this guest; the
//! muxer's connections stay within their cap; no descriptor outlives the
//! device.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::ByteValued;

use super::driver::{guest_memory, Driver, Segment};
use super::{run_until_idle, Input, ScratchDir};
use crate::devices::virtio::mmio::FEATURE_VERSION_1;
use crate::devices::virtio::vsock::muxer::{MAX_CONNECTIONS, MAX_PENDING_CONTROL};
use crate::devices::virtio::vsock::packet::*;
use crate::devices::virtio::vsock::{Vsock, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::VirtioDevice;

pub const GUEST_CID: u64 = 3;
/// Host ports a host program listens on (`<socket>_<port>`).
const LISTENING_PORTS: [u32; 2] = [1024, 1025];
/// Ports the fuzzer picks from for packets, besides any raw one: the
/// listening ones, one nobody listens on, and the first ports the muxer
/// gives host-initiated connections.
const HOST_PORTS: [u32; 5] = [1024, 1025, 9999, 1 << 30, (1 << 30) + 1];
const GUEST_PORTS: [u32; 3] = [50000, 50001, 52];

/// Host programs' sockets: what they connected, what they accepted.
#[derive(Default)]
struct HostSide {
    listeners: Vec<UnixListener>,
    streams: Vec<UnixStream>,
}

/// Runs the vsock target on `data`.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let dir = ScratchDir::new("vsock").expect("a scratch directory");
    let socket = dir.path().join("v.sock");
    let memory = guest_memory();
    let mut driver = Driver::new(&memory, 3);
    let mut vsock = Vsock::new(GUEST_CID, socket.clone()).expect("creating the device");
    driver.program(&mut vsock, FEATURE_VERSION_1);
    vsock.activate(memory.clone()).expect("activating");
    let device = Arc::new(Mutex::new(vsock));
    let mut events = EventManager::new().expect("an event manager");
    events.add_subscriber(device.clone());

    let mut host = HostSide::default();
    for port in LISTENING_PORTS {
        let listener =
            UnixListener::bind(format!("{}_{port}", socket.display())).expect("a host listener");
        listener.set_nonblocking(true).expect("non-blocking");
        host.listeners.push(listener);
    }
    // Where the RX packets the device wrote start: head index -> buffer.
    let mut rx_buffers = std::collections::HashMap::new();
    let mut rx_checked = 0u16;

    while !input.is_empty() {
        match input.u8() % 8 {
            0 => {
                let (packet, split) = packet(&mut input);
                post_split(&mut driver, TX_QUEUE, &packet, split);
            }
            1 => {
                driver.post_fuzzed(TX_QUEUE, &mut input);
            }
            2 => {
                for _ in 0..=input.u8() % 8 {
                    let len = u32::from(input.u16()) % (HEADER_SIZE as u32 * 4 + 0x1_1000);
                    let (head, address, len) =
                        driver.post(RX_QUEUE, &[Segment::Writable(len)], false);
                    rx_buffers.insert(head, (address, len, driver.generation()));
                }
            }
            3 => {
                let head = driver.post_fuzzed(RX_QUEUE, &mut input);
                rx_buffers.remove(&head);
            }
            4 => host_connects(&socket, &mut host, &mut input),
            5 => host_acts(&mut host, &mut input),
            6 => {
                let queue = input.u8() as usize % 3;
                driver.tamper(queue, &mut input);
            }
            _ => {
                let queue = input.u8() as usize % 3;
                let _ = device.lock().unwrap().queue_events()[queue].write(1);
                run_until_idle(&mut events);
                check(&driver, &device, &rx_buffers, &mut rx_checked);
            }
        }
    }
    let _ = device.lock().unwrap().queue_events()[TX_QUEUE].write(1);
    run_until_idle(&mut events);
    check(&driver, &device, &rx_buffers, &mut rx_checked);
    // Host programs hang up while the device still runs.
    drop(host);
    run_until_idle(&mut events);
}

/// The invariants, checked after each run of the event loop.
fn check(
    driver: &Driver,
    device: &Mutex<Vsock>,
    rx_buffers: &std::collections::HashMap<u16, (u64, u32, u64)>,
    rx_checked: &mut u16,
) {
    driver.check_all_used();
    let (connections, control) = {
        let device = device.lock().unwrap();
        (device.connection_count(), device.muxer().pending_control())
    };
    assert!(
        connections <= MAX_CONNECTIONS,
        "{connections} connections, at most {MAX_CONNECTIONS}"
    );
    assert!(
        control <= MAX_PENDING_CONTROL,
        "{control} control packets waiting, at most {MAX_PENDING_CONTROL}"
    );
    // Every RX packet written into a buffer of ours (the ring untouched by
    // hand, nothing written over the buffer since) is a whole packet from
    // the host to this guest.
    if driver.tampered(RX_QUEUE) {
        return;
    }
    let used = driver.used_idx(RX_QUEUE);
    while *rx_checked != used {
        let (head, len) = driver.used(RX_QUEUE, *rx_checked);
        *rx_checked = rx_checked.wrapping_add(1);
        let Some(&(address, size, generation)) = rx_buffers.get(&(head as u16)) else {
            continue;
        };
        if len == 0 || generation != driver.generation() {
            continue;
        }
        assert!(len <= size, "{len} bytes written to a {size}-byte buffer");
        let header = driver.read(address, HEADER_SIZE);
        let header = PacketHeader::from_slice(&header).copied().unwrap();
        assert_eq!({ header.src_cid }, HOST_CID);
        assert_eq!({ header.dst_cid }, GUEST_CID);
        assert_eq!({ header.type_ }, TYPE_STREAM);
        assert_eq!(
            len as usize,
            HEADER_SIZE + header.len as usize,
            "an RX packet's length"
        );
    }
}

/// A TX packet: a header of the fuzzer's making (mostly with the right
/// CIDs and type, so the muxer gets past them) and its payload; and how
/// to split it over descriptors.
fn packet(input: &mut Input) -> (Vec<u8>, u8) {
    let mangle = input.u8();
    let payload_len = input.u16() as usize % 0x2000;
    let mut header = PacketHeader {
        src_cid: if mangle & 1 != 0 {
            input.u64()
        } else {
            GUEST_CID
        },
        dst_cid: if mangle & 2 != 0 {
            input.u64()
        } else {
            HOST_CID
        },
        src_port: if mangle & 4 != 0 {
            input.u32()
        } else {
            input.pick(&GUEST_PORTS)
        },
        dst_port: if mangle & 4 != 0 {
            input.u32()
        } else {
            input.pick(&HOST_PORTS)
        },
        len: 0,
        type_: if mangle & 8 != 0 {
            input.u16()
        } else {
            TYPE_STREAM
        },
        op: u16::from(input.u8() % 9),
        flags: u32::from(input.u8() % 4),
        buf_alloc: input.u32(),
        fwd_cnt: input.u32(),
    };
    let payload = input.bytes(payload_len);
    header.len = if mangle & 16 != 0 {
        input.u32()
    } else {
        payload.len() as u32
    };
    let packet = [header.as_slice(), payload].concat();
    (packet, mangle >> 5)
}

/// Posts `bytes` on `queue` as 1 to 3 readable buffers, maybe indirect.
fn post_split(driver: &mut Driver, queue: usize, bytes: &[u8], split: u8) {
    let indirect = split & 4 != 0;
    match split & 3 {
        0 | 3 => driver.post(queue, &[Segment::Readable(bytes)], indirect),
        1 => {
            // The header alone, then the payload, as Linux sends.
            let at = HEADER_SIZE.min(bytes.len());
            driver.post(
                queue,
                &[
                    Segment::Readable(&bytes[..at]),
                    Segment::Readable(&bytes[at..]),
                ],
                indirect,
            )
        }
        _ => {
            // Split inside the header.
            let at = 10.min(bytes.len());
            let mid = (at + bytes.len()) / 2;
            driver.post(
                queue,
                &[
                    Segment::Readable(&bytes[..at]),
                    Segment::Readable(&bytes[at..mid]),
                    Segment::Readable(&bytes[mid..]),
                ],
                indirect,
            )
        }
    };
}

/// A host program connects to the device's socket and asks for a guest
/// port (or writes any line).
fn host_connects(socket: &std::path::Path, host: &mut HostSide, input: &mut Input) {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return;
    };
    let _ = stream.set_nonblocking(true);
    let kind = input.u8();
    let line = match kind % 4 {
        0 | 1 => format!("CONNECT {}\n", input.pick(&GUEST_PORTS)).into_bytes(),
        2 => format!("CONNECT {}\n", input.u32()).into_bytes(),
        _ => {
            let len = input.u8() as usize;
            input.bytes(len).to_vec()
        }
    };
    let _ = stream.write_all(&line);
    host.streams.push(stream);
}

/// A host program accepts a guest connection, writes, reads, shuts its
/// socket down or closes it.
fn host_acts(host: &mut HostSide, input: &mut Input) {
    for listener in &host.listeners {
        while let Ok((stream, _)) = listener.accept() {
            let _ = stream.set_nonblocking(true);
            host.streams.push(stream);
        }
    }
    if host.streams.is_empty() {
        return;
    }
    let index = input.u8() as usize % host.streams.len();
    let stream = &mut host.streams[index];
    match input.u8() % 5 {
        0 | 1 => {
            let len = input.u16() as usize % 0x4000;
            let _ = stream.write(input.bytes(len));
        }
        2 => {
            let mut sink = [0u8; 4096];
            while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
        }
        3 => {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        _ => {
            host.streams.swap_remove(index);
        }
    }
}
