//! Compiles the daemon's seccomp filter (`seccomp/x86_64.json`) into BPF at build time:
//! `$OUT_DIR/seccomp_filters.rs`, included by `src/seccomp.rs`. See `fissile_proto::seccomp`.

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
