//! The control socket: JSON lines (see `fissile_proto::control`), one request per line, one
//! response line each. This layer parses, dispatches to [`ControlOps`] and answers; it holds
//! no VM state. Handlers of different clients run concurrently: the implementation
//! ([`crate::VmmHandle`]) serializes lifecycle operations in the VMM's queue.
//!
//! Access: the socket file is owner-only (`0600`) and a client must run as the VMM's user or
//! root (`SO_PEERCRED`). At most [`Limits::max_clients`] clients are served at once (more
//! get an error line and are closed); a client silent for [`Limits::idle`] is closed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fissile_proto::control::{
    ControlRequest, ControlResponse, ErrorKind, ForkReply, MAX_REQUEST_LINE, MergeReply,
    SnapshotReply, TrimReply, VmStatus,
};
use fissile_proto::uds::BoundSocket;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// A failed operation: its kind and the message (whole error chain).
pub type OpFailure = (ErrorKind, String);

/// What the control socket can ask of a VM. [`crate::VmmHandle`] is the implementation.
pub trait ControlOps: Send + Sync + 'static {
    /// Current status (never waits).
    fn status(&self) -> VmStatus;
    /// Pauses the VM (the clients' hold).
    fn pause(&self) -> Result<(), OpFailure>;
    /// Releases the clients' hold.
    fn resume(&self) -> Result<(), OpFailure>;
    /// Stops the VM.
    fn shutdown(&self);
    /// Snapshot into snapshotd.
    fn snapshot(&self, durable: bool) -> Result<SnapshotReply, OpFailure>;
    /// A snapshot that becomes the fork point.
    fn fork(&self) -> Result<ForkReply, OpFailure>;
    /// Take the state of a winner's snapshot.
    fn merge(&self, snapshot: &str) -> Result<MergeReply, OpFailure>;
    /// Go back to a snapshot.
    fn rollback(&self, snapshot: &str) -> Result<MergeReply, OpFailure>;
    /// Durable snapshot; the VM stays paused (the socket stops it after answering).
    fn persist(&self) -> Result<SnapshotReply, OpFailure>;
    /// blake3 of guest memory, and of each MiB.
    fn memory_hash(&self) -> Result<(String, Vec<String>), OpFailure>;
    /// Drop the private copies of guest pages equal to the image's.
    fn trim(&self) -> Result<TrimReply, OpFailure> {
        Err((ErrorKind::BadRequest, "trim is not supported here".into()))
    }
    /// The VM's interrupt path and queues as text (diagnosis).
    fn debug(&self) -> Result<String, OpFailure> {
        Err((ErrorKind::BadRequest, "debug is not supported here".into()))
    }
}

type Ops = Arc<dyn ControlOps>;

/// Bounds of the control socket.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Clients served at once.
    pub max_clients: usize,
    /// A client that sends nothing for this long is disconnected.
    pub idle: Duration,
    /// A reply that cannot be written within this time closes the connection.
    pub write: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_clients: 16,
            idle: Duration::from_secs(300),
            write: Duration::from_secs(10),
        }
    }
}

/// Starting the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Binding the socket (a live socket or another file at the path is left alone).
    #[error("binding control socket {0}")]
    Bind(String, #[source] std::io::Error),
    /// The wake-up eventfd, epoll or the accept thread.
    #[error("starting the control socket's accept thread")]
    Start(#[source] std::io::Error),
}

/// A running control socket server.
#[derive(Debug)]
pub struct ApiServer {
    socket: Arc<BoundSocket>,
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `path` (replacing only a stale socket file) and starts serving `vmm`.
    pub fn start(path: &Path, vmm: Ops) -> Result<Self, ApiError> {
        Self::start_with(path, vmm, Limits::default())
    }

    /// [`ApiServer::start`] with explicit limits.
    pub fn start_with(path: &Path, vmm: Ops, limits: Limits) -> Result<Self, ApiError> {
        let socket =
            BoundSocket::bind(path).map_err(|e| ApiError::Bind(path.display().to_string(), e))?;
        let stop = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ApiError::Start)?,
        );
        let epoll = Epoll::new().map_err(ApiError::Start)?;
        for fd in [socket.listener.as_raw_fd(), stop.as_raw_fd()] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .map_err(ApiError::Start)?;
        }
        socket
            .listener
            .set_nonblocking(true)
            .map_err(ApiError::Start)?;
        let socket = Arc::new(socket);
        let thread = {
            let (socket, stop) = (socket.clone(), stop.clone());
            std::thread::Builder::new()
                .name("fissile-api".into())
                .spawn(move || accept_loop(&socket, &epoll, &stop, &vmm, limits))
                .map_err(ApiError::Start)?
        };
        Ok(Self {
            socket,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting and removes the socket file (if it is still ours). Clients being
    /// served finish their current request.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.socket.remove_file();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

/// Decrements the client count when a client's thread ends, however it ends.
struct ClientSlot(Arc<AtomicUsize>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(socket: &BoundSocket, epoll: &Epoll, stop: &EventFd, vmm: &Ops, limits: Limits) {
    // Client threads start from this one and inherit its filter.
    crate::seccomp::enter(crate::seccomp::ThreadClass::Api);
    let clients = Arc::new(AtomicUsize::new(0));
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        match epoll.wait(-1, &mut events) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "control socket: epoll failed; no longer accepting");
                return;
            }
        }
        if stop.read().is_ok() {
            return;
        }
        loop {
            let stream = match socket.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket: accept failed");
                    break;
                }
            };
            admit(stream, vmm, limits, &clients);
        }
    }
}

