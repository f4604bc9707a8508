//! Snapshot lifecycle benchmarks, side by side in one run, each against a baseline measured
//! in the same run (in the lab: real nested KVM, ~10-50x real hardware; compare ratios):
//!
//! 1. **restore → first exec** against **cold boot → first exec**: a warm sandbox (Python
//!    started) is persisted; it is restored from the hot image, and again after a snapshotd
//!    restart (lazily from the store through userfaultfd; the restarted daemon first serves an
//!    untimed lazy restore of another snapshot, so its code is warm). That lazy restore
//!    records the pages it touched first as the snapshot's first-touch order, with their
//!    contents; after another restart a third restore prefetches them in that order, and
//!    after one more a fourth does so into a pre-started VMM (as fissiled restores).
//!    Targets: ≤ 0.08× from the hot image, ≤ 0.2× from the store.
//! 2. **fork(n)**, n = 1, 4, 16, until every child answered, against the baseline "full
//!    snapshot + n eager full restores": copying all guest memory to a file, then per child
//!    reading it back into fresh memory plus a restore process reaching its agent. Target:
//!    fork(4) ≤ 0.2× the baseline.
//! 3. **merge_into** against the winner's dirty-set size (1, 16, 64 MiB written): until the
//!    parent answered again / the merge op (target ≤ 1.2×), beside its floor, (merge op +
//!    one steady exec of the merged parent) / merge op: the ratio had the wake-up cost
//!    nothing and the first exec no more than a steady one.
//!
//!    Part 1 also times the wake-up's round trips on a restored guest: connect, then
//!    `AfterRestore` + `Info` (two trips), against all three in one write (one trip, what a
//!    restore, fork or merge does).
//!
//!    Each row is also measured into VMMs started ahead of time (`Standby`: process started,
//!    KVM VM and vCPUs made, ready before the clock starts): a restore from the hot image and
//!    fork(n) into n of them.
//! 4. **private memory per child** right after fork (smaps of each child VMM: the guest-RAM
//!    pages it copied, its PSS, and the whole process), and again after each child's trim
//!    (what fissiled does to an idle sandbox: the copies that hold the image's bytes again
//!    go back to the image). Target < 1 MiB of guest memory per child. Then again after
//!    each child ran one exec on its forked state, and after another trim.
//!
//! Usage: `lifecycle_bench [restore | fork4 | merge | rounds] [--runs N]` (needs KVM;
//! elsewhere `fissile-lab run -- lifecycle_bench`); `restore` runs part 1 only, `fork4`
//! fork(4) and part 4 only, `merge` part 3 only. `--runs N` runs it N times over, each with
//! a store of its own, then prints every row's min / median / max over the runs, its target
//! judged on the median. `rounds` (not in the whole run) merges a 1 MiB winner into one
//! parent 20 times over, each time with the store idle: each round lays two layers, so it
//! passes the depth at which snapshotd flattens a layer (16 below it).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use fissile_benches::tally::Tally;
use fissile_benches::{
    cpu_ms, eval, grown, host_idle_ms, kvm_counter, kvm_counters, page_faults, smaps, smaps_top,
    thread_cpu_ms, thread_switches,
};
use fissile_proto::control::ControlRequest;
use fissile_sandbox::{ChildPlace, Sandbox, SandboxConfig, Snapshotd, Standby};
use fissile_snapshotd::client::{Client, DaemonStats};

const MEM_MIB: u64 = 512;

/// How long a pre-started VMM may take to be ready (in the lab, several start at once).
const STANDBY_READY_TIMEOUT: Duration = Duration::from_secs(300);

