//! The Python REPL over the real agent binary (host mode, unix socket, real CPython).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Duration;

use common::TestAgent;
use fissile_proto::agent::{ExecRequest, INTERPRETER_RESTARTED, Request, Response};

fn exec_with_timeout(code: &str, timeout_ms: u64) -> ExecRequest {
    ExecRequest {
        code: code.into(),
        timeout_ms: Some(timeout_ms),
        env: BTreeMap::new(),
    }
}

/// Text of the stdout/stderr responses in arrival order, each tagged with its stream.
fn tagged_output(outputs: &[Response]) -> String {
    let mut s = String::new();
    for r in outputs {
        match r {
            Response::Stdout(d) => s.push_str(&format!("[out]{}", String::from_utf8_lossy(d))),
            Response::Stderr(d) => s.push_str(&format!("[err]{}", String::from_utf8_lossy(d))),
            _ => {}
        }
    }
    s
}

#[test]
fn exec_variables_and_imports_persist_across_calls() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let first = c.exec_code("import math\nx = 41").unwrap();
    assert!(first.error().is_none(), "{:?}", first.outputs);
    assert_eq!(first.done.execution_count, 1);
    // A new connection talks to the same interpreter.
    let mut c2 = agent.client();
    let second = c2.exec_code("x + 1 + int(math.sqrt(0))").unwrap();
    assert_eq!(second.result_text(), Some("42"));
    assert_eq!(second.done.execution_count, 2);
    assert!(!second.done.state_lost);
}

#[test]
fn exec_last_expression_value_is_returned() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    assert_eq!(c.exec_code("1+1").unwrap().result_text(), Some("2"));
    assert_eq!(c.exec_code("'a' * 3").unwrap().result_text(), Some("'aaa'"));
    // Statements, None and a trailing assignment return nothing.
    assert!(c.exec_code("y = 3").unwrap().result().is_none());
    assert!(c.exec_code("None").unwrap().result().is_none());
    assert!(c.exec_code("print('p')").unwrap().result().is_none());
    // Objects with _repr_html_ (DataFrames) also come back as text/html.
    let code = "class T:\n    def __repr__(self): return 'T()'\n    def _repr_html_(self): return '<b>T</b>'\nT()";
    let out = c.exec_code(code).unwrap();
    let bundle = out.result().unwrap();
    assert_eq!(bundle.text("text/plain"), Some("T()"));
    assert_eq!(bundle.text("text/html"), Some("<b>T</b>"));
}

#[test]
fn exec_stdout_and_stderr_interleaving_is_preserved() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let code =
        "import sys\nfor i in range(3):\n    print(f'o{i}')\n    print(f'e{i}', file=sys.stderr)\n";
    let out = c.exec_code(code).unwrap();
    assert_eq!(
        tagged_output(&out.outputs),
        "[out]o0\n[err]e0\n[out]o1\n[err]e1\n[out]o2\n[err]e2\n"
    );
}

#[test]
fn exec_fd_level_output_of_children_arrives_before_done() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let code = "import os, subprocess\nos.write(1, b'fd1\\n')\nos.write(2, b'fd2\\n')\nsubprocess.run(['echo', 'child'])\nos.system('echo shell >&2')";
    let out = c.exec_code(code).unwrap();
    assert_eq!(out.stdout(), "fd1\nchild\n");
    assert_eq!(out.stderr(), "fd2\nshell\n");
}

#[test]
fn exec_output_streams_while_the_cell_runs() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    assert_output_streams(&agent, &mut c, "go");
}

/// Runs a cell that prints a line without flushing and then waits for a file that the test
/// creates only after it has seen that line: if output did not stream (the flusher's timer
/// did not send it), the cell would hit its timeout.
fn assert_output_streams(agent: &TestAgent, c: &mut fissile_agent::AgentClient, name: &str) {
    let flag = agent.path(name);
    let code = format!(
        "import os, time\nprint('waiting')\nwhile not os.path.exists({flag:?}):\n    time.sleep(0.005)\nprint('after')",
    );
    let mut seen = Vec::new();
    let done = c
        .exec_streaming(
            &exec_with_timeout(&code, 60_000),
            Duration::from_secs(120),
            |r| {
                if let Response::Stdout(d) = r {
                    if d.starts_with(b"waiting") {
                        std::fs::write(&flag, b"").unwrap();
                    }
                    seen.push(String::from_utf8_lossy(d).into_owned());
                }
            },
        )
        .unwrap();
    assert!(
        !done.timed_out,
        "output did not stream before the cell ended"
    );
    assert_eq!(seen.concat(), "waiting\nafter\n");
}

