//! Saving and restoring the KVM side of a VM: every vCPU's registers and the VM-wide
//! irqchip, PIT and clock. The structs are plain serde data (kvm-bindings' own serde for the
//! KVM structs); restoring treats them as untrusted and lets KVM validate what it owns.
//!
//! Order on restore follows what KVM needs (and Firecracker does): CPUID first, then
//! mp_state, regs, sregs, XSAVE/FPU, XCRs, debug registers, LAPIC, MSRs (the TSC deadline MSR
//! needs the LAPIC, and goes after the TSC), then pending events last.
//!
//! The vCPUs' TSC rate is saved beside them ([`tsc_khz`]) and set first on restore where the
//! host's differs ([`apply_tsc_khz`]): a guest on the TSC-deadline timer programs its timers
//! in TSC cycles at the rate it measured at boot, so on a host whose TSC runs at another
//! rate they would fire early or late by that ratio. A state without a rate (format 2)
//! leaves the vCPUs at the rate they have.

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Most CPUID entries / MSRs accepted from a state blob.
pub const MAX_CPUID_ENTRIES: usize = 256;
/// Most MSRs accepted from a state blob.
pub const MAX_MSRS: usize = 1024;
/// KVM's async page fault MSR (`MSR_KVM_ASYNC_PF_EN`): turned off when a state is applied to
/// a fresh vCPU, never written on a vCPU that ran (see [`VcpuState::msrs_to_apply`]).
const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
/// `MSR_IA32_TSC_DEADLINE`: the LAPIC timer's deadline in TSC-deadline mode.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The Hyper-V synthetic MSR range.
const HYPERV_MSRS: std::ops::RangeInclusive<u32> = 0x4000_0000..=0x4000_00ff;
/// kvmclock's wall-clock MSRs (old and new). Writing one makes KVM write the wall-clock
/// structure into guest memory at once, so restoring it would change a paused VM's memory
/// (a merged parent would differ from its winner); the guest writes it again whenever it
/// reads the wall clock (boot, resume), so it need not be saved.
const KVM_WALL_CLOCK_MSRS: [u32; 2] = [0x11, 0x4b56_4d00];

/// Saving or restoring KVM state failed; each variant names the ioctl.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    /// A vCPU ioctl failed.
    #[error("vCPU {vcpu}: {what}")]
    Vcpu {
        /// vCPU index.
        vcpu: usize,
        /// The KVM call.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A VM ioctl failed.
    #[error("VM: {0}")]
    Vm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM set fewer MSRs than given.
    #[error("vCPU {vcpu}: KVM accepted {set} of {total} MSRs (first refused: {first_refused:#x})")]
    PartialMsrs {
        /// vCPU index.
        vcpu: usize,
        /// MSRs set.
        set: usize,
        /// MSRs given.
        total: usize,
        /// The MSR KVM stopped at.
        first_refused: u32,
    },
    /// The state is malformed (too many entries, ...).
    #[error("vCPU {vcpu}: invalid state: {why}")]
    Invalid {
        /// vCPU index.
        vcpu: usize,
        /// What is wrong.
        why: String,
    },
    /// The snapshot's TSC rate differs from the vCPU's and KVM could not set it (a slower
    /// rate on a host without TSC scaling).
    #[error(
        "vCPU {vcpu}: the snapshot's TSC runs at {saved} kHz, this vCPU's at {}, and KVM \
         could not scale it (KVM_SET_TSC_KHZ; a slower rate needs TSC scaling): restore it \
         on a host of the same TSC rate",
        current.map_or("an unknown rate".to_string(), |h| format!("{h} kHz"))
    )]
    TscRate {
        /// vCPU index.
        vcpu: usize,
        /// The snapshot's rate.
        saved: u32,
        /// The vCPU's rate before, if KVM says (the host's, unless set before).
        current: Option<u32>,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// This host's XSAVE area is larger than the 4 KiB `kvm_xsave` (AMX).
    #[error("XSAVE state of {0} bytes (AMX) is not supported")]
    XsaveTooLarge(i32),
    /// This host's KVM cannot save FPU state with XSAVE.
    #[error("this host's KVM has no KVM_CAP_XSAVE: snapshots are not supported")]
    NoXsave,
}

