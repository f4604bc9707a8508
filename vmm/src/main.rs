//! `fissile-vmm`: boots one microVM from flags or a TOML config file, or restores one from a
//! snapshot in snapshotd (`--restore ID --snapshotd SOCK`), or starts ahead of time and
//! restores the snapshot named on its standard input (`--standby`, see
//! [`fissile_proto::control::StandbyRequest`]), and runs it until the guest
//! resets or powers off (exit 0), the control socket asks for shutdown (exit 0), or
//! something fails (exit 1 with the reason). Host problems (no KVM, KVM-PVM) exit 3; a bad
//! configuration exits 2; a page server that dies under a restored VM exits 4; a syscall
//! outside a thread's seccomp filter exits 5 (`fissile_vmm::seccomp`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use fissile_proto::control::{MAX_STANDBY_LINE, STANDBY_READY, StandbyRequest};
use fissile_vmm::api::ApiServer;
use fissile_vmm::restore::{Prepared, restore_into};
use fissile_vmm::seccomp::{self, ThreadClass};
use fissile_vmm::{RestoreConfig, VmConfig, Vmm, VmmBuilder, host, restore};

/// Exit status for "this host cannot run the VM".
const EXIT_HOST: u8 = 3;
/// Exit status for a bad configuration.
const EXIT_CONFIG: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "fissile-vmm",
    version,
    about = "Fissile microVM monitor: one KVM microVM per process"
)]
struct Args {
    /// TOML config file (flags given as well override its values).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Uncompressed ELF vmlinux with a PVH entry point.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Read-only root filesystem image (/dev/vda).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Writable scratch image (/dev/vdb).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long)]
    mem_mib: Option<u64>,
    /// Number of vCPUs.
    #[arg(long)]
    vcpus: Option<u8>,
    /// Extra kernel command line.
    #[arg(long)]
    cmdline_extra: Option<String>,
    /// Root filesystem type (rootfstype=).
    #[arg(long)]
    root_fstype: Option<String>,
    /// Guest init program (init=).
    #[arg(long)]
    init: Option<String>,
    /// Write the guest serial console to this file.
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Write the guest serial console to stderr (when no --serial-log).
    #[arg(long)]
    serial_stderr: bool,
    /// Host unix socket for virtio-vsock (clients write "CONNECT <port>\n").
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Guest vsock CID.
    #[arg(long)]
    guest_cid: Option<u32>,
    /// Control socket (JSON lines: status, pause, resume, shutdown, snapshot, fork, merge,
    /// rollback, persist, memory_hash, trim, debug; see `fissile_proto::control`). Bound once the VM is
    /// built (a restored one: once its state is applied).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Do not add a virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// Add a virtio-net device on this host tap (it must exist and be configured, usually in
    /// the network namespace this VMM runs in). With --restore: required when the snapshot
    /// has a network device.
    #[arg(long, value_name = "TAP")]
    net_tap: Option<String>,
    /// The guest's MAC address (default 06:00:ac:1f:00:02, the same in every sandbox).
    #[arg(long, value_name = "MAC")]
    net_mac: Option<fissile_vmm::config::MacAddr>,
    /// Try to run even if this host's KVM looks unable to boot the guest.
    #[arg(long)]
    force: bool,
    /// snapshotd's socket (needed for snapshot, fork, merge and --restore).
    #[arg(long)]
    snapshotd: Option<PathBuf>,
    /// Restore this snapshot instead of booting (needs --snapshotd; --kernel is not used).
    #[arg(long, value_name = "SNAPSHOT")]
    restore: Option<String>,
    /// With --restore: stay paused (resume through the control socket).
    #[arg(long)]
    start_paused: bool,
    /// Start ahead of time: make the KVM VM and --vcpus vCPUs, write "standby ready" to
    /// stdout, then read one JSON line from stdin naming the snapshot to restore
    /// (`{"snapshot":"<id>"}`; needs --snapshotd, and the other --restore flags as for the
    /// restore itself). End of input exits 0 without restoring.
    #[arg(long, conflicts_with = "restore")]
    standby: bool,
    /// Seccomp filters per thread: `trap` (a syscall outside a thread's list stops the VMM
    /// with the syscall in its log, exit 5), `log` (the kernel logs it and lets it run: for
    /// finding what a new code path needs), `off`.
    #[arg(long, value_enum, default_value = "trap", env = "FISSILE_VMM_SECCOMP")]
    seccomp: seccomp::Mode,
    /// Check the filters and exit: install CLASS's filter (in the --seccomp mode), spawn a
    /// thread, then make a syscall no filter allows (execve); exit 5 if it stopped the VMM.
    #[arg(long, value_enum, value_name = "CLASS", hide = true)]
    seccomp_selftest: Option<ThreadClass>,
}

