//! Cold boot, side by side in one run: `fissile-vmm` start → guest agent answers over vsock,
//! against QEMU `-M microvm -accel kvm` booting the same kernel, image, command line and
//! agent (reached over vhost-vsock) as the baseline. Runs alternate (ours, QEMU, ours, ...)
//! so both see the same machine state; prints every run, the medians and the ratio.
//!
//! Usage: `boot_bench [N]` (default 5 of each). Needs a KVM that boots standard guests: on
//! other hosts run it in the lab, `fissile-lab run -- boot_bench` (what `scripts/bench` does).
//! Target: ours ≤ 0.8× QEMU microvm.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use fissile_benches::{in_lab, median};
use fissile_sandbox::{Sandbox, SandboxConfig};

const MEM_MIB: u64 = 512;

fn ours(cfg: &SandboxConfig) -> anyhow::Result<Duration> {
    let sb = Sandbox::boot(cfg).context("fissile-vmm boot")?;
    let t = sb.timings().to_ready;
    let status = sb.poweroff(Duration::from_secs(60))?;
    if !status.success() {
        bail!("fissile-vmm exited with {status}");
    }
    Ok(t)
}

fn qemu(kernel: &Path, rootfs: &Path, dir: &Path, cid: u32) -> anyhow::Result<Duration> {
    let cmd = fissile_benches::qemu::microvm(kernel, rootfs, dir, cid, MEM_MIB);
    let (_vm, _agent, t) = fissile_benches::qemu::start(cmd, cid)?;
    Ok(t)
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
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..n {
        let t_ours = ours(&cfg)?;
        let t_qemu = qemu(&kernel, &rootfs, tmp.path(), 100 + i as u32)?;
        println!(
            "  run {i}: fissile-vmm {:>8.1} ms   qemu microvm {:>8.1} ms",
            ms(t_ours),
            ms(t_qemu)
        );
        a.push(t_ours);
        b.push(t_qemu);
    }
    let (ma, mb) = (median(&mut a), median(&mut b));
    let ratio = ma.as_secs_f64() / mb.as_secs_f64();
    println!(
        "  median: fissile-vmm {:.1} ms, qemu microvm {:.1} ms, ratio {ratio:.2}x (target <= 0.80x: {})",
        ms(ma),
        ms(mb),
        if ratio <= 0.8 { "met" } else { "MISSED" }
    );
    Ok(())
}
