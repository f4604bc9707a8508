//! fork(n) and merge_into.
//!
//! **fork(n)**: a snapshot (see [`crate::snapshot::save`]: it captures only what the VM
//! dirtied since its base, and the image is usable before it is durable), then `n` child
//! VMM processes restored from it. Parent and children all continue on copy-on-write views
//! of the same image, so unmodified pages are shared physically. A child's own fork works the
//! same way (its base is the fork snapshot).
//!
//! **merge(winner)**: the winner (a child of this VM's latest fork, reached through its
//! control socket) takes a snapshot (its dirty pages since the fork, layered on the fork
//! snapshot); this VM then switches its memory to that snapshot's image and applies its
//! vCPU and device state, keeping its own identity and sockets. The other children are not
//! touched. A fork is merged at most once (Podflare's semantics): afterwards, merging any of
//! its children again is `not_found`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fissile_proto::control::{
    ControlRequest, ControlResponse, ErrorKind, ForkChild, ForkReply, MAX_FORK_CHILDREN, MergeReply,
};
use fissile_snapshotd::client::ClientError;

use crate::snapshot::save::{ApplyError, SnapshotError, attach_image, connect};
use crate::snapshot::{MicrovmState, STATE_BLOB, StateFormatError};
use crate::vmm::{PauseGuard, VmmShared, lock};
use crate::vstate::vcpu::VmExit;

/// How long merge waits for the winner's snapshot.
const WINNER_TIMEOUT: Duration = Duration::from_secs(600);
/// Deepest snapshot chain walked when checking that a winner descends from the fork.
const MAX_LINEAGE_DEPTH: usize = 64;

/// fork failed.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// Bad child count.
    #[error("fork needs 1..={MAX_FORK_CHILDREN} children, got {0}")]
    Count(u32),
    /// The snapshot failed.
    #[error("taking the fork snapshot")]
    Snapshot(#[source] SnapshotError),
    /// Creating a child's directory failed.
    #[error("creating child directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    /// Finding our own binary failed.
    #[error("locating the fissile-vmm binary")]
    Exe(#[source] std::io::Error),
    /// Starting a child failed.
    #[error("starting child {0}")]
    Spawn(u32, #[source] std::io::Error),
}

impl ForkError {
    /// The control-protocol kind of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ForkError::Count(_) => ErrorKind::BadRequest,
            ForkError::Snapshot(e) => e.kind(),
            _ => ErrorKind::Internal,
        }
    }
}

