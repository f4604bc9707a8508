//! `fissile-lab serve`: fissiled in the lab (natively where KVM boots standard guests),
//! driven from this host over its loopback — the path every host client (the SDK, curl,
//! benchmarks) takes on a KVM-PVM machine.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The server; killed on drop (QEMU follows its parent).
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn lab_serve_answers_on_the_host_loopback_with_real_sandboxes() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fissile-lab"))
        .args(["serve", "--tenant", "acme", "--timeout", "1800", "--port"])
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let _served = Served(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut url, mut key) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(1200);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("fissile-lab serve did not get ready");
        if let Some(u) = line.strip_prefix("FISSILE_API_URL=") {
            url = Some(u.trim().to_string());
        } else if let Some(k) = line.strip_prefix("FISSILE_API_KEY=") {
            key = Some(k.trim().to_string());
        } else if line.starts_with("READY ") {
            break;
        }
    }
    let (url, key) = (url.unwrap(), key.unwrap());
    assert_eq!(url, format!("http://127.0.0.1:{port}"));
    let auth = format!("Bearer {key}");

    let health: Value = ureq::get(&format!("{url}/healthz"))
        .timeout(Duration::from_secs(60))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(health["status"], "ok");
    let sb: Value = ureq::post(&format!("{url}/v1/sandboxes"))
        .timeout(Duration::from_secs(600))
        .set("Authorization", &auth)
        .send_string("{}")
        .unwrap()
        .into_json()
        .unwrap();
    let id = sb["id"].as_str().unwrap();
    let resp = ureq::post(&format!("{url}/v1/sandboxes/{id}/exec"))
        .timeout(Duration::from_secs(600))
        .set("Authorization", &auth)
        .send_string(r#"{"code":"6*7"}"#)
        .unwrap();
    let events: Vec<Value> = BufReader::new(resp.into_reader())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let value = events.iter().find(|e| e["type"] == "result").unwrap();
    assert_eq!(value["data"]["text/plain"], "42", "{events:?}");
    assert_eq!(events.last().unwrap()["type"], "done");
    let status = ureq::delete(&format!("{url}/v1/sandboxes/{id}"))
        .timeout(Duration::from_secs(600))
        .set("Authorization", &auth)
        .call()
        .unwrap()
        .status();
    assert_eq!(status, 204);
}
