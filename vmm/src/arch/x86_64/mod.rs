//! x86_64: guest physical layout, PVH boot structures, GDT, registers, CPUID, MSRs, MP table.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod regs;
