//! Fork, merge, snapshot and rollback of running sandboxes (Podflare's semantics for fork
//! and merge; checkpoint and rollback are Fissile's own).
//!
//! Each operation locks the sandboxes it changes one at a time (never two at once, so no
//! lock order to get wrong) and runs on the blocking pool.

use std::sync::Arc;

use fissile_sandbox::ChildPlace;
use serde::{Deserialize, Serialize};

use crate::app::{App, Live, blocking, lock};
use crate::db::{SandboxRecord, SandboxState, SnapshotRecord, now_ms, random_hex};
use crate::error::ApiError;

/// One child of a fork, as the API reports it: its id, or why it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ForkChild {
    /// It runs.
    Started {
        /// The child's sandbox id.
        id: String,
    },
    /// It failed (and was stopped).
    Failed {
        /// Why.
        error: String,
    },
}

/// The answer to a fork.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ForkView {
    /// One entry per child asked for, in order.
    pub children: Vec<ForkChild>,
    /// Milliseconds until every child answered (or failed).
    pub total_ms: f64,
}

/// A snapshot as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotView {
    /// Its id: pass it to create (`from_snapshot`) or to rollback.
    pub snapshot_id: String,
    /// The sandbox it was taken of.
    pub sandbox_id: String,
    /// When (ms since the epoch).
    pub created_at_ms: u64,
}

impl From<SnapshotRecord> for SnapshotView {
    fn from(s: SnapshotRecord) -> Self {
        Self {
            snapshot_id: s.id,
            sandbox_id: s.sandbox_id,
            created_at_ms: s.created_ms,
        }
    }
}

impl App {
    /// Forks sandbox `id` into `n` children (each its own sandbox, not persistent, with the
    /// parent's labels); the parent keeps running. Quotas count the children.
    #[tracing::instrument(name = "fork", skip_all, fields(tenant = tenant, sandbox = id, n = n))]
    pub async fn fork(&self, tenant: &str, id: &str, n: u32) -> Result<ForkView, ApiError> {
        if n == 0 || n > fissile_proto::control::MAX_FORK_CHILDREN {
            return Err(ApiError::bad_request(format!(
                "n must be in 1..={}, got {n}",
                fissile_proto::control::MAX_FORK_CHILDREN
            )));
        }
        let max_fork = self.limits(tenant).max_fork;
        if n > max_fork {
            return Err(ApiError::quota(format!(
                "tenant {tenant} may fork at most {max_fork} children at once, asked for {n}"
            )));
        }
        let parent = self.get_booted(tenant, id)?;
        // The stored record, not the one registered at start: its egress policy may have
        // changed since (the children run with the current one).
        let current = self.record(tenant, id)?;
        let mut records = Vec::new();
        for _ in 0..n {
            records.push(SandboxRecord {
                id: format!("sb-{}", random_hex(8)?),
                state: SandboxState::Starting,
                created_ms: now_ms(),
                space_id: None,
                vmm_pid: None,
                ..current.clone()
            });
        }
        // Standby VMMs of the parent's shape take the first children, which get their ids
        // (chosen when they started); a child with an egress policy needs its namespace
        // routed, which a standby's is not.
        let mut taken = if current.network.is_none() {
            self.take_standbys(current.memory_mib, current.vcpus, n as usize, true)
        } else {
            self.take_standbys(current.memory_mib, current.vcpus, 0, true)
        };
        for (r, s) in records.iter_mut().zip(&taken.members) {
            r.id = s.record.id.clone();
        }
        if let Err(e) = self.reserve(tenant, &records) {
            let members = std::mem::take(&mut taken.members);
            self.return_standbys(current.memory_mib, current.vcpus, members);
            return Err(e);
        }
        if let Err(e) = records.iter().try_for_each(|r| self.db.put_sandbox(r)) {
            for r in &records {
                let _ = self.unreserve(&r.id);
            }
            self.stop_standbys(std::mem::take(&mut taken.members));
            return Err(e.into());
        }
        if current.network.is_none() {
            self.fork_demand(current.memory_mib, current.vcpus, n as usize);
        }
        let app = self.clone();
        blocking(move || {
            let standbys = std::mem::take(&mut taken.members);
            let view = app.fork_blocking(&parent, records, standbys);
            // The pool's refill waits for the fork to end.
            drop(taken);
            Ok(view)
        })
        .await
    }