/// `n` pre-started VMMs for sandboxes of `env`'s shape, each ready.
fn standbys(env: &mut Env, sd: &Snapshotd, n: u32) -> anyhow::Result<Vec<Standby>> {
    let mut all = (0..n)
        .map(|_| Standby::start(&env.cfg(sd)))
        .collect::<Result<Vec<_>, _>>()?;
    for s in &mut all {
        s.wait_ready(STANDBY_READY_TIMEOUT)?;
    }
    Ok(all)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Env {
    tmp: PathBuf,
    base: SandboxConfig,
    n: u32,
}

impl Env {
    fn cfg(&mut self, sd: &Snapshotd) -> SandboxConfig {
        self.n += 1;
        let mut c = self.base.clone();
        c.dir = self.tmp.join(format!("sb-{}", self.n));
        c.snapshotd = Some(sd.socket().to_path_buf());
        c
    }
}

fn restore_vs_boot(
    env: &mut Env,
    sd_root: &Path,
    sd_sock: &Path,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let sd = Snapshotd::start(sd_root, sd_sock)?;
    let pf_before = kvm_counter("pf_fixed");
    let t = Instant::now();
    let mut cold = Sandbox::boot(&env.cfg(&sd))?;
    eval(&mut cold, "1+1")?;
    let boot_first = t.elapsed();
    let boot_mapped = grew(pf_before, kvm_counter("pf_fixed"))
        .map_or(String::new(), |n| format!(" (KVM mapped {n} guest pages)"));
    let id = cold.persist(Duration::from_secs(300))?;

    let (hot_first, hot_steps) = restore_first_exec(env, &sd, &id)?;
    let (standby_first, standby_steps) = restore_first_exec_in(env, &sd, &id, true)?;
    // Another snapshot of the same guest (a layer on `id`, stored whole in the store), to
    // warm up a restarted snapshotd (below).
    let spare = Sandbox::restore(&env.cfg(&sd), &id)?.snapshot(true)?.id;
    let (two_trips, one_trip) = wake_trips(env, &sd, &id)?;

    // Three times lazily from the store, each after a restart: the first records the
    // snapshot's first-touch order (and stores its pages' contents), the second prefetches
    // it, and so does the third, into a pre-started VMM (as fissiled restores).
    sd.kill();
    let (lazy_first, lazy_steps, lazy_stats) =
        lazy_restore(env, sd_root, sd_sock, &id, &spare, false)?;
    let (prefetched_first, prefetched_steps, prefetched_stats) =
        lazy_restore(env, sd_root, sd_sock, &id, &spare, false)?;
    let (pre_lazy_first, pre_lazy_steps, pre_lazy_stats) =
        lazy_restore(env, sd_root, sd_sock, &id, &spare, true)?;
    println!("1. restore -> first exec vs cold boot -> first exec ({MEM_MIB} MiB)");
    println!(
        "   {:<30} {:>9.1} ms{boot_mapped}",
        "cold boot -> first exec",
        ms(boot_first)
    );
    // Targets from the speed issue's table.
    // (as printed, its row in the summary, time, target)
    for (what, row, d, target) in [
        ("restore, hot image", "restore, hot image", hot_first, 0.08),
        (
            "same, into a pre-started VMM",
            "restore, hot image, pre-started VMM",
            standby_first,
            0.08,
        ),
        (
            "restore, from store (uffd)",
            "restore, from store",
            lazy_first,
            0.2,
        ),
        (
            "same, first touches prefetched",
            "restore, from store, prefetched",
            prefetched_first,
            0.2,
        ),
        (
            "same, into a pre-started VMM",
            "restore, prefetched, pre-started VMM",
            pre_lazy_first,
            0.2,
        ),
    ] {
        let r = d.as_secs_f64() / boot_first.as_secs_f64();
        tally.ratio(row, r, Some(target));
        println!(
            "   {what:<30} {:>9.1} ms  ratio {r:.3}x (target <= {target:.2}x: {})",
            ms(d),
            if r <= target { "met" } else { "MISSED" }
        );
    }
    println!("   steps:");
    for (what, steps) in [
        ("hot image", hot_steps),
        ("pre-started", standby_steps),
        ("from store", lazy_steps),
        ("prefetched", prefetched_steps),
        ("prefetched, pre-started", pre_lazy_steps),
    ] {
        println!("     {what:<23} {steps}");
    }
    println!(
        "   wake-up on a restored guest, median of {WAKE_ROUNDS}: connect, then AfterRestore + Info {:.2} ms; all in one write {:.2} ms (ratio {:.2}x)",
        ms(two_trips),
        ms(one_trip),
        one_trip.as_secs_f64() / two_trips.as_secs_f64()
    );
    for (what, (faults, pages)) in [
        ("from store", lazy_stats),
        ("prefetched", prefetched_stats),
        ("prefetched, pre-started", pre_lazy_stats),
    ] {
        println!(
            "   {what}: {faults} faults served through userfaultfd, {pages} pages brought into the image (store reads and zero fills)"
        );
    }
    Ok(())
}

/// How many wake-ups of each kind [`wake_trips`] times.
const WAKE_ROUNDS: usize = 21;

/// The median time of a wake-up's connection on a guest restored from `id`, done in two
/// round trips (connect; `AfterRestore` + `Info`) and in one (all in one write), alternating.
/// The guest's vsock is not reset between them: this is the round trips alone.
fn wake_trips(env: &mut Env, sd: &Snapshotd, id: &str) -> anyhow::Result<(Duration, Duration)> {
    use fissile_agent::AgentClient;
    use fissile_proto::agent::AGENT_VSOCK_PORT;
    let cfg = env.cfg(sd);
    let mut sb = Sandbox::restore(&cfg, id)?;
    eval(&mut sb, "1+1")?;
    let uds = cfg.dir.join("vsock.sock");
    let entropy = [7u8; 64];
    let now = || -> anyhow::Result<u64> {
        Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64)
    };
    let (mut two, mut one) = (Vec::new(), Vec::new());
    for _ in 0..WAKE_ROUNDS {
        let t = Instant::now();
        let mut agent = AgentClient::connect_hybrid_vsock(&uds, AGENT_VSOCK_PORT)?;
        agent.wake(&entropy, now()?)?;
        two.push(t.elapsed());
        drop(agent);
        let t = Instant::now();
        let (agent, _) = AgentClient::connect_hybrid_vsock_waking(
            &uds,
            AGENT_VSOCK_PORT,
            &entropy,
            now()?,
            Duration::from_secs(30),
        )?;
        one.push(t.elapsed());
        drop(agent);
    }
    two.sort();
    one.sort();
    Ok((two[WAKE_ROUNDS / 2], one[WAKE_ROUNDS / 2]))
}

