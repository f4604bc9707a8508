//! Guest tests of snapshot/restore, fork(n), merge_into and persistent spaces: real
//! microVMs, real snapshotd (rocksdb store, userfaultfd), real Python in the guest.
//!
//! The `guest_` tests are ignored by a plain `cargo test`: `lifecycle_suite_boots_real_guests`
//! runs them (in one lab boot on a KVM-PVM host, as a child process where KVM is usable) and
//! checks that every one ran and passed (see `fissile_tests::guest`).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::Path;
use std::time::{Duration, Instant};

use fissile_proto::control::{ControlRequest, ErrorKind};
use fissile_sandbox::{ControlError, Sandbox, SandboxConfig, SandboxError, Snapshotd};
use fissile_tests::guest::{GuestEnv, guest_env, run_guest_suite};

#[test]
fn lifecycle_suite_boots_real_guests() {
    run_guest_suite("guest_", Duration::from_secs(2400));
}

fn config(env: &GuestEnv, dir: &Path, sd: &Snapshotd) -> SandboxConfig {
    config_at(env, dir, sd.socket())
}

/// [`config`] with snapshotd's socket path (one that outlives a snapshotd).
fn config_at(env: &GuestEnv, dir: &Path, snapshotd: &Path) -> SandboxConfig {
    let mut cfg = SandboxConfig::from_env(dir).unwrap();
    cfg.kernel = env.kernel.clone();
    cfg.rootfs = env.rootfs.clone();
    cfg.mem_mib = 512;
    cfg.snapshotd = Some(snapshotd.to_path_buf());
    cfg
}

/// The value of a Python expression (its repr), failing the test on an exception.
fn eval(sb: &mut Sandbox, code: &str) -> String {
    let out = sb.exec(code).unwrap();
    if let Some((ename, evalue, tb)) = out.error() {
        panic!("{code:?} raised {ename}: {evalue}\n{}", tb.join("\n"));
    }
    out.result_text()
        .unwrap_or_else(|| panic!("{code:?} returned nothing: {:?}", out.outputs))
        .to_string()
}

/// Trims `sb` twice with its VM paused throughout (`what` names it in the log) and returns
/// the first trim: the copies it drops held the image's bytes, so the memory hashes the same
/// before and after, and the second trim finds only the copies that differ.
fn trim_paused(sb: &Sandbox, what: &str) -> fissile_proto::control::TrimReply {
    let mut ctl = sb.control().unwrap();
    ctl.pause().unwrap();
    let before = ctl.call(&ControlRequest::MemoryHash).unwrap().memory_hash;
    let trim = sb.trim().unwrap();
    let after = ctl.call(&ControlRequest::MemoryHash).unwrap().memory_hash;
    let again = sb.trim().unwrap();
    ctl.resume().unwrap();
    eprintln!("trim of {what}: {trim:?}, then {again:?}");
    assert_eq!(before, after, "trim changed the guest's memory");
    assert_eq!(
        (again.private_pages, again.dropped_pages),
        (trim.private_pages - trim.dropped_pages, 0),
        "a second trim: {again:?} after {trim:?}"
    );
    trim
}

