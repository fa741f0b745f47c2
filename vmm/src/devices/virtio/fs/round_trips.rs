//! Two requests the device answers itself, each to spare the guest round
//! trips to the VMM (a round trip is a notification exit, a switch to the
//! device thread and back, an interrupt and its acknowledgement: tens of
//! microseconds on hardware, about a millisecond under nested emulation):
//!
//! - **LOOKUP of a name that does not exist** gets a *negative entry* (node
//!   id 0) valid for the share's entry timeout, as libfuse's passthrough_hp
//!   answers, instead of ENOENT, which the guest kernel never caches.
//!   Programs look missing names up all the time — glibc stats
//!   /etc/localtime at every `localtime()` (`ls -l` once per line), a shell
//!   walks `$PATH`, `touch` of a new file looks it up twice before creating
//!   it — and each was a round trip. Like a cached positive entry, a name
//!   the host creates behind the guest's back is seen once the timeout has
//!   passed; a name the guest creates replaces the negative entry at once.
//!   Every virtio-fs driver speaks FUSE 7.31 or later, well past 7.4, the
//!   version from which node id 0 means "negative entry".
//! - **FLUSH** is answered ENOSYS, FUSE's way of telling the guest not to
//!   send it: its kernel stops sending FLUSH (at every `close(2)` of every
//!   descriptor) and still writes dirty pages back and reports their errors
//!   at close. The passthrough file system's FLUSH only duplicated and
//!   closed the host descriptor, which matters to POSIX locks held on the
//!   host, and it holds none: the guest's locks stay in the guest kernel
//!   (the file system implements no GETLK/SETLK).
//!
//! Everything else goes to the FUSE server.

use std::ffi::CStr;
use std::io::{self, Read, Write};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{EntryOut, InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::filesystem::{Context, FileSystem};
use fuse_backend_rs::api::Vfs;
use fuse_backend_rs::transport::{Reader, Writer};
use fuse_vm_memory::ByteValued;

/// The longest LOOKUP body read: a name (Linux allows 255 bytes) and its NUL,
/// with room to spare; a longer one is refused with ENAMETOOLONG.
const MAX_NAME: usize = 4096;

/// Whether the device answers a request with this opcode itself.
pub fn answered_here(opcode: u32) -> bool {
    opcode == Opcode::Lookup as u32 || opcode == Opcode::Flush as u32
}

/// Answers the request whose header is `header` (already read from
/// `body`), for which [`answered_here`] holds; returns the reply's length.
pub fn answer(
    vfs: &Vfs,
    negative_timeout: Duration,
    header: &InHeader,
    body: Reader<'_, ()>,
    writer: Writer<'_, ()>,
) -> io::Result<usize> {
    if header.opcode == Opcode::Flush as u32 {
        return reply(writer, header, Err(libc::ENOSYS));
    }
    let entry = match read_name(body, header) {
        Ok(name) => lookup(vfs, negative_timeout, header, &name),
        Err(errno) => Err(errno),
    };
    reply(
        writer,
        header,
        entry.as_ref().map(ByteValued::as_slice).map_err(|e| *e),
    )
}

/// The NUL-terminated name of a LOOKUP request.
fn read_name(mut body: Reader<'_, ()>, header: &InHeader) -> Result<Vec<u8>, i32> {
    let len = (header.len as usize).saturating_sub(std::mem::size_of::<InHeader>());
    if len > MAX_NAME {
        return Err(libc::ENAMETOOLONG);
    }
    let mut name = vec![0u8; len];
    body.read_exact(&mut name).map_err(|_| libc::EINVAL)?;
    Ok(name)
}

/// The entry for `name` in directory `header.nodeid`: the file system's, or
/// a negative one when it does not exist.
fn lookup(
    vfs: &Vfs,
    negative_timeout: Duration,
    header: &InHeader,
    name: &[u8],
) -> Result<EntryOut, i32> {
    let name = CStr::from_bytes_until_nul(name).map_err(|_| libc::EINVAL)?;
    let caller = Context {
        uid: header.uid,
        gid: header.gid,
        pid: header.pid as libc::pid_t,
    };
    match vfs.lookup(&caller, header.nodeid.into(), name) {
        Ok(entry) => Ok(EntryOut::from(entry)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(negative_entry(negative_timeout)),
        Err(e) => Err(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// "No such name, and the guest may remember that for `timeout`."
fn negative_entry(timeout: Duration) -> EntryOut {
    EntryOut {
        nodeid: 0,
        entry_valid: timeout.as_secs(),
        entry_valid_nsec: timeout.subsec_nanos(),
        ..EntryOut::default()
    }
}

/// Writes the reply to `header`'s request: `payload` after a success
/// header, or an error header with `-errno`.
pub(super) fn reply(
    mut writer: Writer<'_, ()>,
    header: &InHeader,
    payload: Result<&[u8], i32>,
) -> io::Result<usize> {
    let (error, payload) = match payload {
        Ok(payload) => (0, payload),
        Err(errno) => (-errno, &[][..]),
    };
    let out = OutHeader {
        len: (std::mem::size_of::<OutHeader>() + payload.len()) as u32,
        error,
        unique: header.unique,
    };
    writer.write_all(out.as_slice())?;
    writer.write_all(payload)?;
    writer.commit(None)?;
    Ok(out.len as usize)
}
