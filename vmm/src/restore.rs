//! Building a VM from a snapshot in snapshotd (a new VMM process: restore, a fork child, a
//! resumed persistent space).
//!
//! 1. fetch and decode the VM-state blob (validated as untrusted input);
//! 2. map the snapshot's image privately as guest RAM; unless the image is complete, register
//!    it with userfaultfd and hand that to snapshotd, so pages arrive on first touch. A fork's
//!    layer over a complete image (what a fork child restores) is mapped as that image with
//!    the layer's own pages over it: nothing to fault in, no session;
//! 3. rebuild the VM and devices from the state's machine description and this VMM's own
//!    sockets, apply the state;
//! 4. start the vCPUs paused, then resume (unless asked to stay paused). vsock connections
//!    do not survive: the guest gets a transport reset, host clients reconnect.
//!
//! The state is applied before any thread of the new VM exists, and the caller starts the
//! control socket only on the returned [`Vmm`]: nothing can reach an unrestored VM.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fissile_snapshotd_client::client::{Client, ClientError};

use crate::builder::{BuildError, DeviceSpec, build_devices, serial_output, start};
use crate::lifecycle::ApplyError;
use crate::lifecycle::image::{self, ImageError};
use crate::memory::{GuestRam, MemoryError};
use crate::snapshot::{MicrovmState, STATE_BLOB, StateFormatError};
use crate::vmm::{PauseError, VmCore, Vmm};
use crate::vstate::persist::{KvmCaps, KvmStateError};
use crate::vstate::vcpu::{RunControl, Target, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// What to restore and with which host resources.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// Snapshot id.
    pub snapshot: String,
    /// snapshotd's socket.
    pub snapshotd: PathBuf,
    /// The root image (default: the path recorded in the snapshot).
    pub rootfs: Option<PathBuf>,
    /// This VMM's hybrid-vsock socket (required when the snapshot has a vsock device).
    pub vsock_uds: Option<PathBuf>,
    /// This VMM's tap (required when the snapshot has a network device).
    pub net_tap: Option<String>,
    /// Guest console log.
    pub serial_log: Option<PathBuf>,
    /// Guest console to stderr (without `serial_log`).
    pub serial_stderr: bool,
    /// Stay paused after restoring.
    pub start_paused: bool,
}

