//! Client library for the snapshotd daemon (used by the VMM, tools and tests).
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use fissile_snapshotd_client::client::{Client, LazyMemory};
//! let client = Client::connect("/run/fissile/snapshotd.sock".as_ref())?;
//! // Map a snapshot's memory lazily: pages arrive from snapshotd on first touch.
//! let mem = LazyMemory::restore(client, "0123abcd", None)?;
//! let _first = mem.mapping().touch(0);
//! // If the page server dies, `mem.session().failure()` reports it within the heartbeat
//! // timeout; the VMM must then stop the VM (faulting vCPUs cannot make progress).
//! # Ok(()) }
//! ```

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use fissile_proto::frame::FrameError;
use fissile_proto::snapshotd::{
    ErrorCode, HEARTBEAT_TIMEOUT_MS, LABEL_FLATTENED_FROM, MAX_BLOB_PIECE, MAX_PAGES_PER_MESSAGE,
    Region, Request, Response, SnapshotInfo,
};
use userfaultfd::{RegisterMode, Uffd, UffdBuilder};

use crate::fdio::FdStream;
use crate::sys::Mapping;

/// Called once, on the session's watchdog thread, with the reason the page server failed.
pub type FailureCallback = Box<dyn Fn(&str) + Send>;

/// What a fault session's watchdog thread runs besides watching.
#[derive(Default)]
pub struct SessionHooks {
    /// Runs first on the watchdog thread, before it reads anything from the daemon (the VMM
    /// installs the thread's seccomp filter here).
    pub thread_start: Option<fn()>,
    /// Runs once, on the watchdog thread, when the page server fails or goes silent for
    /// [`HEARTBEAT_TIMEOUT_MS`].
    pub on_failure: Option<FailureCallback>,
}

impl std::fmt::Debug for SessionHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHooks")
            .field("thread_start", &self.thread_start.is_some())
            .field("on_failure", &self.on_failure.is_some())
            .finish()
    }
}