/// merge failed.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The winner is this VM.
    #[error("a VM cannot merge into itself")]
    SelfMerge,
    /// No fork to merge from (never forked, or already merged).
    #[error("this VM has no unmerged fork (never forked, or its fork was merged already)")]
    NoFork,
    /// The winner does not descend from this VM's fork.
    #[error("{0} is not a child of this VM's current fork")]
    NotChild(String),
    /// Talking to the winner failed.
    #[error("winner {0}: {1}")]
    Winner(String, String),
    /// Reading the winner's snapshot failed.
    #[error("snapshotd")]
    Store(#[source] ClientError),
    /// Its state is invalid.
    #[error("the winner's VM state")]
    State(#[source] StateFormatError),
    /// Snapshot machinery (connect, switch memory).
    #[error("switching memory")]
    Memory(#[source] SnapshotError),
    /// Applying its state failed; this VM was stopped (its state is mixed).
    #[error("applying the winner's state (this VM was stopped)")]
    Apply(#[source] ApplyError),
    /// Pausing failed.
    #[error("pausing this VM")]
    Pause(#[source] crate::vstate::vcpu::ControlError),
}

impl MergeError {
    /// The control-protocol kind of this failure (HTTP: 400, 404, 500).
    pub fn kind(&self) -> ErrorKind {
        match self {
            MergeError::SelfMerge => ErrorKind::BadRequest,
            MergeError::NoFork | MergeError::NotChild(_) => ErrorKind::NotFound,
            MergeError::Winner(..) => ErrorKind::NotFound,
            MergeError::Pause(_) => ErrorKind::Conflict,
            _ => ErrorKind::Internal,
        }
    }
}

/// One JSON-lines call to another VMM's control socket.
fn control_call(sock: &Path, req: &ControlRequest) -> Result<ControlResponse, String> {
    let stream = UnixStream::connect(sock).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(WINNER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    (&stream)
        .write_all(&line)
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| format!("receive: {e}"))?;
    let resp: ControlResponse =
        serde_json::from_str(&answer).map_err(|_| format!("bad response {answer:?}"))?;
    if !resp.ok {
        return Err(resp.error.unwrap_or_default());
    }
    Ok(resp)
}

fn same_socket(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

impl VmmShared {
    /// Forks into `n` children under `dir` (see the module docs).
    pub fn fork(&self, n: u32, dir: &Path) -> Result<ForkReply, ForkError> {
        if n == 0 || n > MAX_FORK_CHILDREN {
            return Err(ForkError::Count(n));
        }
        let _op = lock(&self.ops);
        let snapshot = self.snapshot_locked(false).map_err(ForkError::Snapshot)?;
        lock(&self.lineage).fork = Some(snapshot.id.clone());
        let t = Instant::now();
        let exe = std::env::current_exe().map_err(ForkError::Exe)?;
        let socket = self.snapshotd.clone().unwrap_or_default();
        let mut children = Vec::new();
        for index in 0..n {
            let child_dir = dir.join(format!("child-{index}"));
            std::fs::create_dir_all(&child_dir)
                .map_err(|e| ForkError::Dir(child_dir.clone(), e))?;
            let log = std::fs::File::create(child_dir.join("vmm.log"))
                .map_err(|e| ForkError::Dir(child_dir.clone(), e))?;
            let api_sock = child_dir.join("api.sock");
            let vsock_uds = child_dir.join("vsock.sock");
            let mut cmd = Command::new(&exe);
            cmd.arg("--restore")
                .arg(&snapshot.id)
                .arg("--snapshotd")
                .arg(&socket)
                .arg("--rootfs")
                .arg(&self.machine.rootfs)
                .arg("--api-sock")
                .arg(&api_sock)
                .arg("--serial-log")
                .arg(child_dir.join("console.log"));
            if self.machine.guest_cid.is_some() {
                cmd.arg("--vsock-uds").arg(&vsock_uds);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| ForkError::Spawn(index, e))?;
            let pid = child.id();
            // Reap it whenever it ends; its parent VMM may live on for long.
            let mut child = child;
            let _ = std::thread::Builder::new()
                .name(format!("fissile-reap{index}"))
                .spawn(move || {
                    let _ = child.wait();
                });
            children.push(ForkChild {
                index,
                pid,
                dir: child_dir.display().to_string(),
                api_sock: api_sock.display().to_string(),
                vsock_uds: vsock_uds.display().to_string(),
            });
        }
        let spawn_ms = t.elapsed().as_secs_f64() * 1e3;
        tracing::info!(snapshot = %snapshot.id, n, spawn_ms, "forked");
        Ok(ForkReply {
            snapshot,
            children,
            spawn_ms,
        })
    }

    /// Takes the state of `winner` (see the module docs).
    pub fn merge(&self, winner: &Path) -> Result<MergeReply, MergeError> {
        let t0 = Instant::now();
        if self
            .api_sock
            .as_deref()
            .is_some_and(|own| same_socket(own, winner))
        {
            return Err(MergeError::SelfMerge);
        }
        let _op = lock(&self.ops);
        let fork = lock(&self.lineage).fork.clone().ok_or(MergeError::NoFork)?;
        let winner_name = winner.display().to_string();
        let resp = control_call(winner, &ControlRequest::Snapshot { durable: false })
            .map_err(|e| MergeError::Winner(winner_name.clone(), e))?;
        let snap = resp.snapshot.ok_or_else(|| {
            MergeError::Winner(winner_name.clone(), "no snapshot in reply".into())
        })?;
        let socket = self
            .snapshotd
            .clone()
            .ok_or(MergeError::Memory(SnapshotError::NoSnapshotd))?;
        let mut client = connect(Some(&socket)).map_err(MergeError::Memory)?;
        // The winner's snapshot must descend from our fork snapshot.
        let mut cur = snap.parent.clone();
        let mut depth = 0;
        loop {
            match cur {
                Some(ref p) if *p == fork => break,
                Some(ref p) if depth < MAX_LINEAGE_DEPTH => {
                    cur = client.info(p).map_err(MergeError::Store)?.parent;
                    depth += 1;
                }
                _ => return Err(MergeError::NotChild(winner_name)),
            }
        }
        let blob = client
            .get_blob(&snap.id, STATE_BLOB)
            .map_err(MergeError::Store)?;
        let state = MicrovmState::decode(&blob).map_err(MergeError::State)?;
        let image = client.open_image(&snap.id).map_err(MergeError::Store)?;

        let guard = PauseGuard::new(self).map_err(MergeError::Pause)?;
        {
            let mut ram = lock(&self.ram);
            if let Err(e) = attach_image(&mut ram, &socket, &snap.id, image, true) {
                self.control
                    .request_exit(VmExit::Failed(format!("merge: switching memory: {e}")));
                return Err(MergeError::Memory(e));
            }
        }
        if let Err(e) = self.apply_state(&state, false) {
            self.control
                .request_exit(VmExit::Failed(format!("merge: applying state: {e}")));
            return Err(MergeError::Apply(e));
        }
        lock(&self.lineage).fork = None;
        let paused_ms = guard.elapsed_ms();
        drop(guard);
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(winner = %winner_name, snapshot = %snap.id, paused_ms, total_ms, "merged");
        Ok(MergeReply {
            snapshot: snap.id,
            dirty_pages: snap.dirty_pages,
            paused_ms,
            total_ms,
        })
    }

    /// Durable snapshot, then stop.
    pub fn persist(&self) -> Result<fissile_proto::control::SnapshotReply, SnapshotError> {
        let reply = self.snapshot(true)?;
        self.control.request_exit(VmExit::Stopped);
        Ok(reply)
    }

    /// blake3 of guest memory and of each MiB of it (pauses the VM while hashing).
    pub fn memory_hash(&self) -> Result<(String, Vec<String>), crate::vstate::vcpu::ControlError> {
        let _guard = PauseGuard::new(self)?;
        let (h, chunks) = lock(&self.ram).hash();
        Ok((h.to_hex().to_string(), chunks))
    }
}
