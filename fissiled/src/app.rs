//! The daemon's state and the one service that owns the running sandboxes.
//!
//! Handlers only parse, authorize and call [`App`]; every blocking `fissile-sandbox` call
//! runs on tokio's blocking pool, so no request stalls another. Each running sandbox is a
//! [`Live`] entry: its `Sandbox` (the VMM process and its control socket) behind a mutex for
//! lifecycle operations, and its vsock path, from which every exec opens its own agent
//! connection (the agent queues cells FIFO), so execs never wait for each other's locks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fissile_sandbox::{Sandbox, SandboxConfig, Snapshotd};

use crate::db::{Db, SandboxRecord, SandboxState, now_ms, random_hex};
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
    /// How long a boot may take.
    pub boot_timeout: Duration,
}

/// The template every daemon has (built by `fissile-rootfs` from `python-datasci`).
pub const DEFAULT_TEMPLATE: &str = "python-datasci";

/// A running (or booting) sandbox.
#[derive(Debug)]
pub struct Live {
    /// What the store kept about it when it was registered (its current state is in the
    /// store; `sandbox` is `None` while it boots).
    pub record: SandboxRecord,
    /// The sandbox (VMM process, control socket): lifecycle operations lock it.
    pub sandbox: Mutex<Option<Sandbox>>,
    /// Its hybrid-vsock socket: each exec opens its own agent connection here.
    pub vsock: PathBuf,
}

/// Daemon state, shared by every handler.
#[derive(Debug, Clone)]
pub struct App {
    /// The metadata store.
    pub db: Arc<Db>,
    /// Configuration.
    pub config: Arc<Config>,
    /// Running sandboxes by id.
    pub live: Arc<Mutex<HashMap<String, Arc<Live>>>>,
    /// The snapshot store daemon the VMMs use.
    pub snapshotd: Arc<Snapshotd>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs a blocking closure on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("worker: {e}")))?
}

/// What a create asks for (validated).
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// Template name.
    pub template: String,
    /// Guest memory.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Caller's labels.
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl App {
    /// The daemon over `db`, starting snapshotd in the state directory.
    pub fn start(db: Db, config: Config) -> Result<App, ApiError> {
        let sd = Snapshotd::start(
            &config.state_dir.join("store"),
            &config.state_dir.join("snapshotd.sock"),
        )
        .map_err(|e| ApiError::internal(fissile_proto::error_chain(&e)))?;
        let app = App {
            db: Arc::new(db),
            config: Arc::new(config),
            live: Arc::default(),
            snapshotd: Arc::new(sd),
        };
        app.mark_lost()?;
        Ok(app)
    }

    /// Records left from an earlier run whose VMMs this daemon does not hold are lost.
    fn mark_lost(&self) -> Result<(), ApiError> {
        for mut r in self.db.sandboxes()? {
            if r.state != SandboxState::Lost {
                r.state = SandboxState::Lost;
                self.db.put_sandbox(&r)?;
            }
        }
        Ok(())
    }

    /// The running sandbox `id` of `tenant` (another tenant's id is not found).
    pub fn get(&self, tenant: &str, id: &str) -> Result<Arc<Live>, ApiError> {
        lock(&self.live)
            .get(id)
            .filter(|l| l.record.tenant == tenant)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no sandbox {id}")))
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

    /// Boots a sandbox for `tenant` (quota-checked) and registers it.
    pub async fn create(&self, tenant: &str, spec: CreateSpec) -> Result<SandboxRecord, ApiError> {
        if spec.template != DEFAULT_TEMPLATE {
            return Err(ApiError::not_found(format!(
                "no template {}",
                spec.template
            )));
        }
        let id = format!("sb-{}", random_hex(8)?);
        let record = SandboxRecord {
            id: id.clone(),
            tenant: tenant.to_string(),
            template: spec.template.clone(),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            state: SandboxState::Starting,
            created_ms: now_ms(),
            metadata: spec.metadata,
        };
        {
            // The quota check and the reservation are one step, so concurrent creates
            // cannot both pass it.
            let mut live = lock(&self.live);
            let mine: Vec<&Arc<Live>> = live
                .values()
                .filter(|l| l.record.tenant == tenant)
                .collect();
            let memory: u64 = mine.iter().map(|l| l.record.memory_mib).sum();
            if mine.len() >= self.config.max_sandboxes_per_tenant {
                return Err(ApiError::quota(format!(
                    "tenant {tenant} runs {} sandboxes, the most allowed",
                    mine.len()
                )));
            }
            if memory + spec.memory_mib > self.config.max_memory_mib_per_tenant {
                return Err(ApiError::quota(format!(
                    "tenant {tenant} runs {memory} MiB of guest memory; {} more would pass \
                     the limit of {} MiB",
                    spec.memory_mib, self.config.max_memory_mib_per_tenant
                )));
            }
            let dir = self.config.state_dir.join("sandboxes").join(&id);
            live.insert(
                id.clone(),
                Arc::new(Live {
                    record: record.clone(),
                    sandbox: Mutex::new(None),
                    vsock: dir.join("vsock.sock"),
                }),
            );
        }
        self.db.put_sandbox(&record)?;
        let cfg = SandboxConfig {
            vmm: self.config.vmm.clone(),
            kernel: self.config.kernel.clone(),
            rootfs: self.config.rootfs.clone(),
            mem_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            dir: self.config.state_dir.join("sandboxes").join(&id),
            boot_timeout: self.config.boot_timeout,
            cmdline_extra: String::new(),
            snapshotd: Some(self.snapshotd.socket().to_path_buf()),
        };
        let booted = blocking(move || {
            Sandbox::boot(&cfg).map_err(|e| {
                ApiError::internal(format!("booting: {}", fissile_proto::error_chain(&e)))
            })
        })
        .await;
        let live = lock(&self.live).get(&id).cloned();
        match (booted, live) {
            (Ok(sb), Some(live)) => {
                *lock(&live.sandbox) = Some(sb);
                let mut running = record;
                running.state = SandboxState::Running;
                self.db.put_sandbox(&running)?;
                Ok(running)
            }
            (Ok(sb), None) => {
                // Deleted while booting.
                drop(sb);
                Err(ApiError::conflict(format!(
                    "sandbox {id} was deleted while it booted"
                )))
            }
            (Err(e), _) => {
                lock(&self.live).remove(&id);
                self.db.remove_sandbox(&id)?;
                Err(e)
            }
        }
    }

    /// Stops and forgets sandbox `id` of `tenant` (running or lost).
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<(), ApiError> {
        let record = self.record(tenant, id)?;
        let live = lock(&self.live).remove(&record.id);
        if let Some(live) = live {
            blocking(move || {
                drop(lock(&live.sandbox).take());
                Ok(())
            })
            .await?;
        }
        self.db.remove_sandbox(id)?;
        let _ = std::fs::remove_dir_all(self.config.state_dir.join("sandboxes").join(id));
        Ok(())
    }

    /// Stops every sandbox (daemon shutdown).
    pub fn stop_all(&self) {
        let all: Vec<Arc<Live>> = lock(&self.live).drain().map(|(_, l)| l).collect();
        for l in all {
            drop(lock(&l.sandbox).take());
            let mut r = l.record.clone();
            r.state = SandboxState::Lost;
            let _ = self.db.put_sandbox(&r);
        }
    }
}
