//! fissiled's metadata in one embedded transactional store (redb): tenants, API keys (only
//! their hashes), sandboxes. Every change is one write transaction, durable when it commits,
//! so a `kill -9` at any moment leaves either the old record or the new one.
//!
//! Records are JSON (serde): readable with any redb tool, and a field added later has a
//! default. Ids carry no host path, so a placement tier can route by id.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Key hash (hex sha256) → [`KeyRecord`].
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
/// Sandbox id → [`SandboxRecord`].
const SANDBOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("sandboxes");
/// Snapshot id (snapshotd's) → [`SnapshotRecord`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Space id → [`SpaceRecord`].
const SPACES: TableDefinition<&str, &[u8]> = TableDefinition::new("spaces");
/// Tenant name → [`TenantLimits`] (a tenant without one gets the daemon's flags).
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
/// A template's ready-snapshot key (template, memory, vCPUs, image fingerprint) →
/// [`ReadyRecord`].
const READY: TableDefinition<&str, &[u8]> = TableDefinition::new("ready");
/// `tenant/name` → [`TemplateRecord`] (templates built over the API).
const TEMPLATES: TableDefinition<&str, &[u8]> = TableDefinition::new("templates");
/// Snapshot id → when its record was dropped (ms since the epoch): snapshots no record uses
/// any more that snapshotd would not delete yet (a running sandbox reads them, or a later
/// snapshot builds on them); retried until they are gone.
const UNFREED: TableDefinition<&str, &[u8]> = TableDefinition::new("unfreed");

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Opening or creating the database file.
    #[error("opening the metadata store {0}")]
    Open(String, #[source] redb::DatabaseError),
    /// A transaction failed.
    #[error("metadata store transaction")]
    Transaction(#[source] Box<redb::TransactionError>),
    /// Opening a table failed.
    #[error("metadata store table")]
    Table(#[source] redb::TableError),
    /// Reading or writing a record failed.
    #[error("metadata store")]
    Storage(#[source] redb::StorageError),
    /// Committing failed (nothing was written).
    #[error("committing to the metadata store")]
    Commit(#[source] redb::CommitError),
    /// A stored record does not decode.
    #[error("a stored record does not decode")]
    Decode(#[source] serde_json::Error),
    /// Reading random bytes for a key failed.
    #[error("reading random bytes for a key")]
    Random(#[source] std::io::Error),
}

/// One tenant's own limits, set by the operator (`fissiled tenants set`); each `None` takes
/// the daemon's flag of the same name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    /// Most sandboxes it may run at once.
    #[serde(default)]
    pub max_sandboxes: Option<usize>,
    /// Most guest memory (MiB) it may run at once.
    #[serde(default)]
    pub max_memory_mib: Option<u64>,
    /// Most children one fork may ask for.
    #[serde(default)]
    pub max_fork: Option<u32>,
    /// Idle timeout (seconds) of its sandboxes that set none; 0: none.
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    /// Longest one of its sandboxes may run (seconds); 0: no limit.
    #[serde(default)]
    pub max_lifetime_s: Option<u64>,
}

/// An API key's record (the key itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The tenant the key acts for.
    pub tenant: String,
    /// When it was created (ms since the epoch).
    pub created_ms: u64,
    /// Revoked keys are refused.
    #[serde(default)]
    pub revoked: bool,
    /// The key may also manage keys (`/v1/keys`).
    #[serde(default)]
    pub admin: bool,
}

/// What a key that is not revoked grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveKey {
    /// The tenant it acts for.
    pub tenant: String,
    /// It may manage keys.
    pub admin: bool,
}

/// A key just created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedKey {
    /// The key itself (not stored: shown once).
    pub key: String,
    /// Its hash (what is stored and looked up).
    pub hash: String,
    /// Its record.
    pub record: KeyRecord,
}

/// A key as it is listed: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyListing {
    /// Its id ([`key_id`]).
    pub id: String,
    /// Its record.
    pub record: KeyRecord,
}

/// The public id of the key whose hash is `hash`: enough of the hash to name it, which
/// tells nothing of the key.
pub fn key_id(hash: &str) -> String {
    format!("key_{}", hash.get(..20).unwrap_or(hash))
}

/// Checks a tenant name: 1-64 of `[A-Za-z0-9_-]`.
pub fn valid_tenant_name(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant.len() <= 64
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Lifecycle state of a sandbox as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Being created.
    Starting,
    /// Running and answering.
    Running,
    /// Its VMM is gone (the daemon restarted and could not find it).
    Lost,
}

/// What the store keeps about a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Its id.
    pub id: String,
    /// Owner.
    pub tenant: String,
    /// Template it was made from.
    pub template: String,
    /// Guest memory.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// State.
    pub state: SandboxState,
    /// Created (ms since the epoch).
    pub created_ms: u64,
    /// Caller's labels.
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// The persistent space it runs (closing it persists the space instead of discarding).
    #[serde(default)]
    pub space_id: Option<String>,
    /// Idle timeout in seconds (no request for that long: persist or delete).
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    /// Its own lifetime limit in seconds (the tenant's or daemon's limit applies too).
    #[serde(default)]
    pub max_lifetime_s: Option<u64>,
    /// The VMM's process id while it runs (to re-adopt it after a daemon restart).
    #[serde(default)]
    pub vmm_pid: Option<u32>,
    /// Environment variables every cell and command of this sandbox gets (a request's own
    /// `env` wins).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Its egress policy (`None`: the guest reaches nothing outside its sandbox).
    #[serde(default)]
    pub network: Option<NetworkPolicy>,
}

