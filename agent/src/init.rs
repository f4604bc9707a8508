//! PID-1 duties in the guest: a writable overlay (tmpfs upper) over the read-only root, the
//! usual pseudo file systems, hostname, loopback, environment. Zombie reaping is the
//! [`crate::reaper`]; poweroff is in the server.
//!
//! Every step is best effort: a failure is logged (errors go to the console) and the agent
//! still starts, because a guest without, say, an overlay is still more useful than a
//! kernel panic from PID 1 exiting.

use std::fs;
use std::io;

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

/// Does the PID-1 set-up. Must run before any thread is started (it sets the environment).
pub fn init_guest() {
    sys::set_env_before_threads(&GUEST_ENV);
    if let Err(e) = overlay_root() {
        tracing::error!(error = %e, "no writable overlay; the root stays read-only");
    }
    mount_pseudo_filesystems();
    if let Err(e) = sys::sethostname(GUEST_HOSTNAME) {
        tracing::error!(error = %e, "sethostname failed");
    }
    if let Err(e) = sys::interface_up("lo") {
        tracing::error!(error = %e, "cannot bring the loopback interface up");
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
