//! Templates and their ready snapshots.
//!
//! A template's first use in one of the daemon's *ready shapes* (memory and vCPUs; by
//! default 512 MiB and 1 vCPU, `--ready-shape`) boots it once more on the side, runs the
//! warm-up ([`WARMUP`]: imports numpy, pandas and matplotlib in the REPL and draws a figure,
//! which builds matplotlib's font cache) and keeps a durable snapshot of that VM. Later
//! creates of that shape restore the snapshot instead of booting, so no sandbox pays the boot
//! or the imports again; the create that started the build boots, as do creates of other
//! shapes. A restore that fails (the snapshot is gone from the store) marks the snapshot
//! failed, boots instead, and a later create builds a new one after [`RETRY_AFTER_MS`].
//!
//! The snapshot is recorded in the metadata store under the template, the shape and a
//! fingerprint of the kernel, the root image and `fissile-vmm` (path, size, modification
//! time), so a daemon restarted on the same images reuses it and one upgraded to new images
//! builds a new one. Its VM counts against no tenant's quota but takes a start permit like
//! any boot.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use fissile_sandbox::Sandbox;
use serde::{Deserialize, Serialize};

use crate::app::{App, DEFAULT_TEMPLATE, blocking, lock};
use crate::db::{ReadyRecord, now_ms, random_hex};
use crate::error::ApiError;

/// Runs in a template's REPL before its ready snapshot: what every sandbox would otherwise
/// pay on its first cells. Leaves no names behind (the modules stay imported).
pub const WARMUP: &str = r#"import importlib as _fissile_il
for _fissile_m in ("numpy", "pandas", "matplotlib.pyplot"):
    try:
        _fissile_il.import_module(_fissile_m)
    except ImportError:
        pass
try:
    import matplotlib.pyplot as _fissile_plt
    _fissile_fig = _fissile_plt.figure(figsize=(2, 2))
    _fissile_plt.plot([0, 1], [0, 1])
    _fissile_plt.title("warm-up")
    _fissile_fig.canvas.draw()
    _fissile_plt.close(_fissile_fig)
    del _fissile_plt, _fissile_fig
except ImportError:
    pass
del _fissile_il, _fissile_m
"#;

/// How long after a failed build a create may try again.
pub const RETRY_AFTER_MS: u64 = 10 * 60 * 1000;

/// A template's shape: what a ready snapshot is made for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Template name.
    pub template: String,
    /// Guest memory.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
}

/// Where one shape's ready snapshot stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ReadyState {
    /// Being made now (creates boot meanwhile).
    Building,
    /// Creates of this shape restore it.
    Ready {
        /// How long the boot, the warm-up and the snapshot took.
        build_ms: u64,
        /// When it was made (ms since the epoch).
        created_ms: u64,
    },
    /// Making (or restoring) it failed; creates boot until a retry succeeds.
    Failed {
        /// Why.
        message: String,
        /// When (ms since the epoch).
        at_ms: u64,
    },
}

/// The ready snapshots of this daemon, by shape (the snapshot ids stay inside the daemon).
#[derive(Debug, Default)]
pub struct ReadySnapshots {
    states: Mutex<HashMap<Shape, (ReadyState, Option<String>)>>,
}

/// One ready shape of a template, as `GET /v1/templates` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReadyView {
    /// Guest memory (MiB).
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Its ready snapshot (`null`: not made yet; the next create of this shape makes it).
    pub snapshot: Option<ReadyState>,
    /// Sandboxes of this shape in the warm pool now, running and waiting for a create.
    pub warm: usize,
}

/// A template, as `GET /v1/templates` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TemplateView {
    /// Its name (`template` in a create).
    pub name: String,
    /// The template it derives from (built over the API); `null` for the daemon's own
    /// template.
    pub base: Option<String>,
    /// Its ready snapshots, one per ready shape of the daemon.
    pub ready: Vec<ReadyView>,
}