impl SandboxRecord {
    /// A record of sandbox `id` of `tenant` (empty: a warm pool member) starting now, with
    /// no labels, space, timers, environment or egress policy.
    pub fn starting(
        id: String,
        tenant: String,
        template: String,
        memory_mib: u64,
        vcpus: u8,
    ) -> SandboxRecord {
        SandboxRecord {
            id,
            tenant,
            template,
            memory_mib,
            vcpus,
            state: SandboxState::Starting,
            created_ms: now_ms(),
            metadata: Default::default(),
            space_id: None,
            idle_timeout_s: None,
            max_lifetime_s: None,
            vmm_pid: None,
            env: Default::default(),
            network: None,
        }
    }
}

/// What a sandbox's guest may reach on the network (see `fissile_sandbox::net::egress` for
/// the order of the checks; the host's own addresses, loopback, link-local and other
/// sandboxes are out of reach whatever it says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// Reach anything not denied, when `allow` is empty (default true). Off: only `allow`.
    #[serde(default = "default_true")]
    pub internet: bool,
    /// Only these IPv4 addresses or networks (`a.b.c.d` or `a.b.c.d/len`), when not empty;
    /// at most 256.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Never these (same form); at most 256.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Domain names (`example.com`: it and every name under it; `*.example.com`: only the
    /// names under it) that resolve and that HTTP (port 80) and TLS (port 443) connections
    /// may be for, whatever `internet` and `allow` say; when not empty, no other name
    /// resolves. At most 256.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_domains: Vec<String>,
    /// Domain names (same form) that never resolve and that no HTTP or TLS connection may
    /// be for, whatever address it goes to. At most 256.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_domains: Vec<String>,
}

fn default_true() -> bool {
    true
}

impl Default for NetworkPolicy {
    fn default() -> Self {
        NetworkPolicy {
            internet: true,
            allow: Vec::new(),
            deny: Vec::new(),
            allow_domains: Vec::new(),
            deny_domains: Vec::new(),
        }
    }
}

/// Most entries in a policy's `allow` or `deny` list.
pub const MAX_POLICY_ENTRIES: usize = 256;

impl NetworkPolicy {
    /// The policy `fissile-sandbox` enforces, or what is wrong with this one.
    pub fn to_egress(&self) -> Result<fissile_sandbox::net::egress::EgressPolicy, String> {
        Ok(fissile_sandbox::net::egress::EgressPolicy {
            internet: self.internet,
            allow: parse_list("allow", &self.allow)?,
            deny: parse_list("deny", &self.deny)?,
            allow_domains: parse_list("allow_domains", &self.allow_domains)?,
            deny_domains: parse_list("deny_domains", &self.deny_domains)?,
        })
    }
}

