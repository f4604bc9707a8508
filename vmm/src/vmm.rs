//! A running VM: [`Vmm`] (owned by whoever started it), [`VmmHandle`] (cloneable, used by the
//! control socket and embedders) and the state they share. Lifecycle operations that touch
//! the whole VM (snapshot, fork, merge) live in [`crate::snapshot`] and [`crate::fork`] as
//! methods of [`VmmShared`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use fissile_proto::control::VmStatus;

use crate::api::ApiServer;
use crate::device_manager::DeviceManager;
use crate::memory::GuestRam;
use crate::snapshot::MachineConfig;
use crate::vstate::persist::KvmCaps;
use crate::vstate::vcpu::{ControlError, RunControl, SharedVcpu, Target, VmExit};
use crate::vstate::vm::Vm;

/// What this VM forked from, for merge.
#[derive(Debug, Default)]
pub(crate) struct Lineage {
    /// The snapshot of the latest fork whose children may still be merged (`None` once
    /// merged: a fork is merged at most once).
    pub(crate) fork: Option<String>,
}

/// State shared between the [`Vmm`], its handles and the control socket.
#[derive(Debug)]
pub struct VmmShared {
    pub(crate) control: Arc<RunControl>,
    pub(crate) started: Instant,
    pub(crate) machine: MachineConfig,
    pub(crate) vm: Vm,
    pub(crate) caps: KvmCaps,
    pub(crate) vcpus: Vec<SharedVcpu>,
    pub(crate) bus: Arc<DeviceManager>,
    pub(crate) ram: Mutex<GuestRam>,
    pub(crate) snapshotd: Option<PathBuf>,
    pub(crate) api_sock: Option<PathBuf>,
    /// A writable scratch disk is attached (snapshots would not capture it).
    pub(crate) scratch: bool,
    pub(crate) lineage: Mutex<Lineage>,
    /// Serializes snapshot, fork, merge and persist.
    pub(crate) ops: Mutex<()>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmmShared {
    /// Assembles the shared state (the builder calls this).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        control: Arc<RunControl>,
        started: Instant,
        machine: MachineConfig,
        vm: Vm,
        caps: KvmCaps,
        vcpus: Vec<SharedVcpu>,
        bus: Arc<DeviceManager>,
        ram: GuestRam,
        snapshotd: Option<PathBuf>,
        api_sock: Option<PathBuf>,
        scratch: bool,
    ) -> Self {
        Self {
            control,
            started,
            machine,
            vm,
            caps,
            vcpus,
            bus,
            ram: Mutex::new(ram),
            snapshotd,
            api_sock,
            scratch,
            lineage: Mutex::new(Lineage::default()),
            ops: Mutex::new(()),
        }
    }

    /// Current state, uptime, vCPUs, memory, base and fork snapshots.
    pub fn status(&self) -> VmStatus {
        let state = self.control.target().vm_state();
        VmStatus {
            state,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            vcpus: self.machine.vcpus,
            mem_mib: self.machine.mem_size >> 20,
            base_snapshot: lock(&self.ram).base_snapshot().map(str::to_string),
            fork_snapshot: lock(&self.lineage).fork.clone(),
            vcpu_exits: self.control.exit_counts(),
        }
    }

    /// Stops (`true`) or restarts device processing outside vCPU exits.
    pub(crate) fn quiesce_devices(&self, paused: bool) {
        for slot in self.bus.mmio_slots() {
            lock(&slot.transport).device_mut().quiesce(paused);
        }
    }

    /// Pauses the vCPUs, then the devices: nothing touches guest memory until resumed.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.control.pause()?;
        self.quiesce_devices(true);
        Ok(())
    }

    /// Restarts the devices (a restored vsock delivers its transport reset now), then the
    /// vCPUs.
    pub fn resume(&self) -> Result<(), ControlError> {
        if self.control.target() != Target::Paused {
            return Err(ControlError::NotPaused);
        }
        self.quiesce_devices(false);
        self.control.resume()
    }
}

/// Pauses vCPUs and devices for as long as it lives; on drop, devices restart and the vCPUs
/// resume, unless the VM was paused already when it was taken (then it stays paused).
#[derive(Debug)]
pub(crate) struct PauseGuard<'a> {
    shared: &'a VmmShared,
    was_paused: bool,
    since: Instant,
}

impl<'a> PauseGuard<'a> {
    pub(crate) fn new(shared: &'a VmmShared) -> Result<Self, ControlError> {
        let was_paused = shared.control.target() == Target::Paused;
        if !was_paused {
            shared.pause()?;
        }
        Ok(Self {
            shared,
            was_paused,
            since: Instant::now(),
        })
    }

    /// Milliseconds since the pause began.
    pub(crate) fn elapsed_ms(&self) -> f64 {
        self.since.elapsed().as_secs_f64() * 1e3
    }
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        if !self.was_paused {
            let _ = self.shared.resume();
        }
    }
}

/// A cloneable handle to control a running VM from other threads.
#[derive(Debug, Clone)]
pub struct VmmHandle(pub(crate) Arc<VmmShared>);

impl VmmHandle {
    pub(crate) fn new(shared: Arc<VmmShared>) -> Self {
        Self(shared)
    }

    /// The shared state (lifecycle operations are methods on it).
    pub fn shared(&self) -> &VmmShared {
        &self.0
    }

    /// Pauses all vCPUs and devices; returns once no vCPU is inside `KVM_RUN`.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.0.pause()
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.0.resume()
    }

    /// Stops the VM; [`Vmm::wait`] then returns [`VmExit::Stopped`].
    pub fn shutdown(&self) {
        self.0.control.request_exit(VmExit::Stopped);
    }

    /// Current status.
    pub fn status(&self) -> VmStatus {
        self.0.status()
    }
}

/// A running VM. Dropping it without [`Vmm::wait`] stops the VM.
#[derive(Debug)]
pub struct Vmm {
    shared: Arc<VmmShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    api: Option<ApiServer>,
}

impl Vmm {
    pub(crate) fn new(
        shared: Arc<VmmShared>,
        threads: Vec<std::thread::JoinHandle<()>>,
        api: Option<ApiServer>,
    ) -> Self {
        Self {
            shared,
            threads,
            api,
        }
    }

    /// A handle for other threads.
    pub fn handle(&self) -> VmmHandle {
        VmmHandle(self.shared.clone())
    }

    /// Pauses all vCPUs; returns once none is inside `KVM_RUN`.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.handle().pause()
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.handle().resume()
    }

    /// Requests a stop.
    pub fn shutdown(&self) {
        self.handle().shutdown();
    }

    /// Current status.
    pub fn status(&self) -> VmStatus {
        self.shared.status()
    }

    /// Blocks until the VM ends; returns how it ended.
    pub fn wait(mut self) -> VmExit {
        let exit = self.shared.control.wait_exited();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(api) = self.api.take() {
            api.stop();
        }
        exit
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.control.request_exit(VmExit::Stopped);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
        if let Some(api) = self.api.take() {
            api.stop();
        }
    }
}
