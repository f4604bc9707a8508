//! The daemon: a unix-socket server over a [`Store`].
//!
//! One thread per connection (capped at [`MAX_CONNECTIONS`]; a connection idle for
//! [`IDLE_TIMEOUT`] is closed); a connection that starts a fault session becomes that
//! session's fault-service thread. Every request is validated against the limits in
//! [`fissile_proto::snapshotd`] before anything is allocated from its numbers; a malformed
//! frame gets an `Error` reply (or, when the stream can no longer be trusted, the connection
//! is closed), never a crash. Peers are identified with `SO_PEERCRED` and must run as the
//! daemon's uid or root.
//!
//! Memory: open images stay within a budget ([`image::Images`]); a snapshot whose image is
//! in use (a VM restored lazily from it, a layered child) cannot be deleted.

pub mod faults;
pub mod heartbeat;
pub mod image;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fissile_proto::frame::FrameError;
use fissile_proto::snapshotd::{
    ErrorCode, MAX_BLOB_PIECE, MAX_BLOBS_TOTAL, MAX_GRANT, MAX_LABELS, MAX_LAYER_DEPTH,
    MAX_LAYER_RUNS, MAX_LIST, MAX_NAME_LEN, MAX_PAGES_PER_MESSAGE, MAX_REGIONS,
    RESERVED_LABEL_PREFIX, Region, Request, Response, SnapshotInfo,
};
use userfaultfd::Uffd;

use self::faults::{Session, SessionRegion};
use self::heartbeat::Heart;
use self::image::{Image, Images};
use crate::fdio::FdStream;
use crate::store::manifest::BlobRef;
use crate::store::{
    CompactPolicy, CreateError, CreateRequest, DeleteError, FileSource, ReadError, Store, ViewError,
};
use crate::sys;

/// Most concurrent connections.
pub const MAX_CONNECTIONS: usize = 512;
/// A reply that cannot be written within this time closes the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Who a connection's peer is, for what it may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// Root or our own uid: the orchestrator (or a VMM that is not jailed).
    Orchestrator,
    /// A jailed VMM (the `--vmm-gid` group), by uid.
    Vmm(u32),
}

/// Ancestors recorded with one grant.
const MAX_GRANT_DEPTH: usize = 256;
/// Snapshots one VMM may be granted before its set starts over.
const MAX_GRANTS_PER_VMM: usize = 65_536;

/// A connection that sends no request for this long is closed (fault sessions excepted).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// What an `OpenLayer` refusal of a snapshot that is no layer says.
const NOT_A_LAYER: &str = "is not a layer";

/// Flattens `image` (snapshot `id`, just ingested) when it has `at_least` layers below it
/// ([`image::FLATTEN_BELOW`] unless configured): a few more rounds of fork and merge would
/// outgrow `MAX_LAYER_DEPTH`. Layers over it then chain from it.
fn flatten_if_deep(id: &str, image: &image::Image, at_least: u32) {
    if image.layers_below().is_none_or(|below| below < at_least) {
        return;
    }
    let t0 = Instant::now();
    match image.flatten() {
        Ok(true) => tracing::info!(
            snapshot = %id, pages = image.materialized_pages(),
            ms = t0.elapsed().as_millis() as u64, "flattened a deep layer"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(
            snapshot = %id, error = %crate::error_chain(&e),
            "flattening a deep layer failed (it stays layered)"
        ),
    }
}

/// The nice value of the daemon's background work: the ingest of adopted images (and the
/// hashing and compression threads it starts) and storing a fault session's first-touch
/// orders. Nobody waits on it but a durable snapshot's caller, while a guest whose VMM shares
/// the CPU waits on every tick it takes. Nice ranks threads within one cgroup: against the
/// daemon's own serving threads (faults, requests), and against VMMs in the same cgroup (no
/// cgroups, as in the lab's benchmarks), a thread at nice 10 gets about a tenth of a CPU
/// beside one busy thread at nice 0, and all of an idle one. VMMs in cgroups of their own
/// (fissiled as root on cgroup v2) share the CPU with the daemon by the cgroups' weights.
/// Housekeeping keeps the daemon's priority: `malloc_trim` holds malloc's locks, which the
/// serving threads need.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling background thread's priority to [`BACKGROUND_NICE`]; a failure costs
/// only the priority, so it is logged.
fn run_in_background(what: &str) {
    if let Err(e) = crate::process::lower_thread_priority(BACKGROUND_NICE) {
        tracing::warn!(thread = what, error = %e, "cannot lower the thread's priority");
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding the socket failed.
    #[error("binding {0}")]
    Bind(String, #[source] io::Error),
    /// Accepting failed.
    #[error("accepting a connection")]
    Accept(#[source] io::Error),
}

/// Shared daemon state.
#[derive(Debug)]
pub struct Server {
    store: Arc<Store>,
    images: Images,
    shutdown: Shutdown,
    /// Beats for every fault session.
    heart: Heart,
    connections: AtomicUsize,
    /// The gid of jailed VMMs, admitted besides root and our own uid
    /// ([`Server::bind_for_group`]).
    vmm_gid: std::sync::OnceLock<u32>,
    /// What each jailed VMM (by uid) may read: snapshots granted to it or created by it,
    /// with their ancestors.
    grants: Mutex<HashMap<u32, std::collections::HashSet<String>>>,
    /// Adopted snapshots whose background ingest has not finished (or failed).
    pending: Mutex<HashMap<String, PendingSnapshot>>,
    /// Signalled whenever an entry of `pending` finishes.
    ingested: Condvar,
    /// Background ingest jobs, run one at a time in commit order (a layered snapshot's parent
    /// is always ingested before it).
    ingest_tx: Mutex<Option<std::sync::mpsc::Sender<IngestJob>>>,
    /// Faults served by sessions that have stopped serving (live ones are counted by
    /// [`Heart::faults_served`]).
    faults_served: Arc<AtomicU64>,
    /// How long fault sessions keep reading after a fault, in microseconds
    /// ([`faults::spin_for_host`], [`Server::set_fault_spin`]).
    spin_us: AtomicU64,
    /// Layered images with this many layers below them are flattened after their ingest
    /// (0: never; [`Server::set_flatten_below`]).
    flatten_below: AtomicU32,
    /// Wakes the housekeeping thread after a delete ([`Server::start_housekeeping`]).
    compact_wake: Mutex<Option<std::sync::mpsc::SyncSender<()>>>,
}

/// The daemon's stop signal: a flag that its loops look at, and an eventfd that wakes the
/// fault sessions asleep in poll(2).
#[derive(Debug)]
pub struct Shutdown {
    flag: AtomicBool,
    /// Readable once set (never read, so it stays readable); `None` if it could not be
    /// made, and sessions then look at the flag once a second.
    wake: Option<vmm_sys_util::eventfd::EventFd>,
}

impl Shutdown {
    fn new() -> Shutdown {
        let wake = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| tracing::warn!(error = %e, "no shutdown eventfd; fault sessions poll"))
            .ok();
        Shutdown {
            flag: AtomicBool::new(false),
            wake,
        }
    }

    /// Whether the daemon is stopping.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.flag.store(true, Ordering::Release);
        if let Some(w) = &self.wake
            && let Err(e) = w.write(1)
        {
            tracing::warn!(error = %e, "waking fault sessions for the shutdown");
        }
    }

    /// The eventfd to poll for readability, or -1 (poll(2) skips it) if there is none.
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.wake.as_ref().map_or(-1, |w| w.as_raw_fd())
    }
}

/// Gives a connection slot back when a connection thread ends, however it ends.
struct ConnectionSlot<'a>(&'a AtomicUsize);

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An adopted snapshot on its way into the store.
#[derive(Debug)]
struct PendingSnapshot {
    info: SnapshotInfo,
    blobs: BTreeMap<String, Vec<u8>>,
    /// `Some` once the ingest failed: the snapshot stays usable as an image but will never
    /// be durable.
    failed: Option<String>,
}

