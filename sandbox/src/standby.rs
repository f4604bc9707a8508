//! Pre-started VMMs: a `fissile-vmm --standby` process started ahead of time (in its jail,
//! cgroup and network namespace, as a restore's would be) that has made its KVM VM and vCPUs
//! and waits on its standard input for the snapshot to become
//! ([`fissile_proto::control::StandbyRequest`]). Restoring into one
//! ([`Sandbox::restore_standby`]) or forking into several ([`Sandbox::fork_each_with`])
//! skips the process start and the VM's creation.
//!
//! A standby's directory is the sandbox's: its sockets and logs are already there, so the
//! caller picks it when starting the standby. Dropping a standby stops its process.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use fissile_proto::control::{STANDBY_READY, StandbyRequest};

use crate::{Sandbox, SandboxConfig, SandboxError, Spawned, Spawner, grant, tail};

/// A VMM process waiting for a snapshot.
#[derive(Debug)]
pub struct Standby {
    /// `None` once taken.
    vmm: Option<Spawned>,
    /// Its standard input: the request goes here; dropping it releases the standby.
    request: Option<std::io::PipeWriter>,
    /// True once it said it is ready; false if its output ended first.
    ready: mpsc::Receiver<bool>,
    is_ready: bool,
    dir: PathBuf,
    spawner: Spawner,
    started: Instant,
}

impl Standby {
    /// Starts a standby VMM for sandboxes shaped like `cfg` (its vCPUs, memory limit, jail,
    /// network), with its sockets and logs in `cfg.dir`. Needs snapshotd.
    pub fn start(cfg: &SandboxConfig) -> Result<Standby, SandboxError> {
        let spawner = Spawner::of(cfg);
        let dir = cfg.dir.clone();
        let started = Instant::now();
        let mut cmd = spawner.restore_command(&dir)?;
        cmd.arg("--standby")
            .arg("--vcpus")
            .arg(spawner.vcpus.to_string());
        let (reader, writer) =
            std::io::pipe().map_err(|e| SandboxError::Spawn(spawner.vmm.clone(), e))?;
        let mut vmm = Spawned::start_with_io(
            cmd,
            &spawner,
            &dir,
            None,
            None,
            (Stdio::from(reader), Stdio::piped()),
        )?;
        let stdout = vmm.child.take_stdout();
        let (tx, ready) = mpsc::sync_channel(1);
        // From here on, dropping it stops the process.
        let standby = Standby {
            vmm: Some(vmm),
            request: Some(writer),
            ready,
            is_ready: false,
            dir,
            spawner,
            started,
        };
        // Reads the one ready line (no more than its length); the thread ends with the line
        // or with the process.
        std::thread::Builder::new()
            .name("standby-ready".into())
            .spawn(move || {
                let mut line = String::new();
                let ok = stdout.is_some_and(|out| {
                    BufReader::new(out.take(STANDBY_READY.len() as u64))
                        .read_line(&mut line)
                        .is_ok()
                        && line == STANDBY_READY
                });
                let _ = tx.send(ok);
            })
            .map_err(|e| SandboxError::Spawn(standby.spawner.vmm.clone(), e))?;
        Ok(standby)
    }

    /// Whether its process still runs (a standby that died meanwhile, e.g. killed for
    /// memory, is of no use: drop it).
    pub fn is_alive(&mut self) -> bool {
        self.vmm
            .as_mut()
            .is_some_and(|v| matches!(v.child.try_wait(), Ok(None)))
    }

    /// Its directory (the sandbox's it becomes).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its VMM's pid.
    pub fn pid(&self) -> Option<u32> {
        self.vmm.as_ref().map(|v| v.child.id())
    }