/// Starts snapshotd on the store and restores `id` from it lazily (a fresh daemon has no
/// image in memory), timing the first exec; then what the daemon served for it (faults, pages
/// read) once the sandbox is gone. Untimed first, the daemon serves a lazy restore of
/// `spare` (another snapshot, so another image): in the lab a freshly started process runs
/// each code path under TCG translation the first time, which real hardware does not pay,
/// and a long-running snapshotd whose image was evicted has its code warm anyway.
fn lazy_restore(
    env: &mut Env,
    sd_root: &Path,
    sd_sock: &Path,
    id: &str,
    spare: &str,
    standby: bool,
) -> anyhow::Result<(Duration, String, (u64, u64))> {
    let sd = Snapshotd::start(sd_root, sd_sock)?;
    restore_first_exec(env, &sd, spare)?;
    // A fault session ends (and stores the order it recorded, or its pages' contents)
    // after its VMM exits: in the lab that takes up to a second or so. (A restore that
    // finds no order stored shows it: as many faults as pages brought in.)
    std::thread::sleep(Duration::from_secs(5));
    let before = Client::connect(sd.socket())?.stats()?;
    let (first, steps) = restore_first_exec_in(env, &sd, id, standby)?;
    std::thread::sleep(Duration::from_secs(5));
    let after = Client::connect(sd.socket())?.stats()?;
    sd.kill();
    let served = |a: &DaemonStats, b: &DaemonStats| {
        (
            a.faults_served.saturating_sub(b.faults_served),
            a.image_bytes.saturating_sub(b.image_bytes) / 4096,
        )
    };
    Ok((first, steps, served(&after, &before)))
}

/// `text` without its terminal colour sequences (`ESC [ … m`), as the VMM's log has them.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Restores `id` and runs `1+1`: the time until its result, and the steps as a line (the
/// VMM's own figures from its log, then until the agent answered, then the exec).
fn restore_first_exec(
    env: &mut Env,
    sd: &Snapshotd,
    id: &str,
) -> anyhow::Result<(Duration, String)> {
    restore_first_exec_in(env, sd, id, false)
}

/// [`restore_first_exec`], into a pre-started VMM when `standby` (started and ready before
/// the clock starts).
fn restore_first_exec_in(
    env: &mut Env,
    sd: &Snapshotd,
    id: &str,
    standby: bool,
) -> anyhow::Result<(Duration, String)> {
    let cfg = env.cfg(sd);
    let pre = if standby {
        let mut s = Standby::start(&cfg)?;
        s.wait_ready(STANDBY_READY_TIMEOUT)?;
        Some(s)
    } else {
        None
    };
    let pf = || kvm_counter("pf_fixed");
    let sd_cpu = || cpu_ms(sd.pid());
    // Faults snapshotd served (every session: here only this VM's has any to serve).
    let faults_before = faults_served(sd)?;
    let before = pf();
    let sd_before = sd_cpu();
    let idle_before = host_idle_ms();
    let t = Instant::now();
    let mut sb = match pre {
        Some(s) => Sandbox::restore_standby(s, id)?,
        None => Sandbox::restore(&cfg, id)?,
    };
    let ready = t.elapsed();
    let at_ready = pf();
    let sd_at_ready = sd_cpu();
    let idle_at_ready = host_idle_ms();
    // Read outside the timed steps (a round trip to snapshotd).
    let faults_at_ready = faults_served(sd)?;
    let vmm = sb.pid();
    let vmm_threads = || vmm.map_or_else(Default::default, thread_cpu_ms);
    let threads_at_ready = vmm_threads();
    // Minor faults: pages already in the image (prefetched, or copied on write); major:
    // those that waited, such as the ones snapshotd served through userfaultfd when the
    // vCPU thread took them itself (KVM's asynchronous faults are a kworker's).
    let vmm_faults = || vmm.map_or((0, 0), page_faults);
    let vmm_faults_at_ready = vmm_faults();
    let idle_at_exec = host_idle_ms();
    let kvm_at_exec = kvm_counters();
    let e = Instant::now();
    eval(&mut sb, "1+1")?;
    let exec = e.elapsed();
    let first = ready + exec;
    let after_first = pf();
    let sd_after_first = sd_cpu();
    let idle_after_first = host_idle_ms();
    let faults_in_exec = {
        let (minor, major) = vmm_faults();
        (
            minor.saturating_sub(vmm_faults_at_ready.0),
            major.saturating_sub(vmm_faults_at_ready.1),
        )
    };
    // The VMM's threads that took CPU time in the exec (10 ms ticks).
    let threads_in_exec = named(grown(&threads_at_ready, vmm_threads()));
    let uffd_in_exec = faults_served(sd)?.saturating_sub(faults_at_ready);
    let kvm_in_exec = named(grown(&kvm_at_exec, kvm_counters()));
    let e = Instant::now();
    eval(&mut sb, "1+1")?;
    let second = e.elapsed();
    let after_second = pf();
    drop(sb);
    // KVM's page mappings (pf_fixed, every VM on the host: here only this one runs): what
    // a restored guest pays to touch memory it has not touched since its restore.
    let mapped = match (
        two_steps([before, at_ready, after_first]),
        grew(after_first, after_second),
    ) {
        (Some((wake, first)), Some(again)) => format!(
            " | KVM mapped {wake} guest pages until the agent answered, {first} in the first \
             exec, {again} in the second ({:.1} ms): {:.3} ms per page mapped",
            ms(second),
            (ms(exec) - ms(second)) / (first.saturating_sub(again).max(1)) as f64
        ),
        _ => format!(" | second exec {:.1} ms", ms(second)),
    };
    // snapshotd's CPU time (user and system, 10 ms ticks; the whole daemon, so threads
    // of earlier rows still ending count too): what serving the image cost, on the lab's
    // one CPU the guest's too.
    // Host CPU idle (all CPUs; the lab has one): a step that waits shows it here, one that
    // works does not.
    let steps = format!(
        "VMM {} | agent answered {:.1} ms (snapshotd CPU {} ms, {} uffd faults, host idle {} \
         ms) | first exec {:.1} ms (snapshotd CPU {} ms, {} uffd faults, host idle {} ms, VMM \
         threads' CPU ms [{threads_in_exec}], KVM [{kvm_in_exec}], VMM page faults {} minor, {} \
         major){mapped}",
        vmm_steps(&cfg.dir),
        ms(ready),
        sd_at_ready.saturating_sub(sd_before),
        faults_at_ready.saturating_sub(faults_before),
        idle_at_ready.saturating_sub(idle_before),
        ms(exec),
        sd_after_first.saturating_sub(sd_at_ready),
        uffd_in_exec,
        idle_after_first.saturating_sub(idle_at_exec),
        faults_in_exec.0,
        faults_in_exec.1,
    );
    Ok((first, steps))
}

