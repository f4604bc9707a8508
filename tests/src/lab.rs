//! The lab: real KVM on hosts whose own KVM cannot boot our guest.
//!
//! On this project's build hosts `/dev/kvm` is KVM-PVM, which only runs PVM-patched guest
//! kernels. The lab is a QEMU TCG virtual machine with an emulated AMD SVM CPU (`-cpu EPYC
//! -smp 1`; two CPUs with `FISSILE_LAB_SMP=2`, for experiments only) running Debian's own
//! kernel with `kvm_amd nested=1 npt=1`, so inside it `/dev/kvm` is a real (nested) KVM
//! that boots our microVM guest.
//!
//! A lab run boots QEMU with:
//! * `-kernel`: Debian's `linux-image-amd64` vmlinuz from the host's `/boot`;
//! * `-initrd`: a tiny busybox initramfs with the modules the lab needs (cached by hash);
//! * disk 1 (`/dev/vda` in the lab): the guest root image, read-only, which our VMM inside
//!   the lab hands to its guest as the guest's `/dev/vda`;
//! * disk 2 (`/dev/vdb`, mounted at `/lab`): the payload, an ext4 image written with
//!   `mkfs.ext4 -d` holding our binaries and their shared libraries, the guest kernel, QEMU
//!   (the baseline VMM for benchmarks) and the command to run.
//!
//! The command's output comes back over the lab's serial console between two marker lines,
//! followed by its exit status. Inside the lab the command sees the same environment it
//! would see natively: `FISSILE_GUEST_KERNEL`, `FISSILE_GUEST_ROOTFS`, our binaries on
//! `PATH`, scratch space in `/tmp` (tmpfs).
//!
//! When the host's own KVM can boot a standard guest (VT-x/SVM, not PVM), [`Lab::run`]
//! runs the command natively with that same environment instead.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The lab kernel's command line, plus `FISSILE_LAB_APPEND` (e.g. `audit=1`, so seccomp's
/// `log` mode reports to the lab's `dmesg`).
fn lab_cmdline() -> String {
    let mut cmdline = String::from("console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init");
    if let Some(extra) = std::env::var_os("FISSILE_LAB_APPEND") {
        cmdline.push(' ');
        cmdline.push_str(&extra.to_string_lossy());
    }
    cmdline
}

/// Marker printed right before the command runs.
const BEGIN: &str = "@@FISSILE-LAB-BEGIN@@";
/// Marker printed after the command, followed by its exit status.
const EXIT: &str = "@@FISSILE-LAB-EXIT";
/// Bumped whenever the initramfs layout or init script changes.
const INITRAMFS_FORMAT: u32 = 9;
/// How often the lab writes its uptime to its second serial port (the heartbeat).
const HEARTBEAT_EVERY_S: u32 = 15;
/// A lab whose heartbeat stopped this long ago is frozen (its kernel no longer runs its
/// timers: seen with QEMU's TCG and nested SVM), as opposed to a command that is slow.
const FROZEN_AFTER: Duration = Duration::from_secs(240);

/// Our binaries copied into the lab (those that exist are taken).
pub const LAB_BINARIES: &[&str] = &[
    "fissile-vmm",
    "fissile-agent",
    "fissile-snapshotd",
    "fissile",
    "fissiled",
    "boot_bench",
    "net_bench",
    "net_setup",
    "agent_rtt",
    "lifecycle_bench",
    "soak",
    "http_bench",
];

/// Modules loaded in the lab, in request order; dependencies come from `modules.dep`.
const LAB_MODULES: &[(&str, &str)] = &[
    ("virtio_pci", ""),
    ("virtio_blk", ""),
    ("crc32c_generic", ""),
    ("ext4", ""),
    ("kvm", ""),
    ("kvm-amd", "nested=1 npt=1"),
    ("vsock", ""),
    ("vhost_vsock", ""),
    // For `fissile-lab serve`: a NIC on QEMU user networking (restricted: nothing in the
    // lab reaches outside it) whose only use is a port forwarded from the host's loopback.
    ("virtio_net", ""),
    // The host end of a guest's network: its tap, and (per-sandbox namespaces) veth pairs.
    ("tun", ""),
    ("veth", ""),
    // A routed sandbox's namespace: NAT and its egress policy (nftables).
    ("nf_tables", ""),
    ("nft_ct", ""),
    ("nft_chain_nat", ""),
    ("nft_masq", ""),
    // A policy that names domains redirects HTTP and TLS to the proxy on the gateway.
    ("nft_redir", ""),
    // The daemon's per-sandbox caps: a connection count and a shared rate limit each way.
    ("nft_connlimit", ""),
    ("nft_limit", ""),
    ("nft_reject_ipv4", ""),
    ("nft_objref", ""),
];