/// `path`'s identity for the fingerprint: path, size, modification time.
fn file_identity(path: &Path) -> String {
    let meta = std::fs::metadata(path).ok();
    let size = meta.as_ref().map_or(0, std::fs::Metadata::len);
    let mtime = meta
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}:{size}:{mtime}", path.display())
}

impl App {
    /// Fingerprint of the images a ready snapshot was made from.
    pub(crate) fn ready_fingerprint(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for p in [&self.config.kernel, &self.config.rootfs, &self.config.vmm] {
            h.update(file_identity(p).as_bytes());
            h.update([0]);
        }
        // The device set differs with and without a guest network.
        h.update([u8::from(self.config.guest_network)]);
        h.finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn ready_key(&self, shape: &Shape) -> String {
        format!(
            "{}|{}|{}|{}",
            shape.template,
            shape.memory_mib,
            shape.vcpus,
            self.ready_fingerprint()
        )
    }

    fn is_ready_shape(&self, memory_mib: u64, vcpus: u8) -> bool {
        self.config
            .ready_shapes
            .iter()
            .any(|&(m, v)| m == memory_mib && v == vcpus)
    }

    /// The ready snapshot for a boot of `shape`, if there is one. If there is none (and it
    /// is a ready shape) its build starts, once, and this create boots.
    pub(crate) fn ready_snapshot(&self, shape: &Shape) -> Option<String> {
        if !self.is_ready_shape(shape.memory_mib, shape.vcpus) {
            return None;
        }
        let mut states = lock(&self.ready.states);
        match states.get(shape) {
            Some((ReadyState::Ready { .. }, snap)) => return snap.clone(),
            Some((ReadyState::Building, _)) => return None,
            Some((ReadyState::Failed { at_ms, .. }, _))
                if now_ms() < at_ms.saturating_add(RETRY_AFTER_MS) =>
            {
                return None;
            }
            _ => {}
        }
        // Made by an earlier run of this daemon from the same images?
        if let Ok(Some(r)) = self.db.ready(&self.ready_key(shape)) {
            let state = ReadyState::Ready {
                build_ms: r.build_ms,
                created_ms: r.created_ms,
            };
            states.insert(shape.clone(), (state, Some(r.snapshot.clone())));
            return Some(r.snapshot);
        }
        states.insert(shape.clone(), (ReadyState::Building, None));
        drop(states);
        let app = self.clone();
        let shape = shape.clone();
        tokio::spawn(async move { app.build_ready(shape).await });
        None
    }

    /// `shape`'s ready snapshot if it is made (starts no build).
    pub(crate) fn made_ready_snapshot(&self, shape: &Shape) -> Option<String> {
        match lock(&self.ready.states).get(shape) {
            Some((ReadyState::Ready { .. }, snap)) => snap.clone(),
            _ => None,
        }
    }

    /// A restore from `shape`'s ready snapshot failed: creates boot until it is rebuilt.
    pub(crate) fn ready_failed(&self, shape: &Shape, message: String) {
        tracing::warn!(template = %shape.template, memory_mib = shape.memory_mib,
            vcpus = shape.vcpus, %message, "the ready snapshot failed; creates boot");
        let state = ReadyState::Failed {
            message,
            at_ms: now_ms(),
        };
        lock(&self.ready.states).insert(shape.clone(), (state, None));
    }

    /// Starts building the ready snapshots of the default template's ready shapes (at
    /// daemon start, so the first creates find them).
    pub fn warm_templates(&self) {
        for &(memory_mib, vcpus) in &self.config.ready_shapes {
            let shape = Shape {
                template: DEFAULT_TEMPLATE.to_string(),
                memory_mib,
                vcpus,
            };
            let _ = self.ready_snapshot(&shape);
        }
    }

    async fn build_ready(self, shape: Shape) {
        let permit = self.starts.clone().acquire_owned().await;
        let app = self.clone();
        let s = shape.clone();
        let built = blocking(move || {
            let _permit = permit;
            app.make_ready(&s)
        })
        .await;
        let entry = match built {
            Ok(record) => {
                if let Err(e) = self.db.put_ready(&self.ready_key(&shape), &record) {
                    tracing::warn!(error = %e, "cannot record the ready snapshot");
                }
                tracing::info!(template = %shape.template, memory_mib = shape.memory_mib,
                    vcpus = shape.vcpus, build_ms = record.build_ms, "ready snapshot made");
                let state = ReadyState::Ready {
                    build_ms: record.build_ms,
                    created_ms: record.created_ms,
                };
                (state, Some(record.snapshot))
            }
            Err(e) => {
                tracing::warn!(template = %shape.template, error = %e.message,
                    "making the ready snapshot failed; creates boot");
                let state = ReadyState::Failed {
                    message: e.message,
                    at_ms: now_ms(),
                };
                (state, None)
            }
        };
        lock(&self.ready.states).insert(shape, entry);
    }

    /// Boots `shape`, runs the warm-up and takes a durable snapshot (blocking).
    fn make_ready(&self, shape: &Shape) -> Result<ReadyRecord, ApiError> {
        let t0 = Instant::now();
        let dir = self.config.state_dir.join("templates").join(format!(
            "{}-{}-{}-{}",
            shape.template,
            shape.memory_mib,
            shape.vcpus,
            random_hex(4)?
        ));
        // With a network device (when the daemon gives sandboxes one) and no way out: every
        // sandbox restored from it gets its own namespace and policy.
        let cfg = self.sandbox_config(dir.clone(), shape.memory_mib, shape.vcpus, None);
        let made = (|| {
            let mut sb =
                Sandbox::boot(&cfg).map_err(|e| ApiError::sandbox("booting the template", &e))?;
            let out = sb
                .exec(WARMUP)
                .map_err(|e| ApiError::sandbox("running the template's warm-up", &e))?;
            if let Some((name, value, _)) = out.error() {
                return Err(ApiError::internal(format!(
                    "the template's warm-up raised {name}: {value}"
                )));
            }
            let snap = sb
                .snapshot(true)
                .map_err(|e| ApiError::sandbox("snapshotting the warmed template", &e))?;
            Ok(ReadyRecord {
                snapshot: snap.id,
                created_ms: now_ms(),
                build_ms: t0.elapsed().as_millis() as u64,
            })
        })();
        let _ = std::fs::remove_dir_all(&dir);
        made
    }

    /// The templates and the state of their ready snapshots.
    pub fn templates(&self) -> Vec<TemplateView> {
        let states = lock(&self.ready.states);
        let ready = self
            .config
            .ready_shapes
            .iter()
            .map(|&(memory_mib, vcpus)| {
                let shape = Shape {
                    template: DEFAULT_TEMPLATE.to_string(),
                    memory_mib,
                    vcpus,
                };
                ReadyView {
                    memory_mib,
                    vcpus,
                    snapshot: states.get(&shape).map(|(s, _)| s.clone()),
                    warm: self.pool.idle(&shape),
                }
            })
            .collect();
        vec![TemplateView {
            name: DEFAULT_TEMPLATE.to_string(),
            base: None,
            ready,
        }]
    }
}

/// Parses a ready shape `MIBxVCPUS` (e.g. `512x1`).
pub fn parse_shape(s: &str) -> Result<(u64, u8), String> {
    let (m, v) = s
        .split_once('x')
        .ok_or_else(|| format!("{s:?}: expected MIBxVCPUS, e.g. 512x1"))?;
    let m: u64 = m.parse().map_err(|e| format!("{s:?}: memory {m:?}: {e}"))?;
    let v: u8 = v.parse().map_err(|e| format!("{s:?}: vcpus {v:?}: {e}"))?;
    if m < 128 || v == 0 {
        return Err(format!("{s:?}: at least 128 MiB and 1 vCPU"));
    }
    Ok((m, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_bad_ones_say_why() {
        assert_eq!(parse_shape("512x1"), Ok((512, 1)));
        assert_eq!(parse_shape("2048x4"), Ok((2048, 4)));
        for bad in ["512", "x1", "512x", "512x0", "64x1", "ax1", "512x300"] {
            assert!(parse_shape(bad).is_err(), "{bad} was accepted");
        }
    }
}
