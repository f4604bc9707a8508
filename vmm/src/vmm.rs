//! A running VM, its one owner and the queue in front of it.
//!
//! The VM's mutable state ([`VmCore`]: guest RAM, devices, vCPU fds, lineage, pause holds)
//! belongs to one thread, the lifecycle actor. Every lifecycle operation (pause, resume,
//! snapshot, fork, merge, rollback, persist, memory hash) is a [`Request`] in its queue and
//! runs to completion before the next one starts, as in Firecracker's VMM thread: a resume
//! sent during a snapshot waits behind it by construction. [`VmmHandle`]s (the control
//! socket, embedders) queue requests and wait, with a bound, for the reply.
//!
//! Two things do not queue: `status` reads what the actor publishes after every request
//! (and the vCPUs' run state), so it never blocks behind a long operation; `shutdown` is a
//! flag the vCPU threads see at once.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use fissile_proto::control::{
    ErrorKind, ForkReply, MergeReply, SnapshotReply, TrimReply, VmStatus,
};
use fissile_proto::error_chain;

use crate::api::{ControlOps, OpFailure};
use crate::config::MachineConfig;
use crate::device_manager::DeviceManager;
use crate::lifecycle::{self, MergeError, Request, RollbackError, SnapshotError, TrimError};
use crate::memory::GuestRam;
use crate::vstate::persist::KvmCaps;
use crate::vstate::vcpu::{ControlError, RunControl, SharedVcpu, Target, VmExit};
use crate::vstate::vm::Vm;

/// Requests that may wait in the queue; more are refused as busy.
pub const QUEUE_DEPTH: usize = 16;
/// Longest a caller waits for an operation's reply (queue time included).
pub const OP_TIMEOUT: Duration = Duration::from_secs(600);

/// Poison-tolerant lock: the data behind our mutexes has no invariant a panic can break
/// half way (device registers, fds, bookkeeping), and a VMM that stops answering because
/// one thread panicked is worse than one that goes on.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What this VM forked from, for merge.
#[derive(Debug, Default)]
pub(crate) struct Lineage {
    /// The snapshot of the latest fork whose children may still be merged (`None` once
    /// merged: a fork is merged at most once).
    pub(crate) fork: Option<String>,
    /// Snapshots this VM took since that fork (merging one of them is a self-merge).
    pub(crate) own: Vec<String>,
}

/// Most snapshots remembered in [`Lineage::own`].
const MAX_OWN_SNAPSHOTS: usize = 1024;

impl Lineage {
    /// Records a snapshot this VM took.
    pub(crate) fn took(&mut self, id: &str) {
        if self.own.len() >= MAX_OWN_SNAPSHOTS {
            self.own.remove(0);
        }
        self.own.push(id.to_string());
    }
}

/// The VM's mutable state; owned by the lifecycle actor once the VM runs.
#[derive(Debug)]
pub(crate) struct VmCore {
    pub(crate) control: Arc<RunControl>,
    pub(crate) machine: MachineConfig,
    pub(crate) vm: Vm,
    pub(crate) caps: KvmCaps,
    pub(crate) vcpus: Vec<SharedVcpu>,
    pub(crate) bus: Arc<DeviceManager>,
    pub(crate) ram: GuestRam,
    pub(crate) snapshotd: Option<PathBuf>,
    /// A writable scratch disk is attached (snapshots would not capture it).
    pub(crate) scratch: bool,
    pub(crate) lineage: Lineage,
    /// Pause holds: while any is held the vCPUs are parked and the devices quiesced.
    holds: u32,
    /// One of the holds is the clients' (`pause` until `resume`).
    client_paused: bool,
    /// The step of the running operation, for `status` (a stalled operation says where).
    pub(crate) step: Arc<StepCell>,
}

/// The step the actor is in, published as it goes (`status` shows it beside `busy`).
#[derive(Debug, Default)]
pub(crate) struct StepCell(Mutex<Option<String>>);

impl StepCell {
    pub(crate) fn set(&self, step: Option<String>) {
        *lock(&self.0) = step;
    }

