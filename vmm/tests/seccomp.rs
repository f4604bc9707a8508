//! The VMM's seccomp filters, natively (no VM needed): `fissile-vmm --seccomp-selftest CLASS`
//! installs one thread class's filter, shows that what the class needs still works (stderr;
//! a thread for the classes that start threads, through the clone3 → clone fallback), then
//! calls execve, which no filter allows. The lab suites run every VMM with its filters on
//! (the default), so a syscall a real code path needs and a filter lacks fails a test there.

use std::process::{Command, Output};

const CLASSES: &[&str] = &["main", "vcpu", "vmm", "api", "vsock", "net", "watchdog"];
const SYS_EXECVE: u32 = 59;

fn selftest(mode: &str, class: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fissile-vmm"))
        .args(["--seccomp", mode, "--seccomp-selftest", class])
        .env_remove("FISSILE_VMM_SECCOMP")
        .output()
        .expect("run fissile-vmm")
}

#[test]
fn a_forbidden_syscall_stops_the_vmm_with_its_number_in_every_thread_class() {
    for class in CLASSES {
        let out = selftest("trap", class);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(fissile_vmm::seccomp::EXIT_BAD_SYSCALL),
            "{class}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("{class} filter installed")),
            "{class}: {stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "seccomp: the {class} thread made syscall {SYS_EXECVE}, which its filter does not allow"
            )),
            "{class}: {stderr}"
        );
        assert!(!stderr.contains("was not stopped"), "{class}: {stderr}");
        if matches!(*class, "vmm" | "api") {
            assert!(
                stderr.contains("a thread started and joined"),
                "{class}: {stderr}"
            );
        }
    }
}

#[test]
fn log_mode_and_off_let_the_syscall_run() {
    for mode in ["log", "off"] {
        let out = selftest(mode, "vcpu");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{mode}: {stderr}");
        assert!(
            stderr.contains("execve was not stopped"),
            "{mode}: {stderr}"
        );
    }
}