/// The kind and message of a refusal by the VMM (fails the test on anything else).
fn refused(r: Result<impl std::fmt::Debug, SandboxError>) -> (ErrorKind, String) {
    match r {
        Err(SandboxError::Control(ControlError::Refused { kind, message })) => (kind, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Every VMM of a jailed sandbox — booted, restored, forked, merged — runs as its own
/// unprivileged uid with no capabilities, in a mount namespace whose root holds only what it
/// needs, and everything still works: snapshot, restore, fork, merge, persist, and a snapshot
/// after snapshotd was started again.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_jailed_vmms_boot_restore_fork_and_merge() {
    use fissile_sandbox::jail::JailConfig;
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let jail = JailConfig::default();
    // The socket alone in its directory, as fissiled keeps it: jails bind the directory.
    let sock = dir.path().join("sd").join("sd.sock");
    std::fs::create_dir(sock.parent().unwrap()).unwrap();
    let sd = Snapshotd::start_for(&dir.path().join("store"), &sock, Some(&jail)).unwrap();
    let jailed = |name: &str| {
        let mut cfg = config_at(&env, &dir.path().join(name), &sock);
        cfg.limits.jail = Some(jail.clone());
        cfg
    };
    // What the host sees of a VMM: its uid, capabilities, root and mount namespace.
    let our_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let check = |sb: &Sandbox, what: &str| {
        let pid = sb.pid().unwrap();
        let uid = sb
            .jail_uid()
            .unwrap_or_else(|| panic!("{what}: not jailed"));
        assert!(uid >= jail.uid_base, "{what}: uid {uid}");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(field("Uid:"), uid.to_string(), "{what}");
        assert_eq!(field("Gid:"), jail.gid.to_string(), "{what}");
        assert_eq!(field("CapEff:"), "0000000000000000", "{what}");
        assert_eq!(field("NoNewPrivs:"), "1", "{what}");
        let mnt = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        assert_ne!(mnt, our_mnt, "{what}: shares our mount namespace");
        // Its root holds no host files beyond what it was given.
        let root = format!("/proc/{pid}/root");
        // (Its own directory is under the test's temporary directory, beside the store.)
        let store = dir.path().join("store");
        let store = store.strip_prefix("/").unwrap();
        for absent in [
            Path::new("etc/passwd"),
            Path::new("root"),
            Path::new("home"),
            store,
        ] {
            assert!(
                !Path::new(&root).join(absent).exists(),
                "{what}: /{} is visible in its root",
                absent.display()
            );
        }
        assert!(
            Path::new(&root).join("dev/kvm").exists(),
            "{what}: no /dev/kvm"
        );
        uid
    };

    let mut parent = Sandbox::boot(&jailed("p")).unwrap();
    let parent_uid = check(&parent, "booted");
    assert_eq!(eval(&mut parent, "x = 41\nx"), "41");

    let snap = parent.snapshot(true).unwrap();
    let mut restored = Sandbox::restore(&jailed("r"), &snap.id).unwrap();
    let restored_uid = check(&restored, "restored");
    assert_ne!(restored_uid, parent_uid, "two VMMs share a uid");
    assert_eq!(eval(&mut restored, "x"), "41");

    let (mut children, _) = parent.fork(2).unwrap();
    let mut uids = std::collections::BTreeSet::from([parent_uid, restored_uid]);
    for (i, c) in children.iter_mut().enumerate() {
        assert!(
            uids.insert(check(c, "fork child")),
            "child {i} reuses a uid"
        );
        eval(c, &format!("x = {}\nx", 100 + i));
    }
    parent.merge_into(&children[1]).unwrap();
    check(&parent, "merged");
    assert_eq!(eval(&mut parent, "x"), "101", "the merge did not take");

    // Persist stops the VMM; the space comes back in a new jailed VMM.
    let persisted = restored.persist(Duration::from_secs(120)).unwrap();
    let mut resumed = Sandbox::restore(&jailed("s"), &persisted).unwrap();
    check(&resumed, "resumed");
    assert_eq!(eval(&mut resumed, "x"), "41");

    // snapshotd stops and starts again (a crash, its filter), binding its socket anew: a VMM
    // jailed before reaches the new one through the directory its jail holds, and snapshots.
    let mut before = Sandbox::boot(&jailed("q")).unwrap();
    eval(&mut before, "y = 7\n1");
    drop((parent, children, resumed));
    sd.kill();
    let sd = Snapshotd::start_for(&dir.path().join("store"), &sock, Some(&jail)).unwrap();
    let snap = before
        .snapshot(true)
        .expect("a VMM jailed before snapshotd's restart snapshots through the new one");
    let mut after = Sandbox::restore(&jailed("q2"), &snap.id).unwrap();
    assert_eq!(eval(&mut after, "y"), "7");
    drop(sd);
}

/// Pre-started VMMs (jailed, as fissiled runs them): a standby waits with its VM made and no
/// control socket; a restore into one and a fork into two work as with new processes (state
/// kept, distinct entropy per child, a merge back); one of another shape is refused before
/// the fork and the parent is unharmed; a dropped standby's process is gone.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_standby_vmms_take_a_restore_and_a_fork() {
    use fissile_sandbox::jail::JailConfig;
    use fissile_sandbox::{ChildPlace, Standby};
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let jail = JailConfig::default();
    let sd = Snapshotd::start_for(
        &dir.path().join("store"),
        &dir.path().join("sd.sock"),
        Some(&jail),
    )
    .unwrap();
    let jailed = |name: &str| {
        let mut cfg = config(&env, &dir.path().join(name), &sd);
        cfg.limits.jail = Some(jail.clone());
        cfg
    };
    let ready = |name: &str| {
        let mut s = Standby::start(&jailed(name)).unwrap();
        s.wait_ready(Duration::from_secs(120)).unwrap();
        s
    };

    let mut parent = Sandbox::boot(&jailed("p")).unwrap();
    assert_eq!(eval(&mut parent, "x = 41\nx"), "41");
    let snap = parent.snapshot(true).unwrap();

    let standby = ready("r");
    let pid = standby.pid().unwrap();
    assert!(
        !dir.path().join("r/api.sock").exists(),
        "a standby has a control socket before it has a VM state"
    );
    let mut restored = Sandbox::restore_standby(standby, &snap.id).unwrap();
    assert_eq!(restored.pid(), Some(pid), "not restored into the standby");
    assert!(restored.jail_uid().is_some(), "the standby is not jailed");
    assert_eq!(eval(&mut restored, "x"), "41");

    let (children, _) = parent
        .fork_each_with(vec![
            ChildPlace::Standby(Box::new(ready("c0"))),
            ChildPlace::Standby(Box::new(ready("c1"))),
        ])
        .unwrap();
    let mut children: Vec<Sandbox> = children.into_iter().map(Result::unwrap).collect();
    let mut randoms = Vec::new();
    for (i, c) in children.iter_mut().enumerate() {
        assert_eq!(eval(c, "x"), "41", "child {i}");
        randoms.push(eval(c, "import os\nos.urandom(16).hex()"));
        eval(c, &format!("x = {}\nx", 100 + i));
    }
    randoms.push(eval(&mut parent, "import os\nos.urandom(16).hex()"));
    let distinct: std::collections::BTreeSet<_> = randoms.iter().collect();
    assert_eq!(
        distinct.len(),
        randoms.len(),
        "urandom repeated: {randoms:?}"
    );
    parent.merge_into(&children[1]).unwrap();
    assert_eq!(eval(&mut parent, "x"), "101", "the merge did not take");

    // Another shape: refused before the parent forks.
    let mut wide = jailed("w");
    wide.vcpus = 2;
    let wide = Standby::start(&wide).unwrap();
    match parent.fork_each_with(vec![ChildPlace::Standby(Box::new(wide))]) {
        Err(SandboxError::Standby(m)) => assert!(m.contains("2 vCPUs"), "{m}"),
        other => panic!("a standby of another shape was taken: {other:?}"),
    }
    assert_eq!(eval(&mut parent, "x"), "101");

    // Dropped: its process is stopped and reaped.
    let standby = ready("d");
    let pid = standby.pid().unwrap();
    drop(standby);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "a dropped standby's process {pid} is still there"
    );
}

