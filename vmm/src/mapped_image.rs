//! The guest kernel's ELF segments mapped into guest RAM instead of copied.
//!
//! [`MappedImage`] is the kernel file as a reader for the kernel loader: a
//! read of whole pages from a page-aligned file offset into page-aligned
//! guest RAM does not copy, it replaces those pages of the RAM mapping by a
//! private (copy-on-write) mapping of the file. The guest then runs its
//! kernel text from the host's page cache, shared by every VM booting the
//! same file, and only the pages it writes (data, pages next to bss) become
//! its own. The VMM neither copies ~15 MB nor zero-fills the huge pages
//! under them at every start. Other reads — headers, unaligned heads and
//! tails, targets outside guest RAM — are ordinary reads.
//!
//! The initramfs is copied, not mapped: the guest reads all of it once,
//! unpacks it and frees it, so a mapping only trades one bulk copy for a
//! copy-on-write fault per page (measured slower).
//!
//! The file must not be rewritten in place while VMs run from it: pages a
//! guest has not written would show the new bytes, and pages past a
//! truncation would fault the guest. Install new kernels by renaming them
//! into place, as `microvm install` and `guest-kernel-config/build.sh` do.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::{Error as VolatileMemoryError, VolatileSlice};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, ReadVolatile};

const PAGE: u64 = 4096;

/// An image file whose page-aligned reads into guest RAM become mappings.
pub struct MappedImage {
    file: File,
    len: u64,
    /// Host address ranges `[start, end)` of the guest's RAM mappings: the
    /// only memory this reader ever maps over.
    ram: Vec<(usize, usize)>,
    /// Bytes mapped rather than copied so far.
    mapped: u64,
}

impl MappedImage {
    /// `file`, to be read into `memory`.
    pub fn new(file: File, memory: &GuestMemoryMmap) -> io::Result<MappedImage> {
        let len = file.metadata()?.len();
        let ram = memory
            .iter()
            .map(|region| {
                let start = region.as_ptr() as usize;
                (start, start + region.len() as usize)
            })
            .collect();
        Ok(MappedImage {
            file,
            len,
            ram,
            mapped: 0,
        })
    }

    /// Bytes mapped rather than copied so far.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped
    }

    /// Whether `[addr, addr + len)` lies inside one guest RAM mapping.
    fn in_guest_ram(&self, addr: usize, len: usize) -> bool {
        self.ram
            .iter()
            .any(|&(start, end)| addr >= start && addr.saturating_add(len) <= end)
    }

    /// Maps the file's whole pages from `offset` over `[addr, addr + len)`,
    /// if it may: the number of bytes mapped (0: copy instead).
    fn map_pages(&mut self, addr: usize, len: usize, offset: u64) -> io::Result<usize> {
        let whole = len as u64 / PAGE * PAGE;
        let in_file = self.len.saturating_sub(offset) / PAGE * PAGE;
        let count = whole.min(in_file) as usize;
        if count == 0
            || !(addr as u64).is_multiple_of(PAGE)
            || !offset.is_multiple_of(PAGE)
            || !self.in_guest_ram(addr, count)
        {
            return Ok(0);
        }
        let offset_arg = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: `[addr, addr + count)` is page-aligned and lies inside one
        // of this VM's guest RAM mappings (checked above), private anonymous
        // memory the VMM owns and no Rust reference points into; MAP_FIXED
        // replaces exactly those pages by a private mapping of the file with
        // the same protection, so the range stays valid guest RAM.
        let mapped = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                count,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                self.file.as_raw_fd(),
                offset_arg,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.file.seek(SeekFrom::Current(count as i64))?;
        self.mapped += count as u64;
        Ok(count)
    }

    /// One step of [`MappedImage::read_volatile`]: the bytes it read or
    /// mapped (0 at the end of the file).
    fn read_step<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let addr = buf.ptr_guard_mut().as_ptr() as usize;
        let offset = self
            .file
            .stream_position()
            .map_err(VolatileMemoryError::IOError)?;
        // When file and guest agree on the offset within a page, the head up
        // to the next page boundary is copied so that the rest can be mapped.
        let to_boundary = ((PAGE - addr as u64 % PAGE) % PAGE) as usize;
        if to_boundary > 0 && addr as u64 % PAGE == offset % PAGE && buf.len() > to_boundary {
            return self.file.read_volatile(&mut buf.subslice(0, to_boundary)?);
        }
        let mapped = self
            .map_pages(addr, buf.len(), offset)
            .map_err(VolatileMemoryError::IOError)?;
        if mapped > 0 {
            buf.bitmap().mark_dirty(0, mapped);
            return Ok(mapped);
        }
        self.file.read_volatile(buf)
    }
}

impl Read for MappedImage {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for MappedImage {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

impl ReadVolatile for MappedImage {
    /// Fills `buf` as far as the file goes (guest memory's bulk reads make a
    /// single call per RAM region): copies up to a page boundary, maps the
    /// whole pages, copies the tail.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut done = 0;
        while done < buf.len() {
            let count = self.read_step(&mut buf.offset(done)?)?;
            if count == 0 {
                break;
            }
            done += count;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn image(bytes: &[u8]) -> (File, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "mapped-image-{}-{}",
            std::process::id(),
            bytes.len()
        ));
        std::fs::write(&path, bytes).unwrap();
        (File::open(&path).unwrap(), path)
    }

    #[test]
    fn aligned_pages_are_mapped_and_the_rest_copied() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let bytes: Vec<u8> = (0..3 * PAGE as usize + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        let (file, path) = image(&bytes);
        let mut reader = MappedImage::new(file, &memory).unwrap();
        // From file offset 50 to guest 0x2000 + 50: head copied, pages mapped.
        reader.seek(SeekFrom::Start(50)).unwrap();
        memory
            .read_exact_volatile_from(GuestAddress(0x2000 + 50), &mut reader, bytes.len() - 50)
            .unwrap();
        assert_eq!(reader.mapped_bytes(), 2 * PAGE);
        let mut back = vec![0u8; bytes.len() - 50];
        memory
            .read_slice(&mut back, GuestAddress(0x2000 + 50))
            .unwrap();
        assert_eq!(back, bytes[50..]);
        // Writes stay private to the guest.
        memory.write_obj(0xffu8, GuestAddress(0x3000)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn disagreeing_page_offsets_are_copied() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let bytes = vec![7u8; 4 * PAGE as usize];
        let (file, path) = image(&bytes);
        let mut reader = MappedImage::new(file, &memory).unwrap();
        memory
            .read_exact_volatile_from(GuestAddress(0x1000 + 8), &mut reader, bytes.len())
            .unwrap();
        assert_eq!(reader.mapped_bytes(), 0);
        let mut back = vec![0u8; bytes.len()];
        memory
            .read_slice(&mut back, GuestAddress(0x1000 + 8))
            .unwrap();
        assert_eq!(back, bytes);
        std::fs::remove_file(&path).unwrap();
    }
}
