//! The jail a VMM process runs in (Firecracker's jailer, done in the spawner): set up in the
//! child between fork and exec, so the VMM never runs an instruction outside it.
//!
//! * a mount namespace of its own whose root is a small tmpfs holding only what the VMM
//!   needs, each at the path it has on the host (so the command line stays the same): the
//!   VMM binary and the shared libraries' directories (read-only), the kernel and root image
//!   (read-only), snapshotd's socket (its directory, read-only, when the socket is alone in
//!   it: a restarted snapshotd's new socket is then reachable), the sandbox's own directory
//!   (its sockets and logs; the only writable place), `/proc` (its pid namespace's,
//!   `hidepid=invisible`: the VMM sees only itself), and device nodes made for it alone
//!   (`/dev/kvm`, `/dev/userfaultfd`, `/dev/net/tun` when present; owned by its uid, mode
//!   0600) — never the host's `/dev`;
//! * a pid namespace of its own, where the VMM is the first process (pid 1): it sees no
//!   other process and can signal none, and nothing it could start outlives it. The hook's
//!   first process only makes it: it clones the VMM-to-be with `CLONE_NEWPID |
//!   CLONE_PARENT` (so the VMM is the caller's child like itself), reports its pid
//!   ([`PidReport`]) and exits; [`spawn`] hands back the VMM's own [`Process`];
//! * an IPC namespace of its own (network namespaces are [`crate::net`]'s);
//! * a uid of its own for each VMM ([`JailConfig::uid_base`] + a lease), one shared gid
//!   ([`JailConfig::gid`]) that snapshotd's socket admits (`fissile-snapshotd serve
//!   --vmm-gid`), no supplementary groups, no capabilities (a non-root uid keeps none across
//!   exec), `no_new_privs`.
//!
//! The root is entered with `pivot_root` and the old root detached; where the host's root is
//! an initramfs (which cannot be pivoted, e.g. the lab's) the new root is moved over `/` and
//! chrooted into instead — without capabilities the VMM cannot leave a chroot either.
//!
//! This module holds the `unsafe` of the jail: the pre-exec hook's system calls.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::process::Process;

/// Where the jail's uids start by default: far above the ids a distribution hands out.
pub const DEFAULT_UID_BASE: u32 = 1_000_000;
/// How many uids the jail leases from by default.
pub const DEFAULT_UIDS: u32 = 100_000;
/// The gid every jailed VMM shares by default (snapshotd admits it).
pub const DEFAULT_GID: u32 = 999_999;
/// The uid (and gid) snapshotd runs as by default when it is jailed: none of a VMM's.
pub const DEFAULT_SNAPSHOTD_UID: u32 = 999_998;
/// The jail root's mount point inside a sandbox directory (empty on the host).
const ROOT_DIR: &str = ".jail";

/// Whether and how VMMs are jailed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// First uid handed to a VMM.
    pub uid_base: u32,
    /// How many uids, from `uid_base`, VMMs are given.
    pub uids: u32,
    /// The gid of every jailed VMM.
    pub gid: u32,
    /// The uid and gid snapshotd runs as, in a jail of its own (see
    /// [`crate::Snapshotd::start_for`]); outside the VMMs' range and not their gid.
    pub snapshotd_uid: u32,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            uid_base: DEFAULT_UID_BASE,
            uids: DEFAULT_UIDS,
            gid: DEFAULT_GID,
            snapshotd_uid: DEFAULT_SNAPSHOTD_UID,
        }
    }
}

impl JailConfig {
    /// `$FISSILE_JAIL`: `on` (or `1`) jails every VMM, `off` (or `0`) does not; unset: on
    /// when this process is root (a jail needs root to set up), as a host should run.
    /// `$FISSILE_JAIL_UID_BASE`, `$FISSILE_JAIL_GID` and `$FISSILE_JAIL_SNAPSHOTD_UID`
    /// override the defaults.
    pub fn from_env() -> Option<JailConfig> {
        let on = match std::env::var("FISSILE_JAIL").ok().as_deref() {
            Some("1" | "on" | "yes" | "true") => true,
            Some(_) => false,
            // SAFETY: geteuid has no preconditions.
            None => unsafe { libc::geteuid() == 0 },
        };
        if !on {
            return None;
        }
        let num = |var: &str, default: u32| {
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Some(JailConfig {
            uid_base: num("FISSILE_JAIL_UID_BASE", DEFAULT_UID_BASE),
            uids: DEFAULT_UIDS,
            gid: num("FISSILE_JAIL_GID", DEFAULT_GID),
            snapshotd_uid: num("FISSILE_JAIL_SNAPSHOTD_UID", DEFAULT_SNAPSHOTD_UID),
        })
    }
}

impl JailConfig {
    /// Refuses a snapshotd uid that a VMM could share (inside the VMMs' range, their gid) or
    /// root: a VMM with snapshotd's uid would pass its peer check as snapshotd itself.
    pub fn check(&self) -> Result<(), JailError> {
        let u = self.snapshotd_uid;
        let in_range = u >= self.uid_base && u - self.uid_base < self.uids;
        if u == 0 || in_range || u == self.gid {
            return Err(JailError::Config(format!(
                "snapshotd's uid {u} must not be root, the VMMs' gid {} or within their uids \
                 {}..{}",
                self.gid,
                self.uid_base,
                self.uid_base.saturating_add(self.uids)
            )));
        }
        Ok(())
    }
}

/// Uids leased to running VMMs of this process.
static LEASED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn leased() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    LEASED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A VMM's uid, leased until this is dropped (keep it until the VMM has been reaped).
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
}

