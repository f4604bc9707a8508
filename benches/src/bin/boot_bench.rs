//! Cold boot, side by side in one run: `fissile-vmm` start → guest agent answers over vsock,
//! against QEMU `-M microvm -accel kvm` booting the same kernel, image, command line and
//! agent (reached over vhost-vsock) as the baseline. Runs alternate (ours, QEMU, ours, ...)
//! so both see the same machine state; prints every run, the medians and the ratio.
//!
//! Usage: `boot_bench [N]` (default 5 of each). Needs a KVM that boots standard guests: on
//! other hosts run it in the lab, `fissile-lab run -- boot_bench` (what `scripts/bench` does).
//! Target: ours ≤ 0.7× QEMU microvm (the speed issue's figure).
//!
//! Each run is also split in two with the agent's own uptime when it answered (its monotonic
//! clock, which runs on kvm-clock by then; it starts when the agent, the guest's init, has
//! set the guest up and begins serving): the VMM, the kernel and that set-up, then the agent
//! serving until it answered. The guest's clocks cannot split the first step further: until
//! the kernel switches to kvm-clock its uptime advances only with timer ticks.
//!
//! After each boot, the same VM's vsock path on its own ([`WIRE_CONNECTS`] new connections
//! answering `Info`, then [`WIRE_ECHOES`] `Echo` round trips on one): our VMM's vsock muxer
//! against the kernel's vhost-vsock, which is what the agent's answer above, a restored
//! guest's reconnect and every exec pay.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fissile_agent::AgentClient;
use fissile_benches::{in_lab, median};
use fissile_proto::agent::AGENT_VSOCK_PORT;
use fissile_sandbox::{Sandbox, SandboxConfig};

const MEM_MIB: u64 = 512;

/// One cold boot: the time from the VMM's start until the agent answered, and how long of it
/// the agent had been serving.
#[derive(Debug, Clone, Copy)]
struct Boot {
    total: Duration,
    /// The agent's uptime when it answered (at most `total`): since it began serving.
    agent: Duration,
}

impl Boot {
    fn new(total: Duration, agent_uptime_ns: u64) -> Boot {
        Boot {
            total,
            agent: Duration::from_nanos(agent_uptime_ns).min(total),
        }
    }

    /// The VMM, the kernel and the guest's set-up until the agent began serving.
    fn until_serving(self) -> Duration {
        self.total - self.agent
    }
}

/// New connections timed on each booted VM.
const WIRE_CONNECTS: usize = 10;
/// `Echo` round trips timed on each booted VM.
const WIRE_ECHOES: usize = 30;

/// A booted VM's vsock path: the medians of a new connection answering `Info` (connect,
/// handshake, one call) and of one `Echo` round trip on an open connection.
#[derive(Debug, Clone, Copy)]
struct Wire {
    connect: Duration,
    echo: Duration,
}

/// Times [`WIRE_CONNECTS`] connections made by `connect` (each answering `Info`, then
/// closed), then [`WIRE_ECHOES`] echoes on one more.
fn wire(mut connect: impl FnMut() -> anyhow::Result<AgentClient>) -> anyhow::Result<Wire> {
    let mut connects = Vec::with_capacity(WIRE_CONNECTS);
    for _ in 0..WIRE_CONNECTS {
        let t = Instant::now();
        let mut c = connect()?;
        c.info()?;
        connects.push(t.elapsed());
    }
    let mut c = connect()?;
    let mut echoes = Vec::with_capacity(WIRE_ECHOES);
    for _ in 0..WIRE_ECHOES {
        let t = Instant::now();
        c.echo(b"fissile boot_bench")?;
        echoes.push(t.elapsed());
    }
    Ok(Wire {
        connect: median(&mut connects),
        echo: median(&mut echoes),
    })
}

fn ours(cfg: &SandboxConfig) -> anyhow::Result<(Boot, Wire)> {
    let sb = Sandbox::boot(cfg).context("fissile-vmm boot")?;
    // The `Info` that ended the wait: its uptime is the agent's when it answered.
    let boot = Boot::new(sb.timings().to_ready, sb.info().uptime_ns);
    let uds = sb.dir().join("vsock.sock");
    let wire = wire(|| Ok(AgentClient::connect_hybrid_vsock(&uds, AGENT_VSOCK_PORT)?))
        .context("fissile-vmm vsock")?;
    let status = sb.poweroff(Duration::from_secs(60))?;
    if !status.success() {
        bail!("fissile-vmm exited with {status}");
    }
    Ok((boot, wire))
}

