//! Agent round trip: `Exec("1+1")` against `Echo` on the same channel (the baseline), N
//! times each; prints p50/p99 of both and the ratio.
//!
//! Usage:
//! * `agent_rtt [N]` (default 2000): over a unix socket on the host. The agent is the
//!   `fissile-agent` binary next to this one (or `$FISSILE_AGENT_BIN`) started in host mode;
//!   if there is none, the same agent code is run in-process. Target: exec p50 < 1 ms.
//! * `agent_rtt --vsock [N]` (default 300): over hybrid vsock to the agent in a real microVM
//!   booted by fissile-vmm (needs KVM; elsewhere `fissile-lab run -- agent_rtt --vsock`,
//!   where every VM exit costs ~50 us, so compare the ratio).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fissile_agent::{Agent, AgentClient, AgentConfig};
use fissile_sandbox::{Sandbox, SandboxConfig};

enum AgentProcess {
    Child(Child),
    InProcess,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let AgentProcess::Child(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn agent_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FISSILE_AGENT_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let sibling = exe.parent()?.join("fissile-agent");
    sibling.is_file().then_some(sibling)
}

fn start_agent(sock: &Path) -> anyhow::Result<(AgentProcess, String)> {
    if let Some(bin) = agent_binary() {
        let mut child = Command::new(&bin)
            .arg("--listen-unix")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        if !line.contains("listening") {
            bail!("agent did not start: {line:?}");
        }
        return Ok((
            AgentProcess::Child(child),
            format!("process {}", bin.display()),
        ));
    }
    let listener = Agent::bind_unix(sock)?;
    let agent = Agent::new(AgentConfig {
        guest_mode: false,
        python: std::env::var("FISSILE_PYTHON").unwrap_or_else(|_| "python3".into()),
    });
    std::thread::spawn(move || agent.serve_unix(listener));
    Ok((
        AgentProcess::InProcess,
        "in-process (no fissile-agent binary found)".into(),
    ))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn measure(n: usize, mut op: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        op()?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let vsock = args.first().is_some_and(|a| a == "--vsock");
    if vsock {
        args.remove(0);
    }
    let n: usize = match args.first() {
        Some(a) => a.parse().context("N must be a number")?,
        None if vsock => 300,
        None => 2000,
    };
    let dir = tempfile::tempdir()?;
    if vsock {
        let cfg = SandboxConfig::from_env(dir.path().join("sb")).context("sandbox config")?;
        let mut sb = Sandbox::boot(&cfg).context("boot a sandbox")?;
        let how = format!(
            "in a microVM ({}), hybrid vsock",
            if fissile_benches::in_lab() {
                "in the lab: nested KVM, ~10-50x real hardware"
            } else {
                "native KVM"
            }
        );
        return run(sb.agent()?, n, &how, false);
    }
    let sock = dir.path().join("agent.sock");
    let (_agent, how) = start_agent(&sock)?;
    let mut c = AgentClient::connect_unix(&sock)?;
    run(&mut c, n, &format!("agent {how}, unix socket"), true)
}

fn run(c: &mut AgentClient, n: usize, how: &str, target: bool) -> anyhow::Result<()> {
    // Warm up: starts the interpreter and fills caches on both sides.
    for _ in 0..100 {
        c.echo(b"ping")?;
        c.exec_code("1+1")?;
    }
    let echo = measure(n, || {
        c.echo(b"ping")?;
        Ok(())
    })?;
    let exec = measure(n, || {
        let out = c.exec_code("1+1")?;
        if out.result_text() != Some("2") {
            bail!("unexpected exec result: {:?}", out.outputs);
        }
        Ok(())
    })?;
    println!("agent_rtt: N={n}, {how}");
    for (name, t) in [("echo", &echo), ("exec 1+1", &exec)] {
        println!(
            "  {name:<9} p50 {:>8.1} us   p99 {:>8.1} us",
            us(percentile(t, 0.5)),
            us(percentile(t, 0.99))
        );
    }
    let (e50, x50) = (percentile(&echo, 0.5), percentile(&exec, 0.5));
    println!(
        "  ratio exec/echo: p50 {:.1}x, p99 {:.1}x",
        us(x50) / us(e50),
        us(percentile(&exec, 0.99)) / us(percentile(&echo, 0.99))
    );
    if !target {
        return Ok(());
    }
    println!(
        "  target exec p50 < 1 ms: {}",
        if x50 < Duration::from_millis(1) {
            "met"
        } else {
            "MISSED"
        }
    );
    Ok(())
}
