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
    let fissiled = Fissiled::serve(
        bin,
        &state,
        [
            "--kernel",
            "/nonexistent/vmlinux",
            "--rootfs",
            "/nonexistent/rootfs",
        ],
    )
    .unwrap();
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
    // Oversize body: 413. The daemon answers and closes as soon as the limit is passed,
    // while the client may still be writing, so a try can end in a broken pipe before the
    // answer is read; a few tries, each of which must be a 413 if it reads an answer.
    let huge = format!(r#"{{"metadata":{{"k":"{}"}}}}"#, "x".repeat(3 << 20));
    let mut answered = None;
    for _ in 0..5 {
        let r = ureq::post(&url("/v1/sandboxes"))
            .timeout(Duration::from_secs(30))
            .set("Authorization", &bearer)
            .set("Content-Type", "application/json")
            .send_string(&huge);
        match r {
            Ok(r) | Err(ureq::Error::Status(_, r)) => {
                answered = Some((r.status(), r.into_json::<Value>().unwrap()));
                break;
            }
            Err(ureq::Error::Transport(_)) => continue,
        }
    }
    let (s, v) = answered.expect("no answer to the oversize request in 5 tries");
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
