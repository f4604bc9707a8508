//! The persistent Python REPL: one interpreter process running `driver.py`, one cell at a
//! time (FIFO queue), output streamed as it is produced.
//!
//! The agent owns the interpreter's fd 1 and fd 2 (pipes), so fd-level output of C
//! extensions and child processes is captured; Python-level `sys.stdout`/`sys.stderr` are
//! replaced by the driver with writers that send ordered events over fd 4. At the end of a
//! cell the driver writes a per-process sentinel to fd 1 and fd 2 and then a `done` event;
//! the agent waits (bounded) for both sentinels before sending `Done`, so no fd-level output
//! of the cell arrives after its `Done`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use fissile_proto::agent::{
    Done, ExecRequest, FailureKind, INTERPRETER_RESTARTED, INTERRUPT_GRACE_MS, MimeBundle,
    Response, STREAM_CHUNK_MAX,
};
use serde::Deserialize;

use crate::reaper;
use crate::sys::{self, ChildExit};

const DRIVER: &str = include_str!("driver.py");
/// Longest event line accepted from the driver (a big PNG, base64).
const EVENT_LINE_CAP: usize = 12 << 20;
/// Output chunks buffered between the interpreter and the connection (bounded memory).
const OUTPUT_QUEUE: usize = 64;
/// How long to wait for the fd 1 / fd 2 sentinels after the driver said `done`.
const SENTINEL_WAIT: Duration = Duration::from_secs(2);
/// How often a running cell looks whether its client is still connected.
const PEER_CHECK: Duration = Duration::from_millis(200);
/// How long to wait for a killed interpreter's exit status.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout = 0,
    Stderr = 1,
}

/// A message from the interpreter's reader threads.
#[derive(Debug)]
enum ReplOut {
    Output(Stream, Vec<u8>),
    Sentinel(Stream),
    Closed(Stream),
    Event(DriverEvent),
    EventsClosed,
}

/// An event line from the driver (see driver.py).
#[derive(Debug, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum DriverEvent {
    Ready {
        python: String,
    },
    Out {
        s: String,
        d: String,
    },
    Display {
        data: BTreeMap<String, String>,
    },
    Result {
        data: BTreeMap<String, String>,
    },
    Error {
        ename: String,
        evalue: String,
        tb: Vec<String>,
    },
    Done {
        #[allow(dead_code)]
        n: u64,
    },
}

