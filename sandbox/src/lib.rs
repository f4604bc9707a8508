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
//!
//! This library starts every VMM process itself (boot, restore, and the children of a
//! fork: the parent VMM only takes the fork snapshot), so each sandbox owns its process as a
//! child ([`process::Process`]; a jailed VMM, the first process of its own pid namespace, is
//! this process's child too): nothing is ever killed by a bare pid, and a fork that fails
//! half way kills and reaps the children it started.

pub mod control;
pub mod jail;
pub mod limits;
pub mod net;
pub mod paths;
pub mod process;
pub mod snapshotd;
mod standby;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fissile_agent::{AgentClient, ClientError, ExecOutcome, ReadyListener};
use fissile_proto::agent::{AGENT_READY_PORT, AGENT_VSOCK_PORT, AgentInfo, ExecRequest};
use fissile_proto::control::{
    ControlRequest, MAX_FORK_CHILDREN, MergeReply, SnapshotReply, TrimReply, VmStatus,
};

pub use control::{ControlClient, ControlError};
use fissile_proto::pidfd::Pidfd;
pub use limits::{Cgroup, LimitsError, VmmLimits};
pub use net::NetNs;
use process::Process;
pub use snapshotd::Snapshotd;
pub use standby::Standby;

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
    /// What every VMM of this sandbox (and of its fork children) runs under: its own cgroup,
    /// rlimits.
    pub limits: VmmLimits,
    /// The guest's network (none by default).
    pub network: Network,
    /// Set (by another thread) to give up a start under way: the wait for its guest stops
    /// with [`SandboxError::Cancelled`] and its VMM is stopped (a sandbox deleted while it
    /// started). Only the start watches it, not what the sandbox does later.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// A sandbox's network: the guest brings up `eth0` with the layout of `fissile_proto::net`
/// whenever it has a network device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Network {
    /// No network device.
    #[default]
    None,
    /// Every VMM (the sandbox's and each fork child's) in a network namespace of its own
    /// holding the guest's gateway tap ([`net::NetNs`]): the guest reaches only what is
    /// started inside that namespace (no route out of it yet).
    Isolated,
    /// Like `Isolated`, plus a way out to the host's network under this policy
    /// ([`net::egress`]: a veth pair per namespace, NAT, nftables rules inside the
    /// namespace). Fork children get their own namespaces with the policy in force when
    /// they are made.
    Routed(net::egress::EgressPolicy),
    /// A virtio-net device on this existing tap in the caller's own namespace (see
    /// [`net::create_gateway_tap`]). One VMM at a time can attach to a tap, so a fork of
    /// such a sandbox fails.
    Tap(String),
}

