//! Taking a snapshot of a running VM, and applying VM state to a live one (merge).
//!
//! Sequence (the VM paused throughout, [`PauseGuard`]):
//! 1. capture the VM state: KVM (irqchip, PIT, clock, every vCPU) and devices;
//! 2. hand guest memory to snapshotd as the new snapshot's image, without copying what
//!    need not be copied:
//!    * a **fresh** VM's memfd is switched to a private view, sealed and *adopted* whole;
//!    * an **image-backed** VM (restored, forked, merged) copies only the pages it dirtied
//!      since its base into a sparse memfd, adopted as a layer on the base snapshot;
//! 3. the VM continues on a copy-on-write view of the new snapshot (its dirty set is empty
//!    again, its private pages are released); pages not in the new image yet fault to
//!    snapshotd.
//!
//! With `durable`, the reply waits until the store holds the snapshot; without, it returns
//! as soon as the image is usable (fork) and the store ingests it in the background.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use fissile_proto::control::{ErrorKind, SnapshotReply};
use fissile_proto::snapshotd::Region;
use fissile_snapshotd::client::{self as sd, Client, ClientError, CreateOptions, OpenedImage};

use super::{MicrovmState, STATE_BLOB, StateFormatError};
use crate::devices::legacy::serial::SerialStateError;
use crate::devices::virtio::persist::TransportStateError;
use crate::memory::{Backing, GuestRam, ImageFaults, MemoryError, PAGE_SIZE, create_memfd};
use crate::vmm::{PauseGuard, VmmShared, lock};
use crate::vstate::persist::{KvmStateError, VcpuState, VmState};
use crate::vstate::vcpu::{ControlError, VmExit, lock_vcpu};

