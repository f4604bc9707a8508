//! Running guest tests (real microVMs booted by `fissile-vmm`) where a usable KVM is.
//!
//! A guest test is an ordinary `#[test]` that starts with [`guest_env`]: it returns `None`
//! (the test returns at once) unless this process can boot microVMs, i.e. it runs inside the
//! lab or on a host whose KVM boots standard guests. On a KVM-PVM host the test binary's
//! entry test [`run_binary_in_lab`] copies *the test binary itself* into one lab boot and
//! runs all its guest tests there, so one lab boot serves many checks.

use std::path::PathBuf;
use std::time::Duration;

use crate::lab::{Lab, LabConfig, host_kvm_usable};

/// Set inside the lab by its init script.
pub const IN_LAB_ENV: &str = "FISSILE_IN_LAB";

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

/// `Some` when this process can boot microVMs (in the lab, or a host KVM that boots standard
/// guests) and the guest kernel and image are known (`FISSILE_GUEST_KERNEL`/`_ROOTFS`).
pub fn guest_env() -> Option<GuestEnv> {
    let in_lab = std::env::var_os(IN_LAB_ENV).is_some();
    if !in_lab && !host_kvm_usable() {
        return None;
    }
    let kernel = std::env::var_os("FISSILE_GUEST_KERNEL")?.into();
    let rootfs = std::env::var_os("FISSILE_GUEST_ROOTFS")?.into();
    Some(GuestEnv {
        kernel,
        rootfs,
        in_lab,
    })
}

/// Runs the guest tests of the current test binary in one lab boot, unless this process can
/// run them itself (then they run directly and this does nothing). `filter` selects tests
/// (libtest substring filter); `timeout` bounds the whole lab run. Panics with the lab's
/// output when any test fails there.
pub fn run_binary_in_lab(filter: &str, timeout: Duration) {
    if std::env::var_os(IN_LAB_ENV).is_some() || host_kvm_usable() {
        return;
    }
    let cfg = LabConfig::from_env().expect("lab inputs (kernel, image, binaries)");
    let lab = Lab::prepare(cfg).expect("preparing the lab");
    let exe = std::env::current_exe().expect("current test binary");
    let name = "fissile-guest-suite".to_string();
    let script = format!(
        "RUST_BACKTRACE=1 {name} --test-threads=1 --nocapture {filter} 2>&1; st=$?; \
         echo \"guest suite exit $st\"; exit $st"
    );
    let out = lab
        .run_with(&script, &[(exe, name)], timeout)
        .expect("lab run");
    eprintln!("{}", out.output);
    assert_eq!(
        out.status, 0,
        "guest tests failed in the lab (output above)"
    );
    assert!(
        out.output.contains("test result: ok."),
        "no libtest summary from the lab"
    );
}
