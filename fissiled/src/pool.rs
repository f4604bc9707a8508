//! Warm pools: for each ready shape, `--warm-pool N` sandboxes restored from the shape's ready
//! snapshot ahead of time, running and answering, owned by no tenant. A create of that shape
//! with nothing that must be set before the guest runs (no `from_snapshot`, no egress policy:
//! a pooled guest sits in an isolated network namespace) takes one: it gets the caller's
//! record (tenant, labels, env, timers; its id was chosen when it was started) and the pool
//! starts a replacement a moment later ([`REFILL_AFTER_MS`]). A create that finds the pool empty restores the ready snapshot
//! itself, as without a pool.
//!
//! A member runs one cell, [`MEMBER_WARM_UP`], right after its restore, before it joins the
//! pool: a restored guest's first cell maps the memory its interpreter works in into the
//! VM's page tables, one fault per page (about 1,700 pages for `1+1`, about 200 ms in the
//! lab, where each is a nested VM exit); the pool pays that in the background, not the
//! caller's first cell. The caller's first cell's `execution_count` is one higher for it.
//!
//! Members are in the metadata store with no tenant (no API key's tenant is empty), so a
//! daemon killed with `kill -9` finds them at its next start and stops their VMMs instead of
//! adopting them; a graceful stop stops them. A member that fails to start makes the pool
//! wait [`RETRY_AFTER_MS`] before the next try of that shape.

use std::collections::HashMap;
use std::sync::Mutex;

use fissile_proto::agent::ExecRequest;
use fissile_sandbox::Sandbox;

use crate::app::{App, DEFAULT_TEMPLATE, blocking, lock};
use crate::db::{SandboxRecord, SandboxState, now_ms, random_hex};
use crate::error::ApiError;
use crate::templates::Shape;

/// How long a shape's pool waits after a member failed to start.
pub const RETRY_AFTER_MS: u64 = 30_000;
/// How long after a create took a member its replacement starts: the restore stays off the
/// critical path of the new sandbox's first requests (on a small host it competes for the
/// same CPUs).
pub const REFILL_AFTER_MS: u64 = 1_000;

/// The cell a member runs once after its restore: an expression whose value is `None`, so
/// it goes through the interpreter's whole path for a cell and leaves no value behind (`_`
/// stays as it was).
pub const MEMBER_WARM_UP: &str = "None";

/// The warm-up cell's time limit (ms): a guest that does not run it by then is dropped (the
/// agent client's own deadline follows the limit, so a guest that does not answer at all is
/// given up about a minute later).
pub const MEMBER_WARM_UP_LIMIT_MS: u64 = 30_000;

/// A pooled sandbox: its record (no tenant) and its running VMM.
#[derive(Debug)]
pub struct Member {
    /// Its record as stored (tenant empty).
    pub record: SandboxRecord,
    /// The running sandbox.
    pub sandbox: Sandbox,
}

#[derive(Debug, Default)]
struct ShapePool {
    idle: Vec<Member>,
    refill: Refill,
}

/// When a shape's pool (warm pool members, standby VMMs: [`crate::standby`]) starts more.
#[derive(Debug, Default)]
pub(crate) struct Refill {
    /// Starts under way.
    starting: usize,
    /// When the last start failed (none since it last succeeded).
    failed_at_ms: Option<u64>,
    /// When the last take was (or, for standbys, the last fork that took some ended).
    pub(crate) taken_at_ms: Option<u64>,
}

impl Refill {
    /// How many to start now to have `target` with `idle` idle, counted as starting: none
    /// within [`RETRY_AFTER_MS`] of a failed start or [`REFILL_AFTER_MS`] of the last take.
    pub(crate) fn claim(&mut self, idle: usize, target: usize) -> usize {
        let now = now_ms();
        if self
            .failed_at_ms
            .is_some_and(|at| now < at.saturating_add(RETRY_AFTER_MS))
            || self
                .taken_at_ms
                .is_some_and(|at| now < at.saturating_add(REFILL_AFTER_MS))
        {
            return 0;
        }
        let wanted = target.saturating_sub(idle + self.starting);
        self.starting += wanted;
        wanted
    }

    /// One start claimed with [`Refill::claim`] ended, `ok` or not.
    pub(crate) fn ended(&mut self, ok: bool) {
        self.starting = self.starting.saturating_sub(1);
        self.failed_at_ms = if ok { None } else { Some(now_ms()) };
    }
}

/// The warm pools of this daemon, by shape.
#[derive(Debug, Default)]
pub struct WarmPool {
    shapes: Mutex<HashMap<Shape, ShapePool>>,
}

impl WarmPool {
    /// Idle members of `shape`.
    pub fn idle(&self, shape: &Shape) -> usize {
        lock(&self.shapes).get(shape).map_or(0, |p| p.idle.len())
    }
}

