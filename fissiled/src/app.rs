//! The daemon's state and the one service that owns the running sandboxes.
//!
//! Handlers only parse, authorize and call [`App`]; every blocking `fissile-sandbox` call
//! runs on tokio's blocking pool, so no request stalls another. Each running sandbox is a
//! [`Live`] entry: its `Sandbox` (the VMM process and its control socket) behind a mutex for
//! lifecycle operations (snapshot, fork, merge, rollback, close), its vsock path and a pool
//! of idle agent connections: every exec, command and file transfer has an agent connection
//! of its own (pooled or new), so they never wait for a lifecycle lock.
//!
//! Lifecycle operations of one sandbox are serialized by its mutex here and, below, by its
//! VMM's request queue; the registry (`live`) is locked only for lookups and reservations,
//! never across a blocking call.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fissile_sandbox::{Sandbox, SandboxConfig};

use crate::db::{Db, SandboxRecord, SandboxState, SpaceRecord, TenantLimits, now_ms, random_hex};
use crate::error::ApiError;

/// How fissiled runs sandboxes.
#[derive(Debug, Clone)]
pub struct Config {
    /// State directory: the metadata store, snapshotd's store, each sandbox's sockets.
    pub state_dir: PathBuf,
    /// The `fissile-vmm` binary.
    pub vmm: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Root image of the `python-datasci` template.
    pub rootfs: PathBuf,
    /// Most sandboxes one tenant may run at once.
    pub max_sandboxes_per_tenant: usize,
    /// Most guest memory (MiB) one tenant may run at once.
    pub max_memory_mib_per_tenant: u64,
    /// Most children one fork may ask for.
    pub max_fork: u32,
    /// Largest file an upload or download may move.
    pub max_file_bytes: u64,
    /// Idle timeout of sandboxes that do not set one (`None`: none).
    pub default_idle_timeout: Option<Duration>,
    /// Longest a sandbox may run (`None`: no limit).
    pub max_lifetime: Option<Duration>,
    /// A sandbox idle this long is trimmed, once per idle spell: its VMM gives back the
    /// guest pages it copied that hold the snapshot image's bytes again (see
    /// [`App::trim_idle`]); `None`: never.
    pub trim_after: Option<Duration>,
    /// How long a boot may take (counted once it may start).
    pub boot_timeout: Duration,
    /// Most sandboxes booting or restoring at once; later creates queue (so a burst does not
    /// push every boot past its timeout).
    pub max_concurrent_starts: usize,
    /// Shapes (memory MiB, vCPUs) that get a template ready snapshot (see
    /// [`crate::templates`]); empty: every create boots.
    pub ready_shapes: Vec<(u64, u8)>,
    /// Sandboxes kept running per ready shape, restored from its ready snapshot ahead of
    /// time, for creates to take (see [`crate::pool`]); 0: none.
    pub warm_pool: usize,
    /// VMMs started ahead of time per ready shape, always, for forks to put children in and
    /// for restores (creates from a snapshot, resumes) to restore into (see
    /// [`crate::standby`]); 0: none unless forks ask ([`Self::standby_on_demand`]).
    pub standby_pool: usize,
    /// Most standbys per ready shape kept because forks of that shape asked for them: as
    /// many as its largest fork since it last went [`crate::standby::DEMAND_WINDOW_MS`]
    /// without one; 0: only [`Self::standby_pool`].
    pub standby_on_demand: usize,
    /// What every VMM runs under (its own cgroup, rlimits).
    pub vmm_limits: fissile_sandbox::VmmLimits,
    /// Every sandbox gets a network device in a namespace of its own (reaching nothing
    /// until it has a policy); off: no network device at all (hosts without tun/netns).
    pub guest_network: bool,
    /// The resolver that answers the names guests may resolve (see [`crate::egress`]).
    pub dns_upstream: Option<std::net::SocketAddr>,
    /// Most connections one sandbox may have open through the domain proxy at once.
    pub max_proxy_connections: usize,
    /// Routed network namespaces kept ready for sandboxes with a policy (see
    /// `fissile_sandbox::net::pool`); 0: none.
    pub netns_pool: usize,
}

/// The template every daemon has (built by `fissile-rootfs` from `python-datasci`).
pub const DEFAULT_TEMPLATE: &str = "python-datasci";

/// The children of a sandbox's latest fork, and whether one was merged back.
#[derive(Debug, Default)]
pub struct ForkSet {
    /// Ids of the children that started.
    pub children: BTreeSet<String>,
    /// A child of this fork has been merged into the parent (a repeat is refused).
    pub merged: bool,
}

/// A running (or booting) sandbox.
#[derive(Debug)]
pub struct Live {
    /// What the store kept about it when it was registered (its current state is in the
    /// store; `sandbox` is `None` while it boots).
    pub record: SandboxRecord,
    /// The sandbox (VMM process, control socket): lifecycle operations lock it.
    pub sandbox: Mutex<Option<Sandbox>>,
    /// Its hybrid-vsock socket, where agent connections are opened.
    pub vsock: PathBuf,
    /// Idle agent connections that execs and commands reuse.
    pub agents: crate::exec::AgentPool,
    /// Its latest fork.
    pub forks: Mutex<ForkSet>,
    /// Last request that used it (ms since the epoch).
    pub last_used_ms: AtomicU64,
    /// Streams (execs, commands, transfers) running on it now: it is not idle while any is.
    pub active: AtomicUsize,
    /// The `last_used_ms` of the idle spell in which it was last trimmed (or found
    /// untrimmable): one trim per spell.
    pub trimmed_for_ms: AtomicU64,
    /// Its VMM is attached (read without the sandbox's lock, which a long operation holds).
    pub attached: AtomicBool,
    /// Closed ([`App::close`] sets it under the sandbox's lock): a VMM that finishes
    /// starting afterwards is stopped, not attached ([`App::attach`] reads it under the same
    /// lock), and a start still waiting for its guest gives up (its
    /// [`SandboxConfig::cancel`](fissile_sandbox::SandboxConfig::cancel)).
    pub closed: Arc<AtomicBool>,
    /// Its egress policy as its resolver and proxy see it (`None`: no way out).
    pub policy: Arc<crate::egress::PolicyCell>,
    /// Its resolver and proxy, while its VMM runs in a network namespace.
    pub egress: Mutex<Option<crate::egress::Service>>,
    /// Its VMM's network namespace (read without the sandbox's lock: counters).
    pub netns: Mutex<Option<Arc<fissile_sandbox::NetNs>>>,
}

