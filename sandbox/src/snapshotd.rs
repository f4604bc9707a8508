//! A `fissile-snapshotd` daemon process, for tests, benchmarks and the CLI.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fissile_proto::pidfd::Pidfd;

use crate::SandboxError;
use crate::paths::find_binary;

/// How long snapshotd may take to open its store and listen.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running snapshotd; killed on drop.
#[derive(Debug)]
pub struct Snapshotd {
    proc: Proc,
    socket: PathBuf,
    root: PathBuf,
}

/// Started here, or adopted from an earlier process.
#[derive(Debug)]
enum Proc {
    Child(Child),
    Adopted(Pidfd),
}

impl Snapshotd {
    /// Starts `fissile-snapshotd serve` on store `root` with its socket at `socket`; returns
    /// once it printed its readiness line.
    /// Jailed VMMs (`$FISSILE_JAIL`, see [`crate::jail`]) are admitted by their gid.
    pub fn start(root: &Path, socket: &Path) -> Result<Snapshotd, SandboxError> {
        Self::start_for(root, socket, crate::jail::JailConfig::from_env().as_ref())
    }

    /// [`Snapshotd::start`] admitting the VMMs of `jail` when given.
    pub fn start_for(
        root: &Path,
        socket: &Path,
        jail: Option<&crate::jail::JailConfig>,
    ) -> Result<Snapshotd, SandboxError> {
        let bin = find_binary("fissile-snapshotd")?;
        let mut cmd = Command::new(&bin);
        if let Some(jail) = jail {
            cmd.arg("serve").arg("--vmm-gid").arg(jail.gid.to_string());
        } else {
            cmd.arg("serve");
        }
        let mut child = cmd
            .arg("--root")
            .arg(root)
            .arg("--socket")
            .arg(socket)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| SandboxError::Spawn(bin.clone(), e))?;
        // The readiness line, read on a helper thread so the wait is bounded.
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(out).take(4096).read_line(&mut line);
                let _ = tx.send(line);
            });
        }
        let line = rx.recv_timeout(READY_TIMEOUT).unwrap_or_default();
        if !line.starts_with("READY") {
            let _ = child.kill();
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            return Err(SandboxError::Snapshotd(format!(
                "no READY line within {} s (exit: {status}; printed {line:?})",
                READY_TIMEOUT.as_secs()
            )));
        }
        Ok(Snapshotd {
            proc: Proc::Child(child),
            socket: socket.to_path_buf(),
            root: root.to_path_buf(),
        })
    }

    /// Takes over the running snapshotd `pid` serving `socket` (one an earlier process
    /// started): checks its command line names `socket` and that it answers there. Killed on
    /// drop like one this process started.
    pub fn adopt(pid: u32, root: &Path, socket: &Path) -> Result<Snapshotd, SandboxError> {
        let fail = |why: String| SandboxError::Adopt { pid, why };
        let handle = Pidfd::open_matching(pid, "fissile-snapshotd", &socket.to_string_lossy())
            .map_err(|e| fail(e.to_string()))?;
        fissile_snapshotd::client::Client::connect(socket)
            .and_then(|mut c| c.ping())
            .map_err(|e| fail(format!("it does not answer: {}", crate::error_chain(&e))))?;
        Ok(Snapshotd {
            proc: Proc::Adopted(handle),
            socket: socket.to_path_buf(),
            root: root.to_path_buf(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        match &self.proc {
            Proc::Child(c) => c.id(),
            Proc::Adopted(p) => p.pid(),
        }
    }

    /// True if it was adopted rather than started by this process.
    pub fn adopted(&self) -> bool {
        matches!(self.proc, Proc::Adopted(_))
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How it ended, if it has (without waiting): its exit status, or `exited` for an
    /// adopted one.
    pub fn exited(&mut self) -> Option<String> {
        match &mut self.proc {
            Proc::Child(c) => match c.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("cannot be waited for: {e}")),
            },
            Proc::Adopted(p) => match p.exited(Duration::ZERO) {
                Ok(true) => Some("exited".into()),
                Ok(false) => None,
                Err(e) => Some(format!("cannot be watched: {e}")),
            },
        }
    }

    /// Kills it (SIGKILL) and waits.
    pub fn kill(self) {
        drop(self);
    }
}

impl Drop for Snapshotd {
    fn drop(&mut self) {
        match &mut self.proc {
            Proc::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Proc::Adopted(p) => {
                p.kill(Duration::from_secs(10));
            }
        }
    }
}
