//! Pipeline smoke test: the guest kernel from `kernel/` and the image from `rootfs-builder`
//! boot under real (nested) KVM in the lab, and the guest runs the data-science imports.
//!
//! The VMM here is QEMU `-M microvm -accel kvm`: it checks the kernel and image on their own,
//! independent of our VMM (whose own boot test is `vmm_boot.rs`).

use std::time::Duration;

use fissile_tests::lab::{Lab, LabConfig};

/// The script that runs in the lab; also what `scripts/demo` runs until our VMM boots it.
const SMOKE_SCRIPT: &str = include_str!("../lab-scripts/qemu-smoke.sh");

#[test]
fn guest_kernel_and_image_run_python_datasci_under_nested_kvm() {
    let lab = Lab::prepare(LabConfig::from_env().expect("lab inputs")).expect("lab");
    let out = lab
        .run(SMOKE_SCRIPT, Duration::from_secs(900))
        .expect("lab run");
    out.assert_success();
    let line = out
        .output
        .lines()
        .find(|l| l.contains("SMOKE-OK"))
        .unwrap_or_else(|| panic!("guest never printed SMOKE-OK; output:\n{}", out.output));
    let fields: Vec<&str> = line
        .split_whitespace()
        .skip_while(|w| *w != "SMOKE-OK")
        .collect();
    assert_eq!(fields.len(), 5, "{line}");
    assert!(fields[1].starts_with('2'), "numpy 2.x expected: {line}");
    eprintln!("smoke: {line} (lab wall {:.1} s)", out.wall.as_secs_f64());
}
