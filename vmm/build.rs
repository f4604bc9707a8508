//! Compiles the VMM's seccomp filters (`seccomp/x86_64.json`) into BPF at build time:
//! `$OUT_DIR/seccomp_filters.rs` holds every filter as written (`ENFORCE`: a syscall outside
//! the list raises SIGSYS, which `seccomp.rs` turns into a logged exit) and in log mode
//! (`LOG`, `fissile-vmm --seccomp log`). See `fissile_proto::seccomp`.

fn main() {
    fissile_proto::seccomp::build_script("seccomp/x86_64.json");
}
