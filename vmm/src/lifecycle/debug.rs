//! A VM's interrupt path and queues as text, for a person diagnosing a guest that does not
//! answer (`debug` on the control socket; `fissile-sandbox` adds it to a reconnect error):
//! each vCPU's run state, RIP and interrupt flag, its local APIC (TPR, PPR, vectors in
//! service and requested, the timer), pending events; the IOAPIC pins of the virtio devices;
//! each device's InterruptStatus and queues (the device's indices beside the guest's own
//! ring indices, read from guest memory); the vsock muxer's state. The VM is paused.

use std::fmt::Write as _;

use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, kvm_irqchip, kvm_lapic_state};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::IntoBytes;

use crate::arch::x86_64::layout::VIRTIO_IRQ_BASE;
use crate::vmm::{VmCore, lock};

const APIC_TPR: usize = 0x80;
const APIC_PPR: usize = 0xa0;
const APIC_SVR: usize = 0xf0;
const APIC_ISR: usize = 0x100;
const APIC_IRR: usize = 0x200;
const APIC_LVTT: usize = 0x320;
const APIC_TMICT: usize = 0x380;
const APIC_TMCCT: usize = 0x390;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const RFLAGS_IF: u64 = 1 << 9;

/// The dump (see the module docs); a capture failure is part of the text.
pub(crate) fn dump(core: &VmCore) -> String {
    let mut out = String::new();
    let state = match core.capture_state() {
        Ok(s) => s,
        Err(e) => {
            return format!(
                "capturing the state failed: {}",
                fissile_proto::error_chain(&e)
            );
        }
    };
    for (i, v) in state.vcpus.iter().enumerate() {
        let msr = |index| v.msrs.iter().find(|m| m.index == index).map(|m| m.data);
        let _ = writeln!(
            out,
            "vcpu{i}: mp_state {} rip {:#x} IF {} | {} | events: injected {} nr {:#x} pending {} nmi pending {} | TSC {:?} TSC_DEADLINE {:?}",
            v.mp_state.mp_state,
            v.regs.rip,
            u8::from(v.regs.rflags & RFLAGS_IF != 0),
            lapic(&v.lapic),
            v.events.interrupt.injected,
            v.events.interrupt.nr,
            v.events.exception.pending,
            v.events.nmi.pending,
            msr(MSR_IA32_TSC),
            msr(MSR_IA32_TSC_DEADLINE),
        );
    }
    for chip in &state.vm.irqchips {
        match chip.chip_id {
            KVM_IRQCHIP_IOAPIC => {
                let _ = writeln!(out, "ioapic: {}", ioapic(chip, core.bus.mmio_slots().len()));
            }
            KVM_IRQCHIP_PIC_MASTER => {
                let b = chip.as_bytes();
                // kvm_pic_state: last_irr, irr, imr, isr, … after chip_id and pad.
                let _ = writeln!(
                    out,
                    "pic master: irr {:#04x} imr {:#04x} isr {:#04x}",
                    b.get(9).copied().unwrap_or(0),
                    b.get(10).copied().unwrap_or(0),
                    b.get(11).copied().unwrap_or(0)
                );
            }
            _ => {}
        }
    }
    let mem = core.ram.memory();
    let guest_idx = |addr: u64| {
        mem.read_obj::<u16>(GuestAddress(addr + 2))
            .map_or_else(|e| format!("? ({e})"), |v| v.to_string())
    };
    for (slot, (s, saved)) in core.bus.mmio_slots().iter().zip(&state.mmio).enumerate() {
        let _ = write!(
            out,
            "virtio {slot} (type {}, gsi {}): status {:#x} InterruptStatus {:#x} activated {}",
            saved.device_type, s.gsi, saved.status, saved.interrupt_status, saved.activated
        );
        for (q, qs) in saved.queues.iter().enumerate() {
            if !qs.ready {
                continue;
            }
            let _ = write!(
                out,
                " | q{q}: device avail {} used {}, guest avail.idx {} used.idx {}",
                qs.next_avail,
                qs.next_used,
                guest_idx(qs.avail_ring),
                guest_idx(qs.used_ring)
            );
        }
        let extra = lock(&s.transport).device().debug_state();
        if !extra.is_empty() {
            let _ = write!(out, " | {extra}");
        }
        out.push('\n');
    }
    out
}

fn reg(l: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| l.regs.get(offset + i).map_or(0, |c| *c as u8);
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// The vectors set in the 256-bit register at `offset` (ISR, IRR, …).
fn vectors(l: &kvm_lapic_state, offset: usize) -> Vec<String> {
    (0..8)
        .flat_map(|w| {
            let bits = reg(l, offset + 0x10 * w);
            (0..32)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| format!("{:#x}", w * 32 + b))
        })
        .collect()
}

fn lapic(l: &kvm_lapic_state) -> String {
    format!(
        "lapic: SVR {:#x} TPR {:#x} PPR {:#x} ISR [{}] IRR [{}] LVTT {:#x} TMICT {} TMCCT {}",
        reg(l, APIC_SVR),
        reg(l, APIC_TPR),
        reg(l, APIC_PPR),
        vectors(l, APIC_ISR).join(" "),
        vectors(l, APIC_IRR).join(" "),
        reg(l, APIC_LVTT),
        reg(l, APIC_TMICT),
        reg(l, APIC_TMCCT),
    )
}

/// The IOAPIC's IRR and the redirection entries of the virtio devices' pins
/// (`kvm_ioapic_state`: base, ioregsel, id, irr, pad, then 24 entries of 8 bytes).
fn ioapic(chip: &kvm_irqchip, devices: usize) -> String {
    let b = chip.as_bytes();
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
    let chip_at = 8; // chip_id, pad
    let mut out = format!("irr {:#x}", u32_at(chip_at + 16));
    for d in 0..devices {
        let pin = VIRTIO_IRQ_BASE as usize + d;
        let e = u64_at(chip_at + 24 + 8 * pin);
        let _ = write!(
            out,
            " | pin {pin}: vector {:#x} {} {} remote_irr {} masked {}",
            e & 0xff,
            if e & (1 << 15) != 0 { "level" } else { "edge" },
            if e & (1 << 12) != 0 {
                "send-pending"
            } else {
                "idle"
            },
            (e >> 14) & 1,
            (e >> 16) & 1
        );
    }
    out
}
