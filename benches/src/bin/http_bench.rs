//! fissiled over HTTP, side by side with its baselines in one run (in the lab: real nested
//! KVM, ~10-50x real hardware; compare ratios):
//!
//! 1. **create → first exec result → delete** over HTTP: a cold boot of the template against
//!    a create `from_snapshot` of a warmed sandbox, a plain create restoring the template's
//!    ready snapshot, and a plain create served by the warm pool (a sandbox restored from
//!    that snapshot ahead of time; each sample waits for the pool to refill). Target: from
//!    warm ≤ 0.1× cold.
//! 2. **exec `1+1`**, p50 and p99 over HTTP (NDJSON to `done`) against the same sandbox's
//!    agent over vsock directly. Target: HTTP ≤ 1.3×.
//! 3. **fork(4)** over HTTP until every child's first exec answered, against the daemon's own
//!    figure for the VMM-level fork (its children answering), `total_ms`; and fork(4) of a
//!    sandbox of the ready shape with its children in standby VMMs (`--standby-pool 4`)
//!    against the same with a new process per child.
//!
//! Usage: `http_bench [N]` (N exec samples, default 200; needs KVM; elsewhere
//! `fissile-lab run -- http_bench`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fissile_agent::AgentClient;
use fissile_proto::agent::{AGENT_VSOCK_PORT, ExecRequest};
use fissile_tests::daemon::{self, Fissiled};
use serde_json::{Value, json};

struct Daemon {
    fissiled: Fissiled,
    key: String,
    state: PathBuf,
    /// One HTTP client for every request: it keeps its connections alive, as an SDK's
    /// client does (a fresh `ureq::post` would open a TCP connection per request).
    http: ureq::Agent,
}

/// fissiled on `state` with `extra` flags, and a key for tenant `bench`.
fn start(state: &Path, extra: &[&str]) -> anyhow::Result<Daemon> {
    let bin = fissile_sandbox::paths::find_binary("fissiled")?;
    let key = daemon::create_key(&bin, state, "bench")?;
    let fissiled = Fissiled::serve_logging(&bin, state, extra, Some("warn"))?;
    Ok(Daemon {
        fissiled,
        key,
        state: state.to_path_buf(),
        http: ureq::AgentBuilder::new().build(),
    })
}

impl Daemon {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let req = self
            .http
            .request(method, &format!("{}{path}", self.fissiled.base()))
            .timeout(Duration::from_secs(900))
            .set("Authorization", &format!("Bearer {}", self.key));
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        }
        .with_context(|| format!("{method} {path}"))?;
        let text = resp.into_string()?;
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    /// Runs `code`; its main value (NDJSON read to `done`).
    fn exec(&self, id: &str, code: &str) -> anyhow::Result<String> {
        Ok(self.exec_timed(id, code)?.0)
    }

    /// [`Daemon::exec`], with the `done` event's `server_ms` (fissiled, from the agent
    /// connection in hand to `done`) and `duration_ms` (the cell, measured in the guest).
    fn exec_timed(&self, id: &str, code: &str) -> anyhow::Result<(String, f64, f64)> {
        let resp = self
            .http
            .post(&format!("{}/v1/sandboxes/{id}/exec", self.fissiled.base()))
            .timeout(Duration::from_secs(900))
            .set("Authorization", &format!("Bearer {}", self.key))
            .send_json(json!({ "code": code }))?;
        let mut value = String::new();
        let mut done = None;
        for line in BufReader::new(resp.into_reader()).lines() {
            let ev: Value = serde_json::from_str(&line?)?;
            match ev["type"].as_str() {
                Some("result") if ev["is_main_result"] == true => {
                    value = ev["data"]["text/plain"].as_str().unwrap_or("").to_string();
                }
                Some("done") => {
                    done = Some((
                        ev["server_ms"].as_f64().unwrap_or(f64::NAN),
                        ev["duration_ms"].as_f64().unwrap_or(f64::NAN),
                    ))
                }
                Some("failed") => bail!("exec failed: {ev}"),
                _ => {}
            }
        }
        let (server, guest) = done.context("no done event")?;
        Ok((value, server, guest))
    }

    /// Creates a sandbox from `body`, runs `code`, deletes it; the time it all took (ms)
    /// and the cell's value.
    fn create_exec_delete(&self, body: Value, code: &str) -> anyhow::Result<(f64, String)> {
        let (steps, _, value) = self.create_exec_delete_traced(body, code, Duration::ZERO)?;
        Ok((steps.iter().sum(), value))
    }

    /// [`Daemon::create_exec_delete`] step by step (create, first exec, delete; ms), with
    /// what the first exec cost inside: the cell's time in the guest and the page faults
    /// snapshotd served during the create and during the first exec (its `faults_served`
    /// before and after each, outside the timed steps). The figure is the daemon's total:
    /// nothing else runs here meanwhile (a warm pool starts its replacement member a second
    /// after a take, later than the first exec ends in these runs). `idle`: how long the new
    /// sandbox sits idle between the create and the first exec (untimed).
    fn create_exec_delete_traced(
        &self,
        body: Value,
        code: &str,
        idle: Duration,
    ) -> anyhow::Result<([f64; 3], FirstExec, String)> {
        let f0 = self.faults_served()?;
        let t = Instant::now();
        let id = self.create(body)?;
        let created = ms(t.elapsed());
        std::thread::sleep(idle);
        let f1 = self.faults_served()?;
        let t = Instant::now();
        let (value, _, guest_ms) = self.exec_timed(&id, code)?;
        let executed = ms(t.elapsed());
        let f2 = self.faults_served()?;
        let t = Instant::now();
        self.call("DELETE", &format!("/v1/sandboxes/{id}"), None)?;
        let deleted = ms(t.elapsed());
        let first = FirstExec {
            guest_ms,
            create_faults: f1 - f0,
            exec_faults: f2 - f1,
        };
        Ok(([created, executed, deleted], first, value))
    }

    /// snapshotd's faults served since it started (fissiled's `/metrics`).
    fn faults_served(&self) -> anyhow::Result<f64> {
        self.fissiled
            .metric("fissiled_store_faults_served")?
            .parse()
            .context("fissiled_store_faults_served")
    }

    fn create(&self, body: Value) -> anyhow::Result<String> {
        let v = self.call("POST", "/v1/sandboxes", Some(body))?;
        Ok(v["id"].as_str().context("no id")?.to_string())
    }
}

