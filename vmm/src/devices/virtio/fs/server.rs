//! The virtio-fs backend: `fuse-backend-rs`'s passthrough file system over
//! the shared directory, mounted at the root of its VFS (which negotiates the
//! FUSE session with the guest), its FUSE server, and one request served from
//! one descriptor chain (by the server, by [`super::round_trips`] for the
//! two requests the device answers itself, or from [`super::listings`] for
//! directory reads).

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{FsOptions, InHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{Vfs, VfsOptions};
use fuse_backend_rs::passthrough::{CachePolicy, Config as PassthroughConfig, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use fuse_virtio_queue::DescriptorChain;

use super::guard::Guarded;
use super::listings::{self, Listings};
use super::memory_view::FuseMemory;
use super::{request_limits, round_trips, FsError};

/// How long the guest may trust what it learnt of a name (entries and
/// negative entries) or of a file's attributes before asking again:
/// fuse-backend-rs's default for its "auto" cache policy.
pub const CACHE_TIMEOUT: Duration = Duration::from_secs(5);

/// What serves one fs device's requests: the FUSE server, and the VFS it
/// talks to (for the requests answered in [`round_trips`]).
pub struct FsServer {
    server: Server<Arc<Guarded>>,
    vfs: Arc<Vfs>,
    guard: Arc<Guarded>,
    listings: Listings,
}

impl FsServer {
    /// Open files and directories (at most [`super::guard::MAX_OPEN_HANDLES`]).
    pub fn open_handles(&self) -> usize {
        self.guard.open_handles()
    }

    /// The limits on what the guest does to the share (see [`Guarded`]).
    pub fn guard(&self) -> &Guarded {
        &self.guard
    }

    /// The directory listings held (see [`Listings`]).
    pub fn listings(&self) -> &Listings {
        &self.listings
    }
}

/// A FUSE server exporting `dir`.
pub fn new_server(dir: &Path) -> Result<Arc<FsServer>, FsError> {
    let vfs = Arc::new(vfs_over(passthrough(dir)?)?);
    let guard = Arc::new(Guarded::new(vfs.clone()));
    Ok(Arc::new(FsServer {
        server: Server::new(guard.clone()),
        vfs,
        guard,
        listings: Listings::default(),
    }))
}

/// The VFS the server talks to, with `fs` mounted at its root. The VFS (not
/// the passthrough file system alone, which answers INIT with only its own
/// caching flags) offers the guest 1 MiB requests (MAX_PAGES, BIG_WRITES;
/// without them reads go out 128 KiB and writes 8 KiB at a time, each a
/// round trip to us), asynchronous reads and parallel directory operations.
fn vfs_over(fs: PassthroughFs) -> Result<Vfs, FsError> {
    let options = VfsOptions {
        // The guest opens files and directories as usual: the passthrough
        // file system keeps a host descriptor per open, and CachePolicy::Auto
        // revalidates cached data at open.
        no_open: false,
        no_opendir: false,
        // The device has no DAX window.
        out_opts: VfsOptions::default().out_opts - FsOptions::PERFILE_DAX,
        ..VfsOptions::default()
    };
    let vfs = Vfs::new(options);
    vfs.mount(Box::new(fs), "/")
        .map_err(|e| FsError::Setup(format!("mounting the shared directory in the VFS: {e}")))?;
    Ok(vfs)
}

/// The passthrough file system over `dir`.
fn passthrough(dir: &Path) -> Result<PassthroughFs, FsError> {
    let bad = |reason: String| FsError::BadDirectory {
        path: dir.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(dir).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a directory".into()));
    }
    let root_dir = dir
        .to_str()
        .ok_or_else(|| bad("the path is not UTF-8".into()))?
        .to_string();
    let config = PassthroughConfig {
        root_dir,
        // One guest owns the share: it caches data and metadata (for the
        // configured timeouts), revalidating file data on open.
        cache_policy: CachePolicy::Auto,
        entry_timeout: CACHE_TIMEOUT,
        attr_timeout: CACHE_TIMEOUT,
        // Writes gather in the guest's page cache and reach us as large
        // WRITEs (up to 1 MiB) instead of one per write(2).
        writeback: true,
        // Container images carry file capabilities and other xattrs.
        xattr: true,
        // Opened here (import below) and initialised by the VFS.
        do_import: false,
        ..Default::default()
    };
    let fs = PassthroughFs::new(config).map_err(|e| FsError::Setup(e.to_string()))?;
    fs.import().map_err(|e| bad(format!("opening it: {e}")))?;
    Ok(fs)
}

/// The passthrough file system holds an `O_PATH` descriptor for every inode
/// the guest has looked up and not forgotten: a guest keeping thousands of
/// files in its dentry cache needs far more than the usual soft limit of
/// 1024. Raises this process's RLIMIT_NOFILE as far as allowed (the hard
/// limit, or `fs.nr_open` when privileged) and returns the new soft limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(limit.rlim_max);
    for wanted in [nr_open.max(limit.rlim_max), limit.rlim_max] {
        if wanted <= limit.rlim_cur {
            return Ok(limit.rlim_cur);
        }
        let new = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: wanted.max(limit.rlim_max),
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            return Ok(wanted);
        }
    }
    Err(io::Error::last_os_error())
}

/// Serves the FUSE request in `chain` (its device-readable descriptors),
/// writing the reply into its device-writable ones. Returns the length of
/// the reply, the used length to give the driver: 0 when the chain is
/// malformed (buffers outside guest memory, lengths overflowing), when the
/// request cannot be decoded, and for requests without a reply (FORGET).
/// Nothing the guest puts in the chain makes this panic.
pub fn serve_chain(
    server: &FsServer,
    memory: &FuseMemory,
    chain: DescriptorChain<&FuseMemory>,
) -> u32 {
    let reader = match Reader::from_descriptor_chain(memory, chain.clone()) {
        Ok(reader) => reader,
        Err(e) => {
            crate::guest_warn!("virtio-fs: a malformed request buffer: {e}");
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(memory, chain) {
        Ok(writer) => writer,
        Err(e) => {
            crate::guest_warn!("virtio-fs: a malformed reply buffer: {e}");
            return 0;
        }
    };
    // The server reads the header itself: it gets `reader` untouched.
    let mut body = reader.clone();
    let header = body.read_obj::<InHeader>();
    let refusal = header
        .as_ref()
        .ok()
        .and_then(|header| request_limits::refusal(header, body.clone()));
    let served = match (header, refusal) {
        (Ok(header), Some(errno)) => {
            round_trips::reply(writer.into(), &header, Err(errno)).map_err(|e| e.to_string())
        }
        (Ok(header), None) if round_trips::answered_here(header.opcode) => {
            round_trips::answer(&server.vfs, CACHE_TIMEOUT, &header, body, writer.into())
                .map_err(|e| e.to_string())
        }
        (Ok(header), None) if listings::answered_here(header.opcode) => server
            .listings
            .answer(&server.vfs, &header, body, writer.into())
            .map_err(|e| e.to_string()),
        (header, _) => {
            if let Ok(header) = header {
                server.listings.see_forwarded(&header, body);
            }
            server
                .server
                .handle_message(reader, writer.into(), None, None)
                .map_err(|e| e.to_string())
        }
    };
    match served {
        Ok(len) => u32::try_from(len).unwrap_or(0),
        Err(e) => {
            crate::guest_debug!("virtio-fs: request failed: {e}");
            0
        }
    }
}