/// Words in the legacy 4 KiB `kvm_xsave` region.
pub const XSAVE_WORDS: usize = 1024;

/// Everything KVM holds for one vCPU. (Equality of two states is equality of their
/// encodings: some KVM structs have no `PartialEq`.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as set at boot.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs (index, value).
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// The 4 KiB XSAVE area (x87, SSE, AVX state), [`XSAVE_WORDS`] words.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0), when KVM supports them.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Runnable / halted / waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
}

/// How far a host's TSC rate may be from a snapshot's before the vCPUs are scaled to it:
/// 250 parts per million (Firecracker's tolerance; NTP corrects that much).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// The TSC rate of vCPU `fd` in kHz, `None` where KVM cannot say (no
/// `KVM_CAP_GET_TSC_KHZ`).
pub fn tsc_khz(fd: &VcpuFd) -> Option<u32> {
    fd.get_tsc_khz().ok().filter(|&k| k > 0)
}

/// Whether a TSC running at `host` kHz is within [`TSC_KHZ_TOLERANCE_PPM`] of `saved`.
fn tsc_close_enough(host: u32, saved: u32) -> bool {
    u64::from(host.abs_diff(saved)) * 1_000_000 <= u64::from(saved) * TSC_KHZ_TOLERANCE_PPM
}

/// Sets vCPU `vcpu`'s TSC rate to a snapshot's `saved` kHz, unless it runs close enough to
/// it already (a restore on the host that took the snapshot, or one of the same rate).
/// Call before the vCPU's MSRs are written: the TSC is written at the new rate. `scaling`:
/// the host can scale the TSC ([`KvmCaps::tsc_control`]); without it KVM takes a faster
/// rate by catching the TSC up at each VM entry and refuses a slower one.
pub fn apply_tsc_khz(
    fd: &VcpuFd,
    vcpu: usize,
    saved: u32,
    scaling: bool,
) -> Result<(), KvmStateError> {
    let current = tsc_khz(fd);
    if current.is_some_and(|c| tsc_close_enough(c, saved)) {
        return Ok(());
    }
    fd.set_tsc_khz(saved)
        .map_err(|source| KvmStateError::TscRate {
            vcpu,
            saved,
            current,
            source,
        })?;
    if vcpu == 0 {
        let how = if scaling {
            "scaled by the CPU"
        } else {
            "caught up by KVM at each VM entry (this host cannot scale the TSC)"
        };
        tracing::warn!(saved_khz = saved, current_khz = ?current,
            "TSC set to the snapshot's rate: {how}");
    }
    Ok(())
}

/// The VM-wide KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// What KVM can save on this host, probed once per VMM.
#[derive(Debug, Clone)]
pub struct KvmCaps {
    /// KVM_GET/SET_XSAVE.
    pub xsave: bool,
    /// KVM_GET/SET_XCRS.
    pub xcrs: bool,
    /// Candidate MSRs to save (KVM's index list).
    pub msr_indices: Vec<u32>,
    /// KVM_CAP_TSC_CONTROL: the CPU scales a vCPU's TSC to another rate. Without it KVM
    /// still takes a faster rate (it catches the TSC up at each VM entry) but refuses a
    /// slower one.
    pub tsc_control: bool,
}

impl KvmCaps {
    /// Probes `kvm`.
    pub fn probe(kvm: &Kvm) -> Result<KvmCaps, KvmStateError> {
        let xsave2 = kvm.check_extension_int(Cap::Xsave2);
        if xsave2 > 4096 {
            return Err(KvmStateError::XsaveTooLarge(xsave2));
        }
        // Hyper-V MSRs are left out: our guests get no Hyper-V CPUID leaves, so they never
        // use them, and some (reference time, VP runtime) are clocks KVM computes. So are
        // the kvmclock wall-clock MSRs (see KVM_WALL_CLOCK_MSRS).
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(|e| KvmStateError::Vm("KVM_GET_MSR_INDEX_LIST", e))?
            .as_slice()
            .iter()
            .copied()
            .filter(|i| !HYPERV_MSRS.contains(i) && !KVM_WALL_CLOCK_MSRS.contains(i))
            .collect();
        Ok(KvmCaps {
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            msr_indices,
            tsc_control: kvm.check_extension(Cap::TscControl),
        })
    }
}

