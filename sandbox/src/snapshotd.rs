//! A `fissile-snapshotd` daemon process, for tests, benchmarks and the CLI.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::SandboxError;
use crate::paths::find_binary;

/// How long snapshotd may take to open its store and listen.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running snapshotd; killed on drop.
#[derive(Debug)]
pub struct Snapshotd {
    child: Child,
    socket: PathBuf,
    root: PathBuf,
}

impl Snapshotd {
    /// Starts `fissile-snapshotd serve` on store `root` with its socket at `socket`; returns
    /// once it printed its readiness line.
    pub fn start(root: &Path, socket: &Path) -> Result<Snapshotd, SandboxError> {
        let bin = find_binary("fissile-snapshotd")?;
        let mut child = Command::new(&bin)
            .arg("serve")
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
            child,
            socket: socket.to_path_buf(),
            root: root.to_path_buf(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Kills it (SIGKILL) and waits.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Snapshotd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