impl Live {
    fn new(record: SandboxRecord, dir: &std::path::Path) -> Arc<Live> {
        let policy = record.network.as_ref().and_then(|p| p.to_egress().ok());
        Arc::new(Live {
            policy: Arc::new(crate::egress::PolicyCell::new(policy)),
            egress: Mutex::default(),
            netns: Mutex::default(),
            record,
            vsock: dir.join("vsock.sock"),
            agents: crate::exec::AgentPool::default(),
            forks: Mutex::default(),
            last_used_ms: AtomicU64::new(now_ms()),
            active: AtomicUsize::new(0),
            trimmed_for_ms: AtomicU64::new(0),
            attached: AtomicBool::new(false),
            closed: Arc::new(AtomicBool::new(false)),
            sandbox: Mutex::new(None),
        })
    }

    /// Marks it used now.
    pub fn touch(&self) {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// True once its VMM is attached (not booting, not closed).
    pub fn booted(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Counts a stream on it until the guard drops.
    pub fn stream_guard(self: &Arc<Self>) -> StreamGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.touch();
        StreamGuard(self.clone())
    }
}

/// A running stream on a sandbox (see [`Live::stream_guard`]).
#[derive(Debug)]
pub struct StreamGuard(Arc<Live>);

impl StreamGuard {
    /// The sandbox the stream runs on.
    pub fn live(&self) -> &Live {
        &self.0
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Daemon state, shared by every handler: one reference-counted [`AppState`], so the copy
/// each extractor and layer takes per request is one counter, not one per field.
#[derive(Debug, Clone)]
pub struct App(Arc<AppState>);

impl std::ops::Deref for App {
    type Target = AppState;

    fn deref(&self) -> &AppState {
        &self.0
    }
}

/// What [`App`] shares.
#[derive(Debug)]
pub struct AppState {
    /// The metadata store.
    pub db: Arc<Db>,
    /// Configuration.
    pub config: Arc<Config>,
    /// Running sandboxes by id.
    pub live: Arc<Mutex<HashMap<String, Arc<Live>>>>,
    /// The snapshot store daemon the VMMs use (restarted when it dies).
    pub snapshotd: Arc<crate::snapshotd::SnapshotdService>,
    /// Held while a space's running sandbox is claimed (so two resumes cannot both start
    /// it).
    pub space_claims: Arc<Mutex<()>>,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// What every sandbox's resolver and proxy share.
    pub egress: Arc<crate::egress::Config>,
    /// Permits to start a sandbox (see [`Config::max_concurrent_starts`]).
    pub starts: Arc<tokio::sync::Semaphore>,
    /// Templates' ready snapshots.
    pub ready: Arc<crate::templates::ReadySnapshots>,
    /// Template builds under way.
    pub builds: Arc<crate::template_build::Builds>,
    /// Tenants' own limits (read at start: `fissiled tenants set` needs the daemon stopped).
    pub tenants: Arc<HashMap<String, TenantLimits>>,
    /// Warm pools (sandboxes restored ahead of time).
    pub pool: Arc<crate::pool::WarmPool>,
    /// Standby VMMs (started ahead of time, for fork children).
    pub standbys: Arc<crate::standby::StandbyPool>,
    /// API keys that are not revoked (read at start; the key routes keep it in step with
    /// the store).
    pub keys: Arc<crate::auth::KeyRing>,
    /// Ids of the sandboxes recorded `lost` (found at start; forgotten when deleted), so
    /// `/metrics` counts them without reading every record.
    pub lost: Arc<Mutex<BTreeSet<String>>>,
}

/// What applies to one tenant: its own limits ([`TenantLimits`]) over the daemon's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most sandboxes it may run at once.
    pub max_sandboxes: usize,
    /// Most guest memory (MiB) it may run at once.
    pub max_memory_mib: u64,
    /// Most children one fork may ask for.
    pub max_fork: u32,
    /// Idle timeout of its sandboxes that set none.
    pub idle_timeout: Option<Duration>,
    /// Longest one of its sandboxes may run (a sandbox may ask for less, never more).
    pub max_lifetime: Option<Duration>,
}

impl Limits {
    /// How long sandbox `r` may stay idle, and how long it may live.
    pub fn timers(&self, r: &SandboxRecord) -> (Option<Duration>, Option<Duration>) {
        let idle = r
            .idle_timeout_s
            .map(Duration::from_secs)
            .or(self.idle_timeout);
        let own = r.max_lifetime_s.map(Duration::from_secs);
        let life = match (own, self.max_lifetime) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (idle, life)
    }
}

impl Config {
    /// The limits of a tenant whose own limits are `own` (`None`: the daemon's flags).
    pub fn limits(&self, own: Option<&TenantLimits>) -> Limits {
        let own = own.cloned().unwrap_or_default();
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Limits {
            max_sandboxes: own.max_sandboxes.unwrap_or(self.max_sandboxes_per_tenant),
            max_memory_mib: own.max_memory_mib.unwrap_or(self.max_memory_mib_per_tenant),
            max_fork: own.max_fork.unwrap_or(self.max_fork),
            idle_timeout: own.idle_timeout_s.map_or(self.default_idle_timeout, secs),
            max_lifetime: own.max_lifetime_s.map_or(self.max_lifetime, secs),
        }
    }
}

/// Kills process `pid` if it is still the `program` serving `socket` (checked through a
/// pidfd, so a reused pid is left alone).
pub(crate) fn kill_stale(pid: u32, program: &str, socket: &std::path::Path) {
    if let Ok(p) =
        fissile_proto::pidfd::Pidfd::open_matching(pid, program, &socket.to_string_lossy())
    {
        tracing::info!(pid, program, "stopping a process an earlier run left");
        p.kill(Duration::from_secs(10));
    }
}

/// Locks a mutex, ignoring poisoning (every holder leaves the data consistent).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs a blocking closure on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    // The blocking work runs in the caller's span (a request's, a lifecycle step's).
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| ApiError::internal(format!("worker: {e}")))?
}

/// What a create asks for (validated).
#[derive(Debug, Clone, Default)]
pub struct CreateSpec {
    /// Template name.
    pub template: String,
    /// Guest memory.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Caller's labels.
    pub metadata: BTreeMap<String, String>,
    /// Make it a persistent space.
    pub persistent: bool,
    /// Idle timeout in seconds (`None`: the daemon's default).
    pub idle_timeout_s: Option<u64>,
    /// Its own lifetime limit in seconds.
    pub max_lifetime_s: Option<u64>,
    /// Restore this snapshot (the caller's) instead of booting.
    pub from_snapshot: Option<String>,
    /// Environment variables for every cell and command.
    pub env: BTreeMap<String, String>,
    /// Egress policy (`None`: none).
    pub network: Option<crate::db::NetworkPolicy>,
}