/// fork(3) from a parent with `x = 41`; the children diverge; child 2 is merged back; a
/// fork with a child whose VMM fails reports it and leaves no VMM behind.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_fork_three_children_diverge_and_the_parent_merges_one() {
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let sd = Snapshotd::start(&dir.path().join("store"), &dir.path().join("sd.sock")).unwrap();
    let mut parent = Sandbox::boot(&config(&env, &dir.path().join("p"), &sd)).unwrap();
    assert_eq!(eval(&mut parent, "x = 41\nx"), "41");
    // A booted VM's memory is its own memfd, not an image: nothing to trim against.
    let (kind, msg) = refused(parent.trim());
    assert_eq!(kind, ErrorKind::Conflict, "{msg}");

    let (mut children, timings) = parent.fork(3).unwrap();
    eprintln!(
        "fork(3): VMM {:.0} ms, all children answered {:.0} ms; snapshot {:?}",
        timings.vmm_ms, timings.all_answered_ms, timings.snapshot
    );
    assert_eq!(children.len(), 3);
    // Trim child 0 right after its wake-up, paused throughout: the copies it drops held the
    // image's bytes, so its memory hashes the same before and after, a second trim finds
    // only the copies that differ, and the child runs on with its state (below).
    let trim = trim_paused(&children[0], "a fresh fork child");
    assert!(
        trim.dropped_pages > 0 && trim.dropped_pages < trim.private_pages,
        "{trim:?}"
    );
    let modules = ["json", "decimal", "fractions"];
    for (i, c) in children.iter_mut().enumerate() {
        assert_eq!(eval(c, "x"), "41", "child {i} did not inherit x");
        eval(c, &format!("x = {}\nimport {}\nx", 100 + i, modules[i]));
    }
    // Every child (and the parent) has its own CRNG after the restore.
    let mut randoms: Vec<String> = children
        .iter_mut()
        .map(|c| eval(c, "import os\nos.urandom(16).hex()"))
        .collect();
    randoms.push(eval(&mut parent, "import os\nos.urandom(16).hex()"));
    let distinct: std::collections::BTreeSet<&String> = randoms.iter().collect();
    assert_eq!(
        distinct.len(),
        randoms.len(),
        "urandom repeated: {randoms:?}"
    );
    assert_eq!(
        eval(&mut parent, "x"),
        "41",
        "a child's write reached the parent"
    );

    // Merge child 2 with both VMs paused, so that right after the merge their memory can be
    // compared before either runs again. The winner snapshots (and stays paused: a client
    // holds it); the parent takes that snapshot, checked against its fork in snapshotd.
    let mut pc = parent.control().unwrap();
    let mut wc = children[2].control().unwrap();
    pc.pause().unwrap();
    wc.pause().unwrap();
    let winner_snap = wc
        .call(&ControlRequest::Snapshot { durable: false })
        .unwrap()
        .snapshot
        .unwrap();
    parent.allow(&winner_snap.id).unwrap(); // a jailed VMM reads only what it is granted
    let merge = pc
        .call(&ControlRequest::Merge {
            snapshot: winner_snap.id.clone(),
        })
        .unwrap()
        .merge
        .unwrap();
    eprintln!("merge: {merge:?}");
    // The winner's layer lies over the fork snapshot the parent runs on: the parent's
    // memory moves in place (what it wrote since the fork dropped, the winner's pages mapped
    // over), and must then equal the winner's.
    assert!(
        merge.in_place,
        "the merge remapped all of memory: {merge:?}"
    );
    let hp = pc.call(&ControlRequest::MemoryHash).unwrap();
    let hw = wc.call(&ControlRequest::MemoryHash).unwrap();
    let differing: Vec<usize> = hp
        .memory_chunks
        .as_ref()
        .unwrap()
        .iter()
        .zip(hw.memory_chunks.as_ref().unwrap())
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        hp.memory_hash, hw.memory_hash,
        "paused parent and winner memory differ after merge, in MiB {differing:?}"
    );
    pc.resume().unwrap();
    wc.resume().unwrap();
    parent.reconnect().unwrap();
    // The parent has child 2's x and its imported module; the others keep their own state.
    assert_eq!(eval(&mut parent, "x"), "102");
    assert_eq!(
        eval(&mut parent, "import sys\n'fractions' in sys.modules"),
        "True"
    );
    assert_eq!(eval(&mut children[0], "x"), "100");
    assert_eq!(eval(&mut children[1], "x"), "101");
    assert_eq!(eval(&mut children[2], "x"), "102");
    assert_eq!(
        eval(&mut children[0], "import sys\n'fractions' in sys.modules"),
        "False"
    );

    // Repeat merge and merging a sibling after the merge are refused (404).
    let (kind, again) = refused(parent.merge_into(&children[2]));
    assert_eq!(kind, ErrorKind::NotFound);
    assert!(again.contains("no unmerged fork"), "{again}");
    let (kind, sibling) = refused(parent.merge_into(&children[0]));
    assert_eq!(kind, ErrorKind::NotFound, "{sibling}");
    // After a new fork: a snapshot the parent took itself is a self-merge (400); a
    // stranger's (child 0 descends from the old fork, not this one) is not_found.
    let (_second, _) = parent.fork(1).unwrap();
    let own = parent.snapshot(false).unwrap();
    let (kind, msg) = refused(parent.merge_snapshot(&own.id));
    assert_eq!(kind, ErrorKind::BadRequest);
    assert!(msg.contains("itself"), "{msg}");
    let stranger = children[0].snapshot(false).unwrap();
    let (kind, msg) = refused(parent.merge_snapshot(&stranger.id));
    assert_eq!(kind, ErrorKind::NotFound, "{msg}");
    let (kind, msg) = refused(parent.merge_snapshot("no-such-snapshot"));
    assert_eq!(kind, ErrorKind::NotFound, "{msg}");
    // The parent still works after the refusals.
    assert_eq!(eval(&mut parent, "x + 1"), "103");

    // A fork of a fork: child 0 forks once; the grandchild has child 0's state.
    let (mut grand, _) = children[0].fork(1).unwrap();
    assert_eq!(eval(&mut grand[0], "x"), "100");
    assert_eq!(
        eval(&mut grand[0], "import sys\n'json' in sys.modules"),
        "True"
    );

    // A fork whose middle child's VMM starts and then fails (its sockets' paths are too
    // long to bind): that child is reported with the reason and its process reaped; the
    // others start, and once dropped (what `fork` does with the rest when one fails) no VMM
    // of theirs is left, running or unreaped.
    let doomed = dir.path().join(format!("partial-1-{}", "x".repeat(110)));
    let dirs = vec![
        dir.path().join("partial-0"),
        doomed.clone(),
        dir.path().join("partial-2"),
    ];
    let (outcomes, _) = parent.fork_each_in(dirs).unwrap();
    let why = outcomes[1].as_ref().err().map(|e| e.to_string());
    assert!(
        why.as_deref()
            .is_some_and(|w| w.contains("fissile-vmm exited")),
        "{why:?}"
    );
    let mut started: Vec<Sandbox> = outcomes.into_iter().filter_map(Result::ok).collect();
    assert_eq!(started.len(), 2, "the other children started");
    assert_eq!(eval(&mut started[1], "x"), "102");
    drop(started);
    // Our children now: the parent's VMM, the earlier forks' and snapshotd, none of them a
    // zombie and none of the partial fork's.
    let children: Vec<(String, String)> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit(") ").next().unwrap_or("").chars().next();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            (
                format!("{pid} {state:?}"),
                String::from_utf8_lossy(&cmdline).replace('\0', " "),
            )
        })
        .collect();
    assert!(
        children
            .iter()
            .all(|(s, cmd)| !s.ends_with("Some('Z')") && !cmd.contains("partial-")),
        "{children:#?}"
    );
    assert_eq!(eval(&mut parent, "x"), "102", "the parent is unharmed");
}