/// Stack size of this process's threads, under 2 MiB (2 MiB - 64 KiB), so that no thread's
/// stack holds a whole 2 MiB-aligned range. With std's default of exactly 2 MiB, a stack laid
/// out right below guest RAM (mapped 2 MiB-aligned) is such a range, and on a host with
/// transparent huge pages `always` its first touch takes a 2 MiB huge page: in the lab that
/// was 2 MiB of each idle fork child's 4.6 MiB of private memory.
const THREAD_STACK_BYTES: &str = "2031616";

fn main() -> ExitCode {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: this is main's first statement: no other thread exists yet to read the
        // environment while it changes. std reads the variable at the first spawn.
        unsafe { std::env::set_var("RUST_MIN_STACK", THREAD_STACK_BYTES) };
    }
    tracing_subscriber::fmt()
        .with_writer(fissile_vmm::logcap::CappedLog::stderr())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let raw_args: Vec<String> = std::env::args().skip(1).collect();
    let args = Args::parse();
    // A jailed VMM is its pid namespace's first process: without handlers it would ignore
    // an interrupt of its orchestrator's process group.
    if let Err(e) = fissile_proto::signals::exit_on_termination_signals() {
        eprintln!("fissile-vmm: handling termination signals: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = seccomp::init(args.seccomp) {
        eprintln!("fissile-vmm: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(class) = args.seccomp_selftest {
        return seccomp_selftest(class);
    }

    if !args.force
        && let Err(e) = host::check_kvm(&raw_args)
    {
        eprintln!("fissile-vmm: {e}");
        return ExitCode::from(EXIT_HOST);
    }
    let mut api_sock = args.api_sock.clone();
    let built = if args.standby {
        match standby(&args) {
            Ok(Some(vmm)) => Ok(vmm),
            Ok(None) => {
                tracing::info!("standby: released without a request");
                return ExitCode::SUCCESS;
            }
            Err(StandbyError::Config(e)) => {
                eprintln!("fissile-vmm: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(StandbyError::Restore(e)) => Err(anyhow::Error::from(e)),
        }
    } else if let Some(snapshot) = args.restore.clone() {
        let Some(snapshotd) = args.snapshotd.clone() else {
            eprintln!("fissile-vmm: --restore needs --snapshotd");
            return ExitCode::from(EXIT_CONFIG);
        };
        restore(restore_config(
            &args,
            snapshot,
            snapshotd,
            args.start_paused,
        ))
        .map_err(anyhow::Error::from)
    } else {
        let config = match config_from_args(args) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("fissile-vmm: {e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        api_sock = config.api_sock.clone();
        VmmBuilder::new(config).build().map_err(anyhow::Error::from)
    };
    let vmm = match built {
        Ok(v) => v,
        Err(e) => {
            eprintln!("fissile-vmm: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let api = match &api_sock {
        Some(path) => match ApiServer::start(path, Arc::new(vmm.handle())) {
            Ok(api) => Some(api),
            Err(e) => {
                eprintln!("fissile-vmm: {e:#}");
                vmm.shutdown();
                let _ = vmm.wait();
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    tracing::info!(
        ms = process_uptime_ms(),
        "VM built and vCPUs running (time since process start)"
    );
    seccomp::enter(ThreadClass::Main);
    let exit = vmm.wait();
    if let Some(api) = api {
        api.stop();
    }
    eprintln!("fissile-vmm: {exit}");
    if exit.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Why a standby did not become a VM.
#[derive(Debug, thiserror::Error)]
enum StandbyError {
    /// Its flags or its request.
    #[error("standby: {0}")]
    Config(String),
    /// Making the VM, or the restore.
    #[error(transparent)]
    Restore(#[from] fissile_vmm::RestoreError),
}

/// `--standby`: makes the VM and vCPUs, says so on stdout, then waits for the request on
/// stdin and restores it. `None`: the input ended first.
fn standby(args: &Args) -> Result<Option<Vmm>, StandbyError> {
    use std::io::{BufRead, Read, Write};
    let Some(snapshotd) = args.snapshotd.clone() else {
        return Err(StandbyError::Config("--standby needs --snapshotd".into()));
    };
    let prepared = Prepared::new(args.vcpus.unwrap_or(1))?;
    tracing::info!(
        vm_ms = prepared.took.as_secs_f64() * 1e3,
        uptime_ms = process_uptime_ms(),
        "standby: VM made, waiting for a snapshot"
    );
    // Nobody listening (stdout not a pipe, or closed) is no reason not to wait.
    let mut out = std::io::stdout().lock();
    let _ = out
        .write_all(STANDBY_READY.as_bytes())
        .and_then(|()| out.flush());
    drop(out);
    let mut line = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_STANDBY_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| StandbyError::Config(format!("reading the request: {e}")))?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(StandbyError::Config(if line.len() > MAX_STANDBY_LINE {
            format!("the request is longer than {MAX_STANDBY_LINE} bytes")
        } else {
            "the input ended inside the request line".into()
        }));
    }
    let request: StandbyRequest = serde_json::from_slice(&line)
        .map_err(|e| StandbyError::Config(format!("bad request: {e}")))?;
    tracing::info!(snapshot = %request.snapshot, "standby: restoring");
    let start_paused = request.start_paused || args.start_paused;
    let cfg = restore_config(args, request.snapshot, snapshotd, start_paused);
    Ok(Some(restore_into(cfg, Some(prepared))?))
}

/// What `--restore` and `--standby` restore with: `snapshot` from `snapshotd`, into this
/// process's sockets and logs as the flags name them.
fn restore_config(
    args: &Args,
    snapshot: String,
    snapshotd: PathBuf,
    start_paused: bool,
) -> RestoreConfig {
    RestoreConfig {
        snapshot,
        snapshotd,
        rootfs: args.rootfs.clone(),
        vsock_uds: args.vsock_uds.clone(),
        net_tap: args.net_tap.clone(),
        serial_log: args.serial_log.clone(),
        serial_stderr: args.serial_stderr,
        start_paused,
    }
}

/// `--seccomp-selftest`: what the filters allow still works (stderr, a thread through the
/// clone3 → clone fallback), and what none allows stops the process.
fn seccomp_selftest(class: ThreadClass) -> ExitCode {
    // As in a real run, a thread has started before any filter (glibc installs its SIGCANCEL
    // handler at the first pthread_create, and no filter allows rt_sigaction).
    let _ = std::thread::spawn(|| ()).join();
    seccomp::enter(class);
    eprintln!("fissile-vmm: {} filter installed", class.name());
    if matches!(class, ThreadClass::Vmm | ThreadClass::Api) {
        match std::thread::Builder::new().spawn(|| 42).map(|t| t.join()) {
            Ok(Ok(42)) => eprintln!("fissile-vmm: a thread started and joined"),
            other => {
                eprintln!("fissile-vmm: could not start a thread: {other:?}");
                return ExitCode::FAILURE;
            }
        }
    }
    let path = c"/nonexistent-fissile-selftest";
    let argv = [path.as_ptr(), std::ptr::null()];
    // SAFETY: execve with a NUL-terminated path and argv; envp may be null on Linux. The path
    // does not exist, so an allowed execve fails with ENOENT and returns.
    let rc = unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), std::ptr::null()) };
    eprintln!(
        "fissile-vmm: execve was not stopped (returned {rc}: {})",
        std::io::Error::last_os_error()
    );
    ExitCode::SUCCESS
}

/// Milliseconds since this process started (from /proc/self/stat and the boot clock).
fn process_uptime_ms() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    // Field 22 (starttime, in clock ticks since boot) comes after the `(comm)` field.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let Some(start_ticks) = rest
        .split_whitespace()
        .nth(19)
        .and_then(|t| t.parse::<u64>().ok())
    else {
        return 0;
    };
    let uptime_s = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ((uptime_s - start_ticks as f64 / hz) * 1000.0).max(0.0) as u64
}

fn config_from_args(args: Args) -> anyhow::Result<VmConfig> {
    let mut config = match &args.config {
        Some(path) => VmConfig::from_toml_file(path)?,
        None => VmConfig::new(
            args.kernel
                .clone()
                .context("missing --kernel (or --config)")?,
            args.rootfs
                .clone()
                .context("missing --rootfs (or --config)")?,
        ),
    };
    if let Some(v) = args.kernel {
        config.kernel = v;
    }
    if let Some(v) = args.rootfs {
        config.rootfs = v;
    }
    if args.scratch.is_some() {
        config.scratch = args.scratch;
    }
    if let Some(v) = args.mem_mib {
        config.mem_mib = v;
    }
    if let Some(v) = args.vcpus {
        config.vcpus = v;
    }
    if let Some(v) = args.cmdline_extra {
        config.cmdline_extra = v;
    }
    if let Some(v) = args.root_fstype {
        config.root_fstype = v;
    }
    if let Some(v) = args.init {
        config.init = v;
    }
    if args.serial_log.is_some() {
        config.serial_log = args.serial_log;
    }
    config.serial_stderr |= args.serial_stderr;
    if args.vsock_uds.is_some() {
        config.vsock_uds = args.vsock_uds;
    }
    if let Some(v) = args.guest_cid {
        config.guest_cid = v;
    }
    if args.api_sock.is_some() {
        config.api_sock = args.api_sock;
    }
    if args.no_rng {
        config.rng = false;
    }
    if args.net_tap.is_some() {
        config.net_tap = args.net_tap;
    }
    if let Some(mac) = args.net_mac {
        config.net_mac = mac;
    }
    if args.snapshotd.is_some() {
        config.snapshotd = args.snapshotd;
    }
    config.validate()?;
    Ok(config)
}
