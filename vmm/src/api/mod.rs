//! The control socket: JSON lines (see `fissile_proto::control`), one request per line, one
//! response line each. One thread accepts; each client gets its own thread.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fissile_proto::control::{
    ControlRequest, ControlResponse, ErrorKind, ForkReply, MAX_REQUEST_LINE, MergeReply,
    SnapshotReply, VmStatus,
};
use fissile_proto::error_chain;

use crate::vstate::vcpu::ControlError;

/// A failed operation: its kind and the message (whole error chain).
pub type OpFailure = (ErrorKind, String);

/// What the control socket can ask of a VM. [`crate::VmmHandle`] is the implementation;
/// the socket layer only parses, dispatches and answers.
pub trait ControlOps: Send + Sync + 'static {
    /// Current status.
    fn status(&self) -> VmStatus;
    /// Pauses the vCPUs.
    fn pause(&self) -> Result<(), ControlError>;
    /// Resumes the vCPUs.
    fn resume(&self) -> Result<(), ControlError>;
    /// Stops the VM.
    fn shutdown(&self);
    /// Snapshot into snapshotd.
    fn snapshot(&self, durable: bool) -> Result<SnapshotReply, OpFailure>;
    /// Fork into `n` children under `dir`.
    fn fork(&self, n: u32, dir: &Path) -> Result<ForkReply, OpFailure>;
    /// Merge the child whose control socket is `winner`.
    fn merge(&self, winner: &Path) -> Result<MergeReply, OpFailure>;
    /// Durable snapshot, then stop.
    fn persist(&self) -> Result<SnapshotReply, OpFailure>;
    /// blake3 of guest memory, and of each MiB.
    fn memory_hash(&self) -> Result<(String, Vec<String>), OpFailure>;
}

impl ControlOps for crate::vmm::VmmHandle {
    fn status(&self) -> VmStatus {
        crate::vmm::VmmHandle::status(self)
    }
    fn pause(&self) -> Result<(), ControlError> {
        crate::vmm::VmmHandle::pause(self)
    }
    fn resume(&self) -> Result<(), ControlError> {
        crate::vmm::VmmHandle::resume(self)
    }
    fn shutdown(&self) {
        crate::vmm::VmmHandle::shutdown(self)
    }
    fn snapshot(&self, durable: bool) -> Result<SnapshotReply, OpFailure> {
        self.shared()
            .snapshot(durable)
            .map_err(|e| (e.kind(), error_chain(&e)))
    }
    fn fork(&self, n: u32, dir: &Path) -> Result<ForkReply, OpFailure> {
        self.shared()
            .fork(n, dir)
            .map_err(|e| (e.kind(), error_chain(&e)))
    }
    fn merge(&self, winner: &Path) -> Result<MergeReply, OpFailure> {
        self.shared()
            .merge(winner)
            .map_err(|e| (e.kind(), error_chain(&e)))
    }
    fn persist(&self) -> Result<SnapshotReply, OpFailure> {
        self.shared()
            .persist()
            .map_err(|e| (e.kind(), error_chain(&e)))
    }
    fn memory_hash(&self) -> Result<(String, Vec<String>), OpFailure> {
        self.shared()
            .memory_hash()
            .map_err(|e| (ErrorKind::Conflict, error_chain(&e)))
    }
}

type Ops = Arc<dyn ControlOps>;

/// A running control socket server.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket file) and starts serving `vmm`.
    pub fn start(path: &Path, vmm: Ops) -> std::io::Result<Self> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("fissile-api".into())
            .spawn(move || accept_loop(listener, vmm, flag))?;
        Ok(Self {
            path: path.to_path_buf(),
            stopping,
            thread: Some(thread),
        })
    }

    /// Stops accepting and removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn accept_loop(listener: UnixListener, vmm: Ops, stopping: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        match stream {
            Ok(stream) => {
                let vmm = vmm.clone();
                let spawned = std::thread::Builder::new()
                    .name("fissile-api-conn".into())
                    .spawn(move || serve_client(stream, &vmm));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "control socket: cannot spawn client thread");
                }
            }
            Err(e) => tracing::warn!(error = %e, "control socket: accept failed"),
        }
    }
}

fn serve_client(stream: UnixStream, vmm: &Ops) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let mut writer = writer;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let limit = (MAX_REQUEST_LINE + 1) as u64;
        match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(_) => return,
        }
        if line.last() != Some(&b'\n') && line.len() as u64 >= limit {
            let _ = write_response(
                &mut writer,
                &ControlResponse::error("request line too long"),
            );
            return;
        }
        let (response, then_shutdown) = handle_line(&line, vmm);
        if write_response(&mut writer, &response).is_err() {
            return;
        }
        if then_shutdown {
            vmm.shutdown();
        }
    }
}

