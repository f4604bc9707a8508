//! The host's snapshotd, kept running: re-adopted from an earlier run or started at start,
//! and started again (same store, same socket) when it exits, so one crash — or a kill by
//! its seccomp filter — does not leave the daemon unable to snapshot, fork or restore until
//! someone restarts it.
//!
//! What a restart cannot give back: the restored VMMs it was paging for fail (their fault
//! sessions end: see ARCHITECTURE.md), and the grants it held for running jailed VMMs are
//! gone (each operation that needs one grants it again just before).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fissile_sandbox::Snapshotd;
use fissile_sandbox::jail::JailConfig;

use crate::app::{kill_stale, lock};
use crate::error::ApiError;

/// How often [`watch`] checks that snapshotd still runs.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// The longest [`watch`] waits between two failed restarts (it starts at [`CHECK_EVERY`] and
/// doubles).
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The running snapshotd and what it takes to start another.
#[derive(Debug)]
pub struct SnapshotdService {
    current: Mutex<Snapshotd>,
    state_dir: PathBuf,
    socket: PathBuf,
    jail: Option<JailConfig>,
    restarts: AtomicU64,
}

impl SnapshotdService {
    /// The snapshotd of `state_dir`: the one an earlier run left (named by `snapshotd.pid`,
    /// checked by its command line and a ping), or a new one admitting the VMMs of `jail`
    /// when given. True if adopted.
    pub fn start(
        state_dir: &Path,
        jail: Option<JailConfig>,
    ) -> Result<(SnapshotdService, bool), ApiError> {
        // A jailed snapshotd cannot read /sys to check this itself.
        if let Some(why) = fissile_snapshotd_client::sys::host_shmem_hazard() {
            return Err(ApiError::internal(format!(
                "snapshotd cannot serve here: {why}"
            )));
        }
        let socket = socket_path(state_dir);
        let pidfile = state_dir.join("snapshotd.pid");
        let earlier = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let mut adopted = None;
        if let Some(pid) = earlier {
            match Snapshotd::adopt(pid, &state_dir.join("store"), &socket) {
                Ok(sd) => match jail.as_ref().and_then(|cfg| misfit(pid, cfg)) {
                    None => {
                        tracing::info!(pid, "re-adopted the running snapshotd");
                        adopted = Some(sd);
                    }
                    Some(why) => {
                        // Started by an earlier version or configuration: jailed VMMs could
                        // not reach it, or it runs with more privilege than it should. The
                        // restored VMMs it pages for fail, as after any snapshotd restart.
                        tracing::warn!(pid, why, "replacing the running snapshotd");
                        drop(sd);
                    }
                },
                Err(e) => {
                    tracing::info!(error = %fissile_proto::error_chain(&e), "starting a new snapshotd");
                    kill_stale(pid, "fissile-snapshotd", &socket);
                    // One an earlier version started, with its socket in the state directory.
                    kill_stale(pid, "fissile-snapshotd", &state_dir.join("snapshotd.sock"));
                }
            }
        }
        let was_adopted = adopted.is_some();
        let sd = match adopted {
            Some(sd) => sd,
            None => spawn(state_dir, &socket, jail.as_ref())?,
        };
        Ok((
            SnapshotdService {
                current: Mutex::new(sd),
                state_dir: state_dir.to_path_buf(),
                socket,
                jail,
                restarts: AtomicU64::new(0),
            },
            was_adopted,
        ))
    }

    /// Its socket (the same across restarts).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process id of the one running now.
    pub fn pid(&self) -> u32 {
        lock(&self.current).pid()
    }

    /// How many times it was started again after it exited.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Checks that it runs and, if it exited, starts another (blocking: up to its readiness
    /// timeout). True if it was restarted.
    pub fn keep_running(&self) -> Result<bool, ApiError> {
        let mut current = lock(&self.current);
        let Some(how) = current.exited() else {
            return Ok(false);
        };
        tracing::error!(pid = current.pid(), exit = %how, "snapshotd exited; starting it again");
        let sd = spawn(&self.state_dir, &self.socket, self.jail.as_ref())?;
        tracing::info!(pid = sd.pid(), "snapshotd started again");
        // The old handle's process is gone: dropping it reaps it (or, adopted, finds it dead).
        *current = sd;
        self.restarts.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }
}

/// Why the running snapshotd `pid` does not fit `cfg` (it must run as its jail's uid and
/// admit the VMMs' gid), or `None` when it does.
fn misfit(pid: u32, cfg: &JailConfig) -> Option<String> {
    let unreadable = |what: &str, e: std::io::Error| Some(format!("its {what}: {e}"));
    let uid = match fissile_sandbox::jail::process_uid(pid) {
        Ok(uid) => uid,
        Err(e) => return unreadable("status", e),
    };
    if uid != cfg.snapshotd_uid {
        return Some(format!(
            "it runs as uid {uid}, not in its jail as {}",
            cfg.snapshotd_uid
        ));
    }
    let cmdline = match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => c,
        Err(e) => return unreadable("command line", e),
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let gid = cfg.gid.to_string();
    if !args
        .windows(2)
        .any(|w| w[0] == b"--vmm-gid" && w[1] == gid.as_bytes())
    {
        return Some(format!("it does not admit the VMMs' gid {gid}"));
    }
    None
}

/// Where the daemon's snapshotd listens: `snapshotd/snapshotd.sock` in the state directory,
/// alone in its directory, so jails bind the directory and a VMM jailed before a restart
/// reaches the restarted snapshotd's new socket (see `fissile_sandbox::jail::JailSpec`).
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("snapshotd").join("snapshotd.sock")
}

/// Starts a snapshotd on `state_dir`'s store and records its pid in `snapshotd.pid` (what a
/// later run adopts).
fn spawn(
    state_dir: &Path,
    socket: &Path,
    jail: Option<&JailConfig>,
) -> Result<Snapshotd, ApiError> {
    let pidfile = state_dir.join("snapshotd.pid");
    if let Some(dir) = socket.parent() {
        // Jails bind this directory as it is: jailed VMMs must be able to search it whatever
        // the umask (the socket's own mode decides who may connect).
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)))
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
    }
    let sd = Snapshotd::start_for(&state_dir.join("store"), socket, jail)
        .map_err(|e| ApiError::internal(fissile_proto::error_chain(&e)))?;
    let tmp = state_dir.join("snapshotd.pid.tmp");
    std::fs::write(&tmp, format!("{}\n", sd.pid()))
        .and_then(|()| std::fs::rename(&tmp, &pidfile))
        .map_err(|e| ApiError::internal(format!("writing {}: {e}", pidfile.display())))?;
    Ok(sd)
}

/// Keeps `service` running until the task is aborted: checks every [`CHECK_EVERY`], and
/// after a failed restart waits twice as long as the last time (at most [`MAX_BACKOFF`]).
pub async fn watch(service: std::sync::Arc<SnapshotdService>) {
    let mut wait = CHECK_EVERY;
    loop {
        tokio::time::sleep(wait).await;
        let s = service.clone();
        let checked = tokio::task::spawn_blocking(move || s.keep_running()).await;
        wait = match checked {
            Ok(Ok(_)) => CHECK_EVERY,
            Ok(Err(e)) => {
                tracing::error!(error = %e.message, retry_in_s = (wait * 2).min(MAX_BACKOFF).as_secs(),
                    "cannot start snapshotd again");
                (wait * 2).min(MAX_BACKOFF)
            }
            Err(e) => {
                tracing::error!(error = %e, "the snapshotd check panicked");
                MAX_BACKOFF
            }
        };
    }
}