/// Snapshot/restore cycles keep state; a RAM-wide write pattern survives; wall clock and
/// entropy are fresh after a restore; a persisted space resumes after a snapshotd restart.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_restore_cycles_keep_state_and_persisted_spaces_resume_after_a_snapshotd_restart() {
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let sock = dir.path().join("sd.sock");
    let sd = Snapshotd::start(&store, &sock).unwrap();
    let cfg = |name: &str, sd: &Snapshotd| config(&env, &dir.path().join(name), sd);
    let mut sb = Sandbox::boot(&cfg("boot", &sd)).unwrap();
    // A pattern over 64 MiB of guest memory, checked by its hash inside the guest.
    let setup = "import hashlib\nbuf = bytearray(64 << 20)\nfor i in range(0, len(buf), 4096):\n    buf[i:i+8] = i.to_bytes(8, 'little')\nh0 = hashlib.sha256(buf).hexdigest()\nn = 0\nh0[:16]";
    let h0 = eval(&mut sb, setup);

    let mut restore_ms = Vec::new();
    for cycle in 0..10 {
        let snap = sb.snapshot(false).unwrap();
        let t = Instant::now();
        let mut next = Sandbox::restore(&cfg(&format!("cycle-{cycle}"), &sd), &snap.id).unwrap();
        let first = eval(&mut next, "n += 1\nn");
        restore_ms.push(t.elapsed().as_millis());
        assert_eq!(first, (cycle + 1).to_string(), "cycle {cycle}");
        drop(sb);
        sb = next;
    }
    eprintln!("restore -> first exec, 10 cycles (ms): {restore_ms:?}");
    assert_eq!(
        eval(&mut sb, "hashlib.sha256(buf).hexdigest()[:16]"),
        h0,
        "RAM pattern lost"
    );

    // Persist, stop snapshotd, wait, start it again, resume: globals are there, the clock is
    // the host's, not the snapshot's.
    eval(&mut sb, "space = {'answer': 42}\n1");
    let id = sb.persist(Duration::from_secs(120)).unwrap();
    sd.kill();
    std::thread::sleep(Duration::from_secs(3));
    let sd = Snapshotd::start(&store, &sock).unwrap();
    let mut resumed = Sandbox::restore(&cfg("resumed", &sd), &id).unwrap();
    assert_eq!(eval(&mut resumed, "space['answer']"), "42");
    // Trim it running, while snapshotd still fills its image lazily from the store (holes
    // read as zeros until then; zero pages are mapped as the zero page): a lazily restored
    // guest copies pages it only reads (KVM's asynchronous faults bring them in for
    // writing), and the guest's own hash of its RAM pattern (below) stays right.
    let running = resumed.trim().unwrap();
    eprintln!("trim of a VM restored lazily from the store, running: {running:?}");
    assert!(running.dropped_pages > 0, "{running:?}");
    assert_eq!(eval(&mut resumed, "space['answer']"), "42");
    // Then trim it paused throughout: its memory hashes the same before and after, and a
    // second trim finds only the copies that differ.
    let trim = trim_paused(&resumed, "a VM restored from the store");
    assert!(trim.dropped_pages > 0, "{trim:?}");
    assert_eq!(
        eval(&mut resumed, "hashlib.sha256(buf).hexdigest()[:16]"),
        h0
    );
    let guest_now: f64 = eval(&mut resumed, "import time\ntime.time()")
        .parse()
        .unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (guest_now - host_now).abs() < 5.0,
        "guest clock off by {:.1} s after restoring an old snapshot",
        guest_now - host_now
    );
}

