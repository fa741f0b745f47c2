//! The virtio-fs device driven the way the Linux driver drives it: FUSE
//! requests in descriptor chains on mock virtqueues in real guest memory,
//! the device activated by the book (its own event loop thread, the
//! ioeventfd kicked), and a real host directory behind it. Then what a
//! malicious driver could do: chains outside guest memory, without room for
//! a reply, looping, with bogus heads, a corrupt ring, random requests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{
    Dirent, EntryOut, FlushIn, GetxattrIn, InHeader, InitIn, InitOut, Opcode, OpenIn, OpenOut,
    OutHeader, ReadIn, ReleaseIn, WriteIn, WriteOut,
};
use fuse_vm_memory::ByteValued;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::FEATURE_EVENT_IDX;
use super::event_handler::QueueState;
use super::*;
use crate::devices::virtio::mmio::FEATURE_VERSION_1;
use crate::devices::virtio::test_driver::{
    guest_memory, kick, Buffer, GuestDriver, MEMORY_SIZE, NEXT, QUEUE_LEN, WRITE,
};
use crate::devices::virtio::{Interrupt, VirtioDevice};

const ROOT: u64 = 1;
const HEADER: usize = std::mem::size_of::<OutHeader>();

/// A scratch directory removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        Self::under(&std::env::temp_dir(), name)
    }

    /// On /dev/shm (a tmpfs) when there is one.
    fn new_on_tmpfs(name: &str) -> Self {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            Self::under(shm, name)
        } else {
            Self::new(name)
        }
    }

    fn under(parent: &Path, name: &str) -> Self {
        let path = parent.join(format!(
            "vmm-virtio-fs-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest's virtio-fs driver: its two queues (hiprio, requests) and the
/// `unique` of the last FUSE request it made.
struct FuseDriver<'a> {
    guest: GuestDriver<'a>,
    unique: u64,
}

impl<'a> FuseDriver<'a> {
    fn new(memory: &'a GuestMemoryMmap) -> Self {
        Self {
            guest: GuestDriver::new(memory, NUM_QUEUES),
            unique: 0,
        }
    }

    /// A FUSE request: header then `body`.
    fn message(&mut self, opcode: Opcode, nodeid: u64, body: &[u8]) -> Vec<u8> {
        self.unique += 1;
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode: opcode as u32,
            unique: self.unique,
            nodeid,
            ..Default::default()
        };
        [header.as_slice(), body].concat()
    }
}

/// Sends one request on the request queue of `fs` (kicking its ioeventfd)
/// and returns the reply: used length, header and body (the writable
/// buffers, `reply_lens` long, concatenated).
fn call(
    driver: &mut FuseDriver,
    fs: &Fs,
    opcode: Opcode,
    nodeid: u64,
    body: &[u8],
    reply_lens: &[u32],
) -> (u32, OutHeader, Vec<u8>) {
    let message = driver.message(opcode, nodeid, body);
    let mut buffers = vec![Buffer::Readable(&message)];
    buffers.extend(reply_lens.iter().map(|len| Buffer::Writable(*len)));
    let placed = driver.guest.post(REQUEST_QUEUE, &buffers);
    kick(fs, REQUEST_QUEUE);
    let count = driver.guest.posted(REQUEST_QUEUE);
    driver.guest.wait_used(REQUEST_QUEUE, count);
    let (_, used) = driver.guest.used(REQUEST_QUEUE, count - 1);
    let reply: Vec<u8> = placed[1..]
        .iter()
        .flat_map(|(address, len)| driver.guest.read(*address, *len as usize))
        .collect();
    let header = object::<OutHeader>(&reply);
    assert_eq!(
        header.unique, driver.unique,
        "the reply answers the request"
    );
    (used, header, reply[HEADER..].to_vec())
}

/// A FUSE struct read from the start of `bytes`.
fn object<T: ByteValued + Default>(bytes: &[u8]) -> T {
    let mut value = T::default();
    let len = std::mem::size_of::<T>();
    value.as_mut_slice().copy_from_slice(&bytes[..len]);
    value
}

/// A device over `dir`, activated (version 1 only) and past INIT, with its driver.
fn session<'a>(memory: &'a GuestMemoryMmap, dir: &Path) -> (FuseDriver<'a>, Fs) {
    let mut driver = FuseDriver::new(memory);
    let mut fs = Fs::new("microvm", dir).unwrap();
    driver.guest.activate(&mut fs, FEATURE_VERSION_1);
    init(&mut driver, &fs);
    (driver, fs)
}

fn init(driver: &mut FuseDriver, fs: &Fs) -> InitOut {
    let body = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 128 << 10,
        flags: 0,
    };
    let (used, header, reply) = call(driver, fs, Opcode::Init, 0, body.as_slice(), &[4096]);
    assert_eq!(header.error, 0, "INIT failed");
    assert_eq!(used as usize, header.len as usize);
    object::<InitOut>(&reply)
}

