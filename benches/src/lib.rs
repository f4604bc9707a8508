//! Shared pieces of the benchmark binaries in `src/bin/`.

pub mod qemu;
pub mod tally;

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

/// Calls `f` with each kB field of `/proc/<pid>/smaps`: its mapping's header line, the
/// field's name and its value (nothing if the file cannot be read).
fn for_each_smaps_field(pid: u32, mut f: impl FnMut(&str, &str, u64)) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return;
    };
    let mut mapping = "";
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            mapping = line;
            continue;
        }
        if let Some((field, v)) = line.split_once(':')
            && let Some(kb) = v.trim().strip_suffix(" kB")
        {
            f(mapping, field, kb.trim().parse::<u64>().unwrap_or(0));
        }
    }
}

/// The kB fields of `/proc/<pid>/smaps`, summed over the mappings whose line contains
/// `needle` (first) and over the whole process (second), from one read of the file.
pub fn smaps(pid: u32, needle: &str) -> (HashMap<String, u64>, HashMap<String, u64>) {
    let (mut matching, mut whole) = (HashMap::new(), HashMap::new());
    for_each_smaps_field(pid, |mapping, field, kb| {
        *whole.entry(field.to_string()).or_default() += kb;
        if mapping.contains(needle) {
            *matching.entry(field.to_string()).or_default() += kb;
        }
    });
    (matching, whole)
}

/// The `n` largest sums of `field` (kB) in `/proc/<pid>/smaps`, by mapping name (its path,
/// `[heap]`, `[stack]`…, or `[anon]`), largest first.
pub fn smaps_top(pid: u32, field: &str, n: usize) -> Vec<(String, u64)> {
    let mut by_name: HashMap<String, u64> = HashMap::new();
    for_each_smaps_field(pid, |mapping, f, kb| {
        if f == field {
            let name = mapping.split_whitespace().nth(5).unwrap_or("[anon]");
            *by_name.entry(name.to_string()).or_default() += kb;
        }
    });
    let mut top: Vec<(String, u64)> = by_name.into_iter().filter(|(_, kb)| *kb > 0).collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.1));
    top.truncate(n);
    top
}

/// Field `n` (numbered as in proc(5), from 1) of a `stat` file's text; 0 if absent.
fn stat_text_field(stat: &str, n: usize) -> u64 {
    // After the `(comm)` field, which may hold spaces: state is field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace()
        .nth(n - 3)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Field `n` of `/proc/<pid>/stat`; 0 if unreadable.
fn stat_field(pid: u32, n: usize) -> u64 {
    stat_text_field(&read_stat(&format!("/proc/{pid}/stat")), n)
}

fn read_stat(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The CPU time (user + system, ms) in a `stat` file's text: fields 14 and 15, in USER_HZ
/// ticks (100 a second on Linux).
fn stat_cpu_ms(stat: &str) -> u64 {
    (stat_text_field(stat, 14) + stat_text_field(stat, 15)) * 10
}

/// The CPU time (user + system, ms) each thread of process `pid` has taken so far, by
/// thread name (threads of one name summed), from `/proc/<pid>/task/*/stat`.
pub fn thread_cpu_ms(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut by_name = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for t in tasks.flatten() {
        let stat = read_stat(&t.path().join("stat").to_string_lossy());
        let name = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map_or("", |(n, _)| n)
            .to_string();
        *by_name.entry(name).or_insert(0) += stat_cpu_ms(&stat);
    }
    by_name
}

/// How often each thread of process `pid` has been switched out so far (voluntary and
/// involuntary context switches: about once per wake-up), by thread name (threads of one
/// name summed), from `/proc/<pid>/task/*/status`.
pub fn thread_switches(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut by_name = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let name = field_text(&status, "Name:");
        *by_name.entry(name).or_insert(0) +=
            field("voluntary_ctxt_switches:") + field("nonvoluntary_ctxt_switches:");
    }
    by_name
}

fn field_text(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map_or(String::new(), |v| v.trim().to_string())
}

/// What grew between two by-name readings (`before`, `after`), names that did not left out.
pub fn grown(
    before: &std::collections::BTreeMap<String, u64>,
    after: std::collections::BTreeMap<String, u64>,
) -> Vec<(String, u64)> {
    after
        .into_iter()
        .map(|(name, n)| {
            let was = before.get(&name).copied().unwrap_or(0);
            (name, n.saturating_sub(was))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The minor and major page faults process `pid` has taken (0, 0 if unreadable), from
/// `/proc/<pid>/stat` (fields 10 and 12).
pub fn page_faults(pid: u32) -> (u64, u64) {
    (stat_field(pid, 10), stat_field(pid, 12))
}

/// The CPU time (user + system, ms) process `pid` has taken so far, threads that ended
/// included (`/proc/<pid>/stat` fields 14 and 15, in USER_HZ ticks: 100 a second on Linux).
pub fn cpu_ms(pid: u32) -> u64 {
    stat_cpu_ms(&read_stat(&format!("/proc/{pid}/stat")))
}

/// The time (ms) every CPU of the host has spent idle so far, waiting for I/O included
/// (`/proc/stat`'s `cpu` line, fields 4 and 5, in USER_HZ ticks); 0 if unreadable. Beside
/// a step's wall time it tells waiting (idle CPUs) from work (none idle).
pub fn host_idle_ms() -> u64 {
    let stat = read_stat("/proc/stat");
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    (ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0)) * 10
}

/// A KVM counter summed over every VM on the host (`/sys/kernel/debug/kvm/<name>`, e.g.
/// `pf_fixed`: guest-physical page faults KVM fixed by mapping a page), if debugfs is
/// mounted and readable (the lab mounts it).
pub fn kvm_counter(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/kernel/debug/kvm/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Every KVM counter of [`kvm_counter`] by name (the files directly in
/// `/sys/kernel/debug/kvm`), empty if debugfs is not readable.
pub fn kvm_counters() -> std::collections::BTreeMap<String, u64> {
    let Ok(dir) = std::fs::read_dir("/sys/kernel/debug/kvm") else {
        return Default::default();
    };
    dir.flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            Some((name.clone(), kvm_counter(&name)?))
        })
        .collect()
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