/// Errors preparing or running the lab; each names the failing step.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A required artifact is missing.
    #[error("{what} not found at {path}: {hint}")]
    Missing {
        /// What is missing.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        hint: &'static str,
    },
    /// Building an artifact (kernel, image, payload, initramfs) failed.
    #[error("building {what} failed: {detail}")]
    Build {
        /// The artifact.
        what: &'static str,
        /// Command output tail.
        detail: String,
    },
    /// A filesystem or process operation failed.
    #[error("{0}")]
    Io(String, #[source] io::Error),
    /// An environment variable has a value the lab does not take.
    #[error("{name}={value:?}: {expected}")]
    Setting {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What it may be.
        expected: &'static str,
    },
    /// The lab did not finish in time.
    #[error("lab run timed out after {secs} s; console tail:\n{tail}")]
    Timeout {
        /// The timeout.
        secs: u64,
        /// The last console lines.
        tail: String,
    },
    /// The lab itself stopped: its heartbeat (a line every [`HEARTBEAT_EVERY_S`] from its
    /// init, whatever the command does) has not come for [`FROZEN_AFTER`]. Not a verdict on
    /// the command: the same command may pass in a fresh lab.
    #[error(
        "the lab froze: no heartbeat for {silent_secs} s (last: lab uptime {last_beat}); \
         QEMU's view of its vCPU:\n{monitor}\nconsole tail:\n{tail}"
    )]
    Frozen {
        /// Seconds since the last heartbeat.
        silent_secs: u64,
        /// The last heartbeat (the lab's `/proc/uptime`).
        last_beat: String,
        /// `info registers`, `info lapic` and `info pic` from QEMU's monitor, if it answered.
        monitor: String,
        /// The last console lines.
        tail: String,
        /// What the command printed before the lab froze.
        output: String,
    },
    /// The lab ended without reporting the command's exit status.
    #[error(
        "lab ended without an exit marker (lab kernel crash or early poweroff); console tail:\n{tail}"
    )]
    NoExitMarker {
        /// The last console lines.
        tail: String,
    },
}

/// A lab run's directory (its payload image, ~600 MiB) in the temporary directory.
const RUN_DIR_PREFIX: &str = "fissile-lab-";
/// The file in a run directory naming the process that made it.
const RUN_DIR_OWNER: &str = "owner.pid";

/// Removes the run directories in `tmp` whose process is gone: a run that was killed (a
/// `fissile-lab serve` stopped by its test, a timed-out suite) never removes its own, and a
/// few dozen fill a disk. One without an owner file (made before there was one) goes once it
/// is an hour old.
fn sweep_run_dirs(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(RUN_DIR_PREFIX) {
            continue;
        }
        let dir = e.path();
        let stale = match fs::read_to_string(dir.join(RUN_DIR_OWNER)) {
            Ok(pid) => pid
                .trim()
                .parse::<u32>()
                .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()),
            Err(_) => e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(3600)),
        };
        if stale {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LabError {
    let what = what.into();
    move |e| LabError::Io(what, e)
}

/// Output of one lab run.
#[derive(Debug, Clone)]
pub struct LabOutput {
    /// What the command printed (stdout and stderr interleaved, as on the console).
    pub output: String,
    /// The command's exit status.
    pub status: i32,
    /// Wall time from QEMU start to the exit marker.
    pub wall: Duration,
    /// True when the command ran natively (host KVM usable), not in the lab.
    pub native: bool,
}

impl LabOutput {
    /// Panics with the full output unless the command exited 0 (for tests).
    pub fn assert_success(&self) -> &Self {
        assert_eq!(
            self.status, 0,
            "lab command failed; output:\n{}",
            self.output
        );
        self
    }
}

/// Where the lab's inputs are.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Cache root (`$FISSILE_CACHE` or `/var/cache/fissile`).
    pub cache: PathBuf,
    /// The guest kernel (`vmlinux` with a PVH note).
    pub guest_kernel: PathBuf,
    /// The guest root image.
    pub guest_rootfs: PathBuf,
    /// Directory holding our release binaries.
    pub bin_dir: PathBuf,
    /// Lab memory in MiB.
    pub mem_mib: u32,
    /// Lab CPUs: 1, or 2 with `FISSILE_LAB_SMP=2`, for experiments only (with two, QEMU's
    /// TCG emulation of SVM kills a nested guest now and then and, in runs over a minute, the
    /// lab kernel itself: see ARCHITECTURE.md's lab section). No effect where the command
    /// runs natively.
    pub cpus: u8,
    /// Echo the lab console to stderr while it runs.
    pub verbose: bool,
    /// Print the command's own output to stdout as it arrives (the whole output is still
    /// returned in [`LabOutput`]).
    pub stream_output: bool,
    /// TCP ports forwarded from the host's loopback into the lab, `(host, lab)`: QEMU user
    /// networking with `restrict=on` (the lab reaches nothing outside it) and each
    /// `hostfwd` bound to 127.0.0.1. In the lab the NIC is `eth0`, 10.0.2.15/24.
    pub forward: Vec<(u16, u16)>,
}

/// True when this host's `/dev/kvm` can boot a standard guest (VT-x/SVM present, not PVM).
pub fn host_kvm_usable() -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "svm" || f == "vmx"));
    hw && !host_kvm_is_pvm()
}