/// Errors starting the interpreter.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnReplError {
    /// Creating the control pipes failed.
    #[error("cannot create the control pipes")]
    Pipes(#[source] io::Error),
    /// Spawning the process failed.
    #[error("cannot spawn the interpreter")]
    Spawn(#[source] io::Error),
    /// Starting a reader thread failed.
    #[error("cannot start an output reader thread")]
    Thread(#[source] io::Error),
}

/// A running interpreter.
struct Repl {
    pid: i32,
    commands: File,
    rx: Receiver<ReplOut>,
    exit: Receiver<ChildExit>,
    /// Sentinels seen on fd 1 and fd 2, and cells sent; equal counts mean all output of the
    /// cells so far has arrived.
    sentinels: [u64; 2],
    closed: [bool; 2],
    cells: u64,
}

impl Repl {
    fn spawn(python: &str) -> Result<Repl, SpawnReplError> {
        let sentinel = make_sentinel();
        let (cmd_read, cmd_write) = sys::pipe().map_err(SpawnReplError::Pipes)?;
        let (ev_read, ev_write) = sys::pipe().map_err(SpawnReplError::Pipes)?;
        // Above 3 and 4, so the dup2s in the child cannot clobber each other.
        let child_cmd = sys::dup_above(&cmd_read, 10).map_err(SpawnReplError::Pipes)?;
        let child_ev = sys::dup_above(&ev_write, 10).map_err(SpawnReplError::Pipes)?;
        drop((cmd_read, ev_write));
        let pairs = [(child_cmd.as_raw_fd(), 3), (child_ev.as_raw_fd(), 4)];
        let mut cmd = Command::new("/bin/sh");
        // `sh -c 'exec "$@"'`: std's exec-failure path waits for the child itself, which
        // must not race with the reaper; /bin/sh always execs, and reports a missing python.
        cmd.args([
            "-c",
            "exec \"$@\"",
            "fissile-repl",
            python,
            "-u",
            "-c",
            DRIVER,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("FISSILE_SENTINEL", &sentinel)
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .process_group(0);
        let join_user = crate::init::user_cgroup_ready();
        // SAFETY: the hook only calls dup2 on descriptors that stay open in the parent until
        // spawn returns, and open/write/close on a static path: all async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                sys::map_fds_in_child(&pairs)?;
                if join_user {
                    sys::join_cgroup_in_child(crate::init::USER_CGROUP_PROCS)?;
                }
                Ok(())
            })
        };
        let (mut child, exit) = reaper::spawn(&mut cmd).map_err(SpawnReplError::Spawn)?;
        drop((child_cmd, child_ev));
        let pid = i32::try_from(child.id()).unwrap_or(0);
        let (tx, rx) = crossbeam_channel::bounded(OUTPUT_QUEUE);
        let out = child.stdout.take().map(OwnedFd::from);
        let err = child.stderr.take().map(OwnedFd::from);
        let spawn_reader = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map(|_| ())
                .map_err(SpawnReplError::Thread)
        };
        if let Some(fd) = out {
            let (tx, s) = (tx.clone(), sentinel.clone().into_bytes());
            spawn_reader(
                "repl-stdout",
                Box::new(move || pump_fd(fd, Stream::Stdout, &s, &tx)),
            )?;
        }
        if let Some(fd) = err {
            let (tx, s) = (tx.clone(), sentinel.clone().into_bytes());
            spawn_reader(
                "repl-stderr",
                Box::new(move || pump_fd(fd, Stream::Stderr, &s, &tx)),
            )?;
        }
        spawn_reader("repl-events", Box::new(move || pump_events(ev_read, &tx)))?;
        Ok(Repl {
            pid,
            commands: File::from(cmd_write),
            rx,
            exit,
            sentinels: [0; 2],
            closed: [false; 2],
            cells: 0,
        })
    }

    fn all_output_in(&self) -> bool {
        (0..2).all(|i| self.closed[i] || self.sentinels[i] >= self.cells)
    }

    /// Kills the whole process group and returns how the interpreter ended.
    fn kill(&self) -> Option<ChildExit> {
        if self.pid > 0 {
            let _ = sys::kill(-self.pid, libc::SIGKILL);
        }
        self.exit.recv_timeout(EXIT_WAIT).ok()
    }
}

fn make_sentinel() -> String {
    let mut raw = [0u8; 12];
    let random = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut raw));
    if random.is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        raw[..8].copy_from_slice(&(t as u64).to_le_bytes());
        raw[8..].copy_from_slice(&sys::getpid().to_le_bytes());
    }
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    format!("\u{1e}fissile-end-{hex}\u{1e}")
}

/// Splits a byte stream into output and sentinel markers; a sentinel may be split across
/// reads, so a tail that could be the start of one is held back until the next read.
#[derive(Debug)]
pub(crate) struct SentinelSplitter {
    sentinel: Vec<u8>,
    held: Vec<u8>,
}

/// One piece of a split stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    Data(Vec<u8>),
    Sentinel,
}

impl SentinelSplitter {
    pub(crate) fn new(sentinel: &[u8]) -> Self {
        SentinelSplitter {
            sentinel: sentinel.to_vec(),
            held: Vec::new(),
        }
    }