fn qemu(kernel: &Path, rootfs: &Path, dir: &Path, cid: u32) -> anyhow::Result<(Boot, Wire)> {
    let cmd = fissile_benches::qemu::microvm(kernel, rootfs, dir, cid, MEM_MIB);
    let (_vm, mut agent, total) = fissile_benches::qemu::start(cmd, cid)?;
    let since = Instant::now();
    let uptime_ns = agent.info()?.uptime_ns;
    // Its uptime when it answered the readiness `Info`: less the time since.
    let elapsed = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let boot = Boot::new(total, uptime_ns.saturating_sub(elapsed));
    drop(agent);
    let wire = wire(|| Ok(AgentClient::connect_vsock(cid, AGENT_VSOCK_PORT)?))
        .context("qemu vhost-vsock")?;
    Ok((boot, wire))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().context("N must be a number")?,
        None => 5,
    };
    let tmp = tempfile::tempdir()?;
    let mut cfg = SandboxConfig::from_env(tmp.path().join("ours"))?;
    cfg.mem_mib = MEM_MIB;
    let (kernel, rootfs): (PathBuf, PathBuf) = (cfg.kernel.clone(), cfg.rootfs.clone());
    println!(
        "boot_bench: {n} cold boots each, {MEM_MIB} MiB, 1 vCPU, {}; start -> guest agent answers",
        if in_lab() {
            "in the lab (nested KVM; ~10-50x real hardware)"
        } else {
            "native KVM"
        }
    );
    println!(
        "  each: total (VMM, kernel and guest set-up until the agent served + the agent until it answered)"
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let (mut wa, mut wb) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (t_ours, w_ours) = ours(&cfg)?;
        let (t_qemu, w_qemu) = qemu(&kernel, &rootfs, tmp.path(), 100 + i as u32)?;
        println!(
            "  run {i}: fissile-vmm {}   qemu microvm {}",
            run(&t_ours),
            run(&t_qemu)
        );
        println!(
            "         vsock: connect + Info {:>5.2} ms, echo {:>5.2} ms   vhost-vsock: {:>5.2} ms, {:>5.2} ms",
            ms(w_ours.connect),
            ms(w_ours.echo),
            ms(w_qemu.connect),
            ms(w_qemu.echo)
        );
        a.push(t_ours);
        b.push(t_qemu);
        wa.push(w_ours);
        wb.push(w_qemu);
    }
    let (ma, mb) = (medians(&a), medians(&b));
    let ratio = ma.0.as_secs_f64() / mb.0.as_secs_f64();
    println!(
        "  median: fissile-vmm {}, qemu microvm {}, ratio {ratio:.2}x (target <= 0.70x: {})",
        steps(ma.0, ma.1, ma.2),
        steps(mb.0, mb.1, mb.2),
        if ratio <= 0.7 { "met" } else { "MISSED" }
    );
    println!(
        "  median step ratios: until the agent served {:.2}x, the agent until it answered {:.2}x",
        ma.1.as_secs_f64() / mb.1.as_secs_f64(),
        ma.2.as_secs_f64() / mb.2.as_secs_f64()
    );
    let m = |w: &[Wire], f: fn(&Wire) -> Duration| median(&mut w.iter().map(f).collect::<Vec<_>>());
    let (ca, cb) = (m(&wa, |w| w.connect), m(&wb, |w| w.connect));
    let (ea, eb) = (m(&wa, |w| w.echo), m(&wb, |w| w.echo));
    println!(
        "  vsock path, medians of the runs' medians (our muxer vs vhost-vsock): connect + Info {:.2} vs {:.2} ms ({:.2}x), echo {:.2} vs {:.2} ms ({:.2}x)",
        ms(ca),
        ms(cb),
        ca.as_secs_f64() / cb.as_secs_f64(),
        ms(ea),
        ms(eb),
        ea.as_secs_f64() / eb.as_secs_f64()
    );
    Ok(())
}

fn run(b: &Boot) -> String {
    steps(b.total, b.until_serving(), b.agent)
}

fn steps(total: Duration, until_serving: Duration, agent: Duration) -> String {
    format!(
        "{:>7.1} ms ({:>7.1} + {:>5.1})",
        ms(total),
        ms(until_serving),
        ms(agent)
    )
}

/// The medians of the totals, of the first steps and of the agent's times, each on its own
/// (so the two steps need not add up to the total).
fn medians(runs: &[Boot]) -> (Duration, Duration, Duration) {
    let m = |f: fn(&Boot) -> Duration| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    (m(|b| b.total), m(|b| b.until_serving()), m(|b| b.agent))
}