/// Restoring a paused snapshot and snapshotting it again, before it runs, gives the same
/// state: devices exactly, vCPUs and irqchips except what KVM derives from the running clock.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_save_restore_save_gives_equal_state_for_every_device() {
    use fissile_vmm::snapshot::MicrovmState;
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let sd = Snapshotd::start(&dir.path().join("store"), &dir.path().join("sd.sock")).unwrap();
    let mut sb = Sandbox::boot(&config(&env, &dir.path().join("a"), &sd)).unwrap();
    eval(
        &mut sb,
        "import json\nstate = json.dumps({'k': list(range(100))})\n1",
    );
    let mut ctl = sb.control().unwrap();
    ctl.pause().unwrap();
    let s1 = sb.snapshot(false).unwrap();
    // A second VMM restores it and stays paused; its snapshot is taken before it runs.
    let rdir = dir.path().join("r");
    let mut vmm = spawn_paused_restore(&env, &sd, &s1.id, &rdir);
    let mut rctl = connect_when_listening(&rdir.join("api.sock"));
    let s2 = rctl
        .call(&ControlRequest::Snapshot { durable: false })
        .unwrap()
        .snapshot
        .unwrap();
    let mut client = fissile_snapshotd::client::Client::connect(sd.socket()).unwrap();
    let a = MicrovmState::decode(&client.get_blob(&s1.id, "vmstate").unwrap()).unwrap();
    let b = MicrovmState::decode(&client.get_blob(&s2.id, "vmstate").unwrap()).unwrap();
    let _ = vmm.kill();
    let _ = vmm.wait();

    // Devices: exactly equal.
    assert_eq!(a.serial, b.serial, "serial");
    assert_eq!(a.mmio, b.mmio, "virtio-mmio transports and queues");
    assert_eq!(a.machine, b.machine);
    // vCPUs: everything but the running clock (the TSC MSR and the LAPIC timer's current
    // count advance while paused).
    let bytes = |v: &dyn erased::Ser| v.bytes();
    for (x, y) in a.vcpus.iter().zip(&b.vcpus) {
        assert_eq!(bytes(&x.regs), bytes(&y.regs), "regs");
        assert_eq!(bytes(&x.sregs), bytes(&y.sregs), "sregs");
        assert_eq!(x.xsave, y.xsave, "xsave");
        assert_eq!(bytes(&x.xcrs), bytes(&y.xcrs), "xcrs");
        assert_eq!(bytes(&x.debugregs), bytes(&y.debugregs), "debugregs");
        assert_eq!(bytes(&x.mp_state), bytes(&y.mp_state), "mp_state");
        assert_eq!(bytes(&x.events), bytes(&y.events), "events");
        assert_eq!(bytes(&x.cpuid), bytes(&y.cpuid), "cpuid");
        let msrs = |v: &fissile_vmm::vstate::persist::VcpuState| -> Vec<(u32, u64)> {
            v.msrs
                .iter()
                .filter(|m| m.index != 0x10)
                .map(|m| (m.index, m.data))
                .collect()
        };
        assert_eq!(msrs(x), msrs(y), "MSRs other than the TSC");
        let mut lx = x.lapic.regs;
        let mut ly = y.lapic.regs;
        for r in [&mut lx, &mut ly] {
            r[0x390..0x394].fill(0); // timer current count
            // IRR: KVM's in-kernel PIT keeps running while the vCPUs are parked, so its
            // IRQ 0 (vector 0x30) may be pending in one capture and not yet in the other.
            r[0x200..0x280].fill(0);
        }
        assert_eq!(
            lx, ly,
            "LAPIC registers other than the timer's current count and pending interrupts"
        );
    }
    assert_eq!(
        bytes(&a.vm.irqchips),
        bytes(&b.vm.irqchips),
        "PIC and IOAPIC"
    );
}

