//! Shell commands: each runs in its own process group, concurrently with everything else;
//! output is streamed in chunks as it is produced; a timeout kills the whole group.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fissile_proto::agent::{
    Done, FailureKind, Response, STREAM_CHUNK_MAX, ShellCommand, ShellRequest,
};

use crate::reaper;
use crate::sys::{self, ChildExit};

/// How often to look for the command's exit while its pipes are still open (only matters
/// when a background process keeps them open after the command exited).
const EXIT_CHECK: Duration = Duration::from_millis(50);
/// How long to keep reading after the command exited, for a background writer.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

fn build(req: &ShellRequest) -> Result<Command, String> {
    let mut cmd = Command::new("/bin/sh");
    match &req.command {
        ShellCommand::Script(s) => {
            cmd.arg("-c").arg(s);
        }
        ShellCommand::Argv(argv) if argv.is_empty() => return Err("empty argv".into()),
        // Through `sh -c 'exec "$@"'`: std's exec-failure path waits for the child itself,
        // which must not race with the reaper. sh reports a missing program (status 127).
        ShellCommand::Argv(argv) => {
            cmd.args(["-c", "exec \"$@\"", "fissile-argv"]).args(argv);
        }
    }
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    cmd.envs(&req.env)
        .stdin(if req.stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if crate::init::user_cgroup_ready() {
        // SAFETY: open/write/close on a static path, all async-signal-safe.
        unsafe {
            cmd.pre_exec(|| crate::sys::join_cgroup_in_child(crate::init::USER_CGROUP_PROCS))
        };
    }
    Ok(cmd)
}

/// Runs one command; every response goes to `sink`, which returns false once the client is
/// gone (the command's process group is then killed).
pub(crate) fn run(req: &ShellRequest, sink: &mut dyn FnMut(Response) -> bool) {
    let start = Instant::now();
    if let Some(cwd) = &req.cwd
        && !std::path::Path::new(cwd).is_dir()
    {
        sink(Response::Failed {
            kind: FailureKind::NotFound,
            message: format!("working directory {cwd} does not exist"),
        });
        return;
    }
    let mut cmd = match build(req) {
        Ok(c) => c,
        Err(message) => {
            sink(Response::Failed {
                kind: FailureKind::BadRequest,
                message,
            });
            return;
        }
    };
    let (mut child, exit_rx) = match reaper::spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            sink(Response::Failed {
                kind: FailureKind::Io,
                message: format!("cannot spawn /bin/sh: {e}"),
            });
            return;
        }
    };
    let pgid = i32::try_from(child.id()).unwrap_or(0);
    if let Some(mut stdin) = child.stdin.take() {
        let data = req.stdin.clone();
        // The command may not read its stdin: write from a thread, so it cannot block us.
        let _ = std::thread::Builder::new()
            .name("shell-stdin".into())
            .spawn(move || {
                let _ = stdin.write_all(&data);
            });
    }
    let pipes = [
        child.stdout.take().map(|p| File::from(OwnedFd::from(p))),
        child.stderr.take().map(|p| File::from(OwnedFd::from(p))),
    ];
    let deadline = req.timeout_ms.map(|t| start + Duration::from_millis(t));
    let outcome = pump(pipes, &exit_rx, deadline, pgid, sink);
    let duration_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let (exit_status, signal) = match outcome.exit {
        Some(ChildExit::Exited(c)) => (Some(c), None),
        Some(ChildExit::Signaled(s)) => (None, Some(s)),
        None => (None, None),
    };
    sink(Response::Done(Done {
        execution_count: 0,
        duration_ns,
        exit_status,
        signal,
        timed_out: outcome.timed_out,
        state_lost: false,
    }));
}

struct Outcome {
    exit: Option<ChildExit>,
    timed_out: bool,
}

fn kill_group(pgid: i32) {
    if pgid > 0 {
        let _ = sys::kill(-pgid, libc::SIGKILL);
    }
}

fn pump(
    mut pipes: [Option<File>; 2],
    exit_rx: &crossbeam_channel::Receiver<ChildExit>,
    mut deadline: Option<Instant>,
    pgid: i32,
    sink: &mut dyn FnMut(Response) -> bool,
) -> Outcome {
    let mut exit = None;
    let mut timed_out = false;
    let mut exited_at: Option<Instant> = None;
    let mut buf = vec![0u8; STREAM_CHUNK_MAX];
    loop {
        if exit.is_none() {
            exit = exit_rx.try_recv().ok();
            if exit.is_some() {
                exited_at = Some(Instant::now());
            }
        }
        let open: Vec<usize> = (0..2).filter(|&i| pipes[i].is_some()).collect();
        if open.is_empty() {
            break;
        }
        if exited_at.is_some_and(|t| t.elapsed() >= DRAIN_AFTER_EXIT) {
            break;
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            kill_group(pgid);
            timed_out = true;
            deadline = None;
        }
        let mut wait = EXIT_CHECK;
        if let Some(d) = deadline {
            wait = wait.min(d.saturating_duration_since(now));
        }
        let fds: Vec<i32> = open
            .iter()
            .filter_map(|&i| pipes[i].as_ref().map(|f| f.as_raw_fd()))
            .collect();
        let ready = match sys::poll_readable(&fds, Some(wait)) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "poll failed");
                break;
            }
        };
        for (k, &i) in open.iter().enumerate() {
            if !ready[k] {
                continue;
            }
            let Some(f) = pipes[i].as_mut() else { continue };
            match f.read(&mut buf) {
                Ok(0) => pipes[i] = None,
                Ok(n) => {
                    let d = buf[..n].to_vec();
                    let r = if i == 0 {
                        Response::Stdout(d)
                    } else {
                        Response::Stderr(d)
                    };
                    if !sink(r) {
                        kill_group(pgid);
                        return Outcome {
                            exit: exit_rx.recv_timeout(Duration::from_secs(5)).ok(),
                            timed_out,
                        };
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => pipes[i] = None,
            }
        }
    }
    if exit.is_none() {
        exit = match deadline {
            Some(d) => match exit_rx.recv_deadline(d) {
                Ok(e) => Some(e),
                Err(_) => {
                    kill_group(pgid);
                    timed_out = true;
                    exit_rx.recv_timeout(Duration::from_secs(5)).ok()
                }
            },
            None => exit_rx.recv().ok(),
        };
    }
    Outcome { exit, timed_out }
}
