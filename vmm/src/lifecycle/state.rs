//! The whole VM state in and out of a running VM: KVM (irqchip, PIT, clock, every vCPU) and
//! devices (serial, every virtio-mmio transport with its queues), through each component's
//! [`Persist`] implementation. The VM must be paused (or not started yet).

use std::sync::MutexGuard;

use kvm_ioctls::VcpuFd;

use crate::devices::legacy::serial::SerialStateError;
use crate::devices::virtio::persist::TransportStateError;
use crate::snapshot::{MicrovmState, Persist};
use crate::vmm::{VmCore, lock};
use crate::vstate::persist::{self, KvmStateError, VcpuState, VmState};
use crate::vstate::vcpu::{SharedVcpu, VCPU_LOCK_TIMEOUT, lock_within};

/// A paused vCPU's fd stayed locked by its thread (see [`lock_within`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "vCPU {vcpu}'s thread still held its fd {waited_ms} ms into the pause ({run}): it is not parked"
)]
pub struct VcpuBusy {
    /// vCPU index.
    pub vcpu: usize,
    /// How long the VMM waited.
    pub waited_ms: u64,
    /// The run state then ([`crate::vstate::vcpu::RunControl::describe`]).
    pub run: String,
}

/// Capturing the VM state failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// KVM refused to give part of the state.
    #[error("reading KVM state")]
    Kvm(#[source] KvmStateError),
    /// A vCPU could not be locked.
    #[error(transparent)]
    VcpuBusy(VcpuBusy),
}

/// Applying a snapshot's state to this VM failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A vCPU could not be locked.
    #[error(transparent)]
    VcpuBusy(VcpuBusy),
    /// The snapshot is of another machine.
    #[error("the snapshot is of another machine: {0}")]
    Machine(String),
    /// KVM refused part of the state.
    #[error("applying KVM state")]
    Kvm(#[source] KvmStateError),
    /// The serial state is invalid.
    #[error("serial state")]
    Serial(#[source] SerialStateError),
    /// A transport state is invalid.
    #[error("virtio device {slot}")]
    Transport {
        /// Slot index.
        slot: usize,
        /// Cause.
        #[source]
        source: TransportStateError,
    },
}

impl VmCore {
    /// Locks vCPU `i` of this paused VM, bounded by [`VCPU_LOCK_TIMEOUT`].
    fn lock_vcpu<'a>(
        &self,
        i: usize,
        v: &'a SharedVcpu,
    ) -> Result<MutexGuard<'a, VcpuFd>, VcpuBusy> {
        lock_within(v, VCPU_LOCK_TIMEOUT).ok_or_else(|| VcpuBusy {
            vcpu: i,
            waited_ms: VCPU_LOCK_TIMEOUT.as_millis() as u64,
            run: self.control.describe(),
        })
    }

    /// Captures the whole VM state (vCPUs and devices must be paused).
    pub(crate) fn capture_state(&self) -> Result<MicrovmState, CaptureError> {
        let vm = VmState::capture(self.vm.fd()).map_err(CaptureError::Kvm)?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        let mut tsc_khz = None;
        for (i, v) in self.vcpus.iter().enumerate() {
            let fd = self.lock_vcpu(i, v).map_err(CaptureError::VcpuBusy)?;
            vcpus.push(VcpuState::capture(&fd, i, &self.caps).map_err(CaptureError::Kvm)?);
            // Every vCPU runs at the rate KVM gave the VM; vCPU 0's stands for them all.
            if i == 0 {
                tsc_khz = persist::tsc_khz(&fd);
            }
        }
        let serial = lock(self.bus.serial()).save();
        let mmio = self
            .bus
            .mmio_slots()
            .iter()
            .map(|s| lock(&s.transport).save())
            .collect();
        Ok(MicrovmState {
            machine: self.machine.clone(),
            vm,
            vcpus,
            serial,
            mmio,
            tsc_khz,
        })
    }

    /// Puts vCPUs and devices in `state` (paused VM; memory is switched separately).
    /// `fresh`: the vCPUs never ran (restore) rather than being a live VM's (merge).
    pub(crate) fn apply_state(&self, state: &MicrovmState, fresh: bool) -> Result<(), ApplyError> {
        let (a, b) = (&state.machine, &self.machine);
        if a.vcpus != b.vcpus
            || a.mem_size != b.mem_size
            || state.mmio.len() != self.bus.mmio_slots().len()
        {
            return Err(ApplyError::Machine(format!(
                "{} vCPUs, {} MiB, {} devices; this VM has {}, {}, {}",
                a.vcpus,
                a.mem_size >> 20,
                state.mmio.len(),
                b.vcpus,
                b.mem_size >> 20,
                self.bus.mmio_slots().len()
            )));
        }
        state.vm.apply(self.vm.fd()).map_err(ApplyError::Kvm)?;
        for (i, (v, s)) in self.vcpus.iter().zip(&state.vcpus).enumerate() {
            let fd = self.lock_vcpu(i, v).map_err(ApplyError::VcpuBusy)?;
            if let Some(khz) = state.tsc_khz {
                persist::apply_tsc_khz(&fd, i, khz, self.caps.tsc_control)
                    .map_err(ApplyError::Kvm)?;
            }
            s.apply(&fd, i, fresh).map_err(ApplyError::Kvm)?;
        }
        lock(self.bus.serial())
            .restore(&state.serial)
            .map_err(ApplyError::Serial)?;
        for (slot, (s, st)) in self.bus.mmio_slots().iter().zip(&state.mmio).enumerate() {
            lock(&s.transport)
                .restore(st)
                .map_err(|source| ApplyError::Transport { slot, source })?;
        }
        Ok(())
    }
}