/// At most this many environment variables in a sandbox (its template's and its own).
pub const MAX_ENV_VARS: usize = 128;

/// How a new sandbox gets its state.
#[derive(Debug, Clone)]
pub enum Origin {
    /// Boot the template.
    Boot,
    /// Restore this snapshot (snapshotd's id).
    Restore(String),
    /// Restore this template's ready snapshot of this shape; boot if that fails.
    Ready(String, crate::templates::Shape),
}

/// What a create restores from that a client may delete meanwhile.
enum Source {
    /// `from_snapshot`'s snapshot.
    Snapshot(String),
    /// A template built over the API.
    Template(String),
}

impl Origin {
    /// `boot`, `restore` or `ready` (for traces).
    pub fn kind(&self) -> &'static str {
        match self {
            Origin::Boot => "boot",
            Origin::Restore(_) => "restore",
            Origin::Ready(..) => "ready",
        }
    }
}

impl App {
    /// The daemon over `db`: takes over the snapshotd and the VMMs an earlier run left
    /// running (a `kill -9` of the daemon leaves them running), or starts snapshotd afresh.
    pub fn start(db: Db, config: Config) -> Result<App, ApiError> {
        let db_tenants = db.all_tenant_limits()?.into_iter().collect();
        let db_keys = db.active_keys()?;
        let (sd, adopted) = crate::snapshotd::SnapshotdService::start(
            &config.state_dir,
            config.vmm_limits.jail.clone(),
        )?;
        let starts = config.max_concurrent_starts.max(1);
        let metrics = Arc::<crate::metrics::Metrics>::default();
        if config.guest_network {
            fissile_sandbox::net::pool::enable(config.netns_pool, config.vmm_limits.net);
        }
        let host_addrs = if config.guest_network {
            fissile_sandbox::net::egress::host_addresses().map_err(|e| {
                ApiError::internal(format!(
                    "listing the host's addresses: {}",
                    fissile_proto::error_chain(&e)
                ))
            })?
        } else {
            Vec::new()
        };
        let egress = Arc::new(crate::egress::Config {
            dns_upstream: config.dns_upstream,
            max_connections: config.max_proxy_connections,
            host_addrs,
            runtime: tokio::runtime::Handle::current(),
            metrics: metrics.clone(),
        });
        let app = App(Arc::new(AppState {
            db: Arc::new(db),
            config: Arc::new(config),
            live: Arc::default(),
            snapshotd: Arc::new(sd),
            space_claims: Arc::default(),
            metrics,
            egress,
            starts: Arc::new(tokio::sync::Semaphore::new(starts)),
            ready: Arc::default(),
            builds: Arc::default(),
            tenants: Arc::new(db_tenants),
            pool: Arc::default(),
            standbys: Arc::default(),
            keys: Arc::new(crate::auth::KeyRing::new(db_keys)),
            lost: Arc::default(),
        }));
        app.sweep_template_dirs();
        app.recover(adopted)?;
        Ok(app)
    }

