//! Network set-up cost per sandbox, natively (host-side mechanics: no guest involved).
//!
//! Each VMM of a sandbox with a network runs in a namespace of its own; this measures making
//! one: an isolated namespace (loopback + the guest's gateway tap) and a routed one (plus a
//! veth pair to the host, addresses and routes over netlink, and the namespace's nftables
//! ruleset applied by `nft`), and a routed one taken from the pool of namespaces made ahead
//! of time (only the sandbox's policy applied). Baseline, measured in the same run: starting and reaping a
//! trivial process (`/bin/true`), the least a VMM start costs. Needs root, tun, veth and
//! nftables. Prints medians of `N` (default 20) and the ratios.

use std::time::{Duration, Instant};

use fissile_benches::median;
use fissile_sandbox::NetNs;
use fissile_sandbox::net::egress::{EgressPolicy, NetLimits};

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
        // The refill is waited for outside the timed part.
        let t = Instant::now();
        while fissile_sandbox::net::pool::ready() == 0 {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(60),
                "the pool never refilled"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
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
    println!("net_setup: medians of {n}, native");
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
    Ok(())
}
