//! Where things live in guest-physical memory (x86_64).

/// The GDT, then the IDT, in the first page.
pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the boot vCPU (grows down).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the first GiB: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area, where the MP table goes; RAM below it
/// is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of "high" memory: kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit hole below 4 GiB holds device MMIO (virtio-mmio windows, IOAPIC, LAPIC).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows: one 4 KiB page each from here.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio devices (the legacy ISA ones are below).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// virtio-mmio slots: one IRQ each, up to the IOAPIC's last pin (23).
pub const VIRTIO_MMIO_SLOTS: u64 = 24 - VIRTIO_FIRST_IRQ as u64;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map, in the
/// 32-bit hole, out of the way of devices.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Legacy I/O ports.
pub const SERIAL_COM1_PORT: u16 = 0x3f8;
pub const SERIAL_COM1_IRQ: u32 = 4;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// The guest-physical RAM ranges for `size` bytes of memory: below the MMIO
/// gap, and the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
