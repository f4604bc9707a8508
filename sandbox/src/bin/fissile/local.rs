//! The local subcommands: boot a sandbox in this process with `fissile-vmm` (no daemon), or
//! talk to one VMM's control socket.
//!
//! They need `FISSILE_GUEST_KERNEL`, `FISSILE_GUEST_ROOTFS` and a host KVM that boots standard
//! guests (elsewhere run them through `fissile-lab run -- fissile ...`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use fissile_agent::ExecOutcome;
use fissile_sandbox::{Sandbox, SandboxConfig, Snapshotd};

/// Where and how big a locally booted sandbox is.
#[derive(Debug, clap::Args)]
pub struct LocalOpts {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    mem_mib: u64,
    /// Working directory for sockets and logs (default: a fresh temporary directory, removed
    /// afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Runs `job` with a sandbox configuration from the environment and `opts`.
pub fn with_config(
    opts: &LocalOpts,
    job: impl FnOnce(&SandboxConfig) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = match &opts.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("fissile-{}", std::process::id())),
    };
    let result = SandboxConfig::from_env(&dir)
        .map_err(anyhow::Error::from)
        .and_then(|mut cfg| {
            cfg.mem_mib = opts.mem_mib;
            job(&cfg)
        });
    if opts.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Sends one request line to a VMM's control socket and prints the reply line.
pub fn ctl(socket: &std::path::Path, request: &str) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    (&stream).write_all(format!("{}\n", request.trim()).as_bytes())?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    print!("{line}");
    Ok(())
}

fn boot(cfg: &SandboxConfig) -> anyhow::Result<Sandbox> {
    eprintln!(
        "fissile: booting a microVM ({} MiB, {} vCPU) with fissile-vmm",
        cfg.mem_mib, cfg.vcpus
    );
    let sb = Sandbox::boot(cfg).context("booting the sandbox")?;
    eprintln!(
        "fissile: guest agent ready after {} ms (Python {})",
        sb.timings().to_ready.as_millis(),
        sb.info()
            .python_version
            .as_deref()
            .unwrap_or("not started yet")
    );
    Ok(sb)
}

pub fn run(cfg: &SandboxConfig, cells: &[String]) -> anyhow::Result<()> {
    let mut sb = boot(cfg)?;
    let mut failed = false;
    for code in cells {
        let out = run_cell(&mut sb, code)?;
        failed |= out.error().is_some();
    }
    sb.poweroff(Duration::from_secs(30))?;
    if failed {
        anyhow::bail!("a cell raised an exception");
    }
    Ok(())
}

fn run_cell(sb: &mut Sandbox, code: &str) -> anyhow::Result<ExecOutcome> {
    for (i, line) in code.lines().enumerate() {
        println!("{} {line}", if i == 0 { ">>>" } else { "..." });
    }
    let t = Instant::now();
    let out = sb.exec(code).context("exec")?;
    let wall = t.elapsed();
    print!("{}", out.stdout());
    eprint!("{}", out.stderr());
    for d in out.displays() {
        if let Some(png) = d.get("image/png") {
            println!("[image/png, {} bytes]", png.len());
        }
    }
    if let Some(text) = out.result_text() {
        println!("{text}");
    }
    if let Some((ename, evalue, _)) = out.error() {
        println!("{ename}: {evalue}");
    }
    println!(
        "    ({} ms round trip, {} ms in the guest)",
        wall.as_millis(),
        out.done.duration_ns / 1_000_000
    );
    Ok(out)
}

const DEMO_CELLS: &[&str] = &[
    "import sys, platform\nprint(platform.node(), platform.machine(), sys.version.split()[0])",
    "import numpy as np, pandas as pd\n\
     trips = pd.DataFrame({'borough': np.random.default_rng(7).choice(['Bronx', 'Brooklyn', 'Manhattan', 'Queens'], 1000),\n\
     \x20                     'miles': np.random.default_rng(8).gamma(2.0, 1.6, 1000)})\n\
     len(trips)",
    "# `trips` is still here: state persists between calls\n\
     avg = trips.groupby('borough')['miles'].mean().round(2)\n\
     avg",
    "import matplotlib.pyplot as plt\n\
     avg.plot.bar(title='average trip length (miles)')\n\
     plt.show()",
];

pub fn demo(cfg: &SandboxConfig) -> anyhow::Result<()> {
    // snapshotd holds the memory that fork and merge share between VMs.
    let sd = Snapshotd::start(&cfg.dir.join("store"), &cfg.dir.join("snapshotd.sock"))
        .context("starting snapshotd")?;
    let mut cfg = cfg.clone();
    cfg.snapshotd = Some(sd.socket().to_path_buf());
    let mut sb = boot(&cfg)?;
    for code in DEMO_CELLS {
        demo_cell(&mut sb, code)?;
    }

    eprintln!("fissile: fork(2): two copy-on-write children of the running sandbox");
    let (mut kids, t) = sb.fork(2).context("fork(2)")?;
    eprintln!(
        "fissile: fork snapshot in {:.0} ms (parent paused {:.0} ms, {} pages in it), children \
         started in {:.0} ms; both answered after {:.0} ms",
        t.vmm_ms, t.snapshot.paused_ms, t.snapshot.dirty_pages, t.spawn_ms, t.all_answered_ms
    );
    for (kid, code) in kids.iter_mut().zip(FORK_CELLS) {
        eprintln!("fissile: child {}:", kid.dir().display());
        demo_cell(kid, code)?;
    }
    eprintln!("fissile: merge_into: the parent adopts child 2's state");
    let m = sb.merge_into(&kids[1]).context("merge_into")?;
    eprintln!(
        "fissile: merged snapshot {} in {:.0} ms (parent paused {:.0} ms)",
        m.snapshot, m.total_ms, m.paused_ms
    );
    let out = demo_cell(&mut sb, "strategy, len(trips)")?;
    if out.result_text() != Some("('p90', 1000)") {
        anyhow::bail!("the merged parent does not have child 2's state: {out:?}");
    }
    drop(kids);

    let status = sb.poweroff(Duration::from_secs(30))?;
    eprintln!("fissile: guest powered off, fissile-vmm exited with {status}");
    if !status.success() {
        anyhow::bail!("fissile-vmm exited with {status}");
    }
    println!("FISSILE-DEMO-OK");
    Ok(())
}

fn demo_cell(sb: &mut Sandbox, code: &str) -> anyhow::Result<ExecOutcome> {
    let out = run_cell(sb, code)?;
    if let Some((ename, evalue, tb)) = out.error() {
        anyhow::bail!("demo cell failed: {ename}: {evalue}\n{}", tb.join("\n"));
    }
    Ok(out)
}

/// What each fork child tries: two ways to summarise the same DataFrame.
const FORK_CELLS: &[&str] = &[
    "strategy = 'median'\nscore = trips.groupby('borough')['miles'].median().max()\nround(float(score), 2)",
    "strategy = 'p90'\nscore = trips.groupby('borough')['miles'].quantile(0.9).max()\nround(float(score), 2)",
];
