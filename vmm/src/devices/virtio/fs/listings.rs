//! READDIR and READDIRPLUS, served from a listing of the directory taken
//! when the guest starts reading it (offset 0), kept per open directory
//! handle until RELEASEDIR.
//!
//! The passthrough file system alone seeks the host directory to the
//! guest's offset for every request. On file systems whose offsets are
//! positions in the live list of entries (tmpfs, and so the overlay upper
//! directories of container root file systems on a tmpfs), removing names
//! between two requests moves the rest up: a seek back to a position then
//! skips as many names as were removed before it. It seeks back whenever a
//! reply could not hold every host entry it read, which READDIRPLUS (each
//! entry carrying its attributes) does at almost every request. `rm -rf` of
//! a directory of 1000 files on the share then left names behind and
//! failed with "Directory not empty". Here the offsets are indexes into a
//! listing that removals do not change, as POSIX has it: names removed or
//! added after the directory was opened (or rewound) may or may not show.
//! The listing also has "." and "..", as every Linux file system's reads
//! do (`ls -a` in a container shows them, as under runc).

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::sync::Mutex;

use fuse_backend_rs::abi::fuse_abi::{
    Dirent, EntryOut, InHeader, Opcode, OutHeader, ReadIn, ReleaseIn,
};
use fuse_backend_rs::api::filesystem::{Context, FileSystem};
use fuse_backend_rs::api::Vfs;
use fuse_backend_rs::transport::{Reader, Writer};
use fuse_vm_memory::ByteValued;

use super::round_trips::reply;

/// The buffer size asked of the file system for each batch of host
/// entries while a listing is taken.
const BATCH_BYTES: u32 = 64 * 1024;

/// The most a reply carries, whatever the guest asks: the largest FUSE
/// request the device takes (256 pages).
const MAX_REPLY: usize = 1 << 20;

/// The most names a listing holds (some 200 MiB of them at most).
const MAX_LISTED: usize = 1 << 22;

/// One name of a listed directory.
struct Listed {
    name: CString,
    ino: u64,
    type_: u32,
}

/// The listings of the directories the guest is reading, by handle.
#[derive(Default)]
pub struct Listings {
    open: Mutex<HashMap<u64, Vec<Listed>>>,
}

/// Whether [`Listings::answer`] serves requests with this opcode.
pub fn answered_here(opcode: u32) -> bool {
    opcode == Opcode::Readdir as u32 || opcode == Opcode::Readdirplus as u32
}

impl Listings {
    /// Answers a READDIR or READDIRPLUS whose header is `header` (already
    /// read from `body`); returns the reply's length.
    pub fn answer(
        &self,
        vfs: &Vfs,
        header: &InHeader,
        mut body: Reader<'_, ()>,
        writer: Writer<'_, ()>,
    ) -> io::Result<usize> {
        let plus = header.opcode == Opcode::Readdirplus as u32;
        let Ok(request) = body.read_obj::<ReadIn>() else {
            return reply(writer, header, Err(libc::EINVAL));
        };
        let room = (request.size as usize).min(MAX_REPLY).min(
            writer
                .available_bytes()
                .saturating_sub(size_of::<OutHeader>()),
        );
        let caller = Context {
            uid: header.uid,
            gid: header.gid,
            pid: header.pid as libc::pid_t,
        };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if request.offset == 0 || !open.contains_key(&request.fh) {
            match list(vfs, &caller, header.nodeid, request.fh) {
                Ok(listing) => {
                    open.insert(request.fh, listing);
                }
                Err(e) => return reply(writer, header, Err(e.raw_os_error().unwrap_or(libc::EIO))),
            }
        }
        let listing = &open[&request.fh];
        let first = usize::try_from(request.offset).unwrap_or(usize::MAX);
        let mut payload = Vec::new();
        for (index, listed) in listing.iter().enumerate().skip(first) {
            let name = listed.name.as_bytes();
            let dirent_len = (size_of::<Dirent>() + name.len() + 7) & !7;
            let entry_len = if plus { size_of::<EntryOut>() } else { 0 };
            if payload.len() + entry_len + dirent_len > room {
                break;
            }
            if plus {
                // Counts a lookup the guest will FORGET, as a LOOKUP
                // would. A name gone since the listing goes out without
                // attributes (node id 0), which the guest skips; so do "."
                // and "..", whose attributes the guest never takes from a
                // directory read (and would never FORGET).
                let entry = if index < 2 {
                    EntryOut::default()
                } else {
                    vfs.lookup(&caller, header.nodeid.into(), &listed.name)
                        .map(EntryOut::from)
                        .unwrap_or_default()
                };
                payload.extend_from_slice(entry.as_slice());
            }
            let dirent = Dirent {
                ino: listed.ino,
                off: index as u64 + 1,
                namelen: name.len() as u32,
                type_: listed.type_,
            };
            payload.extend_from_slice(dirent.as_slice());
            payload.extend_from_slice(name);
            payload.resize(payload.len().next_multiple_of(8), 0);
        }
        reply(writer, header, Ok(&payload))
    }