/// The entries of list `network.<name>`, or what is wrong with it.
fn parse_list<T: std::str::FromStr<Err = String>>(
    name: &str,
    list: &[String],
) -> Result<Vec<T>, String> {
    if list.len() > MAX_POLICY_ENTRIES {
        return Err(format!(
            "network.{name}: at most {MAX_POLICY_ENTRIES} entries, got {}",
            list.len()
        ));
    }
    list.iter()
        .map(|c| c.parse().map_err(|e| format!("network.{name}: {e}")))
        .collect()
}

/// A snapshot a tenant took of a sandbox (the state itself is in snapshotd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// snapshotd's id (content-derived; carries no host path).
    pub id: String,
    /// Owner.
    pub tenant: String,
    /// The sandbox it was taken of: only that sandbox may roll back to it.
    pub sandbox_id: String,
    /// Template of that sandbox.
    pub template: String,
    /// Guest memory of that sandbox.
    pub memory_mib: u64,
    /// vCPUs of that sandbox.
    pub vcpus: u8,
    /// Taken (ms since the epoch).
    pub created_ms: u64,
}

/// A persistent space: a sandbox's state that outlives the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceRecord {
    /// Its id (`sp-...`).
    pub id: String,
    /// Owner.
    pub tenant: String,
    /// Template.
    pub template: String,
    /// Guest memory.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Created (ms since the epoch).
    pub created_ms: u64,
    /// The sandbox running it now, if any.
    pub sandbox_id: Option<String>,
    /// The durable snapshot it resumes from when no sandbox runs it (`None`: never
    /// persisted yet).
    pub snapshot: Option<String>,
    /// When it was last persisted (ms since the epoch).
    #[serde(default)]
    pub persisted_ms: Option<u64>,
    /// Its state could not be persisted (its VMM vanished with unsaved state): resuming
    /// would give older state, so it is refused until the caller deletes the space.
    #[serde(default)]
    pub lost: bool,
    /// Caller's labels.
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Environment of the sandboxes that run it.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// The egress policy its sandboxes run with.
    #[serde(default)]
    pub network: Option<NetworkPolicy>,
}

/// A template's ready snapshot: booted once, warmed up, snapshotted durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyRecord {
    /// snapshotd's id of the snapshot.
    pub snapshot: String,
    /// When it was made (ms since the epoch).
    pub created_ms: u64,
    /// How long the boot, the warm-up and the snapshot took, in ms.
    pub build_ms: u64,
}

/// A template a tenant built over the API (`POST /v1/templates`): its spec and its ready
/// snapshots, one per ready shape of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// Its name (unique per tenant).
    pub name: String,
    /// Its owner.
    pub tenant: String,
    /// The template it derives from.
    pub base: String,
    /// The spec it was built from (TOML).
    pub spec: String,
    /// Environment of its sandboxes' cells and commands (under a create's own).
    pub env: std::collections::BTreeMap<String, String>,
    /// Its ready snapshots by shape (`MIBxVCPUS`).
    pub ready: std::collections::BTreeMap<String, ReadyRecord>,
    /// Fingerprint of the kernel, root image and VMM it was built on: a daemon on other
    /// images refuses to start it (its snapshots hold the old image's page cache).
    pub fingerprint: String,
    /// When it was built (ms since the epoch).
    pub created_ms: u64,
}

/// The metadata store.
#[derive(Debug)]
pub struct Db {
    db: Database,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Hex sha256 of an API key: what is stored and looked up.
pub fn key_hash(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    // One allocation (an API key's hash is computed for every request).
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// `n` random bytes as hex, from the kernel's CSPRNG.
pub fn random_hex(n: usize) -> Result<String, DbError> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(DbError::Random)?;
    Ok(hex(&buf))
}

impl Db {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let db =
            Database::create(path).map_err(|e| DbError::Open(path.display().to_string(), e))?;
        let tx = db
            .begin_write()
            .map_err(|e| DbError::Transaction(Box::new(e)))?;
        tx.open_table(KEYS).map_err(DbError::Table)?;
        tx.open_table(SANDBOXES).map_err(DbError::Table)?;
        tx.open_table(SNAPSHOTS).map_err(DbError::Table)?;
        tx.open_table(SPACES).map_err(DbError::Table)?;
        tx.open_table(READY).map_err(DbError::Table)?;
        tx.open_table(TEMPLATES).map_err(DbError::Table)?;
        tx.open_table(UNFREED).map_err(DbError::Table)?;
        tx.open_table(TENANTS).map_err(DbError::Table)?;
        tx.commit().map_err(DbError::Commit)?;
        Ok(Db { db })
    }