fn lookup(driver: &mut FuseDriver, fs: &Fs, name: &str) -> (i32, EntryOut) {
    let body = [name.as_bytes(), b"\0"].concat();
    let (_, header, reply) = call(driver, fs, Opcode::Lookup, ROOT, &body, &[4096]);
    let entry = if header.error == 0 {
        object::<EntryOut>(&reply)
    } else {
        EntryOut::default()
    };
    (header.error, entry)
}

fn open(driver: &mut FuseDriver, fs: &Fs, nodeid: u64, flags: i32) -> u64 {
    let body = OpenIn {
        flags: flags as u32,
        fuse_flags: 0,
    };
    let (_, header, reply) = call(driver, fs, Opcode::Open, nodeid, body.as_slice(), &[256]);
    assert_eq!(header.error, 0, "OPEN failed");
    object::<OpenOut>(&reply).fh
}

fn shared_file(dir: &Path, name: &str, len: usize) -> Vec<u8> {
    let content: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(dir.join(name), &content).unwrap();
    content
}

#[test]
fn the_config_space_holds_the_tag_and_one_request_queue() {
    let dir = ScratchDir::new("config");
    let fs = Fs::new("microvm", &dir.0).unwrap();
    let mut tag = [0u8; TAG_LEN];
    fs.read_config(0, &mut tag);
    assert_eq!(&tag[..7], b"microvm");
    assert!(tag[7..].iter().all(|b| *b == 0));
    let mut queues = [0u8; 4];
    fs.read_config(TAG_LEN as u64, &mut queues);
    assert_eq!(u32::from_le_bytes(queues), 1);
    // Byte-wise reads and reads past the end (or at absurd offsets) see
    // the same bytes or zeroes, never a panic.
    let mut byte = [0u8; 1];
    fs.read_config(1, &mut byte);
    assert_eq!(byte[0], b'i');
    let mut beyond = [0xffu8; 8];
    fs.read_config(CONFIG_SPACE_SIZE as u64 - 2, &mut beyond);
    assert_eq!(beyond, [0; 8]);
    fs.read_config(u64::MAX, &mut beyond);
    assert_eq!(beyond, [0; 8]);
    assert_eq!(fs.device_type(), VIRTIO_ID_FS);
    assert_eq!(fs.queues().len(), NUM_QUEUES);
    assert_eq!(fs.queue_events().len(), NUM_QUEUES);
    assert_eq!(fs.queues()[REQUEST_QUEUE].max_size(), QUEUE_SIZE);
    assert_ne!(fs.avail_features() & FEATURE_VERSION_1, 0);
    // A 36-byte tag fills the field with no NUL.
    let long = "t".repeat(TAG_LEN);
    let fs = Fs::new(&long, &dir.0).unwrap();
    let mut config = [0u8; CONFIG_SPACE_SIZE];
    fs.read_config(0, &mut config);
    assert_eq!(&config[..TAG_LEN], long.as_bytes());
    assert_eq!(&config[TAG_LEN..], &1u32.to_le_bytes());
}

#[test]
fn bad_tags_and_directories_are_named() {
    let dir = ScratchDir::new("bad");
    assert!(matches!(Fs::new("", &dir.0), Err(FsError::BadTag(_))));
    let long = "x".repeat(TAG_LEN + 1);
    assert!(matches!(Fs::new(&long, &dir.0), Err(FsError::BadTag(_))));
    let error = Fs::new("t", Path::new("/no/such/dir"))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("/no/such/dir"), "{error}");
    let file = dir.0.join("file");
    std::fs::write(&file, b"x").unwrap();
    let error = Fs::new("t", &file).err().unwrap().to_string();
    assert!(error.contains("not a directory"), "{error}");
    assert!(error.contains(&file.display().to_string()), "{error}");
}

