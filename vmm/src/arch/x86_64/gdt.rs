//! The boot GDT: flat 64-bit code and data segments and a TSS.

use kvm_bindings::kvm_segment;

/// Encodes a GDT entry from its flags (access byte in bits 0–7, flags nibble
/// in bits 12–15), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
        | ((limit & 0x000f_0000) << 32)
        | (((flags as u64) & 0x0000_f0ff) << 40)
}

/// Null, code (64-bit, execute/read), data (read/write), TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
pub const CODE_INDEX: u8 = 1;
pub const DATA_INDEX: u8 = 2;
pub const TSS_INDEX: u8 = 3;

/// The KVM segment register a GDT entry describes, selected by `index`.
pub fn segment_from_entry(entry: u64, index: u8) -> kvm_segment {
    let bit = |shift: u32| ((entry >> shift) & 1) as u8;
    let granularity = bit(55);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granularity == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index as u16) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: granularity,
        avl: bit(52),
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_flat_64_bit() {
        let cs = segment_from_entry(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
        assert_eq!(cs.selector, 0x08);
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.g), (1, 0, 1, 1, 1));
        assert_eq!(cs.type_, 0xb);
        let ds = segment_from_entry(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
        assert_eq!((ds.selector, ds.db, ds.l, ds.type_), (0x10, 1, 0, 0x3));
        let tss = segment_from_entry(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);
        assert_eq!((tss.selector, tss.s, tss.type_), (0x18, 0, 0xb));
        let null = segment_from_entry(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn entry_encoding_splits_base_and_limit() {
        let entry = gdt_entry(0xc093, 0x1234_5678, 0xabcde);
        let seg = segment_from_entry(entry, 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcd_efff);
    }
}
