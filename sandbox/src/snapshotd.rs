//! A `fissile-snapshotd` daemon process, for tests, benchmarks and the CLI.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fissile_proto::pidfd::Pidfd;

use crate::SandboxError;
use crate::paths::find_binary;
use crate::process::Process;

/// How long snapshotd may take to open its store and listen.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running snapshotd; killed on drop.
#[derive(Debug)]
pub struct Snapshotd {
    proc: Proc,
    socket: PathBuf,
    root: PathBuf,
}

/// Started here, or adopted from an earlier process.
#[derive(Debug)]
enum Proc {
    Child(Process),
    Adopted(Pidfd),
}

impl Snapshotd {
    /// Starts `fissile-snapshotd serve` on store `root` with its socket at `socket`; returns
    /// once it printed its readiness line.
    /// Jailed VMMs (`$FISSILE_JAIL`, see [`crate::jail`]) are admitted by their gid.
    pub fn start(root: &Path, socket: &Path) -> Result<Snapshotd, SandboxError> {
        Self::start_for(root, socket, crate::jail::JailConfig::from_env().as_ref())
    }

    /// [`Snapshotd::start`] admitting the VMMs of `jail` when given, and then jailed itself:
    /// it runs as `jail.snapshotd_uid` (uid and gid; no capabilities, `no_new_privs`) in a
    /// mount namespace whose root holds only its binary, the shared libraries and its store
    /// (given to that uid here, whatever wrote there before), with an IPC namespace of its
    /// own. It cannot bind its socket in the caller's directory, so the caller binds it (not
    /// replacing a live one), opens it to the VMMs' group (`0660`) and hands it over as a
    /// descriptor (`--listen-fd`, under the number it has here).
    pub fn start_for(
        root: &Path,
        socket: &Path,
        jail: Option<&crate::jail::JailConfig>,
    ) -> Result<Snapshotd, SandboxError> {
        use crate::jail;
        let bin = find_binary("fissile-snapshotd")?;
        let mut cmd = Command::new(&bin);
        cmd.arg("serve");
        let mut root = root.to_path_buf();
        let mut report = None;
        if let Some(cfg) = jail {
            let io = jail::JailError::at;
            cfg.check()?;
            std::fs::create_dir_all(&root).map_err(io("creating", &root))?;
            root = std::fs::canonicalize(&root).map_err(io("resolving", &root))?;
            let uid = cfg.snapshotd_uid;
            jail::give_tree(&root, uid, uid)?;
            let bound =
                fissile_proto::uds::BoundSocket::bind(socket).map_err(io("binding", socket))?;
            bound
                .share_with_group(cfg.gid)
                .map_err(io("opening to the VMMs' group", socket))?;
            let listen_fd = jail::pass_fd(&mut cmd, bound.listener.into());
            let spec = jail::JailSpec {
                program: bin.clone(),
                dir: root.clone(),
                ..jail::JailSpec::default()
            };
            report = Some(jail::apply_as(&mut cmd, uid, uid, &spec)?);
            cmd.arg("--vmm-gid")
                .arg(cfg.gid.to_string())
                .arg("--listen-fd")
                .arg(listen_fd.to_string());
        }
        cmd.arg("--root")
            .arg(&root)
            .arg("--socket")
            .arg(socket)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut child =
            jail::spawn(cmd, report).map_err(|e| SandboxError::Spawn(bin.clone(), e))?;
        // The readiness line, read on a helper thread so the wait is bounded.
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(out) = child.take_stdout() {
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(out).take(4096).read_line(&mut line);
                let _ = tx.send(line);
            });
        }
        let line = rx.recv_timeout(READY_TIMEOUT).unwrap_or_default();
        if !line.starts_with("READY") {
            let _ = child.kill();
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            return Err(SandboxError::Snapshotd(format!(
                "no READY line within {} s (exit: {status}; printed {line:?})",
                READY_TIMEOUT.as_secs()
            )));
        }
        Ok(Snapshotd {
            proc: Proc::Child(child),
            socket: socket.to_path_buf(),
            root,
        })
    }

    /// Takes over the running snapshotd `pid` serving `socket` (one an earlier process
    /// started): checks its command line names `socket` and that it answers there. Killed on
    /// drop like one this process started.
    pub fn adopt(pid: u32, root: &Path, socket: &Path) -> Result<Snapshotd, SandboxError> {
        let fail = |why: String| SandboxError::Adopt { pid, why };
        let handle = Pidfd::open_matching(pid, "fissile-snapshotd", &socket.to_string_lossy())
            .map_err(|e| fail(e.to_string()))?;
        fissile_snapshotd_client::client::Client::connect(socket)
            .and_then(|mut c| c.ping())
            .map_err(|e| fail(format!("it does not answer: {}", crate::error_chain(&e))))?;
        Ok(Snapshotd {
            proc: Proc::Adopted(handle),
            socket: socket.to_path_buf(),
            root: root.to_path_buf(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        match &self.proc {
            Proc::Child(c) => c.id(),
            Proc::Adopted(p) => p.pid(),
        }
    }

    /// True if it was adopted rather than started by this process.
    pub fn adopted(&self) -> bool {
        matches!(self.proc, Proc::Adopted(_))
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How it ended, if it has (without waiting): its exit status, or `exited` for an
    /// adopted one.
    pub fn exited(&mut self) -> Option<String> {
        match &mut self.proc {
            Proc::Child(c) => match c.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("cannot be waited for: {e}")),
            },
            Proc::Adopted(p) => match p.exited(Duration::ZERO) {
                Ok(true) => Some("exited".into()),
                Ok(false) => None,
                Err(e) => Some(format!("cannot be watched: {e}")),
            },
        }
    }

    /// Kills it (SIGKILL) and waits.
    pub fn kill(self) {
        drop(self);
    }
}

impl Drop for Snapshotd {
    fn drop(&mut self) {
        match &mut self.proc {
            Proc::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Proc::Adopted(p) => {
                p.kill(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use fissile_snapshotd_client::client::{Client, CreateOptions, LazyMemory};

    use super::*;
    use crate::jail::JailConfig;

    const PAGES: usize = 64;

    fn status_field(pid: u32, key: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// A jailed snapshotd runs as its own uid without capabilities, sees nothing of the host
    /// but its binary, libraries and store, and still does its work: stores a snapshot,
    /// starts again over a store something else (root) wrote to, and serves a lazily
    /// restored mapping's page faults (userfaultfd) from its jail.
    #[test]
    fn a_jailed_snapshotd_serves_from_its_own_uid_and_root() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the jail needs root (mount namespaces, setuid): run the tests as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let sock = dir.path().join("sd.sock");
        std::fs::write(dir.path().join("secret"), "host only").unwrap();
        let cfg = JailConfig {
            uid_base: 4_000_000,
            uids: 10,
            gid: 3_999_999,
            snapshotd_uid: 3_999_998,
        };
        let sd = Snapshotd::start_for(&store, &sock, Some(&cfg)).unwrap();
        let pid = sd.pid();
        assert_eq!(status_field(pid, "Uid:"), "3999998");
        assert_eq!(status_field(pid, "Gid:"), "3999998");
        assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
        assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
            std::fs::read_link("/proc/self/ns/mnt").unwrap()
        );
        let seen = |p: &Path| {
            Path::new(&format!("/proc/{pid}/root"))
                .join(p.strip_prefix("/").unwrap())
                .exists()
        };
        assert!(!seen(&dir.path().join("secret")), "the host's files");
        assert!(!seen(Path::new("/etc/passwd")));
        assert!(seen(&sd.root().join("index")), "its store");
        let meta = std::fs::metadata(&sock).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), cfg.gid, "jailed VMMs reach it by their group");

        let mut memory = tempfile::tempfile().unwrap();
        for p in 0..PAGES {
            memory.write_all(&[p as u8 ^ 0x5a; 4096]).unwrap();
        }
        let mut client = Client::connect(&sock).unwrap();
        let id = client
            .create_snapshot(
                &memory,
                &CreateOptions {
                    memory_size: (PAGES * 4096) as u64,
                    ..CreateOptions::default()
                },
            )
            .unwrap();
        drop(client);
        let root = sd.root().to_path_buf();
        drop(sd);
        // What an offline run as root leaves: a file of the store only root may read.
        let current = root.join("index").join("CURRENT");
        std::os::unix::fs::chown(&current, Some(0), Some(0)).unwrap();
        std::fs::set_permissions(&current, std::fs::Permissions::from_mode(0o600)).unwrap();

        let sd = Snapshotd::start_for(&store, &sock, Some(&cfg)).unwrap();
        assert_eq!(
            std::fs::metadata(&current).unwrap().uid(),
            cfg.snapshotd_uid
        );
        let lazy = LazyMemory::restore(Client::connect(&sock).unwrap(), &id, None).unwrap();
        for p in 0..PAGES {
            assert_eq!(
                lazy.mapping().touch(p * 4096 + 17),
                p as u8 ^ 0x5a,
                "page {p}"
            );
        }
        assert_eq!(lazy.session().failure(), None);
        drop(lazy);
        // The first process of its pid namespace still ends on SIGTERM (its own handler).
        let mut sd = sd;
        let handle = Pidfd::open(sd.pid()).unwrap();
        handle.signal(libc::SIGTERM).unwrap();
        assert!(
            handle.exited(Duration::from_secs(30)).unwrap(),
            "a jailed snapshotd ignored SIGTERM"
        );
        let status = sd.exited().unwrap();
        assert!(
            status.contains(&(128 + libc::SIGTERM).to_string()),
            "{status}"
        );
    }
}
