//! Soak: one parent `fissile-vmm` through N cycles of snapshot, fork(1), a write in the child,
//! merge_into, and (every 10th cycle) a restore of the latest snapshot into a new VMM, while
//! two other control clients keep asking for `status` and taking snapshots. Old snapshots
//! are deleted once nothing uses them. Reports, at the start and the end, the parent VMM's
//! open descriptors, RSS and private dirty memory, snapshotd's descriptors, RSS, heap by
//! owner (the index's cache and memtables, its own, malloc's free) and image memory, and the
//! store's snapshots, chunks and bytes: a leak shows as growth.
//!
//! Not a timed test: a benchmark-style run, `soak [cycles]` (default 500; needs KVM, else
//! `fissile-lab run -- soak`). Every cycle checks the parent has the winner's state.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use fissile_benches::{eval, fd_count, rss_kb, smaps, status_kb};
use fissile_proto::control::ControlRequest;
use fissile_sandbox::{ControlClient, Sandbox, SandboxConfig, Snapshotd};
use fissile_snapshotd::client::Client;

/// Snapshots kept (not deleted) behind the newest; older ones are deleted when unused.
const KEEP: usize = 8;

/// The figures compared between start and end (printed through `Debug`).
#[derive(Debug)]
#[allow(dead_code, reason = "read through its Debug output")]
struct Figures {
    vmm_fds: usize,
    vmm_rss_kb: u64,
    vmm_private_dirty_kb: u64,
    sd_fds: usize,
    sd_rss_kb: u64,
    /// snapshotd's RSS by kind: its heap (RocksDB's memtables and block cache among it),
    /// its binary and libraries, shared memory. The images it serves are memfds it fills
    /// with writes and never maps: they are in `sd_image_mib`, not in its RSS.
    sd_rss_anon_kb: u64,
    sd_rss_file_kb: u64,
    sd_rss_shmem_kb: u64,
    /// Its heap by owner (`Memory`): malloc's bytes in use, of which the index's block cache,
    /// memtables and table readers, and the rest, the daemon's own; and what malloc keeps
    /// free. Anon RSS is about in-use plus the resident part of the free.
    sd_heap_in_use_kb: u64,
    sd_index_cache_kb: u64,
    sd_index_memtables_kb: u64,
    sd_index_table_readers_kb: u64,
    sd_own_heap_kb: u64,
    sd_heap_free_kb: u64,
    sd_images: u64,
    sd_image_mib: f64,
    snapshots: u64,
    chunks: u64,
    raw_mib: f64,
    pack_mib: f64,
}

fn figures(vmm: u32, sd_pid: u32, sd: &mut Client) -> anyhow::Result<Figures> {
    let s = sd.stats()?;
    let m = sd.memory()?;
    // The second half of `smaps` sums the whole process (no mapping name holds a NUL).
    let (_, whole) = smaps(vmm, "\u{0}");
    Ok(Figures {
        vmm_fds: fd_count(vmm),
        vmm_rss_kb: rss_kb(vmm),
        vmm_private_dirty_kb: whole.get("Private_Dirty").copied().unwrap_or(0),
        sd_fds: fd_count(sd_pid),
        sd_rss_kb: rss_kb(sd_pid),
        sd_rss_anon_kb: status_kb(sd_pid, "RssAnon"),
        sd_rss_file_kb: status_kb(sd_pid, "RssFile"),
        sd_rss_shmem_kb: status_kb(sd_pid, "RssShmem"),
        sd_heap_in_use_kb: m.heap_in_use_bytes >> 10,
        sd_index_cache_kb: m.index_cache_bytes >> 10,
        sd_index_memtables_kb: m.index_memtable_bytes >> 10,
        sd_index_table_readers_kb: m.index_table_reader_bytes >> 10,
        sd_own_heap_kb: m.own_heap_bytes() >> 10,
        sd_heap_free_kb: m.heap_free_bytes >> 10,
        sd_images: s.images,
        sd_image_mib: s.image_bytes as f64 / (1 << 20) as f64,
        snapshots: s.snapshots,
        chunks: s.chunks,
        raw_mib: s.raw_bytes as f64 / (1 << 20) as f64,
        pack_mib: s.pack_bytes as f64 / (1 << 20) as f64,
    })
}

