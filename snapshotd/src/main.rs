//! `fissile-snapshotd`: the snapshot store daemon and its maintenance commands.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fissile_snapshotd::client::Client;
use fissile_snapshotd::seccomp;
use fissile_snapshotd::server::Server;
use fissile_snapshotd::store::{CompactPolicy, Store};

#[derive(Debug, Parser)]
#[command(
    name = "fissile-snapshotd",
    about = "Fissile content-addressed snapshot store and page server"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the store on a unix socket.
    Serve {
        /// Store root directory.
        #[arg(long)]
        root: PathBuf,
        /// Socket path.
        #[arg(long)]
        socket: PathBuf,
        /// Memory (MiB) that unused snapshot images may keep in the page cache before the
        /// least recently used are dropped (they are read back from the store when needed).
        #[arg(long, default_value_t = 4096)]
        image_cache_mib: u64,
        /// A snapshot layered on this many layered snapshots (a fork and a merge add two) is
        /// flattened after its ingest: its image gets every page, at the cost of one copy of
        /// the memory, and later layers chain from it (0: never).
        #[arg(long, default_value_t = fissile_snapshotd::server::image::FLATTEN_BELOW)]
        flatten_below: u32,
        /// KiB of index memtables, all column families together (see
        /// `Store::open_with`); small values make RocksDB flush and compact often (tests).
        #[arg(long, default_value_t = (fissile_snapshotd::store::INDEX_MEMTABLE_BYTES >> 10) as u64)]
        index_memtable_kib: u64,
        /// Admit jailed VMMs of this gid: the socket becomes `0660` and this group's, and
        /// peers of this gid are served (besides root and our own uid).
        #[arg(long)]
        vmm_gid: Option<u32>,
        /// Serve on this inherited descriptor, a unix socket the spawner already bound at
        /// `--socket` and made reachable (a jailed snapshotd cannot bind there itself)
        /// instead of binding `--socket`.
        #[arg(long)]
        listen_fd: Option<i32>,
        /// Compact packs while serving once those with at least `--compact-dead-percent` dead
        /// bytes hold this many MiB of them together (0: never; `gc` does it offline).
        #[arg(long, default_value_t = 64)]
        compact_min_mib: u64,
        /// Share of a pack's bytes (1-100) that must be dead before compaction rewrites it.
        #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u8).range(1..=100))]
        compact_dead_percent: u8,
        /// Seconds between housekeeping rounds (compaction checks, giving free heap back),
        /// besides the one after every delete.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        compact_interval_s: u64,
        /// The seccomp filter every thread runs under once the daemon serves: `kill` (a
        /// syscall outside it kills the daemon), `log` (the kernel logs it and lets it run;
        /// for finding what a new code path needs) or `off`.
        #[arg(
            long,
            value_enum,
            env = "FISSILE_SNAPSHOTD_SECCOMP",
            default_value = "kill"
        )]
        seccomp: seccomp::Mode,
    },
    /// Check the filter and exit: start a thread, install the serve filter (in MODE), show
    /// that files and threads still work (stderr), then have the early thread start a
    /// process, which the filter forbids.
    #[command(hide = true)]
    SeccompSelftest {
        #[arg(value_enum)]
        mode: seccomp::Mode,
    },
    /// Verify the whole store (exit status 1 if anything is wrong).
    Check {
        /// Store root directory.
        #[arg(long)]
        root: PathBuf,
    },
    /// Reclaim unreferenced chunks and compact packs.
    Gc {
        /// Store root directory.
        #[arg(long)]
        root: PathBuf,
    },
    /// List snapshots (from a store root, or from a running daemon).
    Ls {
        /// Store root directory (the daemon stopped).
        #[arg(long, conflicts_with = "socket")]
        root: Option<PathBuf>,
        /// Socket of a running daemon.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Let the jailed VMM of `--uid` read these snapshots (and their ancestors): what a
    /// client that sends `merge` or `rollback` over a jailed VMM's control socket itself
    /// does first (fissile-sandbox and fissiled grant on their own).
    Grant {
        /// Socket of the running daemon.
        #[arg(long)]
        socket: PathBuf,
        /// The VMM's uid (`/proc/<pid>/status`).
        #[arg(long)]
        uid: u32,
        /// Forget what it was granted before.
        #[arg(long)]
        reset: bool,
        /// Snapshot ids.
        snapshots: Vec<String>,
    },
    /// Print where a running daemon's heap goes: the index's block cache, memtables and
    /// table readers, and malloc's bytes in use and free.
    Memory {
        /// Socket of the running daemon.
        #[arg(long)]
        socket: PathBuf,
    },
    /// Print store figures (from a store root, or from a running daemon).
    Stats {
        /// Store root directory.
        #[arg(long, conflicts_with = "socket")]
        root: Option<PathBuf>,
        /// Socket of a running daemon.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

/// Heap blocks from this size up get mappings of their own (see `process::fix_mmap_threshold`).
const MMAP_THRESHOLD: usize = 256 << 10;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve {
            root,
            socket,
            image_cache_mib,
            flatten_below,
            index_memtable_kib,
            vmm_gid,
            listen_fd,
            compact_min_mib,
            compact_dead_percent,
            compact_interval_s,
            seccomp: mode,
        } => {
            // A jailed snapshotd is its pid namespace's first process: without handlers it
            // would ignore an interrupt of its orchestrator's process group.
            fissile_proto::signals::exit_on_termination_signals()
                .context("handling termination signals")?;
            // Taken first, before anything opens a descriptor that could be mistaken for it.
            let inherited = listen_fd
                .map(|fd| {
                    fissile_snapshotd::process::inherited_listener(fd, &socket)
                        .with_context(|| format!("--listen-fd {fd}"))
                })
                .transpose()?;
            // Before rocksdb's threads: big blocks (a snapshot's page map, memtable arenas)
            // are mapped apart and unmapped when freed, not left in malloc's arenas.
            fissile_snapshotd::process::fix_mmap_threshold(MMAP_THRESHOLD);
            let memtables = usize::try_from(index_memtable_kib << 10)
                .context("--index-memtable-kib is too large")?;
            let store = Store::open_with(&root, memtables)
                .with_context(|| format!("opening store {}", root.display()))?;
            if let Some(why) = fissile_snapshotd::sys::host_shmem_hazard() {
                bail!("{why}");
            }
            let server = Server::with_image_budget(Arc::new(store), image_cache_mib << 20);
            server.set_flatten_below(flatten_below);
            let policy = (compact_min_mib > 0).then_some(CompactPolicy {
                pack_dead_percent: compact_dead_percent,
                min_reclaim_bytes: compact_min_mib << 20,
            });
            server.start_housekeeping(policy, Duration::from_secs(compact_interval_s));
            let listener = match (inherited, vmm_gid) {
                (Some(listener), gid) => {
                    if let Some(gid) = gid {
                        server.admit_group(gid);
                    }
                    listener
                }
                (None, Some(gid)) => server.bind_for_group(&socket, gid)?,
                (None, None) => Server::bind(&socket)?,
            };
            seccomp::install(mode)?;
            tracing::info!(root = %root.display(), socket = %socket.display(), seccomp = ?mode, "snapshotd serving");
            // Readiness line for supervisors and tests.
            println!("READY {}", socket.display());
            server.serve(listener)?;
        }
        Cmd::SeccompSelftest { mode } => seccomp_selftest(mode)?,
        Cmd::Check { root } => {
            let store = Store::open(&root)?;
            let report = store.check()?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.is_ok() {
                bail!("{} problems found", report.problems.len());
            }
        }
        Cmd::Gc { root } => {
            let store = Store::open(&root)?;
            println!("{}", serde_json::to_string_pretty(&store.gc()?)?);
        }
        Cmd::Ls { root, socket } => match (root, socket) {
            (Some(root), _) => {
                let store = Store::open(&root)?;
                for s in store.list()? {
                    println!("{}", serde_json::to_string(&s)?);
                }
            }
            (None, Some(socket)) => {
                let (snapshots, truncated) = Client::connect(&socket)?.list_truncated()?;
                for s in &snapshots {
                    println!("{}", serde_json::to_string(s)?);
                }
                if truncated {
                    eprintln!(
                        "(the daemon lists at most {} snapshots; more exist: `ls --root` with \
                         the daemon stopped lists all)",
                        snapshots.len()
                    );
                }
            }
            (None, None) => bail!("give --root or --socket"),
        },
        Cmd::Grant {
            socket,
            uid,
            reset,
            snapshots,
        } => {
            Client::connect(&socket)?.grant(uid, &snapshots, reset)?;
        }
        Cmd::Memory { socket } => {
            let memory = Client::connect(&socket)?.memory()?;
            println!("{}", serde_json::to_string_pretty(&memory)?);
        }
        Cmd::Stats { root, socket } => match (root, socket) {
            (Some(root), _) => {
                let store = Store::open(&root)?;
                println!("{}", serde_json::to_string_pretty(&store.stats()?)?);
            }
            (None, Some(socket)) => {
                let stats = Client::connect(&socket)?.stats()?;
                println!("{}", serde_json::to_string_pretty(&stats)?);
            }
            (None, None) => bail!("give --root or --socket"),
        },
    }
    Ok(())
}