    /// Takes note of a request the FUSE server answers: RELEASEDIR (the
    /// guest closed the directory) drops its listing, INIT (a new session:
    /// the guest's driver started over) every listing.
    pub fn see_forwarded(&self, header: &InHeader, mut body: Reader<'_, ()>) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if header.opcode == Opcode::Releasedir as u32 {
            if let Ok(release) = body.read_obj::<ReleaseIn>() {
                open.remove(&release.fh);
            }
        } else if header.opcode == Opcode::Init as u32 {
            open.clear();
        }
    }
}

/// Every name in the open directory `nodeid`/`fh`: "." and ".." (which the
/// passthrough file system leaves out), then the rest, read from the file
/// system in batches, each picking up where the last ended.
fn list(vfs: &Vfs, caller: &Context, nodeid: u64, fh: u64) -> io::Result<Vec<Listed>> {
    let (here, parent) = dot_inodes(vfs, caller, nodeid)?;
    let mut listing = vec![
        Listed {
            name: c".".into(),
            ino: here,
            type_: libc::DT_DIR.into(),
        },
        Listed {
            name: c"..".into(),
            ino: parent,
            type_: libc::DT_DIR.into(),
        },
    ];
    let mut offset = 0;
    loop {
        let (before, mut added) = (offset, 0usize);
        vfs.readdir(
            caller,
            nodeid.into(),
            fh,
            BATCH_BYTES,
            offset,
            &mut |entry| {
                let name = CString::new(entry.name)
                    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                listing.push(Listed {
                    name,
                    ino: entry.ino,
                    type_: entry.type_,
                });
                offset = entry.offset;
                added += 1;
                Ok(1)
            },
        )?;
        // Done at the end, and where a file system's offsets would make
        // this loop read the same batch again.
        if added == 0 || offset == before || listing.len() >= MAX_LISTED {
            if listing.len() >= MAX_LISTED {
                crate::guest_warn!("virtio-fs: a directory listing stops at {MAX_LISTED} names");
            }
            return Ok(listing);
        }
    }
}

/// The host inode numbers of directory `nodeid` and of its parent (its own
/// at the top of the share, as at the root of any file system).
fn dot_inodes(vfs: &Vfs, caller: &Context, nodeid: u64) -> io::Result<(u64, u64)> {
    let (attr, _) = vfs.getattr(caller, nodeid.into(), None)?;
    if nodeid == fuse_backend_rs::api::filesystem::ROOT_ID {
        return Ok((attr.st_ino, attr.st_ino));
    }
    // A lookup counts a reference, given back at once.
    match vfs.lookup(caller, nodeid.into(), c"..") {
        Ok(entry) => {
            vfs.forget(caller, entry.inode.into(), 1);
            Ok((attr.st_ino, entry.attr.st_ino))
        }
        Err(_) => Ok((attr.st_ino, attr.st_ino)),
    }
}