    fn get(&self) -> Option<String> {
        lock(&self.0).clone()
    }
}

impl VmCore {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        control: Arc<RunControl>,
        machine: MachineConfig,
        vm: Vm,
        caps: KvmCaps,
        vcpus: Vec<SharedVcpu>,
        bus: DeviceManager,
        ram: GuestRam,
        snapshotd: Option<PathBuf>,
        scratch: bool,
    ) -> Self {
        Self {
            control,
            machine,
            vm,
            caps,
            vcpus,
            bus: Arc::new(bus),
            ram,
            snapshotd,
            scratch,
            lineage: Lineage::default(),
            holds: 0,
            client_paused: false,
            step: Arc::default(),
        }
    }

    /// Records the step the running operation is in (shown by `status`).
    pub(crate) fn step(&self, step: impl Into<String>) {
        self.step.set(Some(step.into()));
    }

    /// Starts the VM with the clients' hold taken (a restore: resumed by a `resume`).
    pub(crate) fn start_held(&mut self) {
        self.holds = 1;
        self.client_paused = true;
    }

    /// True while the VM starts (or is) paused.
    pub(crate) fn held(&self) -> bool {
        self.holds > 0
    }

    /// Stops (`true`) or restarts device processing outside vCPU exits.
    pub(crate) fn quiesce_devices(&self, paused: bool) {
        for (i, slot) in self.bus.mmio_slots().iter().enumerate() {
            let verb = if paused { "quiescing" } else { "restarting" };
            self.step(format!("{verb} virtio device {i} (at {:#x})", slot.base));
            lock(&slot.transport).device_mut().quiesce(paused);
        }
    }

    /// Takes a pause hold: the first one parks the vCPUs (bounded, see
    /// [`RunControl::pause`]), then quiesces the devices.
    pub(crate) fn hold(&mut self) -> Result<(), ControlError> {
        if self.holds == 0 {
            self.step("pausing the vCPUs");
            self.control.pause()?;
            self.quiesce_devices(true);
        }
        self.holds += 1;
        Ok(())
    }

    /// Gives a hold back: the last one restarts the devices (a restored vsock delivers its
    /// transport reset now), then the vCPUs.
    pub(crate) fn release(&mut self) {
        self.holds = self.holds.saturating_sub(1);
        if self.holds == 0 {
            self.quiesce_devices(false);
            self.step("resuming the vCPUs");
            // Fails only when the VM has exited meanwhile: nothing left to resume.
            let _ = self.control.resume();
        }
    }

    /// Runs `f` with the VM paused (a hold of its own; a client's pause stays).
    pub(crate) fn paused<T, E>(
        &mut self,
        pause_failed: impl FnOnce(ControlError) -> E,
        f: impl FnOnce(&mut Self) -> Result<T, E>,
    ) -> Result<(T, f64), E> {
        self.hold().map_err(pause_failed)?;
        let since = Instant::now();
        let r = f(self);
        let paused_ms = since.elapsed().as_secs_f64() * 1e3;
        self.release();
        r.map(|t| (t, paused_ms))
    }

    fn client_pause(&mut self) -> Result<(), ControlError> {
        if self.control.target() == Target::Exited {
            return Err(ControlError::Exited);
        }
        if !self.client_paused {
            self.hold()?;
            self.client_paused = true;
        }
        Ok(())
    }

    fn client_resume(&mut self) -> Result<(), ControlError> {
        if self.control.target() == Target::Exited {
            return Err(ControlError::Exited);
        }
        if !self.client_paused {
            return Err(ControlError::NotPaused);
        }
        self.client_paused = false;
        self.release();
        Ok(())
    }

    /// Keeps the VM paused for good (persist: the VMM stops after answering).
    pub(crate) fn pin_paused(&mut self) -> Result<(), ControlError> {
        self.client_pause()
    }

    /// Undoes [`VmCore::pin_paused`] after a failed persist.
    pub(crate) fn unpin_paused(&mut self, was_paused: bool) {
        if !was_paused {
            let _ = self.client_resume();
        }
    }

    /// True while a client holds the VM paused.
    pub(crate) fn client_paused(&self) -> bool {
        self.client_paused
    }
}

