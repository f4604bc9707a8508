//! The VMM control socket protocol.
//!
//! Encoding: JSON lines over a unix stream socket. The client writes one request object per
//! line and reads exactly one response line per request. Requests are tagged by `op`:
//!
//! ```text
//! {"op":"status"}    -> {"ok":true,"status":{"state":"running","uptime_ms":1234,"vcpus":2,"mem_mib":512,...}}
//! {"op":"pause"}     -> {"ok":true}
//! {"op":"resume"}    -> {"ok":true}
//! {"op":"shutdown"}  -> {"ok":true}
//! {"op":"snapshot","durable":true}
//!                    -> {"ok":true,"snapshot":{"id":"...","durable":true,"dirty_pages":N,...}}
//! {"op":"fork"}     -> {"ok":true,"fork":{"snapshot":{"id":"...",...}}}
//! {"op":"merge","snapshot":"<the winner's snapshot>"}
//!                    -> {"ok":true,"merge":{"snapshot":"...","paused_ms":..,...}}
//! {"op":"rollback","snapshot":"<an earlier snapshot of this VM>"}
//!                    -> {"ok":true,"merge":{"snapshot":"...",...}}
//! {"op":"persist"}   -> {"ok":true,"snapshot":{...}} then the VMM stops
//! {"op":"memory_hash"} -> {"ok":true,"memory_hash":"<blake3 hex>"}
//! {"op":"trim"}      -> {"ok":true,"trim":{"private_pages":N,"dropped_pages":M,"paused_ms":..}}
//! anything bad       -> {"ok":false,"error":"...","error_kind":"bad_request"}
//! ```
//!
//! # Concurrency
//! Any number of clients may be connected (up to the VMM's cap); lifecycle operations
//! (everything but `status` and `shutdown`) run one at a time in the order they arrive, so
//! a `resume` sent during a snapshot waits until the snapshot is done. `pause`/`resume` from
//! clients are one hold: operations that pause internally add their own and never resume a
//! VM a client paused. `status` never waits; its `busy` field names the operation running.
//!
//! # Fork and merge
//! The VMM never starts processes. `fork` takes the fork snapshot and marks it as this VM's
//! fork point; the orchestrator starts the children (`fissile-vmm --restore <id>`). To merge,
//! the orchestrator asks the winner for a `snapshot` and gives its id to the parent's
//! `merge`: the parent checks in snapshotd, never by asking a peer, that the snapshot
//! descends from its fork point. Merge follows Podflare's semantics; its failures carry an
//! [`ErrorKind`] an HTTP layer maps to a status: a snapshot that does not descend from this
//! VM's current fork, or a fork that was already merged, is `not_found` (404); a snapshot this
//! VM took itself is `bad_request` (400, a self-merge).
//!
//! `snapshot`, `fork`, `merge`, `rollback` and `persist` need the VMM to have been started
//! with a snapshotd socket. A request line is capped at [`MAX_REQUEST_LINE`] bytes.

use serde::{Deserialize, Serialize};

/// Largest accepted request line, newline included. Longer lines get an error response and
/// the connection is closed.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// Most children an orchestrator starts from one fork snapshot.
pub const MAX_FORK_CHILDREN: u32 = 64;

/// One control request (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum ControlRequest {
    /// Report the VM's state, uptime, vCPU count and memory size.
    Status,
    /// Pause every vCPU. Returns once no vCPU is inside `KVM_RUN`.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Stop the VM and end the VMM process.
    Shutdown,
    /// Snapshot the VM into snapshotd (only pages dirtied since its base are captured); the
    /// VM continues on a copy-on-write view of the new snapshot.
    Snapshot {
        /// Reply only once the snapshot is durable in the store.
        #[serde(default)]
        durable: bool,
    },
    /// Take a snapshot and make it this VM's fork point: children restored from it (started
    /// by the orchestrator) may later be merged back into this VM. (A struct variant so that
    /// unknown fields, such as the `n` and `dir` of the protocol before the VMM stopped
    /// starting children, are refused rather than ignored.)
    Fork {},
    /// Take the state of the winner's snapshot `snapshot` (which must descend from this VM's
    /// latest fork point, as snapshotd records it): its memory, vCPUs and devices. This VM
    /// keeps its identity and sockets; other VMs are untouched.
    Merge {
        /// The winner's snapshot (from its own `snapshot` request).
        snapshot: String,
    },
    /// Return this VM to snapshot `snapshot` (memory, vCPUs, devices), keeping its identity
    /// and sockets. The orchestrator decides which snapshots a VM may go back to.
    Rollback {
        /// The snapshot.
        snapshot: String,
    },
    /// Durable snapshot, then stop (a persistent space going to sleep).
    Persist,
    /// blake3 of all guest memory (for tests; pauses the VM while hashing).
    MemoryHash,
    /// Give back the private copies of guest pages whose bytes equal the snapshot image's
    /// page, so they are shared with the image (and every other VM mapping it) again. A
    /// restored or forked guest writes a few hundred pages as it wakes, and about a third of
    /// them end as they were (a lock taken and released, a count raised and lowered). Only
    /// for a VM on an image: restored, forked, merged, or snapshotted since it booted
    /// (`conflict` otherwise). Compares with the VM running, then pauses it to compare the
    /// equal copies again and drop them.
    Trim,
    /// What the VM's interrupt path and queues look like (vCPU run state, local APIC,
    /// IOAPIC pins of the virtio devices, each queue's device and guest indices, the vsock
    /// muxer), as text for a person diagnosing a guest that does not answer. Pauses the VM
    /// briefly.
    Debug,
}