impl SandboxConfig {
    /// A config from the environment: `FISSILE_GUEST_KERNEL`, `FISSILE_GUEST_ROOTFS` and the
    /// `fissile-vmm` found by [`paths::find_binary`]; 512 MiB, 1 vCPU, 120 s boot timeout,
    /// [`VmmLimits::from_env`].
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
            limits: VmmLimits::from_env(),
            network: Network::None,
            cancel: None,
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
    /// The VMM's jail could not be prepared.
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    /// Creating the working directory or a log file failed.
    #[error("preparing sandbox directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    /// The start was given up ([`SandboxConfig::cancel`]): its VMM is stopped.
    #[error("the start was cancelled")]
    Cancelled,
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
    /// The agent did not answer again after a merge, rollback or restore.
    #[error(
        "the guest agent did not answer again within {secs} s ({attempts} attempts); last error: {last}; the VM: {vm}; vmm log:\n{vmm_log}\nconsole:\n{console}"
    )]
    Reconnect {
        /// The timeout.
        secs: u64,
        /// Connections tried.
        attempts: u32,
        /// The last attempt's error.
        last: String,
        /// What the VMM says of the VM then ([`Sandbox::diagnose`]): whether its vCPUs
        /// run, halt or are parked, and any lifecycle operation in progress.
        vm: String,
        /// Tail of the VMM's log.
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
    /// A pre-started VMM ([`Standby`]) cannot be used as asked.
    #[error("standby VMM: {0}")]
    Standby(String),
    /// Reading host entropy for a restored guest failed.
    #[error("reading host entropy")]
    Entropy(#[source] std::io::Error),
    /// Starting snapshotd failed.
    #[error("fissile-snapshotd did not start: {0}")]
    Snapshotd(String),
    /// A fork's child count is out of range.
    #[error("fork needs 1..={MAX_FORK_CHILDREN} children, got {0}")]
    ForkCount(u32),
    /// Some children of a fork failed; the ones that started were stopped.
    #[error("fork({n}): {} of the children failed; the first: {first}", failed)]
    Fork {
        /// Children asked for.
        n: u32,
        /// How many failed.
        failed: usize,
        /// The first failure.
        first: Box<SandboxError>,
    },
    /// A sandbox cannot merge into itself.
    #[error("a sandbox cannot merge into itself")]
    SelfMerge,
    /// The VMM's cgroup or rlimits could not be set up.
    #[error("limits for fissile-vmm")]
    Limits(#[from] LimitsError),
    /// The VMM's network namespace could not be set up.
    #[error("network for fissile-vmm")]
    Net(#[from] net::NetNsError),
    /// Its uplink or egress policy could not be set up or changed.
    #[error("network egress")]
    Egress(#[from] net::egress::EgressError),
    /// The sandbox has no network namespace of its own (no network device, or a plain tap).
    #[error("this sandbox has no network namespace of its own (Network::Isolated or Routed)")]
    NotRouted,
    /// A running VMM could not be adopted.
    #[error("cannot adopt process {pid}: {why}")]
    Adopt {
        /// Its pid.
        pid: u32,
        /// Why not.
        why: String,
    },
}

/// Where a fork child starts ([`Sandbox::fork_each_with`]).
#[derive(Debug)]
pub enum ChildPlace {
    /// A new VMM process with its sockets and logs in this directory.
    Dir(PathBuf),
    /// A VMM started ahead of time for this sandbox's shape (in its own directory).
    Standby(Box<Standby>),
}

/// How a sandbox starts VMM processes (kept for its fork children).
#[derive(Debug, Clone)]
struct Spawner {
    vmm: PathBuf,
    rootfs: PathBuf,
    snapshotd: Option<PathBuf>,
    boot_timeout: Duration,
    /// [`SandboxConfig::cancel`] while the start it came from waits (cleared once the
    /// sandbox is attached: its fork children do not watch it).
    cancel: Option<Arc<AtomicBool>>,
    limits: VmmLimits,
    mem_mib: u64,
    vcpus: u8,
    network: Network,
}

/// A VMM process this library started, with the cgroup it runs in (removed after the
/// process is reaped: fields drop in order) and its network namespace.
#[derive(Debug)]
struct Spawned {
    child: Process,
    cgroup: Option<Cgroup>,
    netns: Option<NetNs>,
    /// The jailed VMM's uid ([`jail`]), leased until the VMM has been reaped.
    uid: Option<jail::UidLease>,
}

impl Spawned {
    /// Starts `cmd` under `limits` (a guest of `mem_mib` MiB, `vcpus` vCPUs), in a jail when
    /// configured (`kernel`: the kernel a cold boot reads; `snapshot`: the one it restores,
    /// which snapshotd then lets it read — a jailed VMM reads nothing else it did not make).
    fn start(
        cmd: Command,
        spawner: &Spawner,
        dir: &Path,
        kernel: Option<&Path>,
        snapshot: Option<&str>,
    ) -> Result<Spawned, SandboxError> {
        Self::start_with_io(
            cmd,
            spawner,
            dir,
            kernel,
            snapshot,
            (Stdio::null(), Stdio::null()),
        )
    }

    /// [`Spawned::start`] with the program's standard input and output.
    fn start_with_io(
        mut cmd: Command,
        spawner: &Spawner,
        dir: &Path,
        kernel: Option<&Path>,
        snapshot: Option<&str>,
        (stdin, stdout): (Stdio, Stdio),
    ) -> Result<Spawned, SandboxError> {
        let netns = match &spawner.network {
            Network::None => None,
            Network::Tap(tap) => {
                cmd.arg("--net-tap").arg(tap);
                None
            }
            Network::Isolated | Network::Routed(_) => {
                let ns = match &spawner.network {
                    Network::Routed(policy) => NetNs::create_routed(policy, spawner.limits.net)?,
                    _ => NetNs::create()?,
                };
                ns.enter_on_spawn(&mut cmd);
                cmd.arg("--net-tap").arg(fissile_proto::net::TAP_NAME);
                Some(ns)
            }
        };
        let cgroup = limits::apply(
            &mut cmd,
            &spawner.limits,
            dir,
            spawner.mem_mib,
            spawner.vcpus,
        )?;
        // Last: the jail's hook drops root, which the hooks above need.
        let (uid, report) = match &spawner.limits.jail {
            Some(cfg) => {
                let lease = jail::UidLease::new(cfg)?;
                if let Some(sd) = &spawner.snapshotd {
                    // A reused uid starts from nothing: `reset`.
                    let granted: Vec<String> = snapshot.map(str::to_string).into_iter().collect();
                    grant(sd, lease.uid(), &granted, true)?;
                }
                if let Some(ns) = &netns {
                    ns.admit_group(cfg.gid)?;
                }
                let mut devices =
                    vec![PathBuf::from("/dev/kvm"), PathBuf::from("/dev/userfaultfd")];
                if netns.is_some() || matches!(spawner.network, Network::Tap(_)) {
                    devices.push(PathBuf::from("/dev/net/tun"));
                }
                let spec = jail::JailSpec {
                    program: spawner.vmm.clone(),
                    read_only: kernel
                        .into_iter()
                        .map(Path::to_path_buf)
                        .chain([spawner.rootfs.clone()])
                        .collect(),
                    sockets: spawner.snapshotd.iter().cloned().collect(),
                    dir: dir.to_path_buf(),
                    devices,
                };
                let report = jail::apply(&mut cmd, cfg, lease.uid(), &spec)?;
                (Some(lease), Some(report))
            }
            None => (None, None),
        };
        cmd.stdin(stdin).stdout(stdout);
        let child =
            jail::spawn(cmd, report).map_err(|e| SandboxError::Spawn(spawner.vmm.clone(), e))?;
        Ok(Spawned {
            child,
            cgroup,
            netns,
            uid,
        })
    }
}

impl Spawner {
    fn of(cfg: &SandboxConfig) -> Spawner {
        Spawner {
            vmm: cfg.vmm.clone(),
            rootfs: cfg.rootfs.clone(),
            snapshotd: cfg.snapshotd.clone(),
            boot_timeout: cfg.boot_timeout,
            cancel: cfg.cancel.clone(),
            limits: cfg.limits.clone(),
            mem_mib: cfg.mem_mib,
            vcpus: cfg.vcpus,
            network: cfg.network.clone(),
        }
    }

    /// Starts `fissile-vmm --restore <snapshot>` with its sockets and logs in `dir`.
    fn restore(&self, snapshot: &str, dir: &Path) -> Result<Spawned, SandboxError> {
        let mut cmd = self.restore_command(dir)?;
        cmd.arg("--restore").arg(snapshot);
        Spawned::start(cmd, self, dir, None, Some(snapshot))
    }

    /// `fissile-vmm` with what any restore into `dir` needs (snapshotd, root image, its
    /// sockets and console log there, its log in `dir/vmm.log`), `dir` made; the caller adds
    /// what to restore (`--restore`, or `--standby`).
    fn restore_command(&self, dir: &Path) -> Result<Command, SandboxError> {
        let sd = self.snapshotd.as_ref().ok_or(SandboxError::NoSnapshotd)?;
        std::fs::create_dir_all(dir).map_err(|e| SandboxError::Dir(dir.to_path_buf(), e))?;
        let vmm_log = File::create(dir.join("vmm.log"))
            .map_err(|e| SandboxError::Dir(dir.to_path_buf(), e))?;
        let mut cmd = Command::new(&self.vmm);
        cmd.arg("--snapshotd")
            .arg(sd)
            .arg("--rootfs")
            .arg(&self.rootfs)
            .arg("--vsock-uds")
            .arg(dir.join("vsock.sock"))
            .arg("--api-sock")
            .arg(dir.join("api.sock"))
            .arg("--serial-log")
            .arg(dir.join("console.log"))
            .stderr(vmm_log);
        Ok(cmd)
    }
}

/// Lets the jailed VMM of `uid` read `snapshots` in the snapshotd at `socket` (`reset`:
/// instead of what it was granted before).
fn grant(socket: &Path, uid: u32, snapshots: &[String], reset: bool) -> Result<(), SandboxError> {
    fissile_snapshotd_client::client::Client::connect(socket)
        .and_then(|mut c| c.grant(uid, snapshots, reset))
        .map_err(|e| {
            SandboxError::Snapshotd(format!(
                "granting snapshots to VMM uid {uid}: {}",
                error_chain(&e)
            ))
        })
}

/// Connects to a restored guest's agent and wakes it in one round trip: fresh entropy and
/// the wall clock, then its `Info`, sent with the connection request
/// ([`AgentClient::connect_hybrid_vsock_waking`]); `within` bounds the answers.
fn connect_waking(uds: &Path, within: Duration) -> Result<(AgentClient, AgentInfo), SandboxError> {
    use std::io::Read;
    let mut entropy = [0u8; 64];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut entropy))
        .map_err(SandboxError::Entropy)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    Ok(AgentClient::connect_hybrid_vsock_waking(
        uds,
        AGENT_VSOCK_PORT,
        &entropy,
        now,
        within,
    )?)
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
    proc: Option<Process>,
    /// A VMM this process did not start (see [`Sandbox::adopt`]).
    adopted: Option<Pidfd>,
    dir: PathBuf,
    /// The connection opened (and, after a restore, woken) when the sandbox started or last
    /// switched state; `None` once handed out with [`Sandbox::take_agent`] (the next call
    /// through [`Sandbox::agent`] opens another).
    agent: Option<AgentClient>,
    info: AgentInfo,
    timings: BootTimings,
    spawner: Spawner,
    forks: u32,
    /// The VMM's cgroup, removed on drop (`Drop` reaps the VMM first).
    cgroup: Option<Cgroup>,
    /// The VMM's network namespace ([`Network::Isolated`]).
    netns: Option<NetNs>,
    /// A jailed VMM's uid, leased until the VMM has been reaped.
    uid: Option<jail::UidLease>,
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
        cmd.stderr(vmm_log);
        let spawner = Spawner::of(cfg);
        let vmm = Spawned::start(cmd, &spawner, &cfg.dir, Some(&cfg.kernel), None)?;
        Self::attach(vmm, &cfg.dir, spawner, started, Some(ready))
    }

    /// Restores snapshot `snapshot` into a new VMM process with its own sockets in
    /// `cfg.dir`, waits for the agent, and gives it fresh entropy and the wall clock.
    pub fn restore(cfg: &SandboxConfig, snapshot: &str) -> Result<Sandbox, SandboxError> {
        let spawner = Spawner::of(cfg);
        let started = Instant::now();
        let vmm = spawner.restore(snapshot, &cfg.dir)?;
        let mut sb = Self::attach(vmm, &cfg.dir, spawner, started, None)?;
        sb.timings.to_ready = started.elapsed();
        Ok(sb)
    }

    /// Waits for the agent of the VMM `child` whose sockets are in `dir`: for its
    /// readiness line on `ready` when given (a booting guest), then connects. Without
    /// `ready` (a restored guest whose agent already listens) it retries connecting. On any
    /// failure the VMM is killed and reaped.
    fn attach(
        vmm: Spawned,
        dir: &Path,
        mut spawner: Spawner,
        started: Instant,
        ready: Option<ReadyListener>,
    ) -> Result<Sandbox, SandboxError> {
        let Spawned {
            mut child,
            cgroup,
            netns,
            uid,
        } = vmm;
        let uds = dir.join("vsock.sock");
        let timeout = spawner.boot_timeout;
        let mut last = String::from("not tried");
        let mut backoff = Duration::from_millis(5);
        let mut signalled = ready.is_none();
        loop {
            // Given up (the sandbox was deleted while it started): it stops now rather than
            // at the boot timeout.
            if spawner
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Acquire))
            {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SandboxError::Cancelled);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(SandboxError::VmmExited {
                    status: status.to_string(),
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
                // A restored guest (no readiness listener) is woken in the same round trip.
                match Self::try_connect(&uds, ready.is_none()) {
                    Ok((agent, info)) => {
                        spawner.cancel = None;
                        return Ok(Sandbox {
                            proc: Some(child),
                            adopted: None,
                            dir: dir.to_path_buf(),
                            agent: Some(agent),
                            info,
                            timings: BootTimings {
                                to_ready: started.elapsed(),
                            },
                            spawner,
                            forks: 0,
                            cgroup,
                            netns,
                            uid,
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

    /// Takes over the running VMM `pid` whose sockets are in `cfg.dir` (one an earlier
    /// process started, e.g. a daemon that was killed): checks that the process is that
    /// VMM (its command line names the directory's control socket) and that its agent
    /// answers. The handle is a pidfd, so a reused pid is never signalled. Dropping the
    /// sandbox kills the VMM, as for one this process started.
    pub fn adopt(cfg: &SandboxConfig, pid: u32) -> Result<Sandbox, SandboxError> {
        let adopt = |why: String| SandboxError::Adopt { pid, why };
        let api = cfg.dir.join("api.sock");
        let handle = Pidfd::open_matching(pid, "fissile-vmm", &api.to_string_lossy())
            .map_err(|e| adopt(e.to_string()))?;
        let (agent, info) = Self::try_connect(&cfg.dir.join("vsock.sock"), false)
            .map_err(|e| adopt(format!("its agent does not answer: {}", error_chain(&e))))?;
        let sb = Sandbox {
            proc: None,
            adopted: Some(handle),
            dir: cfg.dir.clone(),
            agent: Some(agent),
            info,
            timings: BootTimings::default(),
            spawner: Spawner::of(cfg),
            forks: 0,
            cgroup: limits::adopted_cgroup(&cfg.limits, pid),
            netns: match cfg.network {
                // An adopted VMM's uplink slot is not known to this process: the namespace
                // (and its policy, set with nft) still works; a new slot may collide with it
                // and is then skipped (EEXIST).
                Network::Isolated | Network::Routed(_) => Some(NetNs::of_process(pid)?),
                _ => None,
            },
            uid: cfg
                .limits
                .jail
                .as_ref()
                .and_then(|j| jail::jailed_uid(j, pid))
                .map(jail::UidLease::adopt),
        };
        // A snapshotd that restarted since has forgotten what the jailed VMM may read: its
        // base and fork snapshots again.
        if let (Some(uid), Some(sd)) = (sb.jail_uid(), &cfg.snapshotd) {
            let status = sb
                .control()?
                .call(&ControlRequest::Status)?
                .status
                .ok_or_else(|| SandboxError::Reply("status without body".into()))?;
            let ids: Vec<String> = [status.base_snapshot, status.fork_snapshot]
                .into_iter()
                .flatten()
                .collect();
            grant(sd, uid, &ids, false)?;
        }
        Ok(sb)
    }

    /// Connects to the agent and asks its `Info` — with `wake`, together with fresh entropy
    /// and the clock, sent with the connection request ([`connect_waking`]).
    fn try_connect(uds: &Path, wake: bool) -> Result<(AgentClient, AgentInfo), SandboxError> {
        // The client's call deadline: a connection the guest accepted but never answers
        // does not hang the boot.
        if wake {
            return connect_waking(uds, fissile_agent::client::DEFAULT_CALL_TIMEOUT);
        }
        let mut agent = AgentClient::connect_hybrid_vsock(uds, AGENT_VSOCK_PORT)?;
        let info = agent.info()?;
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
        self.proc
            .as_ref()
            .map(Process::id)
            .or_else(|| self.adopted.as_ref().map(Pidfd::pid))
    }

    /// The VMM's network namespace, if it runs in one of its own ([`Network::Isolated`],
    /// [`Network::Routed`]).
    pub fn netns(&self) -> Option<&NetNs> {
        self.netns.as_ref()
    }

    /// Changes the sandbox's egress policy at once (its next connections follow it); an
    /// `Isolated` sandbox gets its way out now and becomes `Routed`. Children of its later
    /// forks inherit the policy.
    pub fn set_network_policy(
        &mut self,
        policy: net::egress::EgressPolicy,
    ) -> Result<(), SandboxError> {
        if !matches!(self.spawner.network, Network::Routed(_) | Network::Isolated) {
            return Err(SandboxError::NotRouted);
        }
        let ns = self.netns.as_mut().ok_or(SandboxError::NotRouted)?;
        ns.route(&policy, self.spawner.limits.net)?;
        self.spawner.network = Network::Routed(policy);
        Ok(())
    }

    /// The VMM's cgroup directory, if it runs in one of its own.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_ref().map(Cgroup::path)
    }

    /// The uid a jailed VMM runs as ([`VmmLimits::jail`]).
    pub fn jail_uid(&self) -> Option<u32> {
        self.uid.as_ref().map(jail::UidLease::uid)
    }

    /// The VMM's control socket.
    pub fn api_sock(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// [`diagnose`] of this sandbox's VMM.
    pub fn diagnose(&self) -> String {
        diagnose(&self.api_sock(), self.pid())
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

    /// Gives back the private copies of guest pages whose bytes equal the snapshot image's,
    /// so they are shared with the image again (see `fissile_proto::control`'s `trim`): what
    /// a restored or forked sandbox wrote as it woke and left as it was. Compares with the VM
    /// running, then pauses it to compare the equal copies again and drop them; refused for
    /// a sandbox that is not on an image (booted and never snapshotted).
    pub fn trim(&self) -> Result<TrimReply, SandboxError> {
        let resp = self.control()?.call(&ControlRequest::Trim)?;
        resp.trim
            .ok_or_else(|| SandboxError::Reply("trim without body".into()))
    }

    /// Forks into `n` children (copy-on-write, sharing unmodified memory) and returns each
    /// child's outcome: the parent VMM takes the fork snapshot, this library starts one
    /// `fissile-vmm --restore` per child and waits until each child's agent answers and has
    /// fresh entropy and the wall clock. A child that fails has been killed and reaped.
    pub fn fork_each(
        &mut self,
        n: u32,
    ) -> Result<(Vec<Result<Sandbox, SandboxError>>, ForkTimings), SandboxError> {
        let dir = self.dir.join(format!("fork-{}", self.forks + 1));
        let dirs = (0..n).map(|i| dir.join(format!("child-{i}"))).collect();
        self.fork_each_in(dirs)
    }

    /// [`Sandbox::fork_each`] with one child per directory of `dirs` (each child's sockets
    /// and logs go there), for callers that give children their own places (a daemon that
    /// names them by id).
    pub fn fork_each_in(
        &mut self,
        dirs: Vec<PathBuf>,
    ) -> Result<(Vec<Result<Sandbox, SandboxError>>, ForkTimings), SandboxError> {
        self.fork_each_with(dirs.into_iter().map(ChildPlace::Dir).collect())
    }

    /// [`Sandbox::fork_each`] with one child per place: a new VMM process in a directory, or
    /// a pre-started VMM ([`Standby`], started for this sandbox's vCPUs and memory; one of
    /// another shape fails the fork before it starts). Children start in parallel; each is
    /// then waited for.
    pub fn fork_each_with(
        &mut self,
        children: Vec<ChildPlace>,
    ) -> Result<(Vec<Result<Sandbox, SandboxError>>, ForkTimings), SandboxError> {
        let n = u32::try_from(children.len()).unwrap_or(u32::MAX);
        if n == 0 || n > MAX_FORK_CHILDREN {
            return Err(SandboxError::ForkCount(n));
        }
        for child in &children {
            if let ChildPlace::Standby(s) = child {
                s.check_shape(&self.spawner)?;
            }
        }
        let t0 = Instant::now();
        self.forks += 1;
        let fork = self
            .control()?
            .call(&ControlRequest::Fork {})?
            .fork
            .ok_or_else(|| SandboxError::Reply("fork without body".into()))?;
        let vmm_ms = t0.elapsed().as_secs_f64() * 1e3;
        let started: Vec<Result<(Spawned, PathBuf, Spawner), SandboxError>> = children
            .into_iter()
            .map(|child| match child {
                ChildPlace::Dir(dir) => self
                    .spawner
                    .restore(&fork.snapshot.id, &dir)
                    .map(|vmm| (vmm, dir, self.spawner.clone())),
                // A standby that cannot take the request (its process died) leaves its
                // directory to a new process.
                ChildPlace::Standby(standby) => {
                    let dir = standby.dir().to_path_buf();
                    (*standby)
                        .take(&fork.snapshot.id)
                        .map(|(vmm, dir, _)| (vmm, dir))
                        .or_else(|e| {
                            tracing::warn!(dir = %dir.display(), error = %error_chain(&e),
                                "a standby VMM could not be used; starting a new one");
                            self.spawner
                                .restore(&fork.snapshot.id, &dir)
                                .map(|v| (v, dir))
                        })
                        .map(|(vmm, dir)| (vmm, dir, self.spawner.clone()))
                }
            })
            .collect();
        let spawn_ms = t0.elapsed().as_secs_f64() * 1e3 - vmm_ms;
        let children = started
            .into_iter()
            .map(|child| {
                let (vmm, dir, spawner): (Spawned, PathBuf, Spawner) = child?;
                Self::attach(vmm, &dir, spawner, t0, None)
            })
            .collect();
        let timings = ForkTimings {
            vmm_ms,
            spawn_ms,
            all_answered_ms: t0.elapsed().as_secs_f64() * 1e3,
            snapshot: fork.snapshot,
        };
        Ok((children, timings))
    }

    /// [`Sandbox::fork_each`], all or nothing: if any child fails, every child is stopped
    /// and the error says how many failed.
    pub fn fork(&mut self, n: u32) -> Result<(Vec<Sandbox>, ForkTimings), SandboxError> {
        let (outcomes, timings) = self.fork_each(n)?;
        let (ok, failed): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(Result::is_ok);
        let mut failed = failed.into_iter().filter_map(Result::err);
        if let Some(first) = failed.next() {
            drop(ok); // stops the children that did start
            return Err(SandboxError::Fork {
                n,
                failed: 1 + failed.count(),
                first: Box::new(first),
            });
        }
        Ok((ok.into_iter().filter_map(Result::ok).collect(), timings))
    }

    /// Takes `winner`'s state (a child of this sandbox's latest fork): its memory, vCPUs and
    /// devices. The winner snapshots itself (and keeps running); this sandbox's VMM checks
    /// in snapshotd that the snapshot descends from its fork and switches to it, keeping its
    /// identity and sockets. Afterwards the agent connection is re-established (vsock
    /// connections do not survive).
    pub fn merge_into(&mut self, winner: &Sandbox) -> Result<MergeReply, SandboxError> {
        if winner.dir == self.dir {
            return Err(SandboxError::SelfMerge);
        }
        let snapshot = winner.snapshot(false)?;
        self.merge_snapshot(&snapshot.id)
    }

    /// The second half of [`Sandbox::merge_into`]: takes the state of `snapshot`, which a
    /// child of this sandbox's latest fork took.
    pub fn merge_snapshot(&mut self, snapshot: &str) -> Result<MergeReply, SandboxError> {
        self.allow(snapshot)?;
        self.switch_to(ControlRequest::Merge {
            snapshot: snapshot.to_string(),
        })
    }

    /// Lets this sandbox's VMM, when jailed, read `snapshot` in snapshotd (one it is to take
    /// the state of). [`Sandbox::merge_snapshot`] and [`Sandbox::rollback`] do it; a client
    /// that sends `merge` or `rollback` over the control socket itself must do it first. The
    /// VMM still checks the lineage (merge: a child of its fork; rollback: its own).
    pub fn allow(&self, snapshot: &str) -> Result<(), SandboxError> {
        match (self.jail_uid(), &self.spawner.snapshotd) {
            (Some(uid), Some(sd)) => grant(sd, uid, &[snapshot.to_string()], false),
            _ => Ok(()),
        }
    }

    /// Returns this sandbox to one of its earlier snapshots (memory, vCPUs, devices), keeping
    /// its identity; reconnects the agent.
    pub fn rollback(&mut self, snapshot: &str) -> Result<MergeReply, SandboxError> {
        self.allow(snapshot)?;
        self.switch_to(ControlRequest::Rollback {
            snapshot: snapshot.to_string(),
        })
    }

    fn switch_to(&mut self, req: ControlRequest) -> Result<MergeReply, SandboxError> {
        let merge = self
            .control()?
            .call(&req)?
            .merge
            .ok_or_else(|| SandboxError::Reply("merge without body".into()))?;
        self.reconnect()?;
        Ok(merge)
    }

    /// Re-establishes the agent connection after the guest's vsock was reset, and gives the
    /// agent fresh entropy and the wall clock. Each attempt has a short call deadline
    /// ([`RECONNECT_ATTEMPT`]): a connection the guest accepted but does not answer is
    /// dropped and a new one tried, up to [`RECONNECT_TIMEOUT`]. A VMM that exited meanwhile
    /// is reported at once with its log and the guest console.
    pub fn reconnect(&mut self) -> Result<(), SandboxError> {
        let uds = self.dir.join("vsock.sock");
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            if let Some(status) = self.exit_status() {
                return Err(SandboxError::VmmExited {
                    status,
                    vmm_log: self.vmm_log_tail(30),
                    console: self.console_tail(30),
                });
            }
            attempts += 1;
            match Self::try_reconnect(&uds) {
                Ok((agent, info)) => {
                    self.agent = Some(agent);
                    self.info = info;
                    if attempts > 1 {
                        tracing::info!(attempts, ms = started.elapsed().as_millis() as u64, dir = %self.dir.display(), "agent reconnected");
                    }
                    return Ok(());
                }
                Err(e) if started.elapsed() > RECONNECT_TIMEOUT => {
                    return Err(SandboxError::Reconnect {
                        secs: RECONNECT_TIMEOUT.as_secs(),
                        attempts,
                        last: error_chain(&e),
                        vm: self.diagnose(),
                        vmm_log: self.vmm_log_tail(30),
                        console: self.console_tail(30),
                    });
                }
                Err(e) => {
                    tracing::debug!(attempts, error = %error_chain(&e), "agent reconnect attempt failed");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// One reconnect attempt: connect, `AfterRestore` and `Info` in one round trip
    /// ([`connect_waking`]), the answers within [`RECONNECT_ATTEMPT`].
    fn try_reconnect(uds: &Path) -> Result<(AgentClient, AgentInfo), SandboxError> {
        connect_waking(uds, RECONNECT_ATTEMPT)
    }

    /// The VMM's exit status if it has exited (an adopted VMM's status is not known).
    fn exit_status(&mut self) -> Option<String> {
        if let Some(child) = self.proc.as_mut() {
            return child.try_wait().ok().flatten().map(|s| s.to_string());
        }
        self.adopted
            .as_ref()
            .filter(|h| h.exited(Duration::ZERO).unwrap_or(false))
            .map(|_| "adopted; status unknown".to_string())
    }

    /// Persists the sandbox: a durable snapshot, then the VMM stops. Returns the snapshot id
    /// to [`Sandbox::restore`] later.
    pub fn persist(mut self, timeout: Duration) -> Result<String, SandboxError> {
        let resp = self.control()?.call(&ControlRequest::Persist)?;
        let snap = resp
            .snapshot
            .ok_or_else(|| SandboxError::Reply("persist without body".into()))?;
        self.wait(timeout)?;
        Ok(snap.id)
    }

    /// The agent connection (a new one if the last was taken with [`Sandbox::take_agent`]).
    pub fn agent(&mut self) -> Result<&mut AgentClient, SandboxError> {
        let agent = match self.agent.take() {
            Some(agent) => agent,
            None => {
                AgentClient::connect_hybrid_vsock(&self.dir.join("vsock.sock"), AGENT_VSOCK_PORT)?
            }
        };
        Ok(self.agent.insert(agent))
    }

    /// Hands out the connection the sandbox opened when it started or last switched state
    /// (already woken after a restore, fork, merge or rollback), so a caller that keeps its own
    /// connections (fissiled's pool) saves opening one for its first request. `None` if it
    /// was taken already.
    pub fn take_agent(&mut self) -> Option<AgentClient> {
        self.agent.take()
    }

    /// A second connection to the agent (e.g. to interrupt a running cell).
    pub fn connect_agent(&self) -> Result<AgentClient, SandboxError> {
        Ok(AgentClient::connect_hybrid_vsock(
            &self.dir.join("vsock.sock"),
            AGENT_VSOCK_PORT,
        )?)
    }

    /// A client of the VMM's control socket (with [`control::DEFAULT_TIMEOUT`]).
    pub fn control(&self) -> Result<ControlClient, SandboxError> {
        Ok(ControlClient::connect(&self.dir.join("api.sock"))?)
    }

    /// Runs a Python cell in the persistent REPL (within the agent client's exec deadline;
    /// output collected up to its cap).
    pub fn exec(&mut self, code: &str) -> Result<ExecOutcome, SandboxError> {
        Ok(self.agent()?.exec(&ExecRequest {
            code: code.to_string(),
            ..ExecRequest::default()
        })?)
    }

    /// Asks the guest to power off and waits (bounded) for the VMM to exit.
    pub fn poweroff(mut self, timeout: Duration) -> Result<ExitStatus, SandboxError> {
        // The agent answers Ok, then the connection drops as the guest goes down.
        if let Ok(agent) = self.agent() {
            let _ = agent.poweroff();
        }
        self.wait(timeout)
    }

    /// Waits (bounded) for the VMM process to exit; kills it after `timeout`. (An adopted
    /// VMM is not this process's child: its exit is seen but its status is not known, which
    /// is reported as an error.)
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, SandboxError> {
        if let Some(handle) = self.adopted.take() {
            let exited = handle.exited(timeout).unwrap_or(false) || handle.kill(timeout);
            return Err(SandboxError::Wait(if exited {
                "an adopted VMM exited; its status is not known".into()
            } else {
                "an adopted VMM does not exit even after SIGKILL".into()
            }));
        }
        let mut child = self
            .proc
            .take()
            .ok_or_else(|| SandboxError::Wait("already waited".into()))?;
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
        if let Some(mut c) = self.proc.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(handle) = self.adopted.take() {
            handle.kill(Duration::from_secs(10));
        }
    }
}

/// How long a fork took.
#[derive(Debug, Clone)]
pub struct ForkTimings {
    /// The fork request to the parent VMM (the fork snapshot).
    pub vmm_ms: f64,
    /// Starting the children's processes.
    pub spawn_ms: f64,
    /// Until every child's agent answered (and got entropy and the clock).
    pub all_answered_ms: f64,
    /// The fork snapshot.
    pub snapshot: SnapshotReply,
}

/// How long [`Sandbox::reconnect`] keeps trying.
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// The call deadline of one reconnect attempt.
pub const RECONNECT_ATTEMPT: Duration = Duration::from_secs(10);

/// Most bytes [`tail`] reads from the end of a file (a guest writes the console log).
const TAIL_BYTES: u64 = 64 << 10;

/// The last `lines` lines of a text file (empty if unreadable), from its last 64 KiB.
pub fn tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
        let _ = f.take(TAIL_BYTES).read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub use fissile_proto::error_chain;

/// One thread of a process on this host, as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcThread {
    /// Its `/proc/<pid>/task/<tid>` directory.
    pub dir: PathBuf,
    /// Its name (`comm`).
    pub name: String,
    /// Its scheduler state (`R`, `S`, `D`, …).
    pub state: String,
    /// Where it sleeps in the kernel (`wchan`).
    pub wchan: String,
    /// Its system call and arguments, or `running`.
    pub syscall: String,
    /// Its kernel stack (readable by root).
    pub stack: String,
}

/// What the VMM on control socket `api` (process `pid`, if known) says of a VM whose guest
/// does not answer: a line with its state, the lifecycle operation (and step) in progress,
/// its vCPUs' exits one second apart (still: halted or parked; rising: running) and each vCPU
/// thread's kernel state and wait channel, then the VMM's `debug` dump (interrupt path and
/// queues). Bounded: each control call has a deadline (5 s for status, 30 s for the dump).
pub fn diagnose(api: &Path, pid: Option<u32>) -> String {
    let status = || -> Result<VmStatus, ControlError> {
        let mut c = ControlClient::connect(api)?;
        c.set_timeout(Duration::from_secs(5))?;
        c.status()
    };
    let mut out = match status() {
        Ok(a) => {
            std::thread::sleep(Duration::from_secs(1));
            match status() {
                Ok(b) => format!(
                    "state {:?}, busy {:?}, vCPU exits {:?} then {:?} 1 s later",
                    b.state, b.busy, a.vcpu_exits, b.vcpu_exits
                ),
                Err(e) => format!("status answered once, then: {}", error_chain(&e)),
            }
        }
        Err(e) => format!("no status: {}", error_chain(&e)),
    };
    if let Some(pid) = pid {
        out.push_str(&vcpu_threads(pid));
    }
    // The interrupt path and the queues (the VMM pauses the VM for a moment).
    let debug = ControlClient::connect(api)
        .and_then(|mut c| {
            c.set_timeout(Duration::from_secs(30))?;
            c.call(&ControlRequest::Debug)
        })
        .map(|r| r.debug.unwrap_or_default());
    match debug {
        Ok(d) => out.push_str(&format!("\n{}", d.trim_end())),
        Err(e) => out.push_str(&format!("; no debug dump: {}", error_chain(&e))),
    }
    out
}

/// The threads of process `pid` (`None` once it is gone): what each is blocked in.
pub fn proc_threads(pid: u32) -> Option<Vec<ProcThread>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let dir = t.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        out.push(ProcThread {
            name: read("comm").trim().to_string(),
            state,
            wchan: read("wchan").trim().to_string(),
            syscall: read("syscall").trim().to_string(),
            stack: read("stack"),
            dir,
        });
    }
    Some(out)
}

/// `; fissile-vcpu0 R (wchan 0)`, … for each vCPU thread of VMM `pid`.
fn vcpu_threads(pid: u32) -> String {
    let Some(threads) = proc_threads(pid) else {
        return format!("; pid {pid} is gone");
    };
    threads
        .iter()
        .filter(|t| t.name.starts_with("fissile-vcpu"))
        .map(|t| format!("; {} {} (wchan {})", t.name, t.state, t.wchan))
        .collect()
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
        let child = Process::from_child(Command::new("false").spawn().unwrap());
        let spawner = Spawner {
            vmm: "fissile-vmm".into(),
            rootfs: "rootfs".into(),
            snapshotd: None,
            boot_timeout: Duration::from_secs(10),
            cancel: None,
            limits: VmmLimits::default(),
            mem_mib: 512,
            vcpus: 1,
            network: Network::None,
        };
        let vmm = Spawned {
            child,
            cgroup: None,
            netns: None,
            uid: None,
        };

        let err = Sandbox::attach(vmm, dir.path(), spawner, Instant::now(), None).unwrap_err();

        assert!(matches!(err, SandboxError::VmmExited { .. }), "{err}");
        assert!(err.to_string().contains("no kvm"), "{err}");
    }

    /// A start given up while it waits for its guest stops its VMM at once, not at the boot
    /// timeout.
    #[test]
    fn a_cancelled_start_stops_its_vmm_before_the_boot_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("sleep").arg("600").spawn().unwrap();
        let pid = child.id();
        let cancel = Arc::new(AtomicBool::new(false));
        let spawner = Spawner {
            vmm: "fissile-vmm".into(),
            rootfs: "rootfs".into(),
            snapshotd: None,
            boot_timeout: Duration::from_secs(300),
            cancel: Some(Arc::clone(&cancel)),
            limits: VmmLimits::default(),
            mem_mib: 512,
            vcpus: 1,
            network: Network::None,
        };
        let vmm = Spawned {
            child: Process::from_child(child),
            cgroup: None,
            netns: None,
            uid: None,
        };
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            cancel.store(true, Ordering::Release);
        });
        let t = Instant::now();

        let err = Sandbox::attach(vmm, dir.path(), spawner, Instant::now(), None).unwrap_err();

        setter.join().unwrap();
        assert!(matches!(err, SandboxError::Cancelled), "{err}");
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        // Killed and reaped: no process has its pid any more.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the VMM (pid {pid}) still runs"
        );
    }
}
