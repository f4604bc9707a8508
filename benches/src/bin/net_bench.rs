//! Guest networking, side by side in one run: our virtio-net (`fissile-vmm`, a tap backend)
//! against QEMU `-M microvm -accel kvm` with `virtio-net-device` on the same tap, booting the
//! same kernel, image, command line and agent (QEMU's reached over vhost-vsock). The guest
//! runs the same Python in both: the median of 50 TCP connects to a server on the tap's host
//! address, then one download of 64 MiB from it. Runs alternate (ours, QEMU, ...); prints
//! every run, the medians and the ratios (latency: ours / QEMU, lower is better;
//! throughput: ours / QEMU, higher is better).
//!
//! Usage: `net_bench [N]` (default 3 of each). Needs root, tun and a KVM that boots standard
//! guests: on other hosts run it in the lab, `fissile-lab run -- net_bench` (what
//! `scripts/bench guest` does). Traffic stays on the tap: the server is this process's.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use fissile_benches::in_lab;
use fissile_proto::net::{GATEWAY_ADDR, GUEST_MAC};
use fissile_sandbox::{Network, Sandbox, SandboxConfig, net};

const MEM_MIB: u64 = 512;
const TAP: &str = "fsl-nb0";
const DOWNLOAD: usize = 64 << 20;
/// One run's figures, as the guest measured them.
#[derive(Debug, Clone, Copy)]
struct Figures {
    connect_ms: f64,
    mb_s: f64,
}

/// The Python both guests run: connect latency to `connect_port`, then the download from
/// `data_port`; evaluates to "connect_ms mb_s bytes".
fn code(connect_port: u16, data_port: u16) -> String {
    format!(
        "import socket, time, statistics\n\
         lat = []\n\
         for _ in range(50):\n    \
             t = time.perf_counter()\n    \
             s = socket.create_connection(('{GATEWAY_ADDR}', {connect_port}), timeout=30)\n    \
             s.close()\n    \
             lat.append((time.perf_counter() - t) * 1e3)\n\
         s = socket.create_connection(('{GATEWAY_ADDR}', {data_port}), timeout=60)\n\
         s.sendall(b'go')\n\
         n, t = 0, time.perf_counter()\n\
         while True:\n    \
             b = s.recv(1 << 20)\n    \
             if not b:\n        break\n    \
             n += len(b)\n\
         dt = time.perf_counter() - t\n\
         f'{{statistics.median(lat)}} {{n / dt / 1e6}} {{n}}'"
    )
}

fn parse(text: Option<&str>) -> anyhow::Result<Figures> {
    let text = text
        .context("the guest returned no value")?
        .trim_matches('\'');
    let v: Vec<f64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("guest answered {text:?}"))?;
    let [connect_ms, mb_s, bytes] = v[..] else {
        bail!("guest answered {text:?}");
    };
    if bytes as usize != DOWNLOAD {
        bail!("the guest got {bytes} bytes of {DOWNLOAD}");
    }
    Ok(Figures { connect_ms, mb_s })
}

/// The servers on the tap's host address: one that accepts and closes, one that sends
/// [`DOWNLOAD`] bytes to whoever connects and writes first.
fn servers() -> anyhow::Result<(u16, u16)> {
    let connect = TcpListener::bind((GATEWAY_ADDR, 0)).context("binding the connect server")?;
    let data = TcpListener::bind((GATEWAY_ADDR, 0)).context("binding the data server")?;
    let ports = (connect.local_addr()?.port(), data.local_addr()?.port());
    std::thread::spawn(move || {
        for c in connect.incoming() {
            drop(c);
        }
    });
    std::thread::spawn(move || {
        let chunk = vec![0x5au8; 1 << 20];
        for c in data.incoming() {
            let Ok(mut c) = c else { continue };
            let mut go = [0u8; 2];
            if c.read_exact(&mut go).is_err() {
                continue;
            }
            for _ in 0..DOWNLOAD / chunk.len() {
                if c.write_all(&chunk).is_err() {
                    break;
                }
            }
        }
    });
    Ok(ports)
}

fn ours(cfg: &SandboxConfig, code: &str) -> anyhow::Result<Figures> {
    let mut sb = Sandbox::boot(cfg).context("fissile-vmm boot")?;
    let out = sb.exec(code)?;
    if let Some((e, v, _)) = out.error() {
        bail!("guest code raised {e}: {v}");
    }
    let f = parse(out.result_text());
    sb.poweroff(Duration::from_secs(60))?;
    f
}

fn qemu(kernel: &Path, rootfs: &Path, dir: &Path, cid: u32, code: &str) -> anyhow::Result<Figures> {
    let mac = GUEST_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let mut cmd = fissile_benches::qemu::microvm(kernel, rootfs, dir, cid, MEM_MIB);
    cmd.args([
        "-netdev",
        &format!("tap,id=n0,ifname={TAP},script=no,downscript=no"),
    ])
    .args(["-device", &format!("virtio-net-device,netdev=n0,mac={mac}")]);
    let (_vm, mut agent, _) = fissile_benches::qemu::start(cmd, cid)?;
    agent.set_call_timeout(Duration::from_secs(600))?;
    let out = agent.exec_code(code)?;
    if let Some((e, v, _)) = out.error() {
        bail!("guest code raised {e}: {v}");
    }
    parse(out.result_text())
}

fn main() -> anyhow::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().context("N must be a number")?,
        None => 3,
    };
    let tmp = tempfile::tempdir()?;
    net::create_gateway_tap(TAP).context("creating the tap (needs root and tun)")?;
    let (connect_port, data_port) = servers()?;
    let code = code(connect_port, data_port);
    let mut cfg = SandboxConfig::from_env(tmp.path().join("ours"))?;
    cfg.mem_mib = MEM_MIB;
    cfg.network = Network::Tap(TAP.into());
    let (kernel, rootfs) = (cfg.kernel.clone(), cfg.rootfs.clone());
    println!(
        "net_bench: {n} runs each, {MEM_MIB} MiB, 1 vCPU, {}; guest -> server on its tap: \
         median of 50 connects, one {} MiB download",
        if in_lab() {
            "in the lab (nested KVM; ~10-50x real hardware)"
        } else {
            "native KVM"
        },
        DOWNLOAD >> 20
    );
    let (mut ours_runs, mut qemu_runs) = (Vec::new(), Vec::new());
    for i in 0..n {
        let a = ours(&cfg, &code)?;
        let b = qemu(&kernel, &rootfs, tmp.path(), 300 + i as u32, &code)?;
        println!(
            "  run {i}: fissile-vmm connect {:7.3} ms {:8.1} MB/s   qemu microvm connect {:7.3} ms {:8.1} MB/s",
            a.connect_ms, a.mb_s, b.connect_ms, b.mb_s
        );
        ours_runs.push(a);
        qemu_runs.push(b);
    }
    let med = |runs: &[Figures], f: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (oc, qc) = (
        med(&ours_runs, |r| r.connect_ms),
        med(&qemu_runs, |r| r.connect_ms),
    );
    let (ot, qt) = (med(&ours_runs, |r| r.mb_s), med(&qemu_runs, |r| r.mb_s));
    println!(
        "  median connect: fissile-vmm {oc:.3} ms, qemu microvm {qc:.3} ms, ratio {:.2}x (lower is better)",
        oc / qc
    );
    println!(
        "  median throughput: fissile-vmm {ot:.1} MB/s, qemu microvm {qt:.1} MB/s, ratio {:.2}x (higher is better)",
        ot / qt
    );
    net::delete_tap(TAP)?;
    Ok(())
}