/// One background ingest.
#[derive(Debug)]
struct IngestJob {
    id: String,
    image: Arc<Image>,
    page_size: u32,
    parent: Option<String>,
    dirty: Option<Vec<u64>>,
    touch: Vec<u64>,
    blobs: BTreeMap<String, Vec<u8>>,
    labels: BTreeMap<String, String>,
}

/// A pending create on one connection.
#[derive(Debug)]
struct PendingCreate {
    memory: FileSource,
    page_size: u32,
    parent: Option<String>,
    dirty: Option<Vec<u64>>,
    touch: Vec<u64>,
    blobs: BTreeMap<String, Vec<u8>>,
    blob_bytes: u64,
    labels: BTreeMap<String, String>,
    adopt: bool,
}

/// A request failure: code + message for the client.
#[derive(Debug)]
struct Fail(ErrorCode, String);

fn bad(msg: impl Into<String>) -> Fail {
    Fail(ErrorCode::BadRequest, msg.into())
}

impl From<ViewError> for Fail {
    fn from(e: ViewError) -> Fail {
        let code = match e {
            ViewError::NotFound(_) => ErrorCode::NotFound,
            ViewError::Corrupt(..) | ViewError::Chain(_) => ErrorCode::Corrupt,
            ViewError::Index(_) => ErrorCode::Internal,
        };
        Fail(code, crate::error_chain(&e))
    }
}

impl From<ReadError> for Fail {
    fn from(e: ReadError) -> Fail {
        let code = match &e {
            ReadError::NoBlob { .. } | ReadError::OutOfRange { .. } => ErrorCode::NotFound,
            ReadError::View(ViewError::NotFound(_)) => ErrorCode::NotFound,
            ReadError::Corrupt { .. } | ReadError::MissingChunk { .. } => ErrorCode::Corrupt,
            _ => ErrorCode::Internal,
        };
        Fail(code, crate::error_chain(&e))
    }
}

/// What a handled request asks the connection loop to do next.
enum Next {
    Reply(Response, Option<File>),
    StartSession(Vec<SessionRegion>, Uffd),
}

impl Server {
    /// Creates the daemon state over an opened store.
    pub fn new(store: Arc<Store>) -> Arc<Server> {
        Self::with_image_budget(store, image::DEFAULT_IMAGE_BUDGET)
    }

