//! Starts the real `fissile-agent` binary in host mode on a temporary unix socket.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use fissile_agent::AgentClient;

/// A running agent; killed on drop.
pub struct TestAgent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
}

impl TestAgent {
    pub fn start() -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fissile-agent"))
            .arg("--listen-unix")
            .arg(&sock)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Readiness: the agent prints one line once it listens.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("listening"), "agent did not start: {line:?}");
        TestAgent { child, dir, sock }
    }

    pub fn client(&self) -> AgentClient {
        AgentClient::connect_unix(&self.sock).unwrap()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn sock(&self) -> &Path {
        &self.sock
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