/// True when the host kernel is built with KVM-PVM (`CONFIG_KVM_PVM=y`).
pub fn host_kvm_is_pvm() -> bool {
    Command::new("sh")
        .args([
            "-c",
            "zcat /proc/config.gz 2>/dev/null | grep -q '^CONFIG_KVM_PVM=y'",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The repository root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// The cache root: `$FISSILE_CACHE` or `/var/cache/fissile`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("FISSILE_CACHE")
        .map(Into::into)
        .unwrap_or_else(|| "/var/cache/fissile".into())
}

/// Directory of our release binaries: `$FISSILE_BIN_DIR`, else `$CARGO_TARGET_DIR/release`,
/// else next to the running executable (`target/release/deps/..` → `target/release`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FISSILE_BIN_DIR") {
        return d.into();
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t).join("release");
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

impl LabConfig {
    /// Locates (building when needed, all cached) the guest kernel and image.
    ///
    /// `FISSILE_GUEST_KERNEL` / `FISSILE_GUEST_ROOTFS` override the builds.
    pub fn from_env() -> Result<LabConfig, LabError> {
        let cpus = lab_cpus(std::env::var_os("FISSILE_LAB_SMP").as_deref())?;
        let cache = cache_root();
        let bin_dir = bin_dir();
        let guest_kernel = match std::env::var_os("FISSILE_GUEST_KERNEL") {
            Some(p) => p.into(),
            None => run_for_path(
                Command::new(repo_root().join("kernel/build.sh")).env("FISSILE_CACHE", &cache),
                "guest kernel",
            )?,
        };
        let guest_rootfs = match std::env::var_os("FISSILE_GUEST_ROOTFS") {
            Some(p) => p.into(),
            None => {
                let tool = bin_dir.join("fissile-rootfs");
                if !tool.exists() {
                    return Err(LabError::Missing {
                        what: "fissile-rootfs",
                        path: tool,
                        hint: "run `cargo build --release --workspace --bins` first",
                    });
                }
                run_for_path(
                    Command::new(tool)
                        .args(["build", "--template", "python-datasci", "--agent"])
                        .arg(bin_dir.join("fissile-agent"))
                        .arg("--cache")
                        .arg(&cache),
                    "guest root image",
                )?
            }
        };
        Ok(LabConfig {
            cache,
            guest_kernel,
            guest_rootfs,
            bin_dir,
            mem_mib: 3072,
            cpus,
            verbose: std::env::var_os("FISSILE_LAB_VERBOSE").is_some(),
            stream_output: false,
            forward: Vec::new(),
        })
    }
}

/// The lab's CPUs from `FISSILE_LAB_SMP`'s value: 1 when unset, else 1 or 2.
fn lab_cpus(value: Option<&std::ffi::OsStr>) -> Result<u8, LabError> {
    match value {
        None => Ok(1),
        Some(v) if v == "1" => Ok(1),
        Some(v) if v == "2" => Ok(2),
        Some(v) => Err(LabError::Setting {
            name: "FISSILE_LAB_SMP",
            value: v.to_string_lossy().into_owned(),
            expected: "1 (the default) or 2",
        }),
    }
}

fn run_for_path(cmd: &mut Command, what: &'static str) -> Result<PathBuf, LabError> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(io_err(format!("spawn builder for {what}")))?;
    if !out.status.success() {
        return Err(LabError::Build {
            what,
            detail: format!("{}", out.status),
        });
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_owned();
    Ok(PathBuf::from(path))
}

/// A prepared lab: boot files built and cached, ready to run commands.
#[derive(Debug)]
pub struct Lab {
    cfg: LabConfig,
    native: bool,
    lab_kernel: PathBuf,
    initramfs: PathBuf,
}

impl Lab {
    /// Prepares the lab (or native mode when the host KVM is usable).
    pub fn prepare(cfg: LabConfig) -> Result<Lab, LabError> {
        for (what, path) in [
            ("guest kernel", &cfg.guest_kernel),
            ("guest root image", &cfg.guest_rootfs),
        ] {
            if !path.exists() {
                return Err(LabError::Missing {
                    what,
                    path: path.clone(),
                    hint: "see README",
                });
            }
        }
        if host_kvm_usable() || std::env::var_os("FISSILE_IN_LAB").is_some() {
            return Ok(Lab {
                cfg,
                native: true,
                lab_kernel: PathBuf::new(),
                initramfs: PathBuf::new(),
            });
        }
        let (lab_kernel, modules_dir) = find_lab_kernel()?;
        let initramfs = build_initramfs(&cfg.cache, &modules_dir)?;
        Ok(Lab {
            cfg,
            native: false,
            lab_kernel,
            initramfs,
        })
    }

    /// True when commands run natively rather than in the lab.
    pub fn is_native(&self) -> bool {
        self.native
    }

    /// Runs a shell script (busybox sh in the lab, /bin/sh natively) and returns its output.
    pub fn run(&self, script: &str, timeout: Duration) -> Result<LabOutput, LabError> {
        self.run_with(script, &[], timeout)
    }

    /// Like [`Lab::run`], with `extra` programs `(source, name)` on the command's `PATH` as
    /// `name` (their shared libraries come along). Natively they are linked into a temporary
    /// directory put first on `PATH`.
    pub fn run_with(
        &self,
        script: &str,
        extra: &[(PathBuf, String)],
        timeout: Duration,
    ) -> Result<LabOutput, LabError> {
        if self.native {
            return self.run_native(script, extra, timeout);
        }
        sweep_run_dirs(&std::env::temp_dir());
        let run_dir = tempfile::Builder::new()
            .prefix(RUN_DIR_PREFIX)
            .tempdir()
            .map_err(io_err("create run dir"))?;
        fs::write(
            run_dir.path().join(RUN_DIR_OWNER),
            std::process::id().to_string(),
        )
        .map_err(io_err("write the run dir's owner"))?;
        let payload = build_payload(&self.cfg, run_dir.path(), script, extra)?;
        let heartbeat = run_dir.path().join("heartbeat");
        let monitor = run_dir.path().join("monitor.sock");
        let smp = self.cfg.cpus.to_string();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "EPYC", "-smp", &smp])
            .args(["-m", &format!("{}M", self.cfg.mem_mib)])
            .args(["-machine", "q35", "-nodefaults", "-nographic", "-no-reboot"])
            .args(["-serial", "stdio", "-serial"])
            .arg(format!("file:{}", heartbeat.display()))
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            .arg("-kernel")
            .arg(&self.lab_kernel)
            .arg("-initrd")
            .arg(&self.initramfs)
            .arg("-append")
            .arg(lab_cmdline())
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,readonly=on,cache=unsafe",
                self.cfg.guest_rootfs.display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,cache=unsafe",
                payload.display()
            ));
        if !self.cfg.forward.is_empty() {
            let fwd: String = self
                .cfg
                .forward
                .iter()
                .map(|(host, lab)| format!(",hostfwd=tcp:127.0.0.1:{host}-:{lab}"))
                .collect();
            cmd.args(["-netdev", &format!("user,id=lab0,restrict=on{fwd}")])
                .args(["-device", "virtio-net-pci,netdev=lab0"]);
        }
        run_qemu(
            cmd,
            timeout,
            (&heartbeat, &monitor),
            self.cfg.verbose,
            self.cfg.stream_output,
        )
    }

    fn run_native(
        &self,
        script: &str,
        extra: &[(PathBuf, String)],
        timeout: Duration,
    ) -> Result<LabOutput, LabError> {
        let start = Instant::now();
        let extra_dir = tempfile::Builder::new()
            .prefix("fissile-native-")
            .tempdir()
            .map_err(io_err("create native bin dir"))?;
        for (src, name) in extra {
            std::os::unix::fs::symlink(src, extra_dir.path().join(name))
                .map_err(io_err(format!("link {}", src.display())))?;
        }
        let mut cmd = Command::new("timeout");
        cmd.arg(timeout.as_secs().to_string())
            .args(["sh", "-c", script])
            .env("FISSILE_GUEST_KERNEL", &self.cfg.guest_kernel)
            .env("FISSILE_GUEST_ROOTFS", &self.cfg.guest_rootfs)
            .env("FISSILE_BIN_DIR", &self.cfg.bin_dir)
            .env(
                "PATH",
                format!(
                    "{}:{}:{}",
                    extra_dir.path().display(),
                    self.cfg.bin_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            );
        let out = cmd.output().map_err(io_err("run natively"))?;
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok(LabOutput {
            output,
            status: out.status.code().unwrap_or(-1),
            wall: start.elapsed(),
            native: true,
        })
    }
}

