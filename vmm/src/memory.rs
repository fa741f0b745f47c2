//! Guest RAM: anonymous host mappings, each aligned to 2 MiB and registered
//! with KVM as one memory slot.
//!
//! The alignment matters for speed. KVM maps a guest page with a 2 MiB
//! second-level (EPT/NPT) entry only when the host backs it with a huge page
//! and the guest-physical and host-virtual addresses agree modulo 2 MiB; with
//! `mmap`'s usual 4 KiB alignment every guest page the guest first touches is
//! a separate second-level fault and exit. Aligned, transparent huge pages
//! (`madvise(MADV_HUGEPAGE)`, honoured when THP is `always` or `madvise`)
//! turn 512 such exits into one and cut TLB misses, as QEMU does for its RAM.
//! Memory is still only allocated when first touched, in 2 MiB steps.

use std::io;
use std::ptr::null_mut;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// The alignment of every guest RAM mapping: an x86_64 huge page.
pub const HUGE_PAGE: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("mapping {size} bytes for guest RAM at {guest_base:#x}")]
    Map {
        guest_base: u64,
        size: usize,
        source: io::Error,
    },
    #[error("guest RAM at {guest_base:#x}: {reason}")]
    Region { guest_base: u64, reason: String },
    #[error("KVM refused guest RAM slot {slot} at {guest_base:#x}")]
    Slot {
        slot: u32,
        guest_base: u64,
        source: kvm_ioctls::Error,
    },
}

/// Maps `ranges` (guest-physical start, length) as guest RAM and registers
/// each with `vm` as a memory slot, in order.
///
/// The mappings live as long as the process: the VMM runs one VM and ends
/// with it, and KVM keeps using a slot's memory until the VM is gone, so they
/// are never unmapped (vm-memory's regions do not own them).
pub fn create_guest_memory(
    vm: &VmFd,
    ranges: &[(u64, u64)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::with_capacity(ranges.len());
    for (slot, &(guest_base, len)) in ranges.iter().enumerate() {
        let size = usize::try_from(len).map_err(|_| MemoryError::Region {
            guest_base,
            reason: format!("{len} bytes do not fit this host's address space"),
        })?;
        let host = map_aligned(size).map_err(|source| MemoryError::Map {
            guest_base,
            size,
            source,
        })?;
        let region = region_at(host, guest_base, size)?;
        let slot = slot as u32;
        let region_info = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest_base,
            memory_size: len,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: `host` is a mapping of `len` bytes that is never unmapped
        // (see above), so it outlives the VM that uses it.
        unsafe { vm.set_user_memory_region(region_info) }.map_err(|source| MemoryError::Slot {
            slot,
            guest_base,
            source,
        })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Region {
        guest_base: ranges.first().map_or(0, |r| r.0),
        reason: e.to_string(),
    })
}

/// A vm-memory region over the host mapping `host` of `size` bytes.
fn region_at(host: *mut u8, guest_base: u64, size: usize) -> Result<GuestRegionMmap, MemoryError> {
    let bad = |reason: String| MemoryError::Region { guest_base, reason };
    // SAFETY: `host` starts a private anonymous read-write mapping of `size`
    // bytes made by `map_aligned` and never unmapped.
    let mapping = unsafe { MmapRegionBuilder::new(size).with_raw_mmap_pointer(host) }
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    GuestRegionMmap::new(mapping, GuestAddress(guest_base))
        .ok_or_else(|| bad("the region would end past the top of the address space".into()))
}

/// A private anonymous read-write mapping of `size` bytes whose start is
/// aligned to [`HUGE_PAGE`], advised to be backed by transparent huge pages.
fn map_aligned(size: usize) -> io::Result<*mut u8> {
    let reserve = size
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks; it
    // overlaps nothing of ours.
    let base = unsafe {
        libc::mmap(
            null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let head = start - base;
    let tail = reserve - head - size;
    // SAFETY: both ranges lie inside the mapping made above, outside
    // [start, start + size), and nothing refers to them.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
    }
    // Only advice: without THP the mapping works the same with small pages.
    // SAFETY: madvise on our own mapping changes no memory contents.
    if unsafe { libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE) } != 0 {
        tracing::debug!(
            "guest RAM: no transparent huge pages: {}",
            io::Error::last_os_error()
        );
    }
    Ok(start as *mut u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_are_huge_page_aligned_and_usable() {
        for size in [HUGE_PAGE, 3 * HUGE_PAGE + 4096, 64 << 20] {
            let host = map_aligned(size).unwrap();
            assert_eq!(host as usize % HUGE_PAGE, 0, "size {size}");
            // SAFETY: the mapping is ours, `size` bytes long and writable.
            unsafe {
                host.write(1);
                host.add(size - 1).write(2);
                assert_eq!((host.read(), host.add(size - 1).read()), (1, 2));
            }
        }
    }

    #[test]
    fn regions_follow_the_ranges() {
        let host = map_aligned(4 * HUGE_PAGE).unwrap();
        let region = region_at(host, 0x1_0000_0000, 4 * HUGE_PAGE).unwrap();
        use vm_memory::GuestMemoryRegion;
        assert_eq!(region.start_addr(), GuestAddress(0x1_0000_0000));
        assert_eq!(region.len(), 4 * HUGE_PAGE as u64);
    }
}