fn round_trip(features: u64) {
    let dir = ScratchDir::new(&format!("round-trip-{features:x}"));
    let content = shared_file(&dir.0, "hello.txt", 10_000);
    let memory = guest_memory();
    let mut driver = FuseDriver::new(&memory);
    let mut fs = Fs::new("microvm", &dir.0).unwrap();
    driver.guest.activate(&mut fs, features);
    assert!(fs.is_activated());

    let init = init(&mut driver, &fs);
    assert_eq!(init.major, 7);
    assert!(init.max_write >= 4096, "max_write {}", init.max_write);

    // A missing name: a negative entry the guest may cache.
    let (error, missing) = lookup(&mut driver, &fs, "missing");
    assert_eq!(error, 0, "{missing:?}");
    assert_eq!(missing.nodeid, 0);
    assert_eq!(missing.entry_valid, server::CACHE_TIMEOUT.as_secs());
    assert_ne!(missing.entry_valid, 0);
    let (error, entry) = lookup(&mut driver, &fs, "hello.txt");
    assert_eq!(error, 0);
    assert_ne!(entry.nodeid, 0);
    assert_eq!(entry.attr.size, content.len() as u64);
    assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFREG);

    // READ across a split reply: the header and 100 bytes in one buffer,
    // the rest in two more (the server scatters into them).
    let fh = open(&mut driver, &fs, entry.nodeid, libc::O_RDWR);
    let read = ReadIn {
        fh,
        offset: 5,
        size: 9_000,
        ..Default::default()
    };
    let (used, header, data) = call(
        &mut driver,
        &fs,
        Opcode::Read,
        entry.nodeid,
        read.as_slice(),
        &[HEADER as u32 + 100, 4000, 8000],
    );
    assert_eq!(header.error, 0);
    assert_eq!(used as usize, HEADER + 9_000);
    assert_eq!(header.len, used);
    assert!(
        data[..9_000] == content[5..9_005],
        "READ returned other bytes"
    );

    // FLUSH is refused with ENOSYS (the guest then stops sending it).
    let flush = FlushIn {
        fh,
        ..Default::default()
    };
    let (used, header, _) = call(
        &mut driver,
        &fs,
        Opcode::Flush,
        entry.nodeid,
        flush.as_slice(),
        &[64],
    );
    assert_eq!(header.error, -libc::ENOSYS);
    assert_eq!(used as usize, HEADER);

    // WRITE: the payload goes from guest memory to the host file.
    let payload = b"written by the guest";
    let write = WriteIn {
        fh,
        offset: 2,
        size: payload.len() as u32,
        ..Default::default()
    };
    let body = [write.as_slice(), payload].concat();
    let (_, header, reply) = call(&mut driver, &fs, Opcode::Write, entry.nodeid, &body, &[64]);
    assert_eq!(header.error, 0);
    assert_eq!(object::<WriteOut>(&reply).size, payload.len() as u32);
    let on_host = std::fs::read(dir.0.join("hello.txt")).unwrap();
    assert_eq!(&on_host[2..2 + payload.len()], payload);
    assert_eq!(on_host.len(), content.len());

    // The driver resets the device: the thread ends, the queues are clean.
    assert!(fs.reset());
    assert!(!fs.is_activated());
    assert!(!fs.queues()[REQUEST_QUEUE].ready());
    assert_eq!(fs.acked_features(), 0);
}

#[test]
fn init_lookup_read_and_write_round_trip_through_the_queues() {
    round_trip(FEATURE_VERSION_1);
}

#[test]
fn the_round_trip_works_with_event_idx() {
    round_trip(FEATURE_VERSION_1 | FEATURE_EVENT_IDX);
}

#[test]
fn the_hiprio_queue_is_served_too() {
    let dir = ScratchDir::new("hiprio");
    let memory = guest_memory();
    let (mut driver, fs) = session(&memory, &dir.0);
    // FORGET needs no reply: the chain comes back used, length 0.
    let forget = driver.message(Opcode::Forget, ROOT, &1u64.to_le_bytes());
    driver
        .guest
        .post(HIPRIO_QUEUE, &[Buffer::Readable(&forget)]);
    kick(&fs, HIPRIO_QUEUE);
    driver.guest.wait_used(HIPRIO_QUEUE, 1);
    assert_eq!(driver.guest.used(HIPRIO_QUEUE, 0), (0, 0));
}

#[test]
fn lookups_answered_by_the_device_refuse_bad_names_and_directories() {
    let dir = ScratchDir::new("lookups");
    shared_file(&dir.0, "f", 10);
    let memory = guest_memory();
    let (mut driver, fs) = session(&memory, &dir.0);
    let (_, header, _) = call(&mut driver, &fs, Opcode::Lookup, ROOT, b"no-nul", &[256]);
    assert_eq!(header.error, -libc::EINVAL, "a name without its NUL");
    let long = vec![b'n'; 5000];
    let (_, header, _) = call(&mut driver, &fs, Opcode::Lookup, ROOT, &long, &[256]);
    assert_eq!(header.error, -libc::ENAMETOOLONG);
    // Errors other than "no such name" stay errors.
    let (_, file) = lookup(&mut driver, &fs, "f");
    let (_, header, _) = call(
        &mut driver,
        &fs,
        Opcode::Lookup,
        file.nodeid,
        b"x\0",
        &[256],
    );
    assert_eq!(header.error, -libc::ENOTDIR, "a name under a file");
    // A name that a file later gets: the device itself never caches the
    // negative answer (the guest does, for the timeout).
    let (error, missing) = lookup(&mut driver, &fs, "later");
    assert_eq!((error, missing.nodeid), (0, 0));
    std::fs::write(dir.0.join("later"), b"now").unwrap();
    let (error, found) = lookup(&mut driver, &fs, "later");
    assert_eq!(error, 0);
    assert_ne!(found.nodeid, 0);
    assert_eq!(found.attr.size, 3);
    // No room for the entry: nothing is returned, the device keeps serving.
    assert_eq!(lookup_with_room(&mut driver, &fs, "f", 16), 0);
    let (error, entry) = lookup(&mut driver, &fs, "f");
    assert_eq!(error, 0);
    assert_ne!(entry.nodeid, 0);
}

