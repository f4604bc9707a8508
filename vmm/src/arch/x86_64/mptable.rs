//! Intel MultiProcessor Specification 1.4 table, written from the spec. The guest kernel has
//! no ACPI, so this is how it finds the CPUs, the ISA bus and the IOAPIC (`X86_MPPARSE`).
//!
//! Layout at [`EBDA_START`] (the last KiB of base memory, one of the places the kernel scans):
//! the 16-byte floating pointer structure, immediately followed by the configuration table
//! (header, then processor, bus, IOAPIC, I/O interrupt and local interrupt entries).

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IOAPIC_PINS};
use crate::memory::GuestMemory;

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const SPEC_REV: u8 = 4;
const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const SMALL_ENTRY_SIZE: usize = 8;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6 signature and FPU + APIC feature flags, as the spec's processor entry wants.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
const ALL_LAPICS: u8 = 0xff;

/// Building or writing the MP table failed.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many CPUs for the space below 640 KiB.
    #[error("too many vCPUs for the MP table: {0}")]
    TooManyCpus(u8),
    /// The guest memory write failed.
    #[error("writing the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// 8-bit checksum byte that makes the sum of `bytes` plus it zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP table bytes for `vcpus` CPUs, to be placed at guest address `base`.
pub fn build_mptable(base: u64, vcpus: u8) -> Result<Vec<u8>, MptableError> {
    let ioapic_id = vcpus;
    let entries_len = usize::from(vcpus) * PROCESSOR_ENTRY_SIZE
        + SMALL_ENTRY_SIZE * (2 + usize::from(IOAPIC_PINS) + 2);
    let table_len = MPC_HEADER_SIZE + entries_len;
    if MPF_SIZE + table_len > 1024 || vcpus == 0 {
        return Err(MptableError::TooManyCpus(vcpus));
    }
    let table_addr = base + MPF_SIZE as u64;

    let mut entries = Vec::with_capacity(entries_len);
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // Flags 0: polarity and trigger conform to the bus (ISA: edge, active high).
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, pin, ioapic_id, pin]);
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0]);
    entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LAPICS, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0]);
    entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LAPICS, 1]);
    let entry_count = u16::from(vcpus) + 2 + u16::from(IOAPIC_PINS) + 2;

    let mut header = Vec::with_capacity(MPC_HEADER_SIZE);
    header.extend_from_slice(MPC_SIGNATURE);
    header.extend_from_slice(&u16::try_from(table_len).unwrap_or(0).to_le_bytes());
    header.push(SPEC_REV);
    header.push(0); // checksum, patched below
    header.extend_from_slice(b"FISSILE ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0); // reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&u32::try_from(table_addr).unwrap_or(0).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(SPEC_REV);
    mpf.push(0); // checksum, patched below
    mpf.extend_from_slice(&[0; 5]); // feature bytes: 0 = configuration table present
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    Ok(mpf)
}

/// Writes the MP table for `vcpus` CPUs at [`EBDA_START`].
pub fn setup_mptable(mem: &GuestMemory, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build_mptable(EBDA_START, vcpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn floating_pointer_and_table_checksums_are_zero() {
        let bytes = build_mptable(EBDA_START, 4).unwrap();

        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0);
        let table_len = usize::from(u16::from_le_bytes([bytes[20], bytes[21]]));
        assert_eq!(&bytes[16..20], b"PCMP");
        assert_eq!(table_len, bytes.len() - 16);
        assert_eq!(sum(&bytes[16..]), 0);
    }

    #[test]
    fn table_points_to_itself_and_lists_every_cpu() {
        let vcpus = 3;
        let bytes = build_mptable(EBDA_START, vcpus).unwrap();
        let table = &bytes[16..];

        let table_addr = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        assert_eq!(u64::from(table_addr), EBDA_START + 16);
        let entry_count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(entry_count, 3 + 1 + 1 + 24 + 2);
        let lapic = u32::from_le_bytes([table[36], table[37], table[38], table[39]]);
        assert_eq!(lapic, APIC_ADDR);
        for cpu in 0..usize::from(vcpus) {
            let e = &table[44 + cpu * 20..];
            assert_eq!(e[0], ENTRY_PROCESSOR);
            assert_eq!(usize::from(e[1]), cpu);
            let expected_flags = if cpu == 0 { 3 } else { 1 };
            assert_eq!(e[3], expected_flags);
        }
        let rest = &table[44 + 3 * 20..];
        assert_eq!(rest[0], ENTRY_BUS);
        assert_eq!(&rest[2..8], b"ISA   ");
        assert_eq!(&rest[8..12], &[ENTRY_IOAPIC, vcpus, IOAPIC_VERSION, 1]);
        assert_eq!(&rest[12..16], &IOAPIC_ADDR.to_le_bytes());
        let irq5 = &rest[16 + 5 * 8..16 + 6 * 8];
        assert_eq!(
            irq5,
            &[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, 5, vcpus, 5]
        );
        let lint = &rest[16 + 24 * 8..];
        assert_eq!(lint[1], INT_TYPE_EXTINT);
        assert_eq!(lint[8 + 1], INT_TYPE_NMI);
        assert_eq!(lint[8 + 7], 1);
    }

    #[test]
    fn thirty_two_cpus_fit_below_640k() {
        let bytes = build_mptable(EBDA_START, 32).unwrap();
        assert!(bytes.len() <= 1024);
        assert!(build_mptable(EBDA_START, 0).is_err());
    }
}
