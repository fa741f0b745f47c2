//! One descriptor chain as a fixed array of iovecs over guest memory, for
//! `readv`/`writev` on the tap: no allocation per frame (unlike
//! `virtio_queue::{Reader, Writer}`, which build a `VecDeque` per chain).

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

/// At most this many iovecs per chain (a 256-entry queue's worth; Linux's
/// "big" RX buffers take 19 descriptors).
pub const MAX_IOVECS: usize = 256;

/// Which descriptors a chain must be made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device-readable only (TX).
    Read,
    /// Device-writable only (RX).
    Write,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IovError {
    #[error("a {found} descriptor in a chain that must be {wanted}")]
    WrongDirection {
        found: &'static str,
        wanted: &'static str,
    },
    #[error("more than {MAX_IOVECS} memory segments")]
    TooManySegments,
    #[error("more than 4 GiB in one chain")]
    TooLong,
    #[error("descriptor of {len} bytes at {addr:#x} is not in guest memory")]
    BadAddress { addr: u64, len: u32 },
}

fn direction_name(write: bool) -> &'static str {
    if write {
        "device-writable"
    } else {
        "device-readable"
    }
}

/// A chain's buffers as iovecs. The pointers are only valid while the guest
/// memory they were made from is alive (the device holds it, and uses them
/// right after [`IoVecBuffer::fill`]).
pub struct IoVecBuffer {
    /// The chain's segments, plus room for the overflow sink.
    iovecs: [libc::iovec; MAX_IOVECS + 1],
    count: usize,
    len: usize,
    writable: bool,
    /// Host memory after a writable chain: a read that reaches it did not
    /// fit (the tap cuts frames to the buffer and returns the cut length).
    sink: [u8; 1],
}

// SAFETY: the raw pointers are addresses in guest memory, valid from any
// thread; the buffer is only ever used by the thread owning the device.
unsafe impl Send for IoVecBuffer {}

impl Default for IoVecBuffer {
    fn default() -> Self {
        Self {
            iovecs: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOVECS + 1],
            count: 0,
            len: 0,
            writable: false,
            sink: [0],
        }
    }
}

impl IoVecBuffer {
    /// Replaces the contents with `chain`'s buffers, which must all go the
    /// `direction` way and lie in `memory`. Returns the total length. On
    /// error the buffer is empty and the chain should be dropped.
    pub fn fill<M>(
        &mut self,
        memory: &GuestMemoryMmap,
        chain: DescriptorChain<M>,
        direction: Direction,
    ) -> Result<usize, IovError>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        self.count = 0;
        self.len = 0;
        self.writable = direction == Direction::Write;
        let result = self.push_chain(memory, chain, direction);
        if result.is_err() {
            self.count = 0;
            self.len = 0;
        }
        result.map(|()| self.len)
    }

    fn push_chain<M>(
        &mut self,
        memory: &GuestMemoryMmap,
        chain: DescriptorChain<M>,
        direction: Direction,
    ) -> Result<(), IovError>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let want_write = direction == Direction::Write;
        for descriptor in chain {
            if descriptor.is_write_only() != want_write {
                return Err(IovError::WrongDirection {
                    found: direction_name(descriptor.is_write_only()),
                    wanted: direction_name(want_write),
                });
            }
            let len = descriptor.len();
            let bad_address = || IovError::BadAddress {
                addr: descriptor.addr().0,
                len,
            };
            let mut covered = 0usize;
            for slice in GuestMemoryBackend::get_slices(memory, descriptor.addr(), len as usize) {
                let slice = slice.map_err(|_| bad_address())?;
                let iovec = self.iovecs[..MAX_IOVECS]
                    .get_mut(self.count)
                    .ok_or(IovError::TooManySegments)?;
                *iovec = libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                };
                self.count += 1;
                covered += slice.len();
            }
            if covered != len as usize {
                return Err(bad_address());
            }
            self.len = self
                .len
                .checked_add(covered)
                .filter(|total| *total <= u32::MAX as usize)
                .ok_or(IovError::TooLong)?;
        }
        Ok(())
    }

    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs[..self.count]
    }

    /// The chain's segments followed by a 1-byte host sink: a read
    /// returning more than [`IoVecBuffer::len`] bytes did not fit.
    pub fn iovecs_with_sink(&mut self) -> &[libc::iovec] {
        self.iovecs[self.count] = libc::iovec {
            iov_base: self.sink.as_mut_ptr().cast(),
            iov_len: self.sink.len(),
        };
        &self.iovecs[..=self.count]
    }

    /// The total length of the buffers.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `bytes` at `offset` into the buffers (across segments).
    /// Returns false, writing nothing, when they do not reach that far or
    /// are not device-writable.
    pub fn write_at(&mut self, offset: usize, bytes: &[u8]) -> bool {
        if !self.writable || offset.saturating_add(bytes.len()) > self.len {
            return false;
        }
        let mut skip = offset;
        let mut bytes = bytes;
        for iovec in &self.iovecs[..self.count] {
            if bytes.is_empty() {
                break;
            }
            if skip >= iovec.iov_len {
                skip -= iovec.iov_len;
                continue;
            }
            let n = (iovec.iov_len - skip).min(bytes.len());
            for (i, byte) in bytes[..n].iter().enumerate() {
                // SAFETY: iov_base..iov_base+iov_len is guest memory valid
                // for writes (fill() built it from device-writable
                // descriptors of live guest memory), and skip + i < iov_len.
                // Volatile: the guest may touch it concurrently.
                unsafe {
                    std::ptr::write_volatile(iovec.iov_base.cast::<u8>().add(skip + i), *byte)
                };
            }
            bytes = &bytes[n..];
            skip = 0;
        }
        true
    }
}