/// The faults `sd` has served so far, by every fault session.
fn faults_served(sd: &Snapshotd) -> anyhow::Result<u64> {
    Ok(Client::connect(sd.socket())?.stats()?.faults_served)
}

/// `name n` of each of `counts`, comma-separated.
fn named(counts: Vec<(String, u64)>) -> String {
    counts
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The restore's steps as the VMM in `dir` logged them (with `RUST_LOG=fissile_vmm=info`).
fn vmm_steps(dir: &Path) -> String {
    let log = strip_ansi(&std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default());
    let vmm: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" restored") || l.contains("standby: VM made"))
        .flat_map(str::split_whitespace)
        .filter(|w| {
            ["state_ms=", "memory_ms=", "built_ms=", "vm_ms="]
                .iter()
                .any(|k| w.starts_with(k))
        })
        .collect();
    if vmm.is_empty() {
        "(its own figures with RUST_LOG=fissile_vmm=info)".to_string()
    } else {
        vmm.join(" ")
    }
}

/// The baseline: copy all guest memory to a file (a full snapshot), then `n` times read it
/// back into fresh memory and restore a VMM to its agent (an eager full restore).
fn full_snapshot_baseline(
    env: &mut Env,
    sd: &Snapshotd,
    warm: &str,
    n: u32,
) -> anyhow::Result<Duration> {
    // One eager restore costs: reading the memory file + a restore process to its agent.
    let file = env.tmp.join("full-snapshot.mem");
    let mem = vec![0x5au8; (MEM_MIB as usize) << 20];
    let t = Instant::now();
    File::create(&file)?.write_all(&mem)?;
    let snapshot_cost = t.elapsed();
    drop(mem);
    let mut restore_costs = Duration::ZERO;
    let mut one_restore = None;
    for _ in 0..n.min(2) {
        let t = Instant::now();
        let mut buf = Vec::with_capacity((MEM_MIB as usize) << 20);
        File::open(&file)?.read_to_end(&mut buf)?;
        let mut sb = Sandbox::restore(&env.cfg(sd), warm)?;
        eval(&mut sb, "1")?;
        let d = t.elapsed();
        drop(sb);
        drop(buf);
        one_restore = Some(one_restore.map_or(d, |o: Duration| o.min(d)));
        restore_costs += d;
    }
    // Beyond two, eager restores cost the same each (measured twice, the best of them).
    if n > 2
        && let Some(one) = one_restore
    {
        restore_costs += one * (n - 2);
    }
    let _ = std::fs::remove_file(&file);
    Ok(snapshot_cost + restore_costs)
}

/// What guest RAM's mappings are called in smaps: a memfd, `fissile-guest-ram` (booted) or
/// `fissile-image-<snapshot>` (restored). (Not just `fissile-`: that also matches the
/// `fissile-vmm` binary, whose relocated data is a few hundred kB of private pages.)
const GUEST_RAM: &str = "/memfd:fissile-";

/// The guest RAM `sb`'s VMM has copied (smaps `Anonymous` of its guest RAM, kB).
fn guest_anon(sb: &Sandbox) -> u64 {
    smaps(sb.pid().unwrap_or(0), GUEST_RAM)
        .0
        .get("Anonymous")
        .copied()
        .unwrap_or(0)
}

