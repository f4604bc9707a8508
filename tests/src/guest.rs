//! Running guest tests (real microVMs booted by `fissile-vmm`) where a usable KVM is.
//!
//! A guest test is an ordinary `#[test]` marked `#[ignore = "guest test: …"]` that starts
//! with [`guest_env`]. A plain `cargo test` does not run it; each guest test binary has one
//! entry test that calls [`run_guest_suite`], which runs the binary's guest tests itself,
//! each as its own bounded process (`--ignored --exact`): natively where this host's KVM
//! boots standard guests, or inside one lab boot on a KVM-PVM host (the test binary is
//! copied into the lab; a fresh lab once more if that one froze). Either way it checks that
//! every expected guest test ran and passed, so a suite can never pass without booting
//! anything. Run by hand with `--ignored` where they
//! cannot run, the guest tests fail and say why.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::lab::{Lab, LabConfig, LabError, host_kvm_usable};

/// Set inside the lab by its init script.
pub const IN_LAB_ENV: &str = "FISSILE_IN_LAB";

/// The `ignore` reason guest tests carry (for reference; attributes need a literal).
pub const GUEST_TEST: &str = "guest test: boots microVMs; run by this binary's suite entry test";

/// What a guest test needs: the guest kernel and image, and where our binaries are.
#[derive(Debug, Clone)]
pub struct GuestEnv {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest root image.
    pub rootfs: PathBuf,
    /// True inside the lab (timings are ~10-50x real hardware).
    pub in_lab: bool,
}

/// The guest environment; panics with the reason when this process cannot boot microVMs
/// (not in the lab and no usable KVM, or `FISSILE_GUEST_KERNEL`/`_ROOTFS` unset).
pub fn guest_env() -> GuestEnv {
    let in_lab = std::env::var_os(IN_LAB_ENV).is_some();
    assert!(
        in_lab || host_kvm_usable(),
        "this guest test cannot run here: this host's KVM cannot boot a standard guest \
         (KVM-PVM or no VT-x/SVM); run the suite's entry test, which uses the lab"
    );
    let var = |name: &str| -> PathBuf {
        std::env::var_os(name)
            .unwrap_or_else(|| {
                panic!(
                    "{name} is not set: run through scripts/test, or export it (fissile-lab info)"
                )
            })
            .into()
    };
    GuestEnv {
        kernel: var("FISSILE_GUEST_KERNEL"),
        rootfs: var("FISSILE_GUEST_ROOTFS"),
        in_lab,
    }
}

/// The ignored tests of the current test binary whose names contain `filter`.
fn guest_tests(filter: &str) -> Vec<String> {
    let exe = std::env::current_exe().expect("current test binary");
    let out = Command::new(&exe)
        .args(["--list", "--ignored", "--format", "terse", filter])
        .output()
        .expect("listing the guest tests");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect()
}

/// How long one guest test may run before the suite kills it (after printing where every
/// process waits). The lab is ~10-50x slower than real hardware; the slowest guest test
/// takes ~2 min there.
pub const GUEST_TEST_LIMIT: Duration = Duration::from_secs(900);