/// An idle interpreter sleeps: its output flusher waits for output rather than waking on a
/// timer (which would wake an idle sandbox's guest 50 times a second), and still streams
/// output on its timer afterwards.
#[test]
fn an_idle_interpreter_wakes_nobody() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let pid = c.exec_code("import os\nos.getpid()").unwrap();
    let pid = pid.result_text().unwrap().to_string();
    // The flusher has sent output on its timer, then has nothing more to do.
    assert_output_streams(&agent, &mut c, "first");
    // Context switches of every thread of the interpreter's process.
    let switches = || -> u64 {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        tasks
            .flatten()
            .map(|t| std::fs::read_to_string(t.path().join("status")).unwrap_or_default())
            .flat_map(|s| {
                s.lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    };
    std::thread::sleep(Duration::from_millis(200));
    let before = switches();
    std::thread::sleep(Duration::from_secs(1));
    let woke = switches() - before;
    assert!(
        woke < 10,
        "an idle interpreter woke {woke} times in a second"
    );
    // After the idle spell the timer still sends output while a cell runs.
    assert_output_streams(&agent, &mut c, "again");
}

/// A trace hook that prints from inside the interpreter's own output path (here as a
/// `threading.Condition` is entered, with its lock held, as waking the flusher through a
/// `threading.Event` did: that hung the cell) does not hang it: waking the flusher takes
/// no lock written in Python, which a nested write could find held.
#[test]
fn a_trace_hook_that_prints_does_not_hang_output() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let code = "import sys\nn = [0]\ndef tr(frame, event, arg):\n    if event == 'return' and frame.f_code.co_name == '__enter__' and type(frame.f_locals.get('self')).__name__ == 'Condition' and n[0] < 5:\n        n[0] += 1\n        print('r', end='')\n    return tr\nsys.settrace(tr)\nprint('x', end='')\nsys.settrace(None)\nn[0]";
    let out = c.exec(&exec_with_timeout(code, 20_000)).unwrap();
    assert!(!out.done.timed_out, "the cell hung");
    assert!(out.error().is_none(), "{:?}", out.error());
    assert!(out.stdout().contains('x'), "{:?}", out.stdout());
}

#[test]
fn exec_exception_returns_traceback_without_driver_frames() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let out = c.exec_code("def f():\n    return 1/0\nf()").unwrap();
    let (ename, evalue, tb) = out.error().unwrap();
    assert_eq!(ename, "ZeroDivisionError");
    assert_eq!(evalue, "division by zero");
    let text = tb.join("\n");
    assert!(text.contains("<cell-1>"), "{text}");
    assert!(text.contains("return 1/0"), "{text}");
    assert!(
        !text.contains("_fissile_main") && !text.contains("run_cell"),
        "{text}"
    );
    assert!(!out.done.state_lost);
}

#[test]
fn exec_syntax_error_is_reported() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let out = c.exec_code("def (:\n").unwrap();
    let (ename, _, tb) = out.error().unwrap();
    assert_eq!(ename, "SyntaxError");
    assert!(!tb.is_empty());
    // The interpreter is fine afterwards.
    assert_eq!(c.exec_code("2*3").unwrap().result_text(), Some("6"));
}

#[test]
fn exec_input_fails_at_once_with_a_clear_error() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let out = c.exec_code("input('name? ')").unwrap();
    let (ename, evalue, _) = out.error().unwrap();
    assert_eq!(ename, "RuntimeError");
    assert!(evalue.contains("input() is not supported"), "{evalue}");
}

