//! The fissiled binary over real HTTP on loopback, for what needs no microVM: health, the
//! error shape, authentication, bad input and tenant isolation of ids. (Sandboxes
//! themselves are exercised in the lab: `tests/tests/guest_api.rs`.)

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fissile_tests::daemon::{self, Fissiled};

use serde_json::Value;

/// The daemon and the state directory it runs on (removed after it stopped: fields drop in
/// order).
struct Daemon {
    fissiled: Fissiled,
    _dir: tempfile::TempDir,
}

/// fissiled on a fresh state directory (no kernel or image: nothing here boots), and a key.
fn start() -> (Daemon, String) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_fissiled"));
    let key = daemon::create_key(bin, &state, "acme").unwrap();
    let fissiled = Fissiled::serve_without_guests(bin, &state, &[]).unwrap();
    (
        Daemon {
            fissiled,
            _dir: dir,
        },
        key,
    )
}

fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> (u16, Value) {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(30));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match resp {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    assert!(resp.header("x-request-id").is_some(), "no x-request-id");
    let text = resp.into_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {v}"))
}

#[test]
fn health_auth_errors_and_unknown_ids_over_http() {
    let (d, key) = start();
    let url = |p: &str| format!("{}{p}", d.fissiled.base());
    let bearer = format!("Bearer {key}");

    let (s, v) = call("GET", &url("/healthz"), &[], None);
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));

    // No key, a wrong key: 401. Both header forms work.
    let (s, v) = call("GET", &url("/v1/sandboxes"), &[], None);
    assert_eq!((s, code(&v)), (401, "unauthorized"));
    let (s, v) = call(
        "GET",
        &url("/v1/sandboxes"),
        &[("Authorization", "Bearer fsk_x")],
        None,
    );
    assert_eq!((s, code(&v)), (401, "unauthorized"));
    let (s, v) = call("GET", &url("/v1/sandboxes"), &[("X-API-Key", &key)], None);
    assert_eq!((s, v), (200, Value::Array(vec![])));

    // Bad input is a 400 in the one error shape; nothing is created.
    for bad in [
        "{not json",
        r#"{"memory_mib":"lots"}"#,
        r#"{"surprise":1}"#,
        r#"{"memory_mib":1}"#,
        r#"{"vcpus":0}"#,
    ] {
        let (s, v) = call(
            "POST",
            &url("/v1/sandboxes"),
            &[("Authorization", &bearer)],
            Some(bad),
        );
        assert_eq!((s, code(&v)), (400, "bad_request"), "{bad}: {v}");
    }
    let (s, v) = call(
        "POST",
        &url("/v1/sandboxes"),
        &[("Authorization", &bearer)],
        Some(r#"{"template":"nope"}"#),
    );
    assert_eq!((s, code(&v)), (404, "not_found"), "{v}");
    // A PATCH of the network policy needs a body: an empty one does not reset the policy.
    for body in [None, Some("null")] {
        let (s, v) = call(
            "PATCH",
            &url("/v1/sandboxes/sb-nope/network"),
            &[("Authorization", &bearer)],
            body,
        );
        assert_eq!((s, code(&v)), (400, "bad_request"), "{body:?}: {v}");
    }
    // Oversize body: 413. The daemon answers and closes as soon as the limit is passed while
    // the client is still writing; the reset that follows can discard an answer not yet read.
    // So a reader thread waits on the socket while the body is written, and a few tries.
    let host = d.fissiled.base().trim_start_matches("http://").to_owned();
    let oversize = || -> Option<(u16, Value)> {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(&host).ok()?;
        let mut reader = conn.try_clone().ok()?;
        reader
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ok()?;
        let read = std::thread::spawn(move || {
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = reader.read(&mut buf).ok()?;
                raw.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&raw).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })?;
                    if body.len() >= len {
                        let status = head.split(' ').nth(1)?.parse().ok()?;
                        return Some((status, serde_json::from_str(&body[..len]).ok()?));
                    }
                }
                if n == 0 {
                    return None;
                }
            }
        });
        let body = format!(r#"{{"metadata":{{"k":"{}"}}}}"#, "x".repeat(3 << 20));
        let head = format!(
            "POST /v1/sandboxes HTTP/1.1\r\nHost: {host}\r\nAuthorization: {bearer}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        if conn.write_all(head.as_bytes()).is_ok() {
            for chunk in body.as_bytes().chunks(64 << 10) {
                if conn.write_all(chunk).is_err() {
                    break;
                }
            }
        }
        read.join().ok()?
    };
    let (s, v) = (0..5)
        .find_map(|_| oversize())
        .expect("no answer to the oversize request in 5 tries");
    assert_eq!((s, code(&v)), (413, "too_large"), "{v}");

    // Unknown ids and routes: 404.
    for (m, p) in [
        ("GET", "/v1/sandboxes/sb-nope"),
        ("DELETE", "/v1/sandboxes/sb-nope"),
        ("GET", "/v2/whatever"),
    ] {
        let (s, v) = call(m, &url(p), &[("Authorization", &bearer)], None);
        assert_eq!((s, code(&v)), (404, "not_found"), "{m} {p}");
    }
    let (s, v) = call(
        "POST",
        &url("/v1/sandboxes/sb-nope/exec"),
        &[("Authorization", &bearer)],
        Some(r#"{"code":"1"}"#),
    );
    assert_eq!((s, code(&v)), (404, "not_found"));
    let (s, _) = call(
        "GET",
        &url("/v1/sandboxes?color=red"),
        &[("Authorization", &bearer)],
        None,
    );
    assert_eq!(s, 400);
}