    /// Feeds bytes; returns the pieces that are complete.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Vec<Piece> {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(data);
        let mut pieces = Vec::new();
        let mut start = 0;
        while let Some(pos) = find(&buf[start..], &self.sentinel) {
            if pos > 0 {
                pieces.push(Piece::Data(buf[start..start + pos].to_vec()));
            }
            pieces.push(Piece::Sentinel);
            start += pos + self.sentinel.len();
        }
        let rest = &buf[start..];
        let keep = (1..self.sentinel.len().min(rest.len() + 1))
            .rev()
            .find(|&k| rest.ends_with(&self.sentinel[..k]))
            .unwrap_or(0);
        let cut = rest.len() - keep;
        if cut > 0 {
            pieces.push(Piece::Data(rest[..cut].to_vec()));
        }
        self.held = rest[cut..].to_vec();
        pieces
    }

    /// End of stream: whatever was held back is output.
    pub(crate) fn finish(&mut self) -> Option<Vec<u8>> {
        let held = std::mem::take(&mut self.held);
        (!held.is_empty()).then_some(held)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn pump_fd(fd: OwnedFd, stream: Stream, sentinel: &[u8], tx: &Sender<ReplOut>) {
    let mut f = File::from(fd);
    let mut splitter = SentinelSplitter::new(sentinel);
    let mut buf = vec![0u8; STREAM_CHUNK_MAX];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for piece in splitter.feed(&buf[..n]) {
            let msg = match piece {
                Piece::Data(d) => ReplOut::Output(stream, d),
                Piece::Sentinel => ReplOut::Sentinel(stream),
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
    }
    if let Some(rest) = splitter.finish() {
        let _ = tx.send(ReplOut::Output(stream, rest));
    }
    let _ = tx.send(ReplOut::Closed(stream));
}

fn pump_events(fd: OwnedFd, tx: &Sender<ReplOut>) {
    let mut r = BufReader::with_capacity(64 << 10, File::from(fd));
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line_capped(&mut r, &mut line, EVENT_LINE_CAP) {
            Ok(LineRead::Eof) | Err(_) => break,
            Ok(LineRead::TooLong) => {
                let msg = "fissile: dropped an output event larger than 12 MiB\n";
                let ev = DriverEvent::Out {
                    s: "stderr".into(),
                    d: msg.into(),
                };
                if tx.send(ReplOut::Event(ev)).is_err() {
                    return;
                }
            }
            Ok(LineRead::Line) => match serde_json::from_slice::<DriverEvent>(&line) {
                Ok(ev) => {
                    if tx.send(ReplOut::Event(ev)).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "undecodable driver event"),
            },
        }
    }
    let _ = tx.send(ReplOut::EventsClosed);
}

enum LineRead {
    Line,
    TooLong,
    Eof,
}

/// Reads one `\n`-terminated line into `line` (without the newline), never holding more
/// than `cap` bytes; a longer line is skipped up to its newline.
fn read_line_capped<R: BufRead>(r: &mut R, line: &mut Vec<u8>, cap: usize) -> io::Result<LineRead> {
    let mut too_long = false;
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(LineRead::Eof);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long && line.len() + chunk.len() <= cap {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
            line.clear();
        }
        let used = done.unwrap_or(buf.len());
        r.consume(used);
        if done.is_some() {
            return Ok(if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line
            });
        }
    }
}

/// FIFO ticket lock: execs run in arrival order.
#[derive(Debug, Default)]
struct FifoQueue {
    state: Mutex<(u64, u64)>,
    turn: Condvar,
}

struct Turn<'a>(&'a FifoQueue);

impl FifoQueue {
    fn wait_turn(&self) -> Turn<'_> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = s.0;
        s.0 += 1;
        while s.1 != ticket {
            s = self.turn.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        Turn(self)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 += 1;
        self.0.turn.notify_all();
    }
}

/// The agent's single REPL, shared by all connections.
#[derive(Debug)]
pub(crate) struct ReplManager {
    python: String,
    queue: FifoQueue,
    repl: Mutex<Option<ReplSlot>>,
    /// Pid of the interpreter while a cell runs, else 0 (for `Interrupt`).
    running: AtomicI32,
    execution_count: AtomicU64,
    python_version: Mutex<Option<String>>,
}

/// Wrapper so `ReplManager` can derive Debug.
struct ReplSlot(Repl);

impl std::fmt::Debug for ReplSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repl").field("pid", &self.0.pid).finish()
    }
}

/// How a cell's wait loop ended.
enum CellEnd {
    Finished,
    Died(Option<ChildExit>),
    Killed(Option<ChildExit>),
}

/// Per-cell bookkeeping.
struct CellRun<'s> {
    sink: &'s mut dyn FnMut(Response) -> bool,
    client_gone: bool,
    /// The client's connection, watched while the cell runs: when the client closes it,
    /// the cell is interrupted (nobody would see its output; the REPL's state stays).
    peer: Option<std::os::fd::RawFd>,
}