/// Restoring failed; each variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Talking to snapshotd failed (connect, info, blob, image).
    #[error("snapshotd: {0}")]
    Snapshotd(&'static str, #[source] ClientError),
    /// The VM-state blob is invalid.
    #[error("snapshot {0} has an invalid VM state")]
    State(String, #[source] StateFormatError),
    /// The snapshot needs a host resource that was not given.
    #[error("{0}")]
    Missing(&'static str),
    /// Guest memory.
    #[error("guest memory")]
    Memory(#[source] MemoryError),
    /// Attaching the image's fault session.
    #[error("attaching the snapshot image")]
    Image(#[source] ImageError),
    /// Creating the KVM VM or vCPUs.
    #[error("KVM VM")]
    Vm(#[source] VmError),
    /// Creating a vCPU.
    #[error("vCPU")]
    Vcpu(#[source] VcpuError),
    /// Probing KVM.
    #[error("probing KVM state support")]
    Kvm(#[source] KvmStateError),
    /// Building devices or starting threads.
    #[error("building the VM")]
    Build(#[source] BuildError),
    /// Applying the state.
    #[error("applying the snapshot state")]
    Apply(#[source] ApplyError),
    /// Resuming failed.
    #[error("resuming the restored VM")]
    Resume(#[source] PauseError),
    /// A pre-started VM has another number of vCPUs than the snapshot.
    #[error("this VMM was started for {prepared} vCPUs, the snapshot has {snapshot}")]
    Shape {
        /// vCPUs made ahead of time.
        prepared: usize,
        /// vCPUs in the snapshot.
        snapshot: u8,
    },
}

/// What a VM needs before it knows its snapshot: the KVM VM (with its interrupt controller
/// and timer) and its vCPUs. A pre-started VMM (`fissile-vmm --standby`) makes these while
/// it waits, so a restore into it skips them.
#[derive(Debug)]
pub struct Prepared {
    vm: Vm,
    caps: KvmCaps,
    vcpus: Vec<Arc<Mutex<kvm_ioctls::VcpuFd>>>,
    /// How long making them took.
    pub took: std::time::Duration,
}

impl Prepared {
    /// Makes a KVM VM with `vcpus` vCPUs.
    pub fn new(vcpus: u8) -> Result<Prepared, RestoreError> {
        let started = Instant::now();
        let vm = Vm::new(vcpus).map_err(RestoreError::Vm)?;
        let caps = KvmCaps::probe(vm.kvm()).map_err(RestoreError::Kvm)?;
        let mut fds = Vec::with_capacity(usize::from(vcpus));
        for id in 0..vcpus {
            let fd = vm
                .fd()
                .create_vcpu(u64::from(id))
                .map_err(|e| RestoreError::Vcpu(VcpuError::Create(id, e)))?;
            fds.push(Arc::new(Mutex::new(fd)));
        }
        Ok(Prepared {
            vm,
            caps,
            vcpus: fds,
            took: started.elapsed(),
        })
    }

    /// The number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.vcpus.len()
    }
}

/// Restores snapshot `cfg.snapshot` into a new VM in this process.
pub fn restore(cfg: RestoreConfig) -> Result<Vmm, RestoreError> {
    restore_into(cfg, None)
}

/// Restores snapshot `cfg.snapshot` into `prepared` (made for as many vCPUs as the snapshot
/// has; otherwise the restore fails with [`RestoreError::Shape`]) or, without it, into a VM
/// made here.
pub fn restore_into(cfg: RestoreConfig, prepared: Option<Prepared>) -> Result<Vmm, RestoreError> {
    let started = Instant::now();
    let mut client =
        Client::connect(&cfg.snapshotd).map_err(|e| RestoreError::Snapshotd("connect", e))?;
    let blob = client
        .get_blob(&cfg.snapshot, STATE_BLOB)
        .map_err(|e| RestoreError::Snapshotd("reading the VM state", e))?;
    let state =
        MicrovmState::decode(&blob).map_err(|e| RestoreError::State(cfg.snapshot.clone(), e))?;
    let t_state = started.elapsed();
    let machine = state.machine.clone();
    if machine.guest_cid.is_some() && cfg.vsock_uds.is_none() {
        return Err(RestoreError::Missing(
            "the snapshot has a vsock device: give a vsock socket (--vsock-uds)",
        ));
    }

    if machine.net_mac.is_some() && cfg.net_tap.is_none() {
        return Err(RestoreError::Missing(
            "the snapshot has a network device: give a tap (--net-tap)",
        ));
    }
    let prepared_by_standby = prepared.is_some();
    let Prepared {
        vm, caps, vcpus, ..
    } = match prepared {
        Some(p) if p.vcpus() == usize::from(machine.vcpus) => p,
        Some(p) => {
            return Err(RestoreError::Shape {
                prepared: p.vcpus(),
                snapshot: machine.vcpus,
            });
        }
        None => Prepared::new(machine.vcpus)?,
    };

    let layered = image::open_layered(&mut client, &cfg.snapshotd, &cfg.snapshot);
    let layers = layered.as_ref().map_or(0, |l| l.layers.len());
    let (ram, complete) = match layered {
        Some(l) => (
            GuestRam::from_layers(
                &cfg.snapshot,
                l.base.memfd,
                l.base.memory_size,
                l.layers,
                machine.mem_size,
            )
            .map_err(RestoreError::Memory)?,
            true,
        ),
        None => {
            let image = client
                .open_image(&cfg.snapshot)
                .map_err(|e| RestoreError::Snapshotd("opening the image", e))?;
            let complete = image.complete;
            let mut ram = GuestRam::from_image(
                &cfg.snapshot,
                image
                    .memfd
                    .try_clone()
                    .map_err(|e| RestoreError::Memory(MemoryError::MemoryBackingFile("dup", e)))?,
                image.memory_size,
                machine.mem_size,
            )
            .map_err(RestoreError::Memory)?;
            image::attach(&mut ram, &cfg.snapshotd, &cfg.snapshot, image, false)
                .map_err(RestoreError::Image)?;
            (ram, complete)
        }
    };
    let t_memory = started.elapsed();

    vm.register_memory(ram.memory()).map_err(RestoreError::Vm)?;
    let rootfs = cfg.rootfs.clone().unwrap_or_else(|| machine.rootfs.clone());
    let serial =
        serial_output(cfg.serial_log.as_deref(), cfg.serial_stderr).map_err(RestoreError::Build)?;
    let spec = DeviceSpec {
        rootfs: &rootfs,
        scratch: None,
        vsock: match (machine.guest_cid, cfg.vsock_uds.as_deref()) {
            (Some(cid), Some(uds)) => Some((cid, uds)),
            _ => None,
        },
        rng: machine.rng,
        net: match (machine.net_mac, cfg.net_tap.as_deref()) {
            (Some(mac), Some(tap)) => Some((tap, mac)),
            _ => None,
        },
    };
    let bus = build_devices(&vm, ram.memory(), serial, &spec).map_err(RestoreError::Build)?;
    let mut core = VmCore::new(
        Arc::new(RunControl::new(vcpus.len(), Target::Paused)),
        machine,
        vm,
        caps,
        vcpus,
        bus,
        ram,
        Some(cfg.snapshotd.clone()),
        false,
    );
    core.start_held();
    // Devices stay still from the moment their state is applied until the VM resumes.
    core.quiesce_devices(true);
    core.apply_state(&state, true)
        .map_err(RestoreError::Apply)?;
    let vmm = start(core, started).map_err(RestoreError::Build)?;
    let handle = vmm.handle();
    let t_built = started.elapsed();
    if !cfg.start_paused {
        handle.resume().map_err(RestoreError::Resume)?;
    }
    tracing::info!(
        snapshot = %cfg.snapshot, complete_image = complete, layers, standby = prepared_by_standby,
        state_ms = t_state.as_secs_f64() * 1e3,
        memory_ms = t_memory.as_secs_f64() * 1e3,
        built_ms = t_built.as_secs_f64() * 1e3,
        "restored"
    );
    Ok(vmm)
}