/// Checks a new client and gives it a thread, or refuses it.
fn admit(stream: UnixStream, vmm: &Ops, limits: Limits, clients: &Arc<AtomicUsize>) {
    let refuse = |mut s: UnixStream, why: &str| {
        let _ = s.set_write_timeout(Some(limits.write));
        let _ = write_response(&mut s, &ControlResponse::error(why).kind(ErrorKind::Busy));
    };
    if let Err(e) = fissile_proto::uds::trusted_peer(&stream) {
        tracing::warn!(error = %e, "control socket: refusing a client");
        return;
    }
    if clients.fetch_add(1, Ordering::SeqCst) >= limits.max_clients {
        clients.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(max = limits.max_clients, "control socket: too many clients");
        refuse(stream, "too many control clients; try again later");
        return;
    }
    let slot = ClientSlot(clients.clone());
    let vmm = vmm.clone();
    let spawned = std::thread::Builder::new()
        .name("fissile-api-conn".into())
        .spawn(move || {
            let _slot = slot;
            serve_client(stream, &vmm, limits);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "control socket: cannot spawn client thread");
    }
}

fn serve_client(stream: UnixStream, vmm: &Ops, limits: Limits) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(limits.idle)).is_err()
        || stream.set_write_timeout(Some(limits.write)).is_err()
    {
        return;
    }
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let limit = (MAX_REQUEST_LINE + 1) as u64;
        match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') && line.len() as u64 >= limit {
            let _ = write_response(
                &mut writer,
                &ControlResponse::error("request line too long").kind(ErrorKind::BadRequest),
            );
            return;
        }
        let (response, then_shutdown) = handle_line(&line, vmm);
        let written = write_response(&mut writer, &response);
        if then_shutdown {
            // After the reply is out (or could not be written): a persist's snapshot id is
            // the caller's only handle on the space.
            vmm.shutdown();
        }
        if written.is_err() {
            return;
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
    let answer = |r: Result<ControlResponse, OpFailure>| match r {
        Ok(resp) => resp,
        Err((kind, msg)) => ControlResponse::error(msg).kind(kind),
    };
    match request {
        ControlRequest::Status => (ControlResponse::with_status(vmm.status()), false),
        ControlRequest::Pause => (answer(vmm.pause().map(|()| ControlResponse::ok())), false),
        ControlRequest::Resume => (answer(vmm.resume().map(|()| ControlResponse::ok())), false),
        ControlRequest::Shutdown => (ControlResponse::ok(), true),
        ControlRequest::Snapshot { durable } => {
            (answer(vmm.snapshot(durable).map(snapshot)), false)
        }
        ControlRequest::Fork {} => (
            answer(vmm.fork().map(|f| ControlResponse {
                fork: Some(f),
                ..ControlResponse::ok()
            })),
            false,
        ),
        ControlRequest::Merge { snapshot } => (answer(vmm.merge(&snapshot).map(merged)), false),
        ControlRequest::Rollback { snapshot } => {
            (answer(vmm.rollback(&snapshot).map(merged)), false)
        }
        ControlRequest::Persist => match vmm.persist() {
            Ok(s) => (snapshot(s), true),
            Err((kind, msg)) => (ControlResponse::error(msg).kind(kind), false),
        },
        ControlRequest::MemoryHash => (
            answer(vmm.memory_hash().map(|(h, chunks)| ControlResponse {
                memory_hash: Some(h),
                memory_chunks: Some(chunks),
                ..ControlResponse::ok()
            })),
            false,
        ),
        ControlRequest::Trim => (
            answer(vmm.trim().map(|t| ControlResponse {
                trim: Some(t),
                ..ControlResponse::ok()
            })),
            false,
        ),
        ControlRequest::Debug => (
            answer(vmm.debug().map(|d| ControlResponse {
                debug: Some(d),
                ..ControlResponse::ok()
            })),
            false,
        ),
        _ => (
            ControlResponse::error("unsupported operation").kind(ErrorKind::BadRequest),
            false,
        ),
    }
}

