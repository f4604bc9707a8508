//! Compiles the VMM's seccomp filters (`seccomp/x86_64.json`) into BPF at build time:
//! `$OUT_DIR/seccomp_filters.rs` holds every filter as written (`ENFORCE`: a syscall outside
//! the list raises SIGSYS, which `seccomp.rs` turns into a logged exit) and in log mode
//! (`LOG`, `fissile-vmm --seccomp log`). See `fissile_proto::seccomp`.

use std::path::{Path, PathBuf};

const SOURCE: &str = "seccomp/x86_64.json";

fn main() {
    println!("cargo::rerun-if-changed={SOURCE}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    if let Err(e) =
        fissile_proto::seccomp::generate(Path::new(SOURCE), &out.join("seccomp_filters.rs"))
    {
        panic!("{e}");
    }
}