impl UidLease {
    /// Leases a uid no running VMM of this process has. Starts at a place that depends on
    /// this process's pid, so two orchestrators on one host rarely meet.
    pub fn new(cfg: &JailConfig) -> Result<UidLease, JailError> {
        let mut set = leased();
        let count = cfg.uids.max(1);
        let start = std::process::id().wrapping_mul(7919) % count;
        let uid = (0..count)
            .map(|i| cfg.uid_base.saturating_add((start + i) % count))
            .find(|u| !set.contains(u))
            .ok_or(JailError::NoUid(count))?;
        set.insert(uid);
        Ok(UidLease { uid })
    }

    /// Records the uid of a VMM an earlier process started (so it is not handed out again
    /// while that VMM runs).
    pub fn adopt(uid: u32) -> UidLease {
        leased().insert(uid);
        UidLease { uid }
    }

    /// The uid.
    pub fn uid(&self) -> u32 {
        self.uid
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        leased().remove(&self.uid);
    }
}

/// The (real) uid process `pid` runs as, from `/proc/<pid>/status`.
pub fn process_uid(pid: u32) -> std::io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no Uid line"))
}

/// The uid process `pid` runs as, if it is one of `cfg`'s jail uids.
pub fn jailed_uid(cfg: &JailConfig, pid: u32) -> Option<u32> {
    let uid = process_uid(pid).ok()?;
    (uid >= cfg.uid_base && uid - cfg.uid_base < cfg.uids).then_some(uid)
}

/// What a jailed program may see besides its own directory.
#[derive(Debug, Clone, Default)]
pub struct JailSpec {
    /// The program (bound read-only at its path).
    pub program: PathBuf,
    /// Files bound read-only at their paths (kernel, root image; a block device gets a node
    /// of its own instead, owned by the jail's uid).
    pub read_only: Vec<PathBuf>,
    /// Unix sockets at their paths (snapshotd's): the directory, read-only, where the socket
    /// is all it holds (a socket bound there again later is seen too), else the socket file.
    pub sockets: Vec<PathBuf>,
    /// The directory the program owns and may write (its sockets and logs).
    pub dir: PathBuf,
    /// Host devices to make a node of, owned by the jail's uid (skipped when the host has
    /// none): e.g. `/dev/kvm`.
    pub devices: Vec<PathBuf>,
}

/// The directory to bind for `socket` instead of the socket itself: its parent, when the
/// socket is all it holds. A bound socket file is the inode it was at spawn, so a server that
/// binds its path again (snapshotd restarted) is out of reach of programs jailed before;
/// through a bound directory they see the new socket. Read-only: connecting needs no write
/// access to the mount. Anything else in the directory (a store, other sockets) would be in
/// the jail too, so then the file is bound as before.
fn socket_dir(socket: &Path) -> Option<&Path> {
    let dir = socket.parent().filter(|d| !d.as_os_str().is_empty())?;
    let mut entries = std::fs::read_dir(dir).ok()?;
    let only = entries.next()?.ok()?;
    (entries.next().is_none() && only.file_name() == socket.file_name()?).then_some(dir)
}

/// Preparing a jail failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Every uid of the range is leased.
    #[error("every one of the jail's {0} uids is in use")]
    NoUid(u32),
    /// A path the jail binds could not be read.
    #[error("jail: {step} {path}")]
    Path {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A path is not absolute or holds a NUL byte.
    #[error("jail: path {0} is not absolute, or holds `..` or a NUL byte")]
    BadPath(PathBuf),
    /// The configuration is unsafe.
    #[error("jail: {0}")]
    Config(String),
}

