//! fissiled's HTTP API against real sandboxes: the daemon binary, real microVMs, real HTTP
//! (a client in this test process, on loopback next to the daemon).
//!
//! The `guest_` tests are ignored by a plain `cargo test`: `api_suite_boots_real_guests`
//! runs them (in one lab boot on a KVM-PVM host, as a child process where KVM is usable) and
//! checks that every one ran and passed (see `fissile_tests::guest`).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use fissile_tests::daemon::{self, Fissiled};
use fissile_tests::guest::{guest_env, run_guest_suite};
use serde_json::{Value, json};

#[test]
fn api_suite_boots_real_guests() {
    run_guest_suite("guest_", Duration::from_secs(1800));
}

fn bin() -> std::path::PathBuf {
    fissile_sandbox::paths::find_binary("fissiled").unwrap()
}

fn create_key(state: &Path, tenant: &str) -> String {
    daemon::create_key(&bin(), state, tenant).unwrap()
}

/// A running daemon, stopped on drop.
type Daemon = Fissiled;

/// A daemon on `state` with `extra` flags; without ready snapshots unless `extra` asks for
/// a `--ready-shape` (each test then boots only the guests it makes).
fn start(state: &Path, extra: &[&str]) -> Daemon {
    let env = guest_env();
    let mut args: Vec<std::ffi::OsString> = vec!["--kernel".into(), env.kernel.clone().into()];
    args.extend(["--rootfs".into(), env.rootfs.clone().into()]);
    args.extend(extra.iter().map(Into::into));
    if !extra.contains(&"--ready-shape") {
        args.push("--no-ready-snapshots".into());
    }
    Fissiled::serve(&bin(), state, args).unwrap()
}

/// Status and JSON body of a request (`key` as a bearer token).
fn call(method: &str, url: &str, key: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(600));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let resp = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    assert!(resp.header("x-request-id").is_some(), "no x-request-id");
    let text = resp.into_string().unwrap();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, v)
}

/// The NDJSON events of an exec, in order.
fn exec(d: &Daemon, key: &str, id: &str, body: Value) -> Vec<Value> {
    let resp = ureq::post(&format!("{}/v1/sandboxes/{id}/exec", d.base()))
        .timeout(Duration::from_secs(600))
        .set("Authorization", &format!("Bearer {key}"))
        .send_json(body)
        .unwrap();
    assert_eq!(resp.content_type(), "application/x-ndjson");
    BufReader::new(resp.into_reader())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect()
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {v}"))
}

#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_api_sandbox_exec_streams_and_tenants_are_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let a = create_key(&state, "acme");
    let b = create_key(&state, "other");
    let d = start(&state, &["--max-sandboxes-per-tenant", "1"]);
    let url = |p: &str| format!("{}{p}", d.base());

    let (s, v) = call("GET", &url("/healthz"), None, None);
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, v) = call("POST", &url("/v1/sandboxes"), None, Some("{}"));
    assert_eq!((s, error_code(&v)), (401, "unauthorized"));
    let (s, v) = call("POST", &url("/v1/sandboxes"), Some("fsk_wrong"), Some("{}"));
    assert_eq!((s, error_code(&v)), (401, "unauthorized"));
    // Bad input: each a clear 4xx in the one error shape.
    for bad in [
        "{not json",
        r#"{"memory_mib":"lots"}"#,
        r#"{"surprise":1}"#,
        r#"{"memory_mib":1}"#,
    ] {
        let (s, v) = call("POST", &url("/v1/sandboxes"), Some(&a), Some(bad));
        assert_eq!((s, error_code(&v)), (400, "bad_request"), "{bad}: {v}");
    }

    let (s, sb) = call(
        "POST",
        &url("/v1/sandboxes"),
        Some(&a),
        Some(r#"{"memory_mib":512,"metadata":{"job":"t1"}}"#),
    );
    assert_eq!(s, 201, "{sb}");
    let id = sb["id"].as_str().unwrap().to_string();
    assert_eq!(sb["state"], "running");
    assert_eq!(sb["template"], "python-datasci");
    // The tenant's quota (one sandbox) is reached.
    let (s, v) = call("POST", &url("/v1/sandboxes"), Some(&a), Some("{}"));
    assert_eq!((s, error_code(&v)), (429, "quota_exceeded"), "{v}");

    // Streaming order: stdout and stderr as they happen, the value, then done last.
    let events = exec(
        &d,
        &a,
        &id,
        json!({"code": "import sys\nprint('one')\nprint('two', file=sys.stderr)\nprint('three')\n6*7"}),
    );
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.last(), Some(&"done"), "{events:?}");
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "one\nthree\n");
    let main: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "result" && e["is_main_result"] == true)
        .collect();
    assert_eq!(main.len(), 1);
    assert_eq!(main[0]["data"]["text/plain"], "42");
    let first_stderr = kinds.iter().position(|k| *k == "stderr").unwrap();
    let result = kinds.iter().position(|k| *k == "result").unwrap();
    assert!(first_stderr < result, "{kinds:?}");
    let done = events.last().unwrap();
    assert!(done["execution_count"].as_u64().unwrap() >= 1);
    assert!(done["server_ms"].as_f64().unwrap() >= done["duration_ms"].as_f64().unwrap());

    // State persists; a code error is an event; a timeout keeps state.
    exec(&d, &a, &id, json!({"code": "x = 5"}));
    let events = exec(&d, &a, &id, json!({"code": "1/0"}));
    let err = events.iter().find(|e| e["type"] == "error").unwrap();
    assert_eq!(err["name"], "ZeroDivisionError");
    assert_eq!(events.last().unwrap()["type"], "done");
    let events = exec(
        &d,
        &a,
        &id,
        json!({"code": "import time\ntime.sleep(60)", "timeout_s": 1}),
    );
    assert_eq!(events.last().unwrap()["timed_out"], true, "{events:?}");
    let events = exec(&d, &a, &id, json!({"code": "x * 2"}));
    let value = events.iter().find(|e| e["type"] == "result").unwrap();
    assert_eq!(value["data"]["text/plain"], "10");

    // Lists and filters.
    let (s, list) = call("GET", &url("/v1/sandboxes?metadata.job=t1"), Some(&a), None);
    assert_eq!((s, list.as_array().unwrap().len()), (200, 1));
    let (_, list) = call("GET", &url("/v1/sandboxes?metadata.job=t2"), Some(&a), None);
    assert!(list.as_array().unwrap().is_empty());

    // Another tenant sees none of it: 404, never 403.
    let (s, v) = call("GET", &url(&format!("/v1/sandboxes/{id}")), Some(&b), None);
    assert_eq!((s, error_code(&v)), (404, "not_found"));
    let (s, _) = call(
        "POST",
        &url(&format!("/v1/sandboxes/{id}/exec")),
        Some(&b),
        Some(r#"{"code":"1"}"#),
    );
    assert_eq!(s, 404);
    let (s, _) = call(
        "DELETE",
        &url(&format!("/v1/sandboxes/{id}")),
        Some(&b),
        None,
    );
    assert_eq!(s, 404);
    let (_, list) = call("GET", &url("/v1/sandboxes"), Some(&b), None);
    assert!(list.as_array().unwrap().is_empty());

    let (s, _) = call(
        "DELETE",
        &url(&format!("/v1/sandboxes/{id}")),
        Some(&a),
        None,
    );
    assert_eq!(s, 204);
    let (s, _) = call("GET", &url(&format!("/v1/sandboxes/{id}")), Some(&a), None);
    assert_eq!(s, 404);
}

fn key_header(key: &str) -> String {
    format!("Bearer {key}")
}

/// Status and body bytes of a request with a raw body.
fn raw(method: &str, url: &str, key: &str, body: Option<&[u8]>) -> (u16, Vec<u8>) {
    let req = ureq::request(method, url)
        .timeout(Duration::from_secs(600))
        .set("Authorization", &key_header(key));
    let resp = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut out).unwrap();
    (status, out)
}

/// The NDJSON events of a command.
fn command(d: &Daemon, key: &str, id: &str, body: Value) -> Vec<Value> {
    let resp = ureq::post(&format!("{}/v1/sandboxes/{id}/commands", d.base()))
        .timeout(Duration::from_secs(600))
        .set("Authorization", &key_header(key))
        .send_json(body)
        .unwrap();
    assert_eq!(resp.content_type(), "application/x-ndjson");
    BufReader::new(resp.into_reader())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect()
}

/// The `text/plain` value of `code`'s last expression.
fn value(d: &Daemon, key: &str, id: &str, code: &str) -> String {
    let events = exec(d, key, id, json!({ "code": code }));
    events
        .iter()
        .find(|e| e["type"] == "result" && e["is_main_result"] == true)
        .unwrap_or_else(|| panic!("{code}: no value in {events:?}"))["data"]["text/plain"]
        .as_str()
        .unwrap()
        .to_string()
}

fn create(d: &Daemon, key: &str, body: &str) -> Value {
    let (s, v) = call(
        "POST",
        &format!("{}/v1/sandboxes", d.base()),
        Some(key),
        Some(body),
    );
    assert_eq!(s, 201, "{v}");
    v
}

