//! Shared pieces of the benchmark binaries in `src/bin/`.

pub mod qemu;

/// True inside the lab (nested KVM under QEMU TCG), where times are ~10-50x real hardware
/// and only ratios measured in the same run mean anything. The lab's init sets the variable.
pub fn in_lab() -> bool {
    std::env::var_os("FISSILE_IN_LAB").is_some()
}

use std::collections::HashMap;
use std::time::Duration;

/// The median of `v` (sorted in place; the upper one of an even count).
pub fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The kB fields of `/proc/<pid>/smaps`, summed over the mappings whose line contains
/// `needle` (first) and over the whole process (second), from one read of the file.
pub fn smaps(pid: u32, needle: &str) -> (HashMap<String, u64>, HashMap<String, u64>) {
    let (mut matching, mut whole) = (HashMap::new(), HashMap::new());
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return (matching, whole);
    };
    let mut inside = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = line.contains(needle);
            continue;
        }
        if let Some((field, v)) = line.split_once(':')
            && let Some(kb) = v.trim().strip_suffix(" kB")
        {
            let kb = kb.trim().parse::<u64>().unwrap_or(0);
            *whole.entry(field.to_string()).or_default() += kb;
            if inside {
                *matching.entry(field.to_string()).or_default() += kb;
            }
        }
    }
    (matching, whole)
}

/// The `n` largest sums of `field` (kB) in `/proc/<pid>/smaps`, by mapping name (its path,
/// `[heap]`, `[stack]`…, or `[anon]`), largest first.
pub fn smaps_top(pid: u32, field: &str, n: usize) -> Vec<(String, u64)> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Vec::new();
    };
    let mut by_name: HashMap<String, u64> = HashMap::new();
    let mut name = String::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            name = line
                .split_whitespace()
                .nth(5)
                .unwrap_or("[anon]")
                .to_string();
            continue;
        }
        if let Some((f, v)) = line.split_once(':')
            && f == field
            && let Some(kb) = v.trim().strip_suffix(" kB")
        {
            *by_name.entry(name.clone()).or_default() += kb.trim().parse::<u64>().unwrap_or(0);
        }
    }
    let mut top: Vec<(String, u64)> = by_name.into_iter().filter(|(_, kb)| *kb > 0).collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.1));
    top.truncate(n);
    top
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Resident set size of process `pid` in kB (`VmRSS`).
pub fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS")
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `RssAnon`, `RssFile`, `RssShmem`…); 0 if
/// it cannot be read.
pub fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The value of a Python expression (its repr); an exception is an error.
pub fn eval(sb: &mut fissile_sandbox::Sandbox, code: &str) -> anyhow::Result<String> {
    let out = sb.exec(code)?;
    if let Some((e, v, _)) = out.error() {
        anyhow::bail!("{code:?} raised {e}: {v}");
    }
    Ok(out.result_text().unwrap_or("").to_string())
}
