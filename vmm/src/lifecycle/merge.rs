//! merge_into and rollback: this VM takes the state (memory, vCPUs, devices) of another
//! snapshot and keeps its own identity and sockets.
//!
//! **merge(snapshot)**: `snapshot` is a winner's (a child of this VM's latest fork took it,
//! so it holds the child's dirty pages layered on the fork snapshot). Whether it descends
//! from the fork point is read from snapshotd's records, walking parent links from the
//! snapshot itself, never from what a peer says. A fork is merged at most once (Podflare's
//! semantics): afterwards merging is `not_found`; merging a snapshot this VM took itself is
//! a self-merge, `bad_request`.
//!
//! **rollback(snapshot)**: the same switch without the lineage check; the orchestrator
//! decides which snapshots a sandbox may go back to (its own earlier ones).
//!
//! The switch itself: fetch and validate the snapshot's state blob, open its image (or its
//! layers over a complete image: see `image::open_layered`), pause, map it in place of
//! guest RAM, apply the state, resume. A winner's layers lie over the fork snapshot this VM
//! runs on, so a merge usually moves memory in place (`image::switch`): the pages this VM
//! wrote since the fork are dropped and the winner's own pages mapped over, and the rest of
//! the guest's working set stays mapped. If mapping or applying fails half way the VM is
//! stopped, since its state would be mixed.

use std::time::Instant;

use fissile_proto::control::{ErrorKind, MergeReply};
use fissile_snapshotd_client::client::{Client, ClientError, made_over};

use super::SnapshotError;
use super::image::{self, ImageError};
use super::state::ApplyError;
use crate::snapshot::{MicrovmState, STATE_BLOB, StateFormatError};
use crate::vmm::{QueueError, VmCore};
use crate::vstate::vcpu::{ControlError, VmExit};

/// Deepest snapshot chain walked when checking that a winner descends from the fork.
const MAX_LINEAGE_DEPTH: usize = 64;