/// A shell script that runs each of `tests` as its own process of the test binary `exe`
/// (`--exact`), prints `guest test <name> exit <status>` after each, kills one that runs
/// past `limit` after printing where every process waits, and exits 1 if any failed.
fn suite_script(exe: &str, tests: &[String], limit: Duration) -> String {
    let mut s = format!(
        r#"limit={limit}
exe={exe}
# Where every process and every thread of ours waits (for a test that overstays).
diag() {{
  for p in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' < $p/cmdline 2>/dev/null)
    case "$cmd" in *fissile*|*"$exe"*) ;; *) continue;; esac
    echo "  pid ${{p#/proc/}} $(cut -d' ' -f3 $p/stat 2>/dev/null) wchan=$(cat $p/wchan 2>/dev/null) $cmd" | cut -c1-240
    for t in $p/task/*; do
      echo "    tid ${{t##*/}} $(cat $t/comm 2>/dev/null) $(cut -d' ' -f3 $t/stat 2>/dev/null) wchan=$(cat $t/wchan 2>/dev/null) syscall=$(cut -d' ' -f1 $t/syscall 2>/dev/null)"
    done
  done
}}
# A process and everything below it: stopped first (so it starts nothing more), then its
# children the same way, then killed (a killed test leaves no VMM behind holding its output
# open).
killtree() {{
  kill -STOP $1 2>/dev/null
  for c in $(cat /proc/$1/task/*/children 2>/dev/null); do killtree $c; done
  kill -9 $1 2>/dev/null
}}
fail=0
for t in {tests}; do
  RUST_BACKTRACE=1 "$exe" --ignored --exact --test-threads=1 --nocapture "$t" 2>&1 &
  pid=$!
  ( i=0
    while [ $i -lt $limit ]; do sleep 5; i=$((i+5)); kill -0 $pid 2>/dev/null || exit 0; done
    echo "guest test $t still runs after $limit s; where every process waits:"
    diag
    killtree $pid ) &
  dog=$!
  wait $pid; st=$?
  killtree $dog
  echo "guest test $t exit $st"
  [ $st -eq 0 ] || fail=1
done
exit $fail
"#,
        limit = limit.as_secs(),
        exe = shell_quote(exe),
        tests = tests
            .iter()
            .map(|t| shell_quote(t))
            .collect::<Vec<_>>()
            .join(" "),
    );
    s.push('\n');
    s
}

/// `s` as one shell word (single-quoted).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The tests of `tests` that `output` (of [`suite_script`]) reports as passed: exit 0.
fn passed<'a>(output: &str, tests: &'a [String]) -> Vec<&'a String> {
    tests
        .iter()
        .filter(|t| output.contains(&format!("guest test {t} exit 0\n")))
        .collect()
}

/// A short account of a failed suite run from its `output` (of [`suite_script`]): which of
/// `tests` passed, failed (with their exit status) or never finished, then each failed
/// test's panic messages (with a few lines after each), then the end of its output.
fn failure_report(output: &str, tests: &[String]) -> String {
    /// Lines kept after a panic's first line, and from the end of a failed test's output.
    const AFTER_PANIC: usize = 12;
    const TAIL: usize = 60;
    // Each test's part of the output: from the end of the previous report line to its own.
    let mut parts: Vec<(&str, &str, &str)> = Vec::new(); // (test, status, its output)
    let mut start = 0;
    let mut at = 0;
    for line in output.split_inclusive('\n') {
        at += line.len();
        let Some(rest) = line.trim_end().strip_prefix("guest test ") else {
            continue;
        };
        if let Some((name, status)) = rest.rsplit_once(" exit ")
            && tests.iter().any(|t| t == name)
        {
            parts.push((name, status, &output[start..at]));
            start = at;
        }
    }
    let unfinished = &output[start..];
    let failed: Vec<_> = parts.iter().filter(|(_, st, _)| *st != "0").collect();
    let never: Vec<&String> = tests
        .iter()
        .filter(|t| !parts.iter().any(|(name, _, _)| name == t))
        .collect();
    let mut r = format!(
        "GUEST SUITE FAILED: {} of {} guest tests passed; failed: {:?}; never finished: {:?}\n",
        parts.len() - failed.len(),
        tests.len(),
        failed
            .iter()
            .map(|(name, st, _)| format!("{name} (exit {st})"))
            .collect::<Vec<_>>(),
        never
    );
    let mut account = |name: &str, text: &str| {
        let lines: Vec<&str> = text.lines().collect();
        r.push_str(&format!("\n==== {name}: its panics ====\n"));
        for (i, l) in lines.iter().enumerate() {
            if l.contains("panicked at") {
                for l in lines.iter().skip(i).take(AFTER_PANIC + 1) {
                    r.push_str(l);
                    r.push('\n');
                }
                r.push_str("...\n");
            }
        }
        r.push_str(&format!(
            "==== {name}: the last {TAIL} lines of its output ====\n"
        ));
        for l in &lines[lines.len().saturating_sub(TAIL)..] {
            r.push_str(l);
            r.push('\n');
        }
    };
    for (name, _, text) in &failed {
        account(name, text);
    }
    if !unfinished.trim().is_empty() {
        account("(after the last finished test)", unfinished);
    }
    r
}

/// `output` of [`suite_script`] up to the end of its last `guest test <name> exit <status>`
/// line: what the tests that finished printed.
fn finished_part(output: &str) -> &str {
    let mut end = 0;
    let mut at = 0;
    for line in output.split_inclusive('\n') {
        at += line.len();
        if line.starts_with("guest test ") && line.contains(" exit ") {
            end = at;
        }
    }
    &output[..end]
}

/// Runs the current test binary's guest tests (ignored tests matching `filter`, a libtest
/// substring filter), each as its own process bounded by [`GUEST_TEST_LIMIT`] and each run
/// of the suite by `timeout`: natively when this host's KVM can boot our guest, else in one
/// lab boot (two, and so up to twice `timeout`, if the first lab froze).
/// Panics unless every one of them ran and passed, with a short report first (which tests
/// failed or never finished, their panics and last lines: what a CI log that keeps only the
/// start and end of a long failure still shows) and the whole output after it. A lab that froze (its
/// own kernel stopped, whatever the tests did) is said so and replaced once by a fresh lab
/// for the tests it did not finish.
pub fn run_guest_suite(filter: &str, timeout: Duration) {
    let expected = guest_tests(filter);
    assert!(
        !expected.is_empty(),
        "no ignored tests match {filter:?} in this binary"
    );
    let exe = std::env::current_exe().expect("current test binary");
    let mut output = String::new();
    let mut status = 0;
    let mut todo = expected.clone();
    for attempt in 1..=2 {
        // In the lab, or natively where this host's KVM boots guests (the lab's native mode
        // runs the same script under `timeout`, the binary linked onto `PATH`).
        let (out, st) = {
            let cfg = LabConfig::from_env()
                .expect("lab inputs (kernel, image, binaries, FISSILE_LAB_SMP)");
            let lab = Lab::prepare(cfg).expect("preparing the lab");
            let name = "fissile-guest-suite";
            let script = suite_script(name, &todo, GUEST_TEST_LIMIT);
            match lab.run_with(&script, &[(exe.clone(), name.to_string())], timeout) {
                Ok(out) => (out.output, out.status),
                Err(
                    ref e @ LabError::Frozen {
                        output: ref out, ..
                    },
                ) if attempt == 1 => {
                    // What the tests that finished printed: a failure among them fails the
                    // suite now; only the tests that never finished (the one the freeze
                    // interrupted and those after it) run again.
                    let out = finished_part(out);
                    let finished: Vec<&String> = todo
                        .iter()
                        .filter(|t| out.contains(&format!("guest test {t} exit ")))
                        .collect();
                    let done = passed(out, &todo);
                    assert_eq!(
                        finished,
                        done,
                        "guest tests failed before the lab froze\n{}\n---- the whole output \
                         ----\n{output}{out}\n{e}",
                        failure_report(
                            out,
                            &finished.iter().map(|t| t.to_string()).collect::<Vec<_>>()
                        )
                    );
                    let done: Vec<String> = done.into_iter().cloned().collect();
                    todo.retain(|t| !done.contains(t));
                    output.push_str(out);
                    eprintln!(
                        "{e}\n\nTHE LAB FROZE (not a test failure): it stopped running; the \
                         guest tests it did not finish ({todo:?}) run again, once, in a fresh lab"
                    );
                    output.push_str("\n(the lab froze; a fresh lab runs the rest)\n");
                    continue;
                }
                Err(e) => {
                    // What the tests printed before (a frozen lab's output holds it; a timed
                    // out one's console tail is in `e`).
                    let before = match &e {
                        LabError::Frozen { output: out, .. } => format!("{output}{out}"),
                        _ => output,
                    };
                    panic!(
                        "lab run (attempt {attempt}): {e}\n{}\n---- the whole output ----\n{before}",
                        failure_report(&before, &expected)
                    )
                }
            }
        };
        output.push_str(&out);
        status = st;
        break;
    }
    if status != 0 || passed(&output, &expected).len() != expected.len() {
        // The report first (a CI log that shows only the start and the end of a long
        // failure still shows which test failed and how), the whole output after it.
        eprintln!(
            "{}\n---- the whole output of the guest suite ----\n{output}",
            failure_report(&output, &expected)
        );
    } else {
        eprintln!("{output}");
    }
    assert_eq!(status, 0, "guest tests failed (output above)");
    let ok = passed(&output, &expected);
    assert_eq!(
        ok.len(),
        expected.len(),
        "not every guest test passed: {expected:?} (output above)"
    );
    let summaries = output
        .matches("test result: ok. 1 passed; 0 failed; 0 ignored")
        .count();
    assert_eq!(
        summaries,
        expected.len(),
        "expected one `test result: ok. 1 passed` per guest test {expected:?} (output above)"
    );
}

/// The resident memory of process `pid` in KiB (panics if it cannot be read: a test that
/// compares memory must not compare zeroes).
#[allow(clippy::unwrap_used)]
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The suite script runs each test on its own, reports each, kills one that overstays
    /// (saying where processes wait) and fails if any failed; `passed` and `finished_part`
    /// read that report.
    #[test]
    fn the_suite_script_bounds_each_test_and_reports_each() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("fake-suite");
        // A stand-in test binary: its last argument names the test's behaviour.
        std::fs::write(
            &exe,
            "#!/bin/sh\nfor a; do t=$a; done\ncase $t in\n  ok*) echo 'test result: ok. 1 passed; 0 failed; 0 ignored';;\n  fails) exit 101;;\n  hangs) sleep 600;;\nesac\n",
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let tests: Vec<String> = ["ok_a", "hangs", "fails", "ok_b"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let script = suite_script(&exe.to_string_lossy(), &tests, Duration::from_secs(5));
        let t = std::time::Instant::now();
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);

        assert!(t.elapsed() < Duration::from_secs(60), "{text}");
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.contains("guest test hangs still runs after 5 s"),
            "{text}"
        );
        assert!(text.contains("guest test hangs exit 137"), "{text}");
        assert!(text.contains("guest test fails exit 101"), "{text}");
        assert_eq!(passed(&text, &tests), vec!["ok_a", "ok_b"]);
        let cut = finished_part("guest test ok_a exit 0\ntest x ... ");
        assert_eq!(cut, "guest test ok_a exit 0\n");

        // The failure report names the failed tests first and shows their panics.
        let out = "boot\nguest test ok_a exit 0\nstep 1\nthread 'fails' panicked at x.rs:1:\nboom\n\
                   guest test fails exit 101\nguest test ok_b exit 0\ntest hangs ... ";
        let r = failure_report(out, &tests);
        assert!(
            r.starts_with(
                "GUEST SUITE FAILED: 2 of 4 guest tests passed; failed: [\"fails (exit 101)\"]; \
                 never finished: [\"hangs\"]\n"
            ),
            "{r}"
        );
        assert!(
            r.contains("==== fails: its panics ====\nthread 'fails' panicked at x.rs:1:\nboom\n"),
            "{r}"
        );
        assert!(
            r.contains("==== (after the last finished test): the last 60 lines"),
            "{r}"
        );
        assert!(r.contains("test hangs ... "), "{r}");
        assert!(
            !r.contains("boot"),
            "a passed test's output is left out: {r}"
        );
    }
}
