//! vCPU threads and the run/pause/exit state machine.
//!
//! Every vCPU runs `KVM_RUN` on its own thread. [`RunControl`] holds the target state
//! (Running, Paused, Exited). To pause, the target becomes Paused and each vCPU thread is
//! kicked with a real-time signal whose handler sets `kvm_run.immediate_exit`, so `KVM_RUN`
//! returns `EINTR` whether the signal lands inside the guest or just before entry. The thread
//! then parks on a condvar. [`RunControl::pause`] returns only once every live vCPU is parked,
//! i.e. out of `KVM_RUN` (what snapshot and fork need), or fails after [`PAUSE_TIMEOUT`].
//!
//! The kick interrupts blocking system calls on vCPU threads (the handler is installed
//! without `SA_RESTART`): device emulation that blocks on a vCPU thread must retry `EINTR`
//! (vm-memory does for block I/O). A vCPU thread that panics unregisters itself on the way
//! out (a drop guard) and stops the VM with a failure, so nothing waits for it forever.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::arch::x86_64::cpuid::{CpuidParams, filter_cpuid};
use crate::arch::x86_64::{msrs, regs};
use crate::device_manager::{BusAction, DeviceManager};

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself (i8042 reset, triple fault or a KVM reset event): clean exit.
    GuestReset,
    /// The guest powered off (KVM shutdown/system event): clean exit.
    GuestPoweroff,
    /// The host asked the VMM to stop (control socket or library call).
    Stopped,
    /// KVM or the VMM failed; the message says how.
    Failed(String),
}

impl VmExit {
    /// True for exits that are not errors (process exit status 0).
    pub fn is_clean(&self) -> bool {
        !matches!(self, VmExit::Failed(_))
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::GuestReset => f.write_str("guest requested reset"),
            VmExit::GuestPoweroff => f.write_str("guest requested poweroff"),
            VmExit::Stopped => f.write_str("stopped by the host"),
            VmExit::Failed(msg) => write!(f, "VM failed: {msg}"),
        }
    }
}

/// Configuring a vCPU failed; each variant names the KVM step.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU.
    #[error("creating vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// KVM_SET_CPUID2.
    #[error("setting CPUID")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// Building the MSR list.
    #[error("building the boot MSR list")]
    MsrList,
    /// KVM_SET_MSRS.
    #[error("setting boot MSRs")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS accepted fewer MSRs than given.
    #[error("KVM accepted only {0} of {1} boot MSRs")]
    PartialMsrs(usize, usize),
    /// KVM_SET_FPU.
    #[error("setting FPU state")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS / KVM_SET_SREGS.
    #[error("setting segment registers")]
    Sregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_REGS.
    #[error("setting general registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_GET_LAPIC / KVM_SET_LAPIC.
    #[error("configuring the local APIC")]
    Lapic(#[source] kvm_ioctls::Error),
    /// Spawning the thread.
    #[error("spawning the vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// Registering the kick signal handler.
    #[error("registering the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// Per-vCPU boot settings.
#[derive(Debug, Clone)]
pub struct VcpuBoot {
    /// vCPU index (= APIC id).
    pub id: u8,
    /// Total vCPUs.
    pub vcpus: u8,
    /// PVH entry point (used by vCPU 0; APs wait for INIT/SIPI).
    pub entry: u64,
    /// Hide XSAVE/AVX (lab quirk).
    pub hide_xsave: bool,
    /// Offer the TSC-deadline timer (KVM emulates it).
    pub tsc_deadline_timer: bool,
}

/// Sets CPUID, MSRs, FPU, registers and LAPIC LINT0/LINT1 of a fresh vCPU.
pub fn configure_vcpu(fd: &VcpuFd, supported: &CpuId, boot: &VcpuBoot) -> Result<(), VcpuError> {
    let mut cpuid = supported.clone();
    filter_cpuid(
        cpuid.as_mut_slice(),
        CpuidParams {
            vcpu_id: boot.id,
            vcpus: boot.vcpus,
            hide_xsave: boot.hide_xsave,
            tsc_deadline_timer: boot.tsc_deadline_timer,
        },
    );
    fd.set_cpuid2(&cpuid).map_err(VcpuError::SetCpuid)?;

    let msrs = msrs::boot_msrs().map_err(|_| VcpuError::MsrList)?;
    let set = fd.set_msrs(&msrs).map_err(VcpuError::SetMsrs)?;
    if set != msrs.as_slice().len() {
        return Err(VcpuError::PartialMsrs(set, msrs.as_slice().len()));
    }
    fd.set_fpu(&regs::boot_fpu()).map_err(VcpuError::SetFpu)?;

    let sregs = fd.get_sregs().map_err(VcpuError::Sregs)?;
    fd.set_sregs(&regs::pvh_sregs(sregs))
        .map_err(VcpuError::Sregs)?;
    fd.set_regs(&regs::pvh_regs(boot.entry))
        .map_err(VcpuError::SetRegs)?;

    let mut lapic = fd.get_lapic().map_err(VcpuError::Lapic)?;
    let lint0 = regs::lapic_reg(&lapic.regs, regs::APIC_LVT0);
    regs::set_lapic_reg(
        &mut lapic.regs,
        regs::APIC_LVT0,
        regs::set_delivery_mode(lint0, regs::APIC_MODE_EXTINT),
    );
    let lint1 = regs::lapic_reg(&lapic.regs, regs::APIC_LVT1);
    regs::set_lapic_reg(
        &mut lapic.regs,
        regs::APIC_LVT1,
        regs::set_delivery_mode(lint1, regs::APIC_MODE_NMI),
    );
    fd.set_lapic(&lapic).map_err(VcpuError::Lapic)?;
    Ok(())
}

/// Target state of all vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Run guest code.
    Running,
    /// Park outside `KVM_RUN`.
    Paused,
    /// Leave the run loop for good.
    Exited,
}