/// Deletes what it can of `old` except its newest `keep`, newest first (a snapshot with
/// children, or whose image a VM or a layered snapshot uses, is refused and stays for later).
fn delete_unused(sd: &mut Client, old: &mut VecDeque<String>, keep: usize) {
    let candidates = old.len().saturating_sub(keep);
    let mut kept = VecDeque::new();
    for id in old.drain(..candidates).rev() {
        if sd.delete(&id).is_err() {
            kept.push_front(id);
        }
    }
    kept.extend(old.drain(..));
    *old = kept;
}

/// The step the soak is in; a watchdog thread reports a step that takes longer than
/// [`STUCK`] (with the parent's VMM log and console tails) and ends the run, so a hang in the
/// lab shows where it is instead of running into the lab's timeout.
struct Progress {
    at: Arc<std::sync::Mutex<(u32, &'static str, Instant)>>,
}

const STUCK: std::time::Duration = std::time::Duration::from_secs(300);

impl Progress {
    /// Watches the steps; a stuck one is reported with the parent's logs, the host-side
    /// tasks of `pids` (the parent VMM's and snapshotd's) and the guest's own tasks.
    fn watch(parent_dir: std::path::PathBuf, api: std::path::PathBuf, pids: Vec<u32>) -> Progress {
        let at = Arc::new(std::sync::Mutex::new((0, "start", Instant::now())));
        let seen = at.clone();
        std::thread::spawn(move || {
            let mut told = 0;
            loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                let (cycle, step, since) = *seen.lock().unwrap_or_else(|p| p.into_inner());
                // A line a minute while a step is slow: if these stop too, the machine
                // running the soak (the lab) stopped, not only the sandbox.
                let minutes = since.elapsed().as_secs() / 60;
                if minutes > told {
                    told = minutes;
                    eprintln!("soak: cycle {cycle} in {step:?} for {minutes} min");
                } else if minutes < told {
                    told = 0;
                }
                if since.elapsed() > STUCK {
                    let tail = |name: &str| {
                        let text =
                            std::fs::read_to_string(parent_dir.join(name)).unwrap_or_default();
                        let lines: Vec<&str> = text.lines().collect();
                        lines[lines.len().saturating_sub(30)..].join("\n")
                    };
                    eprintln!(
                        "soak: cycle {cycle} stuck in {step:?} for {:.0} s\n--- parent vmm.log ---\n{}\n--- parent console ---\n{}",
                        since.elapsed().as_secs_f64(),
                        tail("vmm.log"),
                        tail("console.log"),
                    );
                    for pid in &pids {
                        eprintln!("--- host tasks of pid {pid} ---\n{}", host_tasks(*pid));
                    }
                    // What the parent's VMM sees: its state, its vCPUs' exits and threads,
                    // the interrupt path and queues (`fissile_sandbox::diagnose`).
                    let (tx, rx) = std::sync::mpsc::channel();
                    let (sock, vmm) = (api.clone(), pids.first().copied());
                    std::thread::spawn(move || {
                        let _ = tx.send(fissile_sandbox::diagnose(&sock, vmm));
                    });
                    let seen = rx
                        .recv_timeout(std::time::Duration::from_secs(60))
                        .unwrap_or_else(|_| "no answer within 60 s".into());
                    eprintln!("--- what the parent's VMM sees ---\n{seen}");
                    // Asked on a thread of its own, so a guest that does not answer cannot
                    // keep the report (and the exit) from happening.
                    let (tx, rx) = std::sync::mpsc::channel();
                    let vsock = parent_dir.join("vsock.sock");
                    std::thread::spawn(move || {
                        let _ = tx.send(guest_tasks(&vsock));
                    });
                    let tasks = rx
                        .recv_timeout(std::time::Duration::from_secs(90))
                        .unwrap_or_else(|_| "no answer within 90 s".into());
                    eprintln!(
                        "--- the parent guest's tasks (asked over a new agent connection) ---\n{tasks}"
                    );
                    std::process::exit(3);
                }
            }
        });
        Progress { at }
    }

