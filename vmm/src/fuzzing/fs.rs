//! The virtio-fs target: a guest sending FUSE requests (any opcode, node,
//! handle, caller and body, names from a small dictionary, lengths right or
//! wrong) or raw chains on the request and high-priority queues, served by
//! the device's FUSE server over a scratch directory. The queues are served
//! as the device's thread serves them ([`QueueState::process_queue`]), but
//! on the fuzzer's thread, so a run is deterministic.
//!
//! The scratch directory holds the share (a file, a directory, a symlink
//! pointing out of it) and, beside it, a file the guest must not reach.
//!
//! Checked: the used rings (see [`Driver::check_used`]); the listings the
//! server holds stay within their cap; nothing beside the share appears,
//! disappears or changes; no descriptor outlives the server.

use std::path::Path;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::driver::{guest_memory, Driver, Segment};
use super::{Input, ScratchDir};
use crate::devices::virtio::fs::event_handler::QueueState;
use crate::devices::virtio::fs::guard::MAX_OPEN_HANDLES;
use crate::devices::virtio::fs::listings::MAX_LISTINGS_BYTES;
use crate::devices::virtio::fs::memory_view::{view_memory, view_queue};
use crate::devices::virtio::fs::server::new_server;
use crate::devices::virtio::fs::{HIPRIO_QUEUE, NUM_QUEUES, REQUEST_QUEUE};
use crate::devices::virtio::Interrupt;

/// FUSE_INIT.
const OP_INIT: u32 = 26;
/// One past the highest opcode the server knows (FUSE_REMOVEMAPPING is 49).
const OPCODES: u32 = 50;
/// `struct fuse_in_header`.
const IN_HEADER_LEN: usize = 40;
/// Names the fuzzer picks from: those in the share, new ones, and ones
/// that try to leave it.
const NAMES: [&[u8]; 12] = [
    b"f",
    b"d",
    b"l",
    b"g",
    b"new",
    b".",
    b"..",
    b"",
    b"d/g",
    b"../outside",
    b"outside",
    b"/etc/passwd",
];
/// What the file beside the share holds.
const OUTSIDE: &[u8] = b"not the guest's\n";

/// Runs the fs target on `data`.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let dir = ScratchDir::new("fs").expect("a scratch directory");
    let share = populate(dir.path());
    let server = new_server(&share).expect("the FUSE server");
    let memory = guest_memory();
    let mut driver = Driver::new(&memory, NUM_QUEUES);
    let view = view_memory(&memory).expect("a view of guest memory");
    let event_idx = input.bool();
    let queues = (0..NUM_QUEUES)
        .map(|index| {
            let mut queue =
                view_queue(index, &driver.device_queue(index), &view).expect("a queue view");
            fuse_virtio_queue::QueueT::set_event_idx(&mut queue, event_idx);
            queue
        })
        .collect();
    let mut state = QueueState {
        memory: view,
        queues,
        events: (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd"))
            .collect(),
        interrupt: Arc::new(Interrupt::new().expect("an interrupt")),
        server: server.clone(),
        broken: [false; NUM_QUEUES],
    };
    let mut unique = 0u64;

    // Linux starts every session with INIT; the fuzzer may skip it.
    if !input.bool() {
        let flags = input.u32();
        let body = init_body(flags);
        post_request(&mut driver, REQUEST_QUEUE, OP_INIT, 1, &body, 256, 0);
        state.process_queue(REQUEST_QUEUE);
    }
    while !input.is_empty() {
        match input.u8() % 8 {
            0..=3 => {
                unique += 1;
                request(&mut driver, &mut input, unique);
            }
            4 => {
                let queue = input.u8() as usize % NUM_QUEUES;
                driver.post_fuzzed(queue, &mut input);
            }
            5 => {
                let queue = input.u8() as usize % NUM_QUEUES;
                driver.tamper(queue, &mut input);
            }
            _ => {
                let queue = input.u8() as usize % NUM_QUEUES;
                state.process_queue(queue);
                check(&driver, &state, dir.path(), unique);
            }
        }
    }
    state.process_queue(HIPRIO_QUEUE);
    state.process_queue(REQUEST_QUEUE);
    check(&driver, &state, dir.path(), unique);
}

/// The share (`share/`: a file, a directory with a file, a symlink out of
/// the share) and a file beside it; returns the share's path.
fn populate(dir: &Path) -> std::path::PathBuf {
    let share = dir.join("share");
    std::fs::create_dir(&share).expect("the share");
    std::fs::write(share.join("f"), b"hello\n").expect("a file");
    std::fs::create_dir(share.join("d")).expect("a directory");
    std::fs::write(share.join("d/g"), b"").expect("a file");
    std::os::unix::fs::symlink("../outside", share.join("l")).expect("a symlink");
    std::fs::write(dir.join("outside"), OUTSIDE).expect("the file outside");
    share
}