/// Found by the fuzz target `fs`: LISTXATTR (and GETXATTR) with a `size`
/// of nearly 4 GiB made the passthrough file system allocate that much.
/// Sizes past Linux's own limit (64 KiB) are refused; up to it, served.
#[test]
fn xattr_requests_larger_than_linux_asks_are_refused() {
    let dir = ScratchDir::new("xattr-sizes");
    shared_file(&dir.0, "f", 10);
    let memory = guest_memory();
    let (mut driver, fs) = session(&memory, &dir.0);
    let (_, file) = lookup(&mut driver, &fs, "f");
    for opcode in [Opcode::Listxattr, Opcode::Getxattr] {
        let request = |size: u32| {
            let body = GetxattrIn { size, padding: 0 };
            let mut body = body.as_slice().to_vec();
            if matches!(opcode, Opcode::Getxattr) {
                body.extend_from_slice(b"user.none\0");
            }
            body
        };
        let (_, header, _) = call(
            &mut driver,
            &fs,
            opcode,
            file.nodeid,
            &request(0xff0a_ffff),
            &[256],
        );
        assert_eq!(header.error, -libc::EINVAL, "{opcode:?} of ~4 GiB");
        let (_, header, _) = call(
            &mut driver,
            &fs,
            opcode,
            file.nodeid,
            &request(64 * 1024 + 1),
            &[256],
        );
        assert_eq!(header.error, -libc::EINVAL, "{opcode:?} past 64 KiB");
        // Within the limit the file system answers (no such attribute, or
        // an empty list, or no xattr support on this file system).
        let (_, header, _) = call(
            &mut driver,
            &fs,
            opcode,
            file.nodeid,
            &request(64 * 1024),
            &[256],
        );
        assert_ne!(header.error, -libc::EINVAL, "{opcode:?} of 64 KiB");
    }
}

/// LOOKUP of `name` with a reply buffer of `len` bytes: the used length.
fn lookup_with_room(driver: &mut FuseDriver, fs: &Fs, name: &str, len: u32) -> u32 {
    let body = [name.as_bytes(), b"\0"].concat();
    let message = driver.message(Opcode::Lookup, ROOT, &body);
    driver.guest.post(
        REQUEST_QUEUE,
        &[Buffer::Readable(&message), Buffer::Writable(len)],
    );
    kick(fs, REQUEST_QUEUE);
    let count = driver.guest.posted(REQUEST_QUEUE);
    driver.guest.wait_used(REQUEST_QUEUE, count);
    driver.guest.used(REQUEST_QUEUE, count - 1).1
}

#[test]
fn malformed_chains_get_used_length_zero_and_the_device_keeps_serving() {
    let dir = ScratchDir::new("malformed");
    shared_file(&dir.0, "f", 10);
    let memory = guest_memory();
    let (mut driver, fs) = session(&memory, &dir.0);

    let lookup_f = driver.message(Opcode::Lookup, ROOT, b"f\0");
    let beyond = MEMORY_SIZE as u64 + 0x1000;
    let cases: Vec<(&str, Vec<Buffer>)> = vec![
        (
            "a request outside guest memory",
            vec![Buffer::Raw(beyond, 64, 0), Buffer::Writable(4096)],
        ),
        (
            "a reply buffer outside guest memory",
            vec![
                Buffer::Readable(&lookup_f),
                Buffer::Raw(beyond, 4096, WRITE),
            ],
        ),
        (
            "a buffer straddling the end of guest memory",
            vec![
                Buffer::Readable(&lookup_f),
                Buffer::Raw(MEMORY_SIZE as u64 - 16, 4096, WRITE),
            ],
        ),
        (
            "a buffer at the top of the address space",
            vec![
                Buffer::Readable(&lookup_f),
                Buffer::Raw(u64::MAX - 8, u32::MAX, WRITE),
            ],
        ),
        ("no room for a reply", vec![Buffer::Readable(&lookup_f)]),
        (
            "a reply buffer too small for the reply",
            vec![Buffer::Readable(&lookup_f), Buffer::Writable(8)],
        ),
        (
            "a truncated header",
            vec![Buffer::Readable(&lookup_f[..10]), Buffer::Writable(4096)],
        ),
        ("an empty request", vec![Buffer::Writable(4096)]),
    ];
    for (what, buffers) in &cases {
        driver.guest.post(REQUEST_QUEUE, buffers);
        kick(&fs, REQUEST_QUEUE);
        let count = driver.guest.posted(REQUEST_QUEUE);
        driver.guest.wait_used(REQUEST_QUEUE, count);
        assert_eq!(driver.guest.used(REQUEST_QUEUE, count - 1).1, 0, "{what}");
    }

    // A chain that loops on itself (its NEXT points back at it): the
    // chain ends at the queue size.
    let looping = driver.guest.next_descriptor(REQUEST_QUEUE);
    let address = driver.guest.allocate(64);
    memory
        .write_slice(&lookup_f, GuestAddress(address))
        .unwrap();
    driver.guest.publish(
        REQUEST_QUEUE,
        looping,
        &[RawDescriptor::from(SplitDescriptor::new(
            address,
            lookup_f.len() as u32,
            NEXT,
            looping,
        ))],
    );
    kick(&fs, REQUEST_QUEUE);
    let count = driver.guest.posted(REQUEST_QUEUE);
    driver.guest.wait_used(REQUEST_QUEUE, count);
    assert_eq!(
        driver.guest.used(REQUEST_QUEUE, count - 1).1,
        0,
        "a looping chain"
    );

    // An unknown opcode is answered ENOSYS.
    let (used, header, _) = call(&mut driver, &fs, Opcode::MaxOpcode, ROOT, &[], &[64]);
    assert_eq!(header.error, -libc::ENOSYS);
    assert_eq!(used as usize, HEADER);

    // After all that, a well-formed request still works.
    let (error, entry) = lookup(&mut driver, &fs, "f");
    assert_eq!(error, 0);
    assert_eq!(entry.attr.size, 10);
}