    fn step(&self, cycle: u32, step: &'static str) {
        *self.at.lock().unwrap_or_else(|p| p.into_inner()) = (cycle, step, Instant::now());
    }

    /// `cycle N, step "…"`: where a failing run was.
    fn place(&self) -> String {
        let (cycle, step, _) = *self.at.lock().unwrap_or_else(|p| p.into_inner());
        format!("cycle {cycle}, step {step:?}")
    }
}

fn main() -> anyhow::Result<()> {
    let cycles: u32 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("soak [cycles]")?
        .unwrap_or(500);
    let tmp = tempfile::tempdir()?;
    let sd = Snapshotd::start(&tmp.path().join("store"), &tmp.path().join("sd.sock"))?;
    let sd_pid = sd.pid();
    let mut cfg = SandboxConfig::from_env(tmp.path().join("parent")).context("sandbox config")?;
    cfg.mem_mib = 256;
    cfg.snapshotd = Some(sd.socket().to_path_buf());
    let mut parent = Sandbox::boot(&cfg)?;
    let vmm = parent.pid().context("parent pid")?;
    eval(&mut parent, "n = 0\n1")?;
    let mut sdc = Client::connect(sd.socket())?;

    // Concurrent control clients: one polls status, one takes snapshots (their ids come
    // back over `taken` to be deleted like the others).
    let stop = Arc::new(AtomicBool::new(false));
    let (taken_tx, taken) = std::sync::mpsc::channel::<String>();
    let (statuses, snaps) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let side: Vec<_> = [false, true]
        .into_iter()
        .map(|snapshotter| {
            let sock = parent.api_sock();
            let (stop, statuses, snaps) = (stop.clone(), statuses.clone(), snaps.clone());
            let taken_tx = taken_tx.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut c = ControlClient::connect(&sock)?;
                while !stop.load(Ordering::SeqCst) {
                    if snapshotter {
                        let r = c.call(&ControlRequest::Snapshot { durable: false })?;
                        if let Some(s) = r.snapshot {
                            let _ = taken_tx.send(s.id);
                        }
                        snaps.fetch_add(1, Ordering::Relaxed);
                        // Not faster: after each snapshot the guest re-faults its working
                        // set from the new image, which in the lab costs seconds.
                        std::thread::sleep(std::time::Duration::from_secs(5));
                    } else {
                        c.status()?;
                        statuses.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                }
                Ok(())
            })
        })
        .collect();

    let mut old: VecDeque<String> = VecDeque::new();
    let mut start = None;
    let t0 = Instant::now();
    let progress = Progress::watch(
        parent.dir().to_path_buf(),
        parent.api_sock(),
        vec![vmm, sd_pid],
    );
    let mut run = |cycle: u32| -> anyhow::Result<()> {
        progress.step(cycle, "snapshot");
        let s = parent.snapshot(false)?;
        old.push_back(s.id.clone());
        progress.step(cycle, "fork(1)");
        let (mut kids, fork) = parent.fork(1)?;
        old.push_back(fork.snapshot.id.clone());
        progress.step(cycle, "exec in the child");
        eval(&mut kids[0], &format!("n = {cycle}\n1"))?;
        progress.step(cycle, "winner snapshot");
        let winner = kids[0].snapshot(false)?;
        old.push_back(winner.id.clone());
        progress.step(cycle, "merge");
        parent.merge_snapshot(&winner.id)?;
        drop(kids);
        progress.step(cycle, "exec in the parent after the merge");
        let n = eval(&mut parent, "n")?;
        anyhow::ensure!(
            n == cycle.to_string(),
            "cycle {cycle}: the parent has n = {n}"
        );
        if cycle.is_multiple_of(10) {
            progress.step(cycle, "restore of the winner");
            let mut rcfg = cfg.clone();
            rcfg.dir = tmp.path().join("restored");
            let mut r = Sandbox::restore(&rcfg, &winner.id)?;
            let got = eval(&mut r, "n")?;
            anyhow::ensure!(got == cycle.to_string(), "restored n = {got}");
            drop(r);
            let _ = std::fs::remove_dir_all(tmp.path().join("restored"));
        }
        progress.step(cycle, "deleting old snapshots");
        old.extend(taken.try_iter());
        delete_unused(&mut sdc, &mut old, KEEP);
        let _ = std::fs::remove_dir_all(parent.dir().join(format!("fork-{}", cycle)));
        if cycle == 10 {
            let f = figures(vmm, sd_pid, &mut sdc)?;
            println!("after cycle 10: {f:?}");
            start = Some(f);
        }
        if cycle.is_multiple_of(25) {
            println!(
                "cycle {cycle}: {:.0} s, {} status / {} snapshots from the side clients; {:?}",
                t0.elapsed().as_secs_f64(),
                statuses.load(Ordering::Relaxed),
                snaps.load(Ordering::Relaxed),
                figures(vmm, sd_pid, &mut sdc)?
            );
        }
        Ok(())
    };
    for cycle in 1..=cycles {
        run(cycle).with_context(|| progress.place())?;
    }
    stop.store(true, Ordering::SeqCst);
    for h in side {
        h.join()
            .map_err(|_| anyhow::anyhow!("side client panicked"))??;
    }
    old.extend(taken.try_iter());
    delete_unused(&mut sdc, &mut old, KEEP);
    let end = figures(vmm, sd_pid, &mut sdc)?;
    println!(
        "soak: {cycles} cycles in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "  after cycle 10: {:?}",
        start.context("fewer than 10 cycles")?
    );
    println!("  at the end:     {end:?}");
    Ok(())
}

