//! What the guest may not do to the host through the share, enforced
//! between the FUSE server and the VFS (on the request's arguments as the
//! server decoded them, out of the guest's reach):
//!
//! - no device nodes: MKNOD of a character or block device fails with
//!   EPERM (FIFOs and sockets are harmless and stay);
//! - no set-user-ID or set-group-ID files: the bits are stripped from the
//!   mode of CREATE and MKNOD, and from SETATTR's new mode of anything but
//!   a directory (where set-group-ID only passes the group on), as a
//!   `nosuid` mount would ignore them: an image's files keep theirs;
//! - extended attributes set or removed only in the `user.` namespace and
//!   POSIX ACLs ([`ALLOWED_XATTRS`]): `security.capability` would make a
//!   privileged binary, `trusted.*` and other `security.*` names steer the
//!   host's kernel (overlayfs, LSMs); reading any stays allowed;
//! - at most [`MAX_OPEN_HANDLES`] open files and directories: each holds a
//!   host descriptor; beyond it OPEN, CREATE and OPENDIR fail with ENFILE.

use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, IoctlData,
    ListxattrReply, OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::vfs::VfsInode;
use fuse_backend_rs::api::Vfs;
use fuse_backend_rs::transport::FsCacheReqHandler;

/// The most files and directories the guest may hold open at once on one
/// share (each is a host descriptor in the VMM).
pub const MAX_OPEN_HANDLES: usize = 16_384;

/// The extended attributes the guest may set or remove: names with these
/// prefixes, or these names.
pub const ALLOWED_XATTRS: &[&str] = &[
    "user.",
    "system.posix_acl_access",
    "system.posix_acl_default",
];

const SET_ID_BITS: u32 = libc::S_ISUID | libc::S_ISGID;

/// `mode` without its set-user-ID and set-group-ID bits, unless it is a
/// directory's.
pub fn without_set_id(mode: u32) -> u32 {
    if mode & libc::S_IFMT == libc::S_IFDIR || mode & SET_ID_BITS == 0 {
        return mode;
    }
    crate::guest_debug!("virtio-fs: stripped set-ID bits from mode {mode:#o}");
    mode & !SET_ID_BITS
}

/// EPERM for an extended attribute outside [`ALLOWED_XATTRS`].
pub fn refuse_xattr(name: &CStr) -> io::Result<()> {
    let name = name.to_bytes();
    let allowed = ALLOWED_XATTRS.iter().any(|allowed| {
        if allowed.ends_with('.') {
            name.starts_with(allowed.as_bytes())
        } else {
            name == allowed.as_bytes()
        }
    });
    if allowed {
        Ok(())
    } else {
        crate::guest_debug!(
            "virtio-fs: refused extended attribute {:?}",
            String::from_utf8_lossy(name)
        );
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

/// The VFS behind the FUSE server, with the limits above.
pub struct Guarded {
    vfs: Arc<Vfs>,
    /// Open files and directories (reserved ones included).
    handles: AtomicUsize,
    /// [`MAX_OPEN_HANDLES`], or lower for tests.
    limit: AtomicUsize,
}

impl Guarded {
    pub fn new(vfs: Arc<Vfs>) -> Self {
        Self {
            vfs,
            handles: AtomicUsize::new(0),
            limit: AtomicUsize::new(MAX_OPEN_HANDLES),
        }
    }

    /// Lowers the cap on open handles below [`MAX_OPEN_HANDLES`] (tests
    /// and fuzzing reach it without thousands of host descriptors).
    pub fn set_handle_limit(&self, limit: usize) {
        self.limit
            .store(limit.min(MAX_OPEN_HANDLES), Ordering::SeqCst);
    }

    /// Open files and directories now.
    pub fn open_handles(&self) -> usize {
        self.handles.load(Ordering::SeqCst)
    }

    /// Takes a place for a handle about to be opened; ENFILE when
    /// [`MAX_OPEN_HANDLES`] are taken.
    fn reserve_handle(&self) -> io::Result<()> {
        let limit = self.limit.load(Ordering::SeqCst);
        let taken = self
            .handles
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                (open < limit).then_some(open + 1)
            });
        match taken {
            Ok(_) => Ok(()),
            Err(_) => {
                crate::guest_warn!(
                    "virtio-fs: {limit} files and directories open: refusing another"
                );
                Err(io::Error::from_raw_os_error(libc::ENFILE))
            }
        }
    }

    /// Keeps the place taken by [`Guarded::reserve_handle`] if the open
    /// made a handle, else gives it back.
    fn settle_handle(&self, made: Result<bool, &io::Error>) {
        if !matches!(made, Ok(true)) {
            self.release_handle();
        }
    }

    fn release_handle(&self) {
        let _ = self
            .handles
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                open.checked_sub(1)
            });
    }
}

