//! Global descriptor table for the PVH 32-bit protected-mode entry.

use kvm_bindings::kvm_segment;

/// Builds a GDT entry from its flags (access byte in bits 0..8, limit 19:16 in 8..12, and
/// AVL/L/DB/G in 12..16), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT: null, flat 32-bit code (0x08), flat data (0x10), TSS (0x18).
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xffff_ffff),
    gdt_entry(0xc093, 0, 0xffff_ffff),
    gdt_entry(0x008b, 0, 0xf_ffff),
];

fn entry_base(entry: u64) -> u64 {
    ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)
}

fn entry_limit(entry: u64) -> u32 {
    let raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    if (entry >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The KVM segment register value for GDT entry `index` of `table`.
pub fn kvm_segment_from_gdt(table: &[u64], index: u8) -> kvm_segment {
    let entry = table.get(usize::from(index)).copied().unwrap_or(0);
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    kvm_segment {
        base: entry_base(entry),
        limit: entry_limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment_decodes_to_a_4gib_32bit_segment() {
        let cs = kvm_segment_from_gdt(&BOOT_GDT, 1);

        assert_eq!(cs.selector, 0x08);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.type_, 0xb);
        assert_eq!((cs.present, cs.s, cs.db, cs.g, cs.l), (1, 1, 1, 1, 0));
    }

    #[test]
    fn tss_segment_is_a_busy_system_segment() {
        let tr = kvm_segment_from_gdt(&BOOT_GDT, 3);

        assert_eq!(tr.selector, 0x18);
        assert_eq!(tr.type_, 0xb);
        assert_eq!(tr.s, 0);
        assert_eq!(tr.limit, 0xf_ffff);
    }
}
