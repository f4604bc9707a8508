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
pub mod snapshotd;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fissile_agent::{AgentClient, ClientError, ExecOutcome, ReadyListener};
use fissile_proto::agent::{AGENT_READY_PORT, AGENT_VSOCK_PORT, AgentInfo, ExecRequest};
use fissile_proto::control::{ControlRequest, MergeReply, SnapshotReply};

pub use control::{ControlClient, ControlError};
pub use snapshotd::Snapshotd;

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
    /// snapshotd's socket (needed for snapshot, fork, merge, persist, restore).
    pub snapshotd: Option<PathBuf>,
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
            snapshotd: None,
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
        status: String,
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
    /// The operation needs snapshotd and none was configured.
    #[error("no snapshotd configured for this sandbox")]
    NoSnapshotd,
    /// The VMM's reply lacks what it should carry.
    #[error("unexpected control reply: {0}")]
    Reply(String),
    /// Reading host entropy for a restored guest failed.
    #[error("reading host entropy")]
    Entropy(#[source] std::io::Error),
}

/// The VMM process behind a sandbox: one we started, or a fork child its parent VMM started.
#[derive(Debug)]
enum VmmProcess {
    Child(Child),
    Pid(u32),
}

impl VmmProcess {
    fn id(&self) -> u32 {
        match self {
            VmmProcess::Child(c) => c.id(),
            VmmProcess::Pid(p) => *p,
        }
    }

