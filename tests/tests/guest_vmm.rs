//! Guest tests of the VMM and the agent: real microVMs booted by `fissile-vmm` from the guest
//! kernel (`kernel/`) and image (`rootfs-builder`), the agent as init, Python over vsock.
//!
//! The `guest_` tests are ignored by a plain `cargo test`: `vmm_suite_boots_real_guests` runs
//! them (in one lab boot on a KVM-PVM host, as a child process where KVM is usable) and
//! checks that every one ran and passed (see `fissile_tests::guest`). One of them by hand:
//! `cargo test --release -p fissile-tests --test guest_vmm -- --ignored guest_vmm_boots` (on
//! a host whose KVM boots standard guests, with `FISSILE_GUEST_KERNEL`/`_ROOTFS` set).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::time::{Duration, Instant};

use fissile_proto::agent::{ShellCommand, ShellRequest};
use fissile_proto::control::VmState;
use fissile_sandbox::{Sandbox, SandboxConfig};
use fissile_tests::guest::{GuestEnv, guest_env, run_guest_suite};

#[test]
fn vmm_suite_boots_real_guests() {
    run_guest_suite("guest_", Duration::from_secs(1800));
}

fn config(env: &GuestEnv, dir: &std::path::Path) -> SandboxConfig {
    let mut cfg = SandboxConfig::from_env(dir).unwrap();
    cfg.kernel = env.kernel.clone();
    cfg.rootfs = env.rootfs.clone();
    cfg.mem_mib = 512;
    cfg
}

fn shell(sb: &mut Sandbox, script: &str) -> (String, Option<i32>) {
    let out = sb
        .agent()
        .shell(&ShellRequest {
            command: ShellCommand::Script(script.into()),
            cwd: None,
            env: Default::default(),
            stdin: Vec::new(),
            timeout_ms: Some(60_000),
        })
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.done.exit_status,
    )
}

fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
    (w, h)
}

/// One boot serves many checks (a lab boot costs seconds): the pipeline smoke test (kernel +
/// image + our VMM + agent + the data-science stack), the agent's exec semantics over vsock,
/// shell and files in the guest, the control socket, and a clean poweroff.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_vmm_boots_the_image_and_the_agent_serves_python_over_vsock() {
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let mut sb = Sandbox::boot(&config(&env, dir.path())).unwrap();
    eprintln!(
        "boot: fissile-vmm start -> agent answered: {} ms",
        sb.timings().to_ready.as_millis()
    );

    // The agent is init: guest mode, PID 1, our hostname.
    let info = sb.info().clone();
    assert!(info.guest_mode);
    assert_eq!(info.pid, 1);
    assert_eq!(info.hostname, "fissile");

    // Pipeline smoke test: the image's data-science stack imports and prints its versions.
    let t = Instant::now();
    let out = sb
        .exec(
            "import numpy, pandas, polars, pyarrow, matplotlib\n\
             print('SMOKE-OK', numpy.__version__, pandas.__version__, polars.__version__, \
             matplotlib.__version__)",
        )
        .unwrap();
    eprintln!("first exec (imports): {} ms", t.elapsed().as_millis());
    assert!(out.error().is_none(), "{:?}", out.outputs);
    let line = out.stdout();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 5, "{line}");
    assert_eq!(fields[0], "SMOKE-OK");
    assert!(fields[1].starts_with('2'), "numpy 2.x expected: {line}");

    // State persists across calls and across connections (one interpreter per sandbox).
    assert!(sb.exec("x = 41").unwrap().error().is_none());
    let mut second = sb.connect_agent().unwrap();
    assert_eq!(second.exec_code("x + 1").unwrap().result_text(), Some("42"));

    // Output order: stdout and stderr interleaving is kept, fd-level output included.
    let out = sb
        .exec(
            "import sys, os\nprint('a', flush=True)\nprint('b', file=sys.stderr, flush=True)\n\
             os.system('echo c')\nprint('d')",
        )
        .unwrap();
    assert_eq!(out.stdout(), "a\nc\nd\n");
    assert_eq!(out.stderr(), "b\n");

    // Errors come back as ename/evalue/traceback and do not lose state.
    let out = sb.exec("1/0").unwrap();
    let (ename, _, tb) = out.error().unwrap();
    assert_eq!(ename, "ZeroDivisionError");
    assert!(!tb.is_empty());
    assert_eq!(sb.exec("x").unwrap().result_text(), Some("41"));

    // A matplotlib figure comes back as a PNG of the figure's size.
    let out = sb
        .exec("import matplotlib.pyplot as plt\nplt.figure(figsize=(4, 3), dpi=50)\nplt.plot([1, 3, 2])\nplt.show()")
        .unwrap();
    let pngs: Vec<&[u8]> = out
        .displays()
        .into_iter()
        .filter_map(|d| d.get("image/png"))
        .collect();
    assert_eq!(pngs.len(), 1, "{:?}", out.outputs);
    // 4 x 3 inches at 50 dpi, tight bounding box: at most 200 x 150 pixels.
    let (w, h) = png_size(pngs[0]);
    assert!(
        (100..=200).contains(&w) && (75..=150).contains(&h),
        "{w}x{h}"
    );

    // 1 MB of output streams through vsock intact.
    let out = sb.exec("print('y' * (1 << 20))").unwrap();
    assert_eq!(out.stdout().len(), (1 << 20) + 1);

    // Shell commands and files inside the guest: the overlay root is writable (tmpfs upper).
    let (text, status) = shell(
        &mut sb,
        "echo hi > /usr/fissile-w && cat /usr/fissile-w && cat /proc/cmdline",
    );
    assert_eq!(status, Some(0));
    assert!(text.starts_with("hi\n"), "{text}");
    assert!(text.contains("init=/usr/sbin/fissile-agent"), "{text}");
    let blob: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    sb.agent().write_file("/tmp/blob.bin", &blob, None).unwrap();
    assert_eq!(
        sb.agent().read_file("/tmp/blob.bin", 1 << 30).unwrap(),
        blob
    );

    // The control socket: status, pause (the guest stops answering), resume.
    let mut ctl = sb.control().unwrap();
    let status = ctl.status().unwrap();
    assert_eq!(
        (status.state, status.vcpus, status.mem_mib),
        (VmState::Running, 1, 512)
    );
    ctl.pause().unwrap();
    assert_eq!(ctl.status().unwrap().state, VmState::Paused);
    second.set_call_timeout(Duration::from_secs(2)).unwrap();
    assert!(second.echo(b"ping").is_err(), "a paused guest answered");
    ctl.resume().unwrap();
    let mut third = sb.connect_agent().unwrap();
    assert_eq!(third.echo(b"ping").unwrap(), b"ping");

    // Poweroff from inside ends the VMM cleanly.
    let status = sb.poweroff(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "fissile-vmm exited with {status}");
}

