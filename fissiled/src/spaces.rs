//! Persistent spaces: a sandbox's state that outlives the sandbox. Closing a persistent
//! sandbox, its idle timeout or a daemon shutdown persists it (a durable snapshot in
//! snapshotd); `resume` starts a new sandbox from that snapshot with the same Python globals.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::app::{App, Origin, blocking, lock};
use crate::db::{SandboxRecord, SandboxState, SpaceRecord, now_ms, random_hex};
use crate::error::ApiError;

/// A space as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SpaceView {
    /// Its id.
    pub space_id: String,
    /// The sandbox running it now, if any.
    pub sandbox_id: Option<String>,
    /// `running`, `persisted` (resumable), `empty` (never persisted, nothing runs it) or
    /// `lost` (its last state could not be saved: resuming is refused).
    pub state: String,
    /// Template.
    pub template: String,
    /// Guest memory.
    pub memory_mib: u64,
    /// Created (ms since the epoch).
    pub created_at_ms: u64,
    /// Last persisted (ms since the epoch).
    pub persisted_at_ms: Option<u64>,
    /// Labels.
    pub metadata: BTreeMap<String, String>,
}

impl From<SpaceRecord> for SpaceView {
    fn from(s: SpaceRecord) -> Self {
        let state = if s.sandbox_id.is_some() {
            "running"
        } else if s.lost {
            "lost"
        } else if s.snapshot.is_some() {
            "persisted"
        } else {
            "empty"
        };
        Self {
            space_id: s.id,
            sandbox_id: s.sandbox_id,
            state: state.into(),
            template: s.template,
            memory_mib: s.memory_mib,
            created_at_ms: s.created_ms,
            persisted_at_ms: s.persisted_ms,
            metadata: s.metadata,
        }
    }
}

impl App {
    /// A space of `tenant`.
    pub fn space(&self, tenant: &str, id: &str) -> Result<SpaceRecord, ApiError> {
        self.db
            .space(id)?
            .filter(|s| s.tenant == tenant)
            .ok_or_else(|| ApiError::not_found(format!("no space {id}")))
    }

    /// `tenant`'s spaces, oldest first.
    pub fn spaces(&self, tenant: &str) -> Result<Vec<SpaceRecord>, ApiError> {
        let mut all: Vec<SpaceRecord> = self
            .db
            .spaces()?
            .into_iter()
            .filter(|s| s.tenant == tenant)
            .collect();
        all.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        Ok(all)
    }

    /// Resumes space `id`: a new sandbox restored from its last persisted state (201), or
    /// the sandbox already running it (200, `false`).
    #[tracing::instrument(name = "resume", skip_all, fields(tenant = tenant, space = id))]
    pub async fn resume(&self, tenant: &str, id: &str) -> Result<(SandboxRecord, bool), ApiError> {
        let space = self.space(tenant, id)?;
        if let Some(running) = &space.sandbox_id {
            return Ok((self.record(tenant, running)?, false));
        }
        if space.lost {
            return Err(ApiError::conflict(format!(
                "space {id} lost its latest state (its sandbox stopped before it could be \
                 persisted); resuming would give older state. Delete the space."
            )));
        }
        let snapshot = space.snapshot.clone().ok_or_else(|| {
            ApiError::conflict(format!("space {id} was never persisted: nothing to resume"))
        })?;
        let standby =
            self.standby_for_restore(space.memory_mib, space.vcpus, space.network.is_some());
        let record = SandboxRecord {
            id: match standby.members.first() {
                Some(s) => s.record.id.clone(),
                None => format!("sb-{}", random_hex(8)?),
            },
            tenant: tenant.to_string(),
            template: space.template.clone(),
            memory_mib: space.memory_mib,
            vcpus: space.vcpus,
            state: SandboxState::Starting,
            created_ms: now_ms(),
            metadata: space.metadata.clone(),
            space_id: Some(space.id.clone()),
            idle_timeout_s: None,
            max_lifetime_s: None,
            vmm_pid: None,
            env: space.env.clone(),
            network: space.network.clone(),
        };
        // Claim the space first, so two resumes cannot both start it.
        {
            let _claim = lock(&self.space_claims);
            let mut current = self.space(tenant, id)?;
            if let Some(running) = &current.sandbox_id {
                return Ok((self.record(tenant, running)?, false));
            }
            current.sandbox_id = Some(record.id.clone());
            self.db.put_space(&current)?;
        }
        let started = self
            .start_sandbox(record.clone(), Origin::Restore(snapshot), standby)
            .await;
        if started.is_err() {
            let _claim = lock(&self.space_claims);
            if let Ok(mut s) = self.space(tenant, id)
                && s.sandbox_id.as_deref() == Some(record.id.as_str())
            {
                s.sandbox_id = None;
                self.db.put_space(&s)?;
            }
        }
        Ok((started?, true))
    }

    /// Deletes space `id`: stops the sandbox running it (without persisting) and frees its
    /// snapshot in snapshotd (kept if another snapshot still builds on it).
    #[tracing::instrument(name = "delete_space", skip_all, fields(tenant = tenant, space = id))]
    pub async fn delete_space(&self, tenant: &str, id: &str) -> Result<(), ApiError> {
        let space = self.space(tenant, id)?;
        if let Some(sb) = &space.sandbox_id {
            let live = lock(&self.live).get(sb).cloned();
            if let Some(live) = live {
                let app = self.clone();
                blocking(move || app.close(&live, false)).await?;
            } else {
                let _ = self.db.remove_sandbox(sb);
                lock(&self.lost).remove(sb);
            }
        }
        self.db.remove_space(id)?;
        if let Some(snap) = space.snapshot {
            let app = self.clone();
            blocking(move || {
                app.free_snapshots(&[snap]);
                Ok(())
            })
            .await?;
        }
        Ok(())
    }
}