/// Parses and executes one request line. Returns the response and whether to stop the VM
/// after answering.
pub fn handle_line(line: &[u8], vmm: &Ops) -> (ControlResponse, bool) {
    let request: ControlRequest = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            return (
                ControlResponse::error(format!("bad request: {e}")).kind(ErrorKind::BadRequest),
                false,
            );
        }
    };
    let failed = |(kind, msg): OpFailure| (ControlResponse::error(msg).kind(kind), false);
    match request {
        ControlRequest::Status => (ControlResponse::with_status(vmm.status()), false),
        ControlRequest::Pause => (result(vmm.pause()), false),
        ControlRequest::Resume => (result(vmm.resume()), false),
        ControlRequest::Shutdown => (ControlResponse::ok(), true),
        ControlRequest::Snapshot { durable } => match vmm.snapshot(durable) {
            Ok(s) => (
                ControlResponse {
                    snapshot: Some(s),
                    ..ControlResponse::ok()
                },
                false,
            ),
            Err(f) => failed(f),
        },
        ControlRequest::Fork { n, dir } => match vmm.fork(n, Path::new(&dir)) {
            Ok(f) => (
                ControlResponse {
                    fork: Some(f),
                    ..ControlResponse::ok()
                },
                false,
            ),
            Err(f) => failed(f),
        },
        ControlRequest::Merge { winner } => match vmm.merge(Path::new(&winner)) {
            Ok(m) => (
                ControlResponse {
                    merge: Some(m),
                    ..ControlResponse::ok()
                },
                false,
            ),
            Err(f) => failed(f),
        },
        ControlRequest::Persist => match vmm.persist() {
            Ok(s) => (
                ControlResponse {
                    snapshot: Some(s),
                    ..ControlResponse::ok()
                },
                false,
            ),
            Err(f) => failed(f),
        },
        ControlRequest::MemoryHash => match vmm.memory_hash() {
            Ok((h, chunks)) => (
                ControlResponse {
                    memory_hash: Some(h),
                    memory_chunks: Some(chunks),
                    ..ControlResponse::ok()
                },
                false,
            ),
            Err(f) => failed(f),
        },
        _ => (
            ControlResponse::error("unsupported operation").kind(ErrorKind::BadRequest),
            false,
        ),
    }
}

fn result(r: Result<(), crate::vstate::vcpu::ControlError>) -> ControlResponse {
    match r {
        Ok(()) => ControlResponse::ok(),
        Err(e) => ControlResponse::error(e.to_string()).kind(ErrorKind::Conflict),
    }
}