/// Trims each of `children`: what each trim dropped of its private pages (`dropped/private`),
/// how long it paused its VM (ms), and the guest RAM each has copied afterwards (kB).
fn trim_each(children: &[Sandbox]) -> anyhow::Result<(Vec<String>, Vec<String>, Vec<u64>)> {
    let (mut trimmed, mut paused, mut anon) = (Vec::new(), Vec::new(), Vec::new());
    for c in children {
        let t = c.trim()?;
        trimmed.push(format!("{}/{}", t.dropped_pages, t.private_pages));
        paused.push(format!("{:.1}", t.paused_ms));
        anon.push(guest_anon(c));
    }
    Ok((trimmed, paused, anon))
}

/// How long fork children sit idle while their VMMs' CPU time is measured.
const IDLE: Duration = Duration::from_secs(5);

fn fork_bench(env: &mut Env, sd: &Snapshotd, ns: &[u32], tally: &mut Tally) -> anyhow::Result<()> {
    println!("2. fork(n) until every child answered vs full snapshot + n eager full restores");
    let mut parent = Sandbox::boot(&env.cfg(sd))?;
    eval(&mut parent, "import numpy, pandas\nx = 41\n1")?;
    let warm = parent.snapshot(true)?.id;
    let served = || faults_served(sd);
    for &n in ns {
        let before = served()?;
        let (mut children, t) = parent.fork(n)?;
        let ours = t.all_answered_ms;
        // Faults served by every fault session meanwhile (the children's, the parent's): pages
        // a guest touched that were not in its image yet.
        let faults = served()?.saturating_sub(before);
        // 4. private memory of each child right after fork, before it writes anything.
        if n == 4 {
            // Anonymous = the child's own copies of guest pages (copy-on-write). A page it only
            // read is page cache shared with the image; smaps calls it Private_Clean when no
            // other process maps it, though it costs no extra memory.
            let mut anon = Vec::new();
            let mut clean = Vec::new();
            let mut pss = Vec::new();
            let mut whole = Vec::new();
            for c in &children {
                let (guest, process) = smaps(c.pid().unwrap_or(0), GUEST_RAM);
                let kb = |m: &HashMap<String, u64>, f: &str| m.get(f).copied().unwrap_or(0);
                anon.push(kb(&guest, "Anonymous"));
                clean.push(kb(&guest, "Private_Clean"));
                pss.push(kb(&guest, "Pss"));
                whole.push(kb(&process, "Private_Dirty"));
            }
            println!(
                "4. private memory per child right after fork(4) (each child has answered its \
                 agent handshake):\n   guest RAM copied (Anonymous) {anon:?} kB (target < 1024 kB: \
                 {}); guest RAM PSS {pss:?} kB; read-only page cache only it maps \
                 (Private_Clean) {clean:?} kB; whole VMM process Private_Dirty {whole:?} kB \
                 (target <= 4096 kB: {})",
                if anon.iter().all(|&k| k < 1024) {
                    "met"
                } else {
                    "MISSED"
                },
                if whole.iter().all(|&k| k <= 4096) {
                    "met"
                } else {
                    "MISSED"
                }
            );
            let most = |v: &[u64]| v.iter().copied().max().unwrap_or(0) as f64;
            tally.record(
                "fork(4): guest RAM copied, the most of a child",
                "kB",
                most(&anon),
                Some(1023.0),
            );
            tally.record(
                "fork(4): whole VMM Private_Dirty, the most of a child",
                "kB",
                most(&whole),
                Some(4096.0),
            );
            // The same children after a trim: each VMM drops its copies whose bytes ended as
            // they were in the image (a lock taken and released, a count raised and lowered).
            let (trimmed, trim_paused, anon_after) = trim_each(&children)?;
            println!(
                "   after a trim (copies equal to the image dropped / private pages: {trimmed:?}; \
                 paused {trim_paused:?} ms): guest RAM copied (Anonymous) {anon_after:?} kB \
                 (target < 1024 kB: {})",
                if anon_after.iter().all(|&k| k < 1024) {
                    "met"
                } else {
                    "MISSED"
                }
            );
            if let Some(c) = children.first() {
                let top = smaps_top(c.pid().unwrap_or(0), "Private_Dirty", 8);
                println!("   first child's Private_Dirty by mapping (kB): {top:?}");
            }
            // And after each child ran one exec on the state it was forked with, before and
            // after another trim.
            let mut ran = Vec::new();
            for c in &mut children {
                anyhow::ensure!(eval(c, "x + 1")? == "42", "a child lost its state");
                ran.push(guest_anon(c));
            }
            let (trimmed, _, ran_trimmed) = trim_each(&children)?;
            // No target of its own: the 1 MiB is for a child that has only answered.
            println!(
                "   after one exec each: guest RAM copied (Anonymous) {ran:?} kB; after \
                 another trim (dropped / private pages: {trimmed:?}) {ran_trimmed:?} kB"
            );
            // What an idle child costs the host's CPU: its VMM's CPU time over a few idle
            // seconds (10 ms ticks), and its guest RAM copied by the end of them.
            let cpu: Vec<u64> = children
                .iter()
                .map(|c| cpu_ms(c.pid().unwrap_or(0)))
                .collect();
            let first = children.first().and_then(Sandbox::pid).unwrap_or(0);
            let threads = thread_cpu_ms(first);
            let (vmm_sw, sd_sw) = (thread_switches(first), thread_switches(sd.pid()));
            std::thread::sleep(IDLE);
            let by_thread = grown(&threads, thread_cpu_ms(first));
            let vmm_woke = grown(&vmm_sw, thread_switches(first));
            // The daemon serves every child's fault session (and the parent's).
            let sd_woke = grown(&sd_sw, thread_switches(sd.pid()));
            let idle_cpu: Vec<u64> = children
                .iter()
                .zip(&cpu)
                .map(|(c, before)| cpu_ms(c.pid().unwrap_or(0)).saturating_sub(*before))
                .collect();
            let idle_anon: Vec<u64> = children.iter().map(guest_anon).collect();
            println!(
                "   idle for {} s: VMM CPU {idle_cpu:?} ms (the first child's by thread: \
                 {by_thread:?}); guest RAM copied by then {idle_anon:?} kB",
                IDLE.as_secs()
            );
            println!(
                "   idle for {} s, thread wake-ups (context switches): the first child's VMM \
                 {vmm_woke:?}; snapshotd, for all {} children and the parent {sd_woke:?}",
                IDLE.as_secs(),
                children.len()
            );
        }
        let children_dirs: Vec<PathBuf> = children.iter().map(|c| c.dir().to_path_buf()).collect();
        drop(children);
        // The same fork into n VMMs started ahead of time (a warm pool of them).
        let pool = standbys(env, sd, n)?;
        let pool_before = served()?;
        let (outcomes, pt) = parent.fork_each_with(
            pool.into_iter()
                .map(|s| ChildPlace::Standby(Box::new(s)))
                .collect(),
        )?;
        let pooled: Vec<Sandbox> = outcomes.into_iter().collect::<Result<_, _>>()?;
        let pool_faults = served()?.saturating_sub(pool_before);
        if let (Some(a), Some(b)) = (children_dirs.first(), pooled.first()) {
            println!("   first child's VMM steps: new process {}", vmm_steps(a));
            println!(
                "   first child's VMM steps: pre-started {}",
                vmm_steps(b.dir())
            );
        }
        drop(pooled);
        let base = full_snapshot_baseline(env, sd, &warm, n)?;
        let r = ours / ms(base);
        let target = match n {
            4 => Some(0.2),
            16 => Some(0.3),
            _ => None,
        };
        tally.ratio(&format!("fork({n}), new processes"), r, target);
        println!(
            "   fork({n:>2}): {ours:>9.1} ms (VMM {:.1} ms, paused {:.1} ms, {} dirty pages, \
             {faults} faults served through userfaultfd) baseline {:>9.1} ms  ratio {r:.3}x{}",
            t.vmm_ms,
            t.snapshot.paused_ms,
            t.snapshot.dirty_pages,
            ms(base),
            match target {
                Some(t) => format!(
                    " (target <= {t:.2}x: {})",
                    if r <= t { "met" } else { "MISSED" }
                ),
                None => String::new(),
            }
        );
        let rp = pt.all_answered_ms / ms(base);
        tally.ratio(&format!("fork({n}), pre-started VMMs"), rp, target);
        println!(
            "   fork({n:>2}) into {n} pre-started VMMs: {:>9.1} ms (VMM {:.1} ms, requests sent              {:.1} ms, {pool_faults} faults served through userfaultfd) ratio {rp:.3}x, {:.2}x the fork without them{}",
            pt.all_answered_ms,
            pt.vmm_ms,
            pt.spawn_ms,
            pt.all_answered_ms / ours,
            match target {
                Some(t) => format!(
                    " (target <= {t:.2}x: {})",
                    if rp <= t { "met" } else { "MISSED" }
                ),
                None => String::new(),
            }
        );
    }
    Ok(())
}

