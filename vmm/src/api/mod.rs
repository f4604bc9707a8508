//! The control socket: JSON lines (see `fissile_proto::control`), one request per line, one
//! response line each. One thread accepts; each client gets its own thread.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fissile_proto::control::{ControlRequest, ControlResponse, MAX_REQUEST_LINE};

use crate::builder::VmmHandle;

/// A running control socket server.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket file) and starts serving `vmm`.
    pub fn start(path: &Path, vmm: VmmHandle) -> std::io::Result<Self> {
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

fn accept_loop(listener: UnixListener, vmm: VmmHandle, stopping: Arc<AtomicBool>) {
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

fn serve_client(stream: UnixStream, vmm: &VmmHandle) {
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
pub fn handle_line(line: &[u8], vmm: &VmmHandle) -> (ControlResponse, bool) {
    let request: ControlRequest = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => return (ControlResponse::error(format!("bad request: {e}")), false),
    };
    match request {
        ControlRequest::Status => (ControlResponse::with_status(vmm.status()), false),
        ControlRequest::Pause => (result(vmm.pause()), false),
        ControlRequest::Resume => (result(vmm.resume()), false),
        ControlRequest::Shutdown => (ControlResponse::ok(), true),
        _ => (ControlResponse::error("unsupported operation"), false),
    }
}

fn result(r: Result<(), crate::vstate::vcpu::ControlError>) -> ControlResponse {
    match r {
        Ok(()) => ControlResponse::ok(),
        Err(e) => ControlResponse::error(e.to_string()),
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

    use fissile_proto::control::{ControlRequest, ControlResponse, VmState, VmStatus};

    use super::ApiServer;
    use crate::builder::VmmHandle;
    use crate::vstate::vcpu::{RunControl, Target, VmExit};

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
        let server =
            ApiServer::start(&path, VmmHandle::from_control(control.clone(), 2, 256)).unwrap();
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
        assert!(!garbage.ok && garbage.error.unwrap().starts_with("bad request"));
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
        let _server = ApiServer::start(&path, VmmHandle::from_control(control, 1, 64)).unwrap();
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