#[test]
fn random_requests_never_crash_the_server() {
    let dir = ScratchDir::new("random");
    shared_file(&dir.0, "f", 100);
    std::fs::create_dir(dir.0.join("d")).unwrap();
    let memory = guest_memory();
    let (mut driver, fs) = session(&memory, &dir.0);
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..400u32 {
        // Any opcode but those that end the session (INIT, DESTROY) or
        // drop the root's lookups (FORGET, BATCH_FORGET).
        let opcode = loop {
            let op = (random() % 52) as u32;
            if ![2, 26, 38, 42].contains(&op) {
                break op;
            }
        };
        let nodeid = match random() % 4 {
            0 => ROOT,
            1 => 2,
            2 => 0,
            _ => random(),
        };
        let body: Vec<u8> = (0..random() % 300).map(|_| random() as u8).collect();
        let mut header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode,
            unique: round as u64 + 1000,
            nodeid,
            ..Default::default()
        };
        if random() % 8 == 0 {
            // A length that lies.
            header.len = random() as u32;
        }
        let message = [header.as_slice(), &body].concat();
        let reply = (random() % 5000) as u32;
        driver.guest.post(
            REQUEST_QUEUE,
            &[Buffer::Readable(&message), Buffer::Writable(reply.max(1))],
        );
        if driver.guest.free_buffer_space() < 1 << 20 {
            driver.guest.reuse_buffers();
        }
        kick(&fs, REQUEST_QUEUE);
        driver
            .guest
            .wait_used(REQUEST_QUEUE, driver.guest.posted(REQUEST_QUEUE));
    }
    // Still alive and answering.
    let (error, entry) = lookup(&mut driver, &fs, "f");
    assert_eq!(error, 0);
    assert_eq!(entry.attr.size, 100);
}

#[test]
fn a_corrupt_ring_is_abandoned_not_spun_on_and_bad_heads_are_skipped() {
    let dir = ScratchDir::new("corrupt");
    let memory = guest_memory();
    let mut driver = FuseDriver::new(&memory);
    let view = memory_view::view_memory(&memory).unwrap();
    let queues = (0..NUM_QUEUES)
        .map(|index| {
            let queue = driver.guest.device_queue(index);
            memory_view::view_queue(index, &queue, &view).unwrap()
        })
        .collect();
    let mut state = QueueState {
        memory: view,
        queues,
        events: Vec::new(),
        interrupt: std::sync::Arc::new(Interrupt::new().unwrap()),
        server: server::new_server(&dir.0).unwrap(),
        broken: [false; NUM_QUEUES],
    };

    // A head index beyond the queue: nothing to serve and nothing to
    // return, but the request after it is served.
    let avail = driver.guest.avail_addr(REQUEST_QUEUE);
    memory.write_obj(5000u16, GuestAddress(avail + 4)).unwrap();
    memory.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    state.process_queue(REQUEST_QUEUE);
    assert!(!state.broken[REQUEST_QUEUE]);
    assert_eq!(driver.guest.used_idx(REQUEST_QUEUE), 0);
    // The bogus head took no descriptor: the next chain starts at 0.
    assert_eq!(driver.guest.next_descriptor(REQUEST_QUEUE), 0);
    let init = driver.message(
        Opcode::Init,
        0,
        InitIn {
            major: 7,
            minor: 31,
            ..Default::default()
        }
        .as_slice(),
    );
    driver.guest.post(
        REQUEST_QUEUE,
        &[Buffer::Readable(&init), Buffer::Writable(4096)],
    );
    state.process_queue(REQUEST_QUEUE);
    assert_eq!(driver.guest.used_idx(REQUEST_QUEUE), 1);
    assert_ne!(
        driver.guest.used(REQUEST_QUEUE, 0).1,
        0,
        "INIT was answered"
    );
    assert_ne!(
        state
            .interrupt
            .status
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the guest was interrupted"
    );

    // An available index more than a queue ahead of the device: corrupt.
    // The device stops serving that queue instead of spinning on it.
    memory
        .write_obj(2 + 2 * QUEUE_LEN, GuestAddress(avail + 2))
        .unwrap();
    let started = Instant::now();
    state.process_queue(REQUEST_QUEUE);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(state.broken[REQUEST_QUEUE]);
    state.process_queue(REQUEST_QUEUE);
    assert_eq!(driver.guest.used_idx(REQUEST_QUEUE), 1);
    // The other queue is unaffected.
    assert!(!state.broken[HIPRIO_QUEUE]);
}

