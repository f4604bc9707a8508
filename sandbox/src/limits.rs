//! Host-side resource limits of one VMM process: a cgroup v2 of its own (`memory.max` = guest
//! RAM + a bounded overhead, `pids.max`, `cpu.max`) and rlimits (open files, file size), set
//! in the child between fork and exec, so the VMM never runs a single instruction outside
//! them. With seccomp (in the VMM) this is what bounds a VMM a guest compromised.
//!
//! The cgroups live under one parent (`VmmLimits::cgroup_parent`, by default
//! `/sys/fs/cgroup/fissile` when this process is root on a cgroup v2 host), one per VMM
//! (`<sandbox dir name>.<our pid>.<n>`), removed when the VMM has been reaped. This module
//! holds the crate's `unsafe`: the pre-exec hook.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where cgroup v2 is mounted on a standard host.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The controllers each VMM's cgroup uses.
const CONTROLLERS: &[&str] = &["memory", "pids", "cpu"];
/// `cpu.max`'s period (µs).
const CPU_PERIOD_US: u64 = 100_000;

/// The limits each VMM process runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmLimits {
    /// The cgroup v2 directory each VMM gets a cgroup under; `None`: no cgroups (rlimits
    /// still apply).
    pub cgroup_parent: Option<PathBuf>,
    /// Memory the VMM may use beyond guest RAM (its own heap, page tables, device buffers,
    /// the dirty pages it copies into snapshot layers): `memory.max` = guest RAM + this.
    pub memory_overhead_mib: u64,
    /// `pids.max`: the VMM's threads (vCPUs, devices, the control socket's clients).
    pub pids_max: u64,
    /// `cpu.max` = (vCPUs + this) CPUs' worth of time; `None`: no CPU limit.
    pub extra_cpus: Option<u64>,
    /// RLIMIT_NOFILE.
    pub max_open_files: u64,
    /// RLIMIT_FSIZE beyond guest RAM (its memory and snapshot layers are memfds of that size).
    pub file_size_overhead_mib: u64,
    /// The jail each VMM runs in ([`crate::jail`]); `None`: none.
    pub jail: Option<crate::jail::JailConfig>,
    /// Caps on a routed sandbox's traffic ([`crate::net::egress::NetLimits`]).
    pub net: crate::net::egress::NetLimits,
}

impl Default for VmmLimits {
    /// No cgroups; rlimits on.
    fn default() -> Self {
        VmmLimits {
            cgroup_parent: None,
            memory_overhead_mib: 512,
            pids_max: 256,
            extra_cpus: Some(1),
            max_open_files: 4096,
            file_size_overhead_mib: 1024,
            jail: None,
            net: crate::net::egress::NetLimits::default(),
        }
    }
}

impl VmmLimits {
    /// The defaults, with cgroups under `$FISSILE_CGROUP_PARENT` (`none`: off) or, when that
    /// is unset and this process is root on a cgroup v2 host, `/sys/fs/cgroup/fissile`, and
    /// the jail `$FISSILE_JAIL` asks for ([`crate::jail::JailConfig::from_env`]).
    pub fn from_env() -> Self {
        let cgroup_parent = match std::env::var_os("FISSILE_CGROUP_PARENT") {
            Some(v) if v == "none" || v.is_empty() => None,
            Some(v) => Some(PathBuf::from(v)),
            None => cgroup_v2_as_root().then(|| Path::new(CGROUP_ROOT).join("fissile")),
        };
        VmmLimits {
            cgroup_parent,
            jail: crate::jail::JailConfig::from_env(),
            ..VmmLimits::default()
        }
    }
}

fn cgroup_v2_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new(CGROUP_ROOT).join("cgroup.controllers").exists()
}

/// Setting up a VMM's limits failed; names the step and the file.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("cgroup: {step} {path}")]
    Cgroup {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup path {0} contains a NUL byte")]
    Path(PathBuf),
}

/// One VMM's cgroup: created before the VMM starts, removed on drop (once the VMM has been
/// reaped; a cgroup with live processes cannot be removed and is left for the operator).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(cgroup = %self.path.display(), error = %e, "cannot remove a VMM's cgroup");
        }
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// The cgroup of a running VMM `pid` that an earlier process started, if it is one of ours
/// (under `limits.cgroup_parent`): the adopter removes it once the VMM is gone.
pub fn adopted_cgroup(limits: &VmmLimits, pid: u32) -> Option<Cgroup> {
    let parent = limits.cgroup_parent.as_ref()?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    // cgroup v2: a single line `0::/path`.
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let path = Path::new(CGROUP_ROOT).join(rel.trim_start_matches('/'));
    (path.parent() == Some(parent.as_path())).then_some(Cgroup { path })
}

