//! Taking a snapshot of a running VM; fork (a snapshot that becomes the fork point); persist
//! (a durable snapshot, the VM left paused).
//!
//! Sequence (the VM paused throughout, a hold of its own):
//! 1. capture the VM state: KVM (irqchip, PIT, clock, every vCPU) and devices;
//! 2. hand guest memory to snapshotd as the new snapshot's image, without copying what
//!    need not be copied:
//!    * a **fresh** VM's memfd is switched to a private view, sealed and *adopted* whole;
//!    * an **image-backed** VM (restored, forked, merged) copies only the pages it dirtied
//!      since its base into a sparse memfd, adopted as a layer on the base snapshot;
//! 3. the VM continues on a copy-on-write view of the new snapshot (its dirty set is empty
//!    again, its private pages are released): in place where RAM is a complete view (the
//!    new layer mapped over the pages it wrote, the rest of its working set left mapped),
//!    else remapped, and pages not in the new image yet fault to snapshotd.
//!
//! The image is usable as soon as snapshotd adopted it; the store ingests it in the
//! background. A durable snapshot waits for that *after* the VM runs again (the handle does,
//! off the lifecycle queue); persist waits with the VM still paused, since it stops after.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use fissile_proto::control::{ErrorKind, ForkReply, SnapshotReply};
use fissile_proto::snapshotd::{MAX_PAGES_PER_MESSAGE, page_runs};
use fissile_snapshotd_client::client::{self as sd, Client, ClientError, CreateOptions};

use super::image::{self, ImageError};
use crate::lifecycle::state::CaptureError;
use crate::memory::{Backing, GuestRam, Layer, MemoryError, PAGE_SIZE, create_memfd};
use crate::snapshot::{STATE_BLOB, StateFormatError};
use crate::vmm::{QueueError, VmCore};
use crate::vstate::vcpu::{ControlError, VmExit};