/// The invariants, after each pass over a queue; `requests` is how many
/// requests the fuzzer shaped (raw chains may hold more).
fn check(driver: &Driver, state: &QueueState, dir: &Path, requests: u64) {
    driver.check_all_used();
    // At most one listing per directory read, all within their budget;
    // open files and directories within their cap.
    let listings = state.server.listings().count() as u64;
    assert!(
        listings <= requests + driver.raw_chains(),
        "{listings} listings held after {requests} requests"
    );
    let held = state.server.listings().held_bytes();
    assert!(
        held <= MAX_LISTINGS_BYTES,
        "listings hold {held} bytes, at most {MAX_LISTINGS_BYTES}"
    );
    let handles = state.server.open_handles();
    assert!(
        handles <= MAX_OPEN_HANDLES,
        "{handles} open handles, at most {MAX_OPEN_HANDLES}"
    );
    let mut beside: Vec<_> = std::fs::read_dir(dir)
        .expect("the scratch directory")
        .map(|entry| entry.expect("an entry").file_name())
        .collect();
    beside.sort();
    assert_eq!(
        beside,
        ["outside", "share"],
        "the guest reached beside its share"
    );
    assert_eq!(
        std::fs::read(dir.join("outside")).expect("the file outside"),
        OUTSIDE,
        "the guest changed a file beside its share"
    );
}

/// `struct fuse_init_in` (7.31, what Linux 6.1 sends) with `flags`, and
/// the 7.36 extension's room.
fn init_body(flags: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    for value in [7u32, 31, 0x2_0000, flags] {
        body.extend_from_slice(&value.to_le_bytes());
    }
    body.resize(64, 0);
    body
}

/// A FUSE request the fuzzer shapes.
fn request(driver: &mut Driver, input: &mut Input, unique: u64) {
    let shape = input.u8();
    let opcode = if shape & 0x80 != 0 {
        input.u32()
    } else {
        u32::from(input.u8()) % OPCODES
    };
    let nodeid = if shape & 0x40 != 0 {
        input.u64()
    } else {
        u64::from(input.u8() % 8)
    };
    let struct_len = input.u8() as usize;
    let mut body = input.bytes(struct_len).to_vec();
    for _ in 0..(shape >> 4) & 3 {
        body.extend_from_slice(input.pick(&NAMES));
        body.push(0);
    }
    if shape & 8 != 0 {
        // A WRITE's or SETXATTR's data.
        let len = input.u16() as usize;
        body.extend_from_slice(input.bytes(len));
    }
    let reply_len = match input.u8() % 4 {
        0 => 0,
        1 => 16,
        2 => 4096,
        _ => u32::from(input.u16()),
    };
    let queue = if shape & 4 != 0 {
        HIPRIO_QUEUE
    } else {
        REQUEST_QUEUE
    };
    let header_len = if shape & 2 != 0 {
        Some(input.u32())
    } else {
        None
    };
    let caller = input.u8();
    post_request_as(
        driver,
        queue,
        Request {
            opcode,
            nodeid,
            unique,
            uid: [0, 1000, 65534][caller as usize % 3],
            len: header_len,
        },
        &body,
        reply_len,
        shape & 1,
    );
}

struct Request {
    opcode: u32,
    nodeid: u64,
    unique: u64,
    uid: u32,
    /// The header's length field, when not the request's true length.
    len: Option<u32>,
}

fn post_request(
    driver: &mut Driver,
    queue: usize,
    opcode: u32,
    unique: u64,
    body: &[u8],
    reply_len: u32,
    split: u8,
) {
    let request = Request {
        opcode,
        nodeid: 0,
        unique,
        uid: 0,
        len: None,
    };
    post_request_as(driver, queue, request, body, reply_len, split);
}

/// Posts a request (header, body) and a reply buffer of `reply_len` bytes
/// (none when 0), the header in a buffer of its own when `split` is 1.
fn post_request_as(
    driver: &mut Driver,
    queue: usize,
    request: Request,
    body: &[u8],
    reply_len: u32,
    split: u8,
) {
    let len = request.len.unwrap_or((IN_HEADER_LEN + body.len()) as u32);
    let mut header = Vec::with_capacity(IN_HEADER_LEN);
    header.extend_from_slice(&len.to_le_bytes());
    header.extend_from_slice(&request.opcode.to_le_bytes());
    header.extend_from_slice(&request.unique.to_le_bytes());
    header.extend_from_slice(&request.nodeid.to_le_bytes());
    header.extend_from_slice(&request.uid.to_le_bytes()); // uid
    header.extend_from_slice(&request.uid.to_le_bytes()); // gid
    header.extend_from_slice(&1u32.to_le_bytes()); // pid
    header.extend_from_slice(&0u32.to_le_bytes()); // padding
    let whole = [header.as_slice(), body].concat();
    let mut segments = if split == 1 {
        vec![
            Segment::Readable(&whole[..IN_HEADER_LEN]),
            Segment::Readable(&whole[IN_HEADER_LEN..]),
        ]
    } else {
        vec![Segment::Readable(&whole)]
    };
    if reply_len > 0 {
        segments.push(Segment::Writable(reply_len));
    }
    driver.post(queue, &segments, false);
}
