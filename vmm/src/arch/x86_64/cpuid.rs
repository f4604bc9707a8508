//! Guest CPUID: KVM's supported set, with per-vCPU APIC ids, a consistent topology (one
//! package, one thread per core, `vcpus` cores), the hypervisor bit, the TSC-deadline timer
//! KVM emulates, no KVM async page faults, and the lab quirk.

use kvm_bindings::kvm_cpuid_entry2;

/// How to shape the CPUID of one vCPU.
#[derive(Debug, Clone, Copy)]
pub struct CpuidParams {
    /// This vCPU's index (and APIC id).
    pub vcpu_id: u8,
    /// Total number of vCPUs.
    pub vcpus: u8,
    /// Hide XSAVE/AVX from the guest (the lab's emulated SVM mishandles XSETBV).
    pub hide_xsave: bool,
    /// KVM's in-kernel LAPIC emulates the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`),
    /// which `KVM_GET_SUPPORTED_CPUID` does not report: offer it. Without it Linux calibrates
    /// the LAPIC timer against the PIT at boot, waiting 100 ms of ticks (a quarter of a
    /// second in the lab); QEMU and Firecracker offer it too.
    pub tsc_deadline_timer: bool,
}

const LEAF1_ECX_FMA: u32 = 1 << 12;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_F16C: u32 = 1 << 29;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF7_EBX_AVX2: u32 = 1 << 5;
/// KVM's paravirtual feature leaf.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// KVM_FEATURE_ASYNC_PF, _ASYNC_PF_VMEXIT and _ASYNC_PF_INT: async page faults are hidden.
/// With them a guest task that touches a page the host has not got yet (a lazily restored
/// image, served by snapshotd) is parked until KVM signals "page ready"; a snapshot taken
/// while one is parked carries a task that no KVM will ever wake once restored or merged
/// elsewhere (seen in the soak: the REPL's connection thread stuck in D after a merge).
/// Without them the faulting vCPU waits for the page, which snapshotd serves in microseconds.
pub const KVM_HIDDEN_ASYNC_PF: u32 = (1 << 4) | (1 << 10) | (1 << 14);
/// CPUID.1:ECX bits hidden by the lab quirk.
pub const LAB_HIDDEN_LEAF1_ECX: u32 =
    LEAF1_ECX_FMA | LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE | LEAF1_ECX_AVX | LEAF1_ECX_F16C;

/// Number of bits needed to hold `count` distinct ids.
fn id_bits(count: u8) -> u32 {
    let count = u32::from(count.max(1));
    u32::BITS - (count - 1).leading_zeros()
}

/// Rewrites `entries` (from `KVM_GET_SUPPORTED_CPUID`) for one vCPU.
pub fn filter_cpuid(entries: &mut [kvm_cpuid_entry2], params: CpuidParams) {
    let apic_id = u32::from(params.vcpu_id);
    let vcpus = u32::from(params.vcpus);
    for entry in entries.iter_mut() {
        match entry.function {
            1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((vcpus & 0xff) << 16);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if params.tsc_deadline_timer {
                    entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                if params.vcpus > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
                if params.hide_xsave {
                    entry.ecx &= !LAB_HIDDEN_LEAF1_ECX;
                }
            }
            4 if entry.eax & 0x1f != 0 => {
                // EAX[31:26]: cores per package - 1. EAX[25:14]: threads sharing this cache - 1.
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { vcpus - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((vcpus - 1) << 26);
            }
            7 if entry.index == 0 && params.hide_xsave => {
                entry.ebx &= !LEAF7_EBX_AVX2;
            }
            0xb => {
                // Extended topology: level 0 = SMT (1 thread), level 1 = core (`vcpus`).
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = id_bits(params.vcpus);
                        entry.ebx = vcpus;
                        entry.ecx = (2 << 8) | 1;
                    }
                    index => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = index & 0xff;
                    }
                }
            }
            KVM_CPUID_FEATURES => entry.eax &= !KVM_HIDDEN_ASYNC_PF,
            0x8000_001e => {
                // AMD extended APIC id, compute unit (core) id, node 0, one thread per core.
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff;
                entry.ecx = 0;
            }
            0x8000_0008 => {
                // ECX[7:0]: number of cores - 1; ECX[15:12]: APIC id size.
                entry.ecx =
                    (entry.ecx & !0xf0ff) | ((vcpus - 1) & 0xff) | (id_bits(params.vcpus) << 12);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vCPU `vcpu_id` of `vcpus`, no lab quirk, no TSC-deadline timer.
    fn params(vcpu_id: u8, vcpus: u8) -> CpuidParams {
        CpuidParams {
            vcpu_id,
            vcpus,
            hide_xsave: false,
            tsc_deadline_timer: false,
        }
    }

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_gets_apic_id_count_and_hypervisor_bit() {
        let mut entries = vec![entry(1, 0, 0, 0x0008_0800, 0, 0)];

        filter_cpuid(&mut entries, params(2, 4));

        assert_eq!(entries[0].ebx >> 24, 2);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 4);
        assert_eq!(entries[0].ebx & 0xffff, 0x0800);
        assert_ne!(entries[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(entries[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(
            entries[0].ecx & LEAF1_ECX_TSC_DEADLINE,
            0,
            "not offered unless KVM has it"
        );
    }

    #[test]
    fn the_tsc_deadline_timer_is_offered_when_kvm_emulates_it() {
        let mut entries = vec![entry(1, 0, 0, 0, 0, 0)];
        filter_cpuid(
            &mut entries,
            CpuidParams {
                hide_xsave: true,
                tsc_deadline_timer: true,
                ..params(0, 1)
            },
        );
        assert_ne!(entries[0].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn kvm_async_page_faults_are_hidden() {
        let mut e = vec![entry(KVM_CPUID_FEATURES, 0, 0x0100_7eff, 0, 0, 0)];
        filter_cpuid(&mut e, params(0, 1));
        assert_eq!(e[0].eax & KVM_HIDDEN_ASYNC_PF, 0);
        // Everything else KVM offers stays (clock source, PV EOI, ...).
        assert_eq!(e[0].eax, 0x0100_7eff & !KVM_HIDDEN_ASYNC_PF);
    }

    #[test]
    fn lab_quirk_hides_xsave_and_avx() {
        let mut entries = vec![
            entry(1, 0, 0, 0, u32::MAX, 0),
            entry(7, 0, 0, u32::MAX, 0, 0),
        ];

        filter_cpuid(
            &mut entries,
            CpuidParams {
                hide_xsave: true,
                ..params(0, 1)
            },
        );

        assert_eq!(entries[0].ecx & LAB_HIDDEN_LEAF1_ECX, 0);
        assert_eq!(entries[1].ebx & LEAF7_EBX_AVX2, 0);
        assert_ne!(entries[1].ebx & 1, 0, "other leaf 7 bits stay");
    }

    #[test]
    fn leaf_0xb_describes_cores_with_x2apic_id() {
        let mut entries = vec![entry(0xb, 0, 0, 0, 0, 0), entry(0xb, 1, 0, 0, 1, 0)];

        filter_cpuid(&mut entries, params(3, 5));

        assert_eq!(entries[0].ebx, 1);
        assert_eq!(entries[1].ebx, 5);
        assert_eq!(entries[1].eax, 3, "5 cores need 3 id bits");
        assert_eq!(entries[1].edx, 3);
    }
}