fn merge_bench(env: &mut Env, sd: &Snapshotd, tally: &mut Tally) -> anyhow::Result<()> {
    println!(
        "3. merge_into against the winner's dirty set, once right after the winner's snapshot \
         (snapshotd still ingesting it and the fork's in the background) and once with the \
         store idle"
    );
    let mut parent = Sandbox::boot(&env.cfg(sd))?;
    eval(&mut parent, "x = 0\n1")?;
    let mut rows = Vec::new();
    for mib in [1u64, 16, 64] {
        for idle in [false, true] {
            rows.push(merge_once(env, &mut parent, sd, mib, idle)?);
        }
    }
    println!(
        "   until the parent answered again / the merge op (target <= 1.2x), and the floor: \
         (merge op + one steady exec) / merge op, what it would be had the wake-up cost \
         nothing and the first exec no more than a steady one:"
    );
    for MergeRow {
        mib,
        idle,
        ratio,
        floor,
    } in rows
    {
        let store = if idle {
            "store idle"
        } else {
            "store ingesting"
        };
        println!("     {mib:>2} MiB, {store:<15}: {ratio:.1}x (floor {floor:.2}x)");
        tally.ratio(
            &format!("merge {mib} MiB, {store}: answered / op"),
            ratio,
            Some(1.2),
        );
        tally.ratio(&format!("merge {mib} MiB, {store}: floor"), floor, None);
    }
    let _ = parent.control()?.call(&ControlRequest::Status)?;
    Ok(())
}