/// Finds Debian's kernel and its modules on the host (package `linux-image-amd64`).
fn find_lab_kernel() -> Result<(PathBuf, PathBuf), LabError> {
    let mut kernels: Vec<PathBuf> = fs::read_dir("/boot")
        .map_err(io_err("read /boot"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-amd64"))
        })
        .collect();
    kernels.sort();
    for k in kernels.into_iter().rev() {
        let ver = k
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .trim_start_matches("vmlinuz-")
            .to_owned();
        let modules = PathBuf::from("/lib/modules").join(&ver);
        if modules.join("modules.dep").exists() {
            return Ok((k, modules));
        }
    }
    Err(LabError::Missing {
        what: "lab kernel (Debian vmlinuz with modules)",
        path: "/boot".into(),
        hint: "apt-get install linux-image-amd64",
    })
}

/// Resolves `LAB_MODULES` with `modules.dep` into load order (dependencies first).
fn module_load_order(modules_dir: &Path) -> Result<Vec<(String, String)>, LabError> {
    let dep_path = modules_dir.join("modules.dep");
    let deps =
        fs::read_to_string(&dep_path).map_err(io_err(format!("read {}", dep_path.display())))?;
    let lookup = |name: &str| -> Option<(String, Vec<String>)> {
        let norm = name.replace('-', "_");
        deps.lines().find_map(|l| {
            let (path, rest) = l.split_once(':')?;
            let file = Path::new(path).file_name()?.to_str()?;
            let stem = file.split(".ko").next()?.replace('-', "_");
            (stem == norm).then(|| {
                (
                    path.to_owned(),
                    rest.split_whitespace().map(str::to_owned).collect(),
                )
            })
        })
    };
    let mut order: Vec<(String, String)> = Vec::new();
    let mut seen = BTreeSet::new();
    for (name, params) in LAB_MODULES {
        let (path, mod_deps) = lookup(name).ok_or_else(|| LabError::Missing {
            what: "kernel module",
            path: modules_dir.join(name),
            hint: "the Debian kernel should ship it",
        })?;
        // modules.dep lists transitive dependencies, deepest last.
        for d in mod_deps.iter().rev().chain(std::iter::once(&path)) {
            if seen.insert(d.clone()) {
                let p = if d == &path {
                    (*params).to_owned()
                } else {
                    String::new()
                };
                order.push((d.clone(), p));
            }
        }
    }
    Ok(order)
}

