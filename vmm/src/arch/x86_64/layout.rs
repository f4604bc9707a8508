//! Guest physical address layout.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)            0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH hvm_start_info         0x0000_7000  PVH memory map
//! 0x0002_0000  kernel command line        0x0009_fc00  MP table (last KiB of base memory)
//! 0x0010_0000  high memory (kernel loaded at its ELF physical addresses, usually 16 MiB)
//! RAM: [0, min(size, 3 GiB)) and, if larger, [4 GiB, 4 GiB + rest)
//! 0xc000_0000 .. 0x1_0000_0000  MMIO gap: virtio-mmio at 0xd000_0000, IOAPIC, LAPIC
//! ```

/// GDT address.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT address.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` address.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map table address.
pub const MEMMAP_START: u64 = 0x7000;
/// Kernel command line address.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest kernel command line we write (the x86 kernel's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// First address of high memory (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap (4 GiB): RAM continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device; device `i` uses `VIRTIO_IRQ_BASE + i`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC MMIO address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC MMIO address.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// TSS area KVM needs on Intel (three pages just below the identity map page).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Identity map page KVM needs on Intel.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Number of IOAPIC pins (GSIs 0..24).
pub const IOAPIC_PINS: u8 = 24;
/// Serial port COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Serial IRQ.
pub const SERIAL_IRQ: u32 = 4;

/// Guest RAM regions for `size` bytes of memory: `(guest address, length, offset in backing)`.
pub fn ram_regions(size: u64) -> Vec<(u64, u64, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut regions = vec![(0, low, 0)];
    if size > low {
        regions.push((MMIO_GAP_END, size - low, low));
    }
    regions
}

/// E820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// The guest's memory map: `(address, length, e820 type)`.
pub fn e820_map(size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len, _) in ram_regions(size) {
        let (start, len) = if start == 0 {
            (HIMEM_START, len.saturating_sub(HIMEM_START))
        } else {
            (start, len)
        };
        if len > 0 {
            map.push((start, len, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn small_memory_is_one_region_below_the_gap() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20, 0)]);
    }

    #[test]
    fn large_memory_splits_around_the_mmio_gap() {
        let regions = ram_regions(5 * GIB);
        assert_eq!(regions, vec![(0, 3 * GIB, 0), (4 * GIB, 2 * GIB, 3 * GIB)]);
    }

    #[test]
    fn e820_reserves_ebda_and_bios_area() {
        let map = e820_map(256 << 20);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM));
        let total_ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(total_ram, (256 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn virtio_windows_are_inside_the_mmio_gap() {
        let (lo, hi) = (MMIO_GAP_START, MMIO_GAP_END);
        assert!(VIRTIO_MMIO_BASE >= lo && VIRTIO_MMIO_BASE + 16 * VIRTIO_MMIO_SIZE < hi);
        assert!(u64::from(IOAPIC_ADDR) > VIRTIO_MMIO_BASE + 16 * VIRTIO_MMIO_SIZE);
        assert!(KVM_IDENTITY_MAP_ADDRESS > lo && KVM_TSS_ADDRESS + 3 * 4096 <= hi);
    }
}