#[test]
fn a_sandbox_whose_vmm_is_gone_at_start_is_lost_counted_and_deletable() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_fissiled"));
    let key = daemon::create_key(bin, &state, "acme").unwrap();
    {
        // What an earlier daemon left: a running sandbox whose VMM is gone.
        let db = fissiled::db::Db::open(&state.join("fissiled.redb")).unwrap();
        db.put_sandbox(&fissiled::db::SandboxRecord {
            state: fissiled::db::SandboxState::Running,
            ..fissiled::db::SandboxRecord::starting(
                "sb-0123456789abcdef".into(),
                "acme".into(),
                "python-datasci".into(),
                512,
                1,
            )
        })
        .unwrap();
    }
    let d = Fissiled::serve_without_guests(bin, &state, &[]).unwrap();
    let bearer = format!("Bearer {key}");
    let url = format!("{}/v1/sandboxes/sb-0123456789abcdef", d.base());
    let (s, v) = call("GET", &url, &[("Authorization", &bearer)], None);
    assert_eq!((s, v["state"].as_str()), (200, Some("lost")), "{v}");
    assert_eq!(d.metric("fissiled_sandboxes{state=\"lost\"}").unwrap(), "1");
    let (s, _) = call("DELETE", &url, &[("Authorization", &bearer)], None);
    assert_eq!(s, 204);
    assert_eq!(d.metric("fissiled_sandboxes{state=\"lost\"}").unwrap(), "0");
    let (s, _) = call("GET", &url, &[("Authorization", &bearer)], None);
    assert_eq!(s, 404);
}