/// Twenty rounds of fork(1) and merge of a 1 MiB winner into one parent (see the usage).
fn rounds_bench(env: &mut Env, sd: &Snapshotd) -> anyhow::Result<()> {
    const ROUNDS: usize = 20;
    println!(
        "rounds: {ROUNDS} rounds of fork(1), a winner writing 1 MiB, and merge into one parent \
         with the store idle (two layers a round; snapshotd flattens a layer with 16 below it)"
    );
    let mut parent = Sandbox::boot(&env.cfg(sd))?;
    eval(&mut parent, "x = 0\n1")?;
    let mut ratios = Vec::new();
    for round in 1..=ROUNDS {
        print!("   round {round:>2}: ");
        // With the store idle before each merge: the ingest thread, which flattens a deep
        // layer right after its ingest, has caught up (in the lab it lags rounds behind).
        ratios.push(merge_once(env, &mut parent, sd, 1, true)?.ratio);
    }
    println!("   until the parent answered again / the merge op, by round (target <= 1.2x):");
    for (i, chunk) in ratios.chunks(5).enumerate() {
        let shown: Vec<String> = chunk.iter().map(|r| format!("{r:.1}x")).collect();
        println!(
            "     rounds {:>2}-{:>2}: {}",
            i * 5 + 1,
            i * 5 + chunk.len(),
            shown.join(" ")
        );
    }
    Ok(())
}

/// How much a counter read three times (`None`: unreadable) grew between the first two
/// readings and between the last two.
fn two_steps([a, b, c]: [Option<u64>; 3]) -> Option<(u64, u64)> {
    Some((grew(a, b)?, grew(b, c)?))
}

/// How much a counter grew from reading `from` to reading `to` (`None`: either unreadable).
fn grew(from: Option<u64>, to: Option<u64>) -> Option<u64> {
    Some(to?.saturating_sub(from?))
}

/// One fork of `parent` whose child writes `mib` MiB and is merged back; `idle`: first wait
/// until snapshotd has ingested the winner's snapshot (and so everything queued before it).
fn merge_once(
    env: &mut Env,
    parent: &mut Sandbox,
    sd: &Snapshotd,
    mib: u64,
    idle: bool,
) -> anyhow::Result<MergeRow> {
    let (mut children, _) = parent.fork(1)?;
    // The parent's first exec after its fork snapshot (the snapshot maps its layer in
    // place, so the parent's working set stays mapped).
    let k0 = kvm_counter("pf_fixed");
    let tp = Instant::now();
    eval(parent, "1")?;
    let parent_exec = ms(tp.elapsed());
    let parent_mapped = grew(k0, kvm_counter("pf_fixed"))
        .map(|n| format!(", KVM mapped {n} guest pages"))
        .unwrap_or_default();
    eval(
        &mut children[0],
        &format!("blob = bytearray(b'\\x01' * ({mib} << 20))\nx = {mib}\n1"),
    )?;
    let t = Instant::now();
    let snap = children[0].snapshot(false)?;
    let winner_ms = ms(t.elapsed());
    let store = if idle {
        let tw = Instant::now();
        Client::connect(sd.socket())?.wait_durable(&snap.id)?;
        format!("store idle (waited {:.0} ms for it)", ms(tw.elapsed()))
    } else {
        "store ingesting".to_string()
    };
    let faults_before = faults_served(sd)?;
    let pid = parent.pid().unwrap_or(0);
    let (host_before, sd_cpu_before) = (page_faults(pid), cpu_ms(sd.pid()));
    let kvm_before = kvm_counter("pf_fixed");
    let tm = Instant::now();
    let m = parent.merge_snapshot(&snap.id)?;
    let merged = tm.elapsed();
    let (host_merged, kvm_merged) = (page_faults(pid), kvm_counter("pf_fixed"));
    let te = Instant::now();
    let x = eval(parent, "x")?;
    let first_exec = te.elapsed();
    let (host_exec, sd_cpu) = (
        page_faults(pid),
        cpu_ms(sd.pid()).saturating_sub(sd_cpu_before),
    );
    let answered = tm.elapsed();
    // What the guest's wake-up costs KVM: its working set mapped again, page by page (the
    // merge moved its memory to another image).
    let kvm_faults = two_steps([kvm_before, kvm_merged, kvm_counter("pf_fixed")])
        .map(|(merge, exec)| {
            format!(
                "; KVM mapped {merge} guest pages in the merge call and {exec} in the first \
                 exec (pf_fixed, every VM on the host)"
            )
        })
        .unwrap_or_default();
    let faults = faults_served(sd)?.saturating_sub(faults_before);
    anyhow::ensure!(x == mib.to_string(), "merge lost the winner's x: {x}");
    // A steady exec of the merged parent: no wake-up, its working set mapped (in the
    // "store ingesting" rows snapshotd may still be ingesting beside it).
    let ts = Instant::now();
    eval(parent, "x")?;
    let steady = ms(ts.elapsed());
    println!(
        "   winner wrote {mib:>3} MiB, {store}: {} dirty pages, winner snapshot \
         {winner_ms:.1} ms (the parent's first exec after its fork {parent_exec:.1} ms\
         {parent_mapped}), merge {:.1} ms ({}, parent paused {:.1} ms), {:.1} ms until the \
         parent answered again (merge call with the agent's reconnect {:.1} ms, then the \
         first exec {:.1} ms; {faults} faults served through userfaultfd and {sd_cpu} ms of \
         snapshotd CPU meanwhile; the VMM process took {} minor faults in the merge call and \
         {} in the first exec{kvm_faults}; a steady exec after it {steady:.1} ms)",
        snap.dirty_pages,
        m.total_ms,
        if m.in_place { "in place" } else { "remapped" },
        m.paused_ms,
        ms(answered),
        ms(merged),
        ms(first_exec),
        host_merged.0.saturating_sub(host_before.0),
        host_exec.0.saturating_sub(host_merged.0),
    );
    if idle {
        // The wake-up's baseline: the same snapshot restored into a new VMM (its agent
        // answers, then its first exec, then a second one).
        let k0 = kvm_counter("pf_fixed");
        let tr = Instant::now();
        let mut fresh = Sandbox::restore(&env.cfg(sd), &snap.id)?;
        let restored = tr.elapsed();
        let k1 = kvm_counter("pf_fixed");
        let te = Instant::now();
        let y = eval(&mut fresh, "x")?;
        let first = te.elapsed();
        let k2 = kvm_counter("pf_fixed");
        anyhow::ensure!(y == mib.to_string(), "the restore lost the winner's x: {y}");
        let mapped = two_steps([k0, k1, k2])
            .map(|(a, b)| format!("; KVM mapped {a} and {b} guest pages"))
            .unwrap_or_default();
        let t2 = Instant::now();
        eval(&mut fresh, "x")?;
        println!(
            "     baseline, the same snapshot restored into a new VMM: agent answered {:.1} ms \
             (process start and restore included), first exec {:.1} ms{mapped}; second exec \
             {:.1} ms (the merged parent's steady exec above: {steady:.1} ms)",
            ms(restored),
            ms(first),
            ms(t2.elapsed()),
        );
    }
    eval(parent, "blob = None\n1")?;
    let op = m.total_ms.max(0.001);
    Ok(MergeRow {
        mib,
        idle,
        ratio: ms(answered) / op,
        floor: (op + steady) / op,
    })
}