/// Runs [`MEMBER_WARM_UP`] on a member just restored (within [`MEMBER_WARM_UP_LIMIT_MS`]); an
/// error when it fails, runs out of time or loses the interpreter's state.
fn warm_up(sandbox: &mut Sandbox) -> Result<(), ApiError> {
    let req = ExecRequest {
        code: MEMBER_WARM_UP.into(),
        timeout_ms: Some(MEMBER_WARM_UP_LIMIT_MS),
        ..ExecRequest::default()
    };
    let outcome = sandbox
        .agent()
        .and_then(|agent| Ok(agent.exec(&req)?))
        .map_err(|e| ApiError::sandbox("warming up a warm pool member", &e))?;
    if outcome.done.timed_out || outcome.done.state_lost {
        return Err(ApiError::internal(format!(
            "a warm pool member's warm-up cell timed out ({MEMBER_WARM_UP_LIMIT_MS} ms) or lost \
             the interpreter's state"
        )));
    }
    Ok(())
}

impl App {
    /// Takes an idle member of `shape`, if the pool has one.
    pub(crate) fn take_member(&self, shape: &Shape) -> Option<Member> {
        let mut shapes = lock(&self.pool.shapes);
        let p = shapes.get_mut(shape)?;
        let m = p.idle.pop()?;
        p.refill.taken_at_ms = Some(now_ms());
        Some(m)
    }

    /// Gives back a member a create could not use (its tenant's quota was full).
    pub(crate) fn return_member(&self, shape: &Shape, member: Member) {
        lock(&self.pool.shapes)
            .entry(shape.clone())
            .or_default()
            .idle
            .push(member);
    }

    /// Starts members for every ready shape whose pool is short and whose ready snapshot
    /// exists (called every second), [`REFILL_AFTER_MS`] after the last take at the earliest.
    pub fn fill_pools(&self) {
        if self.config.warm_pool == 0 {
            return;
        }
        for &(memory_mib, vcpus) in &self.config.ready_shapes {
            let shape = Shape {
                template: DEFAULT_TEMPLATE.to_string(),
                memory_mib,
                vcpus,
            };
            let Some(snapshot) = self.made_ready_snapshot(&shape) else {
                continue;
            };
            let wanted = {
                let mut shapes = lock(&self.pool.shapes);
                let p = shapes.entry(shape.clone()).or_default();
                p.refill.claim(p.idle.len(), self.config.warm_pool)
            };
            for _ in 0..wanted {
                let app = self.clone();
                let (shape, snapshot) = (shape.clone(), snapshot.clone());
                tokio::spawn(async move { app.start_member(shape, snapshot).await });
            }
        }
    }

    async fn start_member(self, shape: Shape, snapshot: String) {
        let started = self.restore_member(&shape, snapshot).await;
        let mut shapes = lock(&self.pool.shapes);
        let p = shapes.entry(shape.clone()).or_default();
        p.refill.ended(started.is_ok());
        match started {
            Ok(member) => {
                tracing::info!(sandbox = %member.record.id, memory_mib = shape.memory_mib,
                    vcpus = shape.vcpus, "warm pool member ready");
                p.idle.push(member);
            }
            Err(e) => {
                tracing::warn!(memory_mib = shape.memory_mib, vcpus = shape.vcpus,
                    error = %e.message, "a warm pool member failed to start");
            }
        }
    }

    /// Restores one member of `shape` from `snapshot`, recorded with no tenant.
    async fn restore_member(&self, shape: &Shape, snapshot: String) -> Result<Member, ApiError> {
        let mut record = SandboxRecord::starting(
            format!("sb-{}", random_hex(8)?),
            String::new(),
            shape.template.clone(),
            shape.memory_mib,
            shape.vcpus,
        );
        self.db.put_sandbox(&record)?;
        let dir = self.dir(&record.id);
        let cfg = self.sandbox_config(dir.clone(), shape.memory_mib, shape.vcpus, None);
        // Behind the creates and boots already queued: a start permit like any restore, held
        // through the warm-up cell too (it is part of starting, and as busy on the CPUs).
        let permit = self.starts.clone().acquire_owned().await;
        let restored = blocking(move || {
            let _permit = permit;
            let mut sandbox = Sandbox::restore(&cfg, &snapshot)
                .map_err(|e| ApiError::sandbox("restoring a warm pool member", &e))?;
            warm_up(&mut sandbox)?;
            Ok(sandbox)
        })
        .await;
        match restored {
            Ok(sandbox) => {
                record.state = SandboxState::Running;
                record.vmm_pid = sandbox.pid();
                if let Err(e) = self.db.put_sandbox(&record) {
                    self.forget_member(&record.id);
                    return Err(e.into());
                }
                Ok(Member { record, sandbox })
            }
            Err(e) => {
                self.forget_member(&record.id);
                Err(e)
            }
        }
    }

    /// Forgets the record and directory of a member (or a standby) that is gone.
    pub(crate) fn forget_member(&self, id: &str) {
        let _ = self.db.remove_sandbox(id);
        let _ = std::fs::remove_dir_all(self.dir(id));
    }

    /// Stops every idle member (graceful shutdown).
    pub fn drain_pools(&self) {
        let members: Vec<Member> = lock(&self.pool.shapes)
            .values_mut()
            .flat_map(|p| std::mem::take(&mut p.idle))
            .collect();
        for m in members {
            let id = m.record.id.clone();
            drop(m.sandbox);
            self.forget_member(&id);
        }
    }
}
