//! Seccomp filters kept as data, for `fissile-vmm` and `fissile-snapshotd`: a build script
//! compiles the crate's JSON file of seccompiler filters (plus a `comment` per filter) into
//! BPF with [`generate`]; the binary includes the generated file and looks a filter up with
//! [`program`].
//!
//! The generated file holds every filter twice: as written (`ENFORCE`: a syscall outside the
//! list takes the filter's `mismatch_action`, trap or kill) and with that action turned into
//! `log` (`LOG`: the kernel logs the syscall and lets it run; each binary's `--seccomp log`,
//! for finding what a new code path needs).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use seccompiler::{BpfProgram, sock_filter};

/// One BPF instruction: code, jump if true, jump if false, constant.
pub type Insn = (u16, u8, u8, u32);
/// A compiled filter and its name in the JSON file.
pub type Filter = (&'static str, &'static [Insn]);

/// The filter named `name`, ready for `seccompiler::apply_filter`.
pub fn program(filters: &[Filter], name: &str) -> Option<BpfProgram> {
    let (_, insns) = filters.iter().find(|(n, _)| *n == name)?;
    Some(
        insns
            .iter()
            .map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k })
            .collect(),
    )
}

/// A build script's whole job: compiles `source` (relative to the crate) into
/// `$OUT_DIR/seccomp_filters.rs` with [`generate`], rebuilding when it changes; fails the
/// build (a panic, as build scripts do) with what is wrong with the file.
pub fn build_script(source: &str) {
    println!("cargo::rerun-if-changed={source}");
    let Some(out) = std::env::var_os("OUT_DIR") else {
        panic!("OUT_DIR is not set: call this from a build script");
    };
    let out = Path::new(&out).join("seccomp_filters.rs");
    if let Err(e) = generate(Path::new(source), &out) {
        panic!("{e}");
    }
}

/// For build scripts: compiles the filters in `source` (seccompiler's JSON format, a
/// `comment` allowed on each filter) for x86_64 and writes `out`, a Rust file defining
/// `pub(crate) const ENFORCE: &[Filter]` and `pub(crate) const LOG: &[Filter]` (in scope
/// where it is included: `use fissile_proto::seccomp::Filter`). The error says what is wrong
/// with the file; the build script fails the build with it.
pub fn generate(source: &Path, out: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(source)
        .map_err(|e| format!("reading {}: {e}", source.display()))?;
    let mut filters: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a JSON object of filters: {e}", source.display()))?;
    // seccompiler knows comments on rules and conditions, not on filters.
    for f in filters.values_mut() {
        if let Some(f) = f.as_object_mut() {
            f.remove("comment");
        }
    }
    let enforce = compile(source, &filters)?;
    for f in filters.values_mut() {
        if let Some(f) = f.as_object_mut() {
            let action = f.get("mismatch_action").and_then(|a| a.as_str());
            if matches!(action, Some("trap" | "kill_process" | "kill_thread")) {
                f.insert("mismatch_action".into(), serde_json::json!("log"));
            }
        }
    }
    let log = compile(source, &filters)?;

    let mut text = format!("// Generated from {} by build.rs.\n", source.display());
    emit(&mut text, "ENFORCE", &enforce);
    emit(&mut text, "LOG", &log);
    std::fs::write(out, text).map_err(|e| format!("writing {}: {e}", out.display()))
}

fn compile(
    source: &Path,
    filters: &serde_json::Map<String, serde_json::Value>,
) -> Result<BTreeMap<String, Vec<Insn>>, String> {
    let bytes = serde_json::to_vec(filters).map_err(|e| e.to_string())?;
    let map = seccompiler::compile_from_json(bytes.as_slice(), seccompiler::TargetArch::x86_64)
        .map_err(|e| format!("{} does not compile: {e}", source.display()))?;
    Ok(map
        .into_iter()
        .map(|(name, prog)| {
            let insns = prog.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect();
            (name, insns)
        })
        .collect())
}

fn emit(out: &mut String, name: &str, filters: &BTreeMap<String, Vec<Insn>>) {
    let _ = writeln!(out, "pub(crate) const {name}: &[Filter] = &[");
    for (filter, insns) in filters {
        let _ = write!(out, "    ({filter:?}, &[");
        for (code, jt, jf, k) in insns {
            let _ = write!(out, "({code}, {jt}, {jf}, {k}),");
        }
        let _ = writeln!(out, "]),");
    }
    let _ = writeln!(out, "];");
}