#[test]
fn a_template_vmm_and_directory_an_earlier_run_left_are_swept_at_start() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_fissiled"));
    let _key = daemon::create_key(bin, &state, "acme").unwrap();
    // What a daemon killed mid-build leaves: the build's directory and its VMM (here a
    // shell that names itself fissile-vmm and carries the build's control socket).
    let left = state.join("templates").join("build-0123456789ab");
    std::fs::create_dir_all(&left).unwrap();
    std::fs::write(left.join("memory"), b"pages").unwrap();
    let socket = left.join("api.sock");
    // Each in a process group of its own, so its `sleep` goes too at the end.
    let mut vmm = std::process::Command::new("sh")
        .arg0("fissile-vmm")
        .args(["-c", "sleep 600; true", "fissile-vmm", "--api-sock"])
        .arg(&socket)
        .process_group(0)
        .spawn()
        .unwrap();
    // Another process with that socket path but not a VMM: left alone.
    let mut bystander = std::process::Command::new("sh")
        .args(["-c", "sleep 600; true", "sh"])
        .arg(&socket)
        .process_group(0)
        .spawn()
        .unwrap();
    let groups = [vmm.id(), bystander.id()];
    let d = Fissiled::serve_without_guests(bin, &state, &[]).unwrap();
    let mut tries = 0;
    while vmm.try_wait().unwrap().is_none() {
        tries += 1;
        assert!(tries < 200, "the left VMM still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!left.exists(), "the left directory is still there");
    assert!(bystander.try_wait().unwrap().is_none());
    for g in groups {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{g}")])
            .status();
    }
    bystander.wait().unwrap();
    drop(d);
}

/// The pid fissiled recorded for its snapshotd in `state`.
fn snapshotd_pid(state: &std::path::Path) -> u32 {
    std::fs::read_to_string(state.join("snapshotd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// snapshotd killed under a running daemon (as a crash or its seccomp filter would) is started
/// again on the same store and socket within seconds: a new pid in `snapshotd.pid`, the store
/// answering on its socket again, the restart counted in `/metrics`, the dead one reaped.
#[test]
fn a_killed_snapshotd_is_started_again_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_fissiled"));
    let d = Fissiled::serve_without_guests(bin, &state, &[]).unwrap();
    let pid_of = || snapshotd_pid(&state);
    let first = pid_of();
    assert_eq!(d.metric("fissiled_snapshotd_restarts").unwrap(), "0");
    assert_eq!(d.metric("fissiled_store_snapshots").unwrap(), "0");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &first.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while d.metric("fissiled_snapshotd_restarts").unwrap() != "1" {
        assert!(
            std::time::Instant::now() < deadline,
            "snapshotd was not started again within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let second = pid_of();
    assert_ne!(first, second);
    let cmdline = std::fs::read_to_string(format!("/proc/{second}/cmdline")).unwrap();
    assert!(cmdline.contains("fissile-snapshotd"), "{cmdline:?}");
    let sock = state.join("snapshotd").join("snapshotd.sock");
    assert!(
        cmdline.contains(&*sock.to_string_lossy()),
        "same socket: {cmdline:?}"
    );
    // The store answers through the same socket, alone in its directory (what jails bind).
    let in_dir: Vec<_> = std::fs::read_dir(sock.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(in_dir, vec![std::ffi::OsString::from("snapshotd.sock")]);
    fissile_snapshotd_client::client::Client::connect(&sock)
        .and_then(|mut c| c.ping())
        .unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{first}")).exists()
            || std::fs::read_to_string(format!("/proc/{first}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(true),
        "the killed one was reaped"
    );
}

/// A snapshotd an earlier run left that does not fit the jail (it runs as root, admits no VMM
/// group and listens in the state directory itself, as an older fissiled started it) is
/// replaced at start by a jailed one; a jailed one left by a daemon killed with -9 is
/// re-adopted as it is.
#[test]
fn an_unjailed_snapshotd_left_running_is_replaced_and_a_jailed_one_is_adopted() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let sock = state.join("snapshotd.sock");
    let sd_bin = fissile_sandbox::paths::find_binary("fissile-snapshotd").unwrap();
    let mut old = std::process::Command::new(sd_bin)
        .arg("serve")
        .arg("--root")
        .arg(state.join("store"))
        .arg("--socket")
        .arg(&sock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufReader::new(old.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.starts_with("READY"), "{ready:?}");
    std::fs::write(state.join("snapshotd.pid"), format!("{}\n", old.id())).unwrap();

    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_fissiled"));
    let env = [("FISSILE_JAIL", "on")];
    let mut d = Fissiled::serve_without_guests(bin, &state, &env).unwrap();
    let pid_of = || snapshotd_pid(&state);
    let jailed = pid_of();
    assert_ne!(jailed, old.id(), "the unjailed one was adopted");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while old.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the unjailed snapshotd still runs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        fissile_sandbox::jail::process_uid(jailed).unwrap(),
        fissile_sandbox::jail::DEFAULT_SNAPSHOTD_UID
    );
    let cmdline = std::fs::read(format!("/proc/{jailed}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("--listen-fd "), "{cmdline}");
    fissile_snapshotd_client::client::Client::connect(
        &state.join("snapshotd").join("snapshotd.sock"),
    )
    .and_then(|mut c| c.ping())
    .unwrap();

    d.kill_hard().unwrap();
    let d = Fissiled::serve_without_guests(bin, &state, &env).unwrap();
    assert_eq!(pid_of(), jailed, "the jailed one was not re-adopted");
    drop(d);
}

#[test]
fn an_admin_key_creates_lists_and_revokes_keys_that_count_at_once_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_fissiled"));
    let admin = daemon::create_admin_key(bin, &state, "ops").unwrap();
    let tenant_key = daemon::create_key(bin, &state, "acme").unwrap();
    let mut fissiled = Fissiled::serve_without_guests(bin, &state, &[]).unwrap();
    let base = fissiled.base().to_string();
    let keys = format!("{base}/v1/keys");
    let as_admin = [("Authorization", format!("Bearer {admin}"))];
    let as_admin: Vec<(&str, &str)> = as_admin.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let bearer = |k: &str| format!("Bearer {k}");

    // A tenant's key may not manage keys: 403, on every key route.
    let acme = bearer(&tenant_key);
    for (method, url, body) in [
        ("GET", keys.clone(), None),
        ("POST", keys.clone(), Some(r#"{"tenant":"acme"}"#)),
        ("DELETE", format!("{keys}/key_0000"), None),
    ] {
        let (status, v) = call(method, &url, &[("Authorization", &acme)], body);
        assert_eq!(
            (status, code(&v)),
            (403, "forbidden"),
            "{method} {url}: {v}"
        );
    }
    let (status, v) = call("GET", &keys, &[], None);
    assert_eq!((status, code(&v)), (401, "unauthorized"), "{v}");

    // Bad bodies: a clear 400 each, nothing created.
    for body in [
        r#"{"tenant":""}"#,
        r#"{"tenant":"a/b"}"#,
        r#"{"tenant":"acme","admin":"yes"}"#,
        r#"{"tenant":"acme","extra":1}"#,
        "",
        "{",
    ] {
        let (status, v) = call("POST", &keys, &as_admin, Some(body));
        assert_eq!((status, code(&v)), (400, "bad_request"), "{body}: {v}");
    }

    // Create: the key is shown once, works at once, and is listed by id only.
    let (status, created) = call("POST", &keys, &as_admin, Some(r#"{"tenant":"beta"}"#));
    assert_eq!(status, 201, "{created}");
    let new_key = created["key"].as_str().unwrap().to_string();
    let new_id = created["id"].as_str().unwrap().to_string();
    assert!(
        new_key.starts_with("fsk_") && new_id.starts_with("key_"),
        "{created}"
    );
    assert_eq!(
        (created["tenant"].as_str(), created["admin"].as_bool()),
        (Some("beta"), Some(false))
    );
    let beta = bearer(&new_key);
    let (status, v) = call(
        "GET",
        &format!("{base}/v1/sandboxes"),
        &[("Authorization", &beta)],
        None,
    );
    assert_eq!(status, 200, "the new key works at once: {v}");
    let (status, listed) = call("GET", &keys, &as_admin, None);
    assert_eq!(status, 200, "{listed}");
    let listed = listed.as_array().unwrap().clone();
    assert_eq!(listed.len(), 3, "ops, acme, beta: {listed:?}");
    assert!(
        listed
            .iter()
            .any(|k| k["id"] == new_id.as_str() && k["tenant"] == "beta")
    );
    let text = serde_json::to_string(&listed).unwrap();
    assert!(
        !text.contains(&new_key[4..]) && !text.contains(&admin[4..]),
        "a key is listed: {text}"
    );

    // A key given where its id belongs is not found and not echoed back.
    let (status, v) = call("DELETE", &format!("{keys}/{new_key}"), &as_admin, None);
    assert_eq!((status, code(&v)), (404, "not_found"), "{v}");
    assert!(
        !v.to_string().contains(&new_key[4..]),
        "the key echoed: {v}"
    );

    // Revoke: 401 for that key at once; the id is gone (a second revoke is 404).
    let (status, v) = call("DELETE", &format!("{keys}/{new_id}"), &as_admin, None);
    assert_eq!(status, 204, "{v}");
    let (status, v) = call(
        "GET",
        &format!("{base}/v1/sandboxes"),
        &[("Authorization", &beta)],
        None,
    );
    assert_eq!(
        (status, code(&v)),
        (401, "unauthorized"),
        "revoked at once: {v}"
    );
    let (status, v) = call("DELETE", &format!("{keys}/{new_id}"), &as_admin, None);
    assert_eq!((status, code(&v)), (404, "not_found"), "{v}");

    // An admin key made over the API manages keys too; what was done survives a restart.
    let (status, second) = call(
        "POST",
        &keys,
        &as_admin,
        Some(r#"{"tenant":"ops2","admin":true}"#),
    );
    assert_eq!(status, 201, "{second}");
    let second_admin = bearer(second["key"].as_str().unwrap());
    fissiled.kill_hard().unwrap();
    drop(fissiled);
    let fissiled = Fissiled::serve_without_guests(bin, &state, &[]).unwrap();
    let keys = format!("{}/v1/keys", fissiled.base());
    let sandboxes = format!("{}/v1/sandboxes", fissiled.base());
    let (status, v) = call("GET", &sandboxes, &[("Authorization", &beta)], None);
    assert_eq!(status, 401, "still revoked after a restart: {v}");
    let (status, listed) = call("GET", &keys, &[("Authorization", &second_admin)], None);
    assert_eq!(
        status, 200,
        "the API-made admin key after a restart: {listed}"
    );
    let tenants: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["tenant"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        tenants,
        ["ops", "acme", "ops2"],
        "oldest first, beta revoked"
    );
}

/// Runs the `fissile` CLI against `base` with `key` as `FISSILE_API_KEY`: (exit code,
/// stdout, stderr).
fn fissile_cli(base: &str, key: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let bin = fissile_sandbox::paths::find_binary("fissile").unwrap();
    let out = std::process::Command::new(bin)
        .args(args)
        .env("FISSILE_API_URL", base)
        .env("FISSILE_API_KEY", key)
        .output()
        .unwrap();
    let run = (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("$ fissile {} -> {run:?}", args.join(" "));
    run
}

#[test]
fn the_cli_creates_lists_and_revokes_keys_over_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_fissiled"));
    let admin = daemon::create_admin_key(bin, &state, "ops").unwrap();
    let tenant_key = daemon::create_key(bin, &state, "acme").unwrap();
    let fissiled = Fissiled::serve_without_guests(bin, &state, &[]).unwrap();
    let base = fissiled.base();

    let (code, key, _) = fissile_cli(base, &admin, &["keys", "create", "--tenant", "beta"]);
    assert_eq!(code, Some(0));
    let key = key.trim().to_string();
    assert!(key.starts_with("fsk_"), "{key}");
    let (status, _) = call(
        "GET",
        &format!("{base}/v1/sandboxes"),
        &[("X-API-Key", &key)],
        None,
    );
    assert_eq!(status, 200, "the key the CLI printed works");

    let (code, table, _) = fissile_cli(base, &admin, &["keys", "ls"]);
    assert_eq!(code, Some(0));
    let beta_id = table
        .lines()
        .find(|l| l.contains(" beta "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("beta not listed:\n{table}"))
        .to_string();
    assert!(
        beta_id.starts_with("key_") && !table.contains(&key[4..]),
        "{table}"
    );

    let (code, _, err) = fissile_cli(base, &admin, &["keys", "revoke", &key]);
    assert_ne!(code, Some(0), "a key itself is refused as an id");
    assert!(err.contains("not the key itself"), "{err}");
    let (code, _, err) = fissile_cli(base, &tenant_key, &["keys", "ls"]);
    assert_ne!(code, Some(0), "a tenant's key cannot list keys");
    assert!(err.contains("admin key"), "{err}");
    let (code, out, _) = fissile_cli(base, &admin, &["keys", "revoke", &beta_id]);
    assert_eq!((code, out.trim()), (Some(0), beta_id.as_str()));
    let (status, _) = call(
        "GET",
        &format!("{base}/v1/sandboxes"),
        &[("X-API-Key", &key)],
        None,
    );
    assert_eq!(status, 401, "revoked through the CLI");
}

/// The NDJSON lines of a streamed answer, parsed.
fn ndjson_lines(url: &str, key: &str, body: &str) -> (u16, Vec<Value>) {
    let resp = ureq::post(url)
        .timeout(Duration::from_secs(120))
        .set("Authorization", &format!("Bearer {key}"))
        .set("Content-Type", "application/json")
        .send_string(body);
    let resp = match resp {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {url}: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap();
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    (status, lines)
}

#[test]
fn template_specs_are_checked_and_a_failed_build_leaves_nothing() {
    let (d, key) = start();
    let url = |p: &str| format!("{}{p}", d.fissiled.base());
    let auth = [("Authorization", format!("Bearer {key}"))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // The daemon's own template is listed, derived from nothing.
    let (s, v) = call("GET", &url("/v1/templates"), &auth, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v[0]["name"], "python-datasci");
    assert_eq!(v[0]["base"], Value::Null);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");

    // Bad specs: 400 naming the field, before anything starts.
    for (spec, field) in [
        ("name = [", "malformed TOML"),
        ("name = 'Bad Name'", "`name`"),
        ("name = 'x'\nbase = 'ubuntu'", "`base`"),
        ("name = 'x'\n[debian]\nsuite = 'trixie'", "`debian`"),
        (
            "name = 'x'\n[pip]\npackages = ['--index-url=http://x']",
            "`pip.packages[0]`",
        ),
        (
            "name = 'x'\n[[files]]\ndest = '/etc/../x'\ncontent = ''",
            "`files[0].dest`",
        ),
        ("name = 'x'\n[[run]]\ncommand = ''", "`run[0].command`"),
    ] {
        let body = serde_json::json!({ "spec": spec }).to_string();
        let (s, v) = call("POST", &url("/v1/templates"), &auth, Some(&body));
        assert_eq!((s, code(&v)), (400, "bad_request"), "{spec}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "{spec}: {msg}");
    }
    for bad in [
        r#"{"spec": 1}"#,
        r#"{"spec": "name = 'x'", "extra": 1}"#,
        "{}",
    ] {
        let (s, v) = call("POST", &url("/v1/templates"), &auth, Some(bad));
        assert_eq!((s, code(&v)), (400, "bad_request"), "{bad}: {v}");
    }
    // The daemon's own name is taken; it cannot be deleted; unknown names are 404.
    let own = serde_json::json!({ "spec": "name = 'python-datasci'" }).to_string();
    let (s, v) = call("POST", &url("/v1/templates"), &auth, Some(&own));
    assert_eq!((s, code(&v)), (409, "conflict"), "{v}");
    let (s, v) = call("DELETE", &url("/v1/templates/python-datasci"), &auth, None);
    assert_eq!((s, code(&v)), (409, "conflict"), "{v}");
    let (s, v) = call("DELETE", &url("/v1/templates/nope"), &auth, None);
    assert_eq!((s, code(&v)), (404, "not_found"), "{v}");

    // A valid spec starts a build, which streams its steps and fails here (this daemon has
    // no kernel): the stream says why, last, and nothing is kept, so the name is free again.
    let spec = "name = 'with-data'\n[[files]]\ndest = '/opt/a.txt'\ncontent = 'a'\n";
    let body = serde_json::json!({ "spec": spec }).to_string();
    for _ in 0..2 {
        let (s, lines) = ndjson_lines(&url("/v1/templates"), &key, &body);
        assert_eq!(s, 200, "{lines:?}");
        let last = lines.last().unwrap();
        assert_eq!(last["type"], "failed", "{lines:?}");
        assert!(
            last["message"]
                .as_str()
                .unwrap()
                .contains("starting the base template"),
            "{last}"
        );
        assert!(
            lines.iter().any(|l| l["type"] == "step"
                && l["step"].as_str().unwrap().starts_with("512x1: booting")),
            "{lines:?}"
        );
        let (_, v) = call("GET", &url("/v1/templates"), &auth, None);
        assert_eq!(
            v.as_array().unwrap().len(),
            1,
            "kept after a failed build: {v}"
        );
        let (s, v) = call(
            "POST",
            &url("/v1/sandboxes"),
            &auth,
            Some(r#"{"template":"with-data"}"#),
        );
        assert_eq!((s, code(&v)), (404, "not_found"), "{v}");
    }
}