/// One merge's figures (see [`merge_once`]).
struct MergeRow {
    /// What the winner wrote.
    mib: u64,
    /// Whether the store was idle before the merge.
    idle: bool,
    /// Until the parent answered again / the merge op.
    ratio: f64,
    /// The least that ratio could be, had the wake-up cost nothing and the first exec no
    /// more than a steady one: (merge op + steady exec) / merge op.
    floor: f64,
}

fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut base = SandboxConfig::from_env(tmp.path().join("unused")).context("sandbox config")?;
    base.mem_mib = MEM_MIB;
    let mut env = Env {
        tmp: tmp.path().to_path_buf(),
        base,
        n: 0,
    };
    println!(
        "lifecycle_bench: {MEM_MIB} MiB guests, {}",
        if fissile_benches::in_lab() {
            "in the lab (nested KVM, ~10-50x real hardware: compare the ratios)"
        } else {
            "native KVM"
        }
    );
    let (mut part, mut runs) = (None::<String>, 1usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .context("--runs needs a number of runs, at least 1")?;
            }
            "restore" | "fork4" | "merge" | "rounds" if part.is_none() => part = Some(a),
            other => anyhow::bail!(
                "unexpected argument {other:?}; usage: lifecycle_bench [restore | fork4 | merge \
                 | rounds] [--runs N]"
            ),
        }
    }
    let mut tally = Tally::default();
    for run in 0..runs {
        if runs > 1 {
            println!("== run {} of {runs}", run + 1);
        }
        // A store of its own per run, so each records its own first-touch orders.
        let dir = tmp.path().join(format!("run{run}"));
        std::fs::create_dir_all(&dir)?;
        let (sd_root, sd_sock) = (dir.join("store"), dir.join("sd.sock"));
        match part.as_deref() {
            Some("merge") => {
                let sd = Snapshotd::start(&sd_root, &sd_sock)?;
                merge_bench(&mut env, &sd, &mut tally)?;
            }
            Some("rounds") => {
                let sd = Snapshotd::start(&sd_root, &sd_sock)?;
                rounds_bench(&mut env, &sd)?;
            }
            Some("fork4") => {
                let sd = Snapshotd::start(&sd_root, &sd_sock)?;
                fork_bench(&mut env, &sd, &[4], &mut tally)?;
            }
            Some(_) => restore_vs_boot(&mut env, &sd_root, &sd_sock, &mut tally)?,
            None => {
                restore_vs_boot(&mut env, &sd_root, &sd_sock, &mut tally)?;
                let sd = Snapshotd::start(&sd_root, &sd_sock)?;
                fork_bench(&mut env, &sd, &[1, 4, 16], &mut tally)?;
                merge_bench(&mut env, &sd, &mut tally)?;
            }
        }
        // Its daemon has ended: the next run starts from an empty disk.
        let _ = std::fs::remove_dir_all(&dir);
    }
    if runs > 1 {
        println!("summary of {runs} runs: min / median / max (a target judged on the median)");
        print!("{}", tally.summary());
    }
    Ok(())
}