impl Target {
    /// The state the control socket reports for this target.
    pub fn vm_state(self) -> fissile_proto::control::VmState {
        use fissile_proto::control::VmState;
        match self {
            Target::Running => VmState::Running,
            Target::Paused => VmState::Paused,
            Target::Exited => VmState::Exited,
        }
    }
}

/// Pausing or resuming failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The VM has exited.
    #[error("the VM has exited")]
    Exited,
    /// The VM is not paused.
    #[error("the VM is not paused")]
    NotPaused,
    /// A vCPU did not leave `KVM_RUN` in time (stuck in an exit or a page fault).
    #[error("a vCPU did not stop within {0} ms; the VM keeps running")]
    PauseTimeout(u64),
}

/// How long [`RunControl::pause`] waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct RunState {
    target: Target,
    /// Per vCPU: its pthread while the thread is alive and registered.
    threads: Vec<Option<libc::pthread_t>>,
    parked: usize,
    exit: Option<VmExit>,
}

/// Shared run/pause/exit state of all vCPU threads.
#[derive(Debug)]
pub struct RunControl {
    state: Mutex<RunState>,
    cv: Condvar,
    /// Exits handled per vCPU (observability: a VM that makes no progress shows it here).
    exits: Vec<std::sync::atomic::AtomicU64>,
}

/// The kick handler's registration, once per process (errno on failure).
static KICK_HANDLER: OnceLock<Result<(), i32>> = OnceLock::new();

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_num: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let ptr = KVM_RUN_PTR.with(Cell::get);
    if !ptr.is_null() {
        // SAFETY: `ptr` is this thread's kvm_run mapping, set by the vCPU thread before its
        // first KVM_RUN and cleared before the VcpuFd (and the mapping) is dropped. Writing
        // `immediate_exit` is what KVM documents for exactly this use.
        unsafe { std::ptr::write_volatile(&raw mut (*ptr).immediate_exit, 1) };
    }
}

/// Registers the kick handler (once per process; a failure is reported to every caller).
pub fn register_kick_handler() -> Result<(), VcpuError> {
    KICK_HANDLER
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
                .map_err(|e| e.errno())
        })
        .map_err(|errno| VcpuError::Signal(vmm_sys_util::errno::Error::new(errno)))
}