#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_api_files_commands_and_interrupt() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let a = create_key(&state, "acme");
    let d = start(&state, &["--max-file-bytes", "4000000"]);
    let id = create(&d, &a, "{}")["id"].as_str().unwrap().to_string();
    let files = |q: &str| format!("{}/v1/sandboxes/{id}/files?{q}", d.base());

    // Binary-safe round trip, larger than one transfer piece.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let (s, body) = raw("PUT", &files("path=/tmp/up/data.bin"), &a, Some(&data));
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["size"], 3_000_000);
    let (s, back) = raw("GET", &files("path=/tmp/up/data.bin"), &a, None);
    assert_eq!(s, 200);
    assert!(back == data, "the download differs from the upload");
    assert_eq!(
        value(
            &d,
            &a,
            &id,
            "import hashlib; hashlib.sha256(open('/tmp/up/data.bin','rb').read()).hexdigest()"
        ),
        format!("'{}'", sha256_hex(&data))
    );
    let (s, list) = call(
        "GET",
        &format!("{}/v1/sandboxes/{id}/files/list?path=/tmp/up", d.base()),
        Some(&a),
        None,
    );
    assert_eq!(s, 200, "{list}");
    let names: Vec<&str> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["data.bin"], "no temporary file is left: {list}");

    // Oversize: 413 as soon as the length is declared (before any byte of the body is
    // sent), and the old file is untouched.
    let status = declared_upload(
        &d,
        &a,
        &format!("/v1/sandboxes/{id}/files?path=/tmp/up/data.bin"),
        4_000_001,
    );
    assert_eq!(status, 413);
    let (_, back) = raw("GET", &files("path=/tmp/up/data.bin"), &a, None);
    assert!(back == data, "an oversize upload changed the file");

    // Bad paths and missing files.
    for q in [
        "path=relative.txt",
        "path=/tmp/../etc/passwd",
        "path=/tmp/a%00b",
        "nopath=1",
    ] {
        let (s, body) = raw("GET", &files(q), &a, None);
        assert_eq!(s, 400, "{q}: {}", String::from_utf8_lossy(&body));
    }
    let (s, _) = raw("GET", &files("path=/tmp/missing"), &a, None);
    assert_eq!(s, 404);
    let (s, _) = raw("DELETE", &files("path=/tmp/up/data.bin"), &a, None);
    assert_eq!(s, 204);
    let (s, _) = raw("GET", &files("path=/tmp/up/data.bin"), &a, None);
    assert_eq!(s, 404);

    // Commands: streamed output and the exit code; argv, stdin, env, cwd; a time limit.
    let events = command(
        &d,
        &a,
        &id,
        json!({"cmd": "echo out; echo err >&2; exit 3"}),
    );
    let out: String = events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(out, "out\n");
    assert!(events.iter().any(|e| e["type"] == "stderr"));
    let exit = events.last().unwrap();
    assert_eq!(
        (exit["type"].as_str(), exit["exit_code"].as_i64()),
        (Some("exit"), Some(3))
    );
    let events = command(
        &d,
        &a,
        &id,
        json!({"cmd": ["sh", "-c", "cat; echo \"$GREETING\"; pwd"], "stdin": "in\n",
               "env": {"GREETING": "hi"}, "cwd": "/tmp"}),
    );
    let out: String = events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(out, "in\nhi\n/tmp\n");
    let events = command(&d, &a, &id, json!({"cmd": "sleep 60", "timeout_s": 1}));
    assert_eq!(events.last().unwrap()["timed_out"], true, "{events:?}");
    let (s, _) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/commands", d.base()),
        Some(&a),
        Some(r#"{"cmd": []}"#),
    );
    assert_eq!(s, 400);

    // Interrupt a running cell (once it has visibly started): it gets a KeyboardInterrupt,
    // the REPL keeps its state.
    exec(&d, &a, &id, json!({"code": "kept = 7"}));
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let runner = {
        let base = d.base().to_string();
        let (a, id) = (a.clone(), id.clone());
        std::thread::spawn(move || {
            let resp = ureq::post(&format!("{base}/v1/sandboxes/{id}/exec"))
                .timeout(Duration::from_secs(600))
                .set("Authorization", &key_header(&a))
                .send_json(
                    json!({"code": "import time\nprint('started', flush=True)\ntime.sleep(600)"}),
                )
                .unwrap();
            for line in BufReader::new(resp.into_reader()).lines() {
                let _ = tx.send(serde_json::from_str::<Value>(&line.unwrap()).unwrap());
            }
        })
    };
    let first = rx.recv_timeout(Duration::from_secs(600)).unwrap();
    assert_eq!(first["type"], "stdout", "{first}");
    let (s, v) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/interrupt", d.base()),
        Some(&a),
        None,
    );
    assert_eq!((s, v["was_running"].as_bool()), (200, Some(true)), "{v}");
    let events: Vec<Value> = rx.iter().collect();
    runner.join().unwrap();
    let err = events.iter().find(|e| e["type"] == "error").unwrap();
    assert_eq!(err["name"], "KeyboardInterrupt", "{events:?}");
    assert_eq!(value(&d, &a, &id, "kept"), "7");
}