#[test]
fn exec_env_overrides_apply_to_one_cell_only() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let mut req = ExecRequest {
        code: "import os\nos.environ['FISSILE_T']".into(),
        ..ExecRequest::default()
    };
    req.env.insert("FISSILE_T".into(), "v1".into());
    assert_eq!(c.exec(&req).unwrap().result_text(), Some("'v1'"));
    let after = c.exec_code("os.environ.get('FISSILE_T')").unwrap();
    assert!(after.result().is_none());
}

#[test]
fn exec_timeout_interrupts_and_keeps_state() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    c.exec_code("kept = 7").unwrap();
    let out = c
        .exec(&exec_with_timeout("import time\ntime.sleep(60)", 300))
        .unwrap();
    assert!(out.done.timed_out);
    assert!(!out.done.state_lost);
    assert_eq!(out.error().unwrap().0, "KeyboardInterrupt");
    assert_eq!(c.exec_code("kept").unwrap().result_text(), Some("7"));
}

#[test]
fn exec_timeout_interrupts_a_top_level_await_and_the_loop_keeps_working() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    c.exec_code("import asyncio\nkept = 7").unwrap();
    let out = c
        .exec(&exec_with_timeout("await asyncio.sleep(60)", 300))
        .unwrap();
    assert!(out.done.timed_out);
    assert!(!out.done.state_lost);
    assert_eq!(out.error().unwrap().0, "KeyboardInterrupt");
    let again = c.exec_code("await asyncio.sleep(0.01)\nkept + 1").unwrap();
    assert!(again.error().is_none(), "{:?}", again.error());
    assert_eq!(again.result_text(), Some("8"));
}

#[test]
fn a_connection_is_reusable_until_the_agent_closes_it() {
    let mut agent = TestAgent::start();
    let mut c = agent.client();
    assert!(c.is_idle_and_open());
    assert_eq!(c.exec_code("1+1").unwrap().result_text(), Some("2"));
    assert!(
        c.is_idle_and_open(),
        "a connection is idle after a whole exec"
    );
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.is_idle_and_open() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!c.is_idle_and_open(), "a closed connection is not reusable");
}

#[test]
fn exec_ignoring_interrupt_restarts_interpreter_and_says_state_was_lost() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    c.exec_code("lost = 1").unwrap();
    let code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)";
    let out = c.exec(&exec_with_timeout(code, 200)).unwrap();
    assert!(out.done.timed_out);
    assert!(out.done.state_lost);
    let (ename, evalue, _) = out.error().unwrap();
    assert_eq!(ename, INTERPRETER_RESTARTED);
    assert!(
        evalue.contains("state") && evalue.contains("lost"),
        "{evalue}"
    );
    let after = c.exec_code("lost").unwrap();
    assert_eq!(after.error().unwrap().0, "NameError");
    assert_eq!(after.done.execution_count, 1);
}

#[test]
fn exec_crash_restarts_interpreter_and_reports_it() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    c.exec_code("gone = 1").unwrap();
    let out = c
        .exec_code("import os\nprint('bye', flush=True)\nos._exit(3)")
        .unwrap();
    assert!(out.done.state_lost);
    let (ename, evalue, _) = out.error().unwrap();
    assert_eq!(ename, INTERPRETER_RESTARTED);
    assert!(evalue.contains("exited with status 3"), "{evalue}");
    assert_eq!(
        c.exec_code("'gone' in dir()").unwrap().result_text(),
        Some("False")
    );

    let segv = c.exec_code("import ctypes\nctypes.string_at(0)").unwrap();
    assert!(segv.done.state_lost);
    let (_, evalue, _) = segv.error().unwrap();
    assert!(evalue.contains("SIGSEGV"), "{evalue}");
    assert_eq!(c.exec_code("40+2").unwrap().result_text(), Some("42"));
}