impl JailError {
    /// Maps an I/O error of `step` on `path` (for `map_err`).
    pub fn at(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
        let path = path.to_path_buf();
        move |source| JailError::Path { step, path, source }
    }
}

/// One step of the hook, prepared before the fork.
#[derive(Debug)]
enum Step {
    Mkdir(CString),
    /// An empty file to bind a file over.
    Touch(CString),
    Bind {
        src: CString,
        dst: CString,
        read_only: bool,
    },
    Symlink {
        target: CString,
        at: CString,
    },
    Node {
        at: CString,
        rdev: libc::dev_t,
        mode: libc::mode_t,
    },
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::BadPath(p.to_path_buf()))
}

/// `root` + absolute `p`.
fn under(root: &Path, p: &Path) -> Result<PathBuf, JailError> {
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(JailError::BadPath(p.to_path_buf()));
    }
    Ok(root.join(p.strip_prefix("/").unwrap_or(p)))
}

/// Builds the hook's steps.
struct Plan {
    root: PathBuf,
    steps: Vec<Step>,
    made: BTreeSet<PathBuf>,
}

impl Plan {
    /// Directories leading to `p` inside the root (not `p` itself).
    fn parents(&mut self, p: &Path) -> Result<(), JailError> {
        let mut at = PathBuf::from("/");
        let parent = p.parent().unwrap_or(Path::new("/"));
        for c in parent.components().skip(1) {
            at.push(c);
            if self.made.insert(at.clone()) {
                self.steps
                    .push(Step::Mkdir(cstr(&under(&self.root, &at)?)?));
            }
        }
        Ok(())
    }

    fn bind_file(&mut self, p: &Path, read_only: bool) -> Result<(), JailError> {
        self.parents(p)?;
        let dst = cstr(&under(&self.root, p)?)?;
        self.steps.push(Step::Touch(dst.clone()));
        self.steps.push(Step::Bind {
            src: cstr(p)?,
            dst,
            read_only,
        });
        Ok(())
    }

    fn bind_dir(&mut self, p: &Path, read_only: bool) -> Result<(), JailError> {
        self.parents(p)?;
        if self.made.insert(p.to_path_buf()) {
            self.steps.push(Step::Mkdir(cstr(&under(&self.root, p)?)?));
        }
        self.steps.push(Step::Bind {
            src: cstr(p)?,
            dst: cstr(&under(&self.root, p)?)?,
            read_only,
        });
        Ok(())
    }

    fn node(&mut self, p: &Path, rdev: libc::dev_t, mode: libc::mode_t) -> Result<(), JailError> {
        self.parents(p)?;
        self.steps.push(Step::Node {
            at: cstr(&under(&self.root, p)?)?,
            rdev,
            mode,
        });
        Ok(())
    }

    /// A library directory: bound read-only, or, if it is a symlink (`/lib` → `usr/lib` on a
    /// merged-/usr system), the same symlink.
    fn library_dir(&mut self, p: &Path) -> Result<(), JailError> {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return Ok(());
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(p).map_err(|source| JailError::Path {
                step: "reading link",
                path: p.to_path_buf(),
                source,
            })?;
            self.parents(p)?;
            if self.made.insert(p.to_path_buf()) {
                self.steps.push(Step::Symlink {
                    target: cstr(&target)?,
                    at: cstr(&under(&self.root, p)?)?,
                });
            }
            return Ok(());
        }
        if meta.is_dir() && !self.made.contains(p) {
            self.bind_dir(p, true)?;
        }
        Ok(())
    }
}

fn meta(p: &Path) -> Result<std::fs::Metadata, JailError> {
    std::fs::metadata(p).map_err(|source| JailError::Path {
        step: "reading",
        path: p.to_path_buf(),
        source,
    })
}

/// Where shared libraries are found: the standard directories and `$LD_LIBRARY_PATH`'s.
fn library_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["/lib", "/lib64", "/usr/lib", "/usr/lib64"]
        .iter()
        .map(PathBuf::from)
        .collect();
    if let Some(extra) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&extra).filter(|p| p.is_absolute()));
    }
    dirs
}

/// Prepares `cmd` (a `fissile-vmm` command) to run in a jail as `uid` and the VMMs' gid
/// (see the module docs): makes `spec.dir` and its jail mount point the uid's, then installs
/// the pre-exec hook. Install it after every other hook that needs root (cgroup, network
/// namespace).
pub fn apply(
    cmd: &mut Command,
    cfg: &JailConfig,
    uid: u32,
    spec: &JailSpec,
) -> Result<PidReport, JailError> {
    apply_as(cmd, uid, cfg.gid, spec)
}

