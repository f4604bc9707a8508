//! Pre-started VMMs (`--standby-pool N`, `--standby-on-demand M`): for each ready shape, N
//! `fissile-vmm` processes, or as many as its largest recent fork had children (at most M;
//! after [`DEMAND_WINDOW_MS`] without a fork, N again), started ahead of time
//! ([`fissile_sandbox::Standby`]: in their jail, cgroup and network namespace, their KVM VM
//! and vCPUs made, no guest yet), owned by no tenant. A fork of a sandbox of that shape with
//! no egress policy puts up to n of its children into them (the rest start new processes,
//! as without the pool), and a create from a snapshot or a resume with none restores into
//! one, so they skip the process start and the VM's creation. The pool starts replacements
//! [`REFILL_AFTER_MS`](crate::pool::REFILL_AFTER_MS) after the last such fork or restore
//! ended (not while one runs: a standby starting competes with their restores for the
//! CPUs), behind the creates already queued (a start permit each).
//!
//! A standby's id is chosen when it starts (its directory is the sandbox's) and the child
//! or sandbox it becomes keeps it. Standbys are in the metadata store with no tenant, like warm pool
//! members: a daemon killed with `kill -9` finds them at its next start, stops any still
//! running and removes their directories (a standby exits by itself once its input, held
//! by the daemon, closes). A graceful stop stops them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use fissile_sandbox::Standby;

use crate::app::{App, DEFAULT_TEMPLATE, blocking, lock};
use crate::db::{SandboxRecord, now_ms, random_hex};
use crate::error::ApiError;
use crate::pool::Refill;

/// How long a fork's size keeps the standbys it asked for: a shape whose last fork is older
/// goes back to `--standby-pool` (its extra idle standbys are stopped).
pub const DEMAND_WINDOW_MS: u64 = 600_000;

/// How many standbys a shape should have: `floor` (`--standby-pool`), or what its forks
/// asked for (`demand`: the largest fork's child count and when the last fork was), at most
/// `cap` (`--standby-on-demand`), while that is within [`DEMAND_WINDOW_MS`] of `now_ms`.
fn target(floor: usize, cap: usize, demand: Option<(usize, u64)>, now_ms: u64) -> usize {
    floor.max(asked(demand, now_ms).min(cap))
}

/// The child count `demand` still asks for at `now_ms`: 0 once its last fork is
/// [`DEMAND_WINDOW_MS`] old.
fn asked(demand: Option<(usize, u64)>, now_ms: u64) -> usize {
    demand
        .filter(|&(_, at)| now_ms < at.saturating_add(DEMAND_WINDOW_MS))
        .map_or(0, |(n, _)| n)
}

/// How long a standby may take to make its VM (several may start at once on a small host).
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// A standby VMM: its record (no tenant) and its process.
#[derive(Debug)]
pub struct Member {
    /// Its record as stored (tenant empty, state starting).
    pub record: SandboxRecord,
    /// The waiting VMM.
    pub standby: Standby,
}

#[derive(Debug, Default)]
struct ShapeStandbys {
    idle: Vec<Member>,
    /// Its refill (`taken_at_ms`: when the last fork or restore that took some ended).
    refill: Refill,
    /// Forks and restores under way that took some, and forks that asked for some: no
    /// refill meanwhile (a standby starting competes with their restores for the CPUs).
    forking: usize,
    /// The largest child count of this shape's forks, and when the last one was (reset
    /// when the last is older than [`DEMAND_WINDOW_MS`]).
    demand: Option<(usize, u64)>,
}

/// Standbys a fork or a create took: hand `members` to it and keep the whole until it ends
/// (what is left in `members` then goes back to the pool); the shape's pool refills
/// [`REFILL_AFTER_MS`](crate::pool::REFILL_AFTER_MS) after the last such fork or create ended.
#[derive(Debug)]
pub(crate) struct Taken {
    /// The standbys.
    pub members: Vec<Member>,
    hold: Option<(App, (u64, u8))>,
}

impl Taken {
    /// No standbys.
    pub(crate) fn none() -> Taken {
        Taken {
            members: Vec::new(),
            hold: None,
        }
    }
}

impl Drop for Taken {
    /// Gives back the standbys nobody took out of it, and lets the shape's pool refill.
    fn drop(&mut self) {
        if let Some((app, shape)) = self.hold.take() {
            let unused = std::mem::take(&mut self.members);
            if !unused.is_empty() {
                app.return_standbys(shape.0, shape.1, unused);
            }
            let mut shapes = lock(&app.standbys.shapes);
            let p = shapes.entry(shape).or_default();
            p.forking = p.forking.saturating_sub(1);
            p.refill.taken_at_ms = Some(now_ms());
        }
    }
}