    /// Stops the VMMs an earlier run left in `templates/` (making a template's ready
    /// snapshot or building a template when it was killed) and removes their directories:
    /// nothing there outlives the run that made it, and at start no build or ready snapshot
    /// is being made yet.
    fn sweep_template_dirs(&self) {
        let Ok(entries) = std::fs::read_dir(self.config.state_dir.join("templates")) else {
            return;
        };
        for dir in entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
            let socket = dir.join("api.sock");
            // A directory whose VMM may still run is kept: its socket is how it is found.
            match fissile_proto::pidfd::Pidfd::find_all("fissile-vmm", &socket.to_string_lossy()) {
                Ok(vmms) => {
                    let mut stopped = true;
                    for vmm in vmms {
                        tracing::info!(pid = vmm.pid(), dir = %dir.display(), "stopping a template VMM an earlier run left");
                        stopped &= vmm.kill(Duration::from_secs(10));
                    }
                    if !stopped {
                        tracing::warn!(dir = %dir.display(), "a VMM an earlier run left did not stop; its directory is kept");
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listing processes; template directories kept");
                    return;
                }
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "removing a template directory an earlier run left");
            }
        }
    }

    /// Re-adopts the sandboxes an earlier run left running, when their snapshotd was
    /// adopted too (a restored VMM pages from it). The rest are lost: their VMMs are
    /// stopped, and a space whose sandbox was running then is marked lost (resuming it would
    /// give older state than it had), never silently older.
    fn recover(&self, snapshotd_adopted: bool) -> Result<(), ApiError> {
        for mut r in self.db.sandboxes()? {
            if r.state == SandboxState::Lost {
                lock(&self.lost).insert(r.id.clone());
                continue;
            }
            let dir = self.dir(&r.id);
            if r.tenant.is_empty() {
                // A warm pool member or a standby VMM of the earlier run: stopped, never
                // adopted.
                if let Some(pid) = r.vmm_pid {
                    kill_stale(pid, "fissile-vmm", &dir.join("api.sock"));
                }
                self.db.remove_sandbox(&r.id)?;
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            }
            if r.state == SandboxState::Running
                && snapshotd_adopted
                && let Some(pid) = r.vmm_pid
            {
                let cfg =
                    self.sandbox_config(dir.clone(), r.memory_mib, r.vcpus, r.network.as_ref());
                match Sandbox::adopt(&cfg, pid) {
                    Ok(sb) => {
                        tracing::info!(sandbox = %r.id, pid, "re-adopted a running sandbox");
                        let id = r.id.clone();
                        let live = Live::new(r, &dir);
                        self.start_egress(&live, &sb);
                        *lock(&live.sandbox) = Some(sb);
                        live.attached.store(true, Ordering::Release);
                        lock(&self.live).insert(id, live);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %r.id, error = %fissile_proto::error_chain(&e),
                        "cannot re-adopt; the sandbox is lost")
                    }
                }
            }
            if let Some(pid) = r.vmm_pid {
                kill_stale(pid, "fissile-vmm", &dir.join("api.sock"));
            }
            r.state = SandboxState::Lost;
            r.vmm_pid = None;
            self.db.put_sandbox(&r)?;
            lock(&self.lost).insert(r.id.clone());
            if let Some(space) = &r.space_id
                && let Some(mut s) = self.db.space(space)?
                && s.sandbox_id.as_deref() == Some(r.id.as_str())
            {
                s.sandbox_id = None;
                s.lost = true;
                self.db.put_space(&s)?;
            }
        }
        Ok(())
    }

    /// The running sandbox `id` of `tenant` (another tenant's id is not found); marks it
    /// used.
    pub fn get(&self, tenant: &str, id: &str) -> Result<Arc<Live>, ApiError> {
        let live = lock(&self.live)
            .get(id)
            .filter(|l| l.record.tenant == tenant)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no running sandbox {id}")))?;
        live.touch();
        Ok(live)
    }

    /// [`App::get`] for an operation that needs the sandbox booted.
    pub fn get_booted(&self, tenant: &str, id: &str) -> Result<Arc<Live>, ApiError> {
        let live = self.get(tenant, id)?;
        if !live.booted() {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is still starting"
            )));
        }
        Ok(live)
    }

    /// The records of `tenant`'s sandboxes (running and lost).
    pub fn list(&self, tenant: &str) -> Result<Vec<SandboxRecord>, ApiError> {
        let mut all: Vec<SandboxRecord> = self
            .db
            .sandboxes()?
            .into_iter()
            .filter(|r| r.tenant == tenant)
            .collect();
        all.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        Ok(all)
    }

    /// A record of `tenant` (running or lost).
    pub fn record(&self, tenant: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        self.db
            .sandbox(id)?
            .filter(|r| r.tenant == tenant)
            .ok_or_else(|| ApiError::not_found(format!("no sandbox {id}")))
    }

    /// The directory of sandbox `id`'s sockets and logs.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("sandboxes").join(id)
    }

    /// The configuration of a sandbox in `dir` with egress `network` (`None`: none).
    pub fn sandbox_config(
        &self,
        dir: PathBuf,
        memory_mib: u64,
        vcpus: u8,
        network: Option<&crate::db::NetworkPolicy>,
    ) -> SandboxConfig {
        let network = match (self.config.guest_network, network) {
            (false, _) => fissile_sandbox::Network::None,
            (true, None) => fissile_sandbox::Network::Isolated,
            (true, Some(p)) => match p.to_egress() {
                Ok(policy) => fissile_sandbox::Network::Routed(policy),
                Err(e) => {
                    // Validated when stored: a record that no longer parses fails closed.
                    tracing::warn!(error = %e, "stored egress policy is invalid; no way out");
                    fissile_sandbox::Network::Isolated
                }
            },
        };
        SandboxConfig {
            vmm: self.config.vmm.clone(),
            kernel: self.config.kernel.clone(),
            rootfs: self.config.rootfs.clone(),
            mem_mib: memory_mib,
            vcpus,
            dir,
            boot_timeout: self.config.boot_timeout,
            cmdline_extra: String::new(),
            snapshotd: Some(self.snapshotd.socket().to_path_buf()),
            limits: self.config.vmm_limits.clone(),
            network,
            cancel: None,
        }
    }

    /// The limits that apply to `tenant`.
    pub fn limits(&self, tenant: &str) -> Limits {
        self.config.limits(self.tenants.get(tenant))
    }

    /// Checks `tenant`'s quotas for `n` more sandboxes of `memory_mib` each and registers
    /// `records` (booting) in the same step, so concurrent requests cannot both pass.
    pub fn reserve(&self, tenant: &str, records: &[SandboxRecord]) -> Result<(), ApiError> {
        let mut live = lock(&self.live);
        let mine: Vec<&Arc<Live>> = live
            .values()
            .filter(|l| l.record.tenant == tenant)
            .collect();
        let memory: u64 = mine.iter().map(|l| l.record.memory_mib).sum();
        let more: u64 = records.iter().map(|r| r.memory_mib).sum();
        let limits = self.limits(tenant);
        if mine.len() + records.len() > limits.max_sandboxes {
            return Err(ApiError::quota(format!(
                "tenant {tenant} runs {} sandboxes; {} more would pass the limit of {}",
                mine.len(),
                records.len(),
                limits.max_sandboxes
            )));
        }
        if memory + more > limits.max_memory_mib {
            return Err(ApiError::quota(format!(
                "tenant {tenant} runs {memory} MiB of guest memory; {more} more would pass \
                 the limit of {} MiB",
                limits.max_memory_mib
            )));
        }
        for r in records {
            live.insert(r.id.clone(), Live::new(r.clone(), &self.dir(&r.id)));
        }
        Ok(())
    }

    /// Attaches a started sandbox to its reserved entry and records it running (the agent
    /// connection it started with goes into the entry's pool, for its first request); if the
    /// entry was deleted meanwhile, or its record cannot be written, the sandbox is stopped
    /// (and the entry forgotten).
    ///
    /// The record is written and the VMM published under the sandbox's lock, the order
    /// [`App::close`] follows: a close (a delete of the sandbox or of its space, the daemon
    /// stopping) either runs first, and this stops the VMM, or after, and finds it attached
    /// and its record written (it never removes a record that this then writes back).
    pub fn attach(
        &self,
        mut record: SandboxRecord,
        mut sb: Sandbox,
    ) -> Result<SandboxRecord, ApiError> {
        let live = lock(&self.live).get(&record.id).cloned();
        let Some(live) = live else {
            drop(sb);
            return Err(deleted_while_starting(&record.id));
        };
        record.state = SandboxState::Running;
        record.vmm_pid = sb.pid();
        let mut guard = lock(&live.sandbox);
        if live.closed.load(Ordering::Acquire) {
            drop(guard);
            drop(sb);
            return Err(deleted_while_starting(&record.id));
        }
        if let Err(e) = self.db.put_sandbox(&record) {
            live.closed.store(true, Ordering::Release);
            drop(guard);
            drop(sb);
            let _ = self.unreserve(&record.id);
            return Err(e.into());
        }
        self.start_egress(&live, &sb);
        live.agents.reset_with(sb.take_agent());
        *guard = Some(sb);
        // Idle from now: the time it spent queued and starting was not the caller's idling
        // (a 3 s idle timeout closed a sandbox whose restore waited behind a pool refill).
        live.touch();
        live.attached.store(true, Ordering::Release);
        Ok(record)
    }

    /// Starts `live`'s resolver and proxy in `sb`'s network namespace (none: it has none).
    /// If they cannot start, the sandbox runs without them: its names do not resolve and
    /// its proxied connections are refused (fails closed), and the log says why.
    fn start_egress(&self, live: &Live, sb: &Sandbox) {
        let Some(ns) = sb.netns() else { return };
        let started = ns.try_clone().map(Arc::new).and_then(|ns| {
            *lock(&live.netns) = Some(ns.clone());
            crate::egress::Service::start(ns, live.policy.clone(), self.egress.clone())
        });
        match started {
            Ok(service) => *lock(&live.egress) = Some(service),
            Err(e) => tracing::warn!(sandbox = %live.record.id, error = %e,
                "cannot start the sandbox's resolver and proxy; its names will not resolve"),
        }
    }

    /// What sandbox `id`'s network rules counted (zeroes without a network namespace).
    pub async fn network_counters(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<fissile_sandbox::net::egress::EgressCounters, ApiError> {
        let live = self.get_booted(tenant, id)?;
        let ns = lock(&live.netns).clone();
        blocking(move || match ns {
            Some(ns) => ns.counters().map_err(|e| {
                ApiError::internal(format!(
                    "reading the network counters: {}",
                    fissile_proto::error_chain(&e)
                ))
            }),
            None => Ok(Default::default()),
        })
        .await
    }

    /// The network counters of every running sandbox, summed (blocking: one netlink dump
    /// inside each sandbox's namespace; a sandbox whose counters cannot be read is skipped).
    pub fn network_totals(&self) -> fissile_sandbox::net::egress::EgressCounters {
        let namespaces: Vec<_> = lock(&self.live)
            .values()
            .filter_map(|l| lock(&l.netns).clone())
            .collect();
        let mut t = fissile_sandbox::net::egress::EgressCounters::default();
        for c in namespaces.iter().filter_map(|ns| ns.counters().ok()) {
            t.blocked_connections += c.blocked_connections;
            t.connection_cap_hits += c.connection_cap_hits;
            t.rate_dropped_packets += c.rate_dropped_packets;
            t.rate_dropped_bytes += c.rate_dropped_bytes;
        }
        t
    }

    /// Puts `policy` in force for sandbox `id` of `tenant` (its next connections follow it)
    /// and records it: forks, persists and resumes keep it.
    #[tracing::instrument(name = "set_network", skip_all, fields(tenant = tenant, sandbox = id))]
    pub async fn set_network(
        &self,
        tenant: &str,
        id: &str,
        body: crate::db::NetworkPolicy,
        policy: fissile_sandbox::net::egress::EgressPolicy,
    ) -> Result<SandboxRecord, ApiError> {
        if !self.config.guest_network {
            return Err(ApiError::conflict(
                "this daemon runs sandboxes without a network device (--guest-network off)",
            ));
        }
        let live = self.get_booted(tenant, id)?;
        let held = live.clone();
        blocking(move || {
            let mut guard = lock(&held.sandbox);
            let sb = guard
                .as_mut()
                .ok_or_else(|| ApiError::conflict("the sandbox stopped"))?;
            // The resolver and proxy first: once the rules redirect, the proxy must already
            // hold the policy that asked for it.
            let before = held.policy.get();
            held.policy.set(Some(policy.clone()));
            sb.set_network_policy(policy).map_err(|e| {
                held.policy.set(before.map(|p| (*p).clone()));
                ApiError::sandbox("setting the egress policy", &e)
            })
        })
        .await?;
        let mut record = self.record(tenant, id)?;
        record.network = Some(body);
        self.db.put_sandbox(&record)?;
        if let Some(space_id) = &record.space_id
            && let Some(mut space) = self.db.space(space_id)?
        {
            space.network = record.network.clone();
            self.db.put_space(&space)?;
        }
        Ok(record)
    }

    /// Forgets a reserved sandbox that failed to start.
    pub fn unreserve(&self, id: &str) -> Result<(), ApiError> {
        lock(&self.live).remove(id);
        self.db.remove_sandbox(id)?;
        let _ = std::fs::remove_dir_all(self.dir(id));
        Ok(())
    }

    /// Creates a sandbox for `tenant` (quota-checked): boots the template, or restores
    /// one of the tenant's snapshots; a persistent one gets a space.
    #[tracing::instrument(name = "create", skip_all, fields(tenant = tenant, sandbox = tracing::field::Empty, persistent = spec.persistent))]
    pub async fn create(&self, tenant: &str, spec: CreateSpec) -> Result<SandboxRecord, ApiError> {
        let mut spec = spec;
        let origin = match &spec.from_snapshot {
            Some(snap) => {
                let s = self
                    .db
                    .snapshot(snap)?
                    .filter(|s| s.tenant == tenant)
                    .ok_or_else(|| ApiError::not_found(format!("no snapshot {snap}")))?;
                spec.template = s.template;
                spec.memory_mib = s.memory_mib;
                spec.vcpus = s.vcpus;
                Origin::Restore(s.id)
            }
            None => Origin::Boot,
        };
        let origin = match origin {
            Origin::Boot if spec.template != DEFAULT_TEMPLATE => {
                // A template built over the API: its snapshot of this shape, its environment
                // under the create's own.
                let app = self.clone();
                let (t, name, m, v) = (
                    tenant.to_string(),
                    spec.template.clone(),
                    spec.memory_mib,
                    spec.vcpus,
                );
                let (snap, env) =
                    blocking(move || app.built_template_start(&t, &name, m, v)).await?;
                let mut merged = env;
                merged.extend(std::mem::take(&mut spec.env));
                if merged.len() > MAX_ENV_VARS {
                    return Err(ApiError::bad_request(format!(
                        "env: template {} sets variables too, and with the create's they make \
                         {} (at most {MAX_ENV_VARS})",
                        spec.template,
                        merged.len()
                    )));
                }
                spec.env = merged;
                Origin::Restore(snap)
            }
            Origin::Boot => {
                let shape = crate::templates::Shape {
                    template: spec.template.clone(),
                    memory_mib: spec.memory_mib,
                    vcpus: spec.vcpus,
                };
                match self.ready_snapshot(&shape) {
                    Some(snap) => Origin::Ready(snap, shape),
                    None => Origin::Boot,
                }
            }
            other => other,
        };
        // A warm pool member, if this create needs nothing set before its guest runs.
        let member = match (&origin, &spec.network) {
            (Origin::Ready(_, shape), None) => self.take_member(shape).map(|m| (shape.clone(), m)),
            _ => None,
        };
        // Else, for a restore, a standby VMM to restore into.
        let standby = match (&origin, &member) {
            (Origin::Ready(..) | Origin::Restore(_), None) => {
                self.standby_for_restore(spec.memory_mib, spec.vcpus, spec.network.is_some())
            }
            _ => crate::standby::Taken::none(),
        };
        let id = match (&member, standby.members.first()) {
            (Some((_, m)), _) => m.record.id.clone(),
            (None, Some(s)) => s.record.id.clone(),
            (None, None) => format!("sb-{}", random_hex(8)?),
        };
        tracing::Span::current().record("sandbox", id.as_str());
        let space = if spec.persistent {
            let space = SpaceRecord {
                id: format!("sp-{}", random_hex(8)?),
                tenant: tenant.to_string(),
                template: spec.template.clone(),
                memory_mib: spec.memory_mib,
                vcpus: spec.vcpus,
                created_ms: now_ms(),
                sandbox_id: Some(id.clone()),
                snapshot: None,
                persisted_ms: None,
                lost: false,
                metadata: spec.metadata.clone(),
                env: spec.env.clone(),
                network: spec.network.clone(),
            };
            Some(space)
        } else {
            None
        };
        let record = SandboxRecord {
            id: id.clone(),
            tenant: tenant.to_string(),
            template: spec.template.clone(),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            state: SandboxState::Starting,
            created_ms: now_ms(),
            metadata: spec.metadata,
            space_id: space.as_ref().map(|s| s.id.clone()),
            idle_timeout_s: spec.idle_timeout_s,
            max_lifetime_s: spec.max_lifetime_s,
            vmm_pid: None,
            env: spec.env,
            network: spec.network,
        };
        // What the create starts from, to tell a start that failed because its template or
        // snapshot was deleted meanwhile (404, as if the delete had come first) from one that
        // failed for itself.
        let source = match (&spec.from_snapshot, &origin) {
            (Some(snap), _) => Some(Source::Snapshot(snap.clone())),
            (None, Origin::Restore(_)) => Some(Source::Template(record.template.clone())),
            _ => None,
        };
        let started = match member {
            Some((shape, m)) => self.hand_out(record, &shape, m),
            None => match self.start_sandbox(record, origin, standby).await {
                Err(e) => Err(self.gone_meanwhile(tenant, source).unwrap_or(e)),
                ok => ok,
            },
        };
        if let (Ok(_), Some(space)) = (&started, &space) {
            self.db.put_space(space)?;
        }
        started
    }

    /// 404 when `source` (of `tenant`) is gone: deleted while a create restored from it.
    fn gone_meanwhile(&self, tenant: &str, source: Option<Source>) -> Option<ApiError> {
        match source? {
            Source::Snapshot(id) => match self.db.snapshot(&id) {
                Ok(None) => Some(ApiError::not_found(format!(
                    "no snapshot {id} (deleted while the sandbox started from it)"
                ))),
                _ => None,
            },
            Source::Template(name) => match self.db.template(tenant, &name) {
                Ok(None) => Some(ApiError::not_found(format!(
                    "no template {name} (deleted while the sandbox started from it)"
                ))),
                _ => None,
            },
        }
    }

    /// Gives warm pool member `m` (of `shape`) to `record`'s tenant, quota-checked (the
    /// pool restores its replacement on a later tick).
    fn hand_out(
        &self,
        record: SandboxRecord,
        shape: &crate::templates::Shape,
        m: crate::pool::Member,
    ) -> Result<SandboxRecord, ApiError> {
        if let Err(e) = self.reserve(&record.tenant, std::slice::from_ref(&record)) {
            self.return_member(shape, m);
            return Err(e);
        }
        tracing::info!(sandbox = %record.id, "taken from the warm pool");
        self.metrics.pool_taken();
        self.attach(record, m.sandbox)
    }

    /// Reserves, starts and attaches one sandbox: a restore goes into the standby VMM in
    /// `standby` when it holds one (taken for this record's id, see
    /// [`App::take_standbys`]).
    #[tracing::instrument(name = "start", skip_all, fields(tenant = %record.tenant, sandbox = %record.id, origin = origin.kind()))]
    pub(crate) async fn start_sandbox(
        &self,
        record: SandboxRecord,
        origin: Origin,
        mut standby: crate::standby::Taken,
    ) -> Result<SandboxRecord, ApiError> {
        let id = record.id.clone();
        // The record has the standby's id, which the caller may have published (a resume
        // saves it in its space): on an error the standby is stopped, not given back.
        let member = standby.members.pop();
        if let Err(e) = self.reserve(&record.tenant, std::slice::from_ref(&record)) {
            self.stop_standbys(member.into_iter().collect());
            return Err(e);
        }
        // Its entry, taken before its record is written (a delete finds it by the record):
        // a delete while it starts closes the entry, which cancels the start (or its VMM is
        // stopped at `attach`). The answer is then that, and a ready snapshot is not blamed.
        let entry = lock(&self.live).get(&id).cloned();
        if let Err(e) = self.db.put_sandbox(&record) {
            self.unreserve(&id)?;
            self.stop_standbys(member.into_iter().collect());
            return Err(e.into());
        }
        let member = member.map(|m| m.standby);
        let mut cfg = self.sandbox_config(
            self.dir(&id),
            record.memory_mib,
            record.vcpus,
            record.network.as_ref(),
        );
        // One flag: the start's wait loop watches it, and so do the checks here.
        let closed = entry.map(|l| Arc::clone(&l.closed));
        cfg.cancel = closed.clone();
        let deleted = move || closed.as_ref().is_some_and(|c| c.load(Ordering::Acquire));
        let gone = deleted.clone();
        let deleted_id = id.clone();
        // Queued behind other starts; the reservation above already holds the quota.
        let permit = self.starts.clone().acquire_owned().await;
        let app = self.clone();
        let started = blocking(move || {
            let _permit = permit;
            if gone() {
                // Deleted while it waited for its turn: nothing to start.
                return Err(deleted_while_starting(&deleted_id));
            }
            // A standby that cannot be used leaves its directory to a new process.
            let restore = |snap: &str| match member {
                Some(s) => Sandbox::restore_standby_or_new(s, &cfg, snap),
                None => Sandbox::restore(&cfg, snap).map(|sb| (sb, false)),
            };
            let r = match &origin {
                Origin::Boot => Sandbox::boot(&cfg).map(|sb| (sb, false)),
                Origin::Restore(snap) => restore(snap),
                Origin::Ready(snap, shape) => restore(snap).or_else(|e| {
                    if gone() {
                        return Err(e);
                    }
                    app.ready_failed(shape, fissile_proto::error_chain(&e));
                    let _ = std::fs::remove_dir_all(&cfg.dir);
                    Sandbox::boot(&cfg).map(|sb| (sb, false))
                }),
            };
            // The standby pool's refill waits for the restore to end.
            drop(standby);
            r.map_err(|e| {
                if gone() {
                    deleted_while_starting(&deleted_id)
                } else {
                    ApiError::sandbox("starting the sandbox", &e)
                }
            })
        })
        .await;
        match started {
            Ok((sb, from_standby)) => {
                if from_standby {
                    self.metrics.standby_taken(1);
                }
                self.attach(record, sb)
            }
            Err(e) => {
                self.unreserve(&id)?;
                Err(if deleted() {
                    deleted_while_starting(&id)
                } else {
                    e
                })
            }
        }
    }

    /// Closes sandbox `id` of `tenant`: a persistent one is persisted into its space first
    /// (if that fails it keeps running and the error says why); then it stops and is
    /// forgotten. A lost record is just forgotten.
    #[tracing::instrument(name = "delete", skip_all, fields(tenant = tenant, sandbox = id))]
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<(), ApiError> {
        let record = self.record(tenant, id)?;
        let live = lock(&self.live).get(&record.id).cloned();
        if let Some(live) = live {
            let app = self.clone();
            blocking(move || app.close(&live, true)).await?;
        } else {
            self.db.remove_sandbox(id)?;
            lock(&self.lost).remove(id);
            let _ = std::fs::remove_dir_all(self.dir(id));
        }
        Ok(())
    }

    /// Stops a running sandbox (blocking): persists its space first when `persist` and it
    /// has one, then removes it from the registry and the store.
    #[tracing::instrument(name = "close", skip_all, fields(tenant = %live.record.tenant, sandbox = %live.record.id, persist = persist))]
    pub fn close(&self, live: &Arc<Live>, persist: bool) -> Result<(), ApiError> {
        let id = live.record.id.clone();
        let space = live.record.space_id.as_deref().filter(|_| persist);
        // Lock order: a sandbox's lock is never held while taking the registry's.
        let (sb, persisted) = {
            let mut guard = lock(&live.sandbox);
            let persisted = match space {
                Some(space) => {
                    let sb = guard.as_ref().ok_or_else(|| {
                        ApiError::conflict(format!("sandbox {id} is still starting"))
                    })?;
                    let snap = sb
                        .snapshot(true)
                        .map_err(|e| ApiError::sandbox("persisting the space", &e))?;
                    Some((space, snap.id))
                }
                None => None,
            };
            live.attached.store(false, Ordering::Release);
            live.closed.store(true, Ordering::Release);
            (guard.take(), persisted)
        };
        // The sandbox leaves the registry before its space says "persisted", and its record
        // goes in the same transaction: a client that sees the space persisted never still
        // finds the sandbox.
        lock(&self.live).remove(&id);
        if let Some((space, snapshot)) = persisted
            && let Err(e) = self.commit_space(space, &id, snapshot)
        {
            // Nothing is lost: the sandbox goes back, running, as it was.
            let attached = sb.is_some();
            let mut guard = lock(&live.sandbox);
            *guard = sb;
            live.closed.store(false, Ordering::Release);
            live.attached.store(attached, Ordering::Release);
            drop(guard);
            lock(&self.live).insert(id, Arc::clone(live));
            return Err(e);
        }
        drop(sb);
        self.db.remove_sandbox(&id)?;
        let _ = std::fs::remove_dir_all(self.dir(&id));
        Ok(())
    }

    /// Makes durable snapshot `snapshot` space `space`'s state and forgets sandbox `id`'s
    /// record, in one transaction; the space no longer names a running sandbox.
    fn commit_space(&self, space: &str, id: &str, snapshot: String) -> Result<(), ApiError> {
        let mut s = self
            .db
            .space(space)?
            .ok_or_else(|| ApiError::internal(format!("space {space} has no record")))?;
        s.snapshot = Some(snapshot);
        s.persisted_ms = Some(now_ms());
        if s.sandbox_id.as_deref() == Some(id) {
            s.sandbox_id = None;
        }
        s.lost = false;
        self.db.put_space_removing_sandbox(&s, id)?;
        tracing::info!(space, sandbox = id, "space persisted");
        Ok(())
    }

    /// Sandboxes by state (for `/metrics`): running, starting, lost.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        let (mut running, mut starting) = (0, 0);
        let all: Vec<Arc<Live>> = lock(&self.live).values().cloned().collect();
        for l in &all {
            if l.booted() {
                running += 1;
            } else {
                starting += 1;
            }
        }
        let lost = lock(&self.lost).len() as u64;
        let standby = self.standbys.idle() as u64;
        vec![
            ("running", running),
            ("starting", starting),
            ("lost", lost),
            ("standby", standby),
        ]
    }

    /// Stops every sandbox (daemon shutdown), persisting persistent ones first.
    pub fn stop_all(&self) {
        self.drain_pools();
        self.drain_standbys();
        let all: Vec<Arc<Live>> = lock(&self.live).values().cloned().collect();
        for l in all {
            if let Err(e) = self.close(&l, true) {
                tracing::error!(sandbox = %l.record.id, error = %e.message,
                    "could not persist at shutdown; stopping it");
                let _ = self.close(&l, false);
                if let Some(space) = &l.record.space_id
                    && let Ok(Some(mut s)) = self.db.space(space)
                {
                    s.sandbox_id = None;
                    s.lost = true;
                    let _ = self.db.put_space(&s);
                }
            }
        }
    }

    /// Deletes `snapshots` no record uses any more (blocking). One snapshotd will not delete
    /// yet (a running sandbox reads it, a later snapshot builds on it, it is not durable
    /// yet) is recorded and tried again by [`App::retry_unfreed`]; one it does not know is
    /// gone already.
    pub fn free_snapshots(&self, snapshots: &[String]) {
        let socket = self.snapshotd.socket().to_path_buf();
        let mut client = fissile_snapshotd_client::client::Client::connect(&socket);
        for snap in snapshots {
            let freed = match &mut client {
                Ok(c) => c.delete(snap),
                Err(_) => fissile_snapshotd_client::client::Client::connect(&socket)
                    .and_then(|mut c| c.delete(snap)),
            };
            match freed {
                Ok(()) => {}
                Err(fissile_snapshotd_client::client::ClientError::Daemon {
                    code: fissile_proto::snapshotd::ErrorCode::NotFound,
                    ..
                }) => {}
                Err(e) => {
                    tracing::info!(snapshot = %snap, error = %fissile_proto::error_chain(&e),
                        "the snapshot stays in the store until its users are gone");
                    if let Err(e) = self.db.put_unfreed(snap) {
                        tracing::warn!(snapshot = %snap, error = %e,
                            "cannot record the snapshot to free later");
                    }
                }
            }
        }
    }

    /// Tries again to delete the snapshots [`App::free_snapshots`] could not (blocking);
    /// returns how many are still waiting.
    pub fn retry_unfreed(&self) -> usize {
        let Ok(ids) = self.db.unfreed() else {
            return 0;
        };
        if ids.is_empty() {
            return 0;
        }
        let Ok(mut c) = fissile_snapshotd_client::client::Client::connect(self.snapshotd.socket())
        else {
            return ids.len();
        };
        let mut left = 0;
        for id in ids {
            let gone = match c.delete(&id) {
                Ok(()) => true,
                Err(fissile_snapshotd_client::client::ClientError::Daemon { code, .. }) => {
                    code == fissile_proto::snapshotd::ErrorCode::NotFound
                }
                Err(_) => false,
            };
            if gone {
                tracing::info!(snapshot = %id, "a snapshot no record uses is freed");
                let _ = self.db.remove_unfreed(&id);
            } else {
                left += 1;
            }
        }
        left
    }

    /// Closes sandboxes idle for longer than their timeout or older than their lifetime
    /// limit (their own, their tenant's or the daemon's; persistent ones persist). Returns how many it closed.
    pub fn reap_idle(&self) -> usize {
        let now = now_ms();
        let all: Vec<Arc<Live>> = lock(&self.live).values().cloned().collect();
        let due: Vec<Arc<Live>> = all
            .into_iter()
            .filter(|l| l.booted() && l.active.load(Ordering::Relaxed) == 0)
            .filter(|l| {
                let (idle, life) = self.limits(&l.record.tenant).timers(&l.record);
                let used = l.last_used_ms.load(Ordering::Relaxed);
                let idle_due =
                    idle.is_some_and(|t| now.saturating_sub(used) > t.as_millis() as u64);
                let life_due = life.is_some_and(|t| {
                    now.saturating_sub(l.record.created_ms) > t.as_millis() as u64
                });
                idle_due || life_due
            })
            .collect();
        let n = due.len();
        for l in due {
            tracing::info!(sandbox = %l.record.id, "closing: idle timeout or lifetime reached");
            if let Err(e) = self.close(&l, true) {
                tracing::error!(sandbox = %l.record.id, error = %e.message, "idle close failed");
            }
        }
        n
    }
}