/// Taking a snapshot failed; each variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VMM was started without a snapshotd socket.
    #[error("no snapshotd socket configured (start fissile-vmm with --snapshotd)")]
    NoSnapshotd,
    /// A writable scratch disk would not be in the snapshot.
    #[error("this VM has a writable scratch disk, which snapshots do not capture")]
    Scratch,
    /// Pausing failed (the VM exited).
    #[error("pausing the VM")]
    Pause(#[source] ControlError),
    /// Capturing KVM state failed.
    #[error("capturing KVM state")]
    Kvm(#[source] KvmStateError),
    /// Encoding the state failed.
    #[error("encoding the VM state")]
    Encode(#[source] StateFormatError),
    /// Preparing guest memory failed.
    #[error("preparing guest memory")]
    Memory(#[source] MemoryError),
    /// Copying dirty pages into the layer memfd failed.
    #[error("copying dirty pages")]
    Copy(#[source] std::io::Error),
    /// Sealing the memfd for adoption failed.
    #[error("sealing guest memory for snapshotd")]
    Seal(#[source] std::io::Error),
    /// snapshotd refused or failed.
    #[error("snapshotd")]
    Store(#[source] ClientError),
    /// Switching to the new snapshot's image failed; the VM was stopped because its memory
    /// may be half switched.
    #[error("switching guest memory to the new snapshot (the VM was stopped)")]
    Switch(#[source] Box<SnapshotError>),
}

impl SnapshotError {
    /// The control-protocol kind of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SnapshotError::NoSnapshotd | SnapshotError::Scratch => ErrorKind::BadRequest,
            SnapshotError::Pause(_) => ErrorKind::Conflict,
            _ => ErrorKind::Internal,
        }
    }
}

/// Applying a snapshot's state to this VM failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
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

/// Connects to snapshotd.
pub(crate) fn connect(socket: Option<&Path>) -> Result<Client, SnapshotError> {
    let socket = socket.ok_or(SnapshotError::NoSnapshotd)?;
    Client::connect(socket).map_err(SnapshotError::Store)
}

/// What a failed page server does to this VMM: the guest's vCPUs may be blocked inside a
/// fault that will never be served, which no signal interrupts, so the process exits.
pub(crate) fn page_server_failed(msg: &str) {
    tracing::error!(error = msg, "the page server failed; this VM cannot go on");
    eprintln!("fissile-vmm: the page server (snapshotd) failed: {msg}; stopping");
    std::process::exit(4);
}

/// Maps `image` of `snapshot` as guest RAM's new backing, with a fault session unless the
/// image is complete. The VM must be paused (or not started yet).
pub(crate) fn attach_image(
    ram: &mut GuestRam,
    socket: &Path,
    snapshot: &str,
    image: OpenedImage,
    switch: bool,
) -> Result<(), SnapshotError> {
    if switch {
        ram.switch_to_image(&image.memfd, image.memory_size)
            .map_err(SnapshotError::Memory)?;
    }
    let faults = if image.complete {
        None
    } else {
        let uffd = sd::new_uffd().map_err(SnapshotError::Store)?;
        let mut regions = Vec::new();
        for (addr, len, offset) in ram.host_ranges() {
            sd::register_missing_at(&uffd, addr, len).map_err(SnapshotError::Store)?;
            regions.push(Region {
                base: addr as u64,
                len: len as u64,
                snapshot: snapshot.to_string(),
                offset,
            });
        }
        let session = Client::connect(socket)
            .and_then(|c| c.serve_faults(&uffd, regions, Some(Box::new(page_server_failed))))
            .map_err(SnapshotError::Store)?;
        Some(ImageFaults { session, uffd })
    };
    ram.set_image(snapshot, image.memfd, faults);
    Ok(())
}

impl VmmShared {
    /// Captures the whole VM state (vCPUs and devices must be paused).
    pub(crate) fn capture_state(&self) -> Result<MicrovmState, KvmStateError> {
        let vm = VmState::capture(self.vm.fd())?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (i, v) in self.vcpus.iter().enumerate() {
            vcpus.push(VcpuState::capture(&lock_vcpu(v), i, &self.caps)?);
        }
        let serial = lock(self.bus.serial()).save_state();
        let mmio = self
            .bus
            .mmio_slots()
            .iter()
            .map(|s| lock(&s.transport).save_state())
            .collect();
        Ok(MicrovmState {
            machine: self.machine.clone(),
            vm,
            vcpus,
            serial,
            mmio,
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
            s.apply(&lock_vcpu(v), i, fresh).map_err(ApplyError::Kvm)?;
        }
        lock(self.bus.serial())
            .restore_state(&state.serial)
            .map_err(ApplyError::Serial)?;
        for (slot, (s, st)) in self.bus.mmio_slots().iter().zip(&state.mmio).enumerate() {
            lock(&s.transport)
                .restore_state(st)
                .map_err(|source| ApplyError::Transport { slot, source })?;
        }
        Ok(())
    }

    /// Snapshots the VM into snapshotd; it continues on the new snapshot. See the module docs.
    pub fn snapshot(&self, durable: bool) -> Result<SnapshotReply, SnapshotError> {
        let _op = lock(&self.ops);
        self.snapshot_locked(durable)
    }

    pub(crate) fn snapshot_locked(&self, durable: bool) -> Result<SnapshotReply, SnapshotError> {
        if self.scratch {
            return Err(SnapshotError::Scratch);
        }
        let socket = self.snapshotd.clone().ok_or(SnapshotError::NoSnapshotd)?;
        let mut client = connect(Some(&socket))?;
        let mut steps: Vec<(String, f64)> = Vec::new();
        let mut t = Instant::now();
        let mut step = |name: &str, t: &mut Instant| {
            steps.push((name.to_string(), t.elapsed().as_secs_f64() * 1e3));
            *t = Instant::now();
        };
        let guard = PauseGuard::new(self).map_err(SnapshotError::Pause)?;
        let state = self.capture_state().map_err(SnapshotError::Kvm)?;
        let blob = state.encode().map_err(SnapshotError::Encode)?;
        step("state", &mut t);

        let mut ram = lock(&self.ram);
        let size = ram.size();
        let mut opts = CreateOptions {
            memory_size: size,
            adopt: true,
            no_wait_durable: !durable,
            blobs: vec![(STATE_BLOB.to_string(), blob)],
            ..CreateOptions::default()
        };
        let (id, parent, dirty_pages) = match ram.backing() {
            Backing::Fresh { .. } => {
                let memfd = ram.freeze_fresh().map_err(SnapshotError::Memory)?;
                step("memory", &mut t);
                let created = sd::seal_for_adoption(&memfd)
                    .map_err(SnapshotError::Seal)
                    .and_then(|()| {
                        client
                            .create_snapshot(&memfd, &opts)
                            .map_err(SnapshotError::Store)
                    });
                let id = match created {
                    Ok(id) => id,
                    Err(e) => {
                        // Keep the VM correct: without a snapshot its RAM must be its own
                        // writable memory again.
                        if let Err(u) = ram.unfreeze() {
                            self.control
                                .request_exit(VmExit::Failed(format!("unfreezing memory: {u}")));
                        }
                        return Err(e);
                    }
                };
                step("store", &mut t);
                let pages = crate::memory::dirty::data_ranges(&memfd, size)
                    .map(|r| r.iter().map(|(a, b)| (b - a) / PAGE_SIZE).sum())
                    .unwrap_or(0);
                // The mapping already is a private view of exactly this memfd.
                ram.set_image(&id, memfd, None);
                (id, None, pages)
            }
            Backing::Image { snapshot: base, .. } => {
                let base = base.clone();
                let dirty = ram.dirty_pages().map_err(SnapshotError::Memory)?;
                let layer = create_memfd("fissile-layer", size).map_err(SnapshotError::Memory)?;
                copy_pages(&ram, &dirty, &layer)?;
                sd::seal_for_adoption(&layer).map_err(SnapshotError::Seal)?;
                step("memory", &mut t);
                opts.parent = Some(base.clone());
                let n = dirty.len() as u64;
                opts.dirty_pages = Some(dirty);
                let id = client
                    .create_snapshot(&layer, &opts)
                    .map_err(SnapshotError::Store)?;
                step("store", &mut t);
                let switched = client
                    .open_image(&id)
                    .map_err(SnapshotError::Store)
                    .and_then(|img| attach_image(&mut ram, &socket, &id, img, true));
                if let Err(e) = switched {
                    self.control
                        .request_exit(VmExit::Failed(format!("switching to snapshot {id}: {e}")));
                    return Err(SnapshotError::Switch(Box::new(e)));
                }
                step("switch", &mut t);
                (id, Some(base), n)
            }
        };
        drop(ram);
        let paused_ms = guard.elapsed_ms();
        drop(guard);
        tracing::info!(snapshot = %id, ?parent, dirty_pages, paused_ms, ?steps, "snapshot taken");
        Ok(SnapshotReply {
            id,
            parent,
            durable,
            dirty_pages,
            paused_ms,
            steps_ms: steps,
        })
    }
}

/// Copies guest pages `pages` into the same offsets of `dst`.
fn copy_pages(ram: &GuestRam, pages: &[u64], dst: &File) -> Result<(), SnapshotError> {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for &p in pages {
        ram.read_page(p, &mut buf).map_err(SnapshotError::Memory)?;
        dst.write_all_at(&buf, p * PAGE_SIZE)
            .map_err(SnapshotError::Copy)?;
    }
    Ok(())
}