/// The standby VMMs of this daemon, by shape (memory MiB, vCPUs).
#[derive(Debug, Default)]
pub struct StandbyPool {
    shapes: Mutex<HashMap<(u64, u8), ShapeStandbys>>,
    /// Set by [`App::drain_standbys`]: from then on standbys are stopped, not kept.
    draining: std::sync::atomic::AtomicBool,
}

impl StandbyPool {
    /// Idle standbys of every shape.
    pub fn idle(&self) -> usize {
        lock(&self.shapes).values().map(|p| p.idle.len()).sum()
    }

    fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl App {
    /// Takes up to `n` idle standbys of the shape that still run. A take that got some, or a
    /// fork's (`fork`) that may size the pool, holds the shape's refill until it is dropped;
    /// a fork's `n` counts as the shape's demand only once the fork passed its quota check
    /// ([`App::fork_demand`]).
    pub(crate) fn take_standbys(&self, memory_mib: u64, vcpus: u8, n: usize, fork: bool) -> Taken {
        self.prune_standbys();
        let shape = (memory_mib, vcpus);
        let on_demand = self.on_demand(shape, fork, n);
        let mut shapes = lock(&self.standbys.shapes);
        let p = if on_demand {
            shapes.entry(shape).or_default()
        } else {
            let Some(p) = shapes.get_mut(&shape) else {
                return Taken::none();
            };
            p
        };
        let k = n.min(p.idle.len());
        let hold = (k > 0 || on_demand).then(|| {
            p.forking += 1;
            (self.clone(), shape)
        });
        Taken {
            members: p.idle.split_off(p.idle.len() - k),
            hold,
        }
    }

    /// Whether a fork (`fork`) of `n` children of `shape` may size the shape's pool.
    fn on_demand(&self, shape: (u64, u8), fork: bool, n: usize) -> bool {
        fork && self.config.standby_on_demand > 0
            && n > 0
            && self.config.ready_shapes.contains(&shape)
    }

    /// Counts a fork of `n` children of the shape, which passed its tenant's quota check, as
    /// the shape's demand: the pool keeps as many standbys (up to `--standby-on-demand`)
    /// for [`DEMAND_WINDOW_MS`]. A refused fork does not start standbys.
    pub(crate) fn fork_demand(&self, memory_mib: u64, vcpus: u8, n: usize) {
        let shape = (memory_mib, vcpus);
        if !self.on_demand(shape, true, n) {
            return;
        }
        let mut shapes = lock(&self.standbys.shapes);
        let p = shapes.entry(shape).or_default();
        let now = now_ms();
        p.demand = Some((asked(p.demand, now).max(n), now));
    }

    /// One idle standby of the shape for a restore (a create from a snapshot, a resume) of a
    /// sandbox with no egress policy (`routed`: it has one, and its namespace must be routed,
    /// which a standby's is not). Restores do not count as demand.
    pub(crate) fn standby_for_restore(&self, memory_mib: u64, vcpus: u8, routed: bool) -> Taken {
        if routed {
            return Taken::none();
        }
        self.take_standbys(memory_mib, vcpus, 1, false)
    }

    /// Gives back standbys an operation did not use (a fork refused by its tenant's quota,
    /// a [`Taken`] dropped with members left). Once draining (checked under the lock
    /// [`App::drain_standbys`] sets it under), they are stopped instead.
    pub(crate) fn return_standbys(&self, memory_mib: u64, vcpus: u8, members: Vec<Member>) {
        let mut shapes = lock(&self.standbys.shapes);
        if self.standbys.draining() {
            drop(shapes);
            self.stop_standbys(members);
            return;
        }
        shapes
            .entry((memory_mib, vcpus))
            .or_default()
            .idle
            .extend(members);
    }

    /// Stops the idle standbys whose process died (their pool refills). One started before
    /// a snapshotd restart stays: its jail holds snapshotd's socket directory, where the
    /// restarted one listens.
    fn prune_standbys(&self) {
        let mut stale = Vec::new();
        for p in lock(&self.standbys.shapes).values_mut() {
            let mut keep = Vec::with_capacity(p.idle.len());
            for mut m in std::mem::take(&mut p.idle) {
                if m.standby.is_alive() {
                    keep.push(m);
                } else {
                    stale.push(m);
                }
            }
            p.idle = keep;
        }
        self.stop_standbys(stale);
    }

    /// Stops `members` and forgets them, on the blocking pool (each is a kill and a reap).
    pub(crate) fn stop_standbys(&self, members: Vec<Member>) {
        if members.is_empty() {
            return;
        }
        let app = self.clone();
        tokio::task::spawn_blocking(move || {
            for m in members {
                let id = m.record.id.clone();
                drop(m.standby);
                app.forget_member(&id);
            }
        });
    }

    /// Starts standbys for every ready shape whose pool is short (called every second),
    /// [`REFILL_AFTER_MS`](crate::pool::REFILL_AFTER_MS) after the last take at the earliest.
    /// A shape whose demand ran out keeps `--standby-pool` of its idle standbys; the rest
    /// are stopped.
    pub fn fill_standbys(&self) {
        let (floor, cap) = (self.config.standby_pool, self.config.standby_on_demand);
        if (floor == 0 && cap == 0) || self.standbys.draining() {
            return;
        }
        self.prune_standbys();
        for &shape in &self.config.ready_shapes {
            let (wanted, extra) = {
                let mut shapes = lock(&self.standbys.shapes);
                let p = shapes.entry(shape).or_default();
                if p.forking > 0 {
                    continue;
                }
                let want = target(floor, cap, p.demand, now_ms());
                if want == floor {
                    p.demand = None;
                }
                let extra = p.idle.split_off(want.min(p.idle.len()));
                (p.refill.claim(p.idle.len(), want), extra)
            };
            self.stop_standbys(extra);
            for _ in 0..wanted {
                let app = self.clone();
                tokio::spawn(async move { app.add_standby(shape).await });
            }
        }
    }

    async fn add_standby(self, shape: (u64, u8)) {
        let started = self.start_standby(shape).await;
        let mut shapes = lock(&self.standbys.shapes);
        let p = shapes.entry(shape).or_default();
        p.refill.ended(started.is_ok());
        match started {
            Ok(member) if self.standbys.draining() => {
                drop(shapes);
                self.stop_standbys(vec![member]);
            }
            Ok(member) => {
                tracing::debug!(sandbox = %member.record.id, memory_mib = shape.0,
                    vcpus = shape.1, "standby VMM ready");
                p.idle.push(member);
            }
            Err(e) => {
                tracing::warn!(memory_mib = shape.0, vcpus = shape.1, error = %e.message,
                    "a standby VMM failed to start");
            }
        }
    }

    /// Starts one standby of `shape`, recorded with no tenant, and waits until it is ready.
    async fn start_standby(&self, (memory_mib, vcpus): (u64, u8)) -> Result<Member, ApiError> {
        let mut record = SandboxRecord::starting(
            format!("sb-{}", random_hex(8)?),
            String::new(),
            DEFAULT_TEMPLATE.to_string(),
            memory_mib,
            vcpus,
        );
        self.db.put_sandbox(&record)?;
        let cfg = self.sandbox_config(self.dir(&record.id), memory_mib, vcpus, None);
        let permit = self.starts.clone().acquire_owned().await;
        let started = blocking(move || {
            let _permit = permit;
            let mut standby = Standby::start(&cfg)
                .map_err(|e| ApiError::sandbox("starting a standby VMM", &e))?;
            standby
                .wait_ready(READY_TIMEOUT)
                .map_err(|e| ApiError::sandbox("starting a standby VMM", &e))?;
            Ok(standby)
        })
        .await;
        let stored = started.and_then(|standby| {
            record.vmm_pid = standby.pid();
            self.db.put_sandbox(&record)?;
            Ok(standby)
        });
        match stored {
            Ok(standby) => Ok(Member { record, standby }),
            Err(e) => {
                self.forget_member(&record.id);
                Err(e)
            }
        }
    }

    /// Stops every idle standby (graceful shutdown); one that finishes starting later, or
    /// that a fork gives back, is stopped then.
    pub fn drain_standbys(&self) {
        let members: Vec<Member> = {
            let mut shapes = lock(&self.standbys.shapes);
            self.standbys
                .draining
                .store(true, std::sync::atomic::Ordering::Release);
            shapes
                .values_mut()
                .flat_map(|p| std::mem::take(&mut p.idle))
                .collect()
        };
        for m in members {
            let id = m.record.id.clone();
            drop(m.standby);
            self.forget_member(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{DEMAND_WINDOW_MS, target};

    #[test]
    fn a_shape_keeps_what_its_largest_recent_fork_asked_for_within_the_cap() {
        let now = 10 * DEMAND_WINDOW_MS;
        assert_eq!(target(0, 4, None, now), 0, "no fork, no standbys");
        assert_eq!(target(2, 4, None, now), 2, "the floor holds without forks");
        assert_eq!(target(0, 4, Some((3, now - 1)), now), 3);
        assert_eq!(target(0, 4, Some((16, now)), now), 4, "capped");
        assert_eq!(
            target(2, 4, Some((1, now)), now),
            2,
            "never below the floor"
        );
        assert_eq!(target(0, 0, Some((3, now)), now), 0, "on-demand off");
        assert_eq!(
            target(1, 4, Some((3, now - DEMAND_WINDOW_MS)), now),
            1,
            "a demand older than the window is gone"
        );
    }
}
