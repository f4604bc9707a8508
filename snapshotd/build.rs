//! Compiles the daemon's seccomp filter (`seccomp/x86_64.json`) into BPF at build time:
//! `$OUT_DIR/seccomp_filters.rs`, included by `src/seccomp.rs`. See `fissile_proto::seccomp`.

fn main() {
    fissile_proto::seccomp::build_script("seccomp/x86_64.json");
}
