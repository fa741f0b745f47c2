//! Register state of a vCPU at the kernel's 64-bit entry point: long mode
//! with paging on (identity map of the first GiB), flat segments, RSI
//! pointing at the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{segment_from_entry, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::ArchError;
use crate::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
/// Page-table entry bits: present, writable; page size (2 MiB) for PD entries.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_HUGE_PAGE: u64 = 0x80;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ArchError {
    move |source| ArchError::Kvm { what, source }
}

fn write<T: vm_memory::ByteValued>(
    memory: &GuestMemoryMmap,
    value: T,
    addr: u64,
    what: &'static str,
) -> Result<(), ArchError> {
    memory
        .write_obj(value, GuestAddress(addr))
        .map_err(|source| ArchError::GuestMemory { what, source })
}

/// Writes the boot GDT, an empty IDT and the identity page tables into guest
/// memory. Done once per VM; every vCPU's sregs point at them.
pub fn write_boot_tables(memory: &GuestMemoryMmap) -> Result<(), ArchError> {
    for (index, entry) in BOOT_GDT.iter().enumerate() {
        write(memory, *entry, GDT_START + index as u64 * 8, "the GDT")?;
    }
    write(memory, 0u64, IDT_START, "the IDT")?;
    write(memory, PDPTE_START | PTE_PRESENT_RW, PML4_START, "the PML4")?;
    write(memory, PDE_START | PTE_PRESENT_RW, PDPTE_START, "the PDPT")?;
    // 512 2-MiB pages: the first GiB, identity-mapped.
    for i in 0..512u64 {
        write(
            memory,
            (i << 21) | PDE_HUGE_PAGE | PTE_PRESENT_RW,
            PDE_START + i * 8,
            "the PD",
        )?;
    }
    Ok(())
}

/// Segment, control and descriptor-table registers for long mode.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("reading sregs"))?;
    let code = segment_from_entry(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
    let data = segment_from_entry(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
    let tss = segment_from_entry(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm_err("setting sregs"))
}

/// General registers: entry point, boot stack, zero page in RSI.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), ArchError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("setting registers"))
}

/// x87/SSE control words as after FNINIT.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("setting the FPU"))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Local APIC LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a BIOS leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), ArchError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("reading the LAPIC"))?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = u32::from_le_bytes(bytes);
        let value = (value & !0x700) | (mode << 8);
        for (dst, src) in lapic.regs[offset..offset + 4]
            .iter_mut()
            .zip(value.to_le_bytes())
        {
            *dst = src as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("setting the LAPIC"))
}
