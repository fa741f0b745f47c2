//! Loading what the guest boots: the kernel (an ELF `vmlinux`, entered at its
//! 64-bit entry point), the initramfs, the command line and the zero page
//! (`struct boot_params`) with the e820 memory map.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START,
};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load kernel {path}: {reason} (expected an uncompressed ELF vmlinux)")]
    LoadKernel { path: PathBuf, reason: String },
    #[error("cannot read initramfs {path}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    #[error("writing {what} to guest memory")]
    GuestMemory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// `boot_params` as plain bytes for guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is a repr(C, packed) struct of integers and integer
// arrays generated from the kernel's headers: any byte pattern is valid.
unsafe impl ByteValued for ZeroPage {}

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Where the kernel was loaded and where to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
    /// First byte past the kernel image.
    pub end: u64,
}

pub fn load_kernel(memory: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let open_err = |source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    };
    // The segments are copied into guest RAM, whose huge pages they fill
    // before the guest starts. Mapping the file's pages copy-on-write
    // instead (tried) saves the VMM the copy but costs the guest far more:
    // a second-level fault per 4 KiB page it runs, and a copy-on-write
    // fault per page it writes — alternatives patching, and the init and
    // alignment gaps (~4 MiB) the kernel poisons as it frees them. Under
    // nested virtualisation that took the guest 1.9-2.9 s to reach its
    // agent instead of 0.8-1.0 s.
    let mut file = File::open(path).map_err(open_err)?;
    let result =
        Elf::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            BootError::LoadKernel {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
    Ok(LoadedKernel {
        entry: result.kernel_load,
        end: result.kernel_end,
    })
}

/// Places the initramfs as high as possible in low memory (page-aligned),
/// above the kernel. Returns its address and size.
pub fn load_initrd(
    memory: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let low_end = memory
        .iter()
        .find(|region| region.start_addr().raw_value() == 0)
        .map(|region| region.len())
        .unwrap_or(0)
        .min(MMIO_GAP_START);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        limit: low_end,
    };
    let address = low_end.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if address < kernel_end {
        return Err(too_large());
    }
    memory
        .read_exact_volatile_from(GuestAddress(address), &mut file, size as usize)
        .map_err(|source| BootError::GuestMemory {
            what: "the initramfs",
            source,
        })?;
    Ok((GuestAddress(address), size))
}

/// Writes the command line and the zero page.
pub fn write_boot_params(
    memory: &GuestMemoryMmap,
    cmdline: &str,
    initrd: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    let mut line = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    line.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(format!("{e}: {cmdline:?}")))?;
    load_cmdline(memory, GuestAddress(CMDLINE_START), &line)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    if let Some((address, size)) = initrd {
        params.hdr.ramdisk_image = address.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    // RAM: below the EBDA, then from 1 MiB on in every region.
    let mut e820 = vec![(0u64, EBDA_START)];
    for region in memory.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        let start = start.max(HIMEM_START);
        if end > start {
            e820.push((start, end - start));
        }
    }
    for (index, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[index] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = e820.len() as u8;

    memory
        .write_obj(ZeroPage(params), GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootError::GuestMemory {
            what: "the zero page",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let mem = memory(64 << 20);
        write_boot_params(
            &mem,
            "console=ttyS0 quiet",
            Some((GuestAddress(0x300_0000), 4096)),
        )
        .unwrap();
        let page: ZeroPage = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let params = page.0;
        let (boot_flag, header, ptr, size) = (
            params.hdr.boot_flag,
            params.hdr.header,
            params.hdr.cmd_line_ptr,
            params.hdr.ramdisk_size,
        );
        assert_eq!(
            (boot_flag, header, ptr, size),
            (0xaa55, KERNEL_HDR_MAGIC, CMDLINE_START as u32, 4096)
        );
        assert_eq!(params.e820_entries, 2);
        let second = params.e820_table[1];
        let (addr, len) = (second.addr, second.size);
        assert_eq!((addr, len), (HIMEM_START, (64 << 20) - HIMEM_START));
        let mut text = [0u8; 20];
        mem.read_slice(&mut text, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&text[..19], b"console=ttyS0 quiet");
        assert_eq!(text[19], 0);
    }

    #[test]
    fn kernel_errors_name_the_path() {
        let mem = memory(16 << 20);
        let missing = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        // The cause is the error's source only: its chain shows it once.
        assert_eq!(
            missing.to_string(),
            "cannot open kernel /nonexistent/vmlinux"
        );
        assert_eq!(
            protocols::error_chain(&crate::vm::VmError::from(missing)),
            "cannot open kernel /nonexistent/vmlinux: No such file or directory (os error 2)"
        );
        let not_elf = std::env::temp_dir().join(format!("not-elf-{}", std::process::id()));
        std::fs::write(&not_elf, b"this is no kernel").unwrap();
        let corrupt = load_kernel(&mem, &not_elf).unwrap_err().to_string();
        std::fs::remove_file(&not_elf).unwrap();
        assert!(corrupt.contains("ELF vmlinux"), "{corrupt}");
    }

    #[test]
    fn initrd_goes_high_and_must_fit() {
        let mem = memory(16 << 20);
        let file = std::env::temp_dir().join(format!("initrd-{}", std::process::id()));
        std::fs::write(&file, vec![7u8; 10_000]).unwrap();
        let (addr, size) = load_initrd(&mem, &file, 2 << 20).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr.raw_value() % 4096, 0);
        assert!(addr.raw_value() + size <= 16 << 20);
        assert!(load_initrd(&mem, &file, 16 << 20).is_err());
        std::fs::remove_file(&file).unwrap();
    }
}
