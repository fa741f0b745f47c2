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

/// The most names a listing holds.
pub const MAX_LISTED: usize = 1 << 22;

/// The most memory the listings of one share hold together (names and
/// their records): a guest opening a huge directory many times, or many
/// huge directories, gets ENOMEM from the directory read past it instead
/// of growing the VMM. A listing of 100,000 names of 20 bytes takes some
/// 6 MiB.
pub const MAX_LISTINGS_BYTES: usize = 64 << 20;

/// One name of a listed directory.
struct Listed {
    name: CString,
    ino: u64,
    type_: u32,
}

impl Listed {
    /// What it costs in memory, roughly: its record and its name.
    fn cost(&self) -> usize {
        size_of::<Listed>() + self.name.as_bytes_with_nul().len()
    }
}

/// The listings of the directories the guest is reading, by handle.
#[derive(Default)]
pub struct Listings {
    state: Mutex<State>,
}

struct State {
    open: HashMap<u64, Vec<Listed>>,
    /// What `open` costs, at most `budget`.
    held: usize,
    /// [`MAX_LISTINGS_BYTES`], or lower for tests.
    budget: usize,
}

impl Default for State {
    fn default() -> Self {
        Self {
            open: HashMap::new(),
            held: 0,
            budget: MAX_LISTINGS_BYTES,
        }
    }
}

impl State {
    fn drop_listing(&mut self, fh: u64) {
        if let Some(listing) = self.open.remove(&fh) {
            self.held -= listing.iter().map(Listed::cost).sum::<usize>();
        }
    }
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
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if request.offset == 0 || !state.open.contains_key(&request.fh) {
            state.drop_listing(request.fh);
            let budget = state.budget.saturating_sub(state.held);
            match list(vfs, &caller, header.nodeid, request.fh, budget) {
                Ok((listing, cost)) => {
                    state.held += cost;
                    state.open.insert(request.fh, listing);
                }
                Err(e) => return reply(writer, header, Err(e.raw_os_error().unwrap_or(libc::EIO))),
            }
        }
        let listing = &state.open[&request.fh];
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
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if header.opcode == Opcode::Releasedir as u32 {
            if let Ok(release) = body.read_obj::<ReleaseIn>() {
                state.drop_listing(release.fh);
            }
        } else if header.opcode == Opcode::Init as u32 {
            state.open.clear();
            state.held = 0;
        }
    }

    /// Lowers the memory budget of the listings below
    /// [`MAX_LISTINGS_BYTES`] (tests and fuzzing reach it with small
    /// directories).
    pub fn set_budget(&self, bytes: usize) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).budget = bytes.min(MAX_LISTINGS_BYTES);
    }

    /// The memory the open listings hold (at most [`MAX_LISTINGS_BYTES`]).
    pub fn held_bytes(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).held
    }

    /// How many listings are open.
    pub fn count(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open
            .len()
    }
}

/// Every name in the open directory `nodeid`/`fh`: "." and ".." (which the
/// passthrough file system leaves out), then the rest, read from the file
/// system in batches, each picking up where the last ended; and what it
/// costs. ENOMEM when it would cost more than `budget` bytes.
fn list(
    vfs: &Vfs,
    caller: &Context,
    nodeid: u64,
    fh: u64,
    budget: usize,
) -> io::Result<(Vec<Listed>, usize)> {
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
    let mut cost: usize = listing.iter().map(Listed::cost).sum();
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
                let listed = Listed {
                    name,
                    ino: entry.ino,
                    type_: entry.type_,
                };
                cost += listed.cost();
                if cost > budget {
                    return Err(io::Error::from_raw_os_error(libc::ENOMEM));
                }
                listing.push(listed);
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
            return Ok((listing, cost));
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