fn snapshot(s: SnapshotReply) -> ControlResponse {
    ControlResponse {
        snapshot: Some(s),
        ..ControlResponse::ok()
    }
}

fn merged(m: MergeReply) -> ControlResponse {
    ControlResponse {
        merge: Some(m),
        ..ControlResponse::ok()
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
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use fissile_proto::control::{
        ControlRequest, ControlResponse, ErrorKind, ForkReply, MergeReply, SnapshotReply, VmState,
        VmStatus,
    };

    use super::{ApiServer, ControlOps, Limits, OpFailure};
    use crate::vstate::vcpu::{RunControl, Target, VmExit};

    /// A dispatch test double: a real run/pause state machine, no VM. Lifecycle operations
    /// say what they were asked, so parsing, dispatch and error mapping of the socket layer
    /// can be checked (the real `VmmHandle` is exercised by the guest suites).
    struct StateMachineOnly {
        control: Arc<RunControl>,
        vcpus: u8,
        mem_mib: u64,
        shutdown_called: AtomicBool,
    }

    fn refused(e: crate::vstate::vcpu::ControlError) -> OpFailure {
        (ErrorKind::Conflict, e.to_string())
    }

    impl ControlOps for StateMachineOnly {
        fn status(&self) -> VmStatus {
            VmStatus {
                state: self.control.target().vm_state(),
                uptime_ms: 0,
                vcpus: self.vcpus,
                mem_mib: self.mem_mib,
                base_snapshot: None,
                fork_snapshot: None,
                vcpu_exits: vec![],
                busy: None,
            }
        }
        fn pause(&self) -> Result<(), OpFailure> {
            self.control.pause().map_err(refused)
        }
        fn resume(&self) -> Result<(), OpFailure> {
            self.control.resume().map_err(refused)
        }
        fn shutdown(&self) {
            self.shutdown_called.store(true, Ordering::SeqCst);
            self.control.request_exit(VmExit::Stopped);
        }
        fn snapshot(&self, durable: bool) -> Result<SnapshotReply, OpFailure> {
            Err((ErrorKind::BadRequest, format!("snapshot durable={durable}")))
        }
        fn fork(&self) -> Result<ForkReply, OpFailure> {
            Err((ErrorKind::Internal, "fork".into()))
        }
        fn merge(&self, snapshot: &str) -> Result<MergeReply, OpFailure> {
            Err((ErrorKind::NotFound, format!("merge {snapshot}")))
        }
        fn rollback(&self, snapshot: &str) -> Result<MergeReply, OpFailure> {
            Err((ErrorKind::NotFound, format!("rollback {snapshot}")))
        }
        fn persist(&self) -> Result<SnapshotReply, OpFailure> {
            Ok(SnapshotReply {
                id: "p1".into(),
                parent: None,
                durable: true,
                dirty_pages: 0,
                paused_ms: 0.0,
                steps_ms: vec![],
            })
        }
        fn memory_hash(&self) -> Result<(String, Vec<String>), OpFailure> {
            Ok(("abc".into(), vec![]))
        }
    }

    fn double(control: Arc<RunControl>, vcpus: u8, mem_mib: u64) -> Arc<StateMachineOnly> {
        Arc::new(StateMachineOnly {
            control,
            vcpus,
            mem_mib,
            shutdown_called: AtomicBool::new(false),
        })
    }

    fn ask(conn: &mut BufReader<UnixStream>, line: &str) -> ControlResponse {
        conn.get_mut().write_all(line.as_bytes()).unwrap();
        let mut answer = String::new();
        conn.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    }

    #[test]
    fn dispatch_of_every_request_and_its_error_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        // No vCPU threads: pause completes at once; the state machine is what is exercised.
        let control = Arc::new(RunControl::new(0, Target::Running));
        let server = ApiServer::start(&path, double(control.clone(), 2, 256)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "owner-only socket");
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
            (again.ok, again.error.as_deref(), again.error_kind),
            (
                false,
                Some("the VM is not paused"),
                Some(ErrorKind::Conflict)
            )
        );
        let garbage = ask(&mut conn, "{not json\n");
        assert_eq!(garbage.error_kind, Some(ErrorKind::BadRequest));
        assert!(!garbage.ok && garbage.error.unwrap().starts_with("bad request"));
        let unknown_field = ask(&mut conn, "{\"op\":\"fork\",\"n\":3}\n");
        assert_eq!(unknown_field.error_kind, Some(ErrorKind::BadRequest));
        let merge = ask(&mut conn, "{\"op\":\"merge\",\"snapshot\":\"s9\"}\n");
        assert_eq!(
            (merge.error_kind, merge.error.as_deref()),
            (Some(ErrorKind::NotFound), Some("merge s9"))
        );
        let rollback = ask(&mut conn, "{\"op\":\"rollback\",\"snapshot\":\"s1\"}\n");
        assert_eq!(rollback.error.as_deref(), Some("rollback s1"));
        let fork = ask(&mut conn, "{\"op\":\"fork\"}\n");
        assert_eq!(fork.error.as_deref(), Some("fork"));
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
    fn persist_answers_before_the_vm_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let control = Arc::new(RunControl::new(0, Target::Running));
        let ops = double(control.clone(), 1, 64);
        let _server = ApiServer::start(&path, ops.clone()).unwrap();
        let mut conn = BufReader::new(UnixStream::connect(&path).unwrap());

        let resp = ask(&mut conn, "{\"op\":\"persist\"}\n");

        assert_eq!(resp.snapshot.unwrap().id, "p1");
        assert_eq!(control.wait_exited(), VmExit::Stopped);
        assert!(ops.shutdown_called.load(Ordering::SeqCst));
    }

    #[test]
    fn overlong_request_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let control = Arc::new(RunControl::new(0, Target::Running));
        let _server = ApiServer::start(&path, double(control, 1, 64)).unwrap();
        let mut conn = BufReader::new(UnixStream::connect(&path).unwrap());
        let long = vec![b'x'; fissile_proto::control::MAX_REQUEST_LINE + 10];

        let _ = conn.get_mut().write_all(&long);
        let mut answer = String::new();
        conn.read_line(&mut answer).unwrap();

        let resp: ControlResponse = serde_json::from_str(&answer).unwrap();
        assert_eq!(resp.error.as_deref(), Some("request line too long"));
    }

    #[test]
    fn clients_beyond_the_cap_are_refused_and_idle_ones_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let control = Arc::new(RunControl::new(0, Target::Running));
        let limits = Limits {
            max_clients: 2,
            idle: Duration::from_millis(300),
            write: Duration::from_secs(5),
        };
        let _server = ApiServer::start_with(&path, double(control, 1, 64), limits).unwrap();
        let mut held: Vec<_> = (0..2)
            .map(|_| BufReader::new(UnixStream::connect(&path).unwrap()))
            .collect();
        for c in &mut held {
            assert!(ask(c, "{\"op\":\"status\"}\n").ok, "within the cap");
        }

        let mut third = BufReader::new(UnixStream::connect(&path).unwrap());
        let mut answer = String::new();
        third.read_line(&mut answer).unwrap();
        let resp: ControlResponse = serde_json::from_str(&answer).unwrap();
        assert_eq!(resp.error_kind, Some(ErrorKind::Busy), "{answer}");

        // The idle ones are closed (EOF), which frees their slots.
        for c in &mut held {
            let mut rest = String::new();
            assert_eq!(c.read_line(&mut rest).unwrap(), 0, "idle client closed");
        }
        let mut fourth = BufReader::new(UnixStream::connect(&path).unwrap());
        assert!(ask(&mut fourth, "{\"op\":\"status\"}\n").ok);
    }

    #[test]
    fn stop_returns_even_when_the_socket_file_was_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let control = Arc::new(RunControl::new(0, Target::Running));
        let server = ApiServer::start(&path, double(control.clone(), 1, 64)).unwrap();
        std::fs::remove_file(&path).unwrap();
        let other = fissile_proto::uds::BoundSocket::bind(&path).unwrap();

        server.stop();

        assert!(
            fissile_proto::uds::is_same_file(&path, other.identity()),
            "the other socket is left alone"
        );
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
            busy: None,
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