/// Gives `dir` and everything under it to `uid`:`gid`, skipping what already is theirs:
/// what a jailed daemon's own directory needs when something else (an offline `gc` run by
/// root, an older unjailed run) wrote there. The walk goes by open directory descriptors and
/// never follows a symlink nor leaves `dir`'s file system, so an entry the jailed uid swaps
/// for a symlink meanwhile cannot make it change anything outside `dir`.
pub fn give_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    let c = cstr(dir)?;
    let fail = |step: &'static str| JailError::Path {
        step,
        path: dir.to_path_buf(),
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: `c` is NUL-terminated; the descriptor returned is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(fail("opening"));
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let st = fstat(&fd).map_err(|source| JailError::Path {
        step: "reading",
        path: dir.to_path_buf(),
        source,
    })?;
    give_dir(&fd, st.st_dev, uid, gid, dir, 0)
}

/// Deepest directory [`give_tree`] descends into (a store is a few levels deep).
const GIVE_MAX_DEPTH: u32 = 32;

fn fstat(fd: &std::os::fd::OwnedFd) -> std::io::Result<libc::stat> {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is valid for writes; the descriptor is open for the call.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// [`give_tree`]'s step: the directory open as `dir` (at `path`, for messages).
fn give_dir(
    dir: &std::os::fd::OwnedFd,
    dev: libc::dev_t,
    uid: u32,
    gid: u32,
    path: &Path,
    depth: u32,
) -> Result<(), JailError> {
    use std::os::fd::AsRawFd;
    let io = JailError::at;
    let st = fstat(dir).map_err(io("reading", path))?;
    if st.st_dev != dev {
        // Another file system mounted inside: not the daemon's.
        return Ok(());
    }
    if st.st_uid != uid || st.st_gid != gid {
        // SAFETY: plain integers on an open descriptor.
        check(unsafe { libc::fchown(dir.as_raw_fd(), uid, gid) })
            .map_err(io("giving the jail's uid", path))?;
    }
    if depth >= GIVE_MAX_DEPTH {
        return Ok(());
    }
    // The names, listed through the descriptor (never by walking the path again).
    let listing = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    for entry in std::fs::read_dir(&listing).map_err(io("listing", path))? {
        let entry = entry.map_err(io("listing", path))?;
        let name = entry.file_name();
        if name == ROOT_DIR {
            continue;
        }
        let child = path.join(&name);
        let c = CString::new(name.as_bytes()).map_err(|_| JailError::BadPath(child.clone()))?;
        // SAFETY: an all-zero `stat` is a valid value to be overwritten.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is NUL-terminated, `st` valid for writes, `dir` open.
        let r = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r < 0 {
            // Removed meanwhile: nothing to give.
            continue;
        }
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFLNK || st.st_dev != dev {
            continue;
        }
        if kind == libc::S_IFDIR {
            // SAFETY: as above; O_NOFOLLOW refuses a symlink swapped in since the fstatat.
            let fd = unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                continue;
            }
            // SAFETY: `fd` was just opened and nothing else owns it.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            give_dir(&fd, dev, uid, gid, &child, depth + 1)?;
        } else if st.st_uid != uid || st.st_gid != gid {
            // AT_SYMLINK_NOFOLLOW: a symlink swapped in meanwhile is changed itself, not
            // what it names.
            // SAFETY: as above.
            check(unsafe {
                libc::fchownat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    uid,
                    gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })
            .map_err(io("giving the jail's uid", &child))?;
        }
    }
    Ok(())
}