#[test]
fn exec_interrupt_request_from_another_connection_keeps_state() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    c.exec_code("kept = 'yes'").unwrap();
    let (tx, rx) = mpsc::channel();
    let mut other = agent.client();
    let interrupter = std::thread::spawn(move || {
        rx.recv().unwrap();
        other.interrupt().unwrap()
    });
    let code = "import time\nprint('started', flush=True)\ntime.sleep(60)";
    let mut tx = Some(tx);
    let mut outputs = Vec::new();
    let done = c
        .exec_streaming(
            &exec_with_timeout(code, 30_000),
            Duration::from_secs(120),
            |r| {
                if matches!(r, Response::Stdout(_))
                    && let Some(tx) = tx.take()
                {
                    tx.send(()).unwrap();
                }
                outputs.push(r.clone());
            },
        )
        .unwrap();
    assert!(interrupter.join().unwrap(), "no cell was running");
    assert!(!done.timed_out && !done.state_lost);
    assert!(
        outputs
            .iter()
            .any(|r| matches!(r, Response::Error { ename, .. } if ename == "KeyboardInterrupt"))
    );
    assert_eq!(c.exec_code("kept").unwrap().result_text(), Some("'yes'"));
}

/// A client that goes away while its cell runs (closes its connection without a word) gets
/// the cell interrupted, as an explicit Interrupt would: the REPL keeps its state, and the
/// next client's cell does not wait for the abandoned one to run out.
#[test]
fn exec_of_a_client_that_went_away_is_interrupted_and_state_kept() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    c.exec_code("kept = 'yes'").unwrap();
    let (tx, rx) = mpsc::channel();
    let code = "import time\n\
                try:\n    print('started', flush=True)\n    time.sleep(300)\n\
                except KeyboardInterrupt:\n    abandoned = 'interrupted'";
    let abandoned = std::thread::spawn(move || {
        // Reads until the cell started, then drops the connection mid-cell.
        let _ = c.exec_streaming(
            &exec_with_timeout(code, 600_000),
            Duration::from_secs(600),
            |r| {
                if matches!(r, Response::Stdout(_)) {
                    tx.send(()).unwrap();
                    panic!("the client goes away here");
                }
            },
        );
    });
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(
        abandoned.join().is_err(),
        "the client thread ended by its panic"
    );
    // The next client is served once the abandoned cell was interrupted (well before its
    // 300 s sleep or its 600 s timeout), and sees what the interrupt left.
    let mut next = agent.client();
    let out = next
        .exec_streaming(
            &exec_with_timeout("abandoned, kept", 60_000),
            Duration::from_secs(120),
            |_| {},
        )
        .unwrap();
    assert!(!out.timed_out, "the next cell did not run");
    let v = next.exec_code("abandoned, kept").unwrap();
    assert_eq!(v.result_text(), Some("('interrupted', 'yes')"));
}

#[test]
fn exec_second_exec_is_queued_until_the_first_ends() {
    let agent = TestAgent::start();
    let flag = agent.path("release");
    let mut a = agent.client();
    let mut b = agent.client();
    let (started_tx, started_rx) = mpsc::channel();
    let code = format!(
        "import os, time\nprint('first running', flush=True)\nwhile not os.path.exists({flag:?}):\n    time.sleep(0.005)\n'first'"
    );
    let first = std::thread::spawn(move || {
        let mut tx = Some(started_tx);
        let mut result = None;
        let done = a
            .exec_streaming(
                &exec_with_timeout(&code, 60_000),
                Duration::from_secs(120),
                |r| match r {
                    Response::Stdout(_) => {
                        if let Some(tx) = tx.take() {
                            tx.send(()).unwrap();
                        }
                    }
                    Response::ExecuteResult(m) => result = m.text("text/plain").map(String::from),
                    _ => {}
                },
            )
            .unwrap();
        (done, result)
    });
    started_rx.recv().unwrap();
    // Sent while the first cell runs: it waits for its turn instead of being refused.
    b.send(&Request::Exec(ExecRequest {
        code: "'second'".into(),
        ..ExecRequest::default()
    }))
    .unwrap();
    std::fs::write(&flag, b"").unwrap();
    let (first_done, first_result) = first.join().unwrap();
    assert_eq!(first_result.as_deref(), Some("'first'"));
    let mut second_result = None;
    loop {
        match b.recv().unwrap() {
            Response::ExecuteResult(m) => second_result = m.text("text/plain").map(String::from),
            Response::Done(d) => {
                assert_eq!(d.execution_count, first_done.execution_count + 1);
                break;
            }
            r => assert!(!r.is_terminal(), "{r:?}"),
        }
    }
    assert_eq!(second_result.as_deref(), Some("'second'"));
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&png[12..16], b"IHDR");
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
    (w, h)
}

