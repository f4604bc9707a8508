//! Initial register state for the PVH entry: 32-bit protected mode, paging off.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::gdt::{BOOT_GDT, kvm_segment_from_gdt};
use super::layout::{BOOT_GDT_START, BOOT_IDT_START, PVH_INFO_START};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;

/// General registers: RIP at the PVH entry point, RBX pointing to `hvm_start_info`.
pub fn pvh_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: PVH_INFO_START,
        ..Default::default()
    }
}

/// Segment/control registers: flat CS/DS/ES/FS/GS/SS from the boot GDT, CR0 = PE|ET.
pub fn pvh_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment_from_gdt(&BOOT_GDT, 1);
    let data = kvm_segment_from_gdt(&BOOT_GDT, 2);
    let tss = kvm_segment_from_gdt(&BOOT_GDT, 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&BOOT_GDT) - 1).unwrap_or(u16::MAX);
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// FPU state: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// APIC register offset of LVT LINT0.
pub const APIC_LVT0: usize = 0x350;
/// APIC register offset of LVT LINT1.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// LVT delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;

/// Reads a 32-bit LAPIC register from the KVM LAPIC state blob.
pub fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = regs.get(offset + i).map_or(0, |&c| c as u8);
    }
    u32::from_le_bytes(bytes)
}

/// Writes a 32-bit LAPIC register into the KVM LAPIC state blob.
pub fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        if let Some(slot) = regs.get_mut(offset + i) {
            *slot = b as std::os::raw::c_char;
        }
    }
}

/// Sets the delivery mode (bits 8..11) of an LVT register value.
pub fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_entry_state_is_flat_protected_mode() {
        let sregs = pvh_sregs(kvm_sregs::default());
        let regs = pvh_regs(0x100_0000);

        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!(sregs.cs.selector, 0x8);
        assert_eq!(sregs.ss.selector, 0x10);
        assert_eq!(sregs.gdt.limit, 31);
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rbx, PVH_INFO_START);
        assert_eq!(regs.rflags, 2);
    }

    #[test]
    fn lapic_lint_delivery_modes_round_trip() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT0, 0x0001_0000);

        let lint0 = set_delivery_mode(lapic_reg(&regs, APIC_LVT0), APIC_MODE_EXTINT);
        set_lapic_reg(&mut regs, APIC_LVT0, lint0);

        assert_eq!(lapic_reg(&regs, APIC_LVT0), 0x0001_0700);
    }
}