    /// [`Server::new`] keeping at most `budget` bytes of unused images.
    pub fn with_image_budget(store: Arc<Store>, budget: u64) -> Arc<Server> {
        faults::prefetch_for_host();
        let (tx, rx) = std::sync::mpsc::channel::<IngestJob>();
        let server = Arc::new(Server {
            store,
            images: Images::new(budget),
            vmm_gid: std::sync::OnceLock::new(),
            grants: Mutex::new(HashMap::new()),
            faults_served: Arc::new(AtomicU64::new(0)),
            spin_us: AtomicU64::new(faults::spin_for_host().as_micros() as u64),
            flatten_below: AtomicU32::new(image::FLATTEN_BELOW),
            shutdown: Shutdown::new(),
            heart: Heart::new(),
            connections: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            ingested: Condvar::new(),
            ingest_tx: Mutex::new(Some(tx)),
            compact_wake: Mutex::new(None),
        });
        let weak = Arc::downgrade(&server);
        let spawned = std::thread::Builder::new()
            .name("snapshotd-ingest".into())
            .spawn(move || {
                run_in_background("ingest");
                for job in rx {
                    let Some(server) = weak.upgrade() else { return };
                    server.ingest(job);
                }
            });
        if let Err(e) = spawned {
            // Without the thread adopting creates fail (send errors), everything else works.
            tracing::error!(error = %e, "could not start the ingest thread");
        }
        server
    }

    /// Housekeeping in the background, after every delete and every `interval`: the index
    /// entries of chunks no snapshot references any more are swept (after a delete or the
    /// daemon's start), the packs `policy` selects (none without one) are rewritten, one at
    /// a time, while the daemon serves (reads go on; an ingest or delete waits at most for
    /// the pack being rewritten or a sweep's drop: its mark runs without the writer lock);
    /// then the heap malloc holds free goes back to the system (what freed images, views
    /// and memtables left), so the daemon's memory follows what it holds.
    pub fn start_housekeeping(self: &Arc<Self>, policy: Option<CompactPolicy>, interval: Duration) {
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("snapshotd-house".into())
            .spawn(move || {
                loop {
                    match rx.recv_timeout(interval) {
                        Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    let Some(server) = weak.upgrade() else { return };
                    if server.shutdown.is_set() {
                        return;
                    }
                    if let Err(e) = server.store.sweep_if_due() {
                        tracing::warn!(error = %crate::error_chain(&e), "sweep failed");
                    }
                    if let Some(policy) = &policy
                        && let Err(e) = server.store.compact(policy)
                    {
                        tracing::warn!(error = %crate::error_chain(&e), "compaction failed");
                    }
                    drop(server);
                    crate::process::release_free_heap();
                }
            });
        match spawned {
            Ok(_) => {
                *self
                    .compact_wake
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
            }
            Err(e) => tracing::error!(error = %e, "could not start the housekeeping thread"),
        }
    }

    fn wake_compactor(&self) {
        if let Some(tx) = self
            .compact_wake
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            // Full: a wake-up is already queued.
            let _ = tx.try_send(());
        }
    }

    fn lock_pending(&self) -> MutexGuard<'_, HashMap<String, PendingSnapshot>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes an adopted image into the store; marks it durable or records the failure.
    fn ingest(&self, job: IngestJob) {
        let t0 = Instant::now();
        let memory = match job.image.ingest_source().try_clone() {
            Ok(file) => FileSource {
                file,
                len: job.image.memory_size(),
            },
            Err(e) => {
                self.finish_ingest(&job.id, Err(format!("cloning the image fd: {e}")));
                return;
            }
        };
        let req = CreateRequest {
            memory: Box::new(memory),
            page_size: job.page_size,
            parent: job.parent,
            dirty_pages: job.dirty,
            blobs: job.blobs,
            labels: job.labels,
            touch_order: job.touch,
        };
        let result = self
            .store
            .create_as(&job.id, &req)
            .map(|out| {
                tracing::info!(
                    snapshot = %job.id, written = out.chunks_written,
                    ms = t0.elapsed().as_millis() as u64, "adopted image is durable"
                );
                if let Err(e) = job.image.set_durable_in(&self.store) {
                    tracing::warn!(
                        snapshot = %job.id, error = %crate::error_chain(&e),
                        "durable, but still layered on its parent's image"
                    );
                }
            })
            .map_err(|e| crate::error_chain(&e));
        let durable = result.is_ok();
        self.finish_ingest(&job.id, result);
        let below = self.flatten_below.load(Ordering::Relaxed);
        if durable && below > 0 {
            flatten_if_deep(&job.id, &job.image, below);
        }
    }

    fn finish_ingest(&self, id: &str, result: Result<(), String>) {
        {
            let mut pending = self.lock_pending();
            match result {
                Ok(()) => {
                    pending.remove(id);
                }
                Err(msg) => {
                    tracing::error!(snapshot = id, error = %msg, "background ingest failed");
                    if let Some(img) = self.images.get(id) {
                        img.set_failed();
                    }
                    if let Some(p) = pending.get_mut(id) {
                        p.failed = Some(msg);
                    }
                }
            }
            self.ingested.notify_all();
        }
        self.trim_images();
    }

    /// Keeps the open images within their budget; forgets snapshots whose ingest failed
    /// once nobody uses their image.
    fn trim_images(&self) {
        let dropped = self.images.trim();
        if !dropped.is_empty() {
            let mut pending = self.lock_pending();
            for id in dropped {
                pending.remove(&id);
            }
            self.ingested.notify_all();
        }
    }

    /// Blocks until `id` is durable; `Err` if its ingest failed or it is unknown.
    fn wait_durable(&self, id: &str) -> Result<(), Fail> {
        let mut pending = self.lock_pending();
        loop {
            match pending.get(id) {
                None => break,
                Some(p) => {
                    if let Some(msg) = &p.failed {
                        return Err(Fail(ErrorCode::Internal, format!("ingest failed: {msg}")));
                    }
                }
            }
            pending = self
                .ingested
                .wait_timeout(pending, Duration::from_millis(500))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if self.shutdown.is_set() {
                return Err(Fail(ErrorCode::Internal, "daemon shutting down".into()));
            }
        }
        drop(pending);
        // Not pending: durable in the store, or unknown.
        self.store.view(id)?;
        Ok(())
    }