/// Lifecycle state of a VM as reported by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// vCPUs are running guest code.
    Running,
    /// vCPUs are parked outside `KVM_RUN`.
    Paused,
    /// The guest has exited or a shutdown was requested.
    Exited,
}

/// Body of a successful `status` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Current lifecycle state.
    pub state: VmState,
    /// Milliseconds since the VM was started.
    pub uptime_ms: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory size in MiB.
    pub mem_mib: u64,
    /// The snapshot whose image backs guest memory (none for a freshly booted VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_snapshot: Option<String>,
    /// The snapshot of this VM's latest fork that children may still be merged from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork_snapshot: Option<String>,
    /// VM exits handled so far, per vCPU.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_exits: Vec<u64>,
    /// The lifecycle operation running now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy: Option<String>,
}

/// Body of a successful `snapshot` (and `persist`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReply {
    /// The new snapshot.
    pub id: String,
    /// Its parent (the VM's base before), if any.
    pub parent: Option<String>,
    /// True once durable in the store.
    pub durable: bool,
    /// Pages captured (all populated pages for a fresh VM, else those dirtied since the base).
    pub dirty_pages: u64,
    /// Milliseconds the vCPUs were paused.
    pub paused_ms: f64,
    /// Milliseconds spent on each step (`state`, `memory`, `store`, `switch`).
    pub steps_ms: Vec<(String, f64)>,
}

/// Body of a successful `fork`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForkReply {
    /// The fork snapshot: restore children from it.
    pub snapshot: SnapshotReply,
}

/// Body of a successful `merge` or `rollback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeReply {
    /// The snapshot that this VM now runs on.
    pub snapshot: String,
    /// Milliseconds this VM was paused.
    pub paused_ms: f64,
    /// Milliseconds for the whole operation (lineage check, state and image included).
    pub total_ms: f64,
    /// Memory moved in place: only the pages this VM wrote since its snapshot and the
    /// target's own pages changed, and the guest's working set stayed mapped (the target
    /// is layers over the snapshot this VM ran on: a winner over its fork, or this VM's
    /// latest snapshot). `false`: every mapping was replaced.
    #[serde(default)]
    pub in_place: bool,
}

/// Body of a successful `trim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrimReply {
    /// Private copies of guest pages in memory before (swapped-out ones are left alone).
    pub private_pages: u64,
    /// Of those, the copies equal to the image's page, now dropped.
    pub dropped_pages: u64,
    /// Milliseconds the second comparison and the drops took, the VM paused (pausing and
    /// resuming it not counted).
    pub paused_ms: f64,
}

/// What kind of failure a response reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or not allowed (HTTP 400).
    BadRequest,
    /// What it refers to does not exist (HTTP 404).
    NotFound,
    /// The VM is in the wrong state for it (HTTP 409).
    Conflict,
    /// The VMM failed (HTTP 500).
    Internal,
    /// The VMM is busy: its request queue is full (HTTP 503).
    Busy,
}

/// One control response (one JSON line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ControlResponse {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Present on a successful `status` request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VmStatus>,
    /// Present on a successful `snapshot` or `persist`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotReply>,
    /// Present on a successful `fork`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<ForkReply>,
    /// Present on a successful `merge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeReply>,
    /// Present on a successful `memory_hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_hash: Option<String>,
    /// Present on a successful `memory_hash`: blake3 (first 8 bytes, hex) of each MiB of
    /// guest memory, so two VMs' memory can be compared region by region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_chunks: Option<Vec<String>>,
    /// Present on a successful `trim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trim: Option<TrimReply>,
    /// Present on a successful `debug`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug: Option<String>,
    /// Present when `ok` is false: what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Present when `ok` is false: the kind of failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
}

impl ControlResponse {
    /// A bare success.
    pub fn ok() -> Self {
        Self {
            ok: true,
            ..Self::default()
        }
    }

    /// A success carrying a status body.
    pub fn with_status(status: VmStatus) -> Self {
        Self {
            ok: true,
            status: Some(status),
            ..Self::default()
        }
    }

    /// A failure with a message (kind `internal` unless set with [`Self::kind`]).
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            error_kind: Some(ErrorKind::Internal),
            ..Self::default()
        }
    }

    /// Sets the failure kind.
    pub fn kind(mut self, kind: ErrorKind) -> Self {
        self.error_kind = Some(kind);
        self
    }
}

/// What a pre-started VMM (`fissile-vmm --standby`) waits for: one JSON line on its standard
/// input naming the snapshot to become (at most [`MAX_STANDBY_LINE`] bytes). Until then it
/// has made its KVM VM and vCPUs and holds no guest; end of input (its orchestrator let it
/// go, or died) makes it exit with status 0. Once ready to take the request it writes
/// [`STANDBY_READY`] to its standard output.
///
/// ```text
/// {"snapshot":"<id>"}
/// {"snapshot":"<id>","start_paused":true}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandbyRequest {
    /// The snapshot to restore.
    pub snapshot: String,
    /// Stay paused once restored.
    #[serde(default)]
    pub start_paused: bool,
}

/// The longest standby request line.
pub const MAX_STANDBY_LINE: usize = 4096;

/// The line a pre-started VMM writes once its VM is made and it waits for its request.
pub const STANDBY_READY: &str = "standby ready\n";
