//! Network set-up cost per sandbox, natively (host-side mechanics: no guest involved).
//!
//! Each VMM of a sandbox with a network runs in a namespace of its own; this measures making
//! one: an isolated namespace (loopback + the guest's gateway tap) and a routed one (plus a
//! veth pair to the host, addresses and routes over netlink, and the namespace's nftables
//! ruleset applied by `nft`), and a routed one taken from the pool of namespaces made ahead
//! of time (only the sandbox's policy applied). Baseline, measured in the same run: starting and reaping a
//! trivial process (`/bin/true`), the least a VMM start costs. Needs root, tun, veth and
//! nftables. Prints medians of `N` (default 20) and the ratios.
//!
//! Where guests boot (the lab: `fissile-lab run -- net_setup`, or a host whose KVM boots
//! them, with `FISSILE_GUEST_KERNEL`/`_ROOTFS` set), it also sets those figures against a
//! sandbox's create time in the same run: a create from a ready snapshot (restore + first
//! exec, how fissiled creates from a template) without a network and with a routed one from
//! the pool.

use std::time::{Duration, Instant};

use fissile_benches::{eval, median};
use fissile_sandbox::net::egress::{EgressPolicy, NetLimits};
use fissile_sandbox::{NetNs, Network, Sandbox, SandboxConfig, Snapshotd};

fn time<T>(n: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let kept = f()?;
        times.push(t0.elapsed());
        drop(kept);
    }
    Ok(median(&mut times))
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let baseline = time(n, || Ok(std::process::Command::new("/bin/true").status()?))?;
    let isolated = time(n, || Ok(NetNs::create()?))?;
    let routed = time(n, || {
        Ok(NetNs::create_routed(
            &EgressPolicy::default(),
            NetLimits::default(),
        )?)
    })?;
    // From the pool: a namespace made ahead of time, the policy put in force (one `nft`).
    fissile_sandbox::net::pool::enable(2, NetLimits::default());
    let deny = EgressPolicy {
        deny: vec!["198.51.100.0/24".parse().map_err(anyhow::Error::msg)?],
        ..EgressPolicy::default()
    };
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        wait_for_pool()?;
        let t0 = Instant::now();
        let ns = NetNs::create_routed(&deny, NetLimits::default())?;
        times.push(t0.elapsed());
        anyhow::ensure!(
            ns.uplink().is_some(),
            "a pooled namespace without its way out"
        );
        drop(ns);
    }
    let pooled = median(&mut times);
    // A sandbox's counters, as /metrics reads them on every scrape (netlink inside its
    // namespace), against one `nft list counters` run in it (how they were read before).
    let counted = NetNs::create_routed(&deny, NetLimits::default())?;
    let netlink = time(n, || Ok(counted.counters()?))?;
    let nft_run = time(n, || {
        let mut cmd = std::process::Command::new("nft");
        cmd.args(["list", "counters", "table", "ip", "fissile"])
            .stdout(std::process::Stdio::null());
        counted.enter_on_spawn(&mut cmd);
        let status = cmd.status()?;
        anyhow::ensure!(status.success(), "nft list counters: {status}");
        Ok(())
    })?;
    drop(counted);
    let place = if std::env::var_os("FISSILE_IN_LAB").is_some() {
        "in the lab (one CPU: the pool's refill competes with what is timed)"
    } else {
        "native"
    };
    println!("net_setup: medians of {n}, {place}");
    println!(
        "  baseline: spawn + reap /bin/true      {:8.2} ms",
        ms(baseline)
    );
    println!(
        "  isolated namespace (lo + tap)         {:8.2} ms = {:.1}x baseline",
        ms(isolated),
        ms(isolated) / ms(baseline)
    );
    println!(
        "  routed namespace (+ veth, NAT, policy) {:7.2} ms = {:.1}x baseline",
        ms(routed),
        ms(routed) / ms(baseline)
    );
    println!(
        "  routed namespace from the pool         {:7.2} ms = {:.1}x baseline = {:.2}x fresh",
        ms(pooled),
        ms(pooled) / ms(baseline),
        ms(pooled) / ms(routed)
    );
    println!(
        "  a sandbox's counters over netlink      {:7.3} ms = {:.3}x one `nft list counters` run ({:.2} ms)",
        ms(netlink),
        ms(netlink) / ms(nft_run),
        ms(nft_run)
    );
    if std::env::var_os("FISSILE_GUEST_KERNEL").is_some() {
        let n_create = n.min(5);
        let (plain, net) = match create_times(n_create, &deny) {
            Ok(t) => t,
            Err(e) => {
                println!("against a sandbox's create time: not measured here ({e:#})");
                return Ok(());
            }
        };
        println!(
            "against a sandbox's create time (restore from a ready snapshot + first exec), medians of {n_create}:"
        );
        println!(
            "  create without a network               {:7.2} ms",
            ms(plain)
        );
        println!(
            "  create with a routed network (pooled)  {:7.2} ms = {:.2}x without",
            ms(net),
            ms(net) / ms(plain)
        );
        println!(
            "  network set-up / create: fresh {:.3}x, pooled {:.3}x",
            ms(routed) / ms(plain),
            ms(pooled) / ms(plain)
        );
    }
    Ok(())
}

/// Waits (bounded, outside what is timed) until the namespace pool holds one again.
fn wait_for_pool() -> anyhow::Result<()> {
    let t = Instant::now();
    while fissile_sandbox::net::pool::ready() == 0 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the pool never refilled"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Median times of `n` creates from a ready snapshot (restore, then the first exec
/// answered): without a network, and with a routed one under `policy` (namespaces from the
/// pool). Each kind restores its own ready snapshot, taken of a guest booted with the same
/// devices.
fn create_times(n: usize, policy: &EgressPolicy) -> anyhow::Result<(Duration, Duration)> {
    let tmp = tempfile::tempdir()?;
    let sd = Snapshotd::start(&tmp.path().join("store"), &tmp.path().join("sd.sock"))?;
    let mut out = Vec::new();
    for network in [Network::None, Network::Routed(policy.clone())] {
        let mut cfg = SandboxConfig::from_env(tmp.path().join(format!("ready-{}", out.len())))?;
        cfg.snapshotd = Some(sd.socket().to_path_buf());
        cfg.network = network;
        let ready = {
            let mut sb = Sandbox::boot(&cfg)?;
            eval(&mut sb, "1")?;
            sb.snapshot(false)?.id
        };
        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            let mut c = cfg.clone();
            c.dir = tmp.path().join(format!("create-{}-{i}", out.len()));
            if matches!(c.network, Network::Routed(_)) {
                wait_for_pool()?;
            }
            let t0 = Instant::now();
            let mut sb = Sandbox::restore(&c, &ready)?;
            anyhow::ensure!(eval(&mut sb, "1 + 1")? == "2", "a restored sandbox answers");
            times.push(t0.elapsed());
        }
        out.push(median(&mut times));
    }
    Ok((out[0], out[1]))
}