/// [`apply`] with any `uid` and `gid` (snapshotd's jail runs as its own of both). Start the
/// command with [`spawn`], which reads the jailed program's pid from the returned report.
pub fn apply_as(
    cmd: &mut Command,
    uid: u32,
    gid: u32,
    spec: &JailSpec,
) -> Result<PidReport, JailError> {
    let root = spec.dir.join(ROOT_DIR);
    let io = JailError::at;
    std::fs::create_dir_all(&root).map_err(io("creating", &root))?;
    std::os::unix::fs::chown(&spec.dir, Some(uid), Some(gid))
        .map_err(io("giving the jail's uid", &spec.dir))?;
    // Sockets already bound there (the readiness listener a booting guest's agent connects
    // to through the VMM) become the VMM's too.
    for entry in std::fs::read_dir(&spec.dir).map_err(io("listing", &spec.dir))? {
        let entry = entry.map_err(io("listing", &spec.dir))?;
        if entry.file_type().is_ok_and(|t| t.is_socket()) {
            // lchown: an entry swapped for a symlink meanwhile is not followed.
            std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))
                .map_err(io("giving the jail's uid", &entry.path()))?;
        }
    }

    let mut plan = Plan {
        root: root.clone(),
        steps: Vec::new(),
        made: BTreeSet::new(),
    };
    // Library directories first: symlinks among them must exist before anything is bound
    // beneath a path that crosses them.
    for d in library_dirs() {
        plan.library_dir(&d)?;
    }
    if Path::new("/etc/ld.so.cache").is_file() {
        plan.bind_file(Path::new("/etc/ld.so.cache"), true)?;
    }
    plan.bind_file(&spec.program, true)?;
    for f in &spec.read_only {
        let m = meta(f)?;
        if m.file_type().is_block_device() {
            plan.node(f, m.rdev(), libc::S_IFBLK | 0o400)?;
        } else {
            plan.bind_file(f, true)?;
        }
    }
    for s in &spec.sockets {
        match socket_dir(s) {
            Some(dir) => plan.bind_dir(dir, true)?,
            None => plan.bind_file(s, false)?,
        }
    }
    plan.bind_dir(&spec.dir, false)?;
    for d in &spec.devices {
        if let Ok(m) = std::fs::metadata(d)
            && m.file_type().is_char_device()
        {
            plan.node(d, m.rdev(), libc::S_IFCHR | 0o600)?;
        }
    }
    plan.parents(Path::new("/proc/x"))?;
    let proc_dir = cstr(&root.join("proc"))?;
    let root_c = cstr(&root)?;
    let steps = plan.steps;
    let (report, report_w) = std::io::pipe().map_err(io("making a pipe for", &spec.dir))?;
    let report_w = std::os::fd::OwnedFd::from(report_w);

    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: it makes system calls (clone, write, _exit, unshare, mount, mkdir,
    // open, close, symlink, mknod, chown, chdir, pivot_root, umount2, chroot, setgroups,
    // setresgid, setresuid, prctl) on data prepared before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            use std::os::fd::AsRawFd;
            new_pid_namespace(report_w.as_raw_fd())?;
            enter(&steps, &root_c, &proc_dir, uid, gid)
        });
    }
    Ok(PidReport(report))
}

/// Where a jailed program's pid comes from: the pipe its hook's first process writes it to
/// (see [`new_pid_namespace`]). Hand it to [`spawn`]: without it the first process cannot
/// report, and the program would be nobody's to reap.
#[derive(Debug)]
#[must_use = "start the command with jail::spawn(cmd, Some(report))"]
pub struct PidReport(std::io::PipeReader);

/// Starts `cmd` and hands back its program's process: for a command prepared with
/// [`apply`] or [`apply_as`] (their `report`), the jailed program in its pid namespace,
/// which is this process's child; the hook's first process, which made it and exited, is
/// reaped here. Drops `cmd` (its copy of the report pipe) before reading the report.
pub fn spawn(mut cmd: Command, report: Option<PidReport>) -> std::io::Result<Process> {
    let spawned = cmd.spawn();
    drop(cmd);
    let Some(PidReport(mut report)) = report else {
        return spawned.map(Process::from_child);
    };
    // Once spawn returned, the first process has written and exited, or the spawn failed:
    // this read does not wait (at most for a child another thread forks meanwhile to exec,
    // which closes its copy of the close-on-exec writer).
    let mut pid = [0u8; 4];
    let pid = std::io::Read::read_exact(&mut report, &mut pid)
        .ok()
        .map(|()| u32::from_le_bytes(pid));
    // From here on the program, if it was made, is our unreaped child: on any failure it is
    // killed and reaped, never left running (nor its uid handed on meanwhile).
    let made = spawned.and_then(|mut first| {
        let stdout = first.stdout.take();
        let status = first.wait()?;
        if status.success() {
            Ok(stdout)
        } else {
            Err(std::io::Error::other(format!(
                "the jail's first process did not start the program in its own pid \
                 namespace ({status})"
            )))
        }
    });
    let Some(pid) = pid else {
        return Err(made
            .err()
            .unwrap_or_else(|| std::io::Error::other("the jail's first process reported no pid")));
    };
    match made.and_then(|stdout| Ok((fissile_proto::pidfd::Pidfd::open(pid)?, stdout))) {
        Ok((handle, stdout)) => Ok(Process::jailed(handle, stdout)),
        Err(e) => {
            kill_and_reap(pid);
            Err(e)
        }
    }
}

