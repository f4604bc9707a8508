//! Framing robustness, shell commands, files and the small requests, over the real agent.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use common::TestAgent;
use fissile_agent::ClientError;
use fissile_proto::agent::{
    AGENT_FRAME_CAP, AGENT_PROTOCOL_VERSION, FailureKind, FileKind, Request, Response,
    ShellCommand, ShellRequest,
};
use fissile_proto::frame::{encode_frame, read_frame};

fn raw(agent: &TestAgent) -> UnixStream {
    UnixStream::connect(agent.sock()).unwrap()
}

fn read_response(s: &mut UnixStream) -> Response {
    read_frame(s, AGENT_PROTOCOL_VERSION, AGENT_FRAME_CAP).unwrap()
}

fn assert_bad_frame(r: Response) {
    assert!(
        matches!(
            r,
            Response::Failed {
                kind: FailureKind::BadFrame,
                ..
            }
        ),
        "{r:?}"
    );
}

fn script(s: &str) -> ShellRequest {
    ShellRequest {
        command: ShellCommand::Script(s.into()),
        cwd: None,
        env: BTreeMap::new(),
        stdin: Vec::new(),
        timeout_ms: None,
    }
}

#[test]
fn hostile_frames_are_refused_without_hurting_agent_or_repl() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    c.exec_code("before = 'kept'").unwrap();
    let echo = encode_frame(AGENT_PROTOCOL_VERSION, &Request::Echo { payload: vec![7] }).unwrap();

    // Recoverable: wrong version, undecodable payload, empty frame; the connection stays
    // usable and the next request is answered.
    let mut s = raw(&agent);
    let mut wrong_version = echo.clone();
    wrong_version[4] = 99;
    s.write_all(&wrong_version).unwrap();
    assert_bad_frame(read_response(&mut s));
    s.write_all(&[4, 0, 0, 0, AGENT_PROTOCOL_VERSION, 0xff, 0xff, 0xff])
        .unwrap();
    assert_bad_frame(read_response(&mut s));
    s.write_all(&[0, 0, 0, 0]).unwrap();
    assert_bad_frame(read_response(&mut s));
    s.write_all(&echo).unwrap();
    assert_eq!(read_response(&mut s), Response::EchoReply(vec![7]));

    // Oversize: refused before allocating, then the connection is closed.
    let mut s = raw(&agent);
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    assert_bad_frame(read_response(&mut s));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // Truncated: half a frame, then the client goes away.
    let mut s = raw(&agent);
    s.write_all(&echo[..echo.len() - 1]).unwrap();
    drop(s);

    // Pure garbage.
    let mut s = raw(&agent);
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    drop(s);

    let mut c2 = agent.client();
    assert_eq!(
        c2.exec_code("before").unwrap().result_text(),
        Some("'kept'")
    );
    assert_eq!(c2.echo(b"still here").unwrap(), b"still here");
}

#[test]
fn shell_concurrent_commands_run_at_the_same_time() {
    let agent = TestAgent::start();
    let flag = agent.path("flag");
    let mut a = agent.client();
    let mut b = agent.client();
    // A waits for a file that only B creates: this finishes only if both run at once.
    let mut wait = script(&format!(
        "echo waiting; while [ ! -e '{}' ]; do sleep 0.01; done; echo released",
        flag.display()
    ));
    wait.timeout_ms = Some(60_000);
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut tx = Some(tx);
        let mut out = Vec::new();
        let done = a
            .shell_streaming(&wait, Duration::from_secs(60), |r| {
                if let Response::Stdout(d) = r {
                    out.extend_from_slice(d);
                    if let Some(tx) = tx.take() {
                        tx.send(()).unwrap();
                    }
                }
            })
            .unwrap();
        (done, out)
    });
    rx.recv().unwrap();
    let touch = b
        .shell(&script(&format!("touch '{}'", flag.display())))
        .unwrap();
    assert_eq!(touch.done.exit_status, Some(0));
    let (done, out) = waiter.join().unwrap();
    assert!(!done.timed_out);
    assert_eq!(done.exit_status, Some(0));
    assert_eq!(out, b"waiting\nreleased\n");
}

