//! Shared pieces of the benchmark binaries in `src/bin/`.

/// True inside the lab (nested KVM under QEMU TCG), where times are ~10-50x real hardware
/// and only ratios measured in the same run mean anything. The lab's init sets the variable.
pub fn in_lab() -> bool {
    std::env::var_os("FISSILE_IN_LAB").is_some()
}