/// Most sandboxes [`App::trim_idle`] trims per call, and how long it goes on starting
/// trims: each pauses its VM for a moment, so a call stays short when many sandboxes go idle
/// at once; the rest wait for the next call.
const TRIMS_PER_CALL: usize = 8;
const TRIM_BUDGET: Duration = Duration::from_secs(2);

impl App {
    /// Trims the running sandboxes idle for [`Config::trim_after`] and not trimmed since
    /// they were last used (a few per call, within a time budget): each VMM compares the
    /// guest pages it copied and holds in memory with its snapshot image and gives back
    /// those that hold the image's bytes again (a woken guest writes a few hundred pages,
    /// about a third of which end as they were). A sandbox whose lock an operation holds,
    /// that was used meanwhile, or whose trim failed, is tried again on a later call; one not
    /// on an image (booted, never snapshotted) is refused by its VMM and not asked again
    /// until it is used. Warm pool members are not trimmed (they are not running sandboxes
    /// yet). Returns how many were trimmed.
    pub fn trim_idle(&self) -> usize {
        let Some(after) = self.config.trim_after else {
            return 0;
        };
        let started = std::time::Instant::now();
        let now = now_ms();
        let idle = |l: &Live, used: u64| {
            l.booted()
                && l.active.load(Ordering::Relaxed) == 0
                && now.saturating_sub(used) > after.as_millis() as u64
                && l.trimmed_for_ms.load(Ordering::Relaxed) != used
        };
        let due: Vec<(Arc<Live>, u64)> = lock(&self.live)
            .values()
            .map(|l| (l.clone(), l.last_used_ms.load(Ordering::Relaxed)))
            .filter(|(l, used)| idle(l, *used))
            .collect();
        let mut trimmed = 0;
        for (l, used) in due {
            if trimmed == TRIMS_PER_CALL || started.elapsed() > TRIM_BUDGET {
                break;
            }
            let Ok(guard) = l.sandbox.try_lock() else {
                continue;
            };
            // Used since the sandbox was found idle: its new spell starts now.
            if l.last_used_ms.load(Ordering::Relaxed) != used || !idle(&l, used) {
                continue;
            }
            let Some(sb) = guard.as_ref() else {
                continue;
            };
            match sb.trim() {
                Ok(t) => {
                    tracing::debug!(sandbox = %l.record.id, private_pages = t.private_pages,
                        dropped_pages = t.dropped_pages, paused_ms = t.paused_ms, "trimmed");
                    self.metrics.trimmed(t.dropped_pages);
                    trimmed += 1;
                }
                Err(fissile_sandbox::SandboxError::Control(
                    fissile_sandbox::ControlError::Refused {
                        kind: fissile_proto::control::ErrorKind::Conflict,
                        message,
                    },
                )) => {
                    tracing::debug!(sandbox = %l.record.id, %message, "nothing to trim");
                }
                Err(e) => {
                    tracing::debug!(sandbox = %l.record.id, error = %e, "trim failed; trying again");
                    continue;
                }
            }
            l.trimmed_for_ms.store(used, Ordering::Relaxed);
        }
        trimmed
    }
}