/// Reads directory `fh` the way `rm -rf` does: a batch of names, each
/// removed (on the host, which moves a tmpfs directory's offsets the same
/// way as the guest's UNLINK) before the next batch is asked for from the
/// last offset. Returns the names seen.
fn read_while_removing(
    driver: &mut FuseDriver,
    fs: &Fs,
    dir: &Path,
    fh: u64,
    opcode: Opcode,
) -> Vec<String> {
    let mut seen = Vec::new();
    let mut offset = 0;
    loop {
        let body = ReadIn {
            fh,
            offset,
            size: 4096,
            ..Default::default()
        };
        let (_, header, reply) = call(driver, fs, opcode, ROOT, body.as_slice(), &[4096 + 16]);
        assert_eq!(header.error, 0, "{opcode:?} failed");
        let mut rest = &reply[..header.len as usize - HEADER];
        if rest.is_empty() {
            return seen;
        }
        while !rest.is_empty() {
            if matches!(opcode, Opcode::Readdirplus) {
                rest = &rest[std::mem::size_of::<EntryOut>()..];
            }
            let dirent = object::<Dirent>(rest);
            let start = std::mem::size_of::<Dirent>();
            let name = &rest[start..start + dirent.namelen as usize];
            let name = String::from_utf8(name.to_vec()).unwrap();
            if name != "." && name != ".." {
                std::fs::remove_file(dir.join(&name)).unwrap();
            }
            seen.push(name);
            offset = dirent.off;
            rest = &rest[(start + dirent.namelen as usize).next_multiple_of(8)..];
        }
    }
}

#[test]
fn a_directory_read_while_its_names_are_removed_yields_every_name() {
    for opcode in [Opcode::Readdirplus, Opcode::Readdir] {
        // A tmpfs where there is one. Before Linux 6.6 its offsets are
        // positions among the live names, which removals move (the VM test
        // `rm_rf_of_a_directory_of_many_files_removes_them_all` runs on
        // such a kernel, the test host's); on later kernels this checks
        // the listing's offsets, order and release.
        let scratch = ScratchDir::new_on_tmpfs(&format!("listing-{opcode:?}"));
        let names: Vec<String> = (0..300).map(|i| format!("f{i:03}")).collect();
        for name in &names {
            std::fs::write(scratch.0.join(name), b"").unwrap();
        }
        let memory = guest_memory();
        let (mut driver, fs) = session(&memory, &scratch.0);
        let body = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        let (_, header, reply) = call(
            &mut driver,
            &fs,
            Opcode::Opendir,
            ROOT,
            body.as_slice(),
            &[256],
        );
        assert_eq!(header.error, 0, "OPENDIR failed");
        let fh = object::<OpenOut>(&reply).fh;
        let mut seen = read_while_removing(&mut driver, &fs, &scratch.0, fh, opcode);
        assert_eq!(
            seen[..2],
            [".", ".."],
            "{opcode:?}: the dot entries come first"
        );
        seen.drain(..2);
        seen.sort();
        assert_eq!(seen, names, "{opcode:?} skipped names");
        let left = std::fs::read_dir(&scratch.0).unwrap().count();
        assert_eq!(left, 0, "names left in the directory");
        let release = ReleaseIn {
            fh,
            ..Default::default()
        };
        let (_, header, _) = call(
            &mut driver,
            &fs,
            Opcode::Releasedir,
            ROOT,
            release.as_slice(),
            &[256],
        );
        assert_eq!(header.error, 0, "RELEASEDIR failed");
    }
}

fn request(
    driver: &mut FuseDriver,
    fs: &Fs,
    opcode: Opcode,
    nodeid: u64,
    parts: &[&[u8]],
) -> (i32, Vec<u8>) {
    let (_, header, reply) = call(driver, fs, opcode, nodeid, &parts.concat(), &[4096]);
    (header.error, reply)
}

fn host_mode(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap().mode()
}