/// What `status` reports without asking the actor.
#[derive(Debug, Default)]
struct Published {
    base_snapshot: Option<String>,
    fork_snapshot: Option<String>,
    busy: Option<&'static str>,
}

/// The parts of a VM that never change and that any thread may read.
#[derive(Debug)]
struct Shared {
    control: Arc<RunControl>,
    started: Instant,
    vcpus: u8,
    mem_mib: u64,
    snapshotd: Option<PathBuf>,
    published: Mutex<Published>,
    step: Arc<StepCell>,
}

impl Shared {
    fn publish(&self, core: &VmCore, busy: Option<&'static str>) {
        self.step.set(None);
        let mut p = lock(&self.published);
        p.base_snapshot = core.ram.base_snapshot().map(str::to_string);
        p.fork_snapshot = core.lineage.fork.clone();
        p.busy = busy;
    }

    fn set_busy(&self, busy: Option<&'static str>) {
        lock(&self.published).busy = busy;
    }
}

/// Why a request got no reply from the actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue is full.
    #[error("the VMM is busy: {QUEUE_DEPTH} lifecycle requests are queued already")]
    Full,
    /// The actor has stopped (the VM has ended).
    #[error("the VM has ended")]
    Gone,
    /// No reply within [`OP_TIMEOUT`].
    #[error("no reply from the VMM within {} s", OP_TIMEOUT.as_secs())]
    Timeout,
}

impl QueueError {
    /// The control-protocol kind of this failure.
    pub fn kind(self) -> ErrorKind {
        match self {
            QueueError::Full => ErrorKind::Busy,
            QueueError::Gone => ErrorKind::Conflict,
            QueueError::Timeout => ErrorKind::Internal,
        }
    }
}

/// Pausing or resuming through the queue failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    /// The run state refused (the VM exited, is not paused, or a vCPU did not park).
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The request was not answered.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// A cloneable handle to control a running VM from other threads.
#[derive(Debug, Clone)]
pub struct VmmHandle {
    tx: Sender<Request>,
    shared: Arc<Shared>,
}