impl CellRun<'_> {
    fn send(&mut self, r: Response) {
        if !self.client_gone && !(self.sink)(r) {
            self.client_gone = true;
        }
    }

    fn send_output(&mut self, stream: Stream, data: &[u8]) {
        for chunk in data.chunks(STREAM_CHUNK_MAX) {
            let r = match stream {
                Stream::Stdout => Response::Stdout(chunk.to_vec()),
                Stream::Stderr => Response::Stderr(chunk.to_vec()),
            };
            self.send(r);
        }
    }
}

impl ReplManager {
    /// A manager for interpreters started as `python` (a path or a name on PATH); starts
    /// the first interpreter in the background of the first exec.
    pub(crate) fn new(python: String) -> Self {
        ReplManager {
            python,
            queue: FifoQueue::default(),
            repl: Mutex::new(None),
            running: AtomicI32::new(0),
            execution_count: AtomicU64::new(0),
            python_version: Mutex::new(None),
        }
    }

    /// Starts the interpreter now, so the first exec does not pay for it.
    pub(crate) fn prestart(&self) {
        let mut slot = self.repl.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            match Repl::spawn(&self.python) {
                Ok(r) => *slot = Some(ReplSlot(r)),
                Err(e) => tracing::error!(error = %e, "cannot start the Python interpreter"),
            }
        }
    }

    /// Cells run by the current interpreter.
    pub(crate) fn execution_count(&self) -> u64 {
        self.execution_count.load(Ordering::Relaxed)
    }

    /// `sys.version` of the interpreter, once known.
    pub(crate) fn python_version(&self) -> Option<String> {
        self.python_version
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends SIGINT to the running cell; false when no cell is running.
    pub(crate) fn interrupt(&self) -> bool {
        let pid = self.running.load(Ordering::SeqCst);
        pid > 0 && sys::signal_main_thread(pid, libc::SIGINT).is_ok()
    }

    /// Kills the interpreter's process group (agent shutdown).
    pub(crate) fn kill(&self) {
        if let Some(ReplSlot(r)) = self.repl.lock().unwrap_or_else(|p| p.into_inner()).take() {
            r.kill();
        }
    }

    /// Runs one cell, waiting for its turn; every response goes to `sink`, which returns
    /// false once the client is gone (the cell then still runs to its end, output dropped).
    pub(crate) fn exec(
        &self,
        req: &ExecRequest,
        sink: &mut dyn FnMut(Response) -> bool,
        peer: Option<std::os::fd::RawFd>,
    ) {
        let _turn = self.queue.wait_turn();
        let start = Instant::now();
        let mut run = CellRun {
            sink,
            client_gone: false,
            peer,
        };
        let taken = self.repl.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut repl = match taken {
            Some(ReplSlot(r)) => r,
            None => match Repl::spawn(&self.python) {
                Ok(r) => r,
                Err(e) => {
                    run.send(Response::Failed {
                        kind: FailureKind::Internal,
                        message: format!("{e}: {}", error_chain(&e)),
                    });
                    return;
                }
            },
        };
        let n = self.execution_count.load(Ordering::Relaxed) + 1;
        let cmd = serde_json::json!({"code": req.code, "env": req.env, "n": n});
        let mut line = cmd.to_string().into_bytes();
        line.push(b'\n');
        repl.cells += 1;
        let oom_kills = crate::init::user_oom_kills();
        self.running.store(repl.pid, Ordering::SeqCst);
        let (end, timed_out) = match repl.commands.write_all(&line) {
            Ok(()) => self.wait_cell(&mut repl, req.timeout_ms, &mut run),
            Err(_) => (CellEnd::Died(None), false),
        };
        self.running.store(0, Ordering::SeqCst);
        let duration_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut done = Done {
            execution_count: n,
            duration_ns,
            timed_out,
            ..Done::default()
        };
        let killed = matches!(end, CellEnd::Killed(_));
        match end {
            CellEnd::Finished => {
                self.execution_count.store(n, Ordering::Relaxed);
                *self.repl.lock().unwrap_or_else(|p| p.into_inner()) = Some(ReplSlot(repl));
            }
            CellEnd::Died(exit) | CellEnd::Killed(exit) => {
                let exit = exit.or_else(|| repl.kill());
                drain_briefly(&repl, &mut run);
                let how = match (killed, exit) {
                    (true, _) => format!(
                        "ignored KeyboardInterrupt for {} s and was killed",
                        INTERRUPT_GRACE_MS / 1000
                    ),
                    (false, Some(e)) if crate::init::user_oom_kills() > oom_kills => format!(
                        "{} by the out-of-memory killer: user code may use {} MiB of this \
                         sandbox's memory",
                        reaper::describe(e),
                        crate::init::user_memory_max() >> 20
                    ),
                    (false, Some(e)) => reaper::describe(e),
                    (false, None) => "stopped responding and was killed".to_string(),
                };
                run.send(Response::Error {
                    ename: INTERPRETER_RESTARTED.into(),
                    evalue: format!(
                        "The Python interpreter {how}. It has been restarted: all state \
                         (variables, imports, open files) from earlier cells was lost."
                    ),
                    traceback: Vec::new(),
                });
                self.execution_count.store(0, Ordering::Relaxed);
                *self
                    .python_version
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
                drop(repl);
                self.prestart();
                done.state_lost = true;
            }
        }
        run.send(Response::Done(done));
    }

    /// Forwards the cell's output until it is done; enforces the timeout.
    fn wait_cell(
        &self,
        repl: &mut Repl,
        timeout_ms: Option<u64>,
        run: &mut CellRun<'_>,
    ) -> (CellEnd, bool) {
        let start = Instant::now();
        let grace = Duration::from_millis(INTERRUPT_GRACE_MS);
        let mut deadline = timeout_ms.map(|t| start + Duration::from_millis(t));
        let mut interrupted = false;
        let mut got_done = false;
        loop {
            if got_done && repl.all_output_in() {
                return (CellEnd::Finished, interrupted);
            }
            // While the client is watched, wake at least every PEER_CHECK to look at it.
            let watch = run.peer.is_some() && !interrupted;
            let wake = match (deadline, watch) {
                (Some(d), true) => Some(d.min(Instant::now() + PEER_CHECK)),
                (None, true) => Some(Instant::now() + PEER_CHECK),
                (d, false) => d,
            };
            let msg = match wake {
                Some(w) => repl.rx.recv_deadline(w),
                None => repl.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            if matches!(msg, Err(RecvTimeoutError::Timeout))
                && deadline.is_none_or(|d| Instant::now() < d)
            {
                // A look at the client, not the deadline.
                if run.peer.is_some_and(sys::peer_closed) {
                    tracing::info!("the client went away: interrupting its cell");
                    run.client_gone = true;
                    run.peer = None;
                    let _ = sys::signal_main_thread(repl.pid, libc::SIGINT);
                    interrupted = true;
                    deadline = Some(Instant::now() + grace);
                }
                continue;
            }
            let msg = match msg {
                Ok(m) => m,
                Err(RecvTimeoutError::Disconnected) => return (CellEnd::Died(None), interrupted),
                Err(RecvTimeoutError::Timeout) if got_done => {
                    tracing::warn!("cell output sentinels did not arrive in time");
                    return (CellEnd::Finished, interrupted);
                }
                Err(RecvTimeoutError::Timeout) if !interrupted => {
                    let _ = sys::signal_main_thread(repl.pid, libc::SIGINT);
                    interrupted = true;
                    deadline = Some(Instant::now() + grace);
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {
                    return (CellEnd::Killed(repl.kill()), interrupted);
                }
            };
            if let Some(exit) = self.on_message(msg, repl, run, &mut got_done, &mut deadline) {
                return (CellEnd::Died(exit), interrupted);
            }
        }
    }

    /// Handles one message of the interpreter's; `Some` when it ended (with its exit, if
    /// known).
    fn on_message(
        &self,
        msg: ReplOut,
        repl: &mut Repl,
        run: &mut CellRun<'_>,
        got_done: &mut bool,
        deadline: &mut Option<Instant>,
    ) -> Option<Option<ChildExit>> {
        match msg {
            ReplOut::Output(s, d) => run.send_output(s, &d),
            ReplOut::Sentinel(s) => repl.sentinels[s as usize] += 1,
            ReplOut::Closed(s) => repl.closed[s as usize] = true,
            ReplOut::EventsClosed => return Some(repl.exit.recv_timeout(EXIT_WAIT).ok()),
            ReplOut::Event(DriverEvent::Done { .. }) => {
                *got_done = true;
                *deadline = Some(Instant::now() + SENTINEL_WAIT);
            }
            ReplOut::Event(ev) => self.forward_event(ev, run),
        }
        None
    }

    fn forward_event(&self, ev: DriverEvent, run: &mut CellRun<'_>) {
        match ev {
            DriverEvent::Ready { python } => {
                *self
                    .python_version
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(python);
            }
            DriverEvent::Out { s, d } => {
                let stream = if s == "stderr" {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                run.send_output(stream, d.as_bytes());
            }
            DriverEvent::Display { data } => run.send(Response::Display(bundle(data))),
            DriverEvent::Result { data } => run.send(Response::ExecuteResult(bundle(data))),
            DriverEvent::Error { ename, evalue, tb } => run.send(Response::Error {
                ename,
                evalue,
                traceback: tb,
            }),
            DriverEvent::Done { .. } => {}
        }
    }
}

/// Forwards what a dead interpreter wrote before dying (bounded in time).
fn drain_briefly(repl: &Repl, run: &mut CellRun<'_>) {
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut closed = repl.closed;
    while !(closed[0] && closed[1]) {
        match repl.rx.recv_deadline(deadline) {
            Ok(ReplOut::Output(s, d)) => run.send_output(s, &d),
            Ok(ReplOut::Closed(s)) => closed[s as usize] = true,
            Ok(ReplOut::Event(DriverEvent::Out { s, d })) => {
                let stream = if s == "stderr" {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                run.send_output(stream, d.as_bytes());
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

/// Driver MIME data -> bundle: `image/*` (except SVG) is base64, the rest is text.
fn bundle(data: BTreeMap<String, String>) -> MimeBundle {
    let b64 = base64::engine::general_purpose::STANDARD;
    let data = data
        .into_iter()
        .map(|(mime, v)| {
            let bytes = if mime.starts_with("image/") && mime != "image/svg+xml" {
                b64.decode(v.as_bytes()).unwrap_or_else(|_| v.into_bytes())
            } else {
                v.into_bytes()
            };
            (mime, bytes)
        })
        .collect();
    MimeBundle { data }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut src = e.source();
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(s: &mut SentinelSplitter, chunks: &[&[u8]]) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for c in chunks {
            for p in s.feed(c) {
                match (out.last_mut(), p) {
                    (Some(Piece::Data(prev)), Piece::Data(d)) => prev.extend(d),
                    (_, p) => out.push(p),
                }
            }
        }
        out
    }

    #[test]
    fn sentinel_split_across_reads_is_found() {
        let mut s = SentinelSplitter::new(b"<END>");
        let pieces = feed_all(&mut s, &[b"ab<E", b"N", b"D>cd<", b"x"]);
        assert_eq!(
            pieces,
            vec![
                Piece::Data(b"ab".to_vec()),
                Piece::Sentinel,
                Piece::Data(b"cd<x".to_vec())
            ]
        );
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn sentinel_partial_tail_is_released_at_finish() {
        let mut s = SentinelSplitter::new(b"<END>");
        assert_eq!(
            feed_all(&mut s, &[b"abc<EN"]),
            vec![Piece::Data(b"abc".to_vec())]
        );
        assert_eq!(s.finish(), Some(b"<EN".to_vec()));
    }

    #[test]
    fn two_sentinels_back_to_back_are_both_reported() {
        let mut s = SentinelSplitter::new(b"##");
        assert_eq!(
            feed_all(&mut s, &[b"####"]),
            vec![Piece::Sentinel, Piece::Sentinel]
        );
    }

    #[test]
    fn read_line_capped_skips_oversize_lines() {
        let data = b"short\nthis-line-is-too-long\nok\n";
        let mut r = BufReader::with_capacity(4, &data[..]);
        let mut line = Vec::new();
        assert!(matches!(
            read_line_capped(&mut r, &mut line, 8),
            Ok(LineRead::Line)
        ));
        assert_eq!(line, b"short");
        line.clear();
        assert!(matches!(
            read_line_capped(&mut r, &mut line, 8),
            Ok(LineRead::TooLong)
        ));
        line.clear();
        assert!(matches!(
            read_line_capped(&mut r, &mut line, 8),
            Ok(LineRead::Line)
        ));
        assert_eq!(line, b"ok");
        line.clear();
        assert!(matches!(
            read_line_capped(&mut r, &mut line, 8),
            Ok(LineRead::Eof)
        ));
    }
}