fn vcpu_err(vcpu: usize, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |source| KvmStateError::Vcpu { vcpu, what, source }
}

/// Reads every MSR of `indices` that KVM lets us read: KVM_GET_MSRS stops at the first
/// unreadable one, which is then dropped and the rest retried.
fn read_msrs(
    fd: &VcpuFd,
    vcpu: usize,
    indices: &[u32],
) -> Result<Vec<kvm_msr_entry>, KvmStateError> {
    let mut wanted: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut out = Vec::with_capacity(wanted.len());
    while !wanted.is_empty() {
        let mut msrs = Msrs::from_entries(&wanted).map_err(|e| KvmStateError::Invalid {
            vcpu,
            why: format!("MSR list: {e:?}"),
        })?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(vcpu_err(vcpu, "KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Skip the one KVM refused (if any) and go on after it.
        wanted.drain(..(n + 1).min(wanted.len()));
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (paused).
    pub fn capture(fd: &VcpuFd, vcpu: usize, caps: &KvmCaps) -> Result<VcpuState, KvmStateError> {
        // mp_state first: it can flush pending events into the state read below.
        let mp_state = fd
            .get_mp_state()
            .map_err(vcpu_err(vcpu, "KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(vcpu_err(vcpu, "KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(vcpu_err(vcpu, "KVM_GET_SREGS"))?;
        if !caps.xsave {
            return Err(KvmStateError::NoXsave);
        }
        let xsave = fd
            .get_xsave()
            .map_err(vcpu_err(vcpu, "KVM_GET_XSAVE"))?
            .region
            .to_vec();
        let xcrs = if caps.xcrs {
            Some(fd.get_xcrs().map_err(vcpu_err(vcpu, "KVM_GET_XCRS"))?)
        } else {
            None
        };
        let debugregs = fd
            .get_debug_regs()
            .map_err(vcpu_err(vcpu, "KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(vcpu_err(vcpu, "KVM_GET_LAPIC"))?;
        let msrs = read_msrs(fd, vcpu, &caps.msr_indices)?;
        let events = fd
            .get_vcpu_events()
            .map_err(vcpu_err(vcpu, "KVM_GET_VCPU_EVENTS"))?;
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(vcpu_err(vcpu, "KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        Ok(VcpuState {
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            mp_state,
            events,
        })
    }

    /// Checks sizes before anything reaches KVM.
    pub fn validate(&self, vcpu: usize) -> Result<(), KvmStateError> {
        let invalid = |why: String| KvmStateError::Invalid { vcpu, why };
        if self.cpuid.is_empty() || self.cpuid.len() > MAX_CPUID_ENTRIES {
            return Err(invalid(format!("{} CPUID entries", self.cpuid.len())));
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(invalid(format!("{} MSRs", self.msrs.len())));
        }
        if self.xsave.len() != XSAVE_WORDS {
            return Err(invalid(format!("XSAVE area of {} words", self.xsave.len())));
        }
        Ok(())
    }

    /// The MSRs [`VcpuState::apply`] writes. A fresh vCPU gets `MSR_KVM_ASYNC_PF_EN` off:
    /// a snapshot from before async page faults were hidden from guests (see
    /// `arch::x86_64::cpuid::KVM_HIDDEN_ASYNC_PF`) may have them on. A vCPU that ran does not
    /// get it at all: writing it, even 0 over 0, makes KVM cancel the vCPU's outstanding
    /// async faults and drop their completions, and one of them may be what ends an
    /// *artificial halt* KVM put the vCPU in (a fault on a page the host has not got yet,
    /// taken with interrupts enabled; PV or not, KVM halts the vCPU until the page is in or
    /// an interrupt comes). That halt is not part of any state userspace can read or write,
    /// so it outlives the state applied over it; when that state has interrupts disabled no
    /// interrupt can end the halt either, and with its completion dropped nothing ever does.
    /// Seen in the soak: about one merge in 150-300 left the parent's vCPU blocked in
    /// `kvm_vcpu_block`, runnable, IF clear (the winner was snapshotted inside the
    /// scheduler), its LAPIC holding the timer and the vsock interrupt in IRR.
    ///
    /// The TSC-deadline MSR goes last, after `MSR_IA32_TSC`: KVM arms the deadline timer
    /// against the TSC when the MSR is written, and a TSC written after it would not re-arm
    /// it. (KVM's index list happens to put it after the TSC; nothing here relies on that.)
    pub fn msrs_to_apply(&self, fresh: bool) -> Vec<kvm_msr_entry> {
        let mut entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .filter(|e| fresh || e.index != MSR_KVM_ASYNC_PF_EN)
            .map(|e| match e.index {
                MSR_KVM_ASYNC_PF_EN => kvm_msr_entry { data: 0, ..*e },
                _ => *e,
            })
            .collect();
        // A stable sort: only the deadline MSR moves.
        entries.sort_by_key(|e| e.index == MSR_IA32_TSC_DEADLINE);
        entries
    }

    /// Writes the state into a vCPU that is not running. `fresh`: the vCPU has never run,
    /// so its CPUID is set too. KVM refuses a CPUID change once a vCPU ran (and reports
    /// runtime-derived bits such as OSXSAVE in what it returns), so a vCPU that ran keeps
    /// its CPUID: merge applies a winner restored from this VM's own snapshot, whose CPUID is
    /// the same by construction.
    pub fn apply(&self, fd: &VcpuFd, vcpu: usize, fresh: bool) -> Result<(), KvmStateError> {
        self.validate(vcpu)?;
        if fresh {
            let cpuid = CpuId::from_entries(&self.cpuid).map_err(|e| KvmStateError::Invalid {
                vcpu,
                why: format!("CPUID: {e:?}"),
            })?;
            fd.set_cpuid2(&cpuid)
                .map_err(vcpu_err(vcpu, "KVM_SET_CPUID2"))?;
        }
        fd.set_mp_state(self.mp_state)
            .map_err(vcpu_err(vcpu, "KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs)
            .map_err(vcpu_err(vcpu, "KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs)
            .map_err(vcpu_err(vcpu, "KVM_SET_SREGS"))?;
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(&self.xsave);
        // SAFETY: `xsave` is a whole 4 KiB kvm_xsave, and hosts whose XSAVE area is larger
        // (AMX: KVM_CAP_XSAVE2 > 4096) are refused by KvmCaps::probe, so KVM reads nothing
        // past the struct. This holds as long as the process never asks for AMX guest
        // permission (arch_prctl ARCH_REQ_XCOMP_GUEST_PERM), which would let KVM_CAP_XSAVE2
        // grow after the probe: we never do.
        unsafe { fd.set_xsave(&xsave) }.map_err(vcpu_err(vcpu, "KVM_SET_XSAVE"))?;
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(vcpu_err(vcpu, "KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&self.debugregs)
            .map_err(vcpu_err(vcpu, "KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic)
            .map_err(vcpu_err(vcpu, "KVM_SET_LAPIC"))?;
        let entries = self.msrs_to_apply(fresh);
        let msrs = Msrs::from_entries(&entries).map_err(|e| KvmStateError::Invalid {
            vcpu,
            why: format!("MSRs: {e:?}"),
        })?;
        let set = fd.set_msrs(&msrs).map_err(vcpu_err(vcpu, "KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(KvmStateError::PartialMsrs {
                vcpu,
                set,
                total: entries.len(),
                first_refused: entries[set].index,
            });
        }
        fd.set_vcpu_events(&self.events)
            .map_err(vcpu_err(vcpu, "KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

impl VmState {
    /// Reads the VM-wide state (all vCPUs paused).
    pub fn capture(vm: &VmFd) -> Result<VmState, KvmStateError> {
        let mut irqchips = Vec::with_capacity(3);
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(|e| KvmStateError::Vm("KVM_GET_IRQCHIP", e))?;
            irqchips.push(chip);
        }
        let pit = vm
            .get_pit2()
            .map_err(|e| KvmStateError::Vm("KVM_GET_PIT2", e))?;
        let clock = vm
            .get_clock()
            .map_err(|e| KvmStateError::Vm("KVM_GET_CLOCK", e))?;
        Ok(VmState {
            irqchips,
            pit,
            clock,
        })
    }

    /// Writes it into a VM with an in-kernel irqchip and PIT.
    pub fn apply(&self, vm: &VmFd) -> Result<(), KvmStateError> {
        let ids: Vec<u32> = self.irqchips.iter().map(|c| c.chip_id).collect();
        if ids
            != [
                KVM_IRQCHIP_PIC_MASTER,
                KVM_IRQCHIP_PIC_SLAVE,
                KVM_IRQCHIP_IOAPIC,
            ]
        {
            return Err(KvmStateError::Invalid {
                vcpu: 0,
                why: format!("irqchip ids {ids:?}"),
            });
        }
        vm.set_pit2(&self.pit)
            .map_err(|e| KvmStateError::Vm("KVM_SET_PIT2", e))?;
        // Only KVM_CLOCK_REALTIME-style flags are accepted on set; the TSC_STABLE bit KVM
        // reports on get is not one of them.
        let clock = kvm_clock_data {
            flags: 0,
            ..self.clock
        };
        vm.set_clock(&clock)
            .map_err(|e| KvmStateError::Vm("KVM_SET_CLOCK", e))?;
        for chip in &self.irqchips {
            vm.set_irqchip(chip)
                .map_err(|e| KvmStateError::Vm("KVM_SET_IRQCHIP", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tsc_rate_within_250_ppm_needs_no_scaling() {
        assert!(tsc_close_enough(2_994_374, 2_994_374));
        assert!(tsc_close_enough(2_994_374 + 748, 2_994_374));
        assert!(tsc_close_enough(2_994_374 - 748, 2_994_374));
        assert!(!tsc_close_enough(2_994_374 + 749, 2_994_374));
        assert!(!tsc_close_enough(3_400_000, 2_994_374));
        assert!(!tsc_close_enough(0, 2_994_374));
    }

    #[test]
    fn async_pf_is_turned_off_on_a_fresh_vcpu_and_left_alone_on_one_that_ran_and_the_deadline_goes_last()
     {
        let msr = |index, data| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let state = VcpuState {
            cpuid: vec![kvm_cpuid_entry2::default()],
            msrs: vec![
                msr(0x10, 7),
                msr(MSR_IA32_TSC_DEADLINE, 9),
                msr(MSR_KVM_ASYNC_PF_EN, 0x1000 | 1),
                msr(0x1b, 3),
            ],
            regs: Default::default(),
            sregs: Default::default(),
            xsave: vec![0; XSAVE_WORDS],
            xcrs: None,
            debugregs: Default::default(),
            lapic: Default::default(),
            mp_state: Default::default(),
            events: Default::default(),
        };
        let pairs = |v: Vec<kvm_msr_entry>| -> Vec<(u32, u64)> {
            v.iter().map(|e| (e.index, e.data)).collect()
        };
        // The TSC-deadline MSR goes last (after the TSC, 0x10); the others keep their order.
        assert_eq!(
            pairs(state.msrs_to_apply(true)),
            [
                (0x10, 7),
                (MSR_KVM_ASYNC_PF_EN, 0),
                (0x1b, 3),
                (MSR_IA32_TSC_DEADLINE, 9)
            ]
        );
        assert_eq!(
            pairs(state.msrs_to_apply(false)),
            [(0x10, 7), (0x1b, 3), (MSR_IA32_TSC_DEADLINE, 9)]
        );
    }
}