/// Compares KVM structs (no `PartialEq`) by their serialized bytes.
mod erased {
    pub trait Ser {
        fn bytes(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn bytes(&self) -> Vec<u8> {
            postcard::to_allocvec(self).unwrap()
        }
    }
}

/// Several control clients hammer one VMM with pause, resume, status, snapshot and
/// memory_hash while it forks and merges. Every reply is a success or an allowed refusal,
/// the merge lands, and afterwards the VM's memory equals that of its own snapshot restored
/// in another VMM (nothing tore a snapshot or the live VM).
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_concurrent_clients_during_fork_and_merge_leave_consistent_memory() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let sd = Snapshotd::start(&dir.path().join("store"), &dir.path().join("sd.sock")).unwrap();
    let mut parent = Sandbox::boot(&config(&env, &dir.path().join("p"), &sd)).unwrap();
    eval(&mut parent, "x = 41\nblob = bytearray(8 << 20)\n1");

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicUsize::new(0));
    let hammers: Vec<_> = (0..4)
        .map(|t| {
            let sock = parent.api_sock();
            let (stop, ops) = (stop.clone(), ops.clone());
            std::thread::spawn(move || {
                let mut c = fissile_sandbox::ControlClient::connect(&sock).unwrap();
                let mut i = t;
                while !stop.load(Ordering::SeqCst) {
                    let req = match i % 5 {
                        0 => ControlRequest::Pause,
                        1 => ControlRequest::Resume,
                        2 => ControlRequest::Status,
                        3 => ControlRequest::Snapshot { durable: false },
                        _ => ControlRequest::MemoryHash,
                    };
                    match c.call(&req) {
                        Ok(_) => {}
                        Err(ControlError::Refused { kind, message }) => {
                            // Only "resume a VM nobody paused" may be refused.
                            assert!(
                                kind == ErrorKind::Conflict && message.contains("not paused"),
                                "{req:?} refused: {kind:?} {message}"
                            );
                        }
                        Err(e) => panic!("{req:?} failed: {e}"),
                    }
                    ops.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
                // Leave the VM running.
                let _ = c.call(&ControlRequest::Resume);
            })
        })
        .collect();

    let (mut children, _) = parent.fork(2).unwrap();
    eval(&mut children[1], "x = 102\nblob[:4] = b'win!'\n1");
    let winner = children[1].snapshot(false).unwrap();
    // The merge itself while the clients hammer (the agent reconnect comes after: a guest
    // paused half the time by other clients cannot be expected to answer in time).
    let mut ctl = parent.control().unwrap();
    parent.allow(&winner.id).unwrap(); // a jailed VMM reads only what it is granted
    ctl.call(&ControlRequest::Merge {
        snapshot: winner.id.clone(),
    })
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    for h in hammers {
        h.join().unwrap();
    }
    eprintln!(
        "{} control requests from 4 clients during fork + merge",
        ops.load(Ordering::SeqCst)
    );
    let _ = ctl.call(&ControlRequest::Resume);
    // After many snapshots the guest re-faults its working set through a chain of layered
    // images, which in the lab can take minutes: give the reconnect time (bounded).
    let deadline = Instant::now() + Duration::from_secs(600);
    while let Err(e) = parent.reconnect() {
        assert!(Instant::now() < deadline, "reconnect after the merge: {e}");
        eprintln!("reconnect after the merge: {e}; retrying");
    }
    assert_eq!(eval(&mut parent, "x, bytes(blob[:4])"), "(102, b'win!')");

    // The paused VM and its own snapshot, restored paused in another VMM, hold the same
    // memory.
    ctl.pause().unwrap();
    let snap = parent.snapshot(false).unwrap();
    let (a, b) = memory_hashes_with_a_paused_restore(&env, &sd, &mut ctl, &snap.id, dir.path());
    assert_eq!(a, b, "the VM and its snapshot differ");
    ctl.resume().unwrap();
    assert_eq!(eval(&mut parent, "x"), "102");
}

/// A `resume` that arrives while a durable snapshot is in progress waits for it and does not
/// resume the VM under it (it answers "not paused": no client paused it); `status` answers
/// meanwhile and names the operation.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_resume_during_a_snapshot_waits_and_does_not_tear_it() {
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let sd = Snapshotd::start(&dir.path().join("store"), &dir.path().join("sd.sock")).unwrap();
    let mut sb = Sandbox::boot(&config(&env, &dir.path().join("a"), &sd)).unwrap();
    // Enough memory that the snapshot takes a while.
    eval(&mut sb, "blob = bytes(range(256)) * (256 << 12)\n1");
    let sock = sb.api_sock();
    let snapshotter = std::thread::spawn(move || {
        let mut c = fissile_sandbox::ControlClient::connect(&sock).unwrap();
        c.call(&ControlRequest::Snapshot { durable: true })
            .unwrap()
            .snapshot
            .unwrap()
    });
    let mut c = sb.control().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut busy_seen = None;
    while busy_seen.is_none() && !snapshotter.is_finished() && Instant::now() < deadline {
        busy_seen = c.status().unwrap().busy;
    }

    let resume = c.call(&ControlRequest::Resume);

    let snap = snapshotter.join().unwrap();
    eprintln!("busy seen: {busy_seen:?}; snapshot {snap:?}");
    assert!(snap.durable);
    match resume {
        Err(ControlError::Refused { kind, message }) => {
            assert_eq!(kind, ErrorKind::Conflict);
            assert!(message.contains("not paused"), "{message}");
        }
        other => panic!("resume during a snapshot: {other:?}"),
    }
    assert_eq!(
        c.status().unwrap().state,
        fissile_proto::control::VmState::Running
    );
    assert_eq!(eval(&mut sb, "len(blob)"), (256usize << 20).to_string());
    // The snapshot restores to a working VM with the data.
    let mut r = Sandbox::restore(&config(&env, &dir.path().join("r"), &sd), &snap.id).unwrap();
    assert_eq!(
        eval(&mut r, "blob[1000], len(blob)"),
        format!("(232, {})", 256usize << 20)
    );
}

