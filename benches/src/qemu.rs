//! QEMU `-M microvm -accel kvm` booting our guest kernel, image and agent (reached over
//! vhost-vsock): the baseline the guest benchmarks measure against in the same run.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fissile_agent::{AgentClient, ReadyListener};
use fissile_proto::agent::{AGENT_READY_PORT, AGENT_VSOCK_PORT};

use crate::in_lab;

/// The command line `fissile-vmm` gives its guest with its default configuration, minus its
/// own `virtio_mmio.device=` entries (QEMU adds its own).
fn cmdline(kernel: &Path, rootfs: &Path) -> String {
    fissile_vmm::config::VmConfig::new(kernel, rootfs).base_cmdline()
}

/// A running QEMU, killed and reaped on drop.
#[derive(Debug)]
pub struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The command for a microvm of `mem_mib` MiB and one vCPU booting `kernel` on `rootfs`
/// (read-only), its agent on vsock CID `cid`, its console in `dir`; add devices before
/// [`start`].
pub fn microvm(kernel: &Path, rootfs: &Path, dir: &Path, cid: u32, mem_mib: u64) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,acpi=off", "-accel", "kvm"]);
    // In the lab the emulated SVM mishandles XSETBV: hide XSAVE and what needs it, exactly as
    // fissile-vmm's CPUID filter does there.
    cmd.args(if in_lab() {
        ["-cpu", "host,-xsave,-avx,-avx2,-f16c,-fma"]
    } else {
        ["-cpu", "host"]
    });
    cmd.args(["-m", &format!("{mem_mib}M"), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("qemu-console.log").display()));
    if Path::new("/lab/share/qemu").is_dir() {
        cmd.args(["-L", "/lab/share/qemu"]);
    }
    cmd.arg("-kernel")
        .arg(kernel)
        .arg("-append")
        .arg(cmdline(kernel, rootfs))
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,readonly=on",
            rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .args(["-device", &format!("vhost-vsock-device,guest-cid={cid}")]);
    cmd
}

/// Starts `cmd` (from [`microvm`], guest CID `cid`) and waits, at most 180 s, until its agent
/// signals readiness and answers `Info`: the same readiness signal as for `fissile-vmm` (the
/// agent connects to the host when it listens, here over vhost-vsock). Returns the VM, a
/// client of its agent, and the time from spawn to that answer.
pub fn start(mut cmd: Command, cid: u32) -> anyhow::Result<(Qemu, AgentClient, Duration)> {
    let ready = ReadyListener::vsock(AGENT_READY_PORT).context("vsock readiness listener")?;
    let start = Instant::now();
    let mut child = Qemu(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn qemu-system-x86_64")?,
    );
    loop {
        if let Ok(Some(status)) = child.0.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("qemu exited early ({status}): {err}");
        }
        if ready.wait(Duration::from_millis(100))?.is_some() {
            let mut c = AgentClient::connect_vsock(cid, AGENT_VSOCK_PORT)?;
            c.set_call_timeout(Duration::from_secs(30))?;
            c.info()?;
            let t = start.elapsed();
            return Ok((child, c, t));
        }
        if start.elapsed() > Duration::from_secs(180) {
            bail!("QEMU guest agent did not answer within 180 s");
        }
    }
}