/// Inside a create's first exec (see [`Daemon::create_exec_delete_traced`]).
#[derive(Debug, Clone, Copy)]
struct FirstExec {
    /// The cell's time, measured in the guest.
    guest_ms: f64,
    /// Page faults snapshotd served during the create.
    create_faults: f64,
    /// Page faults snapshotd served during the first exec.
    exec_faults: f64,
}

/// Each thread's on-CPU time so far (ns) and how many times it has waited (voluntary
/// context switches), by process (`/proc/PID/task/TID/schedstat` and `status`); nothing for
/// a process that is `None` or gone.
fn process_costs(pids: &[Option<u32>; 3]) -> [ThreadCosts; 3] {
    pids.map(|pid| {
        let mut threads = ThreadCosts::new();
        let Some(pid) = pid else { return threads };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return threads;
        };
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let ns = std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
            let waits = std::fs::read_to_string(t.path().join("status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
            threads.insert(tid, (ns, waits));
        }
        threads
    })
}

/// On-CPU ns and waits by thread id.
type ThreadCosts = std::collections::HashMap<u32, (u64, u64)>;

/// What a process's threads spent between two readings: each thread's growth, a thread born
/// meanwhile in full (one that ended meanwhile is missed: its figures are gone).
fn spent(before: &ThreadCosts, after: &ThreadCosts) -> (u64, u64) {
    after
        .iter()
        .fold((0, 0), |(ns, waits), (tid, &(a_ns, a_waits))| {
            let (b_ns, b_waits) = before.get(tid).copied().unwrap_or((0, 0));
            (
                ns + a_ns.saturating_sub(b_ns),
                waits + a_waits.saturating_sub(b_waits),
            )
        })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let tmp = tempfile::tempdir()?;
    // Without ready snapshots first: every plain create boots (the baseline).
    let d = start(&tmp.path().join("state"), &["--no-ready-snapshots"])?;

    // 1. create → first result → delete: cold boot vs from a warmed snapshot.
    let warm = d.create(json!({}))?;
    d.exec(&warm, "import numpy, pandas\n1")?;
    let snap = d.call("POST", &format!("/v1/sandboxes/{warm}/snapshot"), None)?["snapshot_id"]
        .as_str()
        .context("no snapshot id")?
        .to_string();
    d.call("DELETE", &format!("/v1/sandboxes/{warm}"), None)?;
    let mut cold = Vec::new();
    let mut restored = Vec::new();
    for _ in 0..3 {
        for (body, out) in [
            (json!({}), &mut cold),
            (json!({ "from_snapshot": snap }), &mut restored),
        ] {
            let (took, value) = d.create_exec_delete(body, "1+1")?;
            anyhow::ensure!(value == "2");
            out.push(took);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (c, r) = (med(&mut cold), med(&mut restored));
    println!("create → first result → delete (median of 3)");
    println!("  cold boot             {c:>10.1} ms   (baseline)");
    println!(
        "  from warm snapshot    {r:>10.1} ms   {:.3}× cold   (target ≤ 0.1×)",
        r / c
    );

    // 2. exec 1+1: HTTP vs the agent over vsock directly, same sandbox.
    let id = d.create(json!({}))?;
    d.exec(&id, "1+1")?;
    let vsock = d.state.join("sandboxes").join(&id).join("vsock.sock");
    let mut agent = AgentClient::connect_hybrid_vsock(&vsock, AGENT_VSOCK_PORT)?;
    let req = ExecRequest {
        code: "1+1".into(),
        ..ExecRequest::default()
    };
    let (mut http, mut direct) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut server, mut guest) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        agent.exec(&req)?;
        direct.push(ms(t.elapsed()));
        let t = Instant::now();
        let (_, s, g) = d.exec_timed(&id, "1+1")?;
        http.push(ms(t.elapsed()));
        server.push(s);
        guest.push(g);
    }
    // What each path costs the processes on it: on-CPU time and waits, read around a run of
    // each, after the timed runs (reading /proc between timed calls would disturb them).
    let vmm = fissile_proto::pidfd::Pidfd::find_all(
        "fissile-vmm",
        &d.state
            .join("sandboxes")
            .join(&id)
            .join("api.sock")
            .to_string_lossy(),
    )?
    .first()
    .map(|p| p.pid());
    let procs = [Some(std::process::id()), vmm, Some(d.fissiled.pid())];
    let runs = n.min(100);
    let c0 = process_costs(&procs);
    for _ in 0..runs {
        agent.exec(&req)?;
    }
    let c1 = process_costs(&procs);
    for _ in 0..runs {
        d.exec(&id, "1+1")?;
    }
    let c2 = process_costs(&procs);
    for v in [&mut http, &mut direct, &mut server, &mut guest] {
        v.sort_by(f64::total_cmp);
    }
    println!("exec `1+1` ({n} each, interleaved)");
    for (p, name) in [(0.5, "p50"), (0.99, "p99")] {
        let (h, v) = (pct(&http, p), pct(&direct, p));
        println!(
            "  {name}: vsock direct {v:>8.2} ms (baseline)   HTTP {h:>8.2} ms   {:.2}×   (target ≤ 1.3×)",
            h / v
        );
    }
    // Where the HTTP time goes: the cell itself (guest), fissiled's agent round trip and
    // event stream (server), and the rest (HTTP, routing, the client).
    println!(
        "  p50 parts of an HTTP exec: cell in the guest {:.2} ms, fissiled from the agent \
         connection to `done` {:.2} ms, the rest (HTTP, routing, client) {:.2} ms",
        pct(&guest, 0.5),
        pct(&server, 0.5),
        pct(&http, 0.5) - pct(&server, 0.5)
    );
    let per = |a: &ThreadCosts, b: &ThreadCosts| {
        let (ns, waits) = spent(a, b);
        format!(
            "{:.2} ms, {:.1} waits",
            ns as f64 / runs as f64 / 1e6,
            waits as f64 / runs as f64
        )
    };
    println!(
        "  per exec ({runs} more of each), mean on-CPU time and waits (voluntary context \
         switches){}:\n    \
         vsock direct: client {}; VMM {} (its guest included)\n    \
         HTTP:         client {}; VMM {}; fissiled {}",
        if vmm.is_none() { " (no VMM found)" } else { "" },
        per(&c0[0], &c1[0]),
        per(&c0[1], &c1[1]),
        per(&c1[0], &c2[0]),
        per(&c1[1], &c2[1]),
        per(&c1[2], &c2[2]),
    );

    // 3. fork(4) over HTTP until every child answered vs the daemon's VMM-level figure.
    let t = Instant::now();
    let fork = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/fork"),
        Some(json!({ "n": 4 })),
    )?;
    let children = child_ids(&fork)?;
    for c in &children {
        d.exec(c, "1+1")?;
    }
    let over_http = ms(t.elapsed());
    let internal = fork["total_ms"].as_f64().unwrap_or(f64::NAN);
    println!("fork(4) until every child's first exec answered");
    println!("  VMM-level fork (daemon's own figure) {internal:>9.1} ms (baseline)");
    println!(
        "  over HTTP, with 4 first execs        {over_http:>9.1} ms   {:.2}×",
        over_http / internal
    );
    for c in &children {
        d.call("DELETE", &format!("/v1/sandboxes/{c}"), None)?;
    }
    d.call("DELETE", &format!("/v1/sandboxes/{id}"), None)?;
    let (cold_import, _) = d.create_exec_delete(json!({}), IMPORTS)?;
    drop(d);

    // 4. The template's ready snapshot (made at daemon start): plain creates restore it.
    let ready_state = tmp.path().join("state-ready");
    // No standbys (the forks of 5. are the baseline for those of 6.).
    let d = start(
        &ready_state,
        &[
            "--ready-shape",
            "512x1",
            "--warm-pool",
            "0",
            "--standby-on-demand",
            "0",
        ],
    )?;
    let t = Instant::now();
    let build_ms = loop {
        let templates = d.call("GET", "/v1/templates", None)?;
        let snap = &templates[0]["ready"][0]["snapshot"];
        match snap["status"].as_str() {
            Some("ready") => break snap["build_ms"].as_f64().unwrap_or(f64::NAN),
            Some("failed") => bail!("the ready snapshot failed: {snap}"),
            _ if t.elapsed() > Duration::from_secs(1800) => bail!("not ready: {snap}"),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    let mut ready = Vec::new();
    let mut ready_steps = Vec::new();
    let mut ready_first = Vec::new();
    // The same after the new sandbox sat idle (as a pooled member does before a take).
    let mut ready_idle_first = Vec::new();
    for _ in 0..3 {
        let (steps, first, value) =
            d.create_exec_delete_traced(json!({}), "1+1", Duration::ZERO)?;
        anyhow::ensure!(value == "2");
        ready.push(steps.iter().sum());
        ready_steps.push(steps);
        ready_first.push(first);
        let (_, first, value) = d.create_exec_delete_traced(json!({}), "1+1", READY_IDLE)?;
        anyhow::ensure!(value == "2");
        ready_idle_first.push(first);
    }
    let (ready_import, _) = d.create_exec_delete(json!({}), IMPORTS)?;
    // fork(4) of a sandbox of the ready shape, each child a new VMM process (the baseline of
    // part 6).
    let mut fork_new = Vec::new();
    for _ in 0..3 {
        fork_new.push(fork4(&d)?);
    }
    let r = med(&mut ready);
    println!("template ready snapshot (made once at daemon start in {build_ms:.0} ms)");
    println!(
        "  create → 1+1 → delete, median of 3 {r:>9.1} ms   {:.3}× cold boot   (target ≤ 0.1×)",
        r / c
    );
    println!(
        "  create → numpy/pandas/pyplot imported → delete: cold {cold_import:.0} ms (baseline), \
         ready {ready_import:.0} ms   {:.3}×",
        ready_import / cold_import
    );
    drop(d);

    // 5. The warm pool: the same daemon state (its ready snapshot is reused), one member.
    let d = start(
        &ready_state,
        &["--ready-shape", "512x1", "--warm-pool", "1"],
    )?;
    let mut pooled = Vec::new();
    let mut pooled_steps = Vec::new();
    let mut pooled_first = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        while d.call("GET", "/v1/templates", None)?[0]["ready"][0]["warm"].as_u64() != Some(1) {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(600),
                "the pool never filled"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let (steps, first, value) =
            d.create_exec_delete_traced(json!({}), "1+1", Duration::ZERO)?;
        anyhow::ensure!(value == "2");
        pooled.push(steps.iter().sum());
        pooled_steps.push(steps);
        pooled_first.push(first);
    }
    let p = med(&mut pooled);
    println!("warm pool (1 member, refilled between samples)");
    println!(
        "  create → 1+1 → delete, median of 3 {p:>9.1} ms   {:.3}× cold boot   {:.3}× ready \
         snapshot   (target ≤ 0.1× cold)",
        p / c,
        p / r
    );
    let step = |all: &[[f64; 3]], i: usize| med(&mut all.iter().map(|s| s[i]).collect::<Vec<_>>());
    for (name, i) in [("create", 0), ("first exec", 1), ("delete", 2)] {
        println!(
            "  {name:<10} median: ready snapshot {:>7.1} ms   warm pool {:>7.1} ms   {:.3}×",
            step(&ready_steps, i),
            step(&pooled_steps, i),
            step(&pooled_steps, i) / step(&ready_steps, i)
        );
    }
    // Where a first exec's time goes: the cell in the guest, and the pages it faulted in
    // from snapshotd (a pooled member restored long before pays its lazy page-ins now; a
    // create that restores pays part of them while it starts).
    let inside = |all: &[FirstExec], f: fn(&FirstExec) -> f64| {
        med(&mut all.iter().map(f).collect::<Vec<_>>())
    };
    for (name, f) in [
        (
            "first exec's cell in the guest, ms",
            (|x: &FirstExec| x.guest_ms) as fn(&FirstExec) -> f64,
        ),
        ("faults served during the create", |x: &FirstExec| {
            x.create_faults
        }),
        ("faults served during the first exec", |x: &FirstExec| {
            x.exec_faults
        }),
    ] {
        println!(
            "  {name:<38} median: ready snapshot {:>7.1}   ready, idle {:.0} s first {:>7.1}   \
             warm pool {:>7.1}",
            inside(&ready_first, f),
            READY_IDLE.as_secs_f64(),
            inside(&ready_idle_first, f),
            inside(&pooled_first, f),
        );
    }
    drop(d);

    // 6. Standby VMMs: the same daemon state, four standbys; fork(4) puts its children in them.
    let d = start(
        &ready_state,
        &[
            "--ready-shape",
            "512x1",
            "--warm-pool",
            "0",
            "--standby-pool",
            "4",
        ],
    )?;
    let mut fork_standby = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        while d.fissiled.metric("fissiled_sandboxes{state=\"standby\"}")? != "4" {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(600),
                "the standby pool never filled"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        fork_standby.push(fork4(&d)?);
    }
    anyhow::ensure!(
        d.fissiled.metric("fissiled_standby_taken_total")? == "12",
        "the forks did not take the standbys"
    );
    println!("fork(4) of a sandbox restored from the ready snapshot, median of 3");
    for (name, i) in [
        ("the fork call (every child answered)", 0),
        ("until every child's first exec", 1),
    ] {
        let new = med(&mut fork_new.iter().map(|f| f[i]).collect::<Vec<_>>());
        let pre = med(&mut fork_standby.iter().map(|f| f[i]).collect::<Vec<_>>());
        println!(
            "  {name:<38} new processes {new:>8.1} ms (baseline)   standby VMMs {pre:>8.1} ms   {:.2}×",
            pre / new
        );
    }
    Ok(())
}

/// The children's ids of a fork's answer (an error if one failed).
fn child_ids(fork: &Value) -> anyhow::Result<Vec<String>> {
    fork["children"]
        .as_array()
        .context("no children")?
        .iter()
        .map(|c| {
            c["id"]
                .as_str()
                .map(str::to_string)
                .context("a child failed")
        })
        .collect()
}

/// fork(4) of a new sandbox over HTTP: the fork call's time (every child answered), and until
/// every child's first exec answered; then everything is deleted.
fn fork4(d: &Daemon) -> anyhow::Result<[f64; 2]> {
    let parent = d.create(json!({}))?;
    d.exec(&parent, "x = 1\n1")?;
    let t = Instant::now();
    let fork = d.call(
        "POST",
        &format!("/v1/sandboxes/{parent}/fork"),
        Some(json!({ "n": 4 })),
    )?;
    let call = ms(t.elapsed());
    let children = child_ids(&fork)?;
    for c in &children {
        anyhow::ensure!(d.exec(c, "x")? == "1", "a child lost the parent's state");
    }
    let first = ms(t.elapsed());
    for c in children.iter().chain([&parent]) {
        d.call("DELETE", &format!("/v1/sandboxes/{c}"), None)?;
    }
    Ok([call, first])
}

/// How long a sandbox restored from the ready snapshot sits idle before its first exec, in
/// the variant that asks whether a pooled member's slower first cell comes from its idling.
const READY_IDLE: Duration = Duration::from_secs(2);

/// A new user's first cell: the data-science imports.
const IMPORTS: &str = "import numpy, pandas, matplotlib.pyplot\n1";