#[test]
fn the_guest_cannot_make_devices_set_id_files_or_privileged_xattrs() {
    use fuse_backend_rs::abi::fuse_abi::{CreateIn, MkdirIn, MknodIn, SetattrIn, SetxattrIn};
    let scratch = ScratchDir::new("guard");
    let memory = guest_memory();
    let (mut driver, fs) = session(&memory, &scratch.0);
    let eperm = -libc::EPERM;

    // Device nodes: refused, nothing on the host. FIFOs are fine.
    for (name, kind) in [("chr\0", libc::S_IFCHR), ("blk\0", libc::S_IFBLK)] {
        let body = MknodIn {
            mode: kind | 0o666,
            rdev: libc::makedev(1, 3) as u32,
            ..Default::default()
        };
        let (error, _) = request(
            &mut driver,
            &fs,
            Opcode::Mknod,
            ROOT,
            &[body.as_slice(), name.as_bytes()],
        );
        assert_eq!(error, eperm, "{name}");
    }
    assert!(!scratch.0.join("chr").exists() && !scratch.0.join("blk").exists());
    let fifo = MknodIn {
        mode: libc::S_IFIFO | 0o644,
        ..Default::default()
    };
    let (error, _) = request(
        &mut driver,
        &fs,
        Opcode::Mknod,
        ROOT,
        &[fifo.as_slice(), b"fifo\0"],
    );
    assert_eq!(error, 0);
    assert_eq!(
        host_mode(&scratch.0.join("fifo")) & libc::S_IFMT,
        libc::S_IFIFO
    );

    // Set-ID bits: stripped from new files, by MKNOD and CREATE.
    let regular = MknodIn {
        mode: libc::S_IFREG | 0o6755,
        ..Default::default()
    };
    let (error, _) = request(
        &mut driver,
        &fs,
        Opcode::Mknod,
        ROOT,
        &[regular.as_slice(), b"made\0"],
    );
    assert_eq!(error, 0);
    assert_eq!(host_mode(&scratch.0.join("made")) & 0o7777, 0o755);
    let create = CreateIn {
        flags: (libc::O_CREAT | libc::O_RDWR) as u32,
        mode: libc::S_IFREG | 0o4755,
        umask: 0,
        fuse_flags: 0,
    };
    let (error, reply) = request(
        &mut driver,
        &fs,
        Opcode::Create,
        ROOT,
        &[create.as_slice(), b"created\0"],
    );
    assert_eq!(error, 0);
    let created = object::<EntryOut>(&reply).nodeid;
    assert_eq!(host_mode(&scratch.0.join("created")) & 0o7777, 0o755);

    // ... and from a chmod of a file, not of a directory (set-group-ID
    // there passes the group on to new files).
    let chmod = |mode: u32| SetattrIn {
        valid: 1, // FATTR_MODE
        mode,
        ..Default::default()
    };
    let (error, _) = request(
        &mut driver,
        &fs,
        Opcode::Setattr,
        created,
        &[chmod(libc::S_IFREG | 0o6711).as_slice()],
    );
    assert_eq!(error, 0);
    assert_eq!(host_mode(&scratch.0.join("created")) & 0o7777, 0o711);
    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let (error, reply) = request(
        &mut driver,
        &fs,
        Opcode::Mkdir,
        ROOT,
        &[mkdir.as_slice(), b"dir\0"],
    );
    assert_eq!(error, 0);
    let dir = object::<EntryOut>(&reply).nodeid;
    let (error, _) = request(
        &mut driver,
        &fs,
        Opcode::Setattr,
        dir,
        &[chmod(libc::S_IFDIR | 0o2775).as_slice()],
    );
    assert_eq!(error, 0);
    assert_eq!(host_mode(&scratch.0.join("dir")) & 0o7777, 0o2775);

    // Extended attributes: security.* and trusted.* refused both ways;
    // user.* goes to the host file system (which may not support it).
    for name in [
        "security.capability\0",
        "trusted.overlay.opaque\0",
        "security.selinux\0",
    ] {
        let value = b"\x01\x00\x00\x02";
        let body = SetxattrIn {
            size: value.len() as u32,
            flags: 0,
        };
        let (error, _) = request(
            &mut driver,
            &fs,
            Opcode::Setxattr,
            created,
            &[body.as_slice(), name.as_bytes(), value],
        );
        assert_eq!(error, eperm, "{name}");
        let (error, _) = request(
            &mut driver,
            &fs,
            Opcode::Removexattr,
            created,
            &[name.as_bytes()],
        );
        assert_eq!(error, eperm, "{name}");
    }
    let host_file = std::ffi::CString::new(scratch.0.join("created").to_str().unwrap()).unwrap();
    // SAFETY: getxattr with a null buffer only returns the value's size.
    let size = unsafe {
        libc::getxattr(
            host_file.as_ptr(),
            c"security.capability".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    assert_eq!(size, -1, "no capability reached the host file");
    let body = SetxattrIn { size: 1, flags: 0 };
    let (error, _) = request(
        &mut driver,
        &fs,
        Opcode::Setxattr,
        created,
        &[body.as_slice(), b"user.note\0", b"x"],
    );
    assert_ne!(error, eperm, "user.* is allowed");
}

fn opendir(driver: &mut FuseDriver, fs: &Fs, nodeid: u64) -> (i32, u64) {
    let body = OpenIn {
        flags: libc::O_RDONLY as u32,
        fuse_flags: 0,
    };
    let (_, header, reply) = call(driver, fs, Opcode::Opendir, nodeid, body.as_slice(), &[256]);
    (header.error, object::<OpenOut>(&reply).fh)
}

fn readdir_start(driver: &mut FuseDriver, fs: &Fs, fh: u64) -> i32 {
    let body = ReadIn {
        fh,
        offset: 0,
        size: 4096,
        ..Default::default()
    };
    let (_, header, _) = call(
        driver,
        fs,
        Opcode::Readdir,
        ROOT,
        body.as_slice(),
        &[4096 + 16],
    );
    header.error
}

fn release(driver: &mut FuseDriver, fs: &Fs, opcode: Opcode, nodeid: u64, fh: u64) -> i32 {
    let body = ReleaseIn {
        fh,
        ..Default::default()
    };
    let (_, header, _) = call(driver, fs, opcode, nodeid, body.as_slice(), &[256]);
    header.error
}

#[test]
fn directory_listings_stop_at_their_memory_budget_with_enomem() {
    let scratch = ScratchDir::new("listing-budget");
    for i in 0..1000 {
        std::fs::write(
            scratch.0.join(format!("a-rather-long-file-name-{i:04}")),
            b"",
        )
        .unwrap();
    }
    let memory = guest_memory();
    let (mut driver, fs) = session(&memory, &scratch.0);
    let listings = fs.server().listings();
    // Room for one listing of this directory, not two.
    let (_, first) = opendir(&mut driver, &fs, ROOT);
    assert_eq!(readdir_start(&mut driver, &fs, first), 0);
    let one = listings.held_bytes();
    assert!(one > 1000 * 30, "{one} bytes for 1000 names");
    listings.set_budget(one * 3 / 2);
    let (_, second) = opendir(&mut driver, &fs, ROOT);
    assert_eq!(readdir_start(&mut driver, &fs, second), -libc::ENOMEM);
    assert_eq!(
        listings.held_bytes(),
        one,
        "the refused listing was not kept"
    );
    assert_eq!(listings.count(), 1);
    // Starting over on the same handle reuses its own share.
    assert_eq!(readdir_start(&mut driver, &fs, first), 0);
    // Closing the first makes room for the second.
    assert_eq!(
        release(&mut driver, &fs, Opcode::Releasedir, ROOT, first),
        0
    );
    assert_eq!(listings.held_bytes(), 0);
    assert_eq!(readdir_start(&mut driver, &fs, second), 0);
    assert_eq!(listings.held_bytes(), one);
}

#[test]
fn open_handles_stop_at_their_cap_with_enfile() {
    let scratch = ScratchDir::new("handle-cap");
    shared_file(&scratch.0, "file", 10);
    let memory = guest_memory();
    let (mut driver, fs) = session(&memory, &scratch.0);
    let guard = fs.server().guard();
    guard.set_handle_limit(3);
    let (error, entry) = lookup(&mut driver, &fs, "file");
    assert_eq!(error, 0);
    let files: Vec<u64> = (0..2)
        .map(|_| open(&mut driver, &fs, entry.nodeid, libc::O_RDONLY))
        .collect();
    let (error, dir) = opendir(&mut driver, &fs, ROOT);
    assert_eq!(error, 0);
    assert_eq!(guard.open_handles(), 3);
    // Files and directories alike are refused past the cap.
    let body = OpenIn {
        flags: libc::O_RDONLY as u32,
        fuse_flags: 0,
    };
    let (_, header, _) = call(
        &mut driver,
        &fs,
        Opcode::Open,
        entry.nodeid,
        body.as_slice(),
        &[256],
    );
    assert_eq!(header.error, -libc::ENFILE);
    assert_eq!(opendir(&mut driver, &fs, ROOT).0, -libc::ENFILE);
    assert_eq!(guard.open_handles(), 3);
    // A release of a handle that is not open makes no room.
    assert_ne!(
        release(&mut driver, &fs, Opcode::Release, entry.nodeid, 9999),
        0
    );
    assert_eq!(guard.open_handles(), 3);
    // A real one does.
    assert_eq!(
        release(&mut driver, &fs, Opcode::Release, entry.nodeid, files[0]),
        0
    );
    assert_eq!(release(&mut driver, &fs, Opcode::Releasedir, ROOT, dir), 0);
    assert_eq!(guard.open_handles(), 1);
    open(&mut driver, &fs, entry.nodeid, libc::O_RDONLY);
    assert_eq!(opendir(&mut driver, &fs, ROOT).0, 0);
    assert_eq!(guard.open_handles(), 3);
}