impl VmmHandle {
    /// Queues a request made by `make` (given the reply channel) and waits for its reply.
    fn call<T>(&self, make: impl FnOnce(Sender<T>) -> Request) -> Result<T, QueueError> {
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        match self.tx.try_send(make(reply_tx)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(QueueError::Full),
            Err(TrySendError::Disconnected(_)) => return Err(QueueError::Gone),
        }
        reply_rx.recv_timeout(OP_TIMEOUT).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => QueueError::Timeout,
            crossbeam_channel::RecvTimeoutError::Disconnected => QueueError::Gone,
        })
    }

    /// Current state, uptime, vCPUs, memory, base and fork snapshots, running operation.
    pub fn status(&self) -> VmStatus {
        let s = &self.shared;
        let p = lock(&s.published);
        VmStatus {
            state: s.control.target().vm_state(),
            uptime_ms: u64::try_from(s.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            vcpus: s.vcpus,
            mem_mib: s.mem_mib,
            base_snapshot: p.base_snapshot.clone(),
            fork_snapshot: p.fork_snapshot.clone(),
            vcpu_exits: s.control.exit_counts(),
            busy: p.busy.map(|b| match s.step.get() {
                Some(step) => format!("{b}: {step}"),
                None => b.to_string(),
            }),
        }
    }

    /// Pauses the VM (the clients' hold); returns once no vCPU is inside `KVM_RUN` and the
    /// devices are quiesced. Pausing a paused VM is a no-op.
    pub fn pause(&self) -> Result<(), PauseError> {
        Ok(self.call(Request::Pause)??)
    }

    /// Releases the clients' hold: the VM runs again unless an operation holds it.
    pub fn resume(&self) -> Result<(), PauseError> {
        Ok(self.call(Request::Resume)??)
    }

    /// Stops the VM; [`Vmm::wait`] then returns [`VmExit::Stopped`].
    pub fn shutdown(&self) {
        self.shared.control.request_exit(VmExit::Stopped);
    }

    /// Snapshots the VM into snapshotd; it continues on the new snapshot. With `durable`,
    /// returns once the store holds it (the VM runs again while the store ingests).
    pub fn snapshot(&self, durable: bool) -> Result<SnapshotReply, SnapshotError> {
        let mut reply = self.call(Request::Snapshot)??;
        if durable {
            let socket = self
                .shared
                .snapshotd
                .as_deref()
                .ok_or(SnapshotError::NoSnapshotd)?;
            lifecycle::image::connect(socket)?
                .wait_durable(&reply.id)
                .map_err(SnapshotError::Durable)?;
            reply.durable = true;
        }
        Ok(reply)
    }

    /// Takes a snapshot and makes it this VM's fork point (children are started from it by
    /// the caller; see `fissile_proto::control`).
    pub fn fork(&self) -> Result<ForkReply, SnapshotError> {
        self.call(Request::Fork)?
    }

    /// Takes the state of the winner's snapshot `snapshot`, which must descend from this
    /// VM's latest fork point (checked in snapshotd).
    pub fn merge(&self, snapshot: &str) -> Result<MergeReply, MergeError> {
        let snapshot = snapshot.to_string();
        self.call(|reply| Request::Merge { snapshot, reply })?
    }

    /// Returns the VM to snapshot `snapshot` (memory, vCPUs, devices).
    pub fn rollback(&self, snapshot: &str) -> Result<MergeReply, RollbackError> {
        let snapshot = snapshot.to_string();
        self.call(|reply| Request::Rollback { snapshot, reply })?
    }

    /// A durable snapshot; the VM is left paused so nothing happens after it. Stop the VM
    /// ([`VmmHandle::shutdown`]) once the id is safe (the control socket does so after
    /// answering).
    pub fn persist(&self) -> Result<SnapshotReply, SnapshotError> {
        self.call(Request::Persist)?
    }

    /// blake3 of guest memory and of each MiB of it (the VM is paused while hashing).
    pub fn memory_hash(&self) -> Result<(String, Vec<String>), PauseError> {
        self.call(Request::MemoryHash)?
    }

    /// Drops the private copies of guest pages equal to the image's (see
    /// [`crate::lifecycle::trim`]).
    pub fn trim(&self) -> Result<TrimReply, TrimError> {
        self.call(Request::Trim)?
    }

    /// The VM's interrupt path and queues as text (see [`crate::lifecycle::debug`]).
    pub fn debug(&self) -> Result<String, PauseError> {
        self.call(Request::Debug)?
    }
}

impl ControlOps for VmmHandle {
    fn status(&self) -> VmStatus {
        VmmHandle::status(self)
    }
    fn pause(&self) -> Result<(), OpFailure> {
        VmmHandle::pause(self).map_err(pause_failure)
    }
    fn resume(&self) -> Result<(), OpFailure> {
        VmmHandle::resume(self).map_err(pause_failure)
    }
    fn shutdown(&self) {
        VmmHandle::shutdown(self)
    }
    fn snapshot(&self, durable: bool) -> Result<SnapshotReply, OpFailure> {
        VmmHandle::snapshot(self, durable).map_err(|e| (e.kind(), error_chain(&e)))
    }
    fn fork(&self) -> Result<ForkReply, OpFailure> {
        VmmHandle::fork(self).map_err(|e| (e.kind(), error_chain(&e)))
    }
    fn merge(&self, snapshot: &str) -> Result<MergeReply, OpFailure> {
        VmmHandle::merge(self, snapshot).map_err(|e| (e.kind(), error_chain(&e)))
    }
    fn rollback(&self, snapshot: &str) -> Result<MergeReply, OpFailure> {
        VmmHandle::rollback(self, snapshot).map_err(|e| (e.kind(), error_chain(&e)))
    }
    fn persist(&self) -> Result<SnapshotReply, OpFailure> {
        VmmHandle::persist(self).map_err(|e| (e.kind(), error_chain(&e)))
    }
    fn memory_hash(&self) -> Result<(String, Vec<String>), OpFailure> {
        VmmHandle::memory_hash(self).map_err(pause_failure)
    }
    fn trim(&self) -> Result<TrimReply, OpFailure> {
        VmmHandle::trim(self).map_err(|e| (e.kind(), error_chain(&e)))
    }
    fn debug(&self) -> Result<String, OpFailure> {
        VmmHandle::debug(self).map_err(pause_failure)
    }
}