fn require_matplotlib(c: &mut fissile_agent::AgentClient) {
    let probe = c.exec_code("import matplotlib, numpy").unwrap();
    if let Some((ename, evalue, _)) = probe.error() {
        panic!(
            "the host python3 lacks matplotlib/numpy ({ename}: {evalue}); \
             install them with `python3 -m pip install numpy matplotlib`"
        );
    }
}

#[test]
fn exec_matplotlib_figure_comes_back_as_png() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    require_matplotlib(&mut c);
    // 4 x 3 inches at 100 dpi: at most 400 x 300 pixels (tight bounding box).
    let code = "import numpy as np\nimport matplotlib.pyplot as plt\nfig = plt.figure(figsize=(4, 3), dpi=100)\nplt.plot(np.arange(10) ** 2)\nplt.title('squares')";
    let out = c.exec_code(code).unwrap();
    assert!(out.error().is_none(), "{:?}", out.error());
    let displays = out.displays();
    assert_eq!(displays.len(), 1, "{:?}", out.outputs);
    let (w, h) = png_size(displays[0].get("image/png").unwrap());
    assert!(
        (200..=400).contains(&w) && (150..=300).contains(&h),
        "{w}x{h}"
    );
    assert!(displays[0].text("text/plain").unwrap().contains("Figure"));
    // The figure was closed: the next cell shows nothing.
    assert!(c.exec_code("1").unwrap().displays().is_empty());
}

#[test]
fn exec_plt_show_emits_the_figure_immediately() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    require_matplotlib(&mut c);
    let code = "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()\nprint('after show')";
    let out = c.exec_code(code).unwrap();
    let kinds: Vec<&str> = out
        .outputs
        .iter()
        .map(|r| match r {
            Response::Display(_) => "display",
            Response::Stdout(_) => "stdout",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, vec!["display", "stdout"], "{:?}", out.outputs);
}

#[test]
fn exec_10_mb_of_output_streams_in_bounded_memory() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    // 10 MiB through print() (event pipe) and 10 MiB through fd 1 directly.
    let code = "import os, sys\nline = 'x' * 1023 + '\\n'\nfor _ in range(10 * 1024):\n    sys.stdout.write(line)\nos.write(1, b'y' * (10 << 20))";
    let mut bytes = 0usize;
    let mut largest = 0usize;
    let done = c
        .exec_streaming(
            &ExecRequest {
                code: code.into(),
                ..ExecRequest::default()
            },
            std::time::Duration::from_secs(300),
            |r| {
                if let Response::Stdout(d) = r {
                    bytes += d.len();
                    largest = largest.max(d.len());
                }
            },
        )
        .unwrap();
    assert!(!done.state_lost);
    assert_eq!(bytes, 20 << 20);
    assert!(largest <= fissile_proto::agent::STREAM_CHUNK_MAX);
    // The agent never held the cell's output: its peak RSS stays far below 20 MiB + base.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(hwm_kb < 48 * 1024, "agent peak RSS {hwm_kb} kB");
}

#[test]
fn exec_client_disconnect_mid_exec_leaves_agent_healthy() {
    let agent = TestAgent::start();
    {
        let mut c = agent.client();
        c.exec_code("survivor = 5").unwrap();
        c.send(&Request::Exec(ExecRequest {
            code: "for i in range(100000):\n    print(i)".into(),
            ..ExecRequest::default()
        }))
        .unwrap();
        assert!(matches!(c.recv().unwrap(), Response::Stdout(_)));
        // Dropped here, mid-stream.
    }
    let mut c = agent.client();
    assert_eq!(c.exec_code("survivor").unwrap().result_text(), Some("5"));
    assert_eq!(c.echo(b"alive").unwrap(), b"alive");
}