#[allow(clippy::too_many_arguments)]
impl FileSystem for Guarded {
    type Inode = VfsInode;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.vfs.init(capable)
    }

    fn destroy(&self) {
        self.vfs.destroy();
        // The file systems dropped every handle.
        self.handles.store(0, Ordering::SeqCst);
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        self.vfs.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.vfs.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        self.vfs.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.vfs.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        attr: stat64,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let mut attr = attr;
        if valid.contains(SetattrValid::MODE) {
            attr.st_mode = without_set_id(attr.st_mode);
        }
        self.vfs.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.vfs.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.vfs.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let kind = mode & libc::S_IFMT;
        if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
            crate::guest_debug!("virtio-fs: refused to make a device node");
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.vfs
            .mknod(ctx, inode, name, without_set_id(mode), rdev, umask)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.vfs.mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.vfs.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.vfs.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.vfs
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.vfs.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        self.reserve_handle()?;
        let opened = self.vfs.open(ctx, inode, flags, fuse_flags);
        self.settle_handle(opened.as_ref().map(|(handle, ..)| handle.is_some()));
        opened
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let args = CreateIn {
            mode: without_set_id(args.mode),
            ..args
        };
        self.reserve_handle()?;
        let created = self.vfs.create(ctx, parent, name, args);
        self.settle_handle(created.as_ref().map(|(_, handle, ..)| handle.is_some()));
        created
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.vfs
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.vfs.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.vfs.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.vfs.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.vfs.fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        // Counted only when a handle was released: bogus releases must not
        // make room.
        let released =
            self.vfs
                .release(ctx, inode, flags, handle, flush, flock_release, lock_owner);
        if released.is_ok() {
            self.release_handle();
        }
        released
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64> {
        self.vfs.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        refuse_xattr(name)?;
        self.vfs.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.vfs.getxattr(ctx, inode, name, size)
    }

    fn listxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        self.vfs.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        refuse_xattr(name)?;
        self.vfs.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        self.reserve_handle()?;
        let opened = self.vfs.opendir(ctx, inode, flags);
        self.settle_handle(opened.as_ref().map(|(handle, _)| handle.is_some()));
        opened
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.vfs
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.vfs
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.vfs.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        let released = self.vfs.releasedir(ctx, inode, flags, handle);
        if released.is_ok() {
            self.release_handle();
        }
        released
    }

    #[allow(clippy::too_many_arguments)]
    fn setupmapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.vfs
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.vfs.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        self.vfs.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.vfs.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.vfs.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.vfs.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.vfs.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.vfs
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    fn bmap(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        block: u64,
        blocksize: u32,
    ) -> io::Result<u64> {
        self.vfs.bmap(ctx, inode, block, blocksize)
    }

    fn poll(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        khandle: Self::Handle,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.vfs.poll(ctx, inode, handle, khandle, flags, events)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.vfs.notify_reply()
    }

    #[inline]
    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.vfs.id_remap(ctx)
    }
}