#[test]
fn shell_argv_stdin_env_cwd_and_exit_status() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let mut cat = ShellRequest {
        command: ShellCommand::Argv(vec!["cat".into()]),
        cwd: None,
        env: BTreeMap::new(),
        stdin: (0..=255u8).collect(),
        timeout_ms: Some(30_000),
    };
    let out = c.shell(&cat).unwrap();
    assert_eq!(out.stdout, (0..=255u8).collect::<Vec<_>>());
    assert_eq!(out.done.exit_status, Some(0));

    cat.command = ShellCommand::Argv(vec![
        "sh".into(),
        "-c".into(),
        "echo $V; pwd; exit 3".into(),
    ]);
    cat.stdin.clear();
    cat.env.insert("V".into(), "from-env".into());
    cat.cwd = Some("/".into());
    let out = c.shell(&cat).unwrap();
    assert_eq!(out.stdout, b"from-env\n/\n");
    assert_eq!(out.done.exit_status, Some(3));

    let missing = ShellRequest {
        command: ShellCommand::Argv(vec!["no-such-program-fissile".into()]),
        ..script("")
    };
    let out = c.shell(&missing).unwrap();
    assert_eq!(out.done.exit_status, Some(127));
    assert!(!out.stderr.is_empty());

    let empty = ShellRequest {
        command: ShellCommand::Argv(vec![]),
        ..script("")
    };
    assert!(matches!(
        c.shell(&empty),
        Err(ClientError::Failed {
            kind: FailureKind::BadRequest,
            ..
        })
    ));
}

#[test]
fn shell_timeout_kills_the_process_group() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let mut req = script("sleep 60 & sleep 60; echo never");
    req.timeout_ms = Some(200);
    let out = c.shell(&req).unwrap();
    assert!(out.done.timed_out);
    assert_eq!(out.done.signal, Some(9));
    assert!(out.stdout.is_empty());
}

#[test]
fn files_binary_round_trip_list_and_remove() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let dir = agent.path("sub/dir");
    let path = dir.join("blob.bin");
    let path = path.to_str().unwrap();
    // 20 MiB of every byte value: more than one frame's worth, so it is chunked.
    let data: Vec<u8> = (0..(20usize << 20)).map(|i| (i * 31 % 251) as u8).collect();
    c.write_file(path, &data, Some(0o600)).unwrap();
    assert_eq!(c.read_file(path, 1 << 30).unwrap(), data);

    c.write_file_part(path, b"\x00tail\xff", true, None)
        .unwrap();
    let grown = c.read_file(path, 1 << 30).unwrap();
    assert_eq!(&grown[data.len()..], b"\x00tail\xff");

    let entries = c.list_dir(dir.to_str().unwrap()).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].name, "blob.bin");
    assert_eq!(entries[0].kind, FileKind::File);
    assert_eq!(entries[0].size, data.len() as u64 + 6);
    assert_eq!(entries[0].mode, 0o600);

    let parent = agent.path("sub");
    let parent = parent.to_str().unwrap();
    assert!(matches!(
        c.remove(parent, false),
        Err(ClientError::Failed {
            kind: FailureKind::Conflict,
            ..
        })
    ));
    c.remove(parent, true).unwrap();
    assert!(matches!(
        c.read_file(path, 1 << 30),
        Err(ClientError::Failed {
            kind: FailureKind::NotFound,
            ..
        })
    ));
}

#[test]
fn info_echo_and_host_mode_limits() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    assert_eq!(c.echo(b"").unwrap(), b"");
    c.exec_code("1").unwrap();
    let info = c.info().unwrap();
    assert_eq!(info.protocol_version, AGENT_PROTOCOL_VERSION);
    assert!(!info.guest_mode);
    assert_eq!(info.pid, agent.pid());
    assert_eq!(info.execution_count, 1);
    assert!(info.python_version.unwrap().starts_with('3'));
    assert!(!c.interrupt().unwrap());
    assert!(matches!(
        c.after_restore(&[1; 32], 0),
        Err(ClientError::Failed {
            kind: FailureKind::Unsupported,
            ..
        })
    ));
    // The pipelined wake-up reports the same refusal and leaves the connection in step
    // (the Info answer behind it was read too).
    assert!(matches!(
        c.wake(&[1; 32], 0),
        Err(ClientError::Failed {
            kind: FailureKind::Unsupported,
            ..
        })
    ));
    assert_eq!(c.echo(b"in step").unwrap(), b"in step");
    assert_eq!(c.info().unwrap().pid, agent.pid());
}

#[test]
fn poweroff_in_host_mode_stops_the_agent() {
    let mut agent = TestAgent::start();
    let mut c = agent.client();
    c.poweroff().unwrap();
    let status = agent.child.wait().unwrap();
    assert!(status.success());
}