/// How long a request may take (a create of a large image reads all of it).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("connecting to snapshotd at {0}")]
    Connect(PathBuf, #[source] io::Error),
    /// The connection failed (includes the daemon dying: end of stream).
    #[error("snapshotd connection")]
    Frame(#[source] FrameError),
    /// The daemon refused the request.
    #[error("snapshotd refused the request ({code:?}): {message}")]
    Daemon {
        /// Category.
        code: ErrorCode,
        /// Cause.
        message: String,
    },
    /// The daemon answered with something unexpected.
    #[error("unexpected reply from snapshotd: {0}")]
    Unexpected(String),
    /// A reply that should carry a descriptor did not.
    #[error("snapshotd reply carried no descriptor")]
    MissingFd,
    /// A local system call failed.
    #[error("{0}")]
    Sys(&'static str, #[source] io::Error),
    /// Creating or registering the userfaultfd failed.
    #[error("userfaultfd {0}")]
    Uffd(&'static str, #[source] userfaultfd::Error),
}

/// What to snapshot (the memory itself is passed as a descriptor).
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Bytes of memory (from offset 0 of the descriptor).
    pub memory_size: u64,
    /// Page size (0 means 4096).
    pub page_size: u32,
    /// Layer on this snapshot.
    pub parent: Option<String>,
    /// With a parent: only these pages changed.
    pub dirty_pages: Option<Vec<u64>>,
    /// First-touch order for prefetch.
    pub touch_order: Vec<u64>,
    /// VM-state blobs.
    pub blobs: Vec<(String, Vec<u8>)>,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Hand the memfd over as the snapshot's image (it must be sealed, see
    /// [`seal_for_adoption`]); with `dirty_pages` it holds only those pages.
    pub adopt: bool,
    /// Return before the snapshot is durable (adopting creates only): the image is usable at
    /// once and the store ingests it in the background ([`Client::wait_durable`]).
    pub no_wait_durable: bool,
}

/// Seals a memfd (created with `MFD_ALLOW_SEALING`) for [`CreateOptions::adopt`]: no more
/// writes through `write(2)` or new shared mappings, no size change. Existing shared
/// writable mappings must be gone first (the daemon trusts that they are).
pub fn seal_for_adoption(memfd: &File) -> io::Result<()> {
    crate::sys::add_seals(memfd, crate::sys::ADOPT_SEALS)
}

/// A snapshot's shared image, as handed out by the daemon.
#[derive(Debug)]
pub struct OpenedImage {
    /// Read-only descriptor of the image memfd: map it `MAP_PRIVATE`.
    pub memfd: File,
    /// Bytes.
    pub memory_size: u64,
    /// Page size.
    pub page_size: u32,
    /// Every page is in the memfd: it can be mapped without a fault session.
    pub complete: bool,
    /// The image object's number: name it in the fault session's regions.
    pub instance: u64,
}

/// A fork's layer that maps without a fault session ([`Client::open_layer`]).
#[derive(Debug)]
pub struct OpenedLayer {
    /// The layer's parent, which holds every page the layer does not: with `below` 0 its
    /// image is complete ([`Client::open_image`]), else it is a layer too
    /// ([`Client::open_layer`]).
    pub base: String,
    /// How many of the images from `base` down to the complete one are layers.
    pub below: u32,
    /// Read-only descriptor of the memfd holding the layer's own pages at their offsets:
    /// map it privately over the base at `runs`.
    pub pages: File,
    /// Bytes.
    pub memory_size: u64,
    /// Page size.
    pub page_size: u32,
    /// The layer's own pages as `(first page, pages)`, ascending, apart.
    pub runs: Vec<(u64, u64)>,
}

impl OpenedImage {
    /// Maps the image copy-on-write.
    pub fn map_private(&self) -> io::Result<Mapping> {
        let len = usize::try_from(self.memory_size)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        Mapping::private(self.memfd.as_fd(), len)
    }
}

/// What a running daemon reports about itself (`Stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DaemonStats {
    /// Durable snapshots in the store.
    pub snapshots: u64,
    /// Distinct chunks (pages) stored.
    pub chunks: u64,
    /// Raw bytes of all chunks.
    pub raw_bytes: u64,
    /// Bytes on disk in packs.
    pub pack_bytes: u64,
    /// Snapshot images open in the daemon.
    pub images: u64,
    /// Memory those images hold.
    pub image_bytes: u64,
    /// Faults served since the daemon started.
    pub faults_served: u64,
}

/// Where a running daemon's heap goes (`Memory`).
pub use fissile_proto::snapshotd::MemoryFigures as DaemonMemory;

/// A connection to snapshotd.
#[derive(Debug)]
pub struct Client {
    conn: FdStream,
}

impl Client {
    /// Connects to the daemon's socket.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream =
            UnixStream::connect(path).map_err(|e| ClientError::Connect(path.to_path_buf(), e))?;
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .map_err(|e| ClientError::Sys("set_read_timeout", e))?;
        // A daemon that stops reading cannot hold a request's writer forever either.
        stream
            .set_write_timeout(Some(REQUEST_TIMEOUT))
            .map_err(|e| ClientError::Sys("set_write_timeout", e))?;
        Ok(Client {
            conn: FdStream::new(stream),
        })
    }

    fn call(&mut self, req: &Request, fd: Option<&dyn AsFd>) -> Result<Response, ClientError> {
        self.conn.write_msg(req, fd).map_err(ClientError::Frame)?;
        let resp: Response = self.conn.read_msg().map_err(ClientError::Frame)?;
        match resp {
            Response::Error { code, message } => Err(ClientError::Daemon { code, message }),
            other => Ok(other),
        }
    }

    fn call_ok(&mut self, req: &Request, fd: Option<&dyn AsFd>) -> Result<(), ClientError> {
        match self.call(req, fd)? {
            Response::Ok => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Liveness check.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        match self.call(&Request::Ping, None)? {
            Response::Pong => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Snapshots `memory` (a memfd or file); returns the id once the snapshot is durable.
    pub fn create_snapshot(
        &mut self,
        memory: &dyn AsFd,
        opts: &CreateOptions,
    ) -> Result<String, ClientError> {
        let begin = Request::CreateBegin {
            memory_size: opts.memory_size,
            page_size: if opts.page_size == 0 {
                4096
            } else {
                opts.page_size
            },
            parent: opts.parent.clone(),
            dirty_only: opts.dirty_pages.is_some(),
            labels: opts.labels.clone(),
            adopt: opts.adopt,
        };
        self.call_ok(&begin, Some(memory))?;
        let result = self.create_rest(opts);
        if result.is_err() {
            let _ = self.call_ok(&Request::CreateAbort, None);
        }
        result
    }

    fn create_rest(&mut self, opts: &CreateOptions) -> Result<String, ClientError> {
        for piece in opts
            .dirty_pages
            .as_deref()
            .unwrap_or(&[])
            .chunks(MAX_PAGES_PER_MESSAGE)
        {
            self.call_ok(
                &Request::CreatePages {
                    pages: piece.to_vec(),
                },
                None,
            )?;
        }
        for piece in opts.touch_order.chunks(MAX_PAGES_PER_MESSAGE) {
            self.call_ok(
                &Request::CreateTouchOrder {
                    pages: piece.to_vec(),
                },
                None,
            )?;
        }
        for (name, data) in &opts.blobs {
            if data.is_empty() {
                self.call_ok(
                    &Request::CreateBlob {
                        name: name.clone(),
                        data: Vec::new(),
                    },
                    None,
                )?;
            }
            for piece in data.chunks(MAX_BLOB_PIECE) {
                self.call_ok(
                    &Request::CreateBlob {
                        name: name.clone(),
                        data: piece.to_vec(),
                    },
                    None,
                )?;
            }
        }
        let commit = Request::CreateCommit {
            wait_durable: !(opts.adopt && opts.no_wait_durable),
        };
        match self.call(&commit, None)? {
            Response::Created { id, .. } => Ok(id),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Blocks until `snapshot` is durable in the store.
    pub fn wait_durable(&mut self, snapshot: &str) -> Result<(), ClientError> {
        self.call_ok(
            &Request::WaitDurable {
                snapshot: snapshot.to_string(),
            },
            None,
        )
    }

    /// Gets the shared image of `snapshot`.
    pub fn open_image(&mut self, snapshot: &str) -> Result<OpenedImage, ClientError> {
        match self.call(
            &Request::OpenImage {
                snapshot: snapshot.to_string(),
            },
            None,
        )? {
            Response::ImageOpened {
                memory_size,
                page_size,
                complete,
                instance,
                snapshot: opened,
            } if opened == snapshot => {
                let fd: OwnedFd = self.conn.take_fd().ok_or(ClientError::MissingFd)?;
                Ok(OpenedImage {
                    memfd: File::from(fd),
                    memory_size,
                    page_size,
                    complete,
                    instance,
                })
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Gets `snapshot` as a layer over a complete image (through other layers, see
    /// [`OpenedLayer::below`]), if it is one the daemon can hand out that way (a fork's layer
    /// whose parents' images are open); a daemon error ([`ClientError::Daemon`]) otherwise,
    /// and then [`Client::open_image`] is the way.
    pub fn open_layer(&mut self, snapshot: &str) -> Result<OpenedLayer, ClientError> {
        match self.call(
            &Request::OpenLayer {
                snapshot: snapshot.to_string(),
            },
            None,
        )? {
            Response::LayerOpened {
                base,
                below,
                memory_size,
                page_size,
                runs,
            } => {
                let fd: OwnedFd = self.conn.take_fd().ok_or(ClientError::MissingFd)?;
                Ok(OpenedLayer {
                    base,
                    below,
                    pages: File::from(fd),
                    memory_size,
                    page_size,
                    runs,
                })
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Describes a snapshot.
    pub fn info(&mut self, snapshot: &str) -> Result<SnapshotInfo, ClientError> {
        match self.call(
            &Request::Info {
                snapshot: snapshot.to_string(),
            },
            None,
        )? {
            Response::Info(i) => Ok(i),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Reads a whole blob.
    pub fn get_blob(&mut self, snapshot: &str, name: &str) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        loop {
            let req = Request::GetBlob {
                snapshot: snapshot.to_string(),
                name: name.to_string(),
                offset: out.len() as u64,
            };
            match self.call(&req, None)? {
                Response::Blob { total_len, data } => {
                    let done = data.is_empty();
                    out.extend_from_slice(&data);
                    if out.len() as u64 >= total_len || done {
                        return Ok(out);
                    }
                }
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Lists snapshots.
    pub fn list(&mut self) -> Result<Vec<SnapshotInfo>, ClientError> {
        Ok(self.list_truncated()?.0)
    }

    /// [`Client::list`], and whether the daemon has more than it lists (`MAX_LIST`).
    pub fn list_truncated(&mut self) -> Result<(Vec<SnapshotInfo>, bool), ClientError> {
        match self.call(&Request::List, None)? {
            Response::List {
                snapshots,
                truncated,
            } => Ok((snapshots, truncated)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Lets the jailed VMM of `uid` read `snapshots` and their ancestors (`reset`: instead
    /// of what it was granted before). Only an orchestrator may.
    pub fn grant(
        &mut self,
        uid: u32,
        snapshots: &[String],
        reset: bool,
    ) -> Result<(), ClientError> {
        self.call_ok(
            &Request::Grant {
                uid,
                snapshots: snapshots.to_vec(),
                reset,
            },
            None,
        )
    }

    /// Deletes a snapshot.
    pub fn delete(&mut self, snapshot: &str) -> Result<(), ClientError> {
        self.call_ok(
            &Request::Delete {
                snapshot: snapshot.to_string(),
            },
            None,
        )
    }

    /// What the daemon reports about its store, open images and faults served.
    pub fn stats(&mut self) -> Result<DaemonStats, ClientError> {
        match self.call(&Request::Stats, None)? {
            Response::Stats {
                snapshots,
                chunks,
                raw_bytes,
                pack_bytes,
                images,
                image_bytes,
                faults_served,
            } => Ok(DaemonStats {
                snapshots,
                chunks,
                raw_bytes,
                pack_bytes,
                images,
                image_bytes,
                faults_served,
            }),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Where the daemon's heap goes: the index's cache, memtables and table readers, and
    /// what malloc holds in use and free.
    pub fn memory(&mut self) -> Result<DaemonMemory, ClientError> {
        match self.call(&Request::Memory, None)? {
            Response::Memory(figures) => Ok(figures),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Hands `uffd` and its regions to the daemon; this connection becomes the fault
    /// session, watched by a thread that runs `hooks`.
    pub fn serve_faults(
        mut self,
        uffd: &dyn AsFd,
        regions: Vec<Region>,
        hooks: SessionHooks,
    ) -> Result<FaultSession, ClientError> {
        match self.call(&Request::ServeFaults { regions }, Some(uffd))? {
            Response::FaultSessionStarted => {}
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        }
        let stream = self
            .conn
            .stream()
            .try_clone()
            .map_err(|e| ClientError::Sys("clone socket", e))?;
        stream
            .set_read_timeout(Some(Duration::from_millis(HEARTBEAT_TIMEOUT_MS)))
            .map_err(|e| ClientError::Sys("set_read_timeout", e))?;
        let shared = Arc::new(SessionShared::default());
        let s2 = shared.clone();
        let mut conn = self.conn;
        let thread = std::thread::Builder::new()
            .name("snapshotd-watchdog".into())
            .spawn(move || {
                if let Some(start) = hooks.thread_start {
                    start();
                }
                watchdog(&mut conn, &s2, hooks.on_failure)
            })
            .map_err(|e| ClientError::Sys("spawn watchdog", e))?;
        Ok(FaultSession {
            shared,
            stream,
            thread: Some(thread),
        })
    }
}

#[derive(Debug, Default)]
struct SessionShared {
    failure: Mutex<Option<String>>,
    cv: Condvar,
    faults: AtomicU64,
    prefetched: AtomicU64,
    closing: std::sync::atomic::AtomicBool,
}

fn watchdog(conn: &mut FdStream, shared: &SessionShared, on_failure: Option<FailureCallback>) {
    let reason = loop {
        match conn.read_msg::<Response>() {
            Ok(Response::Heartbeat { faults, prefetched }) => {
                shared.faults.store(faults, Ordering::Relaxed);
                shared.prefetched.store(prefetched, Ordering::Relaxed);
            }
            Ok(Response::SessionFailed { message }) => {
                break format!("page server failed: {message}");
            }
            Ok(other) => break format!("page server sent {other:?}"),
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break format!("page server silent for {HEARTBEAT_TIMEOUT_MS} ms");
            }
            Err(FrameError::Eof) => break "page server gone (connection closed)".to_string(),
            Err(e) => break format!("page server gone: {}", crate::error_chain(&e)),
        }
    };
    if shared.closing.load(Ordering::Relaxed) {
        return;
    }
    tracing::error!(%reason, "fault session lost");
    *shared
        .failure
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason.clone());
    shared.cv.notify_all();
    if let Some(cb) = on_failure {
        cb(&reason);
    }
}

/// A running fault session (client side). Dropping it ends the session.
#[derive(Debug)]
pub struct FaultSession {
    shared: Arc<SessionShared>,
    stream: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl FaultSession {
    /// Why the page server failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits up to `timeout` for a failure; `None` if the session is still healthy.
    pub fn wait_failure(&self, timeout: Duration) -> Option<String> {
        let g = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (g, _) = self
            .shared
            .cv
            .wait_timeout_while(g, timeout, |f| f.is_none())
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.clone()
    }

    /// (faults served, pages prefetched) as of the last heartbeat.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.shared.faults.load(Ordering::Relaxed),
            self.shared.prefetched.load(Ordering::Relaxed),
        )
    }
}

impl Drop for FaultSession {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A snapshot mapped lazily into this process: a private view of the shared image,
/// registered with userfaultfd and served by snapshotd.
#[derive(Debug)]
pub struct LazyMemory {
    // Field order matters: the session ends before the uffd closes, and the mapping goes last.
    session: FaultSession,
    uffd: Uffd,
    mapping: Mapping,
    image: OpenedImage,
}

impl LazyMemory {
    /// Opens `snapshot`'s image on `client`, maps it privately, registers it with a new
    /// userfaultfd and hands that to the daemon (consuming the connection).
    pub fn restore(
        mut client: Client,
        snapshot: &str,
        on_failure: Option<FailureCallback>,
    ) -> Result<LazyMemory, ClientError> {
        let image = client.open_image(snapshot)?;
        let mapping = image
            .map_private()
            .map_err(|e| ClientError::Sys("mmap image", e))?;
        let uffd = new_uffd()?;
        register_missing(&uffd, &mapping)?;
        let regions = vec![Region {
            base: mapping.addr(),
            len: mapping.len() as u64,
            snapshot: snapshot.to_string(),
            offset: 0,
            instance: image.instance,
        }];
        let hooks = SessionHooks {
            thread_start: None,
            on_failure,
        };
        let session = client.serve_faults(&uffd, regions, hooks)?;
        Ok(LazyMemory {
            session,
            uffd,
            mapping,
            image,
        })
    }

    /// The private view.
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// The session (failure reporting, progress).
    pub fn session(&self) -> &FaultSession {
        &self.session
    }

    /// The image descriptor.
    pub fn image(&self) -> &OpenedImage {
        &self.image
    }

    /// The userfaultfd.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }
}

/// Creates a non-blocking, close-on-exec userfaultfd that also sees faults taken by the
/// kernel on the process's behalf (KVM guest accesses).
pub fn new_uffd() -> Result<Uffd, ClientError> {
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .map_err(|e| ClientError::Uffd("create", e))
}

/// Registers `len` bytes at `addr` (a private view of an image in this process) with `uffd`
/// in MISSING mode, for callers that own their mapping (a VMM's guest RAM).
pub fn register_missing_at(uffd: &Uffd, addr: *mut u8, len: usize) -> Result<(), ClientError> {
    uffd.register_with_mode(addr.cast(), len, RegisterMode::MISSING)
        .map(|_| ())
        .map_err(|e| ClientError::Uffd("register", e))
}

/// Registers `mapping` with `uffd` in MISSING mode.
pub fn register_missing(uffd: &Uffd, mapping: &Mapping) -> Result<(), ClientError> {
    uffd.register_with_mode(
        mapping.as_ptr().cast(),
        mapping.len(),
        RegisterMode::MISSING,
    )
    .map(|_| ())
    .map_err(|e| ClientError::Uffd("register", e))
}

/// The snapshot `info` describes was made over: its parent, or, where the store wrote it as
/// a full manifest because its chain had grown too long, the parent it records it was
/// flattened from ([`LABEL_FLATTENED_FROM`]; only the daemon sets it, creates that give a
/// reserved label are refused). What a lineage check follows.
pub fn made_over(info: &SnapshotInfo) -> Option<String> {
    info.parent.clone().or_else(|| {
        info.labels
            .iter()
            .find(|(k, _)| k == LABEL_FLATTENED_FROM)
            .map(|(_, v)| v.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(parent: Option<&str>, labels: &[(&str, &str)]) -> SnapshotInfo {
        SnapshotInfo {
            id: "s".into(),
            memory_size: 4096,
            page_size: 4096,
            parent: parent.map(String::from),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            blobs: Vec::new(),
            created_unix_ms: 0,
            durable: true,
        }
    }

    #[test]
    fn a_snapshot_is_made_over_its_parent_or_what_the_store_flattened_it_from() {
        assert_eq!(made_over(&info(Some("p"), &[])).as_deref(), Some("p"));
        let flat = info(None, &[("x", "y"), (LABEL_FLATTENED_FROM, "f")]);
        assert_eq!(made_over(&flat).as_deref(), Some("f"));
        assert_eq!(made_over(&info(None, &[("x", "y")])), None);
    }
}