/// The answer to a start whose sandbox was deleted meanwhile (its VMM is stopped).
fn deleted_while_starting(id: &str) -> ApiError {
    ApiError::conflict(format!("sandbox {id} was deleted while it started"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_may_shorten_its_lifetime_never_lengthen_it() {
        let limits = Limits {
            max_sandboxes: 1,
            max_memory_mib: 512,
            max_fork: 1,
            idle_timeout: Some(Duration::from_secs(30)),
            max_lifetime: Some(Duration::from_secs(100)),
        };
        let mut r = crate::db::SandboxRecord {
            state: SandboxState::Running,
            created_ms: 0,
            max_lifetime_s: Some(500),
            ..crate::db::SandboxRecord::starting(
                "sb-a".into(),
                "acme".into(),
                DEFAULT_TEMPLATE.into(),
                512,
                1,
            )
        };
        let s = Duration::from_secs;
        assert_eq!(limits.timers(&r), (Some(s(30)), Some(s(100))));
        r.max_lifetime_s = Some(10);
        r.idle_timeout_s = Some(60);
        assert_eq!(limits.timers(&r), (Some(s(60)), Some(s(10))));
        let none = Limits {
            idle_timeout: None,
            max_lifetime: None,
            ..limits
        };
        r.idle_timeout_s = None;
        assert_eq!(none.timers(&r), (None, Some(s(10))));
    }
}
