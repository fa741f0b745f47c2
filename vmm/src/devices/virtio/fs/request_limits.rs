//! Requests refused before they reach the FUSE server, because it would
//! size an allocation by what the guest asked for.
//!
//! `fuse-backend-rs`'s passthrough file system answers GETXATTR and
//! LISTXATTR with a buffer of the guest's `size` allocated up front (4 GiB
//! for `size` = u32::MAX): the fuzz target `fs` found it. Linux's own VFS
//! never asks for more than XATTR_SIZE_MAX (64 KiB, also XATTR_LIST_MAX)
//! of a file system: a larger `size` comes only from a hostile guest
//! kernel, and is refused with EINVAL.

use fuse_backend_rs::abi::fuse_abi::{GetxattrIn, InHeader, Opcode};
use fuse_backend_rs::transport::Reader;

/// XATTR_SIZE_MAX and XATTR_LIST_MAX (linux/limits.h).
pub const MAX_XATTR_SIZE: u32 = 64 * 1024;

/// The errno to refuse `header`'s request with (its body in `body`, the
/// header already read), or None to serve it.
pub fn refusal(header: &InHeader, mut body: Reader<'_, ()>) -> Option<i32> {
    let sized =
        header.opcode == Opcode::Getxattr as u32 || header.opcode == Opcode::Listxattr as u32;
    if !sized {
        return None;
    }
    // Both bodies start with `struct fuse_getxattr_in`; a short one is left
    // to the server, which refuses it.
    let request = body.read_obj::<GetxattrIn>().ok()?;
    (request.size > MAX_XATTR_SIZE).then_some(libc::EINVAL)
}
