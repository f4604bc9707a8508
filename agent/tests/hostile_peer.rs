//! The host-side client against a hostile guest: a peer on a unix socket that speaks the
//! protocol's framing but streams without end, trickles, lies about `eof`, or never answers.
//! The client must stay within its byte caps and deadlines.

#![allow(clippy::unwrap_used)]

use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use fissile_agent::{AgentClient, ClientError, MAX_COLLECTED_OUTPUT};
use fissile_proto::agent::{
    AGENT_FRAME_CAP, AGENT_PROTOCOL_VERSION, Done, ExecRequest, Request, Response,
};
use fissile_proto::frame::{read_frame, write_frame};

/// Serves one connection with `behave`, which gets each request and the stream.
fn peer(
    behave: impl FnOnce(Request, &mut UnixStream) + Send + 'static,
) -> (tempfile::TempDir, AgentClient) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let req: Request = read_frame(&mut s, AGENT_PROTOCOL_VERSION, AGENT_FRAME_CAP).unwrap();
        behave(req, &mut s);
    });
    let client = AgentClient::connect_unix(&path).unwrap();
    (dir, client)
}

fn send(s: &mut UnixStream, r: &Response) -> bool {
    write_frame(s, AGENT_PROTOCOL_VERSION, r).is_ok()
}

#[test]
fn exec_output_beyond_the_cap_is_dropped_not_collected() {
    let (_dir, mut client) = peer(|_, s| {
        let chunk = Response::Stdout(vec![b'x'; 64 << 10]);
        let chunks = (MAX_COLLECTED_OUTPUT / (64 << 10)) + 64;
        for _ in 0..chunks {
            if !send(s, &chunk) {
                return;
            }
        }
        send(s, &Response::Done(Done::default()));
    });

    let out = client.exec_code("print('x' * 10**9)").unwrap();

    assert!(out.truncated);
    let kept: usize = out.stdout().len();
    assert!(kept <= MAX_COLLECTED_OUTPUT, "{kept} bytes kept");
    assert!(kept > MAX_COLLECTED_OUTPUT / 2);
}

#[test]
fn a_peer_that_streams_forever_hits_the_deadline() {
    let (_dir, mut client) = peer(|_, s| {
        // A byte every 10 ms: no single read ever waits long.
        while send(s, &Response::Stdout(vec![b'.'])) {
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let t = Instant::now();

    let r = client.exec_streaming(&ExecRequest::default(), Duration::from_millis(500), |_| {});

    assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_peer_that_never_answers_times_out() {
    let (_dir, mut client) = peer(|_, s| {
        std::thread::sleep(Duration::from_secs(10));
        let _ = s;
    });
    client.set_call_timeout(Duration::from_millis(300)).unwrap();
    let t = Instant::now();

    let r = client.info();

    assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_file_that_never_ends_is_refused_at_the_callers_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // Every read answers 1 MiB and "not at the end".
        while let Ok(Request::ReadFile { .. }) =
            read_frame::<_, Request>(&mut s, AGENT_PROTOCOL_VERSION, AGENT_FRAME_CAP)
        {
            let r = Response::FileData {
                data: vec![7; 1 << 20],
                eof: false,
                size: 1,
            };
            if !send(&mut s, &r) {
                return;
            }
        }
    });
    let mut client = AgentClient::connect_unix(&path).unwrap();

    let r = client.read_file("/endless", 5 << 20);

    assert!(matches!(r, Err(ClientError::TooLarge(_))), "{r:?}");
}
