//! Running guest tests (real microVMs booted by `fissile-vmm`) where a usable KVM is.
//!
//! A guest test is an ordinary `#[test]` marked `#[ignore = "guest test: …"]` that starts
//! with [`guest_env`]. A plain `cargo test` does not run it; each guest test binary has one
//! entry test that calls [`run_guest_suite`], which runs the binary's guest tests itself:
//! as a child process with `--ignored` where this host's KVM boots standard guests, or
//! inside one lab boot on a KVM-PVM host (the test binary is copied into the lab). Either
//! way it checks that exactly the expected number of guest tests ran and passed, so a
//! suite can never pass without booting anything. Run by hand with `--ignored` where they
//! cannot run, the guest tests fail and say why.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::lab::{Lab, LabConfig, host_kvm_usable};

/// Set inside the lab by its init script.
pub const IN_LAB_ENV: &str = "FISSILE_IN_LAB";

/// The `ignore` reason guest tests carry (for reference; attributes need a literal).
pub const GUEST_TEST: &str = "guest test: boots microVMs; run by this binary's suite entry test";

/// What a guest test needs: the guest kernel and image, and where our binaries are.
#[derive(Debug, Clone)]
pub struct GuestEnv {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest root image.
    pub rootfs: PathBuf,
    /// True inside the lab (timings are ~10-50x real hardware).
    pub in_lab: bool,
}

/// The guest environment; panics with the reason when this process cannot boot microVMs
/// (not in the lab and no usable KVM, or `FISSILE_GUEST_KERNEL`/`_ROOTFS` unset).
pub fn guest_env() -> GuestEnv {
    let in_lab = std::env::var_os(IN_LAB_ENV).is_some();
    assert!(
        in_lab || host_kvm_usable(),
        "this guest test cannot run here: this host's KVM cannot boot a standard guest \
         (KVM-PVM or no VT-x/SVM); run the suite's entry test, which uses the lab"
    );
    let var = |name: &str| -> PathBuf {
        std::env::var_os(name)
            .unwrap_or_else(|| {
                panic!(
                    "{name} is not set: run through scripts/test, or export it (fissile-lab info)"
                )
            })
            .into()
    };
    GuestEnv {
        kernel: var("FISSILE_GUEST_KERNEL"),
        rootfs: var("FISSILE_GUEST_ROOTFS"),
        in_lab,
    }
}

/// The ignored tests of the current test binary whose names contain `filter`.
fn guest_tests(filter: &str) -> Vec<String> {
    let exe = std::env::current_exe().expect("current test binary");
    let out = Command::new(&exe)
        .args(["--list", "--ignored", "--format", "terse", filter])
        .output()
        .expect("listing the guest tests");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect()
}

/// Runs the current test binary's guest tests (ignored tests matching `filter`, a libtest
/// substring filter) in one go: natively when this host's KVM can boot our guest, else in
/// one lab boot. Panics with the output unless every one of them ran and passed.
pub fn run_guest_suite(filter: &str, timeout: Duration) {
    let expected = guest_tests(filter);
    assert!(
        !expected.is_empty(),
        "no ignored tests match {filter:?} in this binary"
    );
    let args = format!("--ignored --test-threads=1 --nocapture {filter}");
    let (output, status) = if host_kvm_usable() {
        let exe = std::env::current_exe().expect("current test binary");
        let out = Command::new(&exe)
            .args(args.split(' '))
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("running the guest tests");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (text, out.status.code().unwrap_or(-1))
    } else {
        let cfg = LabConfig::from_env().expect("lab inputs (kernel, image, binaries)");
        let lab = Lab::prepare(cfg).expect("preparing the lab");
        let exe = std::env::current_exe().expect("current test binary");
        let name = "fissile-guest-suite".to_string();
        let script = format!(
            "RUST_BACKTRACE=1 {name} {args} 2>&1; st=$?; echo \"guest suite exit $st\"; exit $st"
        );
        let out = lab
            .run_with(&script, &[(exe, name)], timeout)
            .expect("lab run");
        (out.output, out.status)
    };
    eprintln!("{output}");
    assert_eq!(status, 0, "guest tests failed (output above)");
    let summary = format!(
        "test result: ok. {} passed; 0 failed; 0 ignored",
        expected.len()
    );
    assert!(
        output.contains(&summary),
        "expected `{summary}` for {expected:?} (output above)"
    );
}

/// The resident memory of process `pid` in KiB (panics if it cannot be read: a test that
/// compares memory must not compare zeroes).
#[allow(clippy::unwrap_used)]
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}