/// `seccomp-selftest`: what the filter allows still works and what it forbids stops the
/// process, on a thread that started before the filter (as rocksdb's do).
fn seccomp_selftest(mode: seccomp::Mode) -> anyhow::Result<()> {
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let early = std::thread::spawn(move || {
        let _ = wait.recv();
        match std::process::Command::new("/nonexistent-fissile-selftest").spawn() {
            Ok(mut child) => {
                let _ = child.wait();
                eprintln!("fissile-snapshotd: a process was not stopped (it started)");
            }
            Err(e) => eprintln!("fissile-snapshotd: a process was not stopped ({e})"),
        }
    });
    seccomp::install(mode)?;
    eprintln!("fissile-snapshotd: serve filter installed");
    let path = std::env::temp_dir().join(format!("fissile-selftest-{}", std::process::id()));
    std::fs::write(&path, b"ok").context("writing a file")?;
    std::fs::remove_file(&path).context("removing a file")?;
    eprintln!("fissile-snapshotd: a file written and removed");
    match std::thread::Builder::new().spawn(|| 42).map(|t| t.join()) {
        Ok(Ok(42)) => eprintln!("fissile-snapshotd: a thread started and joined"),
        other => bail!("could not start a thread: {other:?}"),
    }
    let _ = go.send(());
    let _ = early.join();
    Ok(())
}
