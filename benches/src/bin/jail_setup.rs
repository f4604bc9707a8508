//! The jail's cost per VMM start, natively (host-side mechanics: no guest involved).
//!
//! Every VMM starts in a jail (`fissile_sandbox::jail`): a uid lease, a mount namespace with
//! a tmpfs root, bind mounts of the binary, libraries, images and the sandbox directory,
//! device nodes, `/proc`, `pivot_root` and the uid drop, all between fork and exec. This
//! starts and reaps `/bin/true` jailed as a VMM would be (its program, a read-only image, a
//! directory of its own, `/dev/kvm` and `/dev/userfaultfd`) against the baseline measured in
//! the same run: starting and reaping it plainly. Needs root. Prints medians of `N`
//! (default 50) and the ratio.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use fissile_benches::median;
use fissile_sandbox::jail::{self, JailConfig, JailSpec, UidLease};

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(50);
    let program = std::fs::canonicalize("/bin/true")?;
    let tmp = tempfile::tempdir()?;
    let image = tmp.path().join("image");
    std::fs::write(&image, [0u8; 4096])?;
    let cfg = JailConfig::default();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;

    let mut plain = Vec::with_capacity(n);
    let mut jailed = Vec::with_capacity(n);
    for i in 0..n {
        // Interleaved, so drift in the machine's load hits both alike.
        let t0 = Instant::now();
        let st = Command::new(&program).status()?;
        plain.push(t0.elapsed());
        anyhow::ensure!(st.success(), "/bin/true failed: {st}");

        let dir = tmp.path().join(format!("sb-{i}"));
        std::fs::create_dir(&dir)?;
        let t0 = Instant::now();
        let lease = UidLease::new(&cfg)?;
        let mut cmd = Command::new(&program);
        let spec = JailSpec {
            program: program.clone(),
            read_only: vec![image.clone()],
            sockets: vec![],
            dir,
            devices: vec![PathBuf::from("/dev/kvm"), PathBuf::from("/dev/userfaultfd")],
        };
        let report = jail::apply(&mut cmd, &cfg, lease.uid(), &spec)?;
        let st = jail::spawn(cmd, Some(report))?.wait()?;
        jailed.push(t0.elapsed());
        anyhow::ensure!(st.success(), "jailed /bin/true failed: {st}");
    }
    let (plain, jailed) = (median(&mut plain), median(&mut jailed));
    println!("jail_setup: medians of {n}, native");
    println!("  baseline: spawn + reap /bin/true   {:8.3} ms", ms(plain));
    println!(
        "  the same, jailed as a VMM          {:8.3} ms = {:.1}x baseline (+{:.3} ms per VMM start)",
        ms(jailed),
        ms(jailed) / ms(plain),
        ms(jailed) - ms(plain)
    );
    Ok(())
}