/// Taking a snapshot failed; each variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VMM was started without a snapshotd socket.
    #[error("no snapshotd socket configured (start fissile-vmm with --snapshotd)")]
    NoSnapshotd,
    /// A writable scratch disk would not be in the snapshot.
    #[error("this VM has a writable scratch disk, which snapshots do not capture")]
    Scratch,
    /// Pausing failed (the VM exited, or a vCPU did not park).
    #[error("pausing the VM")]
    Pause(#[source] ControlError),
    /// Capturing the VM state failed.
    #[error("capturing the VM state")]
    State(#[source] CaptureError),
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
    #[error("switching guest memory to the new snapshot {0} (the VM was stopped)")]
    Switch(String, #[source] ImageError),
    /// The snapshot was taken but the store could not make it durable.
    #[error("waiting until the store holds the snapshot")]
    Durable(#[source] ClientError),
    /// The request was not answered.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl SnapshotError {
    /// The control-protocol kind of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SnapshotError::NoSnapshotd | SnapshotError::Scratch => ErrorKind::BadRequest,
            SnapshotError::Pause(ControlError::PauseTimeout(_)) => ErrorKind::Internal,
            SnapshotError::Pause(_) => ErrorKind::Conflict,
            SnapshotError::Queue(q) => q.kind(),
            _ => ErrorKind::Internal,
        }
    }
}

/// A snapshot (not waiting for durability); the VM continues on it.
pub(crate) fn snapshot(core: &mut VmCore) -> Result<SnapshotReply, SnapshotError> {
    let (socket, mut client) = prepare(core)?;
    let (mut reply, paused_ms) = core.paused(SnapshotError::Pause, |core| {
        take(core, &mut client, &socket)
    })?;
    reply.paused_ms = paused_ms;
    core.lineage.took(&reply.id);
    tracing::info!(snapshot = %reply.id, parent = ?reply.parent, dirty_pages = reply.dirty_pages,
        paused_ms, steps = ?reply.steps_ms, "snapshot taken");
    Ok(reply)
}

/// A snapshot that becomes this VM's fork point: the caller restores children from it, and
/// one of them may later be merged back.
pub(crate) fn fork(core: &mut VmCore) -> Result<ForkReply, SnapshotError> {
    let snapshot = snapshot(core)?;
    core.lineage.fork = Some(snapshot.id.clone());
    core.lineage.own.clear();
    Ok(ForkReply { snapshot })
}

/// A durable snapshot; the VM stays paused (the VMM stops once the reply is sent). On
/// failure the VM runs on as before (unless a client had paused it).
pub(crate) fn persist(core: &mut VmCore) -> Result<SnapshotReply, SnapshotError> {
    let (socket, mut client) = prepare(core)?;
    let was_paused = core.client_paused();
    core.pin_paused().map_err(SnapshotError::Pause)?;
    let since = Instant::now();
    let progress = core.step.clone();
    let taken = take(core, &mut client, &socket).and_then(|mut reply| {
        progress.set(Some("waiting until the store holds the snapshot".into()));
        client
            .wait_durable(&reply.id)
            .map_err(SnapshotError::Durable)?;
        reply.durable = true;
        Ok(reply)
    });
    match taken {
        Ok(mut reply) => {
            reply.paused_ms = since.elapsed().as_secs_f64() * 1e3;
            tracing::info!(snapshot = %reply.id, paused_ms = reply.paused_ms, "persisted");
            Ok(reply)
        }
        Err(e) => {
            core.unpin_paused(was_paused);
            Err(e)
        }
    }
}

fn prepare(core: &VmCore) -> Result<(std::path::PathBuf, Client), SnapshotError> {
    if core.scratch {
        return Err(SnapshotError::Scratch);
    }
    let socket = core.snapshotd.clone().ok_or(SnapshotError::NoSnapshotd)?;
    let client = image::connect(&socket)?;
    Ok((socket, client))
}

/// Steps 1-3 of the module docs; the VM is paused.
fn take(
    core: &mut VmCore,
    client: &mut Client,
    socket: &Path,
) -> Result<SnapshotReply, SnapshotError> {
    let mut steps: Vec<(String, f64)> = Vec::new();
    let mut t = Instant::now();
    let mut step = |name: &str, t: &mut Instant| {
        steps.push((name.to_string(), t.elapsed().as_secs_f64() * 1e3));
        *t = Instant::now();
    };
    let progress = core.step.clone();
    let at = |step: &str| progress.set(Some(step.to_string()));
    at("capturing the VM state");
    let state = core.capture_state().map_err(SnapshotError::State)?;
    let blob = state.encode().map_err(SnapshotError::Encode)?;
    step("state", &mut t);

    let control = core.control.clone();
    let ram = &mut core.ram;
    let size = ram.size();
    let mut opts = CreateOptions {
        memory_size: size,
        adopt: true,
        no_wait_durable: true,
        blobs: vec![(STATE_BLOB.to_string(), blob)],
        ..CreateOptions::default()
    };
    let (id, parent, dirty_pages) = match ram.backing() {
        Backing::Fresh { .. } => {
            at("freezing guest memory");
            let memfd = ram.freeze_fresh().map_err(SnapshotError::Memory)?;
            step("memory", &mut t);
            at("storing the snapshot");
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
                        control.request_exit(VmExit::Failed(format!("unfreezing memory: {u}")));
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
            at("copying dirty pages");
            let (dirty, resident) = ram
                .dirty_and_resident_pages()
                .map_err(SnapshotError::Memory)?;
            let layer = create_memfd("fissile-layer", size).map_err(SnapshotError::Memory)?;
            copy_pages(ram, &dirty, &layer)?;
            sd::seal_for_adoption(&layer).map_err(SnapshotError::Seal)?;
            step("memory", &mut t);
            opts.parent = Some(base.clone());
            let n = dirty.len() as u64;
            let runs = page_runs(&dirty);
            opts.dirty_pages = Some(dirty);
            // The pages this VM had in memory (its working set since its image was mapped)
            // as the snapshot's first-touch order: whoever maps the snapshot next — this VM
            // itself, a merging parent, a restored child — has snapshotd bring them in from
            // the start of its fault session instead of taking a fault for each. At most one
            // message of them (the lowest 256 MiB's), so a VM with gigabytes in memory costs
            // its pause one more round trip, not dozens.
            opts.touch_order = resident;
            opts.touch_order.truncate(MAX_PAGES_PER_MESSAGE);
            at("storing the snapshot");
            let id = client
                .create_snapshot(&layer, &opts)
                .map_err(SnapshotError::Store)?;
            step("store", &mut t);
            at("switching memory to the snapshot");
            // In place where RAM is a complete view: the new layer is mapped over the pages
            // the VM wrote (from our own memfd), and the rest of its working set stays
            // mapped. Else, where RAM is a complete view past the layer limits, the snapshot
            // as snapshotd hands it out (layers over a complete image, flattened where
            // snapshotd flattened them); else (RAM has a fault session, so no layer over
            // its image opens without one) the snapshot's image with a fault session.
            let complete = ram.complete_view();
            let in_place = complete.is_some_and(|(_, ours)| image::fits_over(ours, 1, runs.len()));
            let switched = match (in_place, complete.is_some(), layer.try_clone()) {
                (true, _, Ok(pages)) => ram
                    .advance(&id, vec![Layer { pages, runs }], &[])
                    .map_err(ImageError::Memory),
                (_, true, _) => image::open_for_switch(client, socket, &id)
                    .map_err(ImageError::Open)
                    .and_then(|to| image::switch(ram, socket, &id, to).map(|_| ())),
                _ => client
                    .open_image(&id)
                    .map_err(ImageError::Open)
                    .and_then(|img| image::attach(ram, socket, &id, img, true)),
            };
            if let Err(e) = switched {
                control.request_exit(VmExit::Failed(format!("switching to snapshot {id}: {e}")));
                return Err(SnapshotError::Switch(id, e));
            }
            step("switch", &mut t);
            (id, Some(base), n)
        }
    };
    Ok(SnapshotReply {
        id,
        parent,
        durable: false,
        dirty_pages,
        paused_ms: 0.0,
        steps_ms: steps,
    })
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
