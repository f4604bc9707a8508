//! The agent's request server: accepts connections (unix socket on a host, vsock in a
//! guest), one thread per connection, one request at a time per connection.

use std::fs::File;
use std::io::{self, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fissile_proto::agent::{
    AGENT_FRAME_CAP, AGENT_PROTOCOL_VERSION, AgentInfo, FailureKind, Request, Response,
};
use fissile_proto::frame::{FrameError, read_frame, write_frame};

use crate::repl::ReplManager;
use crate::{files, shell, sys};

/// Most connections served at once; more are answered `Failed { Busy }` and closed.
pub const MAX_CONNECTIONS: usize = 128;
/// A client that does not read its responses for this long is disconnected.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// True as the guest's init: `AfterRestore` and `Poweroff` act on the machine.
    pub guest_mode: bool,
    /// Python interpreter for the REPL (a path, or a name looked up in `PATH`).
    pub python: String,
}

/// Errors of the accept loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding the unix socket failed.
    #[error("cannot listen on unix socket {0}")]
    BindUnix(String, #[source] io::Error),
    /// Creating the vsock listener failed.
    #[error("cannot listen on vsock port {0}")]
    BindVsock(u32, #[source] io::Error),
    /// `accept` failed in a way that will not go away.
    #[error("accept failed")]
    Accept(#[source] io::Error),
}

/// The agent: shared by all connections.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    repl: ReplManager,
    started: Instant,
    connections: AtomicUsize,
}

impl Agent {
    /// Creates the agent; its Python interpreter starts in the background once it listens.
    pub fn new(config: AgentConfig) -> Arc<Agent> {
        Arc::new(Agent {
            repl: ReplManager::new(config.python.clone()),
            config,
            started: Instant::now(),
            connections: AtomicUsize::new(0),
        })
    }

    /// Binds a unix socket at `path` (replacing a stale socket file).
    pub fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
        let _ = std::fs::remove_file(path);
        UnixListener::bind(path).map_err(|e| ServeError::BindUnix(path.display().to_string(), e))
    }

    /// Serves connections from a bound unix listener forever.
    pub fn serve_unix(self: &Arc<Self>, listener: UnixListener) -> Result<(), ServeError> {
        let fd = OwnedFd::from(listener);
        self.repl.prestart();
        self.serve_fd(&fd)
    }

    /// Listens on AF_VSOCK `port` (any CID) and serves forever.
    /// Once listening, signals readiness to the host (see
    /// [`fissile_proto::agent::AGENT_READY_PORT`]).
    pub fn serve_vsock(self: &Arc<Self>, port: u32) -> Result<(), ServeError> {
        let fd = sys::vsock_listen(port).map_err(|e| ServeError::BindVsock(port, e))?;
        // Readiness first, then the interpreter: on a one-vCPU guest the interpreter's start
        // (reading python3 and its libraries from the root image) would delay the signal.
        let agent = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("ready".into())
            .spawn(move || {
                signal_ready();
                agent.repl.prestart();
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the readiness thread");
            self.repl.prestart();
        }
        self.serve_fd(&fd)
    }

    fn serve_fd(self: &Arc<Self>, listener: &OwnedFd) -> Result<(), ServeError> {
        let mut failures = 0u32;
        loop {
            let conn = match sys::accept(listener) {
                Ok(c) => {
                    failures = 0;
                    c
                }
                Err(e) => {
                    // EMFILE and friends: back off and retry; give up only if it persists.
                    tracing::error!(error = %e, "accept failed");
                    failures += 1;
                    if failures > 100 {
                        return Err(ServeError::Accept(e));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let conn = File::from(conn);
            if self.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                self.connections.fetch_sub(1, Ordering::SeqCst);
                let mut c = conn;
                let _ = write_frame(
                    &mut c,
                    AGENT_PROTOCOL_VERSION,
                    &Response::Failed {
                        kind: FailureKind::Busy,
                        message: format!("more than {MAX_CONNECTIONS} connections"),
                    },
                );
                continue;
            }
            let agent = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("conn".into())
                .spawn(move || {
                    agent.handle(conn);
                    agent.connections.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a connection thread");
                self.connections.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Serves one connection until the client closes it or breaks the framing.
    fn handle(&self, conn: File) {
        if let Err(e) = sys::set_send_timeout(conn.as_raw_fd(), SEND_TIMEOUT) {
            tracing::debug!(error = %e, "cannot set the send timeout");
        }
        let mut writer = match conn.try_clone() {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot clone the connection");
                return;
            }
        };
        // A running cell watches this to learn that its client went away.
        let peer = writer.as_raw_fd();
        let mut reader = BufReader::with_capacity(64 << 10, conn);
        let mut send = |r: Response| write_frame(&mut writer, AGENT_PROTOCOL_VERSION, &r).is_ok();
        loop {
            let req = match read_frame::<_, Request>(
                &mut reader,
                AGENT_PROTOCOL_VERSION,
                AGENT_FRAME_CAP,
            ) {
                Ok(r) => r,
                Err(FrameError::Eof) => return,
                Err(e) => {
                    let keep = e.is_recoverable() || matches!(e, FrameError::Empty);
                    if !matches!(e, FrameError::Io(_)) {
                        send(bad_frame(&e));
                    }
                    if keep {
                        continue;
                    }
                    return;
                }
            };
            self.dispatch(req, &mut send, peer);
        }
    }

    /// Serves one request; `peer` is the connection it came on (for a cell to watch).
    fn dispatch(
        &self,
        req: Request,
        send: &mut dyn FnMut(Response) -> bool,
        peer: std::os::fd::RawFd,
    ) {
        match req {
            Request::Echo { payload } => {
                send(Response::EchoReply(payload));
            }
            Request::Info => {
                send(Response::Info(self.info()));
            }
            Request::Exec(e) => self.repl.exec(&e, send, Some(peer)),
            Request::Shell(s) => shell::run(&s, send),
            Request::WriteFile {
                path,
                data,
                append,
                mode,
            } => {
                send(files::write(&path, &data, append, mode));
            }
            Request::ReadFile {
                path,
                offset,
                max_len,
            } => {
                send(files::read(&path, offset, max_len));
            }
            Request::ListDir { path } => {
                send(files::list(&path));
            }
            Request::Remove { path, recursive } => {
                send(files::remove(&path, recursive));
            }
            Request::Interrupt => {
                send(Response::Interrupted {
                    was_running: self.repl.interrupt(),
                });
            }
            Request::AfterRestore {
                entropy,
                wall_clock_ns,
            } => {
                send(self.after_restore(&entropy, wall_clock_ns));
            }
            Request::Poweroff => {
                send(Response::Ok);
                self.poweroff();
            }
        }
    }

    fn info(&self) -> AgentInfo {
        AgentInfo {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol_version: AGENT_PROTOCOL_VERSION,
            guest_mode: self.config.guest_mode,
            pid: std::process::id(),
            uptime_ns: u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            python_version: self.repl.python_version(),
            execution_count: self.repl.execution_count(),
            hostname: sys::hostname(),
        }
    }

    fn after_restore(&self, entropy: &[u8], wall_clock_ns: u64) -> Response {
        if !self.config.guest_mode {
            return Response::Failed {
                kind: FailureKind::Unsupported,
                message: "AfterRestore changes the machine's CRNG and clock: guest mode only"
                    .into(),
            };
        }
        if let Err(e) = sys::add_entropy_and_reseed(entropy) {
            return Response::Failed {
                kind: FailureKind::Io,
                message: format!("cannot reseed the kernel CRNG: {e}"),
            };
        }
        if let Err(e) = sys::set_wall_clock(wall_clock_ns) {
            return Response::Failed {
                kind: FailureKind::Io,
                message: format!("cannot set the wall clock: {e}"),
            };
        }
        Response::Ok
    }

    fn poweroff(&self) -> ! {
        self.repl.kill();
        if self.config.guest_mode {
            // Everything but us; then flush and reset (the VMM treats reset as poweroff).
            let _ = sys::kill(-1, libc::SIGKILL);
            let e = sys::sync_and_reboot();
            tracing::error!(error = %e, "reboot failed");
        }
        std::process::exit(0)
    }
}

/// Tells the host we listen: one line to host port AGENT_READY_PORT. Nobody listening there
/// (an older host, a restore) is fine: the connection is refused and that is all.
fn signal_ready() {
    use std::io::Write;
    match sys::vsock_connect(
        libc::VMADDR_CID_HOST,
        fissile_proto::agent::AGENT_READY_PORT,
    ) {
        Ok(fd) => {
            let mut f = File::from(fd);
            let line = format!("READY {}\n", env!("CARGO_PKG_VERSION"));
            if let Err(e) = f.write_all(line.as_bytes()) {
                tracing::debug!(error = %e, "readiness signal not delivered");
            }
        }
        Err(e) => tracing::debug!(error = %e, "no host listener for the readiness signal"),
    }
}

fn bad_frame(e: &FrameError) -> Response {
    let detail = std::error::Error::source(e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    Response::Failed {
        kind: FailureKind::BadFrame,
        message: format!("{e}{detail}"),
    }
}

/// Syncs and resets the machine (PID 1 must never exit); exits if even that fails.
pub fn fatal_poweroff() -> ! {
    let e = sys::sync_and_reboot();
    tracing::error!(error = %e, "reboot failed");
    std::process::exit(1)
}