/// User code runs in the guest's `user` cgroup: a memory hog is OOM-killed there (the REPL
/// restarts and says why), a fork bomb runs out of tasks, and the agent answers throughout.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_vmm_a_memory_hog_and_a_fork_bomb_hit_the_user_cgroup_and_the_agent_answers() {
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let mut sb = Sandbox::boot(&config(&env, dir.path())).unwrap();

    let (out, code) = shell(
        &mut sb,
        "cat /proc/self/cgroup /sys/fs/cgroup/user/pids.max /sys/fs/cgroup/user/memory.max",
    );
    assert_eq!(code, Some(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0::/user", "{out}");
    assert_eq!(lines[1], "2048", "{out}");
    let user_max: u64 = lines[2].parse().unwrap();
    assert!(user_max < 512 << 20 && user_max > 256 << 20, "{out}");

    // The memory hog: 64 MiB at a time until the cgroup's limit; the kernel kills the REPL.
    let out = sb.exec("x = 1").unwrap();
    assert!(out.error().is_none());
    let out = sb
        .exec("import numpy as np\nhog = [np.ones(64 << 20, dtype=np.uint8) for _ in range(64)]")
        .unwrap();
    let (ename, evalue, _) = out.error().expect("the hog must not survive");
    assert_eq!(ename, "InterpreterRestarted", "{evalue}");
    assert!(evalue.contains("out-of-memory killer"), "{evalue}");
    let out = sb.exec("1 + 1").unwrap();
    assert_eq!(out.result_text(), Some("2"), "{:?}", out.outputs);
    let out = sb.exec("x").unwrap();
    assert_eq!(
        out.error().map(|e| e.0.to_string()).as_deref(),
        Some("NameError")
    );

    // The fork bomb: out of tasks at pids.max; its process group dies with the timeout.
    let t = Instant::now();
    let bomb = sb
        .agent()
        .shell(&ShellRequest {
            command: ShellCommand::Script("b() { b | b & }; b; sleep 60".into()),
            cwd: None,
            env: Default::default(),
            stdin: Vec::new(),
            timeout_ms: Some(15_000),
        })
        .unwrap();
    eprintln!(
        "fork bomb: ended after {:.1} s: {:?}",
        t.elapsed().as_secs_f64(),
        bomb.done
    );
    let (out, _) = shell(&mut sb, "cat /sys/fs/cgroup/user/pids.events; echo alive");
    assert!(out.contains("alive"), "{out}");
    let max_hits: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("max "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(max_hits > 0, "the bomb never reached pids.max: {out}");
    let out = sb.exec("2 + 2").unwrap();
    assert_eq!(out.result_text(), Some("4"), "{:?}", out.outputs);
}
