//! The `fissile-vmm` binary on this host: KVM-PVM hosts get a clear "run it in the lab"
//! error, and bad arguments get a clear message. Both without booting anything.

use std::process::Command;

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fissile-vmm"))
}

fn host_is_pvm() -> bool {
    std::path::Path::new("/dev/kvm").exists() && fissile_vmm::host::is_kvm_pvm()
}

/// On a KVM-PVM host the VMM refuses with the lab command; on any other host the host
/// check lets it through to the next error (the missing kernel), so the test checks the
/// host detection either way.
#[test]
fn pvm_host_is_refused_with_the_lab_command() {
    let out = vmm()
        .args(["--kernel", "x", "--rootfs", "y"])
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing on stdout");
    let refused = "this host's KVM is PVM and cannot boot a standard guest; run it in the lab: \
                   fissile-lab run -- fissile-vmm --kernel x --rootfs y";
    if host_is_pvm() {
        assert!(stderr.contains(refused), "{stderr}");
    } else {
        assert!(!stderr.contains("PVM"), "{stderr}");
    }
}

#[test]
fn missing_kernel_with_force_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("root.img");
    std::fs::write(&rootfs, [0u8; 4096]).unwrap();

    let out = vmm()
        .arg("--force")
        .arg("--kernel")
        .arg(dir.path().join("missing-vmlinux"))
        .arg("--rootfs")
        .arg(&rootfs)
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("missing-vmlinux is missing or unreadable"),
        "{stderr}"
    );
}

#[test]
fn no_kernel_flag_is_a_clear_error() {
    let out = vmm()
        .args(["--force", "--rootfs", "/nonexistent"])
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("missing --kernel"), "{stderr}");
}

/// The binary links no C++ (so not the store's rocksdb, whose static constructors ran at
/// every VMM start while a workspace build unified it in): `libstdc++` is not among the
/// libraries it needs. (The name is in the dynamic string table of a binary that needs it.)
#[test]
fn the_vmm_binary_links_no_cplusplus_and_so_no_rocksdb() {
    let binary = std::fs::read(env!("CARGO_BIN_EXE_fissile-vmm")).unwrap();
    let needs = |lib: &[u8]| binary.windows(lib.len()).any(|w| w == lib);
    assert!(
        needs(b"libc.so.6"),
        "no libc.so.6 in the binary: the check reads nothing"
    );
    assert!(
        !needs(b"libstdc++.so"),
        "fissile-vmm links libstdc++: something pulls C++ (rocksdb?) into the VMM"
    );
}
