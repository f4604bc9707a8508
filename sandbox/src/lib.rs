//! Fissile sandboxes from Rust: boot a microVM with `fissile-vmm`, wait until its guest agent
//! answers over vsock, run Python in its persistent REPL, control the VM over its control
//! socket. This is the layer the `fissile` CLI, the benchmarks and the guest tests use; the
//! HTTP API will sit on it too.
//!
//! One [`Sandbox`] is one `fissile-vmm` process with its own working directory holding
//! `vsock.sock` (the hybrid vsock unix socket), `api.sock` (control socket), `console.log`
//! (guest serial console) and `vmm.log` (the VMM's own log).
//!
//! Readiness is the agent answering an `Info` request over vsock, never a sleep.

pub mod control;
pub mod paths;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fissile_agent::{AgentClient, ClientError, ExecOutcome, ReadyListener};
use fissile_proto::agent::{AGENT_READY_PORT, AGENT_VSOCK_PORT, AgentInfo, ExecRequest};

pub use control::{ControlClient, ControlError};

/// How to boot a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The `fissile-vmm` binary.
    pub vmm: PathBuf,
    /// Guest kernel (`vmlinux` with a PVH note).
    pub kernel: PathBuf,
    /// Guest root image.
    pub rootfs: PathBuf,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Working directory for the sandbox's sockets and logs (created if missing).
    pub dir: PathBuf,
    /// How long to wait for the agent to answer after the VMM starts.
    pub boot_timeout: Duration,
    /// Extra kernel command line.
    pub cmdline_extra: String,
}

impl SandboxConfig {
    /// A config from the environment: `FISSILE_GUEST_KERNEL`, `FISSILE_GUEST_ROOTFS` and the
    /// `fissile-vmm` found by [`paths::find_binary`]; 512 MiB, 1 vCPU, 120 s boot timeout.
    pub fn from_env(dir: impl Into<PathBuf>) -> Result<Self, SandboxError> {
        let var = |name: &'static str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .ok_or(SandboxError::MissingEnv(name))
        };
        Ok(Self {
            vmm: paths::find_binary("fissile-vmm")?,
            kernel: var("FISSILE_GUEST_KERNEL")?,
            rootfs: var("FISSILE_GUEST_ROOTFS")?,
            mem_mib: 512,
            vcpus: 1,
            dir: dir.into(),
            boot_timeout: Duration::from_secs(120),
            cmdline_extra: String::new(),
        })
    }
}

/// Booting or using a sandbox failed; each variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A required environment variable is not set.
    #[error("environment variable {0} is not set (scripts/setup.sh sets it)")]
    MissingEnv(&'static str),
    /// A binary could not be found.
    #[error(
        "cannot find the `{0}` binary (looked in $FISSILE_BIN_DIR, next to this program and on PATH)"
    )]
    MissingBinary(String),
    /// Creating the working directory or a log file failed.
    #[error("preparing sandbox directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    /// Spawning the VMM failed.
    #[error("starting {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    /// The VMM exited before the agent answered.
    #[error(
        "fissile-vmm exited ({status}) before the guest agent answered; vmm log:\n{vmm_log}\nconsole:\n{console}"
    )]
    VmmExited {
        /// Its exit status.
        status: ExitStatus,
        /// Tail of its log.
        vmm_log: String,
        /// Tail of the guest console.
        console: String,
    },
    /// The agent did not answer in time.
    #[error(
        "the guest agent did not answer within {secs} s; last error: {last}; console:\n{console}"
    )]
    BootTimeout {
        /// The timeout.
        secs: u64,
        /// The last connection error.
        last: String,
        /// Tail of the guest console.
        console: String,
    },
    /// Talking to the agent failed.
    #[error("guest agent")]
    Agent(#[from] ClientError),
    /// Talking to the control socket failed.
    #[error("control socket")]
    Control(#[from] ControlError),
    /// Waiting for the VMM to exit failed or timed out.
    #[error("waiting for fissile-vmm to exit: {0}")]
    Wait(String),
}

/// Timings of one boot.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimings {
    /// VMM process spawned → agent answered `Info`.
    pub to_ready: Duration,
}

/// A running sandbox: one `fissile-vmm` process and a connection to its guest agent.
#[derive(Debug)]
pub struct Sandbox {
    child: Option<Child>,
    dir: PathBuf,
    agent: AgentClient,
    info: AgentInfo,
    timings: BootTimings,
}

impl Sandbox {
    /// Boots a sandbox and waits until its agent answers.
    pub fn boot(cfg: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| SandboxError::Dir(cfg.dir.clone(), e))?;
        let vmm_log = File::create(cfg.dir.join("vmm.log"))
            .map_err(|e| SandboxError::Dir(cfg.dir.clone(), e))?;
        // Bound before the guest boots: the agent connects here once it listens.
        let ready = ReadyListener::hybrid_vsock(&cfg.dir.join("vsock.sock"), AGENT_READY_PORT)?;
        let started = Instant::now();
        let mut cmd = Command::new(&cfg.vmm);
        cmd.arg("--kernel")
            .arg(&cfg.kernel)
            .arg("--rootfs")
            .arg(&cfg.rootfs)
            .arg("--mem-mib")
            .arg(cfg.mem_mib.to_string())
            .arg("--vcpus")
            .arg(cfg.vcpus.to_string())
            .arg("--vsock-uds")
            .arg(cfg.dir.join("vsock.sock"))
            .arg("--api-sock")
            .arg(cfg.dir.join("api.sock"))
            .arg("--serial-log")
            .arg(cfg.dir.join("console.log"));
        if !cfg.cmdline_extra.is_empty() {
            cmd.arg("--cmdline-extra").arg(&cfg.cmdline_extra);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(vmm_log)
            .spawn()
            .map_err(|e| SandboxError::Spawn(cfg.vmm.clone(), e))?;
        let mut sandbox = Self::attach(child, &cfg.dir, cfg.boot_timeout, started, Some(ready))?;
        sandbox.timings.to_ready = started.elapsed();
        Ok(sandbox)
    }

