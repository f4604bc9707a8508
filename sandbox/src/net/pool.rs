//! Routed namespaces made ahead of time, so that a sandbox with a way out does not wait for
//! its veth pair, addresses, routes and nftables ruleset (tens of milliseconds, mostly `nft`
//! and netlink round trips): [`NetNs::create_routed`] takes one from the pool when there is
//! one with the same [`NetLimits`], and puts the sandbox's policy in force with one `nft`
//! transaction. A thread refills the pool in the background.
//!
//! Pooled namespaces are held by descriptors only (no names, no mounts): when this process
//! ends they go, so there are no leftovers for a later run to find.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use super::NetNs;
use super::egress::{EgressError, EgressPolicy, NetLimits};

/// How long the refill thread waits after a namespace could not be made.
const RETRY_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Pool {
    ready: Mutex<VecDeque<NetNs>>,
    wanted: Condvar,
    size: usize,
    limits: NetLimits,
}

static POOL: OnceLock<Arc<Pool>> = OnceLock::new();
static TAKEN: AtomicU64 = AtomicU64::new(0);

/// Keeps `size` routed namespaces with `limits` ready from now on (their policy: nothing
/// reachable until one is taken). Only the first call in a process counts; `size` 0 does
/// nothing.
pub fn enable(size: usize, limits: NetLimits) {
    if size == 0 {
        return;
    }
    let pool = Arc::new(Pool {
        ready: Mutex::new(VecDeque::with_capacity(size)),
        wanted: Condvar::new(),
        size,
        limits,
    });
    if POOL.set(pool.clone()).is_err() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("fissile-nspool".into())
        .spawn(move || refill(&pool));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the namespace pool's thread; no pool");
    }
}

/// How many namespaces are ready now (0 without a pool).
pub fn ready() -> usize {
    POOL.get().map_or(0, |p| lock(&p.ready).len())
}

/// How many namespaces were taken from the pool in this process.
pub fn taken() -> u64 {
    TAKEN.load(Ordering::Relaxed)
}

/// A pooled namespace with `limits`, with `policy` put in force; `None` when there is none
/// ready (or no pool, or another `limits`). The refill thread is woken either way.
pub(crate) fn take(policy: &EgressPolicy, limits: NetLimits) -> Option<Result<NetNs, EgressError>> {
    let pool = POOL.get()?;
    if pool.limits != limits {
        return None;
    }
    let ns = lock(&pool.ready).pop_front();
    pool.wanted.notify_one();
    let ns = ns?;
    TAKEN.fetch_add(1, Ordering::Relaxed);
    Some(ns.set_policy(policy).map(|()| ns))
}

fn refill(pool: &Pool) {
    let closed = EgressPolicy {
        internet: false,
        ..EgressPolicy::default()
    };
    loop {
        {
            let mut ready = lock(&pool.ready);
            while ready.len() >= pool.size {
                ready = pool.wanted.wait(ready).unwrap_or_else(|p| p.into_inner());
            }
        }
        match NetNs::create_fresh(&closed, pool.limits) {
            Ok(ns) => lock(&pool.ready).push_back(ns),
            Err(e) => {
                tracing::warn!(error = %fissile_proto::error_chain(&e),
                    "cannot make a namespace for the pool; retrying");
                std::thread::sleep(RETRY_AFTER);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