impl RunControl {
    /// State for `vcpus` threads, starting in `target`.
    pub fn new(vcpus: usize, target: Target) -> Self {
        Self {
            state: Mutex::new(RunState {
                target,
                threads: vec![None; vcpus],
                parked: 0,
                exit: None,
            }),
            cv: Condvar::new(),
            exits: (0..vcpus)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }

    /// Exits handled so far, per vCPU.
    pub fn exit_counts(&self) -> Vec<u64> {
        self.exits
            .iter()
            .map(|e| e.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    fn count_exit(&self, id: usize) {
        if let Some(e) = self.exits.get(id) {
            e.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current target state.
    pub fn target(&self) -> Target {
        self.lock().target
    }

    /// Number of vCPU threads alive.
    pub fn alive(&self) -> usize {
        self.lock().threads.iter().filter(|t| t.is_some()).count()
    }

    /// The run state in words, for errors about a vCPU that should be parked.
    pub fn describe(&self) -> String {
        let state = self.lock();
        let alive = state.threads.iter().filter(|t| t.is_some()).count();
        format!(
            "target {:?}, {} of {alive} vCPU threads parked, exits {:?}",
            state.target,
            state.parked,
            self.exit_counts()
        )
    }

    fn kick_all(state: &RunState) {
        for thread in state.threads.iter().flatten() {
            // SAFETY: a pthread id is in `threads` only while that thread is alive: it removes
            // itself under this same lock on every way out (the `Registration` guard runs on
            // return and on unwinding), and threads are joined only after that. pthread_kill
            // with a registered handler has no other effect.
            unsafe { libc::pthread_kill(*thread, kick_signal()) };
        }
    }

    /// Pauses every vCPU; returns once each live vCPU is parked outside `KVM_RUN`. If one
    /// does not park within [`PAUSE_TIMEOUT`], the VM goes back to its previous target and
    /// the pause fails.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.pause_within(PAUSE_TIMEOUT)
    }

    fn pause_within(&self, timeout: Duration) -> Result<(), ControlError> {
        let mut state = self.lock();
        let previous = state.target;
        match state.target {
            Target::Exited => return Err(ControlError::Exited),
            Target::Paused | Target::Running => state.target = Target::Paused,
        }
        let deadline = Instant::now() + timeout;
        loop {
            let alive = state.threads.iter().filter(|t| t.is_some()).count();
            if state.target == Target::Exited {
                return Err(ControlError::Exited);
            }
            if state.parked >= alive {
                return Ok(());
            }
            if Instant::now() >= deadline {
                state.target = previous;
                self.cv.notify_all();
                return Err(ControlError::PauseTimeout(timeout.as_millis() as u64));
            }
            Self::kick_all(&state);
            // Re-kick periodically: robust even if a signal raced with thread start-up.
            state = self
                .cv
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<(), ControlError> {
        let mut state = self.lock();
        match state.target {
            Target::Exited => Err(ControlError::Exited),
            Target::Running => Err(ControlError::NotPaused),
            Target::Paused => {
                state.target = Target::Running;
                self.cv.notify_all();
                Ok(())
            }
        }
    }

    /// Ends the VM with `exit` (the first recorded exit wins) and kicks every vCPU.
    pub fn request_exit(&self, exit: VmExit) {
        let mut state = self.lock();
        state.target = Target::Exited;
        if state.exit.is_none() {
            state.exit = Some(exit);
        }
        Self::kick_all(&state);
        self.cv.notify_all();
    }

    /// Blocks until every vCPU thread has left; returns how the VM ended.
    pub fn wait_exited(&self) -> VmExit {
        let mut state = self.lock();
        while state.target != Target::Exited || state.threads.iter().any(Option::is_some) {
            state = self.cv.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.exit.clone().unwrap_or(VmExit::Stopped)
    }

    /// Blocks until `n` vCPU threads have registered.
    pub fn wait_registered(&self, n: usize) {
        let mut state = self.lock();
        while state.threads.iter().filter(|t| t.is_some()).count() < n
            && state.target != Target::Exited
        {
            state = self.cv.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn register(&self, id: usize) {
        let mut state = self.lock();
        if let Some(slot) = state.threads.get_mut(id) {
            // SAFETY: pthread_self has no preconditions.
            *slot = Some(unsafe { libc::pthread_self() });
        }
        self.cv.notify_all();
    }

    fn unregister(&self, id: usize) {
        let mut state = self.lock();
        if let Some(slot) = state.threads.get_mut(id) {
            *slot = None;
        }
        self.cv.notify_all();
    }

    /// Parks while paused. Returns false when the thread must exit.
    fn wait_runnable(&self) -> bool {
        let mut state = self.lock();
        loop {
            match state.target {
                Target::Running => return true,
                Target::Exited => return false,
                Target::Paused => {
                    state.parked += 1;
                    self.cv.notify_all();
                    state = self.cv.wait(state).unwrap_or_else(|p| p.into_inner());
                    state.parked -= 1;
                }
            }
        }
    }
}

/// A vCPU fd shared between its thread (which holds the lock only around `KVM_RUN` and
/// the exit it handles) and the VMM, which locks it while the VM is paused to save or
/// restore the vCPU's state.
pub type SharedVcpu = Arc<Mutex<VcpuFd>>;

/// Locks a shared vCPU (a poisoned lock is still usable: the fd has no Rust invariants).
pub fn lock_vcpu(v: &SharedVcpu) -> MutexGuard<'_, VcpuFd> {
    v.lock().unwrap_or_else(|p| p.into_inner())
}

/// Longest the VMM waits for a paused vCPU's fd: a parked thread does not hold it, so a
/// wait this long means the thread is still in (or back in) `KVM_RUN`.
pub const VCPU_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Locks `v` (a shared vCPU of a paused VM), giving up after `timeout` (`None`): the vCPU
/// thread relocks its fd at once around each `KVM_RUN`, so an unbounded wait on a vCPU
/// that is running after all would starve for ever rather than fail.
pub fn lock_within<T>(v: &Mutex<T>, timeout: Duration) -> Option<MutexGuard<'_, T>> {
    let deadline = Instant::now() + timeout;
    loop {
        match v.try_lock() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

/// Spawns the thread for vCPU `id`.
pub fn spawn_vcpu(
    id: u8,
    fd: SharedVcpu,
    control: Arc<RunControl>,
    bus: Arc<DeviceManager>,
) -> Result<std::thread::JoinHandle<()>, VcpuError> {
    std::thread::Builder::new()
        .name(format!("fissile-vcpu{id}"))
        .spawn(move || run_vcpu(usize::from(id), &fd, &control, &bus))
        .map_err(VcpuError::Spawn)
}

/// Exit counters of one vCPU thread (logged when it ends: the cost of a guest is mostly
/// its exits, ~50 µs each in the lab).
#[derive(Debug, Default)]
struct ExitCounts {
    io: u64,
    mmio: u64,
    hlt: u64,
    interrupted: u64,
    other: u64,
}

/// A vCPU thread's registration with [`RunControl`]: dropped on every way out of the
/// thread, unwinding included, so no kick ever targets a thread that is gone.
struct Registration<'a> {
    control: &'a RunControl,
    id: usize,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        if std::thread::panicking() {
            self.control
                .request_exit(VmExit::Failed(format!("vCPU {} thread panicked", self.id)));
        }
        self.control.unregister(self.id);
    }
}

fn run_vcpu(id: usize, shared: &SharedVcpu, control: &RunControl, bus: &DeviceManager) {
    crate::seccomp::enter(crate::seccomp::ThreadClass::Vcpu);
    // The kvm_run page lives as long as the VcpuFd, which outlives this thread.
    KVM_RUN_PTR.with(|p| p.set(lock_vcpu(shared).get_kvm_run() as *mut kvm_run));
    control.register(id);
    let _registration = Registration { control, id };
    let mut unexpected_exits: u64 = 0;
    let mut counts = ExitCounts::default();
    while control.wait_runnable() {
        let mut fd = lock_vcpu(shared);
        let result = fd.run();
        control.count_exit(id);
        match &result {
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => counts.io += 1,
            Ok(VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) => counts.mmio += 1,
            Ok(VcpuExit::Hlt) => counts.hlt += 1,
            Err(_) => counts.interrupted += 1,
            Ok(_) => counts.other += 1,
        }
        match handle_exit(result, bus, &mut unexpected_exits) {
            Step::Continue => {}
            Step::Interrupted => fd.set_kvm_immediate_exit(0),
            Step::Exit(exit) => control.request_exit(exit),
        }
    }
    tracing::info!(vcpu = id, ?counts, "vCPU thread ends");
}

enum Step {
    Continue,
    Interrupted,
    Exit(VmExit),
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

fn handle_exit(
    result: Result<VcpuExit<'_>, kvm_ioctls::Error>,
    bus: &DeviceManager,
    unexpected: &mut u64,
) -> Step {
    match result {
        Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
        Ok(VcpuExit::IoOut(port, data)) => {
            if bus.pio_write(port, data) == BusAction::GuestReset {
                return Step::Exit(VmExit::GuestReset);
            }
        }
        Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
        Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
        Ok(VcpuExit::Shutdown) => return Step::Exit(VmExit::GuestReset),
        Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => {
            return Step::Exit(VmExit::GuestPoweroff);
        }
        Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => {
            return Step::Exit(VmExit::GuestReset);
        }
        Ok(VcpuExit::FailEntry(reason, cpu)) => {
            return Step::Exit(VmExit::Failed(format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on cpu {cpu}"
            )));
        }
        Ok(VcpuExit::InternalError) => {
            return Step::Exit(VmExit::Failed("KVM_EXIT_INTERNAL_ERROR".to_string()));
        }
        Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => {}
        Ok(other) => {
            *unexpected += 1;
            if *unexpected <= 10 {
                tracing::debug!(exit = ?other, "unexpected vCPU exit ignored");
            }
        }
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            return Step::Interrupted;
        }
        Err(e) => return Step::Exit(VmExit::Failed(format!("KVM_RUN failed: {e}"))),
    }
    Step::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread that behaves like a vCPU thread but "runs" by sleeping on the condvar's
    /// timeout instead of KVM_RUN, so the state machine can be tested without KVM.
    fn fake_vcpu(control: Arc<RunControl>, id: usize) -> std::thread::JoinHandle<()> {
        register_kick_handler().unwrap();
        std::thread::spawn(move || {
            control.register(id);
            while control.wait_runnable() {
                std::thread::yield_now();
            }
            control.unregister(id);
        })
    }

    #[test]
    fn a_lock_held_throughout_is_given_up_at_the_bound_and_a_free_one_taken() {
        let m = Mutex::new(0u64);
        let held = m.lock().unwrap();
        let t0 = Instant::now();

        let refused = lock_within(&m, Duration::from_millis(200)).is_none();

        let waited = t0.elapsed();
        assert!(refused, "a held lock is not taken");
        assert!(
            waited >= Duration::from_millis(200),
            "gave up early: {waited:?}"
        );
        assert!(waited < Duration::from_secs(2), "overstayed: {waited:?}");
        drop(held);
        assert!(
            lock_within(&m, Duration::from_millis(200)).is_some(),
            "free lock taken"
        );
    }

    #[test]
    fn pause_parks_every_thread_and_resume_releases_them() {
        let control = Arc::new(RunControl::new(2, Target::Running));
        let threads: Vec<_> = (0..2).map(|i| fake_vcpu(control.clone(), i)).collect();
        control.wait_registered(2);

        control.pause().unwrap();
        assert_eq!(control.lock().parked, 2);
        control.resume().unwrap();
        assert_eq!(control.resume(), Err(ControlError::NotPaused));
        control.request_exit(VmExit::Stopped);

        assert_eq!(control.wait_exited(), VmExit::Stopped);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(control.pause(), Err(ControlError::Exited));
    }

    #[test]
    fn pause_of_a_vcpu_that_never_parks_times_out_and_leaves_it_running() {
        register_kick_handler().unwrap();
        let control = Arc::new(RunControl::new(1, Target::Running));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let c = control.clone();
        // "Stuck in an exit": registered, but never reaches the park point until released.
        let stuck = std::thread::spawn(move || {
            c.register(0);
            let _ = release_rx.recv();
            c.unregister(0);
        });
        control.wait_registered(1);

        let r = control.pause_within(Duration::from_millis(200));

        assert_eq!(r, Err(ControlError::PauseTimeout(200)));
        assert_eq!(control.target(), Target::Running, "target restored");
        release_tx.send(()).unwrap();
        stuck.join().unwrap();
    }

    #[test]
    fn a_panicking_vcpu_thread_unregisters_and_fails_the_vm() {
        register_kick_handler().unwrap();
        let control = Arc::new(RunControl::new(1, Target::Running));
        let c = control.clone();
        let t = std::thread::spawn(move || {
            c.register(0);
            let _registration = Registration { control: &c, id: 0 };
            panic!("device emulation bug");
        });
        control.wait_registered(1);

        assert!(t.join().is_err(), "the thread panicked");

        assert_eq!(control.alive(), 0, "unregistered while unwinding");
        assert_eq!(
            control.wait_exited(),
            VmExit::Failed("vCPU 0 thread panicked".into())
        );
        assert_eq!(control.pause(), Err(ControlError::Exited));
    }

    #[test]
    fn first_exit_reason_wins() {
        let control = RunControl::new(0, Target::Running);
        control.request_exit(VmExit::GuestReset);
        control.request_exit(VmExit::Stopped);
        assert_eq!(control.wait_exited(), VmExit::GuestReset);
        assert!(VmExit::GuestReset.is_clean());
        assert!(!VmExit::Failed("x".into()).is_clean());
    }
}