    fn fork_blocking(
        &self,
        parent: &Arc<Live>,
        records: Vec<SandboxRecord>,
        standbys: Vec<crate::standby::Member>,
    ) -> ForkView {
        let t0 = std::time::Instant::now();
        let from_standby = standbys.len();
        let mut standbys = standbys.into_iter().map(|m| m.standby);
        let places = records
            .iter()
            .map(|r| match standbys.next() {
                Some(s) => ChildPlace::Standby(Box::new(s)),
                None => ChildPlace::Dir(self.dir(&r.id)),
            })
            .collect();
        let outcome = lock(&parent.sandbox)
            .as_mut()
            .ok_or_else(|| ApiError::conflict("the parent stopped"))
            .and_then(|sb| {
                sb.fork_each_with(places)
                    .map_err(|e| ApiError::sandbox("forking", &e))
            });
        let mut children = Vec::new();
        let mut started = std::collections::BTreeSet::new();
        match outcome {
            Ok((outcomes, _timings)) => {
                for (i, (record, child)) in records.into_iter().zip(outcomes).enumerate() {
                    let id = record.id.clone();
                    if i < from_standby && child.is_ok() {
                        self.metrics.standby_taken(1);
                    }
                    let attached = child
                        .map_err(|e| ApiError::sandbox("starting the child", &e))
                        .and_then(|sb| self.attach(record, sb));
                    match attached {
                        Ok(_) => {
                            started.insert(id.clone());
                            children.push(ForkChild::Started { id });
                        }
                        Err(e) => {
                            let _ = self.unreserve(&id);
                            children.push(ForkChild::Failed { error: e.message });
                        }
                    }
                }
            }
            Err(e) => {
                for r in records {
                    let _ = self.unreserve(&r.id);
                    children.push(ForkChild::Failed {
                        error: e.message.clone(),
                    });
                }
            }
        }
        *lock(&parent.forks) = crate::app::ForkSet {
            children: started,
            merged: false,
        };
        ForkView {
            children,
            total_ms: t0.elapsed().as_secs_f64() * 1e3,
        }
    }

    /// The parent `parent` takes the state of `winner`, a child of its latest fork: memory,
    /// vCPUs, devices, REPL globals. The parent keeps its id; the winner and its siblings keep
    /// running. Self-merge is 400; a winner that is not a child of the latest fork, or a
    /// second merge of that fork, is 404.
    #[tracing::instrument(name = "merge", skip_all, fields(tenant = tenant, sandbox = parent, winner = winner))]
    pub async fn merge(&self, tenant: &str, parent: &str, winner: &str) -> Result<(), ApiError> {
        if parent == winner {
            return Err(ApiError::bad_request("a sandbox cannot merge into itself"));
        }
        let p = self.get_booted(tenant, parent)?;
        let w = self.get_booted(tenant, winner)?;
        {
            let forks = lock(&p.forks);
            if !forks.children.contains(winner) {
                return Err(ApiError::not_found(format!(
                    "{winner} is not a child of {parent}'s latest fork"
                )));
            }
            if forks.merged {
                return Err(ApiError::not_found(format!(
                    "{parent}'s latest fork was already merged"
                )));
            }
        }
        blocking(move || {
            let snap = lock(&w.sandbox)
                .as_ref()
                .ok_or_else(|| ApiError::conflict("the winner stopped"))?
                .snapshot(false)
                .map_err(|e| ApiError::sandbox("snapshotting the winner", &e))?;
            let mut forks_guard = lock(&p.forks);
            if forks_guard.merged {
                return Err(ApiError::not_found("the latest fork was already merged"));
            }
            let mut parent = lock(&p.sandbox);
            let parent = parent
                .as_mut()
                .ok_or_else(|| ApiError::conflict("the parent stopped"))?;
            parent
                .merge_snapshot(&snap.id)
                .map_err(|e| ApiError::sandbox("merging", &e))?;
            p.agents.reset_with(parent.take_agent());
            forks_guard.merged = true;
            Ok(())
        })
        .await
    }

    /// A durable snapshot of sandbox `id` (it keeps running), recorded as the tenant's.
    #[tracing::instrument(name = "snapshot", skip_all, fields(tenant = tenant, sandbox = id))]
    pub async fn snapshot(&self, tenant: &str, id: &str) -> Result<SnapshotView, ApiError> {
        let live = self.get_booted(tenant, id)?;
        let snap = blocking(move || {
            lock(&live.sandbox)
                .as_ref()
                .ok_or_else(|| ApiError::conflict("the sandbox stopped"))?
                .snapshot(true)
                .map_err(|e| ApiError::sandbox("snapshotting", &e))
        })
        .await?;
        let record = self.record(tenant, id)?;
        let s = SnapshotRecord {
            id: snap.id,
            tenant: tenant.to_string(),
            sandbox_id: id.to_string(),
            template: record.template,
            memory_mib: record.memory_mib,
            vcpus: record.vcpus,
            created_ms: now_ms(),
        };
        self.db.put_snapshot(&s)?;
        Ok(s.into())
    }

    /// Returns sandbox `id` to one of its own earlier snapshots, keeping its id.
    #[tracing::instrument(name = "rollback", skip_all, fields(tenant = tenant, sandbox = id, snapshot = snapshot))]
    pub async fn rollback(&self, tenant: &str, id: &str, snapshot: &str) -> Result<(), ApiError> {
        let live = self.get_booted(tenant, id)?;
        let s = self
            .db
            .snapshot(snapshot)?
            .filter(|s| s.tenant == tenant && s.sandbox_id == id)
            .ok_or_else(|| ApiError::not_found(format!("{id} has no snapshot {snapshot}")))?;
        blocking(move || {
            let mut sb = lock(&live.sandbox);
            let sb = sb
                .as_mut()
                .ok_or_else(|| ApiError::conflict("the sandbox stopped"))?;
            sb.rollback(&s.id)
                .map_err(|e| ApiError::sandbox("rolling back", &e))?;
            live.agents.reset_with(sb.take_agent());
            Ok(())
        })
        .await
    }
}