    fn put(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &impl Serialize,
    ) -> Result<(), DbError> {
        let bytes = serde_json::to_vec(value).map_err(DbError::Decode)?;
        let tx = self
            .db
            .begin_write()
            .map_err(|e| DbError::Transaction(Box::new(e)))?;
        tx.open_table(table)
            .map_err(DbError::Table)?
            .insert(key, bytes.as_slice())
            .map_err(DbError::Storage)?;
        tx.commit().map_err(DbError::Commit)
    }

    fn get<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, DbError> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| DbError::Transaction(Box::new(e)))?;
        let t = tx.open_table(table).map_err(DbError::Table)?;
        match t.get(key).map_err(DbError::Storage)? {
            Some(v) => Ok(Some(
                serde_json::from_slice(v.value()).map_err(DbError::Decode)?,
            )),
            None => Ok(None),
        }
    }

    /// Creates an API key for `tenant` (`admin`: it may manage keys).
    pub fn create_key(&self, tenant: &str, admin: bool) -> Result<CreatedKey, DbError> {
        let key = format!("fsk_{}", random_hex(24)?);
        let record = KeyRecord {
            tenant: tenant.to_string(),
            created_ms: now_ms(),
            revoked: false,
            admin,
        };
        let hash = key_hash(&key);
        self.put(KEYS, &hash, &record)?;
        Ok(CreatedKey { key, hash, record })
    }

    /// Every key's hash and record, revoked ones included.
    fn key_records(&self) -> Result<Vec<(String, KeyRecord)>, DbError> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| DbError::Transaction(Box::new(e)))?;
        let t = tx.open_table(KEYS).map_err(DbError::Table)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(DbError::Storage)? {
            let (k, v) = item.map_err(DbError::Storage)?;
            let record: KeyRecord = serde_json::from_slice(v.value()).map_err(DbError::Decode)?;
            out.push((k.value().to_string(), record));
        }
        Ok(out)
    }

    /// Every key that is not revoked: its hash → what it grants.
    pub fn active_keys(&self) -> Result<std::collections::HashMap<String, ActiveKey>, DbError> {
        Ok(self
            .key_records()?
            .into_iter()
            .filter(|(_, r)| !r.revoked)
            .map(|(hash, r)| {
                let key = ActiveKey {
                    tenant: r.tenant,
                    admin: r.admin,
                };
                (hash, key)
            })
            .collect())
    }

    /// The keys that are not revoked, oldest first.
    pub fn key_listing(&self) -> Result<Vec<KeyListing>, DbError> {
        let mut out: Vec<KeyListing> = self
            .key_records()?
            .into_iter()
            .filter(|(_, r)| !r.revoked)
            .map(|(hash, record)| KeyListing {
                id: key_id(&hash),
                record,
            })
            .collect();
        out.sort_by(|a, b| (a.record.created_ms, &a.id).cmp(&(b.record.created_ms, &b.id)));
        Ok(out)
    }

    /// Revokes the key whose id ([`key_id`]) is `id`; returns its hash, `None` if no key
    /// that is not revoked has that id.
    pub fn revoke_key_id(&self, id: &str) -> Result<Option<String>, DbError> {
        let found = self
            .key_records()?
            .into_iter()
            .find(|(hash, r)| !r.revoked && key_id(hash) == id);
        let Some((hash, mut record)) = found else {
            return Ok(None);
        };
        record.revoked = true;
        self.put(KEYS, &hash, &record)?;
        Ok(Some(hash))
    }

    /// Revokes a key; false if it does not exist.
    pub fn revoke_key(&self, key: &str) -> Result<bool, DbError> {
        let hash = key_hash(key);
        let Some(mut record) = self.get::<KeyRecord>(KEYS, &hash)? else {
            return Ok(false);
        };
        record.revoked = true;
        self.put(KEYS, &hash, &record)?;
        Ok(true)
    }

    /// Stores (creates or replaces) a sandbox record.
    pub fn put_sandbox(&self, record: &SandboxRecord) -> Result<(), DbError> {
        self.put(SANDBOXES, &record.id, record)
    }

    /// A sandbox record.
    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, DbError> {
        self.get(SANDBOXES, id)
    }

    /// Every sandbox record (of every tenant).
    pub fn sandboxes(&self) -> Result<Vec<SandboxRecord>, DbError> {
        self.all(SANDBOXES)
    }

    /// Removes a sandbox record.
    pub fn remove_sandbox(&self, id: &str) -> Result<(), DbError> {
        self.remove(SANDBOXES, id)
    }

    /// Stores a snapshot record.
    pub fn put_snapshot(&self, record: &SnapshotRecord) -> Result<(), DbError> {
        self.put(SNAPSHOTS, &record.id, record)
    }

    /// A snapshot record.
    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, DbError> {
        self.get(SNAPSHOTS, id)
    }

    /// Stores (creates or replaces) a space record.
    pub fn put_space(&self, record: &SpaceRecord) -> Result<(), DbError> {
        self.put(SPACES, &record.id, record)
    }

    /// Stores space record `space` and removes sandbox `id`'s record in one transaction: a
    /// reader sees the space persisted and the sandbox gone, or neither.
    pub fn put_space_removing_sandbox(&self, space: &SpaceRecord, id: &str) -> Result<(), DbError> {
        let bytes = serde_json::to_vec(space).map_err(DbError::Decode)?;
        let tx = self
            .db
            .begin_write()
            .map_err(|e| DbError::Transaction(Box::new(e)))?;
        tx.open_table(SPACES)
            .map_err(DbError::Table)?
            .insert(space.id.as_str(), bytes.as_slice())
            .map_err(DbError::Storage)?;
        tx.open_table(SANDBOXES)
            .map_err(DbError::Table)?
            .remove(id)
            .map_err(DbError::Storage)?;
        tx.commit().map_err(DbError::Commit)
    }

    /// A space record.
    pub fn space(&self, id: &str) -> Result<Option<SpaceRecord>, DbError> {
        self.get(SPACES, id)
    }

    /// Every space record (of every tenant).
    pub fn spaces(&self) -> Result<Vec<SpaceRecord>, DbError> {
        self.all(SPACES)
    }

    /// Removes a space record.
    pub fn remove_space(&self, id: &str) -> Result<(), DbError> {
        self.remove(SPACES, id)
    }

    /// Records a template's ready snapshot under `key`.
    pub fn put_ready(&self, key: &str, record: &ReadyRecord) -> Result<(), DbError> {
        self.put(READY, key, record)
    }

    /// A template's ready snapshot.
    pub fn ready(&self, key: &str) -> Result<Option<ReadyRecord>, DbError> {
        self.get(READY, key)
    }

    /// Records a built template.
    pub fn put_template(&self, record: &TemplateRecord) -> Result<(), DbError> {
        self.put(
            TEMPLATES,
            &format!("{}/{}", record.tenant, record.name),
            record,
        )
    }

    /// `tenant`'s template `name`.
    pub fn template(&self, tenant: &str, name: &str) -> Result<Option<TemplateRecord>, DbError> {
        self.get(TEMPLATES, &format!("{tenant}/{name}"))
    }

    /// Every built template.
    pub fn templates(&self) -> Result<Vec<TemplateRecord>, DbError> {
        self.all(TEMPLATES)
    }

    /// Forgets `tenant`'s template `name`.
    pub fn remove_template(&self, tenant: &str, name: &str) -> Result<(), DbError> {
        self.remove(TEMPLATES, &format!("{tenant}/{name}"))
    }

    /// Records that snapshot `id` is to be deleted once snapshotd lets it go.
    pub fn put_unfreed(&self, id: &str) -> Result<(), DbError> {
        self.put(UNFREED, id, &now_ms())
    }

    /// The snapshots waiting to be deleted.
    pub fn unfreed(&self) -> Result<Vec<String>, DbError> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| DbError::Transaction(Box::new(e)))?;
        let t = tx.open_table(UNFREED).map_err(DbError::Table)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(DbError::Storage)? {
            let (k, _) = item.map_err(DbError::Storage)?;
            out.push(k.value().to_string());
        }
        Ok(out)
    }

    /// Snapshot `id` is gone (or never was).
    pub fn remove_unfreed(&self, id: &str) -> Result<(), DbError> {
        self.remove(UNFREED, id)
    }

    /// Stores `tenant`'s own limits (replacing what it had).
    pub fn put_tenant_limits(&self, tenant: &str, limits: &TenantLimits) -> Result<(), DbError> {
        self.put(TENANTS, tenant, limits)
    }

    /// `tenant`'s own limits, if the operator set any.
    pub fn tenant_limits(&self, tenant: &str) -> Result<Option<TenantLimits>, DbError> {
        self.get(TENANTS, tenant)
    }

    /// Every tenant's own limits, by tenant name.
    pub fn all_tenant_limits(&self) -> Result<Vec<(String, TenantLimits)>, DbError> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| DbError::Transaction(Box::new(e)))?;
        let t = tx.open_table(TENANTS).map_err(DbError::Table)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(DbError::Storage)? {
            let (k, v) = item.map_err(DbError::Storage)?;
            let limits = serde_json::from_slice(v.value()).map_err(DbError::Decode)?;
            out.push((k.value().to_string(), limits));
        }
        Ok(out)
    }

    fn all<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, DbError> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| DbError::Transaction(Box::new(e)))?;
        let t = tx.open_table(table).map_err(DbError::Table)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(DbError::Storage)? {
            let (_, v) = item.map_err(DbError::Storage)?;
            out.push(serde_json::from_slice(v.value()).map_err(DbError::Decode)?);
        }
        Ok(out)
    }

    fn remove(&self, table: TableDefinition<&str, &[u8]>, id: &str) -> Result<(), DbError> {
        let tx = self
            .db
            .begin_write()
            .map_err(|e| DbError::Transaction(Box::new(e)))?;
        tx.open_table(table)
            .map_err(DbError::Table)?
            .remove(id)
            .map_err(DbError::Storage)?;
        tx.commit().map_err(DbError::Commit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_lower_case_hex_of_sha256() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(
            key_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn record(id: &str, tenant: &str) -> SandboxRecord {
        SandboxRecord {
            state: SandboxState::Running,
            created_ms: 1,
            ..SandboxRecord::starting(id.into(), tenant.into(), "python-datasci".into(), 512, 1)
        }
    }

    #[test]
    fn keys_are_stored_hashed_and_revocation_sticks_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let db = Db::open(&path).unwrap();
        let created = db.create_key("acme", false).unwrap();
        let key = created.key;
        assert!(key.starts_with("fsk_") && key.len() == 52, "{key}");
        assert_eq!(created.hash, key_hash(&key));
        let tenant_of = |db: &Db, key: &str| {
            db.active_keys()
                .unwrap()
                .get(&key_hash(key))
                .map(|k| k.tenant.clone())
        };
        assert_eq!(tenant_of(&db, &key).as_deref(), Some("acme"));
        assert_eq!(tenant_of(&db, "fsk_wrong"), None);
        let raw = std::fs::read(&path).unwrap();
        assert!(
            !raw.windows(key.len()).any(|w| w == key.as_bytes()),
            "the key itself is in the file"
        );

        let other = db.create_key("other", true).unwrap().key;
        assert_eq!(db.active_keys().unwrap().len(), 2);
        assert!(db.revoke_key(&key).unwrap());
        let active = ActiveKey {
            tenant: "other".into(),
            admin: true,
        };
        assert_eq!(
            db.active_keys().unwrap(),
            [(key_hash(&other), active)].into()
        );
        drop(db);
        let db = Db::open(&path).unwrap();

        assert_eq!(tenant_of(&db, &key), None);
    }

    #[test]
    fn keys_are_listed_by_id_and_revoked_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("m.redb")).unwrap();
        let a = db.create_key("acme", false).unwrap();
        let (hash_a, hash_b) = (a.hash, db.create_key("ops", true).unwrap().hash);

        let listed = db.key_listing().unwrap();

        let ids: Vec<_> = listed.iter().map(|k| k.id.as_str()).collect();
        assert!(ids.contains(&key_id(&hash_a).as_str()) && ids.contains(&key_id(&hash_b).as_str()));
        assert!(
            listed
                .iter()
                .all(|k| k.id.len() == 24 && !k.id.contains(&a.key[4..]))
        );
        assert_eq!(
            db.revoke_key_id(&key_id(&hash_a)).unwrap(),
            Some(hash_a.clone())
        );
        assert_eq!(
            db.revoke_key_id(&key_id(&hash_a)).unwrap(),
            None,
            "already revoked"
        );
        assert_eq!(db.revoke_key_id("key_nonexistent").unwrap(), None);
        assert_eq!(db.key_listing().unwrap().len(), 1);
        assert!(!db.active_keys().unwrap().contains_key(&hash_a));
    }

    #[test]
    fn a_key_record_written_before_admin_keys_existed_reads_as_not_admin() {
        let old = br#"{"tenant":"acme","created_ms":1,"revoked":false}"#;
        let r: KeyRecord = serde_json::from_slice(old).unwrap();
        assert!(!r.admin && r.tenant == "acme");
    }

    #[test]
    fn sandbox_records_round_trip_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("m.redb")).unwrap();
        db.put_sandbox(&record("sb-a", "acme")).unwrap();
        db.put_sandbox(&record("sb-b", "other")).unwrap();

        assert_eq!(db.sandbox("sb-a").unwrap(), Some(record("sb-a", "acme")));
        assert_eq!(db.sandboxes().unwrap().len(), 2);
        db.remove_sandbox("sb-a").unwrap();
        assert_eq!(db.sandbox("sb-a").unwrap(), None);
        assert_eq!(db.sandboxes().unwrap().len(), 1);
    }

    #[test]
    fn persisting_a_space_forgets_its_sandbox_in_the_same_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("m.redb")).unwrap();
        db.put_sandbox(&record("sb-a", "acme")).unwrap();
        let space = SpaceRecord {
            id: "sp-a".into(),
            tenant: "acme".into(),
            template: "python-datasci".into(),
            memory_mib: 512,
            vcpus: 1,
            created_ms: 1,
            sandbox_id: None,
            snapshot: Some("snap".into()),
            persisted_ms: Some(2),
            lost: false,
            metadata: Default::default(),
            env: Default::default(),
            network: None,
        };
        db.put_space_removing_sandbox(&space, "sb-a").unwrap();
        assert_eq!(db.sandbox("sb-a").unwrap(), None);
        assert_eq!(db.space("sp-a").unwrap(), Some(space));
    }

    #[test]
    fn tenant_limits_round_trip_and_unknown_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let db = Db::open(&path).unwrap();
        assert_eq!(db.tenant_limits("acme").unwrap(), None);
        let limits = TenantLimits {
            max_sandboxes: Some(2),
            idle_timeout_s: Some(0),
            ..TenantLimits::default()
        };
        db.put_tenant_limits("acme", &limits).unwrap();
        drop(db);
        let db = Db::open(&path).unwrap();
        assert_eq!(db.tenant_limits("acme").unwrap(), Some(limits.clone()));
        assert_eq!(
            db.all_tenant_limits().unwrap(),
            vec![("acme".to_string(), limits)]
        );
        assert!(serde_json::from_str::<TenantLimits>(r#"{"max_sandbox":1}"#).is_err());
    }

    #[test]
    fn snapshots_to_free_later_are_kept_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        assert!(db.unfreed().unwrap().is_empty());
        db.put_unfreed("snap-a").unwrap();
        db.put_unfreed("snap-b").unwrap();
        db.put_unfreed("snap-a").unwrap();
        assert_eq!(db.unfreed().unwrap(), ["snap-a", "snap-b"]);
        drop(db);
        let db = Db::open(&dir.path().join("db")).unwrap();
        db.remove_unfreed("snap-a").unwrap();
        assert_eq!(db.unfreed().unwrap(), ["snap-b"]);
    }
}
