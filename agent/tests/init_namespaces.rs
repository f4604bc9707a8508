//! Smoke test of the PID-1 duties without a VM: the real agent binary runs as PID 1 of
//! throw-away mount, UTS, network and PID namespaces (`unshare`), does its init (overlay
//! over the read-only root, pivot_root, pseudo file systems, hostname, loopback) and serves
//! a unix socket that the host reaches through `/proc/<pid>/root`.
//!
//! It needs root and util-linux `unshare` and fails, saying so, without them (the README's
//! test command runs as root).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use fissile_agent::AgentClient;
use fissile_proto::agent::{ShellCommand, ShellRequest};

fn shell(c: &mut AgentClient, script: &str) -> String {
    let out = c
        .shell(&ShellRequest {
            command: ShellCommand::Script(script.into()),
            cwd: None,
            env: Default::default(),
            stdin: Vec::new(),
            timeout_ms: Some(30_000),
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn init_in_namespaces_sets_up_overlay_mounts_hostname_and_loopback() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root && Command::new("unshare").arg("--version").output().is_ok(),
        "this test needs root and util-linux unshare (scripts/test runs as root)"
    );
    let mut unshare = Command::new("unshare")
        .args([
            "--mount",
            "--uts",
            "--net",
            "--pid",
            "--fork",
            "--mount-proc",
        ])
        .args(["--propagation", "private"])
        .arg(env!("CARGO_BIN_EXE_fissile-agent"))
        .args(["--listen-unix", "/tmp/agent.sock"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(unshare.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening"), "agent did not start: {line:?}");
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id())).unwrap();
    let agent_pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    let sock = format!("/proc/{agent_pid}/root/tmp/agent.sock");
    let mut c = AgentClient::connect_unix(Path::new(&sock)).unwrap();

    let info = c.info().unwrap();
    assert!(info.guest_mode);
    assert_eq!(info.pid, 1);
    assert_eq!(info.hostname, "fissile");

    let marker = "/usr/fissile-overlay-smoke-test";
    let out = shell(
        &mut c,
        &format!(
            "touch {marker} && echo writable; cat /sys/class/net/lo/flags; grep -c -E '^(overlay / |proc /proc |sysfs /sys |devtmpfs /dev |devpts /dev/pts |tmpfs /dev/shm |tmpfs /tmp )' /proc/mounts"
        ),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "writable", "{out}");
    let flags = u32::from_str_radix(lines[1].trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "lo is not up: {out}");
    assert_eq!(lines[2], "7", "missing mounts: {out}");
    // The write went to the tmpfs upper layer, not to the host's root.
    assert!(!Path::new(marker).exists());

    let py = c.exec_code("import socket\nsocket.gethostname()").unwrap();
    assert_eq!(py.result_text(), Some("'fissile'"));

    // PID 1 of the namespace dies -> the whole namespace goes away.
    let _ = Command::new("kill")
        .args(["-9", &agent_pid.to_string()])
        .status();
    let _ = unshare.wait();
}
