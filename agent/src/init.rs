//! PID-1 duties in the guest: a writable overlay (tmpfs upper) over the read-only root, the
//! usual pseudo file systems, hostname, loopback, environment, and the `user` cgroup every
//! process the agent starts (the REPL, commands) runs in: its memory and task limits leave
//! the agent room, so a memory hog is OOM-killed inside `user` (the REPL restarts) and a fork
//! bomb runs out of tasks while the agent still answers. Zombie reaping is the
//! [`crate::reaper`]; poweroff is in the server.
//!
//! Every step is best effort: a failure is logged (errors go to the console) and the agent
//! still starts, because a guest without, say, an overlay is still more useful than a
//! kernel panic from PID 1 exiting.

use std::ffi::CStr;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::sys;

/// Host name of every guest.
pub const GUEST_HOSTNAME: &str = "fissile";
/// Where the overlay's tmpfs (upper and work directories) is mounted before the pivot.
const OVERLAY_BASES: [&str; 3] = ["/run", "/tmp", "/mnt"];

const MS_NOSUID: libc::c_ulong = libc::MS_NOSUID;
const MS_NODEV: libc::c_ulong = libc::MS_NODEV;
const MS_NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

/// Environment of every process the guest agent starts.
pub const GUEST_ENV: [(&str, &str); 5] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
    ("MPLBACKEND", "module://fissile_mpl_backend"),
];

/// The cgroup the agent's children run in.
const USER_CGROUP: &str = "/sys/fs/cgroup/user";
/// Its `cgroup.procs`, for joining it between fork and exec.
pub(crate) const USER_CGROUP_PROCS: &CStr = c"/sys/fs/cgroup/user/cgroup.procs";
/// Guest memory kept out of the user's reach (the agent, the kernel's own needs): the larger
/// of this and an eighth of the guest's memory.
const AGENT_RESERVE_MIB: u64 = 96;
/// Most tasks (processes and threads) the user's code may have at once.
pub const USER_PIDS_MAX: u32 = 2048;

static USER_CGROUP_READY: AtomicBool = AtomicBool::new(false);

/// Whether the agent's children should join the `user` cgroup (set up by [`init_guest`]).
pub(crate) fn user_cgroup_ready() -> bool {
    USER_CGROUP_READY.load(Ordering::Relaxed)
}

/// Does the PID-1 set-up. Must run before any thread is started (it sets the environment).
pub fn init_guest() {
    sys::set_env_before_threads(&GUEST_ENV);
    if let Err(e) = overlay_root() {
        tracing::error!(error = %e, "no writable overlay; the root stays read-only");
    }
    mount_pseudo_filesystems();
    match user_cgroup() {
        Ok(()) => USER_CGROUP_READY.store(true, Ordering::Relaxed),
        Err(e) => tracing::error!(error = %e, "no user cgroup; user code runs without limits"),
    }
    quiet_kernel_timers();
    if let Err(e) = sys::sethostname(GUEST_HOSTNAME) {
        tracing::error!(error = %e, "sethostname failed");
    }
    if let Err(e) = sys::interface_up("lo") {
        tracing::error!(error = %e, "cannot bring the loopback interface up");
    }
    if Path::new("/sys/class/net/eth0").exists()
        && let Err(e) = network_up()
    {
        tracing::error!(error = %e, "cannot configure eth0; the guest has no network");
    }
    let home = if fs::metadata("/root").is_ok_and(|m| m.is_dir()) {
        "/root"
    } else {
        "/"
    };
    if let Err(e) = std::env::set_current_dir(home) {
        tracing::error!(error = %e, "chdir failed");
    }
}

/// Kernel housekeeping that wakes an idle guest, made rarer: every wake-up of every idle
/// sandbox, warm-pool member and fork child costs host CPU.
/// * `vm.stat_interval` 1 s → 10 s: the vmstat shepherd's wake-up. An idle CPU folds its
///   counters as it goes idle anyway, so they lag little.
/// * the neighbour tables' probe interval 5 s → 60 s: their `managed_work` re-arms itself
///   at that interval whether or not any entry is managed (none is here).
const QUIET_SYSCTLS: [(&str, &str); 3] = [
    ("/proc/sys/vm/stat_interval", "10"),
    (
        "/proc/sys/net/ipv4/neigh/default/interval_probe_time_ms",
        "60000",
    ),
    (
        "/proc/sys/net/ipv6/neigh/default/interval_probe_time_ms",
        "60000",
    ),
];