/// The lab's /init: mount, load modules, mount the payload, run the command, report, power off.
fn init_script(modules: &[(String, String)]) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm /tmp /lab /lib64
mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /tmp
mount -t tmpfs shm /dev/shm
# cgroup v2, as on a Fissile host: every VMM gets a cgroup of its own (fissile-sandbox limits).
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo 'lab: cannot mount cgroup2'
# debugfs: KVM's counters (/sys/kernel/debug/kvm), which benchmarks print beside their times.
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
dmesg -n 1
# The heartbeat, on the second serial port (not the console the command's output is on): the
# host tells a frozen lab from a slow command by it.
( while :; do cat /proc/uptime; sleep @@HEARTBEAT@@; done > /dev/ttyS1 ) 2>/dev/null &
# Loopback, for daemons and clients inside the lab (fissiled's API tests).
ip link set lo up || ifconfig lo 127.0.0.1 up
"#,
    )
    .replace("@@HEARTBEAT@@", &HEARTBEAT_EVERY_S.to_string());
    for (path, params) in modules {
        let file = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("");
        s.push_str(&format!(
            "insmod /modules/{file} {params} || echo 'lab: insmod {file} failed'\n"
        ));
    }
    s.push_str(
        r#"# The NIC of `fissile-lab serve` (QEMU user networking, restricted), if there is one.
if [ -e /sys/class/net/eth0 ]; then
  ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || echo 'lab: eth0 setup failed'
fi
i=0; while [ ! -b /dev/vdb ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 /dev/vdb /lab || { echo 'lab: cannot mount payload'; ls /dev; cat /proc/modules; dmesg | tail -20; }
ln -sf /lab/lib/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
export LD_LIBRARY_PATH=/lab/lib
export PATH=/lab/bin:/bin
export HOME=/tmp TMPDIR=/tmp FISSILE_IN_LAB=1 FISSILE_CACHE=/tmp/cache
export FISSILE_GUEST_KERNEL=/lab/vmlinux FISSILE_GUEST_ROOTFS=/dev/vda FISSILE_BIN_DIR=/lab/bin
[ -e /dev/kvm ] || echo 'lab: no /dev/kvm'
# Huge pages for shmem (fissile-vmm's memfd guest RAM), as a Fissile host should have them.
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null
cd /tmp
echo @@FISSILE-LAB-BEGIN@@
sh /lab/cmd.sh 2>&1
echo "@@FISSILE-LAB-EXIT $?@@"
sync
poweroff -f
"#,
    );
    s
}

/// Builds (or reuses) the lab initramfs: busybox, the modules, /init.
fn build_initramfs(cache: &Path, modules_dir: &Path) -> Result<PathBuf, LabError> {
    let busybox = PathBuf::from("/bin/busybox");
    if !busybox.exists() {
        return Err(LabError::Missing {
            what: "busybox",
            path: busybox,
            hint: "apt-get install busybox-static",
        });
    }
    let modules = module_load_order(modules_dir)?;
    let init = init_script(&modules);
    let mut h = blake3::Hasher::new();
    h.update(&INITRAMFS_FORMAT.to_le_bytes());
    h.update(init.as_bytes());
    h.update(&fs::read(&busybox).map_err(io_err("read busybox"))?);
    for (m, _) in &modules {
        h.update(&fs::read(modules_dir.join(m)).map_err(io_err(format!("read module {m}")))?);
    }
    let key = &h.finalize().to_hex()[..16];
    let dir = cache.join("lab");
    let out = dir.join(format!("initramfs-{key}.cpio.gz"));
    if out.exists() {
        return Ok(out);
    }
    let stage = dir.join(format!("initramfs-{key}.d"));
    let _ = fs::remove_dir_all(&stage);
    for d in [
        "bin", "modules", "proc", "sys", "dev", "tmp", "lab", "lib64",
    ] {
        fs::create_dir_all(stage.join(d)).map_err(io_err("create initramfs dirs"))?;
    }
    fs::copy(&busybox, stage.join("bin/busybox")).map_err(io_err("copy busybox"))?;
    for (m, _) in &modules {
        let name = Path::new(m).file_name().unwrap_or_default();
        fs::copy(modules_dir.join(m), stage.join("modules").join(name))
            .map_err(io_err(format!("copy {m}")))?;
    }
    write_exec(&stage.join("init"), &init)?;
    let tmp = out.with_extension("tmp");
    let script = format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        stage.display(),
        tmp.display()
    );
    let st = Command::new("sh")
        .args(["-c", &script])
        .status()
        .map_err(io_err("run cpio"))?;
    if !st.success() {
        return Err(LabError::Build {
            what: "lab initramfs",
            detail: format!("cpio|gzip: {st}"),
        });
    }
    fs::rename(&tmp, &out).map_err(io_err("rename initramfs"))?;
    let _ = fs::remove_dir_all(&stage);
    Ok(out)
}

