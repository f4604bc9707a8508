//! fissiled's HTTP API against real sandboxes: the daemon binary, real microVMs, real HTTP
//! (a client in this test process, on loopback next to the daemon).
//!
//! The `guest_` tests are ignored by a plain `cargo test`: `api_suite_boots_real_guests`
//! runs them (in one lab boot on a KVM-PVM host, as a child process where KVM is usable) and
//! checks that every one ran and passed (see `fissile_tests::guest`).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fissile_tests::guest::{guest_env, run_guest_suite};
use serde_json::{Value, json};

#[test]
fn api_suite_boots_real_guests() {
    run_guest_suite("guest_", Duration::from_secs(1800));
}

fn fissiled() -> Command {
    Command::new(fissile_sandbox::paths::find_binary("fissiled").unwrap())
}

fn create_key(state: &Path, tenant: &str) -> String {
    let out = fissiled()
        .args(["keys", "create", "--tenant", tenant, "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A running daemon; killed on drop.
struct Daemon {
    child: Child,
    base: String,
}

impl Drop for Daemon {
    /// A graceful stop (SIGTERM), so the daemon stops its sandboxes and snapshotd; SIGKILL
    /// if it does not exit within 60 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..600 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(state: &Path, extra: &[&str]) -> Daemon {
    let env = guest_env();
    let mut child = fissiled()
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state)
        .arg("--kernel")
        .arg(&env.kernel)
        .arg("--rootfs")
        .arg(&env.rootfs)
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.strip_prefix("READY ").expect("readiness line").trim();
    Daemon {
        child,
        base: format!("http://{addr}"),
    }
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
    let resp = ureq::post(&format!("{}/v1/sandboxes/{id}/exec", d.base))
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
    let url = |p: &str| format!("{}{p}", d.base);

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