    /// Waits for the agent of an already started VMM `child` whose sockets are in `dir`:
    /// for its readiness line on `ready` when given (a booting guest), then connects.
    /// Without `ready` (a restored guest whose agent already listens) it retries connecting.
    pub fn attach(
        mut child: Child,
        dir: &Path,
        timeout: Duration,
        started: Instant,
        ready: Option<ReadyListener>,
    ) -> Result<Sandbox, SandboxError> {
        let uds = dir.join("vsock.sock");
        let mut last = String::from("not tried");
        let mut backoff = Duration::from_millis(5);
        let mut signalled = ready.is_none();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(SandboxError::VmmExited {
                    status,
                    vmm_log: tail(&dir.join("vmm.log"), 30),
                    console: tail(&dir.join("console.log"), 30),
                });
            }
            if !signalled && let Some(r) = &ready {
                match r.wait(Duration::from_millis(100)) {
                    Ok(Some(_)) => signalled = true,
                    Ok(None) => {}
                    Err(e) => last = error_chain(&e),
                }
            }
            if signalled && uds.exists() {
                match Self::try_connect(&uds) {
                    Ok((agent, info)) => {
                        return Ok(Sandbox {
                            child: Some(child),
                            dir: dir.to_path_buf(),
                            agent,
                            info,
                            timings: BootTimings {
                                to_ready: started.elapsed(),
                            },
                        });
                    }
                    Err(e) => last = error_chain(&e),
                }
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SandboxError::BootTimeout {
                    secs: timeout.as_secs(),
                    last,
                    console: tail(&dir.join("console.log"), 30),
                });
            }
            if signalled {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
        }
    }

    fn try_connect(uds: &Path) -> Result<(AgentClient, AgentInfo), ClientError> {
        let mut agent = AgentClient::connect_hybrid_vsock(uds, AGENT_VSOCK_PORT)?;
        // A connection that the guest accepted but never answers must not hang the boot.
        let _ = agent.set_timeout(Some(Duration::from_secs(30)));
        let info = agent.info()?;
        let _ = agent.set_timeout(None);
        Ok((agent, info))
    }

    /// What the agent said when it first answered.
    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// Boot timings.
    pub fn timings(&self) -> BootTimings {
        self.timings
    }

    /// The sandbox's working directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The VMM's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent connection.
    pub fn agent(&mut self) -> &mut AgentClient {
        &mut self.agent
    }

    /// A second connection to the agent (e.g. to interrupt a running cell).
    pub fn connect_agent(&self) -> Result<AgentClient, SandboxError> {
        Ok(AgentClient::connect_hybrid_vsock(
            &self.dir.join("vsock.sock"),
            AGENT_VSOCK_PORT,
        )?)
    }

    /// A client of the VMM's control socket.
    pub fn control(&self) -> Result<ControlClient, SandboxError> {
        Ok(ControlClient::connect(&self.dir.join("api.sock"))?)
    }

    /// Runs a Python cell in the persistent REPL.
    pub fn exec(&mut self, code: &str) -> Result<ExecOutcome, SandboxError> {
        Ok(self.agent.exec(&ExecRequest {
            code: code.to_string(),
            ..ExecRequest::default()
        })?)
    }

    /// Asks the guest to power off and waits (bounded) for the VMM to exit.
    pub fn poweroff(mut self, timeout: Duration) -> Result<ExitStatus, SandboxError> {
        // The agent answers Ok, then the connection drops as the guest goes down.
        let _ = self.agent.poweroff();
        self.wait(timeout)
    }

    /// Waits (bounded) for the VMM process to exit; kills it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, SandboxError> {
        let Some(mut child) = self.child.take() else {
            return Err(SandboxError::Wait("already waited".into()));
        };
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(SandboxError::Wait(format!(
                        "still running after {} s; killed",
                        timeout.as_secs()
                    )));
                }
                Err(e) => return Err(SandboxError::Wait(e.to_string())),
            }
        }
    }

    /// Tail of the guest console log.
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.dir.join("console.log"), lines)
    }

    /// Tail of the VMM's log.
    pub fn vmm_log_tail(&self, lines: usize) -> String {
        tail(&self.dir.join("vmm.log"), lines)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last `lines` lines of a text file (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// An error with its source chain, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_returns_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "a\nb\nc\n").unwrap();
        assert_eq!(tail(&p, 2), "b\nc");
        assert_eq!(tail(&dir.path().join("missing"), 2), "");
    }

    #[test]
    fn a_vmm_that_exits_at_once_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmm.log"), "fissile-vmm: no kvm\n").unwrap();
        let child = Command::new("false").spawn().unwrap();

        let err = Sandbox::attach(
            child,
            dir.path(),
            Duration::from_secs(10),
            Instant::now(),
            None,
        )
        .unwrap_err();

        assert!(matches!(err, SandboxError::VmmExited { .. }), "{err}");
        assert!(err.to_string().contains("no kvm"), "{err}");
    }
}