fn write_exec(path: &Path, text: &str) -> Result<(), LabError> {
    fs::write(path, text).map_err(io_err(format!("write {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(io_err(format!("chmod {}", path.display())))
}

/// Builds the payload disk for one run: binaries + shared libs + guest kernel + QEMU + cmd.
fn build_payload(
    cfg: &LabConfig,
    run_dir: &Path,
    script: &str,
    extra: &[(PathBuf, String)],
) -> Result<PathBuf, LabError> {
    let root = run_dir.join("payload");
    for d in ["bin", "lib", "share"] {
        fs::create_dir_all(root.join(d)).map_err(io_err("create payload dirs"))?;
    }
    let mut binaries: Vec<PathBuf> = LAB_BINARIES
        .iter()
        .map(|b| cfg.bin_dir.join(b))
        .filter(|p| p.exists())
        .collect();
    // nft applies a routed sandbox's NAT and egress rules (the nftables package).
    if let Some(nft) = which("nft")
        .ok()
        .or_else(|| Some(PathBuf::from("/usr/sbin/nft")).filter(|p| p.is_file()))
    {
        binaries.push(nft);
    }
    // QEMU is the baseline VMM for benchmarks; its data dir provides the microvm firmware.
    if let Ok(qemu) = which("qemu-system-x86_64") {
        binaries.push(qemu);
        let share = root.join("share/qemu");
        fs::create_dir_all(&share).map_err(io_err("create share/qemu"))?;
        for f in [
            "qboot.rom",
            "bios-microvm.bin",
            "bios-256k.bin",
            "linuxboot_dma.bin",
            "pvh.bin",
        ] {
            let src = Path::new("/usr/share/qemu").join(f);
            if let Ok(real) = fs::canonicalize(&src) {
                let _ = fs::copy(real, share.join(f));
            }
        }
    }
    let mut libs = BTreeSet::new();
    for b in &binaries {
        let name = b.file_name().unwrap_or_default();
        fs::copy(b, root.join("bin").join(name))
            .map_err(io_err(format!("copy {}", b.display())))?;
        libs.extend(shared_libs(b)?);
    }
    for (src, name) in extra {
        fs::copy(src, root.join("bin").join(name))
            .map_err(io_err(format!("copy {}", src.display())))?;
        libs.extend(shared_libs(src)?);
    }
    for lib in libs {
        let name = lib.file_name().unwrap_or_default().to_owned();
        let real = fs::canonicalize(&lib).map_err(io_err(format!("resolve {}", lib.display())))?;
        fs::copy(&real, root.join("lib").join(name))
            .map_err(io_err(format!("copy {}", lib.display())))?;
    }
    fs::copy(&cfg.guest_kernel, root.join("vmlinux")).map_err(io_err("copy guest kernel"))?;
    write_exec(&root.join("cmd.sh"), script)?;
    let (bytes, _) = dir_size(&root).map_err(io_err("measure payload"))?;
    let img = run_dir.join("payload.ext4");
    let size_mib = bytes / (1 << 20) * 12 / 10 + 32;
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(&root)
        .arg(&img)
        .arg(format!("{size_mib}M"))
        .output()
        .map_err(io_err("run mkfs.ext4"))?;
    if !out.status.success() {
        return Err(LabError::Build {
            what: "lab payload",
            detail: String::from_utf8_lossy(&out.stderr).into(),
        });
    }
    Ok(img)
}

fn dir_size(dir: &Path) -> io::Result<(u64, u64)> {
    let (mut bytes, mut n) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let md = e.metadata()?;
            n += 1;
            if md.is_dir() {
                stack.push(e.path())
            } else {
                bytes += md.len()
            }
        }
    }
    Ok((bytes, n))
}

fn which(name: &str) -> Result<PathBuf, LabError> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| LabError::Missing {
            what: "program",
            path: name.into(),
            hint: "apt-get install qemu-system-x86",
        })
}

/// Shared libraries `binary` needs, as reported by ldd (the dynamic loader included).
fn shared_libs(binary: &Path) -> Result<Vec<PathBuf>, LabError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(io_err("run ldd"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Runs QEMU, collecting console output until the exit marker, with a timeout.
fn run_qemu(
    mut cmd: Command,
    timeout: Duration,
    (heartbeat, monitor): (&Path, &Path),
    verbose: bool,
    stream: bool,
) -> Result<LabOutput, LabError> {
    let start = Instant::now();
    // QEMU goes when the lab's runner goes (a killed test or `fissile-lab serve`), so no lab
    // outlives it holding a forwarded port.
    // SAFETY: the hook runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe and touches no memory shared with the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(
            "spawn qemu-system-x86_64 (apt-get install qemu-system-x86)",
        ))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| LabError::Io("qemu stdout".into(), io::ErrorKind::Other.into()))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| LabError::Io("qemu stderr".into(), io::ErrorKind::Other.into()))?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while r
            .read_until(b'\n', &mut buf)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .to_owned();
            if tx.send(line).is_err() {
                break;
            }
            buf.clear();
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut console: Vec<String> = Vec::new();
    let mut in_cmd = false;
    let mut output = String::new();
    let mut status = None;
    let tail = |c: &[String]| c[c.len().saturating_sub(40)..].join("\n");
    // The console echo (verbose) already shows the command's output.
    let print_output = stream && !verbose;
    let mut beats = Heartbeat::new(heartbeat);
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            // Also when lines keep coming: a chatty command gets no more than its time.
            let _ = child.kill();
            let _ = child.wait();
            return Err(LabError::Timeout {
                secs: timeout.as_secs(),
                tail: tail(&console),
            });
        }
        if let Some(silent) = beats.silent_for(Instant::now())
            && silent > FROZEN_AFTER
        {
            let monitor =
                ask_monitor_bounded(monitor, &["info registers", "info lapic", "info pic"]);
            let _ = child.kill();
            let _ = child.wait();
            return Err(LabError::Frozen {
                silent_secs: silent.as_secs(),
                last_beat: beats.last.clone(),
                monitor,
                tail: tail(&console),
                output,
            });
        }
        match rx.recv_timeout(left.min(Duration::from_secs(5))) {
            Ok(line) => {
                if verbose {
                    let _ = writeln!(io::stderr(), "lab| {line}");
                }
                if let Some(rest) = line.find(EXIT).map(|i| &line[i + EXIT.len()..]) {
                    status = rest
                        .trim()
                        .trim_end_matches("@@")
                        .trim()
                        .parse::<i32>()
                        .ok();
                    // Output before the marker on the same line belongs to the command.
                    let last = &line[..line.find(EXIT).unwrap_or(0)];
                    if print_output && !last.is_empty() {
                        println!("{last}");
                    }
                    output.push_str(last);
                    break;
                }
                if line.contains(BEGIN) {
                    in_cmd = true;
                } else if in_cmd {
                    if print_output {
                        println!("{line}");
                    }
                    output.push_str(&line);
                    output.push('\n');
                }
                console.push(line);
            }
            // The next turn checks the time left and the heartbeat.
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let wall = start.elapsed();
    // After the marker the lab powers off; give it a moment, then make sure QEMU is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let qemu_err = err_thread.join().unwrap_or_default();
    match status {
        Some(status) => Ok(LabOutput {
            output,
            status,
            wall,
            native: false,
        }),
        None => Err(LabError::NoExitMarker {
            tail: format!("{}\nqemu stderr: {qemu_err}", tail(&console)),
        }),
    }
}