/// Switching this VM to another snapshot's state failed.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The VMM was started without a snapshotd socket.
    #[error("no snapshotd socket configured (start fissile-vmm with --snapshotd)")]
    NoSnapshotd,
    /// Reading the snapshot from snapshotd failed.
    #[error("snapshotd: {0}")]
    Store(&'static str, #[source] ClientError),
    /// Its state is invalid.
    #[error("the snapshot's VM state")]
    State(#[source] StateFormatError),
    /// Pausing failed.
    #[error("pausing this VM")]
    Pause(#[source] ControlError),
    /// Mapping its image failed; this VM was stopped (its memory may be half switched).
    #[error("switching memory (this VM was stopped)")]
    Image(#[source] ImageError),
    /// Applying its state failed; this VM was stopped (its state is mixed).
    #[error("applying the snapshot's state (this VM was stopped)")]
    Apply(#[source] ApplyError),
}

impl SwitchError {
    fn kind(&self) -> ErrorKind {
        match self {
            SwitchError::NoSnapshotd => ErrorKind::BadRequest,
            SwitchError::Store(_, ClientError::Daemon { code, .. })
                if *code == fissile_proto::snapshotd::ErrorCode::NotFound =>
            {
                ErrorKind::NotFound
            }
            SwitchError::State(_) => ErrorKind::BadRequest,
            SwitchError::Pause(ControlError::PauseTimeout(_)) => ErrorKind::Internal,
            SwitchError::Pause(_) => ErrorKind::Conflict,
            _ => ErrorKind::Internal,
        }
    }
}

/// merge failed.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The snapshot is one this VM took itself.
    #[error("a VM cannot merge into itself (snapshot {0} is this VM's own)")]
    SelfMerge(String),
    /// No fork to merge from (never forked, or already merged).
    #[error("this VM has no unmerged fork (never forked, or its fork was merged already)")]
    NoFork,
    /// The snapshot does not descend from this VM's fork.
    #[error("snapshot {0} is not a child of this VM's current fork")]
    NotChild(String),
    /// Reading the lineage from snapshotd failed.
    #[error("reading the snapshot's lineage from snapshotd")]
    Lineage(#[source] ClientError),
    /// The switch failed.
    #[error(transparent)]
    Switch(#[from] SwitchError),
    /// The request was not answered.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl MergeError {
    /// The control-protocol kind of this failure (HTTP: 400, 404, 409, 500).
    pub fn kind(&self) -> ErrorKind {
        match self {
            MergeError::SelfMerge(_) => ErrorKind::BadRequest,
            MergeError::NoFork | MergeError::NotChild(_) => ErrorKind::NotFound,
            MergeError::Lineage(ClientError::Daemon { code, .. })
                if *code == fissile_proto::snapshotd::ErrorCode::NotFound =>
            {
                ErrorKind::NotFound
            }
            MergeError::Lineage(_) => ErrorKind::Internal,
            MergeError::Switch(e) => e.kind(),
            MergeError::Queue(q) => q.kind(),
        }
    }
}

/// rollback failed.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// The switch failed.
    #[error(transparent)]
    Switch(#[from] SwitchError),
    /// The request was not answered.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl RollbackError {
    /// The control-protocol kind of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RollbackError::Switch(e) => e.kind(),
            RollbackError::Queue(q) => q.kind(),
        }
    }
}

/// Takes the state of the winner's `snapshot` (see the module docs).
pub(crate) fn merge(core: &mut VmCore, snapshot: &str) -> Result<MergeReply, MergeError> {
    let t0 = Instant::now();
    let fork = core.lineage.fork.clone().ok_or(MergeError::NoFork)?;
    if core.lineage.own.iter().any(|s| s == snapshot) {
        return Err(MergeError::SelfMerge(snapshot.to_string()));
    }
    let mut client = connect(core)?;
    // The lineage as the store records it, starting from the snapshot itself.
    let mut cur = made_over(&client.info(snapshot).map_err(MergeError::Lineage)?);
    let mut depth = 0;
    loop {
        match cur {
            Some(ref p) if *p == fork => break,
            Some(ref p) if depth < MAX_LINEAGE_DEPTH => {
                cur = made_over(&client.info(p).map_err(MergeError::Lineage)?);
                depth += 1;
            }
            _ => return Err(MergeError::NotChild(snapshot.to_string())),
        }
    }
    let (paused_ms, in_place) = switch(core, &mut client, snapshot)?;
    core.lineage.fork = None;
    core.lineage.own.clear();
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    tracing::info!(snapshot, paused_ms, total_ms, in_place, "merged");
    Ok(MergeReply {
        snapshot: snapshot.to_string(),
        paused_ms,
        total_ms,
        in_place,
    })
}

/// Returns this VM to `snapshot` (see the module docs).
pub(crate) fn rollback(core: &mut VmCore, snapshot: &str) -> Result<MergeReply, RollbackError> {
    let t0 = Instant::now();
    let mut client = connect(core)?;
    let (paused_ms, in_place) = switch(core, &mut client, snapshot)?;
    core.lineage.fork = None;
    core.lineage.own.clear();
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    tracing::info!(snapshot, paused_ms, total_ms, in_place, "rolled back");
    Ok(MergeReply {
        snapshot: snapshot.to_string(),
        paused_ms,
        total_ms,
        in_place,
    })
}

fn connect(core: &VmCore) -> Result<Client, SwitchError> {
    let socket = core.snapshotd.as_deref().ok_or(SwitchError::NoSnapshotd)?;
    image::connect(socket).map_err(|e| match e {
        SnapshotError::Store(c) => SwitchError::Store("connecting", c),
        _ => SwitchError::NoSnapshotd,
    })
}

/// Maps `snapshot`'s image and applies its state; returns how long the VM was paused and
/// whether memory moved in place.
fn switch(
    core: &mut VmCore,
    client: &mut Client,
    snapshot: &str,
) -> Result<(f64, bool), SwitchError> {
    let socket = core.snapshotd.clone().ok_or(SwitchError::NoSnapshotd)?;
    core.step("reading the snapshot");
    let blob = client
        .get_blob(snapshot, STATE_BLOB)
        .map_err(|e| SwitchError::Store("reading the VM state", e))?;
    let state = MicrovmState::decode(&blob).map_err(SwitchError::State)?;
    let image = image::open_for_switch(client, &socket, snapshot)
        .map_err(|e| SwitchError::Store("opening the image", e))?;
    let (in_place, paused_ms) = core.paused(SwitchError::Pause, |core| {
        core.step("switching memory to the snapshot");
        let in_place = match image::switch(&mut core.ram, &socket, snapshot, image) {
            Ok(in_place) => in_place,
            Err(e) => {
                core.control
                    .request_exit(VmExit::Failed(format!("switching memory: {e}")));
                return Err(SwitchError::Image(e));
            }
        };
        core.step("applying the snapshot's VM state");
        if let Err(e) = core.apply_state(&state, false) {
            core.control
                .request_exit(VmExit::Failed(format!("applying state: {e}")));
            return Err(SwitchError::Apply(e));
        }
        Ok(in_place)
    })?;
    Ok((paused_ms, in_place))
}