fn quiet_kernel_timers() {
    for (path, value) in QUIET_SYSCTLS {
        if let Err(e) = fs::write(path, value)
            && Path::new(path).exists()
        {
            tracing::warn!(error = %e, path, "cannot set a sysctl");
        }
    }
}

/// `eth0` with the address every sandbox's guest has, the default route through the host
/// end of the link, and that end as the resolver (`fissile_proto::net`). A restored or forked
/// guest keeps all of it: the host gives every namespace the same layout.
fn network_up() -> io::Result<()> {
    use fissile_proto::net::{GATEWAY_ADDR, GUEST_ADDR, netmask};
    sys::set_ipv4("eth0", GUEST_ADDR, netmask())?;
    sys::interface_up("eth0")?;
    sys::add_default_route(GATEWAY_ADDR)?;
    // The image's may be a dangling symlink (to a resolver daemon's file).
    let _ = fs::remove_file("/etc/resolv.conf");
    fs::write("/etc/resolv.conf", format!("nameserver {GATEWAY_ADDR}\n"))?;
    tracing::info!(address = %GUEST_ADDR, gateway = %GATEWAY_ADDR, "eth0 up");
    Ok(())
}

/// tmpfs at a base dir, overlay (lower = the read-only root) at base/fissile-overlay/root,
/// then pivot_root into it and detach the old root.
fn overlay_root() -> io::Result<()> {
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        "no mount point for the overlay tmpfs",
    );
    for base in OVERLAY_BASES {
        match sys::mount(
            "tmpfs",
            base,
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            Some("mode=0755"),
        ) {
            Ok(()) => return overlay_at(base),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn overlay_at(base: &str) -> io::Result<()> {
    let dir = format!("{base}/fissile-overlay");
    let (upper, work, root) = (
        format!("{dir}/upper"),
        format!("{dir}/work"),
        format!("{dir}/root"),
    );
    for d in [&upper, &work, &root] {
        fs::create_dir_all(d)?;
    }
    let opts = format!("lowerdir=/,upperdir={upper},workdir={work}");
    sys::mount("overlay", &root, "overlay", 0, Some(&opts))?;
    std::env::set_current_dir(&root)?;
    sys::pivot_root_here()?;
    std::env::set_current_dir("/")
}

/// How many times the OOM killer struck in the `user` cgroup (0 without one).
pub(crate) fn user_oom_kills() -> u64 {
    fs::read_to_string(format!("{USER_CGROUP}/memory.events"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The `user` cgroup's memory limit in bytes (0 without one).
pub(crate) fn user_memory_max() -> u64 {
    fs::read_to_string(format!("{USER_CGROUP}/memory.max"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// cgroup v2 with a `user` child: `memory.max` = guest memory minus the agent's reserve,
/// `pids.max` = [`USER_PIDS_MAX`].
fn user_cgroup() -> io::Result<()> {
    let _ = fs::create_dir_all("/sys/fs/cgroup");
    sys::mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        None,
    )?;
    fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids")?;
    let _ = fs::create_dir(USER_CGROUP);
    let total_mib = fs::read_to_string("/proc/meminfo")?
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib >> 10)
        .ok_or_else(|| io::Error::other("no MemTotal in /proc/meminfo"))?;
    let reserve = AGENT_RESERVE_MIB.max(total_mib / 8);
    let user_mib = total_mib.saturating_sub(reserve).max(64);
    fs::write(
        format!("{USER_CGROUP}/memory.max"),
        (user_mib << 20).to_string(),
    )?;
    fs::write(format!("{USER_CGROUP}/pids.max"), USER_PIDS_MAX.to_string())?;
    tracing::info!(user_mib, pids = USER_PIDS_MAX, "user cgroup ready");
    Ok(())
}

fn mount_pseudo_filesystems() {
    let mounts: [(&str, &str, &str, libc::c_ulong, Option<&str>); 7] = [
        (
            "proc",
            "/proc",
            "proc",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            None,
        ),
        ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, Some("mode=0755")),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MS_NOSUID | MS_NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        let _ = fs::create_dir_all(target);
        if let Err(e) = sys::mount(source, target, fstype, flags, data) {
            // devtmpfs may already be mounted by the kernel (CONFIG_DEVTMPFS_MOUNT).
            if e.raw_os_error() != Some(libc::EBUSY) {
                tracing::error!(error = %e, target, "mount failed");
            }
        }
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, link);
    }
}