/// A VM shut down while paused ends its VMM process (no hang in device teardown), and so
/// does one whose vCPUs never ran (restored with --start-paused).
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_shutdown_of_a_paused_vm_ends_the_vmm() {
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let sd = Snapshotd::start(&dir.path().join("store"), &dir.path().join("sd.sock")).unwrap();
    let mut sb = Sandbox::boot(&config(&env, &dir.path().join("a"), &sd)).unwrap();
    let snap = sb.snapshot(false).unwrap();
    let mut c = sb.control().unwrap();
    c.pause().unwrap();

    c.shutdown().unwrap();

    let status = sb.wait(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{status}");

    let rdir = dir.path().join("r");
    let mut restored = spawn_paused_restore(&env, &sd, &snap.id, &rdir);
    connect_when_listening(&rdir.join("api.sock"))
        .shutdown()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = restored.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the paused restored VMM did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

/// A VM snapshotted again and again makes a chain of layers; snapshotd flattens the one
/// with `FLATTEN_BELOW` layers below it, and a restore of a later snapshot maps over that
/// flattened image: the restored VM holds the same memory as the VM, and the same state.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_a_flattened_chain_of_snapshots_restores_the_same_memory() {
    use fissile_proto::snapshotd::FLATTEN_BELOW;
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let sd = Snapshotd::start(&dir.path().join("store"), &dir.path().join("sd.sock")).unwrap();
    let mut vm = Sandbox::boot(&config(&env, &dir.path().join("vm"), &sd)).unwrap();
    eval(&mut vm, "xs = []\n1");
    // The boot's snapshot is complete; each later one is a layer over the one before.
    let mut ids = Vec::new();
    for i in 0..=FLATTEN_BELOW + 1 {
        eval(&mut vm, &format!("xs.append({i})\nlen(xs)"));
        ids.push(vm.snapshot(true).unwrap().id);
    }
    // The first layer with FLATTEN_BELOW layers below it: ids[FLATTEN_BELOW + 1] (ids[0] is
    // complete). Its image becomes complete once flattened.
    let flat = &ids[FLATTEN_BELOW as usize + 1];
    let mut client = fissile_snapshotd::client::Client::connect(sd.socket()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !client.open_image(flat).unwrap().complete {
        assert!(
            Instant::now() < deadline,
            "snapshot {flat} was not flattened"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // One more snapshot, over the flattened one, restored paused in another VMM.
    eval(&mut vm, "xs.append('last')\nlen(xs)");
    let mut ctl = vm.control().unwrap();
    ctl.pause().unwrap();
    let snap = vm.snapshot(true).unwrap();
    let layer = client.open_layer(&snap.id).unwrap();
    assert_eq!(
        (&layer.base, layer.below),
        (ids.last().unwrap(), 0),
        "the last snapshot lies right over the flattened one"
    );
    let (a, b) = memory_hashes_with_a_paused_restore(&env, &sd, &mut ctl, &snap.id, dir.path());
    assert_eq!(a, b, "the VM and its restore over a flattened chain differ");
    ctl.resume().unwrap();
    let n = FLATTEN_BELOW + 3;
    assert_eq!(eval(&mut vm, "len(xs), xs[-1]"), format!("({n}, 'last')"));
}

/// A snapshot records its vCPUs' TSC rate; a restore on a host whose TSC runs at another
/// rate (here: copies of the snapshot whose state says 10% faster, and 10% slower) sets the
/// vCPUs to it (scaled by the CPU, or a faster one caught up by KVM) or, where KVM cannot
/// (a slower rate with no TSC scaling), refuses with both rates named; the snapshot itself
/// stays usable.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_a_restore_takes_the_snapshots_tsc_rate_or_says_why_not() {
    use fissile_snapshotd::client::{Client, CreateOptions, seal_for_adoption};
    use fissile_vmm::snapshot::{MicrovmState, STATE_BLOB};
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let sd = Snapshotd::start(&dir.path().join("store"), &dir.path().join("sd.sock")).unwrap();
    let mut vm = Sandbox::boot(&config(&env, &dir.path().join("vm"), &sd)).unwrap();
    eval(&mut vm, "x = 7\n1");
    let snap = vm.snapshot(true).unwrap();
    drop(vm);
    let mut client = Client::connect(sd.socket()).unwrap();
    let state = MicrovmState::decode(&client.get_blob(&snap.id, STATE_BLOB).unwrap()).unwrap();
    let host = state.tsc_khz.expect("the snapshot records no TSC rate");
    for (name, khz) in [("faster", host + host / 10), ("slower", host - host / 10)] {
        // The same memory (a layer over the snapshot with no pages of its own), that rate.
        let mut edited = state.clone();
        edited.tsc_khz = Some(khz);
        let size = state.machine.mem_size;
        let memfd = fissile_vmm::memory::create_memfd("empty-layer", size).unwrap();
        seal_for_adoption(&memfd).unwrap();
        let opts = CreateOptions {
            memory_size: size,
            parent: Some(snap.id.clone()),
            dirty_pages: Some(Vec::new()),
            blobs: vec![(STATE_BLOB.to_string(), edited.encode().unwrap())],
            adopt: true,
            ..CreateOptions::default()
        };
        let id = client.create_snapshot(&memfd, &opts).unwrap();
        match Sandbox::restore(&config(&env, &dir.path().join(name), &sd), &id) {
            Ok(mut r) => {
                assert_eq!(eval(&mut r, "x"), "7");
                let log = r.vmm_log_tail(200);
                assert!(
                    log.contains("TSC set to the snapshot's rate")
                        && log.contains(&khz.to_string()),
                    "{name}: restored with no TSC rate set in its log:\n{log}"
                );
                eprintln!("{name}: set from {host} to {khz} kHz");
            }
            Err(e) => {
                let msg = fissile_proto::error_chain(&e);
                assert!(
                    name == "slower"
                        && msg.contains(&format!("the snapshot's TSC runs at {khz} kHz"))
                        && msg.contains(&format!("{host} kHz"))
                        && msg.contains("could not scale"),
                    "{name}: {msg}"
                );
                eprintln!("{name}: this host cannot scale the TSC: {msg}");
            }
        }
    }
    // The snapshot itself restores as before.
    let mut r = Sandbox::restore(&config(&env, &dir.path().join("r"), &sd), &snap.id).unwrap();
    assert_eq!(eval(&mut r, "x"), "7");
}

/// The memory hashes of the paused VM behind `ctl` and of its snapshot `id` restored paused
/// into another VMM (its sockets in `dir/r`), which is stopped after.
fn memory_hashes_with_a_paused_restore(
    env: &GuestEnv,
    sd: &Snapshotd,
    ctl: &mut fissile_sandbox::ControlClient,
    id: &str,
    dir: &Path,
) -> (Option<String>, Option<String>) {
    let rdir = dir.join("r");
    let mut restored = spawn_paused_restore(env, sd, id, &rdir);
    let mut rctl = connect_when_listening(&rdir.join("api.sock"));
    let a = ctl.call(&ControlRequest::MemoryHash).unwrap().memory_hash;
    let b = rctl.call(&ControlRequest::MemoryHash).unwrap().memory_hash;
    let _ = restored.kill();
    let _ = restored.wait();
    (a, b)
}

/// Starts `fissile-vmm --restore <id> --start-paused` with its sockets in `dir`.
fn spawn_paused_restore(
    env: &GuestEnv,
    sd: &Snapshotd,
    id: &str,
    dir: &Path,
) -> std::process::Child {
    std::fs::create_dir_all(dir).unwrap();
    std::process::Command::new(fissile_sandbox::paths::find_binary("fissile-vmm").unwrap())
        .arg("--restore")
        .arg(id)
        .arg("--snapshotd")
        .arg(sd.socket())
        .arg("--rootfs")
        .arg(&env.rootfs)
        .arg("--vsock-uds")
        .arg(dir.join("vsock.sock"))
        .arg("--api-sock")
        .arg(dir.join("api.sock"))
        .arg("--start-paused")
        .stderr(std::fs::File::create(dir.join("vmm.log")).unwrap())
        .spawn()
        .unwrap()
}

/// A control client once the socket listens (a restored VMM binds it after applying state).
fn connect_when_listening(sock: &Path) -> fissile_sandbox::ControlClient {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(c) = fissile_sandbox::ControlClient::connect(sock) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{} never listened",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every VMM — booted, and each fork child — runs in a cgroup of its own under the limits
/// (memory.max = guest RAM + overhead, pids.max, cpu.max), with its rlimits, and with a
/// seccomp filter on every thread; a child's cgroup goes when the child does.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_every_vmm_runs_in_its_own_cgroup_with_rlimits_and_seccomp_on_every_thread() {
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let sd = Snapshotd::start(&dir.path().join("store"), &dir.path().join("sd.sock")).unwrap();
    let cfg = config(&env, &dir.path().join("p"), &sd);
    let parent_cg = cfg
        .limits
        .cgroup_parent
        .clone()
        .expect("the lab runs as root on cgroup v2, so VMMs get cgroups by default");
    let mut parent = Sandbox::boot(&cfg).unwrap();
    assert_eq!(eval(&mut parent, "x = 41\nx"), "41");
    let check = |sb: &Sandbox| {
        let pid = sb.pid().unwrap();
        let cg = sb.cgroup().expect("a cgroup of its own");
        assert_eq!(cg.parent(), Some(parent_cg.as_path()));
        let read = |f: &str| std::fs::read_to_string(cg.join(f)).unwrap();
        assert!(
            read("cgroup.procs").lines().any(|l| l == pid.to_string()),
            "VMM {pid} not in {}",
            cg.display()
        );
        assert_eq!(
            read("memory.max").trim(),
            ((512u64 + 512) << 20).to_string()
        );
        assert_eq!(read("pids.max").trim(), "256");
        assert_eq!(read("cpu.max").trim(), "200000 100000");
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let row = |name: &str| {
            let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
            line[name.len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(row("Max open files"), "4096");
        assert_eq!(row("Max file size"), ((512u64 + 1024) << 20).to_string());
        // Seccomp mode 2 (filter) on every thread; the main thread installs its filter
        // right after the control socket is up, which may be just after the agent answered.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let unfiltered: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .filter_map(|t| {
                    let t = t.ok()?.path();
                    let status = std::fs::read_to_string(t.join("status")).ok()?;
                    let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
                    (!status.lines().any(|l| l == "Seccomp:\t2"))
                        .then(|| format!("{} ({})", t.display(), comm.trim()))
                })
                .collect();
            if unfiltered.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "threads without a seccomp filter: {unfiltered:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    check(&parent);

    let (mut children, _) = parent.fork(2).unwrap();
    let mut child_cgroups = Vec::new();
    for c in &mut children {
        check(c);
        assert_ne!(c.cgroup(), parent.cgroup());
        assert_eq!(eval(c, "x + 1"), "42");
        child_cgroups.push(c.cgroup().unwrap().to_path_buf());
    }
    // A merge (the parent switches to a child's snapshot, its watchdog thread filtered too).
    let winner = children.pop().unwrap();
    assert_eq!(eval(&mut children[0], "x"), "41");
    parent.merge_into(&winner).unwrap();
    assert_eq!(eval(&mut parent, "x"), "41");
    check(&parent);
    drop(winner);
    drop(children);
    for cg in &child_cgroups {
        assert!(!cg.exists(), "{} outlived its VMM", cg.display());
    }
    let cg = parent.cgroup().unwrap().to_path_buf();
    drop(parent);
    assert!(!cg.exists(), "{} outlived its VMM", cg.display());
}