    /// Registers an adopted image and queues its ingest; returns the new id.
    fn commit_adopted(&self, p: PendingCreate) -> Result<String, Fail> {
        let id = self.store.new_id();
        let layer = match (&p.parent, &p.dirty) {
            (Some(parent), Some(dirty)) => {
                let parent_img = match self.images.get(parent) {
                    Some(img) => img,
                    None => self
                        .images
                        .get_or_open(&self.store, parent)
                        .map_err(|e| match e {
                            image::ImageError::View(v) => Fail::from(v),
                            other => Fail(ErrorCode::Internal, crate::error_chain(&other)),
                        })?,
                };
                Some((dirty.clone(), parent_img, p.touch.clone()))
            }
            (None, None) => None,
            _ => {
                return Err(bad(
                    "an adopting create is either full (no parent) or dirty_only",
                ));
            }
        };
        let memory_size = p.memory.len;
        let image = Image::adopt(&id, p.memory.file, memory_size, p.page_size, layer)
            .map_err(|e| bad(crate::error_chain(&e)))?;
        let image = Arc::new(image);
        let created_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let info = SnapshotInfo {
            id: id.clone(),
            memory_size,
            page_size: p.page_size,
            parent: p.parent.clone(),
            labels: p.labels.clone().into_iter().collect(),
            blobs: p.blobs.keys().cloned().collect(),
            created_unix_ms,
            durable: false,
        };
        self.lock_pending().insert(
            id.clone(),
            PendingSnapshot {
                info,
                blobs: p.blobs.clone(),
                failed: None,
            },
        );
        self.images.insert(image.clone());
        let job = IngestJob {
            id: id.clone(),
            image,
            page_size: p.page_size,
            parent: p.parent,
            dirty: p.dirty,
            touch: p.touch,
            blobs: p.blobs,
            labels: p.labels,
        };
        let sent = self
            .ingest_tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|tx| tx.send(job).is_ok())
            .unwrap_or(false);
        if !sent {
            self.finish_ingest(&id, Err("the ingest thread is not running".into()));
        }
        Ok(id)
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Binds `path` (replacing a stale socket file).
    pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
        let _ = std::fs::remove_file(path);
        UnixListener::bind(path).map_err(|e| ServeError::Bind(path.display().to_string(), e))
    }

    /// [`Server::bind`] for jailed VMMs of gid `gid` too: the socket is made `0660` and that
    /// group's, and peers of that gid are admitted (besides root and our own uid).
    pub fn bind_for_group(
        self: &Arc<Server>,
        path: &Path,
        gid: u32,
    ) -> Result<UnixListener, ServeError> {
        let listener = Self::bind(path)?;
        fissile_proto::uds::share_with_group(path, gid)
            .map_err(|e| ServeError::Bind(path.display().to_string(), e))?;
        self.admit_group(gid);
        Ok(listener)
    }

    /// Admits peers of gid `gid` (jailed VMMs) besides root and our own uid, on a listener
    /// made elsewhere (`serve --listen-fd`: the spawner bound the socket for that group).
    pub fn admit_group(&self, gid: u32) {
        let _ = self.vmm_gid.set(gid);
    }

    /// Accepts connections forever (until [`Server::shutdown`]).
    pub fn serve(self: &Arc<Server>, listener: UnixListener) -> Result<(), ServeError> {
        for conn in listener.incoming() {
            if self.shutdown.is_set() {
                break;
            }
            let conn = match conn {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ServeError::Accept(e)),
            };
            if self.connections.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
                self.connections.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!("connection limit reached; refusing a client");
                continue;
            }
            let server = self.clone();
            let spawned = std::thread::Builder::new()
                .name("snapshotd-conn".into())
                .spawn(move || {
                    let _slot = ConnectionSlot(&server.connections);
                    server.handle_connection(conn);
                    server.trim_images();
                });
            if let Err(e) = spawned {
                self.connections.fetch_sub(1, Ordering::Relaxed);
                tracing::error!(error = %e, "could not spawn a connection thread");
            }
        }
        Ok(())
    }

    /// Sets how many layered images must lie below a layered one for it to be flattened
    /// after its ingest ([`image::Image::flatten`]; 0: never).
    pub fn set_flatten_below(&self, layers: u32) {
        self.flatten_below.store(layers, Ordering::Relaxed);
    }

    /// Sets how long fault sessions started from now on keep reading their uffd after a
    /// fault (zero: they sleep in poll(2) at once; benchmarks compare the two).
    pub fn set_fault_spin(&self, spin: Duration) {
        self.spin_us
            .store(spin.as_micros() as u64, Ordering::Relaxed);
    }

    /// Asks every loop to stop (fault sessions asleep in poll(2) wake at once).
    pub fn shutdown(&self) {
        self.shutdown.set();
    }

    /// The image of `snapshot`, opened if it is not open yet (`OpenImage`, `OpenLayer`).
    fn open_image(&self, snapshot: &str) -> Result<Arc<Image>, Fail> {
        self.images
            .get_or_open(&self.store, snapshot)
            .map_err(|e| match e {
                image::ImageError::View(v) => Fail::from(v),
                other => Fail(ErrorCode::Internal, crate::error_chain(&other)),
            })
    }

    fn handle_connection(&self, stream: UnixStream) {
        let peer =
            match fissile_proto::uds::trusted_peer_or_group(&stream, self.vmm_gid.get().copied()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "refusing a client");
                    return;
                }
            };
        // SAFETY: getuid has no preconditions and cannot fail.
        let me = unsafe { libc::getuid() };
        let who = match self.vmm_gid.get() {
            Some(g) if peer.gid == *g && peer.uid != 0 && peer.uid != me => Peer::Vmm(peer.uid),
            _ => Peer::Orchestrator,
        };
        let span = tracing::info_span!("conn", pid = peer.pid, uid = peer.uid);
        let _e = span.enter();
        if let Err(e) = stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .and_then(|()| stream.set_read_timeout(Some(IDLE_TIMEOUT)))
        {
            tracing::warn!(error = %e, "setting socket timeouts");
            return;
        }
        let mut conn = FdStream::new(stream);
        let mut pending: Option<PendingCreate> = None;
        loop {
            let req: Request = match conn.read_msg() {
                Ok(r) => r,
                Err(FrameError::Eof) => return,
                Err(e) if e.is_recoverable() => {
                    conn.drop_fds();
                    let msg = crate::error_chain(&e);
                    tracing::warn!(error = %msg, "bad request frame");
                    if self
                        .reply(
                            &mut conn,
                            Response::Error {
                                code: ErrorCode::BadRequest,
                                message: msg,
                            },
                            None,
                        )
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    let msg = crate::error_chain(&e);
                    tracing::warn!(error = %msg, "unusable stream; closing");
                    let _ = self.reply(
                        &mut conn,
                        Response::Error {
                            code: ErrorCode::BadRequest,
                            message: msg,
                        },
                        None,
                    );
                    return;
                }
            };
            // A VMM asks `OpenLayer` first of every snapshot it maps; "not a layer" is an
            // answer then, not a failure worth an operator's attention (a layer with too many
            // runs, which sends a VM to a fault session, still is).
            let probe = matches!(req, Request::OpenLayer { .. });
            let next = self.handle(&mut conn, &mut pending, req, who);
            conn.drop_fds();
            let sent = match next {
                Ok(Next::Reply(resp, fd)) => self.reply(&mut conn, resp, fd),
                Ok(Next::StartSession(regions, uffd)) => {
                    if self
                        .reply(&mut conn, Response::FaultSessionStarted, None)
                        .is_err()
                    {
                        return;
                    }
                    let socket = match conn.stream().try_clone() {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(error = %e, "cloning session socket");
                            return;
                        }
                    };
                    let session = Session::new(
                        uffd,
                        regions,
                        socket,
                        self.faults_served.clone(),
                        Duration::from_micros(self.spin_us.load(Ordering::Relaxed)),
                    );
                    if let Err(e) = session.run(&self.shutdown, &self.heart) {
                        tracing::warn!(error = %crate::error_chain(&e), "fault session failed");
                    }
                    return;
                }
                Err(Fail(code, message)) => {
                    if probe && message.contains(NOT_A_LAYER) {
                        tracing::debug!(%message, "not opened as layers");
                    } else {
                        tracing::info!(?code, %message, "request failed");
                    }
                    self.reply(&mut conn, Response::Error { code, message }, None)
                }
            };
            if sent.is_err() {
                return;
            }
        }
    }

    fn reply(
        &self,
        conn: &mut FdStream,
        resp: Response,
        fd: Option<File>,
    ) -> Result<(), FrameError> {
        conn.write_msg(&resp, fd.as_ref().map(|f| f as &dyn AsFd))
    }

    /// The parent of snapshot `id` (pending or in the store), if it has one.
    fn parent_of(&self, id: &str) -> Option<String> {
        if let Some(p) = self.lock_pending().get(id) {
            return p.info.parent.clone();
        }
        self.store.view(id).ok()?.manifest.parent.clone()
    }

    /// Lets the VMM of `uid` read `id` and its ancestors.
    fn grant(&self, uid: u32, id: &str) {
        let mut chain = vec![id.to_string()];
        while chain.len() < MAX_GRANT_DEPTH
            && let Some(p) = chain.last().and_then(|c| self.parent_of(c))
        {
            chain.push(p);
        }
        let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        let set = grants.entry(uid).or_default();
        if set.len() + chain.len() > MAX_GRANTS_PER_VMM {
            tracing::warn!(
                uid,
                "a VMM's grants reached their cap; forgetting the oldest set"
            );
            set.clear();
        }
        set.extend(chain);
    }

    /// Whether `who` may read snapshot `id`; a VMM gets "not found" for what it may not.
    fn check(&self, who: Peer, id: &str) -> Result<(), Fail> {
        let Peer::Vmm(uid) = who else {
            return Ok(());
        };
        let grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        if grants.get(&uid).is_some_and(|s| s.contains(id)) {
            return Ok(());
        }
        tracing::warn!(
            uid,
            snapshot = id,
            "a VMM asked for a snapshot it was not granted"
        );
        Err(Fail(
            ErrorCode::NotFound,
            format!("no snapshot {id} for this VMM"),
        ))
    }

    fn handle(
        &self,
        conn: &mut FdStream,
        pending: &mut Option<PendingCreate>,
        req: Request,
        who: Peer,
    ) -> Result<Next, Fail> {
        // What a jailed VMM may name: what it was granted or created (and their ancestors).
        match &req {
            Request::CreateBegin {
                parent: Some(p), ..
            } => self.check(who, p)?,
            Request::OpenImage { snapshot }
            | Request::OpenLayer { snapshot }
            | Request::Info { snapshot }
            | Request::WaitDurable { snapshot }
            | Request::GetBlob { snapshot, .. } => self.check(who, snapshot)?,
            Request::ServeFaults { regions } => {
                for r in regions {
                    self.check(who, &r.snapshot)?;
                }
            }
            Request::List | Request::Delete { .. } | Request::Grant { .. }
                if who != Peer::Orchestrator =>
            {
                return Err(bad("a VMM may not list, delete or grant snapshots"));
            }
            Request::Memory if who != Peer::Orchestrator => {
                return Err(bad("a VMM may not ask for the daemon's memory"));
            }
            _ => {}
        }
        let next = self.handle_checked(conn, pending, req)?;
        if let (Peer::Vmm(uid), Next::Reply(Response::Created { id, .. }, _)) = (who, &next) {
            self.grant(uid, id);
        }
        Ok(next)
    }

    fn handle_checked(
        &self,
        conn: &mut FdStream,
        pending: &mut Option<PendingCreate>,
        req: Request,
    ) -> Result<Next, Fail> {
        let ok = |r| Ok(Next::Reply(r, None));
        match req {
            Request::Ping => ok(Response::Pong),
            Request::Grant {
                uid,
                snapshots,
                reset,
            } => {
                if snapshots.len() > MAX_GRANT || snapshots.iter().any(|s| s.len() > MAX_NAME_LEN) {
                    return Err(bad("too many or too long snapshot ids"));
                }
                if reset {
                    self.grants
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&uid);
                }
                for s in &snapshots {
                    self.grant(uid, s);
                }
                ok(Response::Ok)
            }
            Request::CreateBegin {
                memory_size,
                page_size,
                parent,
                dirty_only,
                labels,
                adopt,
            } => {
                let fd = conn.take_fd().ok_or(Fail(
                    ErrorCode::MissingFd,
                    "CreateBegin needs the memory fd".into(),
                ))?;
                if labels.len() > MAX_LABELS
                    || labels
                        .iter()
                        .any(|(k, v)| k.len() > MAX_NAME_LEN || v.len() > MAX_NAME_LEN)
                {
                    return Err(bad("too many or too long labels"));
                }
                if let Some((k, _)) = labels
                    .iter()
                    .find(|(k, _)| k.starts_with(RESERVED_LABEL_PREFIX))
                {
                    return Err(bad(format!(
                        "label {k:?}: labels starting with {RESERVED_LABEL_PREFIX:?} are the \
                         daemon's own"
                    )));
                }
                if parent.as_ref().is_some_and(|p| p.len() > MAX_NAME_LEN) {
                    return Err(bad("parent id too long"));
                }
                if dirty_only && parent.is_none() {
                    return Err(bad("dirty_only needs a parent"));
                }
                // Before anything is sized from them (the adopt path allocates per page).
                crate::store::manifest::check_shape(page_size, memory_size).map_err(|why| {
                    bad(format!(
                        "page size {page_size}, memory size {memory_size}: {why}"
                    ))
                })?;
                let file = File::from(fd);
                let actual = file
                    .metadata()
                    .map_err(|e| bad(format!("memory fd: {e}")))?
                    .len();
                if actual < memory_size {
                    return Err(bad(format!(
                        "memory fd holds {actual} bytes, fewer than {memory_size}"
                    )));
                }
                if adopt {
                    let seals = sys::seals(&file)
                        .map_err(|e| bad(format!("an adopted memory fd must be a memfd: {e}")))?;
                    if seals & sys::ADOPT_SEALS != sys::ADOPT_SEALS || actual != memory_size {
                        return Err(bad(
                            "an adopted memfd must be exactly memory_size bytes and sealed \
                             F_SEAL_FUTURE_WRITE|F_SEAL_SHRINK|F_SEAL_GROW",
                        ));
                    }
                }
                *pending = Some(PendingCreate {
                    memory: FileSource {
                        file,
                        len: memory_size,
                    },
                    page_size,
                    parent,
                    dirty: dirty_only.then(Vec::new),
                    touch: Vec::new(),
                    blobs: BTreeMap::new(),
                    blob_bytes: 0,
                    labels: labels.into_iter().collect(),
                    adopt,
                });
                ok(Response::Ok)
            }
            Request::CreatePages { pages } => {
                let p = pending
                    .as_mut()
                    .ok_or_else(|| bad("no create in progress"))?;
                let max = p.memory.len / u64::from(p.page_size);
                let dirty = p
                    .dirty
                    .as_mut()
                    .ok_or_else(|| bad("create is not dirty_only"))?;
                if pages.len() > MAX_PAGES_PER_MESSAGE
                    || dirty.len() as u64 + pages.len() as u64 > max
                {
                    return Err(bad("too many dirty pages"));
                }
                dirty.extend(pages);
                ok(Response::Ok)
            }
            Request::CreateTouchOrder { pages } => {
                let p = pending
                    .as_mut()
                    .ok_or_else(|| bad("no create in progress"))?;
                let max = p.memory.len / u64::from(p.page_size);
                if pages.len() > MAX_PAGES_PER_MESSAGE
                    || p.touch.len() as u64 + pages.len() as u64 > max
                {
                    return Err(bad("touch order too long"));
                }
                // Checked here, not at ingest: an adopted snapshot is in use long before.
                if pages.iter().any(|&page| page >= max) {
                    return Err(bad("touch order names a page beyond the memory"));
                }
                p.touch.extend(pages);
                ok(Response::Ok)
            }
            Request::CreateBlob { name, data } => {
                let p = pending
                    .as_mut()
                    .ok_or_else(|| bad("no create in progress"))?;
                if name.len() > MAX_NAME_LEN || data.len() > MAX_BLOB_PIECE {
                    return Err(bad("blob name or piece too long"));
                }
                if name.starts_with(crate::store::STORE_BLOB_PREFIX) {
                    return Err(bad(
                        "blob names starting \"snapshotd/\" are the store's own",
                    ));
                }
                if p.blob_bytes + data.len() as u64 > MAX_BLOBS_TOTAL
                    || (!p.blobs.contains_key(&name) && p.blobs.len() >= MAX_LABELS)
                {
                    return Err(bad("blobs too large"));
                }
                p.blob_bytes += data.len() as u64;
                p.blobs.entry(name).or_default().extend_from_slice(&data);
                ok(Response::Ok)
            }
            Request::CreateAbort => {
                *pending = None;
                ok(Response::Ok)
            }
            Request::CreateCommit { wait_durable } => {
                let p = pending.take().ok_or_else(|| bad("no create in progress"))?;
                if p.adopt {
                    let id = self.commit_adopted(p)?;
                    if wait_durable {
                        self.wait_durable(&id)?;
                    }
                    return ok(Response::Created {
                        id,
                        durable: wait_durable,
                    });
                }
                let req = CreateRequest {
                    memory: Box::new(p.memory),
                    page_size: p.page_size,
                    parent: p.parent,
                    dirty_pages: p.dirty,
                    blobs: p.blobs,
                    labels: p.labels,
                    touch_order: p.touch,
                };
                let out = self.store.create(&req).map_err(|e| {
                    let code = match &e {
                        CreateError::Invalid(_) => ErrorCode::BadRequest,
                        CreateError::Parent(v) if matches!(**v, ViewError::NotFound(_)) => {
                            ErrorCode::NotFound
                        }
                        _ => ErrorCode::Internal,
                    };
                    Fail(code, crate::error_chain(&e))
                })?;
                ok(Response::Created {
                    id: out.id,
                    durable: true,
                })
            }
            Request::OpenImage { snapshot } => {
                let img = self.open_image(&snapshot)?;
                let fd = img
                    .client_fd()
                    .map_err(|e| Fail(ErrorCode::Internal, e.to_string()))?;
                Ok(Next::Reply(
                    Response::ImageOpened {
                        instance: img.instance(),
                        snapshot,
                        memory_size: img.memory_size(),
                        page_size: img.page_size(),
                        complete: img.is_complete(),
                    },
                    Some(fd),
                ))
            }
            Request::OpenLayer { snapshot } => {
                let img = self.open_image(&snapshot)?;
                let Some(view) = img.layer_view(MAX_LAYER_DEPTH) else {
                    return Err(bad(format!(
                        "snapshot {snapshot} {NOT_A_LAYER} over a complete open image: open its \
                         image"
                    )));
                };
                if view.runs.len() > MAX_LAYER_RUNS {
                    return Err(bad(format!(
                        "snapshot {snapshot}'s own pages make {} runs (at most {MAX_LAYER_RUNS}): \
                         open its image",
                        view.runs.len()
                    )));
                }
                let fd = sys::reopen_read_only(view.pages)
                    .map_err(|e| Fail(ErrorCode::Internal, format!("reopening the layer: {e}")))?;
                Ok(Next::Reply(
                    Response::LayerOpened {
                        base: view.base,
                        below: view.below,
                        memory_size: img.memory_size(),
                        page_size: img.page_size(),
                        runs: view.runs,
                    },
                    Some(fd),
                ))
            }
            Request::ServeFaults { regions } => {
                let fd = conn.take_fd().ok_or(Fail(
                    ErrorCode::MissingFd,
                    "ServeFaults needs the userfaultfd".into(),
                ))?;
                let regions = self.resolve_regions(&regions)?;
                // SAFETY: `fd` is an owned descriptor we received; ownership moves into the
                // Uffd, which closes it on drop. If it is not a userfaultfd, the first
                // ioctl/read fails and the session ends with an error.
                let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
                Ok(Next::StartSession(regions, uffd))
            }
            Request::Info { snapshot } => {
                if let Some(p) = self.lock_pending().get(&snapshot) {
                    return ok(Response::Info(p.info.clone()));
                }
                let v = self.store.view(&snapshot)?;
                ok(Response::Info(info(&v.manifest)))
            }
            Request::WaitDurable { snapshot } => {
                if snapshot.len() > MAX_NAME_LEN {
                    return Err(bad("snapshot id too long"));
                }
                self.wait_durable(&snapshot)?;
                ok(Response::Ok)
            }
            Request::GetBlob {
                snapshot,
                name,
                offset,
            } => {
                let piece = |blob: &[u8]| -> Result<Next, Fail> {
                    let start = usize::try_from(offset)
                        .ok()
                        .filter(|o| *o <= blob.len())
                        .ok_or_else(|| bad("offset beyond blob"))?;
                    let end = (start + MAX_BLOB_PIECE).min(blob.len());
                    Ok(Next::Reply(
                        Response::Blob {
                            total_len: blob.len() as u64,
                            data: blob[start..end].to_vec(),
                        },
                        None,
                    ))
                };
                let no_blob = || Fail(ErrorCode::NotFound, format!("no blob {name}"));
                if let Some(p) = self.lock_pending().get(&snapshot) {
                    return piece(p.blobs.get(&name).ok_or_else(no_blob)?);
                }
                let v = self.store.view(&snapshot)?;
                match v.manifest.blobs.get(&name) {
                    Some(BlobRef::Inline(b)) => piece(b),
                    Some(BlobRef::Chunks { .. }) => piece(&self.store.read_blob(&snapshot, &name)?),
                    None => Err(no_blob()),
                }
            }
            Request::List => {
                let list = self.store.list()?;
                let truncated = list.len() > MAX_LIST;
                let snapshots = list
                    .into_iter()
                    .take(MAX_LIST)
                    .map(|s| SnapshotInfo {
                        id: s.id,
                        memory_size: s.memory_size,
                        page_size: s.page_size,
                        parent: s.parent,
                        labels: s.labels.into_iter().collect(),
                        blobs: Vec::new(),
                        created_unix_ms: s.created_unix_ms,
                        durable: true,
                    })
                    .collect();
                ok(Response::List {
                    snapshots,
                    truncated,
                })
            }
            Request::Delete { snapshot } => {
                if self.lock_pending().contains_key(&snapshot) {
                    return Err(Fail(
                        ErrorCode::Conflict,
                        format!("snapshot {snapshot} is not durable yet"),
                    ));
                }
                // Checked under the images' lock and marked as being deleted: nothing opens
                // the image or starts a fault session on it until the delete ends, while
                // opens of other snapshots go on as it waits for the store's writer lock.
                self.images
                    .delete_unused(&snapshot, || self.store.delete(&snapshot))
                    .map_err(|users| {
                        Fail(
                            ErrorCode::Conflict,
                            format!(
                                "snapshot {snapshot} is in use ({users} VMs or layered snapshots \
                                 read its image); delete it once they are gone"
                            ),
                        )
                    })?
                    .map_err(|e| {
                        let code = match &e {
                            DeleteError::View(ViewError::NotFound(_)) => ErrorCode::NotFound,
                            DeleteError::HasChildren(_) => ErrorCode::Conflict,
                            _ => ErrorCode::Internal,
                        };
                        Fail(code, crate::error_chain(&e))
                    })?;
                self.wake_compactor();
                ok(Response::Ok)
            }
            Request::Stats => {
                let s = self
                    .store
                    .stats()
                    .map_err(|e| Fail(ErrorCode::Internal, crate::error_chain(&e)))?;
                let (images, image_bytes) = self.images.usage();
                ok(Response::Stats {
                    snapshots: s.snapshots,
                    chunks: s.chunks,
                    raw_bytes: s.raw_bytes,
                    pack_bytes: s.pack_bytes,
                    images: images as u64,
                    image_bytes,
                    faults_served: self.heart.faults_served(&self.faults_served),
                })
            }
            Request::Memory => {
                let index = self.store.index_memory();
                let heap = crate::process::heap_figures();
                ok(Response::Memory(fissile_proto::snapshotd::MemoryFigures {
                    // One cache shared by every family: each reports the same figures.
                    index_cache_bytes: index.cache_usage.first().copied().unwrap_or(0),
                    index_cache_capacity: index.cache_capacity.first().copied().unwrap_or(0),
                    index_memtable_bytes: index.memtables,
                    index_table_reader_bytes: index.table_readers,
                    heap_in_use_bytes: heap.map_or(0, |h| h.in_use),
                    heap_free_bytes: heap.map_or(0, |h| h.free),
                }))
            }
        }
    }

    fn resolve_regions(&self, regions: &[Region]) -> Result<Vec<SessionRegion>, Fail> {
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(bad("need 1..=64 regions"));
        }
        let mut out = Vec::with_capacity(regions.len());
        for r in regions {
            let img = self
                .images
                .get_or_open(&self.store, &r.snapshot)
                .map_err(|e| match e {
                    image::ImageError::View(v) => Fail::from(v),
                    other => Fail(ErrorCode::Internal, crate::error_chain(&other)),
                })?;
            if img.instance() != r.instance {
                return Err(Fail(
                    ErrorCode::Conflict,
                    format!(
                        "the image of {} was dropped and opened again since this client \
                         opened it: open it again",
                        r.snapshot
                    ),
                ));
            }
            let ps = u64::from(img.page_size());
            let aligned = r.base % ps == 0 && r.len % ps == 0 && r.offset % ps == 0 && r.len > 0;
            let fits = r
                .offset
                .checked_add(r.len)
                .is_some_and(|e| e <= img.memory_size())
                && r.base.checked_add(r.len).is_some();
            if !aligned || !fits {
                return Err(bad(format!(
                    "region {:#x}+{:#x} is unaligned or out of range",
                    r.base, r.len
                )));
            }
            out.push(SessionRegion {
                base: r.base,
                len: r.len,
                offset: r.offset,
                image: img,
            });
        }
        Ok(out)
    }
}

fn info(m: &crate::store::manifest::Manifest) -> SnapshotInfo {
    SnapshotInfo {
        id: m.id.clone(),
        memory_size: m.memory_size,
        page_size: m.page_size,
        parent: m.parent.clone(),
        labels: m.labels.clone().into_iter().collect(),
        blobs: m
            .blobs
            .keys()
            .filter(|name| name.as_str() != crate::store::TOUCH_PAGES_BLOB)
            .cloned()
            .collect(),
        created_unix_ms: m.created_unix_ms,
        durable: true,
    }
}