/// SIGKILLs and reaps `pid`, a child of this process not yet reaped (so the pid cannot name
/// anything else meanwhile).
fn kill_and_reap(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill and waitpid take a pid and plain integers; waitpid writes nothing with a
    // null status pointer.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        while libc::waitpid(pid, std::ptr::null_mut(), 0) < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
    }
}

/// The hook's first step: the rest of the hook and the program run in a child made in a new
/// pid namespace, as its first process (pid 1), and made with `CLONE_PARENT`, so that it is
/// the spawner's child like this one; this process writes that child's pid (as the
/// spawner's namespace numbers it) to `report` and exits. Returns in the child only.
/// Async-signal-safe.
fn new_pid_namespace(report: libc::c_int) -> std::io::Result<()> {
    let flags = libc::CLONE_NEWPID | libc::CLONE_PARENT | libc::SIGCHLD;
    // SAFETY: clone without CLONE_VM or a new stack is fork: the child gets a copy of this
    // single-threaded process's memory and returns here with 0; no memory is passed. (It
    // skips glibc's fork bookkeeping, so glibc's cached thread id is stale in the child:
    // nothing there before exec relies on it; the hook makes raw system calls only.)
    let pid = unsafe { libc::syscall(libc::SYS_clone, libc::c_long::from(flags), 0, 0, 0, 0) };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid > 0 {
        let b = u32::try_from(pid).unwrap_or(0).to_le_bytes();
        // SAFETY: write(2) reads the 4 bytes of `b`, which live across the call; kill takes
        // plain integers; _exit ends this process without running anything of the parent's
        // (no atexit, no destructors).
        unsafe {
            if libc::write(report, b.as_ptr().cast(), b.len()) == 4 {
                libc::_exit(0);
            }
            // Unreported, the program would be nobody's to stop: it does not start.
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
            libc::_exit(1);
        }
    }
    Ok(())
}