fn write_response(w: &mut UnixStream, response: &ControlResponse) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use std::path::Path;

    use fissile_proto::control::{
        ControlRequest, ControlResponse, ErrorKind, ForkReply, MergeReply, SnapshotReply, VmState,
        VmStatus,
    };

    use super::{ApiServer, ControlOps, OpFailure};
    use crate::vstate::vcpu::{ControlError, RunControl, Target, VmExit};

    /// The socket layer's counterpart: a real run/pause state machine, no VM. Lifecycle
    /// operations say what they were asked, so dispatch and error mapping can be checked.
    struct StateMachineOnly {
        control: Arc<RunControl>,
        vcpus: u8,
        mem_mib: u64,
    }

    impl ControlOps for StateMachineOnly {
        fn status(&self) -> VmStatus {
            let state = self.control.target().vm_state();
            VmStatus {
                state,
                uptime_ms: 0,
                vcpus: self.vcpus,
                mem_mib: self.mem_mib,
                base_snapshot: None,
                fork_snapshot: None,
                vcpu_exits: vec![],
            }
        }
        fn pause(&self) -> Result<(), ControlError> {
            self.control.pause()
        }
        fn resume(&self) -> Result<(), ControlError> {
            self.control.resume()
        }
        fn shutdown(&self) {
            self.control.request_exit(VmExit::Stopped);
        }
        fn snapshot(&self, durable: bool) -> Result<SnapshotReply, OpFailure> {
            Err((ErrorKind::BadRequest, format!("snapshot durable={durable}")))
        }
        fn fork(&self, n: u32, dir: &Path) -> Result<ForkReply, OpFailure> {
            Err((ErrorKind::Internal, format!("fork {n} {}", dir.display())))
        }
        fn merge(&self, winner: &Path) -> Result<MergeReply, OpFailure> {
            Err((ErrorKind::NotFound, format!("merge {}", winner.display())))
        }
        fn persist(&self) -> Result<SnapshotReply, OpFailure> {
            Err((ErrorKind::Internal, "persist".into()))
        }
        fn memory_hash(&self) -> Result<(String, Vec<String>), OpFailure> {
            Ok(("abc".into(), vec![]))
        }
    }

    fn ops(control: Arc<RunControl>, vcpus: u8, mem_mib: u64) -> Arc<dyn ControlOps> {
        Arc::new(StateMachineOnly {
            control,
            vcpus,
            mem_mib,
        })
    }

    fn ask(conn: &mut BufReader<UnixStream>, line: &str) -> ControlResponse {
        conn.get_mut().write_all(line.as_bytes()).unwrap();
        let mut answer = String::new();
        conn.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    }

    #[test]
    fn control_socket_status_pause_resume_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        // No vCPU threads: pause completes at once; the state machine is what is exercised.
        let control = Arc::new(RunControl::new(0, Target::Running));
        let server = ApiServer::start(&path, ops(control.clone(), 2, 256)).unwrap();
        let mut conn = BufReader::new(UnixStream::connect(&path).unwrap());

        let status = ask(&mut conn, "{\"op\":\"status\"}\n").status.unwrap();
        assert_eq!(
            (status.state, status.vcpus, status.mem_mib),
            (VmState::Running, 2, 256)
        );
        assert!(ask(&mut conn, "{\"op\":\"pause\"}\n").ok);
        assert_eq!(
            ask(&mut conn, "{\"op\":\"status\"}\n")
                .status
                .unwrap()
                .state,
            VmState::Paused
        );
        assert!(ask(&mut conn, "{\"op\":\"resume\"}\n").ok);
        let again = ask(&mut conn, "{\"op\":\"resume\"}\n");
        assert_eq!(
            (again.ok, again.error.as_deref()),
            (false, Some("the VM is not paused"))
        );
        let garbage = ask(&mut conn, "{not json\n");
        assert_eq!(garbage.error_kind, Some(ErrorKind::BadRequest));
        assert!(!garbage.ok && garbage.error.unwrap().starts_with("bad request"));
        let merge = ask(&mut conn, "{\"op\":\"merge\",\"winner\":\"/x/api.sock\"}\n");
        assert_eq!(
            (merge.error_kind, merge.error.as_deref()),
            (Some(ErrorKind::NotFound), Some("merge /x/api.sock"))
        );
        let fork = ask(&mut conn, "{\"op\":\"fork\",\"n\":3,\"dir\":\"/d\"}\n");
        assert_eq!(fork.error.as_deref(), Some("fork 3 /d"));
        let snap = ask(&mut conn, "{\"op\":\"snapshot\",\"durable\":true}\n");
        assert_eq!(snap.error.as_deref(), Some("snapshot durable=true"));
        let hash = ask(&mut conn, "{\"op\":\"memory_hash\"}\n");
        assert_eq!(hash.memory_hash.as_deref(), Some("abc"));
        assert!(ask(&mut conn, "{\"op\":\"shutdown\"}\n").ok);

        assert_eq!(control.wait_exited(), VmExit::Stopped);
        server.stop();
        assert!(!path.exists(), "socket file removed");
    }

    #[test]
    fn overlong_request_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let control = Arc::new(RunControl::new(0, Target::Running));
        let _server = ApiServer::start(&path, ops(control, 1, 64)).unwrap();
        let mut conn = BufReader::new(UnixStream::connect(&path).unwrap());
        let long = vec![b'x'; fissile_proto::control::MAX_REQUEST_LINE + 10];

        let _ = conn.get_mut().write_all(&long);
        let mut answer = String::new();
        conn.read_line(&mut answer).unwrap();

        let resp: ControlResponse = serde_json::from_str(&answer).unwrap();
        assert_eq!(resp.error.as_deref(), Some("request line too long"));
    }

    #[test]
    fn control_requests_use_the_op_tag() {
        let req: ControlRequest = serde_json::from_str(r#"{"op":"pause"}"#).unwrap();
        assert_eq!(req, ControlRequest::Pause);
        assert_eq!(
            serde_json::to_string(&ControlRequest::Status).unwrap(),
            r#"{"op":"status"}"#
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"explode"}"#).is_err());
    }

    #[test]
    fn status_response_serializes_flat() {
        let resp = ControlResponse::with_status(VmStatus {
            state: VmState::Paused,
            uptime_ms: 5,
            vcpus: 2,
            mem_mib: 256,
            base_snapshot: None,
            fork_snapshot: None,
            vcpu_exits: vec![],
        });
        assert_eq!(
            serde_json::to_string(&resp).unwrap(),
            r#"{"ok":true,"status":{"state":"paused","uptime_ms":5,"vcpus":2,"mem_mib":256}}"#
        );
        assert_eq!(
            serde_json::to_string(&ControlResponse::ok()).unwrap(),
            r#"{"ok":true}"#
        );
    }
}