fn pause_failure(e: PauseError) -> OpFailure {
    let kind = match e {
        PauseError::Control(ControlError::PauseTimeout(_)) => ErrorKind::Internal,
        PauseError::Control(_) => ErrorKind::Conflict,
        PauseError::Queue(q) => q.kind(),
    };
    (kind, error_chain(&e))
}

/// The actor: runs every queued request against `core`, one at a time, until
/// [`Request::Stop`].
fn run_actor(mut core: VmCore, rx: Receiver<Request>, shared: Arc<Shared>) {
    crate::seccomp::enter(crate::seccomp::ThreadClass::Vmm);
    shared.publish(&core, None);
    while let Ok(req) = rx.recv() {
        if matches!(req, Request::Stop) {
            break;
        }
        shared.set_busy(Some(req.name()));
        match req {
            Request::Pause(reply) => {
                let _ = reply.send(core.client_pause());
            }
            Request::Resume(reply) => {
                let _ = reply.send(core.client_resume());
            }
            other => lifecycle::run(&mut core, other),
        }
        shared.publish(&core, None);
    }
    // Dropping `core` drops the devices; their threads end even if the VM stopped paused.
    drop(core);
}

/// A running VM. Dropping it without [`Vmm::wait`] stops the VM.
#[derive(Debug)]
pub struct Vmm {
    handle: VmmHandle,
    vcpu_threads: Vec<std::thread::JoinHandle<()>>,
    actor: Option<std::thread::JoinHandle<()>>,
}

impl Vmm {
    /// Starts the actor over `core`, whose vCPU threads are `vcpu_threads`.
    pub(crate) fn start(
        core: VmCore,
        vcpu_threads: Vec<std::thread::JoinHandle<()>>,
        started: Instant,
    ) -> std::io::Result<Vmm> {
        let shared = Arc::new(Shared {
            control: core.control.clone(),
            started,
            vcpus: core.machine.vcpus,
            mem_mib: core.machine.mem_size >> 20,
            snapshotd: core.snapshotd.clone(),
            published: Mutex::new(Published::default()),
            step: core.step.clone(),
        });
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_DEPTH);
        let actor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fissile-vmm".into())
                .spawn(move || run_actor(core, rx, shared))?
        };
        Ok(Vmm {
            handle: VmmHandle { tx, shared },
            vcpu_threads,
            actor: Some(actor),
        })
    }

    /// A handle for other threads.
    pub fn handle(&self) -> VmmHandle {
        self.handle.clone()
    }

    /// Current status.
    pub fn status(&self) -> VmStatus {
        self.handle.status()
    }

    /// Requests a stop.
    pub fn shutdown(&self) {
        self.handle.shutdown();
    }

    /// Blocks until the VM ends; returns how it ended.
    pub fn wait(mut self) -> VmExit {
        let exit = self.handle.shared.control.wait_exited();
        self.stop_threads();
        exit
    }

    fn stop_threads(&mut self) {
        for t in self.vcpu_threads.drain(..) {
            let _ = t.join();
        }
        if let Some(actor) = self.actor.take() {
            // Behind whatever is queued: every request fails fast on an exited VM.
            let _ = self.handle.tx.send(Request::Stop);
            let _ = actor.join();
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.actor.is_some() {
            self.handle.shared.control.request_exit(VmExit::Stopped);
            self.stop_threads();
        }
    }
}