    /// `Some(description)` once the process has exited.
    fn exited(&mut self) -> Option<String> {
        match self {
            VmmProcess::Child(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
            // Not our child (its parent VMM reaps it): gone, or a zombie, means exited.
            VmmProcess::Pid(p) => match std::fs::read_to_string(format!("/proc/{p}/stat")) {
                Err(_) => Some("exited".into()),
                Ok(stat) => {
                    let state = stat
                        .rsplit_once(')')
                        .and_then(|(_, r)| r.trim_start().chars().next());
                    (state == Some('Z')).then(|| "exited".into())
                }
            },
        }
    }

    fn kill(&mut self) {
        match self {
            VmmProcess::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            VmmProcess::Pid(p) => {
                // SAFETY: kill(2) has no memory-safety preconditions; a stale pid at worst
                // gets ESRCH.
                unsafe { libc::kill(*p as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Fresh entropy and the wall clock for a restored guest's agent.
fn after_restore(agent: &mut AgentClient) -> Result<(), SandboxError> {
    use std::io::Read;
    let mut entropy = [0u8; 64];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut entropy))
        .map_err(SandboxError::Entropy)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    agent.after_restore(&entropy, now)?;
    Ok(())
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
    proc: Option<VmmProcess>,
    dir: PathBuf,
    agent: AgentClient,
    info: AgentInfo,
    timings: BootTimings,
    snapshotd: Option<PathBuf>,
    forks: u32,
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
        if let Some(sd) = &cfg.snapshotd {
            cmd.arg("--snapshotd").arg(sd);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(vmm_log)
            .spawn()
            .map_err(|e| SandboxError::Spawn(cfg.vmm.clone(), e))?;
        let mut sandbox = Self::attach(child, &cfg.dir, cfg.boot_timeout, started, Some(ready))?;
        sandbox.timings.to_ready = started.elapsed();
        sandbox.snapshotd = cfg.snapshotd.clone();
        Ok(sandbox)
    }

    /// Restores snapshot `snapshot` into a new VMM process with its own sockets in
    /// `cfg.dir`, waits for the agent, and gives it fresh entropy and the wall clock.
    pub fn restore(cfg: &SandboxConfig, snapshot: &str) -> Result<Sandbox, SandboxError> {
        let sd = cfg.snapshotd.clone().ok_or(SandboxError::NoSnapshotd)?;
        std::fs::create_dir_all(&cfg.dir).map_err(|e| SandboxError::Dir(cfg.dir.clone(), e))?;
        let vmm_log = File::create(cfg.dir.join("vmm.log"))
            .map_err(|e| SandboxError::Dir(cfg.dir.clone(), e))?;
        let started = Instant::now();
        let child = Command::new(&cfg.vmm)
            .arg("--restore")
            .arg(snapshot)
            .arg("--snapshotd")
            .arg(&sd)
            .arg("--rootfs")
            .arg(&cfg.rootfs)
            .arg("--vsock-uds")
            .arg(cfg.dir.join("vsock.sock"))
            .arg("--api-sock")
            .arg(cfg.dir.join("api.sock"))
            .arg("--serial-log")
            .arg(cfg.dir.join("console.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(vmm_log)
            .spawn()
            .map_err(|e| SandboxError::Spawn(cfg.vmm.clone(), e))?;
        let mut sb = Self::attach(child, &cfg.dir, cfg.boot_timeout, started, None)?;
        after_restore(&mut sb.agent)?;
        sb.timings.to_ready = started.elapsed();
        sb.snapshotd = Some(sd);
        Ok(sb)
    }

    /// Waits for the agent of an already started VMM `child` whose sockets are in `dir`:
    /// for its readiness line on `ready` when given (a booting guest), then connects.
    /// Without `ready` (a restored guest whose agent already listens) it retries connecting.
    pub fn attach(
        child: Child,
        dir: &Path,
        timeout: Duration,
        started: Instant,
        ready: Option<ReadyListener>,
    ) -> Result<Sandbox, SandboxError> {
        Self::attach_process(VmmProcess::Child(child), dir, timeout, started, ready)
    }

    fn attach_process(
        mut child: VmmProcess,
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
            if let Some(status) = child.exited() {
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
                            proc: Some(child),
                            dir: dir.to_path_buf(),
                            agent,
                            info,
                            timings: BootTimings {
                                to_ready: started.elapsed(),
                            },
                            snapshotd: None,
                            forks: 0,
                        });
                    }
                    Err(e) => last = error_chain(&e),
                }
            }
            if started.elapsed() > timeout {
                child.kill();
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
        let _ = agent.set_timeout(Some(Duration::from_secs(60)));
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
        self.proc.as_ref().map(VmmProcess::id)
    }

    /// The VMM's control socket.
    pub fn api_sock(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// Snapshots the sandbox into snapshotd (`durable`: wait until the store has it). The
    /// sandbox keeps running on the new snapshot.
    pub fn snapshot(&self, durable: bool) -> Result<SnapshotReply, SandboxError> {
        let resp = self
            .control()?
            .call(&ControlRequest::Snapshot { durable })?;
        resp.snapshot
            .ok_or_else(|| SandboxError::Reply("snapshot without body".into()))
    }

    /// Forks into `n` children (copy-on-write, sharing unmodified memory). Returns once every
    /// child's agent answers and has fresh entropy and the wall clock; the timings say how
    /// long the VMM took and how long until all children answered.
    pub fn fork(&mut self, n: u32) -> Result<(Vec<Sandbox>, ForkTimings), SandboxError> {
        let t0 = Instant::now();
        self.forks += 1;
        let dir = self.dir.join(format!("fork-{}", self.forks));
        std::fs::create_dir_all(&dir).map_err(|e| SandboxError::Dir(dir.clone(), e))?;
        let mut ctl = self.control()?;
        let resp = ctl.call(&ControlRequest::Fork {
            n,
            dir: dir.display().to_string(),
        })?;
        let fork = resp
            .fork
            .ok_or_else(|| SandboxError::Reply("fork without body".into()))?;
        let vmm_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut children = Vec::new();
        for c in &fork.children {
            let mut sb = Self::attach_process(
                VmmProcess::Pid(c.pid),
                Path::new(&c.dir),
                Duration::from_secs(120),
                t0,
                None,
            )?;
            after_restore(&mut sb.agent)?;
            sb.snapshotd = self.snapshotd.clone();
            children.push(sb);
        }
        let timings = ForkTimings {
            vmm_ms,
            all_answered_ms: t0.elapsed().as_secs_f64() * 1e3,
            snapshot: fork.snapshot,
        };
        Ok((children, timings))
    }

    /// Takes `winner`'s state (a child of this sandbox's latest fork): its memory, vCPUs and
    /// devices. This sandbox keeps its identity and sockets; other children are untouched.
    /// Afterwards the agent connection is re-established (vsock connections do not survive).
    pub fn merge_into(&mut self, winner: &Sandbox) -> Result<MergeReply, SandboxError> {
        let resp = self.control()?.call(&ControlRequest::Merge {
            winner: winner.api_sock().display().to_string(),
        })?;
        let merge = resp
            .merge
            .ok_or_else(|| SandboxError::Reply("merge without body".into()))?;
        self.reconnect()?;
        Ok(merge)
    }

    /// Re-establishes the agent connection after the guest's vsock was reset, and gives the
    /// agent fresh entropy and the wall clock.
    pub fn reconnect(&mut self) -> Result<(), SandboxError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match Self::try_connect(&self.dir.join("vsock.sock")) {
                Ok((agent, info)) => {
                    self.agent = agent;
                    self.info = info;
                    return after_restore(&mut self.agent);
                }
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Persists the sandbox: a durable snapshot, then the VMM stops. Returns the snapshot id
    /// to [`Sandbox::restore`] later.
    pub fn persist(mut self, timeout: Duration) -> Result<String, SandboxError> {
        let resp = self.control()?.call(&ControlRequest::Persist)?;
        let snap = resp
            .snapshot
            .ok_or_else(|| SandboxError::Reply("persist without body".into()))?;
        let _ = self.wait(timeout);
        Ok(snap.id)
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
        let mut child = match self.proc.take() {
            Some(VmmProcess::Child(c)) => c,
            Some(mut other) => {
                let deadline = Instant::now() + timeout;
                while other.exited().is_none() {
                    if Instant::now() > deadline {
                        other.kill();
                        return Err(SandboxError::Wait("still running; killed".into()));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                // Not our child: its status went to its parent VMM.
                return Ok(<ExitStatus as std::os::unix::process::ExitStatusExt>::from_raw(0));
            }
            None => return Err(SandboxError::Wait("already waited".into())),
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
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// How long a fork took.
#[derive(Debug, Clone)]
pub struct ForkTimings {
    /// The fork request to the parent VMM (snapshot + starting the children).
    pub vmm_ms: f64,
    /// Until every child's agent answered (and got entropy and the clock).
    pub all_answered_ms: f64,
    /// The fork snapshot.
    pub snapshot: SnapshotReply,
}

/// The last `lines` lines of a text file (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub use fissile_proto::error_chain;

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
