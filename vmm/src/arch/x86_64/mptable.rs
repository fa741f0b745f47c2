//! The Intel MultiProcessor Specification (v1.4) table: how a guest without
//! ACPI learns its CPUs, its IOAPIC and how ISA interrupts are wired.
//!
//! Layout at the EBDA: the 16-byte floating pointer, then the configuration
//! table header and its entries: one processor entry per vCPU, the ISA bus,
//! the IOAPIC, 24 I/O interrupt entries (ISA IRQ n → IOAPIC pin n) and the two
//! local interrupt entries (ExtINT on LINT0, NMI on LINT1).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::ArchError;
use crate::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR};

/// The table must fit in the 1 KiB below 640 KiB.
pub const MAX_CPUS: u8 = 32;
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
/// Family 6 signature; FPU and APIC feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the table for `cpus` vCPUs as it must appear at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, ArchError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(ArchError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus + 1;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // type, interrupt type, flags (u16: conforming), source bus, source IRQ, dest IOAPIC, dest pin.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INTERRUPT_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    for (kind, lint) in [(INTERRUPT_EXTINT, 0u8), (INTERRUPT_NMI, 1u8)] {
        // Destination 0xff: every local APIC.
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }

    const FLOATING_POINTER_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_address = base + FLOATING_POINTER_LEN as u64;
    let table_len = HEADER_LEN + entries.len();

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"MICROVM ");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0u8; 4]); // extended table length, checksum, reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_POINTER_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_address as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4); // spec revision
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0u8; 5]); // feature bytes: configuration table present
    floating[10] = checksum(&floating);

    let mut out = floating;
    out.extend_from_slice(&table);
    if base + out.len() as u64 > 0xa0000 {
        return Err(ArchError::Build {
            what: "the MP table",
            reason: format!("{} bytes overflow the EBDA", out.len()),
        });
    }
    Ok(out)
}

/// Writes the MP table for `cpus` vCPUs at the EBDA.
pub fn write(memory: &GuestMemoryMmap, cpus: u8) -> Result<(), ArchError> {
    let table = build(cpus, EBDA_START)?;
    memory
        .write_slice(&table, GuestAddress(EBDA_START))
        .map_err(|source| ArchError::GuestMemory {
            what: "the MP table",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts_are_right() {
        for cpus in [1u8, 2, MAX_CPUS] {
            let bytes = build(cpus, EBDA_START).unwrap();
            assert_eq!(&bytes[0..4], b"_MP_");
            assert_eq!(sum(&bytes[0..16]), 0, "floating pointer checksum");
            let pointer = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
            assert_eq!(pointer, EBDA_START + 16);
            let table = &bytes[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
            assert_eq!(count as usize, cpus as usize + 1 + 1 + 24 + 2);
            // The first processor entry is the enabled boot CPU.
            assert_eq!(&table[44..48], &[0, 0, APIC_VERSION, 3]);
        }
    }

    #[test]
    fn rejects_zero_or_too_many_cpus() {
        assert!(build(0, EBDA_START).is_err());
        assert!(build(MAX_CPUS + 1, EBDA_START).is_err());
    }
}
