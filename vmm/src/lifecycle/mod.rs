//! Lifecycle operations, each a function of the VM's state ([`VmCore`]) run by the
//! lifecycle actor (see [`crate::vmm`]), one at a time.
//!
//! - [`state`]: capture and apply the whole VM state (KVM and devices).
//! - [`image`]: guest RAM on a snapshot image (mapping it, its fault session).
//! - [`snapshot`]: snapshot, fork (a snapshot that becomes the fork point), persist.
//! - [`merge`]: merge (take a winner's state, lineage checked in snapshotd) and rollback.
//! - [`trim`]: give back private copies of guest pages equal to the image's.
//!
//! Every operation that needs the vCPUs still takes a pause hold of its own
//! ([`VmCore::paused`]) and gives it back before replying, so a client's `pause` is never
//! undone by an operation and an operation never runs on a VM a client resumed meanwhile.

pub mod debug;
pub mod image;
pub mod merge;
pub mod snapshot;
pub mod state;
pub mod trim;

use crossbeam_channel::Sender;
use fissile_proto::control::{ForkReply, MergeReply, SnapshotReply, TrimReply};

pub use self::merge::{MergeError, RollbackError, SwitchError};
pub use self::snapshot::SnapshotError;
pub use self::state::ApplyError;
pub use self::trim::TrimError;
use crate::vmm::{PauseError, VmCore};
use crate::vstate::vcpu::ControlError;

/// One request to the lifecycle actor, with the channel its reply goes to.
#[derive(Debug)]
pub(crate) enum Request {
    /// Take the clients' pause hold.
    Pause(Sender<Result<(), ControlError>>),
    /// Release the clients' pause hold.
    Resume(Sender<Result<(), ControlError>>),
    /// A (non-durable) snapshot.
    Snapshot(Sender<Result<SnapshotReply, SnapshotError>>),
    /// A snapshot that becomes the fork point.
    Fork(Sender<Result<ForkReply, SnapshotError>>),
    /// Take the state of a winner's snapshot.
    Merge {
        snapshot: String,
        reply: Sender<Result<MergeReply, MergeError>>,
    },
    /// Go back to a snapshot.
    Rollback {
        snapshot: String,
        reply: Sender<Result<MergeReply, RollbackError>>,
    },
    /// A durable snapshot, the VM left paused.
    Persist(Sender<Result<SnapshotReply, SnapshotError>>),
    /// Hash guest memory.
    MemoryHash(Sender<Result<(String, Vec<String>), PauseError>>),
    /// Drop private copies equal to the image's pages.
    Trim(Sender<Result<TrimReply, TrimError>>),
    /// [`debug::dump`] of the VM (paused for it).
    Debug(Sender<Result<String, PauseError>>),
    /// End the actor.
    Stop,
}

impl Request {
    /// The operation's name (what `status` shows as busy).
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Request::Pause(_) => "pause",
            Request::Resume(_) => "resume",
            Request::Snapshot(_) => "snapshot",
            Request::Fork(_) => "fork",
            Request::Merge { .. } => "merge",
            Request::Rollback { .. } => "rollback",
            Request::Persist(_) => "persist",
            Request::MemoryHash(_) => "memory_hash",
            Request::Trim(_) => "trim",
            Request::Debug(_) => "debug",
            Request::Stop => "stop",
        }
    }
}

/// Runs one lifecycle request (pause and resume are the actor's own).
pub(crate) fn run(core: &mut VmCore, req: Request) {
    // A reply nobody waits for any more (the caller timed out) is dropped.
    match req {
        Request::Snapshot(reply) => {
            let _ = reply.send(snapshot::snapshot(core));
        }
        Request::Fork(reply) => {
            let _ = reply.send(snapshot::fork(core));
        }
        Request::Merge { snapshot, reply } => {
            let _ = reply.send(merge::merge(core, &snapshot));
        }
        Request::Rollback { snapshot, reply } => {
            let _ = reply.send(merge::rollback(core, &snapshot));
        }
        Request::Persist(reply) => {
            let _ = reply.send(snapshot::persist(core));
        }
        Request::MemoryHash(reply) => {
            let hashed = core
                .paused(PauseError::Control, |core| {
                    core.step("hashing guest memory");
                    let (h, chunks) = core.ram.hash();
                    Ok((h.to_hex().to_string(), chunks))
                })
                .map(|(h, _)| h);
            let _ = reply.send(hashed);
        }
        Request::Trim(reply) => {
            let _ = reply.send(trim::trim(core));
        }
        Request::Debug(reply) => {
            let dumped = core
                .paused(PauseError::Control, |core| Ok(debug::dump(core)))
                .map(|(d, _)| d);
            let _ = reply.send(dumped);
        }
        Request::Pause(_) | Request::Resume(_) | Request::Stop => {}
    }
}