/// The lab's heartbeat file (its second serial port), watched for growth.
struct Heartbeat<'a> {
    path: &'a Path,
    len: u64,
    /// When the file last grew (`None` until the first beat: a lab that never beats, e.g.
    /// an older initramfs, is never called frozen).
    grew: Option<Instant>,
    /// The last line (the lab's uptime).
    last: String,
}

impl<'a> Heartbeat<'a> {
    fn new(path: &'a Path) -> Self {
        Self {
            path,
            len: 0,
            grew: None,
            last: String::new(),
        }
    }

    /// How long since the last beat as of `now` (`None` before the first).
    fn silent_for(&mut self, now: Instant) -> Option<Duration> {
        let len = fs::metadata(self.path).map(|m| m.len()).unwrap_or(0);
        if len > self.len {
            self.len = len;
            self.grew = Some(now);
            if let Ok(text) = fs::read_to_string(self.path) {
                self.last = text.lines().last().unwrap_or("").trim().to_owned();
            }
        }
        self.grew.map(|t| now.duration_since(t))
    }
}

/// Asks QEMU's monitor `commands` (see [`ask_monitor`]) and returns the answers within 10 s:
/// a QEMU that does not run at all (stopped) leaves a connect to its monitor waiting until it
/// is killed, so the asking runs on a thread of its own, left behind when it takes longer.
fn ask_monitor_bounded(socket: &Path, commands: &[&str]) -> String {
    let (tx, rx) = mpsc::channel();
    let socket = socket.to_path_buf();
    let commands = commands.join("\n");
    std::thread::spawn(move || {
        let _ = tx.send(ask_monitor(&socket, &commands));
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| "(the monitor did not answer in 10 s)".into())
}

/// Sends `command` (lines: one command each, on one connection: QEMU serves one monitor
/// client at a time) to QEMU's human monitor at `socket` and returns what it printed within
/// three seconds (or why it could not be asked).
fn ask_monitor(socket: &Path, command: &str) -> String {
    let mut s = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => return format!("(monitor not reachable: {e})"),
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = writeln!(s, "{command}");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && out.len() < 64 * 1024 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return format!("(monitor read failed: {e})"),
        }
    }
    // Without its banner, its prompt and the line editor's echo of the command.
    let text = String::from_utf8_lossy(&out);
    let answer = text
        .lines()
        .filter(|l| !l.starts_with("QEMU ") && !l.contains("(qemu)"))
        .map(|l| l.trim_end_matches('\r'))
        .collect::<Vec<_>>()
        .join("\n");
    if answer.trim().is_empty() {
        "(the monitor did not answer)".into()
    } else {
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lab_has_one_cpu_unless_told_two_and_refuses_other_counts() {
        use std::ffi::OsStr;
        assert_eq!(lab_cpus(None).unwrap(), 1);
        assert_eq!(lab_cpus(Some(OsStr::new("1"))).unwrap(), 1);
        assert_eq!(lab_cpus(Some(OsStr::new("2"))).unwrap(), 2);
        for bad in ["", "0", "3", "two", " 2"] {
            let e = lab_cpus(Some(OsStr::new(bad))).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("FISSILE_LAB_SMP={bad:?}: 1 (the default) or 2")
            );
        }
    }

    #[test]
    fn module_order_puts_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/a/kvm-amd.ko: kernel/c/ccp.ko kernel/a/kvm.ko kernel/v/irqbypass.ko\n\
             kernel/a/kvm.ko: kernel/v/irqbypass.ko\nkernel/v/irqbypass.ko:\nkernel/c/ccp.ko:\n\
             kernel/d/virtio_pci.ko: kernel/d/virtio.ko\nkernel/d/virtio.ko:\n\
             kernel/d/virtio_blk.ko: kernel/d/virtio.ko\nkernel/f/ext4.ko:\nkernel/n/vsock.ko:\n\
             kernel/c/crc32c_generic.ko:\nkernel/v/vhost_vsock.ko: kernel/v/vhost.ko kernel/n/vsock.ko\n\
             kernel/v/vhost.ko:\nkernel/n/virtio_net.ko: kernel/n/net_failover.ko kernel/d/virtio.ko\n\
             kernel/n/net_failover.ko:\nkernel/n/tun.ko:\nkernel/n/veth.ko:\n\
             kernel/nf/nf_tables.ko: kernel/nf/nfnetlink.ko\nkernel/nf/nfnetlink.ko:\n\
             kernel/nf/nft_ct.ko: kernel/nf/nf_conntrack.ko kernel/nf/nf_tables.ko kernel/nf/nfnetlink.ko\n\
             kernel/nf/nf_conntrack.ko:\nkernel/nf/nft_chain_nat.ko: kernel/nf/nf_nat.ko kernel/nf/nf_tables.ko\n\
             kernel/nf/nf_nat.ko: kernel/nf/nf_conntrack.ko\nkernel/nf/nft_masq.ko: kernel/nf/nf_nat.ko\n\
             kernel/nf/nft_reject_ipv4.ko: kernel/nf/nf_tables.ko\nkernel/nf/nft_objref.ko:\n\
             kernel/nf/nft_redir.ko: kernel/nf/nf_nat.ko\nkernel/nf/nft_connlimit.ko: \
             kernel/nf/nf_conncount.ko kernel/nf/nf_conntrack.ko\nkernel/nf/nf_conncount.ko:\n\
             kernel/nf/nft_limit.ko: kernel/nf/nf_tables.ko\n",
        )
        .unwrap();
        let order = module_load_order(dir.path()).unwrap();
        let names: Vec<&str> = order
            .iter()
            .map(|(p, _)| p.rsplit('/').next().unwrap())
            .collect();
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
        assert!(pos("irqbypass.ko") < pos("kvm.ko"));
        assert!(pos("kvm.ko") < pos("kvm-amd.ko"));
        assert!(pos("virtio.ko") < pos("virtio_pci.ko"));
        assert_eq!(names.iter().filter(|n| **n == "virtio.ko").count(), 1);
        assert!(pos("net_failover.ko") < pos("virtio_net.ko"));
        assert!(pos("vhost.ko") < pos("vhost_vsock.ko"));
        assert_eq!(names.iter().filter(|n| **n == "vsock.ko").count(), 1);
        assert!(pos("nfnetlink.ko") < pos("nf_tables.ko"));
        assert!(pos("nf_conntrack.ko") < pos("nf_nat.ko"));
        assert!(pos("nf_nat.ko") < pos("nft_masq.ko"));
        assert_eq!(names.iter().filter(|n| **n == "nf_tables.ko").count(), 1);
        let amd = order
            .iter()
            .find(|(p, _)| p.ends_with("kvm-amd.ko"))
            .unwrap();
        assert_eq!(amd.1, "nested=1 npt=1");
    }

    #[test]
    fn shared_libs_of_a_dynamic_binary_include_libc() {
        let libs = shared_libs(Path::new("/bin/sh")).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
    }

    #[test]
    fn a_heartbeat_is_silent_from_its_last_growth_and_never_before_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heartbeat");
        let mut beats = Heartbeat::new(&path);
        let t0 = Instant::now();
        assert_eq!(beats.silent_for(t0 + FROZEN_AFTER * 2), None, "no file yet");
        fs::write(&path, "1.00 0.50\n").unwrap();
        assert_eq!(beats.silent_for(t0), Some(Duration::ZERO));
        assert_eq!(beats.last, "1.00 0.50");
        assert_eq!(
            beats.silent_for(t0 + Duration::from_secs(100)),
            Some(Duration::from_secs(100))
        );
        fs::write(&path, "1.00 0.50\n16.00 15.50\n").unwrap();
        let t1 = t0 + Duration::from_secs(120);
        assert_eq!(beats.silent_for(t1), Some(Duration::ZERO));
        assert_eq!(beats.last, "16.00 15.50");
    }

    #[test]
    fn run_dirs_of_gone_processes_are_swept_and_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let mk = |name: &str, owner: Option<String>| {
            let d = tmp.path().join(name);
            fs::create_dir(&d).unwrap();
            fs::write(d.join("payload.ext4"), b"x").unwrap();
            if let Some(o) = owner {
                fs::write(d.join(RUN_DIR_OWNER), o).unwrap();
            }
            d
        };
        let mine = mk("fissile-lab-live", Some(std::process::id().to_string()));
        let gone = mk("fissile-lab-gone", Some(u32::MAX.to_string()));
        let fresh_legacy = mk("fissile-lab-legacy", None);
        let other = mk("something-else", Some(u32::MAX.to_string()));
        sweep_run_dirs(tmp.path());
        assert!(mine.exists() && fresh_legacy.exists() && other.exists());
        assert!(!gone.exists());
    }
}