/// Each thread of process `pid` on this host: name, state, wait channel, system call and
/// kernel stack (what a VMM or snapshotd thread is blocked in).
fn host_tasks(pid: u32) -> String {
    let Some(threads) = fissile_sandbox::proc_threads(pid) else {
        return format!("pid {pid} is gone");
    };
    threads
        .iter()
        .map(|t| {
            format!(
                "== {} {} state={} wchan={} syscall={}\n{}",
                t.dir.display(),
                t.name,
                t.state,
                t.wchan,
                t.syscall,
                t.stack
            )
        })
        .collect()
}

/// What each task in the guest is blocked in (state, wait channel, syscall, kernel stack),
/// asked of the agent over a new connection: when a cell hangs while the agent still
/// answers, this shows where the REPL waits.
fn guest_tasks(vsock: &std::path::Path) -> String {
    const SCRIPT: &str = r#"for d in /proc/[0-9]*/task/[0-9]*; do
  [ -r $d/syscall ] || continue
  case "$(cat $d/syscall 2>/dev/null)" in running|0\ 0x0\ 0x0\ 0x0\ 0x0\ 0x0\ 0x0*) continue;; esac
  echo "== $d $(cat $d/comm 2>/dev/null) state=$(cut -d' ' -f3 $d/stat 2>/dev/null) wchan=$(cat $d/wchan 2>/dev/null) syscall=$(cat $d/syscall 2>/dev/null)"
  cat $d/stack 2>/dev/null
done
for f in /proc/[0-9]*/fd/*; do echo "$f -> $(readlink $f)"; done 2>/dev/null | grep -v "/proc/self\|/proc/$$/"
cat /proc/loadavg /proc/uptime"#;
    let ask = || -> anyhow::Result<String> {
        let mut agent = fissile_agent::client::AgentClient::connect_hybrid_vsock(
            vsock,
            fissile_proto::agent::AGENT_VSOCK_PORT,
        )?;
        agent.set_call_timeout(std::time::Duration::from_secs(30))?;
        let out = agent.shell(&fissile_proto::agent::ShellRequest {
            command: fissile_proto::agent::ShellCommand::Script(SCRIPT.into()),
            cwd: None,
            env: Default::default(),
            stdin: Vec::new(),
            timeout_ms: Some(20_000),
        })?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    ask().unwrap_or_else(|e| format!("could not ask the guest: {e:#}"))
}
