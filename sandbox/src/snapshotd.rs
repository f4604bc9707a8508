//! A `fissile-snapshotd` daemon process, for tests, benchmarks and the CLI.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::SandboxError;
use crate::paths::find_binary;

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
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        if !line.starts_with("READY") {
            let _ = child.kill();
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            return Err(SandboxError::VmmExited {
                status: format!("fissile-snapshotd: {status}"),
                vmm_log: line,
                console: String::new(),
            });
        }
        Ok(Snapshotd {
            child,
            socket: socket.to_path_buf(),
            root: root.to_path_buf(),
        })
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