/// Leaves `fd` open in `cmd`'s program, under its own number (returned), by clearing
/// close-on-exec in the child only; it stays open here until `cmd` is dropped. (Not moved to
/// a fixed number: `dup2` there could close a descriptor the spawn itself still uses.)
pub fn pass_fd(cmd: &mut Command, fd: std::os::fd::OwnedFd) -> std::os::fd::RawFd {
    use std::os::fd::AsRawFd;
    let n = fd.as_raw_fd();
    // SAFETY: the hook runs in the child between fork and exec and only calls fcntl
    // (async-signal-safe) on `fd`, which the closure owns, so it is open at the fork.
    unsafe {
        cmd.pre_exec(move || check(libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0)));
    }
    n
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The hook: builds the root, enters it, drops to `uid`/`gid`. Async-signal-safe.
fn enter(
    steps: &[Step],
    root: &CString,
    proc_dir: &CString,
    uid: u32,
    gid: u32,
) -> std::io::Result<()> {
    let none = std::ptr::null::<libc::c_char>();
    // SAFETY: each call in this block and the ones below gets NUL-terminated strings
    // prepared before the fork (or static ones) and plain integers; the child has one thread.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC))?;
        // Nothing we mount propagates back to the host, nor the host's mounts to us.
        check(libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            c"fissile-jail".as_ptr(),
            root.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID,
            c"size=1m,mode=0755".as_ptr().cast(),
        ))?;
    }
    for step in steps {
        // SAFETY: as above.
        unsafe {
            match step {
                Step::Mkdir(p) => {
                    if libc::mkdir(p.as_ptr(), 0o755) < 0
                        && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Step::Touch(p) => {
                    let fd = libc::open(
                        p.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o600,
                    );
                    check(fd)?;
                    libc::close(fd);
                }
                Step::Bind {
                    src,
                    dst,
                    read_only,
                } => {
                    check(libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        none,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ))?;
                    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
                    if *read_only {
                        flags |= libc::MS_RDONLY;
                    } else {
                        flags |= libc::MS_NODEV | libc::MS_NOEXEC;
                    }
                    check(libc::mount(
                        none,
                        dst.as_ptr(),
                        none,
                        flags,
                        std::ptr::null(),
                    ))?;
                }
                Step::Symlink { target, at } => {
                    check(libc::symlink(target.as_ptr(), at.as_ptr()))?;
                }
                Step::Node { at, rdev, mode } => {
                    check(libc::mknod(at.as_ptr(), *mode, *rdev))?;
                    check(libc::chown(at.as_ptr(), uid, gid))?;
                }
            }
        }
    }
    // SAFETY: as above.
    unsafe {
        // /proc of the new pid namespace (mounted by its first process), showing only the
        // VMM's own processes, and hiding others' anyway (older kernels: hidepid=2).
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if libc::mount(
            c"proc".as_ptr(),
            proc_dir.as_ptr(),
            c"proc".as_ptr(),
            flags,
            c"hidepid=invisible".as_ptr().cast(),
        ) < 0
        {
            check(libc::mount(
                c"proc".as_ptr(),
                proc_dir.as_ptr(),
                c"proc".as_ptr(),
                flags,
                c"hidepid=2".as_ptr().cast(),
            ))?;
        }
        check(libc::chdir(root.as_ptr()))?;
        // pivot_root(".", "."): the old root ends up stacked on the new one and is detached.
        if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0 {
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // The host's root is an initramfs: move the new root over it and chroot.
            check(libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                none,
                libc::MS_MOVE,
                std::ptr::null(),
            ))?;
            check(libc::chroot(c".".as_ptr()))?;
        } else {
            return Err(std::io::Error::last_os_error());
        }
        check(libc::chdir(c"/".as_ptr()))?;
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setresgid(gid, gid, gid))?;
        check(libc::setresuid(uid, uid, uid))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_alone_in_its_directory_is_bound_by_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let alone = dir.path().join("sd").join("sd.sock");
        std::fs::create_dir(alone.parent().unwrap()).unwrap();
        let _a = std::os::unix::net::UnixListener::bind(&alone).unwrap();
        assert_eq!(socket_dir(&alone), alone.parent());
        // Beside anything else (a store, other sockets) only the file is bound.
        let shared = dir.path().join("shared.sock");
        let _b = std::os::unix::net::UnixListener::bind(&shared).unwrap();
        assert_eq!(socket_dir(&shared), None);
        assert_eq!(
            socket_dir(&dir.path().join("sd").join("missing.sock")),
            None
        );
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A shell in a jail reports what it sees, with builtins only (nothing else is there).
    #[test]
    fn a_jailed_program_sees_only_its_root_and_runs_as_its_own_uid() {
        assert!(
            is_root(),
            "the jail needs root (mount namespaces, mknod, setuid): run the tests as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let sandbox = dir.path().join("sandbox");
        std::fs::create_dir(&sandbox).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "host only").unwrap();
        let image = dir.path().join("image");
        std::fs::write(&image, "read only").unwrap();
        let shell = std::fs::canonicalize("/bin/sh").unwrap();
        let cfg = JailConfig::default();
        let lease = UidLease::new(&cfg).unwrap();
        let spec = JailSpec {
            program: shell.clone(),
            read_only: vec![image.clone()],
            sockets: vec![],
            dir: sandbox.clone(),
            devices: vec!["/dev/kvm".into(), "/dev/null".into()],
        };
        let script = format!(
            r#"
            while read k v rest; do case $k in Uid:|Gid:|Groups:|CapEff:|NoNewPrivs:) echo "$k $v";; esac; done < /proc/self/status
            test -e {secret} && echo secret-visible
            test -e /etc/passwd && echo etc-visible
            test -e /dev/kvm && echo kvm-present
            test -e /dev/null && echo dev-null
            read line < {image}; echo "image: $line"
            (echo x > {image}) 2>/dev/null && echo image-writable
            echo ok > {sandbox}/out && echo dir-writable
            n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; echo "procs: $n"
            echo "pid: $$"
            exit 3
            "#,
            secret = secret.display(),
            image = image.display(),
            sandbox = sandbox.display(),
        );
        let mut cmd = Command::new(&shell);
        cmd.arg("-c")
            .arg(script)
            .stdout(std::process::Stdio::piped());
        let report = apply(&mut cmd, &cfg, lease.uid(), &spec).unwrap();
        let mut shell_proc = spawn(cmd, Some(report)).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut shell_proc.take_stdout().unwrap(), &mut text).unwrap();
        // Exited, not yet reaped: the host sees it under its own pid, and as pid 1 of its own
        // namespace.
        let host_pid = shell_proc.id();
        let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).unwrap();
        assert!(
            status.contains(&format!("NSpid:\t{host_pid}\t1\n")),
            "{status}"
        );
        // The exit status is the jailed program's, not that of the process that made it.
        assert_eq!(shell_proc.wait().unwrap().code(), Some(3), "{text}");
        assert!(text.contains("pid: 1\n"), "{text}");
        let uid = lease.uid();
        assert!(text.contains(&format!("Uid: {uid}")), "{text}");
        assert!(text.contains(&format!("Gid: {}", cfg.gid)), "{text}");
        assert!(text.contains("CapEff: 0000000000000000"), "{text}");
        assert!(text.contains("NoNewPrivs: 1"), "{text}");
        assert!(!text.contains("secret-visible"), "{text}");
        assert!(!text.contains("etc-visible"), "{text}");
        assert!(text.contains("dev-null"), "{text}");
        assert!(text.contains("image: read only"), "{text}");
        assert!(!text.contains("image-writable"), "{text}");
        assert!(text.contains("dir-writable"), "{text}");
        // Its own pid namespace: only the shell itself (and maybe its subshell) are there.
        let procs: u32 = text
            .lines()
            .find_map(|l| l.strip_prefix("procs: "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(procs <= 2, "{text}");
        if Path::new("/dev/kvm").exists() {
            assert!(text.contains("kvm-present"), "{text}");
        }
        // The host's view is untouched: nothing was mounted outside the child.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(ROOT_DIR), "{mounts}");
        assert_eq!(
            std::fs::read_to_string(sandbox.join("out")).unwrap(),
            "ok\n"
        );
    }

    /// A jailed program is killed and reaped through its handle (the first process of a pid
    /// namespace ignores signals it has no handler for, except SIGKILL from outside).
    #[test]
    fn a_jailed_program_is_killed_and_reaped_through_its_handle() {
        assert!(is_root(), "the jail needs root: run the tests as root");
        let dir = tempfile::tempdir().unwrap();
        let sandbox = dir.path().join("sandbox");
        std::fs::create_dir(&sandbox).unwrap();
        let fifo = cstr(&sandbox.join("fifo")).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, which lives across the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
        let shell = std::fs::canonicalize("/bin/sh").unwrap();
        let cfg = JailConfig::default();
        let lease = UidLease::new(&cfg).unwrap();
        let spec = JailSpec {
            program: shell.clone(),
            read_only: vec![],
            sockets: vec![],
            dir: sandbox.clone(),
            devices: vec![],
        };
        let mut cmd = Command::new(&shell);
        // Blocks: nothing ever opens the fifo for writing.
        cmd.arg("-c")
            .arg(format!("read x < {}", sandbox.join("fifo").display()));
        let report = apply(&mut cmd, &cfg, lease.uid(), &spec).unwrap();
        let mut p = spawn(cmd, Some(report)).unwrap();
        assert!(p.try_wait().unwrap().is_none(), "it waits on the fifo");
        p.kill().unwrap();
        let status = p.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(!Path::new(&format!("/proc/{}", p.id())).exists(), "reaped");
    }

    /// The walk gives every file and directory under the root to the uid, but neither what a
    /// symlink inside names nor anything outside.
    #[test]
    fn give_tree_changes_the_tree_and_follows_no_symlink() {
        assert!(is_root(), "chown needs root: run the tests as root");
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "host").unwrap();
        let outside_dir = dir.path().join("outside-dir");
        std::fs::create_dir(&outside_dir).unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/file"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("a/link")).unwrap();
        std::os::unix::fs::symlink(&outside_dir, tree.join("dirlink")).unwrap();
        give_tree(&tree, 4_242_424, 4_242_425).unwrap();
        for p in ["", "a", "a/b", "a/b/file"] {
            let m = std::fs::symlink_metadata(tree.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (4_242_424, 4_242_425), "{p}");
        }
        for p in [&outside, &outside_dir] {
            let m = std::fs::metadata(p).unwrap();
            assert_eq!((m.uid(), m.gid()), (0, 0), "{}", p.display());
        }
    }

    #[test]
    fn a_snapshotd_uid_a_vmm_could_share_is_refused() {
        let ok = JailConfig::default();
        ok.check().unwrap();
        for bad in [0, ok.gid, ok.uid_base, ok.uid_base + ok.uids - 1] {
            let cfg = JailConfig {
                snapshotd_uid: bad,
                ..ok.clone()
            };
            assert!(matches!(cfg.check(), Err(JailError::Config(_))), "{bad}");
        }
    }

    #[test]
    fn uids_are_leased_once() {
        let cfg = JailConfig {
            uid_base: 5_000_000,
            uids: 2,
            gid: 1,
            snapshotd_uid: 2,
        };
        let a = UidLease::new(&cfg).unwrap();
        let b = UidLease::new(&cfg).unwrap();
        assert_ne!(a.uid(), b.uid());
        assert!(matches!(UidLease::new(&cfg), Err(JailError::NoUid(2))));
        let freed = a.uid();
        drop(a);
        assert_eq!(UidLease::new(&cfg).unwrap().uid(), freed);
    }
}