    /// Waits up to `timeout` until the VMM has made its VM and waits for a request (the
    /// time since [`Standby::start`]); an error if it exited or did not get there in time.
    /// Taking a standby that is not ready yet works too: the request waits in the pipe.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, SandboxError> {
        if !self.is_ready {
            match self.ready.recv_timeout(timeout) {
                Ok(true) => self.is_ready = true,
                Ok(false) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(self.exited());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(SandboxError::Standby(format!(
                        "the standby VMM in {} was not ready within {} s",
                        self.dir.display(),
                        timeout.as_secs()
                    )));
                }
            }
        }
        Ok(self.started.elapsed())
    }

    /// Why the process is gone (waiting briefly for its exit status).
    fn exited(&mut self) -> SandboxError {
        let status = match self.vmm.as_mut() {
            Some(v) => {
                let deadline = Instant::now() + Duration::from_secs(2);
                loop {
                    match v.child.try_wait() {
                        Ok(Some(s)) => break s.to_string(),
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Ok(None) => break "still running, but its output ended".into(),
                        Err(e) => break format!("unknown ({e})"),
                    }
                }
            }
            None => "taken".into(),
        };
        SandboxError::VmmExited {
            status,
            vmm_log: tail(&self.dir.join("vmm.log"), 30),
            console: tail(&self.dir.join("console.log"), 30),
        }
    }

    /// Whether a child of a sandbox started by `spawner` can live in this standby: the same
    /// vCPUs and memory, and everything its process was started with (VMM binary, root
    /// image, snapshotd, limits and jail, network and its policy).
    pub(crate) fn check_shape(&self, spawner: &Spawner) -> Result<(), SandboxError> {
        let (a, b) = (&self.spawner, spawner);
        if (a.vcpus, a.mem_mib) != (b.vcpus, b.mem_mib) {
            return Err(SandboxError::Standby(format!(
                "the standby in {} was started for {} vCPUs and {} MiB, the sandbox has {} and {}",
                self.dir.display(),
                a.vcpus,
                a.mem_mib,
                b.vcpus,
                b.mem_mib
            )));
        }
        if (&a.vmm, &a.rootfs, &a.snapshotd, &a.limits, &a.network)
            != (&b.vmm, &b.rootfs, &b.snapshotd, &b.limits, &b.network)
        {
            return Err(SandboxError::Standby(format!(
                "the standby in {} was started with another VMM, root image, snapshotd, \
                 limits or network than the sandbox's",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Sends the request to become `snapshot` (granting it first to a jailed VMM) and hands
    /// over the process.
    pub(crate) fn take(
        mut self,
        snapshot: &str,
    ) -> Result<(Spawned, PathBuf, Spawner), SandboxError> {
        if let (Some(uid), Some(sd)) = (
            self.vmm
                .as_ref()
                .and_then(|v| v.uid.as_ref())
                .map(|l| l.uid()),
            &self.spawner.snapshotd,
        ) {
            grant(sd, uid, &[snapshot.to_string()], false)?;
        }
        let mut line = serde_json::to_vec(&StandbyRequest {
            snapshot: snapshot.to_string(),
            start_paused: false,
        })
        .map_err(|e| SandboxError::Standby(format!("encoding the request: {e}")))?;
        line.push(b'\n');
        let sent = match self.request.take() {
            Some(mut w) => w.write_all(&line),
            None => Err(std::io::Error::other("no request pipe")),
        };
        if sent.is_err() {
            // A closed pipe: the process is gone.
            return Err(self.exited());
        }
        match self.vmm.take() {
            Some(vmm) => Ok((vmm, self.dir.clone(), self.spawner.clone())),
            None => Err(SandboxError::Standby("taken twice".into())),
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        drop(self.request.take());
        if let Some(mut v) = self.vmm.take() {
            let _ = v.child.kill();
            let _ = v.child.wait();
        }
    }
}

impl Sandbox {
    /// Restores `snapshot` into `standby` (a VMM started for the snapshot's shape, see
    /// [`Standby::start`]: a snapshot with other vCPUs fails the restore; its memory must
    /// be the standby's `mem_mib`, which sized the VMM's cgroup), waits for the agent and
    /// gives it fresh entropy and the clock, as [`Sandbox::restore`] does.
    pub fn restore_standby(standby: Standby, snapshot: &str) -> Result<Sandbox, SandboxError> {
        Self::restore_standby_cancellable(standby, snapshot, None)
    }

    /// [`Sandbox::restore_standby`] that gives up when `cancel` is set (see
    /// [`SandboxConfig::cancel`]).
    fn restore_standby_cancellable(
        standby: Standby,
        snapshot: &str,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Sandbox, SandboxError> {
        let started = Instant::now();
        let (vmm, dir, mut spawner) = standby.take(snapshot)?;
        spawner.cancel = cancel;
        let mut sb = Self::attach(vmm, &dir, spawner, started, None)?;
        sb.timings.to_ready = started.elapsed();
        Ok(sb)
    }

    /// [`Sandbox::restore_standby`] when `standby` fits `cfg` (its directory, shape, image,
    /// limits and network), else, or when it fails (its process died, or its restore did
    /// not come up), [`Sandbox::restore`] with `cfg` in the standby's directory: a standby
    /// at fault never fails the restore. The flag says whether the standby was used.
    pub fn restore_standby_or_new(
        standby: Standby,
        cfg: &SandboxConfig,
        snapshot: &str,
    ) -> Result<(Sandbox, bool), SandboxError> {
        if standby.dir() != cfg.dir {
            return Err(SandboxError::Standby(format!(
                "the standby's directory {} is not the sandbox's {}",
                standby.dir().display(),
                cfg.dir.display()
            )));
        }
        let used = standby.check_shape(&Spawner::of(cfg)).and_then(|()| {
            Self::restore_standby_cancellable(standby, snapshot, cfg.cancel.clone())
        });
        match used {
            Ok(sb) => Ok((sb, true)),
            // Given up: no new VMM either.
            Err(SandboxError::Cancelled) => Err(SandboxError::Cancelled),
            Err(e) => {
                tracing::warn!(dir = %cfg.dir.display(), error = %fissile_proto::error_chain(&e),
                    "a standby VMM could not be used; restoring into a new one");
                Ok((Self::restore(cfg, snapshot)?, false))
            }
        }
    }
}