/// Prepares `cmd` (a `fissile-vmm` command) to run under `limits` for a guest of `mem_mib`
/// MiB and `vcpus` vCPUs: creates its cgroup (if any) and installs the pre-exec hook that
/// joins it and sets the rlimits. Keep the returned cgroup until the VMM has been reaped.
pub fn apply(
    cmd: &mut Command,
    limits: &VmmLimits,
    sandbox_dir: &Path,
    mem_mib: u64,
    vcpus: u8,
) -> Result<Option<Cgroup>, LimitsError> {
    let cgroup = match &limits.cgroup_parent {
        Some(parent) => Some(create_cgroup(parent, limits, sandbox_dir, mem_mib, vcpus)?),
        None => None,
    };
    let procs = match &cgroup {
        Some(cg) => {
            let p = cg.path.join("cgroup.procs");
            Some(CString::new(p.as_os_str().as_bytes()).map_err(|_| LimitsError::Path(p))?)
        }
        None => None,
    };
    let nofile = limits.max_open_files;
    let fsize = (mem_mib + limits.file_size_overhead_mib) << 20;
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: it calls open, write, close and setrlimit on data prepared before
    // the fork (`procs` is a CString owned by the closure), and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                join_cgroup(procs)?;
            }
            set_rlimit(libc::RLIMIT_NOFILE, nofile)?;
            set_rlimit(libc::RLIMIT_FSIZE, fsize)?;
            Ok(())
        });
    }
    Ok(cgroup)
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs` (writing "0"
/// names the writer). Async-signal-safe.
fn join_cgroup(procs: &CString) -> std::io::Result<()> {
    // SAFETY: `procs` is a valid NUL-terminated path; the fd is closed below.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: writes one byte from a static buffer to the fd opened above.
    let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closes the fd opened above, once.
    unsafe { libc::close(fd) };
    if n != 1 {
        return Err(err);
    }
    Ok(())
}

fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `lim` is a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn create_cgroup(
    parent: &Path,
    limits: &VmmLimits,
    sandbox_dir: &Path,
    mem_mib: u64,
    vcpus: u8,
) -> Result<Cgroup, LimitsError> {
    let err = |step: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| LimitsError::Cgroup { step, path, source }
    };
    if !parent.exists() {
        std::fs::create_dir_all(parent).map_err(err("creating", parent))?;
    }
    // Delegate the controllers down to the VMMs' cgroups: the parent's parent must enable
    // them for the parent, the parent for its children (cgroup v2's top-down rule).
    if let Some(grand) = parent.parent() {
        enable_controllers(grand)?;
    }
    enable_controllers(parent)?;
    let name = format!(
        "{}.{}.{}",
        sandbox_dir
            .file_name()
            .map(|n| n.to_string_lossy().replace(['/', '\n'], "_"))
            .unwrap_or_else(|| "vmm".into()),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let path = parent.join(name);
    std::fs::create_dir(&path).map_err(err("creating", &path))?;
    let cgroup = Cgroup { path };
    let write = |file: &str, value: String| {
        let p = cgroup.path.join(file);
        std::fs::write(&p, value).map_err(err("writing", &p))
    };
    write(
        "memory.max",
        ((mem_mib + limits.memory_overhead_mib) << 20).to_string(),
    )?;
    // Without swap a VMM over its limit is OOM-killed rather than swapped out.
    let _ = write("memory.swap.max", "0".into());
    write("pids.max", limits.pids_max.to_string())?;
    if let Some(extra) = limits.extra_cpus {
        let quota = (u64::from(vcpus) + extra) * CPU_PERIOD_US;
        write("cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
    }
    Ok(cgroup)
}

/// Enables [`CONTROLLERS`] in `dir`'s `cgroup.subtree_control` where they are not yet.
fn enable_controllers(dir: &Path) -> Result<(), LimitsError> {
    let control = dir.join("cgroup.subtree_control");
    let current = std::fs::read_to_string(&control).map_err(|source| LimitsError::Cgroup {
        step: "reading",
        path: control.clone(),
        source,
    })?;
    let missing: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| !current.split_whitespace().any(|have| have == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::write(&control, missing.join(" ")).map_err(|source| LimitsError::Cgroup {
        step: "enabling controllers in",
        path: control,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rlimits_apply_in_the_child_without_cgroups() {
        let dir = tempfile::tempdir().unwrap();
        let limits = VmmLimits {
            max_open_files: 77,
            ..VmmLimits::default()
        };
        let mut cmd = Command::new("cat");
        cmd.arg("/proc/self/limits");
        let cg = apply(&mut cmd, &limits, dir.path(), 1, 1).unwrap();
        assert!(cg.is_none());
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let row = |name: &str| {
            let line = text.lines().find(|l| l.starts_with(name)).unwrap();
            line[name.len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(row("Max open files"), "77");
        assert_eq!(row("Max file size"), ((1u64 + 1024) << 20).to_string());
    }
}