/// Status of a `PUT` that declares a body of `len` bytes and sends none of it (so a server
/// that refuses by the length answers before the client writes).
fn declared_upload(d: &Daemon, key: &str, path: &str, len: u64) -> u16 {
    use std::io::{Read, Write};
    let addr = d.base().trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: {len}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    let line = String::from_utf8_lossy(&head).into_owned();
    line.trim_start_matches("HTTP/1.1 ").trim().parse().unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_api_fork_merge_snapshot_and_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let a = create_key(&state, "acme");
    let b = create_key(&state, "other");
    let d = start(&state, &["--max-fork", "4"]);
    let url = |p: &str| format!("{}{p}", d.base());
    let parent = create(&d, &a, r#"{"metadata":{"role":"parent"}}"#)["id"]
        .as_str()
        .unwrap()
        .to_string();
    exec(&d, &a, &parent, json!({"code": "x = 1"}));

    // Bad fan-outs: each a clear 400; above this daemon's --max-fork (4), a quota: 429.
    for n in ["0", "65", "1000000", "-1", "\"3\""] {
        let (s, v) = call(
            "POST",
            &url(&format!("/v1/sandboxes/{parent}/fork")),
            Some(&a),
            Some(&format!("{{\"n\":{n}}}")),
        );
        assert_eq!((s, error_code(&v)), (400, "bad_request"), "n={n}: {v}");
    }
    let (s, v) = call(
        "POST",
        &url(&format!("/v1/sandboxes/{parent}/fork")),
        Some(&a),
        Some(r#"{"n":5}"#),
    );
    assert_eq!((s, error_code(&v)), (429, "quota_exceeded"), "n=5: {v}");

    let (s, v) = call(
        "POST",
        &url(&format!("/v1/sandboxes/{parent}/fork")),
        Some(&a),
        Some(r#"{"n":3}"#),
    );
    assert_eq!(s, 200, "{v}");
    let children: Vec<String> = v["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{c}"))
                .to_string()
        })
        .collect();
    assert_eq!(children.len(), 3);
    for (i, c) in children.iter().enumerate() {
        assert_eq!(
            value(&d, &a, c, "x"),
            "1",
            "child {c} has the parent's state"
        );
        exec(&d, &a, c, json!({"code": format!("x = {}", 10 + i)}));
    }
    assert_eq!(
        value(&d, &a, &parent, "x"),
        "1",
        "the parent kept running as it was"
    );
    // Every exec so far ran on a connection the sandbox handed over when it started or
    // forked (the one its guest was woken on) or that an earlier exec gave back.
    assert_eq!(
        d.metric("fissiled_agent_connections_opened_total").unwrap(),
        "0"
    );

    // Refusals: self 400; a stranger 404; another tenant 404.
    let (s, v) = call(
        "POST",
        &url(&format!("/v1/sandboxes/{parent}/merge_into/{parent}")),
        Some(&a),
        None,
    );
    assert_eq!((s, error_code(&v)), (400, "bad_request"), "{v}");
    let (s, _) = call(
        "POST",
        &url(&format!(
            "/v1/sandboxes/{}/merge_into/{parent}",
            children[0]
        )),
        Some(&a),
        None,
    );
    assert_eq!(s, 404, "a parent is not a child of its child's fork");
    let (s, _) = call(
        "POST",
        &url(&format!(
            "/v1/sandboxes/{parent}/merge_into/{}",
            children[1]
        )),
        Some(&b),
        None,
    );
    assert_eq!(s, 404);

    let (s, v) = call(
        "POST",
        &url(&format!(
            "/v1/sandboxes/{parent}/merge_into/{}",
            children[1]
        )),
        Some(&a),
        None,
    );
    assert_eq!(s, 204, "{v}");
    assert_eq!(
        value(&d, &a, &parent, "x"),
        "11",
        "the parent holds the winner's state"
    );
    assert_eq!(
        value(&d, &a, &children[1], "x"),
        "11",
        "the winner keeps running"
    );
    let (s, _) = call(
        "POST",
        &url(&format!(
            "/v1/sandboxes/{parent}/merge_into/{}",
            children[2]
        )),
        Some(&a),
        None,
    );
    assert_eq!(s, 404, "a repeated merge of the same fork");

    // Checkpoint and rollback.
    let (s, snap) = call(
        "POST",
        &url(&format!("/v1/sandboxes/{parent}/snapshot")),
        Some(&a),
        None,
    );
    assert_eq!(s, 201, "{snap}");
    let snap = snap["snapshot_id"].as_str().unwrap().to_string();
    exec(&d, &a, &parent, json!({"code": "x = 99; y = 'later'"}));
    let (s, v) = call(
        "POST",
        &url(&format!("/v1/sandboxes/{parent}/rollback/{snap}")),
        Some(&a),
        None,
    );
    assert_eq!(s, 204, "{v}");
    assert_eq!(value(&d, &a, &parent, "x"), "11");
    assert_eq!(value(&d, &a, &parent, "'y' in globals()"), "False");
    // Another sandbox's snapshot, and another tenant: 404.
    let (s, _) = call(
        "POST",
        &url(&format!("/v1/sandboxes/{}/rollback/{snap}", children[0])),
        Some(&a),
        None,
    );
    assert_eq!(s, 404);
    let (s, _) = call(
        "POST",
        &url(&format!("/v1/sandboxes/{parent}/rollback/{snap}")),
        Some(&b),
        None,
    );
    assert_eq!(s, 404);

    // A new sandbox from the snapshot; another tenant cannot use it.
    for c in &children {
        let (s, _) = call(
            "DELETE",
            &url(&format!("/v1/sandboxes/{c}")),
            Some(&a),
            None,
        );
        assert_eq!(s, 204);
    }
    let (s, _) = call(
        "POST",
        &url("/v1/sandboxes"),
        Some(&b),
        Some(&format!(r#"{{"from_snapshot":"{snap}"}}"#)),
    );
    assert_eq!(s, 404);
    let copy = create(&d, &a, &format!(r#"{{"from_snapshot":"{snap}"}}"#))["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(value(&d, &a, &copy, "x"), "11");
}

#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_api_spaces_persist_and_survive_a_killed_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let a = create_key(&state, "acme");
    let b = create_key(&state, "other");
    let mut d = start(&state, &[]);
    let sb = create(&d, &a, r#"{"persistent":true,"env":{"STAGE":"one"}}"#);
    let id = sb["id"].as_str().unwrap().to_string();
    let space = sb["space_id"].as_str().unwrap().to_string();
    exec(
        &d,
        &a,
        &id,
        json!({"code": "import os\ntotal = 40 + 2\nstage = os.environ['STAGE']"}),
    );

    // kill -9 of the daemon: the restarted daemon re-adopts the running sandbox.
    d.kill_hard().unwrap();
    d = start(&state, &[]);
    let (s, v) = call(
        "GET",
        &format!("{}/v1/sandboxes/{id}", d.base()),
        Some(&a),
        None,
    );
    assert_eq!((s, v["state"].as_str()), (200, Some("running")), "{v}");
    assert_eq!(value(&d, &a, &id, "total"), "42");

    // Closing a persistent sandbox persists its space.
    let (s, _) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", d.base()),
        Some(&a),
        None,
    );
    assert_eq!(s, 204);
    let (s, v) = call(
        "GET",
        &format!("{}/v1/spaces/{space}", d.base()),
        Some(&a),
        None,
    );
    assert_eq!((s, v["state"].as_str()), (200, Some("persisted")), "{v}");
    let (s, _) = call(
        "GET",
        &format!("{}/v1/spaces/{space}", d.base()),
        Some(&b),
        None,
    );
    assert_eq!(s, 404);
    let (s, _) = call(
        "POST",
        &format!("{}/v1/spaces/{space}/resume", d.base()),
        Some(&b),
        None,
    );
    assert_eq!(s, 404);

    // A daemon restart (graceful), then resume: same globals, same environment.
    drop(d);
    let d = start(&state, &[]);
    let (s, sb) = call(
        "POST",
        &format!("{}/v1/spaces/{space}/resume", d.base()),
        Some(&a),
        None,
    );
    assert_eq!(s, 201, "{sb}");
    let resumed = sb["id"].as_str().unwrap().to_string();
    assert_eq!(sb["space_id"].as_str(), Some(space.as_str()));
    assert_eq!(value(&d, &a, &resumed, "total, stage"), "(42, 'one')");
    // Resuming a running space answers its sandbox.
    let (s, again) = call(
        "POST",
        &format!("{}/v1/spaces/{space}/resume", d.base()),
        Some(&a),
        None,
    );
    assert_eq!((s, again["id"].as_str()), (200, Some(resumed.as_str())));
    exec(&d, &a, &resumed, json!({"code": "total += 1"}));

    // A graceful shutdown persists the running space.
    drop(d);
    let d = start(&state, &[]);
    let (_, sb) = call(
        "POST",
        &format!("{}/v1/spaces/{space}/resume", d.base()),
        Some(&a),
        None,
    );
    let resumed = sb["id"].as_str().unwrap().to_string();
    assert_eq!(value(&d, &a, &resumed, "total"), "43");

    // An idle timeout persists it too.
    let (s, v) = call(
        "POST",
        &format!("{}/v1/sandboxes", d.base()),
        Some(&a),
        Some(r#"{"persistent":true,"idle_timeout_s":6}"#),
    );
    assert_eq!(s, 201, "{v}");
    let idle = v["id"].as_str().unwrap().to_string();
    let idle_space = v["space_id"].as_str().unwrap().to_string();
    exec(&d, &a, &idle, json!({"code": "mark = 'idle'"}));
    let mut persisted = false;
    for _ in 0..600 {
        let (_, v) = call(
            "GET",
            &format!("{}/v1/spaces/{idle_space}", d.base()),
            Some(&a),
            None,
        );
        if v["state"] == "persisted" {
            persisted = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(persisted, "the idle sandbox was not persisted");
    let (s, _) = call(
        "GET",
        &format!("{}/v1/sandboxes/{idle}", d.base()),
        Some(&a),
        None,
    );
    assert_eq!(s, 404);

    // Spaces are listed per tenant and deleted.
    let (_, list) = call("GET", &format!("{}/v1/spaces", d.base()), Some(&a), None);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let (_, list) = call("GET", &format!("{}/v1/spaces", d.base()), Some(&b), None);
    assert!(list.as_array().unwrap().is_empty());
    let (s, _) = call(
        "DELETE",
        &format!("{}/v1/spaces/{space}", d.base()),
        Some(&a),
        None,
    );
    assert_eq!(s, 204);
    let (s, _) = call(
        "GET",
        &format!("{}/v1/sandboxes/{resumed}", d.base()),
        Some(&a),
        None,
    );
    assert_eq!(s, 404, "deleting a space stops its sandbox");
    let (s, _) = call(
        "POST",
        &format!("{}/v1/spaces/{space}/resume", d.base()),
        Some(&a),
        None,
    );
    assert_eq!(s, 404);
}

/// The python-datasci template's ready snapshots of one shape, as `GET /v1/templates` says.
fn ready_status(d: &Daemon, key: &str, memory_mib: u64) -> Value {
    let (s, v) = call(
        "GET",
        &format!("{}/v1/templates", d.base()),
        Some(key),
        None,
    );
    assert_eq!(s, 200, "{v}");
    let t = v
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "python-datasci")
        .unwrap_or_else(|| panic!("no python-datasci in {v}"));
    t["ready"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["memory_mib"] == memory_mib)
        .unwrap_or_else(|| panic!("no {memory_mib} MiB shape in {t}"))["snapshot"]
        .clone()
}

/// A template's ready snapshot: made once at daemon start (boot + warm-up), then creates of
/// that shape restore it with numpy/pandas/matplotlib already imported and nothing of the
/// warm-up in the REPL's globals; other shapes boot; a restarted daemon reuses the snapshot.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_api_templates_ready_snapshot_skips_the_imports() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let key = create_key(&state, "acme");
    let imported =
        "import sys\nall(m in sys.modules for m in ('numpy', 'pandas', 'matplotlib.pyplot'))";
    let first_build_ms;
    {
        let d = start(&state, &["--ready-shape", "512x1"]);
        let deadline = Instant::now() + Duration::from_secs(1200);
        let ready = loop {
            let st = ready_status(&d, &key, 512);
            match st["status"].as_str() {
                Some("ready") => break st,
                Some("failed") => panic!("making the ready snapshot failed: {st}"),
                _ => {
                    assert!(Instant::now() < deadline, "not ready in time: {st}");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        };
        first_build_ms = ready["build_ms"].as_u64().unwrap();
        eprintln!("ready snapshot made in {first_build_ms} ms");

        let t = Instant::now();
        let a = create(&d, &key, "{}");
        let a_id = a["id"].as_str().unwrap();
        assert_eq!(value(&d, &key, a_id, imported), "True");
        eprintln!(
            "create + first exec from the ready snapshot: {} ms",
            t.elapsed().as_millis()
        );
        assert_eq!(
            value(
                &d,
                &key,
                a_id,
                "[n for n in globals() if n.startswith('_fissile')]"
            ),
            "[]"
        );
        // Two sandboxes from one snapshot do not share their entropy.
        let b = create(&d, &key, "{}");
        let b_id = b["id"].as_str().unwrap();
        let rand = "import os\nos.urandom(16).hex()";
        assert_ne!(value(&d, &key, a_id, rand), value(&d, &key, b_id, rand));
        // Not a ready shape: a boot, nothing imported.
        let c = create(&d, &key, r#"{"memory_mib": 640}"#);
        let c_id = c["id"].as_str().unwrap();
        assert_eq!(value(&d, &key, c_id, imported), "False");
        let shape = ready_status(&d, &key, 512);
        assert_eq!(shape["status"], "ready");
    }
    // A restarted daemon finds the snapshot in its store: no second build.
    let other = create_key(&state, "other");
    let d = start(&state, &["--ready-shape", "512x1"]);
    let st = ready_status(&d, &key, 512);
    assert_eq!(st["status"], "ready", "{st}");
    assert_eq!(st["build_ms"].as_u64(), Some(first_build_ms));
    let e = create(&d, &key, "{}");
    assert_eq!(value(&d, &key, e["id"].as_str().unwrap(), imported), "True");

    built_templates(&d, &key, &other);
}

/// The NDJSON events of a template build, in order.
fn build(d: &Daemon, key: &str, body: Value) -> Vec<Value> {
    let resp = ureq::post(&format!("{}/v1/templates", d.base()))
        .timeout(Duration::from_secs(1200))
        .set("Authorization", &key_header(key))
        .send_json(body)
        .unwrap();
    assert_eq!(resp.content_type(), "application/x-ndjson");
    BufReader::new(resp.into_reader())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect()
}

/// Names of the templates `key`'s tenant sees.
fn template_names(d: &Daemon, key: &str) -> Vec<String> {
    let (s, v) = call(
        "GET",
        &format!("{}/v1/templates", d.base()),
        Some(key),
        None,
    );
    assert_eq!(s, 200, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

/// A template built over the API from a spec (files, env, a command, a warm-up) on the
/// daemon's ready snapshot: its progress streams, its sandboxes start with the files, the
/// environment and the warm-up's globals; it is its tenant's alone; a failing command fails
/// the build with its output and leaves nothing; a deleted template starts no sandbox and
/// stops none.
fn built_templates(d: &Daemon, key: &str, other: &str) {
    let spec = r##"name = "with-data"
warmup = '''
import pandas as pd
df = pd.read_csv("/opt/data/x.csv")
'''
[env]
GREETING = "hello from the template"
[[files]]
dest = "/opt/data/x.csv"
content = "a,b\n1,2\n3,4\n"
[[files]]
dest = "/usr/local/bin/shout"
content = "#!/bin/sh\necho \"$GREETING\" | tr a-z A-Z\n"
mode = 0o755
[[run]]
command = "shout && mkdir -p /opt/out && echo made > /opt/out/built"
[[run]]
command = '''
set -e
python3 - <<'PY'
import base64, hashlib, zipfile
files = {
    "hello_fissile/__init__.py": "GREETING = 'hi from a wheel'\n",
    "hello_fissile-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: hello-fissile\nVersion: 1.0\n",
    "hello_fissile-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: fissile-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
def digest(text):
    d = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
    return "sha256=" + d.decode()
record = "".join(f"{n},{digest(t)},{len(t.encode())}\n" for n, t in files.items())
record += "hello_fissile-1.0.dist-info/RECORD,,\n"
with zipfile.ZipFile("/tmp/hello_fissile-1.0-py3-none-any.whl", "w") as z:
    for n, t in files.items():
        z.writestr(n, t)
    z.writestr("hello_fissile-1.0.dist-info/RECORD", record)
PY
python3 -m pip install --no-index /tmp/hello_fissile-1.0-py3-none-any.whl
'''
"##;
    let t = Instant::now();
    let events = build(d, key, json!({ "spec": spec }));
    eprintln!("template built in {} ms", t.elapsed().as_millis());
    let last = events.last().unwrap();
    assert_eq!(last["type"], "done", "{events:?}");
    assert_eq!(last["template"]["name"], "with-data");
    assert_eq!(last["template"]["base"], "python-datasci");
    assert_eq!(last["template"]["ready"][0]["snapshot"]["status"], "ready");
    let steps: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "step")
        .map(|e| e["step"].as_str().unwrap())
        .collect();
    let expected = [
        "512x1: restoring python-datasci's ready snapshot",
        "512x1: writing 2 files",
        "512x1: run[0]: shout && mkdir",
        "512x1: run[1]: set -e…",
        "512x1: warming up",
        "512x1: taking the template's snapshot",
    ];
    assert_eq!(steps.len(), expected.len(), "{steps:?}");
    for (got, want) in steps.iter().zip(expected) {
        assert!(got.starts_with(want), "{steps:?}");
    }
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "stdout" && e["text"] == "HELLO FROM THE TEMPLATE\n"),
        "{events:?}"
    );
    assert!(template_names(d, key).contains(&"with-data".to_string()));
    assert!(!template_names(d, other).contains(&"with-data".to_string()));

    // Its sandboxes have its files, environment and warm-up globals.
    let s = create(d, key, r#"{"template": "with-data"}"#);
    let id = s["id"].as_str().unwrap();
    assert_eq!(s["template"], "with-data");
    assert_eq!(value(d, key, id, "df.shape"), "(2, 2)");
    // A package pip installed at build time (from a wheel the build made: no index here).
    assert_eq!(
        value(d, key, id, "import hello_fissile\nhello_fissile.GREETING"),
        "'hi from a wheel'"
    );
    assert_eq!(
        value(d, key, id, "import os\nos.environ['GREETING']"),
        "'hello from the template'"
    );
    let out = command(d, key, id, json!({ "cmd": "shout; cat /opt/out/built" }));
    assert_eq!(out.last().unwrap()["exit_code"], 0, "{out:?}");
    let text: String = out
        .iter()
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "HELLO FROM THE TEMPLATE\nmade\n");
    // A create's own environment wins over the template's.
    let own = create(
        d,
        key,
        r#"{"template": "with-data", "env": {"GREETING": "mine"}}"#,
    );
    let own_id = own["id"].as_str().unwrap();
    assert_eq!(
        value(d, key, own_id, "import os\nos.environ['GREETING']"),
        "'mine'"
    );
    // Another shape, another tenant, the same name again.
    let url = format!("{}/v1/sandboxes", d.base());
    let (st, v) = call(
        "POST",
        &url,
        Some(key),
        Some(r#"{"template": "with-data", "memory_mib": 640}"#),
    );
    assert_eq!((st, error_code(&v)), (400, "bad_request"), "{v}");
    // 128 variables of its own, and the template's GREETING: one too many.
    let env: serde_json::Map<String, Value> =
        (0..128).map(|i| (format!("V{i}"), json!("x"))).collect();
    let (st, v) = call(
        "POST",
        &url,
        Some(key),
        Some(&json!({ "template": "with-data", "env": env }).to_string()),
    );
    assert_eq!((st, error_code(&v)), (400, "bad_request"), "{v}");
    assert!(v.to_string().contains("make 129"), "{v}");
    let (st, v) = call(
        "POST",
        &url,
        Some(other),
        Some(r#"{"template": "with-data"}"#),
    );
    assert_eq!((st, error_code(&v)), (404, "not_found"), "{v}");
    let turl = format!("{}/v1/templates", d.base());
    let (st, v) = call(
        "POST",
        &turl,
        Some(key),
        Some(&json!({ "spec": spec }).to_string()),
    );
    assert_eq!((st, error_code(&v)), (409, "conflict"), "{v}");
    let (st, v) = call("DELETE", &format!("{turl}/with-data"), Some(other), None);
    assert_eq!((st, error_code(&v)), (404, "not_found"), "{v}");

    // A failing command fails the build, with its output, and nothing is kept.
    let broken = "name = 'broken'\n[[run]]\ncommand = 'echo about to fail; exit 3'\n";
    let events = build(d, key, json!({ "spec": broken }));
    let last = events.last().unwrap();
    assert_eq!(last["type"], "failed", "{events:?}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("run[0]: exited with status 3"),
        "{last}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "stdout" && e["text"] == "about to fail\n"),
        "{events:?}"
    );
    assert!(!template_names(d, key).contains(&"broken".to_string()));

    // The CLI builds (progress on stderr, a failure as its exit status), lists and deletes.
    let run = cli(
        d.base(),
        Some(key),
        &["templates", "build", "-"],
        "name = 'from-cli'\n[[run]]\ncommand = 'echo cli step output'\n",
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.starts_with("from-cli built in "),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr
            .contains("==> 512x1: run[0]: echo cli step output"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("    cli step output"), "{}", run.stderr);
    let ls = cli(d.base(), Some(key), &["templates", "ls"], "");
    assert!(ls.stdout.contains("from-cli"), "{}", ls.stdout);
    let failed = cli(
        d.base(),
        Some(key),
        &["templates", "build", "-"],
        "name = 'cli-broken'\n[[run]]\ncommand = 'exit 4'\n",
    );
    assert_eq!(failed.code, Some(1), "{}", failed.stderr);
    assert!(
        failed.stderr.contains("exited with status 4"),
        "{}",
        failed.stderr
    );
    let rm = cli(d.base(), Some(key), &["templates", "rm", "from-cli"], "");
    assert_eq!(rm.code, Some(0), "{}", rm.stderr);
    assert!(!template_names(d, key).contains(&"from-cli".to_string()));

    // Deleted while a create starts from it: that create either came first (its sandbox
    // works) or finds no template (404), never a 5xx. Then no more creates; its running
    // sandboxes go on.
    let racing = std::thread::scope(|sc| {
        let create = sc.spawn(|| {
            call(
                "POST",
                &url,
                Some(key),
                Some(r#"{"template": "with-data"}"#),
            )
        });
        std::thread::sleep(Duration::from_millis(50));
        let (st, v) = call("DELETE", &format!("{turl}/with-data"), Some(key), None);
        assert_eq!(st, 204, "{v}");
        create.join().unwrap()
    });
    eprintln!("a create racing its template's delete: {}", racing.0);
    match racing {
        (201, v) => {
            let raced = v["id"].as_str().unwrap();
            assert_eq!(value(d, key, raced, "df.shape"), "(2, 2)");
            let (st, v) = call("DELETE", &format!("{url}/{raced}"), Some(key), None);
            assert_eq!(st, 204, "{v}");
        }
        (st, v) => assert_eq!((st, error_code(&v)), (404, "not_found"), "{v}"),
    }
    assert!(!template_names(d, key).contains(&"with-data".to_string()));
    let (st, v) = call(
        "POST",
        &url,
        Some(key),
        Some(r#"{"template": "with-data"}"#),
    );
    assert_eq!((st, error_code(&v)), (404, "not_found"), "{v}");
    assert_eq!(value(d, key, id, "int(df['b'].sum())"), "6");
}

/// Python that fetches `url` and evaluates to its body as text, or to the error's errno name.
fn fetch_code(url: &str) -> String {
    format!(
        "import urllib.request, errno\n\
         try:\n    r = urllib.request.urlopen('{url}', timeout=20).read().decode()\n\
         except Exception as e:\n    x = getattr(e, 'reason', e)\n    \
         r = errno.errorcode.get(getattr(x, 'errno', None) or 0, type(x).__name__)\n\
         r"
    )
}

/// Egress over the API, against a server in a namespace this test links to the host (as
/// the internet would be): a sandbox created without a policy reaches nothing; one created
/// with `network` reaches the server; `PATCH .../network` gives the first one a way out and
/// then a deny rule; a fork's children carry the policy; bad policies are 400s.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_api_network_policies_on_create_patch_and_fork() {
    use fissile_sandbox::net::egress::{self, VethEnd};
    use std::net::{Ipv4Addr, TcpListener};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let key = create_key(&state, "acme");
    let other = create_key(&state, "globex");
    // The outside: a namespace with a veth to the host and an HTTP server.
    let outside_addr = Ipv4Addr::new(198, 51, 100, 2);
    let outside = fissile_sandbox::NetNs::create().unwrap();
    egress::link_namespace(
        &outside,
        &VethEnd {
            name: "fsl-api-o".into(),
            addr: Ipv4Addr::new(198, 51, 100, 1),
        },
        &VethEnd {
            name: "eth0".into(),
            addr: outside_addr,
        },
        "fsl-api-t",
        24,
        true,
    )
    .unwrap();
    outside
        .run(move || {
            let listener = TcpListener::bind((outside_addr, 8080)).unwrap();
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                for mut c in listener.incoming().flatten() {
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf);
                    let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello");
                }
            });
        })
        .unwrap();
    let url = format!("http://{outside_addr}:8080/");
    let d = start(&state, &["--max-fork", "4"]);
    let api = |p: &str| format!("{}{p}", d.base());

    // Bad policies: 400, nothing created.
    for bad in [
        r#"{"network": {"allow": ["10.0.0.0/33"]}}"#,
        r#"{"network": {"deny": ["example.com"]}}"#,
        r#"{"network": {"internet": true, "colour": "red"}}"#,
    ] {
        let (s, v) = call("POST", &api("/v1/sandboxes"), Some(&key), Some(bad));
        assert_eq!((s, error_code(&v)), (400, "bad_request"), "{bad}: {v}");
    }

    let closed = create(&d, &key, "{}");
    let closed_id = closed["id"].as_str().unwrap().to_string();
    assert_eq!(closed["network"], Value::Null);
    let unreachable = value(&d, &key, &closed_id, &fetch_code(&url));
    assert_ne!(unreachable, "'hello'", "no policy, no way out");

    let open = create(&d, &key, r#"{"network": {"internet": true}}"#);
    let open_id = open["id"].as_str().unwrap().to_string();
    assert_eq!(open["network"]["internet"], true);
    assert_eq!(value(&d, &key, &open_id, &fetch_code(&url)), "'hello'");

    // PATCH gives the closed one a way out, then takes this server away from it.
    let (s, v) = call(
        "PATCH",
        &api(&format!("/v1/sandboxes/{closed_id}/network")),
        Some(&key),
        Some(r#"{"internet": true}"#),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(value(&d, &key, &closed_id, &fetch_code(&url)), "'hello'");
    let (s, v) = call(
        "PATCH",
        &api(&format!("/v1/sandboxes/{closed_id}/network")),
        Some(&key),
        Some(&format!(
            r#"{{"internet": true, "deny": ["{outside_addr}"]}}"#
        )),
    );
    assert_eq!(
        (s, v["network"]["deny"][0].as_str()),
        (200, Some(outside_addr.to_string().as_str()))
    );
    assert_eq!(
        value(&d, &key, &closed_id, &fetch_code(&url)),
        "'EHOSTUNREACH'"
    );
    let (_, v) = call(
        "GET",
        &api(&format!("/v1/sandboxes/{closed_id}")),
        Some(&key),
        None,
    );
    assert_eq!(v["network"]["deny"][0], outside_addr.to_string());
    // Another tenant cannot touch it; a bad body is a 400.
    let (s, _) = call(
        "PATCH",
        &api(&format!("/v1/sandboxes/{closed_id}/network")),
        Some(&other),
        Some("{}"),
    );
    assert_eq!(s, 404);
    let (s, _) = call(
        "PATCH",
        &api(&format!("/v1/sandboxes/{closed_id}/network")),
        Some(&key),
        Some(r#"{"allow": "all"}"#),
    );
    assert_eq!(s, 400);

    // The children of a fork carry the parent's current policy.
    let (s, v) = call(
        "POST",
        &api(&format!("/v1/sandboxes/{closed_id}/fork")),
        Some(&key),
        Some(r#"{"n": 2}"#),
    );
    assert_eq!(s, 200, "{v}");
    for child in v["children"].as_array().unwrap() {
        let cid = child["id"].as_str().unwrap();
        let (_, cv) = call(
            "GET",
            &api(&format!("/v1/sandboxes/{cid}")),
            Some(&key),
            None,
        );
        assert_eq!(cv["network"]["deny"][0], outside_addr.to_string());
        assert_eq!(value(&d, &key, cid, &fetch_code(&url)), "'EHOSTUNREACH'");
    }
    let (s, v) = call(
        "POST",
        &api(&format!("/v1/sandboxes/{open_id}/fork")),
        Some(&key),
        Some(r#"{"n": 1}"#),
    );
    assert_eq!(s, 200, "{v}");
    let cid = v["children"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(value(&d, &key, &cid, &fetch_code(&url)), "'hello'");
}

/// The "internet" of the domain-policy test: a namespace linked to the host with, on
/// `addr`, a DNS server over UDP and TCP (every name in `names` → its address, other names
/// NXDOMAIN) and a
/// server on ports 80 and 443 that answers HTTP with the Host it was asked for and the
/// client's address, and a TLS ClientHello with `TLSOK`.
fn domain_world(
    addr: std::net::Ipv4Addr,
    host_end: std::net::Ipv4Addr,
    names: Vec<(&'static str, std::net::Ipv4Addr)>,
) -> fissile_sandbox::NetNs {
    use fissile_sandbox::net::egress::{self, VethEnd};
    use std::io::{Read, Write};
    let ns = fissile_sandbox::NetNs::create().unwrap();
    egress::link_namespace(
        &ns,
        &VethEnd {
            name: "fsl-dom-o".into(),
            addr: host_end,
        },
        &VethEnd {
            name: "eth0".into(),
            addr,
        },
        "fsl-dom-t",
        24,
        true,
    )
    .unwrap();
    ns.run(move || {
        // One answer for both transports: every name in `names` → its address (A), no other
        // records; other names NXDOMAIN.
        let reply = std::sync::Arc::new(move |msg: &[u8]| -> Option<Vec<u8>> {
            use simple_dns::{CLASS, Packet, PacketFlag, RCODE, ResourceRecord, TYPE, rdata};
            let q = Packet::parse(msg).ok()?;
            let mut r = Packet::new_reply(q.id());
            r.set_flags(PacketFlag::RECURSION_AVAILABLE);
            let question = q.questions.first()?.clone();
            let qname = question.qname.to_string().to_ascii_lowercase();
            match names.iter().find(|(n, _)| *n == qname) {
                None => *r.rcode_mut() = RCODE::NameError,
                Some((_, ip)) if question.qtype == simple_dns::QTYPE::TYPE(TYPE::A) => {
                    r.answers.push(ResourceRecord::new(
                        question.qname.clone(),
                        CLASS::IN,
                        30,
                        simple_dns::rdata::RData::A(rdata::A {
                            address: u32::from(*ip),
                        }),
                    ));
                }
                Some(_) => {} // NOERROR, no records (no AAAA here)
            }
            r.questions.push(question);
            r.build_bytes_vec().ok()
        });
        let udp = std::net::UdpSocket::bind((addr, 53)).unwrap();
        let udp_reply = reply.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                if let Some(r) = udp_reply(&buf[..n]) {
                    let _ = udp.send_to(&r, from);
                }
            }
        });
        let tcp = std::net::TcpListener::bind((addr, 53)).unwrap();
        std::thread::spawn(move || {
            for mut c in tcp.incoming().flatten() {
                let mut len = [0u8; 2];
                if c.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if c.read_exact(&mut msg).is_err() {
                    continue;
                }
                if let Some(r) = reply(&msg) {
                    let mut out = (r.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&r);
                    let _ = c.write_all(&out);
                }
            }
        });
        for port in [80, 443] {
            let listener = std::net::TcpListener::bind((addr, port)).unwrap();
            std::thread::spawn(move || {
                for mut c in listener.incoming().flatten() {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                    let peer = c
                        .peer_addr()
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default();
                    let mut buf = [0u8; 16384];
                    let n = c.read(&mut buf).unwrap_or(0);
                    if buf.first() == Some(&0x16) {
                        let _ = c.write_all(b"TLSOK");
                        continue;
                    }
                    // HTTP/1.1 with keep-alive: every request on the connection is answered
                    // (bodyless requests), until one says `Connection: close`.
                    let mut pending = buf[..n].to_vec();
                    loop {
                        let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match c.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => pending.extend_from_slice(&buf[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&pending[..end]).to_string();
                        pending.drain(..end + 4);
                        let header = |name: &str| {
                            head.lines().find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.trim()
                                    .eq_ignore_ascii_case(name)
                                    .then(|| v.trim().to_string())
                            })
                        };
                        let host = header("host").unwrap_or_else(|| "-".into());
                        let close =
                            header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
                        let body = format!("hello {host} from {peer}");
                        let _ = c.write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        );
                        if close {
                            break;
                        }
                    }
                }
            });
        }
    })
    .unwrap();
    ns
}

/// Plain HTTP requests that name no single host: none, two, a target naming another.
const NAMELESS_HEADS: [&str; 3] = [
    r"GET / HTTP/1.0\r\n\r\n",
    r"GET / HTTP/1.1\r\nHost: files.test\r\nHost: blocked.test\r\n\r\n",
    r"GET x://blocked.test/ HTTP/1.1\r\nHost: files.test\r\n\r\n",
];

/// Python helpers the domain-policy test's cells use: `get(url, host)` (body, `HTTP <code>:
/// <body>` or the error's type), `resolve(name)` (address or the error's type),
/// `two_requests(ip, first, second, extra)` (what comes back on one connection carrying a
/// request for each host, the second sent after the first answer; `extra` header lines for
/// the first), `raw(ip, data)` (what port 80 answers to `data`), `tls(ip, name)` (what a
/// server answers to a real ClientHello for `name`).
const DOMAIN_HELPERS: &str = r#"
import socket, ssl, urllib.request, urllib.error
def get(url, host=None):
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        return urllib.request.urlopen(req, timeout=20).read().decode()
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}: {e.read().decode().strip()}"
    except Exception as e:
        return type(getattr(e, "reason", e)).__name__
def resolve(name):
    try:
        return socket.gethostbyname(name)
    except Exception as e:
        return type(e).__name__
def resolve_tcp(name):
    import struct
    q = struct.pack(">HHHHHH", 4242, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack(">HH", 1, 1)
    s = socket.create_connection(("172.31.0.1", 53), timeout=20)
    s.sendall(struct.pack(">H", len(q)) + q)
    data = b""
    while len(data) < 2 or len(data) < 2 + struct.unpack(">H", data[:2])[0]:
        d = s.recv(4096)
        if not d:
            return "closed"
        data += d
    msg = data[2:]
    if msg[3] & 0xF:
        return f"rcode {msg[3] & 0xF}"
    return socket.inet_ntoa(msg[-4:])
def read_all(s, data=b""):
    while True:
        d = s.recv(4096)
        if not d:
            return data
        data += d
def two_requests(ip, first, second, extra=""):
    s = socket.create_connection((ip, 80), timeout=20)
    s.sendall(f"GET / HTTP/1.1\r\nHost: {first}\r\n{extra}\r\n".encode())
    data = s.recv(4096)
    try:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {second}\r\n\r\n".encode())
        data = read_all(s, data)
    except OSError as e:
        data += f" [{type(e).__name__}]".encode()
    return data.decode()
def raw(ip, data):
    s = socket.create_connection((ip, 80), timeout=20)
    s.sendall(data.encode())
    return read_all(s).decode()
def tls(ip, name):
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(inc, out, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    s = socket.create_connection((ip, 443), timeout=20)
    s.sendall(out.read())
    return read_all(s)
"#;

/// Domain policies over the API, against a DNS server and a web server the test starts in a
/// namespace linked to the host: an allow list of domains resolves only those names and lets
/// HTTP and TLS through only for them (a denied name on the same server address gets a 403
/// or a TLS alert, even with the address in the URL; a kept-alive connection opened for an
/// allowed name cannot carry a request for another, even asking for an upgrade; plain HTTP
/// naming no single host goes by its address, refused under a deny list); an allowed name
/// that resolves to the host is still refused; a runtime change to a deny list applies to
/// the next query and connection; a sandbox with no way out resolves nothing; a fork's
/// child gets its own resolver and proxy and leaves from its own address; the verdicts are
/// counted.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_api_domain_policies_resolve_and_proxy_by_name() {
    use std::net::Ipv4Addr;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let key = create_key(&state, "acme");
    let server = Ipv4Addr::new(192, 0, 2, 2);
    let host_end = Ipv4Addr::new(192, 0, 2, 1);
    let _world = domain_world(
        server,
        host_end,
        vec![
            ("files.test", server),
            ("cdn.files.test", server),
            ("blocked.test", server),
            ("host.test", host_end),
        ],
    );
    let d = start(
        &state,
        &["--dns-upstream", &server.to_string(), "--max-fork", "2"],
    );
    let api = |p: &str| format!("{}{p}", d.base());
    let py = |id: &str, expr: &str| {
        let v = value(&d, &key, id, expr);
        eprintln!("{id}: {expr} -> {v}");
        v
    };

    // A bad domain is a 400.
    let (s, v) = call(
        "POST",
        &api("/v1/sandboxes"),
        Some(&key),
        Some(r#"{"network": {"allow_domains": ["not a name"]}}"#),
    );
    assert_eq!((s, error_code(&v)), (400, "bad_request"), "{v}");

    // Only files.test (and names under it), no internet otherwise.
    let sb = create(
        &d,
        &key,
        r#"{"network": {"internet": false, "allow_domains": ["files.test", "host.test"]}}"#,
    );
    let id = sb["id"].as_str().unwrap().to_string();
    assert_eq!(sb["network"]["allow_domains"][0], "files.test");
    exec(&d, &key, &id, json!({ "code": DOMAIN_HELPERS }));
    assert_eq!(py(&id, "resolve('cdn.files.test')"), "'192.0.2.2'");
    assert_eq!(py(&id, "resolve('blocked.test')"), "'gaierror'");
    // Over TCP too (what a resolver falls back to for a truncated answer).
    assert_eq!(py(&id, "resolve_tcp('files.test')"), "'192.0.2.2'");
    assert_eq!(py(&id, "resolve_tcp('blocked.test')"), "'rcode 5'");
    let parent_hello = py(&id, "get('http://files.test/')");
    assert!(
        parent_hello.starts_with("'hello files.test from 10.200."),
        "{parent_hello}"
    );
    // The same server by its address: the name decides.
    assert!(py(&id, "get('http://192.0.2.2/', 'files.test')").starts_with("'hello files.test"));
    let refused = py(&id, "get('http://192.0.2.2/', 'blocked.test')");
    assert!(
        refused.contains("HTTP 403: fissile:") && refused.contains("not_allowed: blocked.test"),
        "{refused}"
    );
    // A second request on a kept-alive connection cannot name another host: the checked
    // first one reached the server with `Connection: close` (the server here keeps
    // connections alive otherwise, and then would answer the second); nor can it by asking
    // for an upgrade the server ignores. Plain HTTP naming no single host (none, two, or a
    // target naming another) goes by its address, which this policy does not allow.
    let one_host_per_connection = |id: &str, upgrade: &str, nameless: &str| {
        let kept = py(
            id,
            &format!("two_requests('192.0.2.2', 'files.test', 'blocked.test', '{upgrade}')"),
        );
        assert!(kept.contains("hello files.test"), "{kept}");
        assert!(!kept.contains("hello blocked.test"), "{kept}");
        for head in NAMELESS_HEADS {
            let answer = py(id, &format!("raw('192.0.2.2', '{head}')"));
            assert!(
                answer.contains("403 Forbidden") && answer.contains(nameless),
                "{head}: {answer}"
            );
        }
    };
    one_host_per_connection(&id, "", "not_allowed");
    one_host_per_connection(
        &id,
        r"Connection: keep-alive, Upgrade\r\nUpgrade: h2c\r\n",
        "not_allowed",
    );
    // TLS: the ClientHello's server name decides; a refused one gets an alert.
    assert_eq!(py(&id, "tls('192.0.2.2', 'files.test')"), "b'TLSOK'");
    assert_eq!(
        py(&id, "tls('192.0.2.2', 'blocked.test')"),
        r"b'\x15\x03\x03\x00\x02\x021'"
    );
    // An allowed name that resolves to the host's own address is still refused.
    let to_host = py(&id, "get('http://host.test/')");
    assert!(to_host.contains("always_denied: host.test"), "{to_host}");

    // A fork's child: its own resolver and proxy, its own source address.
    let (s, v) = call(
        "POST",
        &api(&format!("/v1/sandboxes/{id}/fork")),
        Some(&key),
        Some(r#"{"n": 1}"#),
    );
    assert_eq!(s, 200, "{v}");
    let child = v["children"][0]["id"].as_str().unwrap().to_string();
    let child_hello = py(&child, "get('http://files.test/')");
    assert!(
        child_hello.starts_with("'hello files.test from 10.200."),
        "{child_hello}"
    );
    assert_ne!(
        child_hello, parent_hello,
        "each leaves from its own address"
    );
    assert_eq!(py(&child, "resolve('blocked.test')"), "'gaierror'");

    // Changed at runtime: everything but blocked.test.
    let (s, v) = call(
        "PATCH",
        &api(&format!("/v1/sandboxes/{id}/network")),
        Some(&key),
        Some(r#"{"internet": true, "deny_domains": ["blocked.test"]}"#),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["network"]["deny_domains"][0], "blocked.test");
    assert_eq!(py(&id, "resolve('files.test')"), "'192.0.2.2'");
    assert_eq!(py(&id, "resolve('blocked.test')"), "'gaierror'");
    let denied = py(&id, "get('http://192.0.2.2/', 'blocked.test')");
    assert!(denied.contains("denied_domain: blocked.test"), "{denied}");
    // With every address open, the Host is what keeps blocked.test out: a kept-alive
    // connection cannot carry a second request for it, and a request naming no single host
    // is refused (its host is unknown).
    one_host_per_connection(&id, "", "no_name");
    assert!(py(&id, "get('http://192.0.2.2/', 'files.test')").starts_with("'hello files.test"));
    // The child keeps the policy it was forked with.
    assert_eq!(py(&child, "resolve('cdn.files.test')"), "'192.0.2.2'");
    assert_eq!(py(&child, "resolve('other.test')"), "'gaierror'");

    // No policy, no way out: no names either.
    let closed = create(&d, &key, "{}")["id"].as_str().unwrap().to_string();
    exec(&d, &key, &closed, json!({ "code": DOMAIN_HELPERS }));
    assert_eq!(py(&closed, "resolve('files.test')"), "'gaierror'");

    let count = |m: &str| -> u64 { d.metric(m).map_or(0, |v| v.parse().unwrap()) };
    assert!(count("fissiled_dns_queries_total{verdict=\"forwarded\"}") >= 4);
    assert!(count("fissiled_dns_queries_total{verdict=\"not_allowed\"}") >= 3);
    assert!(count("fissiled_dns_queries_total{verdict=\"denied_domain\"}") >= 1);
    assert!(count("fissiled_proxy_connections_total{verdict=\"allowed\"}") >= 5);
    assert!(count("fissiled_proxy_connections_total{verdict=\"not_allowed\"}") >= 2);
    assert!(count("fissiled_proxy_connections_total{verdict=\"always_denied\"}") >= 1);
    assert!(count("fissiled_proxy_connections_total{verdict=\"denied_domain\"}") >= 1);
    assert!(count("fissiled_proxy_connections_total{verdict=\"no_name\"}") >= 3);
}

/// The daemon's caps on a sandbox's traffic, against a server the test starts in a namespace
/// linked to the host: with `--guest-max-connections 4` the fifth and sixth connections held
/// at once are rejected (EHOSTUNREACH) and counted; with `--guest-bandwidth-mbit 1` a
/// download still arrives whole while the packets over the cap are dropped and counted; the
/// counts show in `GET .../network` and in `/metrics`.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_api_connection_and_bandwidth_caps_are_enforced_and_counted() {
    use fissile_sandbox::net::egress::{self, VethEnd};
    use std::io::{BufRead, Write};
    use std::net::Ipv4Addr;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let key = create_key(&state, "acme");
    let server = Ipv4Addr::new(198, 18, 0, 2);
    let outside = fissile_sandbox::NetNs::create().unwrap();
    egress::link_namespace(
        &outside,
        &VethEnd {
            name: "fsl-cap-o".into(),
            addr: Ipv4Addr::new(198, 18, 0, 1),
        },
        &VethEnd {
            name: "eth0".into(),
            addr: server,
        },
        "fsl-cap-t",
        24,
        true,
    )
    .unwrap();
    // One request line: `0` holds the connection open until the client closes it, `N`
    // sends N bytes (i % 251) and closes.
    outside
        .run(move || {
            let listener = std::net::TcpListener::bind((server, 9000)).unwrap();
            std::thread::spawn(move || {
                for c in listener.incoming().flatten() {
                    std::thread::spawn(move || {
                        let mut r = std::io::BufReader::new(c.try_clone().unwrap());
                        let mut line = String::new();
                        let _ = r.read_line(&mut line);
                        let n: usize = line.trim().parse().unwrap_or(0);
                        let mut c = c;
                        if n == 0 {
                            let _ = std::io::Read::read(&mut r, &mut [0u8; 1]);
                            return;
                        }
                        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
                        let _ = c.write_all(&data);
                    });
                }
            });
        })
        .unwrap();
    let d = start(
        &state,
        &[
            "--guest-max-connections",
            "4",
            "--guest-bandwidth-mbit",
            "1",
        ],
    );
    let sb = create(&d, &key, r#"{"network": {"internet": true}}"#);
    let id = sb["id"].as_str().unwrap().to_string();
    let held = value(
        &d,
        &key,
        &id,
        "import socket, errno\n\
         socks, errs = [], []\n\
         for i in range(6):\n    \
             try:\n        \
                 s = socket.create_connection(('198.18.0.2', 9000), timeout=20)\n        \
                 s.sendall(b'0\\n')\n        \
                 socks.append(s)\n    \
             except OSError as e:\n        \
                 errs.append(errno.errorcode.get(e.errno, str(e)))\n\
         for s in socks:\n    s.close()\n\
         (len(socks), errs)",
    );
    assert_eq!(held, "(4, ['EHOSTUNREACH', 'EHOSTUNREACH'])");
    let download = value(
        &d,
        &key,
        &id,
        "import socket\n\
         s = socket.create_connection(('198.18.0.2', 9000), timeout=60)\n\
         s.sendall(b'524288\\n')\n\
         got = bytearray()\n\
         while True:\n    \
             b = s.recv(65536)\n    \
             if not b:\n        break\n    \
             got += b\n\
         (len(got), got == bytes(i % 251 for i in range(524288)))",
    );
    assert_eq!(download, "(524288, True)");
    let (s, v) = call(
        "GET",
        &format!("{}/v1/sandboxes/{id}/network", d.base()),
        Some(&key),
        None,
    );
    assert_eq!(s, 200, "{v}");
    eprintln!("counters: {v}");
    assert_eq!(v["policy"]["internet"], true);
    assert!(
        v["counters"]["connection_cap_hits"].as_u64().unwrap() >= 2,
        "{v}"
    );
    assert!(
        v["counters"]["rate_dropped_packets"].as_u64().unwrap() > 0,
        "{v}"
    );
    let cap_hits: u64 = d
        .metric("fissiled_network{counter=\"connection_cap_hits\"}")
        .unwrap()
        .parse()
        .unwrap();
    assert!(cap_hits >= 2);
}

/// What one run of the `fissile` CLI did.
struct CliRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the `fissile` CLI against the daemon at `base` with `key` (none: no
/// `FISSILE_API_KEY`), `stdin` fed.
fn cli(base: &str, key: Option<&str>, args: &[&str], stdin: &str) -> CliRun {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(fissile_sandbox::paths::find_binary("fissile").unwrap());
    cmd.args(args)
        .env("FISSILE_API_URL", base)
        .env_remove("FISSILE_API_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(k) = key {
        cmd.env("FISSILE_API_KEY", k);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let run = CliRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "$ fissile {}\n  -> {:?}\n  stdout: {:?}\n  stderr: {:?}",
        args.join(" "),
        run.code,
        run.stdout,
        run.stderr
    );
    run
}

/// [`cli`] that must succeed; its stdout.
fn cli_ok(d: &Daemon, key: &str, args: &[&str]) -> String {
    let run = cli(d.base(), Some(key), args, "");
    assert_eq!(run.code, Some(0), "fissile {args:?}: {}", run.stderr);
    run.stdout
}

#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_api_cli_drives_sandboxes_forks_and_spaces() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // The key comes from `fissile keys create` (which runs `fissiled keys create`).
    let made = cli(
        "http://unused",
        None,
        &[
            "keys",
            "create",
            "--tenant",
            "acme",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(made.code, Some(0), "{}", made.stderr);
    let key = made.stdout.trim().to_string();
    let d = start(&state, &[]);

    // No key: refused, with the variable to set.
    let run = cli(d.base(), None, &["sandbox", "ls"], "");
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("FISSILE_API_KEY"), "{}", run.stderr);

    let id = cli_ok(&d, &key, &["sandbox", "create", "--metadata", "job=cli"])
        .trim()
        .to_string();
    assert!(id.starts_with("sb-"), "{id}");
    let ls = cli_ok(&d, &key, &["sandbox", "ls", "--metadata", "job=cli"]);
    assert!(ls.contains(&id) && ls.contains("running"), "{ls}");
    let ls = cli_ok(&d, &key, &["sandbox", "ls", "--metadata", "job=other"]);
    assert!(!ls.contains(&id), "{ls}");

    // exec streams stdout, prints the value, keeps state; a cell from stdin; a raise exits 1.
    let out = cli_ok(&d, &key, &["exec", &id, "-c", "x = 41\nprint('hello')"]);
    assert_eq!(out, "hello\n");
    assert_eq!(cli_ok(&d, &key, &["exec", &id, "-c", "x + 1"]), "42\n");
    let run = cli(d.base(), Some(&key), &["exec", &id, "-c", "-"], "x * 2\n");
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), "82\n"));
    let run = cli(d.base(), Some(&key), &["exec", &id, "-c", "1/0"], "");
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("ZeroDivisionError"), "{}", run.stderr);
    let run = cli(
        d.base(),
        Some(&key),
        &[
            "exec",
            &id,
            "--timeout-s",
            "2",
            "-c",
            "import time\ntime.sleep(30)",
        ],
        "",
    );
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("interrupted"), "{}", run.stderr);
    assert_eq!(cli_ok(&d, &key, &["exec", &id, "-c", "x"]), "41\n");

    // sh: output on the right streams, the command's exit code becomes the CLI's.
    let run = cli(
        d.base(),
        Some(&key),
        &["sh", &id, "echo out; echo err >&2; exit 3"],
        "",
    );
    assert_eq!(
        (run.code, run.stdout.as_str(), run.stderr.as_str()),
        (Some(3), "out\n", "err\n")
    );

    // fork, diverge, merge the second child: the parent sees its state.
    let kids: Vec<String> = cli_ok(&d, &key, &["fork", &id, "-n", "2"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(kids.len(), 2, "{kids:?}");
    cli_ok(&d, &key, &["exec", &kids[0], "-c", "x = 10"]);
    cli_ok(&d, &key, &["exec", &kids[1], "-c", "x = 20"]);
    cli_ok(&d, &key, &["merge", &id, &kids[1]]);
    assert_eq!(cli_ok(&d, &key, &["exec", &id, "-c", "x"]), "20\n");
    let run = cli(d.base(), Some(&key), &["merge", &id, &id], "");
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("bad_request"), "{}", run.stderr);
    let run = cli(d.base(), Some(&key), &["fork", &id, "-n", "0"], "");
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("bad_request"), "{}", run.stderr);

    // rm: gone from ls, and an exec names the missing sandbox.
    let mut rm = vec!["sandbox", "rm", id.as_str()];
    rm.extend(kids.iter().map(String::as_str));
    cli_ok(&d, &key, &rm);
    assert!(!cli_ok(&d, &key, &["sandbox", "ls"]).contains(&id));
    let run = cli(d.base(), Some(&key), &["exec", &id, "-c", "1"], "");
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("not_found"), "{}", run.stderr);

    // A persistent sandbox: rm persists its space, resume brings the globals back.
    let run = cli(
        d.base(),
        Some(&key),
        &["sandbox", "create", "--persistent"],
        "",
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let id = run.stdout.trim().to_string();
    let space = run
        .stderr
        .split_whitespace()
        .find(|w| w.starts_with("sp-"))
        .unwrap_or_else(|| panic!("no space id in {:?}", run.stderr))
        .to_string();
    cli_ok(&d, &key, &["exec", &id, "-c", "kept = 'yes'"]);
    cli_ok(&d, &key, &["sandbox", "rm", &id]);
    let spaces = cli_ok(&d, &key, &["spaces", "ls"]);
    assert!(
        spaces
            .lines()
            .any(|l| l.starts_with(&space) && l.contains("persisted")),
        "{spaces}"
    );
    let resumed = cli_ok(&d, &key, &["spaces", "resume", &space])
        .trim()
        .to_string();
    assert_eq!(
        cli_ok(&d, &key, &["exec", &resumed, "-c", "kept"]),
        "'yes'\n"
    );
    cli_ok(&d, &key, &["sandbox", "rm", &resumed]);
    cli_ok(&d, &key, &["spaces", "rm", &space]);
    assert!(!cli_ok(&d, &key, &["spaces", "ls"]).contains(&space));

    let templates = cli_ok(&d, &key, &["templates", "ls"]);
    assert!(templates.contains("python-datasci"), "{templates}");
    let json: Value =
        serde_json::from_str(&cli_ok(&d, &key, &["templates", "ls", "--json"])).unwrap();
    assert_eq!(json[0]["name"], "python-datasci", "{json}");
}

/// `fissiled tenants set ...` on `state` (daemon stopped): its stdout, or its stderr as the
/// error.
fn set_tenant(state: &Path, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(bin())
        .args(["tenants", "set", "--state-dir"])
        .arg(state)
        .args(args)
        .output()
        .unwrap();
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_api_tenant_limits_and_lifetimes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let small = create_key(&state, "small");
    let big = create_key(&state, "big");
    set_tenant(
        &state,
        &[
            "--tenant",
            "small",
            "--max-sandboxes",
            "1",
            "--max-fork",
            "1",
        ],
    )
    .unwrap();
    // Long enough that `first` is still there for the quota checks after its create however
    // slow the lab (a pause of a few seconds between two requests happens there).
    let set = set_tenant(&state, &["--tenant", "small", "--idle-timeout-s", "10"]).unwrap();
    let limits: Value = serde_json::from_str(set.trim()).unwrap();
    assert_eq!(
        (
            &limits["tenant"],
            &limits["max_sandboxes"],
            &limits["max_fork"]
        ),
        (&json!("small"), &json!(1), &json!(1)),
        "a second `set` keeps what the first set: {limits}"
    );
    assert_eq!(limits["idle_timeout_s"], 10, "{limits}");
    let err = set_tenant(&state, &["--tenant", "small", "--max-fork", "0"]).unwrap_err();
    assert!(err.contains("--max-fork"), "{err}");

    let d = start(&state, &[]);
    let sandboxes = format!("{}/v1/sandboxes", d.base());
    let first = create(&d, &small, "{}");
    let first = first["id"].as_str().unwrap().to_string();
    // The tenant's own limits, not the daemon's (16 sandboxes, forks of 32).
    let (s, v) = call("POST", &sandboxes, Some(&small), Some("{}"));
    assert_eq!((s, error_code(&v)), (429, "quota_exceeded"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 1"),
        "{v}"
    );
    let (s, v) = call(
        "POST",
        &format!("{sandboxes}/{first}/fork"),
        Some(&small),
        Some(r#"{"n":2}"#),
    );
    assert_eq!(s, 429, "{v}");
    let (s, v) = call(
        "POST",
        &sandboxes,
        Some(&big),
        Some(r#"{"max_lifetime_s":0}"#),
    );
    assert_eq!((s, error_code(&v)), (400, "bad_request"), "{v}");
    let short = create(&d, &big, r#"{"max_lifetime_s":4}"#);
    assert_eq!(short["max_lifetime_s"], 4, "{short}");
    let short = short["id"].as_str().unwrap().to_string();
    let other = create(&d, &big, "{}");
    let other = other["id"].as_str().unwrap().to_string();

    // small's sandbox closes after 10 s idle (its tenant's timeout), big's short one at its own
    // 4 s lifetime; big's other sandbox has neither timer and stays.
    let gone =
        |id: &str, key: &str| call("GET", &format!("{sandboxes}/{id}"), Some(key), None).0 == 404;
    let deadline = Instant::now() + Duration::from_secs(180);
    while !(gone(&first, &small) && gone(&short, &big)) {
        assert!(
            Instant::now() < deadline,
            "the timers did not close the sandboxes"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(!gone(&other, &big));
    assert_eq!(value(&d, &big, &other, "6 * 7"), "42");
    // small's quota is free again.
    create(&d, &small, "{}");

    // A sandbox deleted while it starts (a cold boot: seconds in the lab) is stopped: its
    // create answers 409 and says so, at once rather than at the daemon's 300 s boot
    // timeout, and no record or VMM of it is left. A start that wins the race (the test
    // paused, or a fast host) is an ordinary delete; up to three tries, and in the lab at
    // least one must lose it.
    let mut cancelled = 0;
    for attempt in 0..3 {
        let job = format!("doomed-{attempt}");
        let creating = {
            let (url, key) = (sandboxes.clone(), big.clone());
            let body = json!({ "metadata": { "job": job } }).to_string();
            std::thread::spawn(move || call("POST", &url, Some(&key), Some(&body)))
        };
        let doomed = format!("{sandboxes}?metadata.job={job}");
        let deadline = Instant::now() + Duration::from_secs(120);
        let (id, state_seen) = loop {
            let (_, list) = call("GET", &doomed, Some(&big), None);
            if let Some(sb) = list.as_array().unwrap().first() {
                break (sb["id"].as_str().unwrap().to_string(), sb["state"].clone());
            }
            assert!(Instant::now() < deadline, "the create never showed up");
            std::thread::sleep(Duration::from_millis(20));
        };
        let (s, v) = call("DELETE", &format!("{sandboxes}/{id}"), Some(&big), None);
        assert_eq!(s, 204, "{v}");
        let deleted = Instant::now();
        let (s, v) = creating.join().unwrap();
        assert!(
            deleted.elapsed() < Duration::from_secs(120),
            "the create answered {:?} after the delete: {v}",
            deleted.elapsed()
        );
        if s == 201 {
            assert_eq!(v["id"], id.as_str(), "{v}");
        } else {
            assert_eq!(state_seen, "starting");
            assert_eq!((s, error_code(&v)), (409, "conflict"), "{v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("was deleted while it started"),
                "{v}"
            );
            cancelled += 1;
        }
        assert!(gone(&id, &big));
        let (_, list) = call("GET", &doomed, Some(&big), None);
        assert_eq!(list, json!([]));
        let its_dir = state.join("sandboxes").join(&id);
        let deadline = Instant::now() + Duration::from_secs(60);
        while vmms_under(&its_dir) > 0 {
            assert!(
                Instant::now() < deadline,
                "the deleted sandbox's VMM still runs"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        if cancelled > 0 {
            break;
        }
    }
    assert!(
        cancelled > 0 || !guest_env().in_lab,
        "every start won the race with its delete"
    );
}

/// `fissile-vmm` processes whose command line mentions `dir` (this test's state directory).
fn vmms_under(dir: &Path) -> usize {
    vmms_under_where(dir, "")
}

/// [`vmms_under`] whose command line also holds `arg`.
fn vmms_under_where(dir: &Path, arg: &str) -> usize {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| {
            let c = String::from_utf8_lossy(c);
            c.split('\0')
                .next()
                .is_some_and(|a| a.ends_with("fissile-vmm"))
                && c.contains(&dir)
                && c.split('\0').any(|a| arg.is_empty() || a == arg)
        })
        .count()
}

/// `--standby-pool 2`: two VMMs wait with their VM made; fork(3) puts two children into them
/// and one into a new process; every child has the parent's state and its own entropy, a
/// standby child merges back, the pool refills to three (the fork asked for three; the
/// default `--standby-on-demand` is 4), idle sandboxes are trimmed (`--trim-after-s 3`) and
/// keep their state, a create and a space's resume restore into standbys too, after
/// `kill -9` the restarted daemon re-adopts the children and leaves no standby behind, and a
/// fork its tenant's quota refuses starts none.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_api_forks_take_standby_vmms() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let key = create_key(&state, "acme");
    let args = [
        "--ready-shape",
        "512x1",
        "--warm-pool",
        "0",
        "--standby-pool",
        "2",
        "--trim-after-s",
        "3",
    ];
    let mut d = start(&state, &args);
    let standbys = |d: &Daemon| -> u64 {
        d.metric("fissiled_sandboxes{state=\"standby\"}")
            .unwrap()
            .parse()
            .unwrap()
    };
    let taken = |d: &Daemon| -> u64 {
        d.metric("fissiled_standby_taken_total")
            .unwrap()
            .parse()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(900);
    // Waits until `n` standbys are idle; `what` says what never happened.
    let await_standbys = |d: &Daemon, n: u64, what: &str| {
        while standbys(d) < n {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let delete = |d: &Daemon, id: &str| {
        let (s, _) = call(
            "DELETE",
            &format!("{}/v1/sandboxes/{id}", d.base()),
            Some(&key),
            None,
        );
        assert_eq!(s, 204);
    };
    let parent = create(&d, &key, "{}")["id"].as_str().unwrap().to_string();
    exec(&d, &key, &parent, json!({"code": "x = 41"}));
    await_standbys(&d, 2, "the standby pool never filled");
    // Standbys belong to nobody.
    let (_, list) = call(
        "GET",
        &format!("{}/v1/sandboxes", d.base()),
        Some(&key),
        None,
    );
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(taken(&d), 0);

    let (s, v) = call(
        "POST",
        &format!("{}/v1/sandboxes/{parent}/fork", d.base()),
        Some(&key),
        Some(r#"{"n":3}"#),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(taken(&d), 2, "the fork did not take both standbys: {v}");
    let children: Vec<String> = v["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{c}"))
                .to_string()
        })
        .collect();
    assert_eq!(children.len(), 3, "{v}");
    let rand = "import os; os.urandom(16).hex()";
    let mut randoms = vec![value(&d, &key, &parent, rand)];
    for (i, c) in children.iter().enumerate() {
        assert_eq!(value(&d, &key, c, "x"), "41", "child {c}");
        randoms.push(value(&d, &key, c, rand));
        exec(&d, &key, c, json!({"code": format!("x = {}", 100 + i)}));
    }
    let distinct: std::collections::BTreeSet<_> = randoms.iter().collect();
    assert_eq!(
        distinct.len(),
        randoms.len(),
        "urandom repeated: {randoms:?}"
    );
    // Children 0 and 1 are the standbys.
    let (s, v) = call(
        "POST",
        &format!(
            "{}/v1/sandboxes/{parent}/merge_into/{}",
            d.base(),
            children[1]
        ),
        Some(&key),
        None,
    );
    assert!(s < 300, "merge: {s} {v}");
    assert_eq!(value(&d, &key, &parent, "x"), "101");

    await_standbys(&d, 3, "the standby pool never refilled to the fork's size");
    // Idle for three seconds, a sandbox on a snapshot image is trimmed, once per idle spell
    // (`--trim-after-s 3`): once no trim is due, a cell in each of the three children and
    // the merged parent (the only sandboxes) starts a new spell, and each is trimmed exactly
    // once more, gives back pages it copied that hold the image's bytes again, and keeps
    // its state.
    let trims = |d: &Daemon| -> (u64, u64) {
        let [n, pages] = d
            .metrics(["fissiled_trims_total", "fissiled_trimmed_pages_total"])
            .unwrap();
        (n.parse().unwrap(), pages.parse().unwrap())
    };
    // Waits until the counters stop moving (no trim due: every sandbox trimmed in its
    // idle spell), at least `min` trims in all. Still for 10 s: longer than a trim takes to
    // come due (3 s idle, then up to a 1 s tick) and to run in the lab, so a trim still due
    // is never read as none.
    let settled = |min: u64| {
        let mut last = trims(&d);
        loop {
            std::thread::sleep(Duration::from_secs(10));
            let now = trims(&d);
            if now == last && now.0 >= min {
                return now;
            }
            assert!(Instant::now() < deadline, "trims did not settle: {now:?}");
            last = now;
        }
    };
    let before = settled(0);
    let cell = "import json\ny = json.dumps({'x': x})";
    for c in children.iter().chain([&parent]) {
        exec(&d, &key, c, json!({ "code": cell }));
    }
    let after = settled(before.0 + 4);
    assert_eq!(
        after.0,
        before.0 + 4,
        "each sandbox is trimmed once in its idle spell: {before:?}, then {after:?}"
    );
    assert!(
        after.1 > before.1,
        "the trims gave back no pages: {before:?}, then {after:?}"
    );
    for (i, c) in children.iter().enumerate() {
        let x = 100 + i;
        assert_eq!(
            value(&d, &key, c, "y"),
            format!("'{{\"x\": {x}}}'"),
            "child {c}"
        );
    }
    assert_eq!(value(&d, &key, &parent, "y"), r#"'{"x": 101}'"#);
    assert_eq!(
        vmms_under(&state),
        7,
        "the parent, 3 children and 3 standbys"
    );

    // A create restores the ready snapshot into a standby, and a persistent one's resume
    // its space's snapshot; neither adds to the pool's size.
    let made = create(&d, &key, r#"{"persistent":true}"#);
    let (made, space) = (
        made["id"].as_str().unwrap().to_string(),
        made["space_id"].as_str().unwrap().to_string(),
    );
    assert_eq!(taken(&d), 3, "the create did not take a standby");
    exec(&d, &key, &made, json!({"code": "kept = 'in the space'"}));
    delete(&d, &made);
    await_standbys(&d, 3, "the standby pool never refilled");
    let (s, v) = call(
        "POST",
        &format!("{}/v1/spaces/{space}/resume", d.base()),
        Some(&key),
        None,
    );
    assert_eq!(s, 201, "{v}");
    let resumed = v["id"].as_str().unwrap().to_string();
    assert_eq!(taken(&d), 4, "the resume did not take a standby");
    assert_eq!(value(&d, &key, &resumed, "kept"), "'in the space'");
    delete(&d, &resumed);
    await_standbys(&d, 3, "the standby pool never refilled");
    assert_eq!(
        vmms_under(&state),
        7,
        "the parent, 3 children and 3 standbys, still"
    );
    d.kill_hard().unwrap();
    // The restarted daemon lets acme run the four sandboxes it has and no more.
    set_tenant(&state, &["--tenant", "acme", "--max-sandboxes", "4"]).unwrap();
    let d = start(&state, &["--ready-shape", "512x1", "--warm-pool", "0"]);
    // A standby exits once its input closes; the restarted daemon stops any left.
    let gone = Instant::now() + Duration::from_secs(60);
    while vmms_under(&state) > 4 {
        assert!(Instant::now() < gone, "the old standbys still run");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(vmms_under(&state), 4);
    assert_eq!(value(&d, &key, &children[0], "x"), "100");
    let (_, list) = call(
        "GET",
        &format!("{}/v1/sandboxes", d.base()),
        Some(&key),
        None,
    );
    assert_eq!(list.as_array().unwrap().len(), 4, "{list}");
    assert_eq!(standbys(&d), 0);
    // A fork the tenant's sandbox quota refuses does not count as demand for standbys
    // (`--standby-on-demand`, default 4): none start. (A refill would start a second after
    // the fork, on the daemon's one-second tick. Children 0 and 1 began as standbys, so
    // their command lines hold `--standby` too.)
    let began_as_standbys = vmms_under_where(&state, "--standby");
    let (s, v) = call(
        "POST",
        &format!("{}/v1/sandboxes/{parent}/fork", d.base()),
        Some(&key),
        Some(r#"{"n":2}"#),
    );
    assert_eq!((s, error_code(&v)), (429, "quota_exceeded"), "{v}");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        vmms_under_where(&state, "--standby"),
        began_as_standbys,
        "a refused fork started standbys"
    );
}

/// The `fissiled_warm_pool_taken_total` counter.
fn pool_taken(d: &Daemon) -> u64 {
    d.metric("fissiled_warm_pool_taken_total")
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_api_warm_pool_serves_creates_and_is_not_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let key = create_key(&state, "acme");
    let mut d = start(&state, &["--ready-shape", "512x1", "--warm-pool", "1"]);
    let warm = |d: &Daemon| -> u64 {
        let (_, v) = call(
            "GET",
            &format!("{}/v1/templates", d.base()),
            Some(&key),
            None,
        );
        v[0]["ready"][0]["warm"].as_u64().unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(900);
    while warm(&d) < 1 {
        assert!(Instant::now() < deadline, "the pool never filled");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Pool members belong to nobody.
    let (_, list) = call(
        "GET",
        &format!("{}/v1/sandboxes", d.base()),
        Some(&key),
        None,
    );
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
    assert_eq!(pool_taken(&d), 0);

    let t = Instant::now();
    let a = create(
        &d,
        &key,
        r#"{"metadata":{"from":"pool"},"env":{"WHO":"a"}}"#,
    );
    let a = a["id"].as_str().unwrap().to_string();
    let first = exec(
        &d,
        &key,
        &a,
        json!({"code": "import os; os.environ['WHO']"}),
    );
    eprintln!(
        "create + first exec from the warm pool: {} ms",
        t.elapsed().as_millis()
    );
    let done = first.last().unwrap();
    assert_eq!(done["type"], "done", "{first:?}");
    let main = first
        .iter()
        .find(|e| e["type"] == "result" && e["is_main_result"] == true)
        .unwrap_or_else(|| panic!("no main result: {first:?}"));
    assert_eq!(main["data"]["text/plain"], "'a'", "{first:?}");
    // The template's warm-up cell, the member's own warm-up cell (run in the background
    // after its restore), then this one.
    assert_eq!(done["execution_count"], 3, "{first:?}");
    assert_eq!(
        pool_taken(&d),
        1,
        "the create did not take the pool's sandbox"
    );
    // Warm-up imports are there; the caller's record is what the API shows.
    assert_eq!(
        value(&d, &key, &a, "import sys; 'pandas' in sys.modules"),
        "True"
    );
    let (_, v) = call(
        "GET",
        &format!("{}/v1/sandboxes/{a}", d.base()),
        Some(&key),
        None,
    );
    assert_eq!(v["metadata"]["from"], "pool", "{v}");

    // A create with an egress policy needs its namespace set before the guest runs: no pool.
    while warm(&d) < 1 {
        assert!(Instant::now() < deadline, "the pool never refilled");
        std::thread::sleep(Duration::from_millis(500));
    }
    let b = create(
        &d,
        &key,
        r#"{"network":{"internet":false,"allow":["10.9.0.0/16"]}}"#,
    );
    assert_eq!(pool_taken(&d), 1);
    let b = b["id"].as_str().unwrap().to_string();
    // The refilled member and the one handed out differ in their entropy.
    let c = create(&d, &key, "{}");
    let c = c["id"].as_str().unwrap().to_string();
    assert_eq!(pool_taken(&d), 2);
    let rand = "import os; os.urandom(16).hex()";
    assert_ne!(value(&d, &key, &a, rand), value(&d, &key, &c, rand));
    for id in [&b, &c] {
        let (s, _) = call(
            "DELETE",
            &format!("{}/v1/sandboxes/{id}", d.base()),
            Some(&key),
            None,
        );
        assert_eq!(s, 204);
    }

    // kill -9: the restarted daemon re-adopts the tenant's sandbox and stops the pool's.
    while warm(&d) < 1 {
        assert!(Instant::now() < deadline, "the pool never refilled");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(vmms_under(&state), 2, "a's VMM and the pool member's");
    d.kill_hard().unwrap();
    let d = start(&state, &["--ready-shape", "512x1", "--warm-pool", "0"]);
    assert_eq!(vmms_under(&state), 1, "the old pool member still runs");
    assert_eq!(value(&d, &key, &a, "os.environ['WHO']"), "'a'");
    let (_, list) = call(
        "GET",
        &format!("{}/v1/sandboxes", d.base()),
        Some(&key),
        None,
    );
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}
