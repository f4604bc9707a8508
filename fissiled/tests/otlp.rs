//! Traces over OTLP: fissiled with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a collector this
//! test runs on loopback (plain HTTP, protobuf bodies decoded with `opentelemetry-proto`).
//! Requests and a lifecycle step (a create, which fails here: no kernel) must arrive as spans
//! carrying the request id, the tenant and the sandbox id.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fissile_tests::daemon::{self, Fissiled};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

/// One exported span: its name and its string (or integer) attributes.
#[derive(Debug)]
struct Span {
    name: String,
    attrs: BTreeMap<String, String>,
    service: Option<String>,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// A collector on loopback: answers every POST with 200 and sends the spans of each
/// `/v1/traces` body it decodes (a body is at most 16 MiB).
fn collector() -> (String, mpsc::Receiver<Span>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let mut reader = BufReader::new(&conn);
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    assert!(len <= 16 << 20, "a {len}-byte export");
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    (&conn)
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .unwrap();
                    assert!(
                        request_line.starts_with("POST /v1/traces "),
                        "{request_line}"
                    );
                    let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
                    for rs in req.resource_spans {
                        let service = rs.resource.as_ref().and_then(|r| {
                            r.attributes
                                .iter()
                                .find(|a| a.key == "service.name")
                                .map(|a| text(&a.value))
                        });
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                let attrs = s
                                    .attributes
                                    .iter()
                                    .map(|a| (a.key.clone(), text(&a.value)))
                                    .collect();
                                let _ = tx.send(Span {
                                    name: s.name,
                                    attrs,
                                    service: service.clone(),
                                });
                            }
                        }
                    }
                }
            });
        }
    });
    (url, rx)
}

#[test]
fn requests_and_lifecycle_steps_are_exported_as_spans() {
    let (endpoint, spans) = collector();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_fissiled"));
    let key = daemon::create_key(bin, &state, "acme").unwrap();
    let d = Fissiled::serve_without_guests(
        bin,
        &state,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .unwrap();
    let list = ureq::get(&format!("{}/v1/sandboxes", d.base()))
        .set("Authorization", &format!("Bearer {key}"))
        .timeout(Duration::from_secs(30))
        .call()
        .unwrap();
    let list_id = list.header("x-request-id").unwrap().to_string();
    // No kernel here: the create fails, inside its span.
    let create = ureq::post(&format!("{}/v1/sandboxes", d.base()))
        .set("Authorization", &format!("Bearer {key}"))
        .timeout(Duration::from_secs(120))
        .send_string("{}");
    assert!(
        matches!(create, Err(ureq::Error::Status(500, _))),
        "{create:?}"
    );
    drop(d); // a graceful stop flushes what is still queued

    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut request, mut created) = (None, None);
    while request.is_none() || created.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let span = spans
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("spans missing: request {request:?}, create {created:?}"));
        eprintln!("span {span:?}");
        match span.name.as_str() {
            "request" if span.attrs.get("request_id") == Some(&list_id) => request = Some(span),
            "create" => created = Some(span),
            _ => {}
        }
    }
    let request = request.unwrap();
    assert_eq!(request.service.as_deref(), Some("fissiled"));
    assert_eq!(request.attrs["path"], "/v1/sandboxes");
    assert_eq!(request.attrs["method"], "GET");
    assert_eq!(request.attrs["tenant"], "acme");
    let created = created.unwrap();
    assert_eq!(created.attrs["tenant"], "acme");
    assert!(created.attrs["sandbox"].starts_with("sb-"), "{created:?}");
}
