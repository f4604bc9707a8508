//! `POST /v1/sandboxes/{id}/exec` and `/commands`: a cell's (a command's) output streamed as
//! NDJSON, one event a line as it happens, from a bounded channel fed by a task that reads
//! the agent's connection on the async runtime ([`crate::agent_io`]). Commands have
//! `stdout`/`stderr` and last `exit {exit_code, signal, timed_out, duration_ms, server_ms}`
//! (or `failed`).
//!
//! Events (`type`): `stdout`/`stderr` `{text}`; `result` `{data, is_main_result}` (a MIME
//! bundle: text types and JSON as they are, binary types such as `image/png` base64);
//! `error` `{name, value, traceback}` (the cell raised: a code error is an event, not an HTTP
//! error); last `done` `{execution_count, duration_ms (guest), server_ms, timed_out,
//! state_lost}`, or `failed` `{message}` if the sandbox stopped answering.
//!
//! Lines that come together leave together (one chunk, one wake-up of the client); a cell's
//! main result, which the interpreter gives as the cell ends, waits up to 100 ms for
//! the `done` that follows it, so a short cell's whole response is one write.
//!
//! A client that disconnects mid-stream interrupts the cell (a KeyboardInterrupt in the
//! REPL, whose state is kept); the reader drains the rest and the sandbox stays healthy.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use fissile_agent::AgentClient;
use fissile_agent::client::ClientError;
use fissile_proto::agent::{
    AGENT_VSOCK_PORT, Done, ExecRequest, MimeBundle, Request, Response as AgentResponse,
    ShellCommand, ShellRequest,
};
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt as _;

use crate::agent_io::AsyncAgent;
use crate::app::StreamGuard;
use crate::error::ApiError;

/// Body of an exec request.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Python source.
    pub code: String,
    /// Time limit in seconds (the cell gets a KeyboardInterrupt; state is kept).
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 86400.0)]
    pub timeout_s: Option<f64>,
    /// Environment variables for this cell only.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Largest accepted cell source.
pub const MAX_CODE_BYTES: usize = 1 << 20;

/// One NDJSON event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// Output on stdout.
    Stdout {
        /// The text (lossy UTF-8).
        text: String,
    },
    /// Output on stderr.
    Stderr {
        /// The text (lossy UTF-8).
        text: String,
    },
    /// A rich result: a displayed object, or the value of the cell's last expression.
    Result {
        /// MIME type → content.
        data: BTreeMap<String, serde_json::Value>,
        /// The value of the last expression (not a `display()` along the way).
        is_main_result: bool,
    },
    /// The cell raised.
    Error {
        /// Exception class.
        name: String,
        /// Its message.
        value: String,
        /// Formatted traceback lines.
        traceback: Vec<String>,
    },
    /// The cell ended.
    Done {
        /// The cell's number in this interpreter.
        execution_count: u64,
        /// Run time measured in the guest.
        duration_ms: f64,
        /// Time in the daemon, request to this event.
        server_ms: f64,
        /// The time limit passed (the cell was interrupted).
        timed_out: bool,
        /// The interpreter had to be restarted: earlier state is gone.
        state_lost: bool,
    },
    /// The sandbox stopped answering; nothing more follows.
    Failed {
        /// What happened.
        message: String,
    },
}

impl ExecEvent {
    fn line(&self) -> Bytes {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        v.push(b'\n');
        Bytes::from(v)
    }
}

/// A MIME bundle as JSON values: text types as strings, JSON parsed, binary base64.
pub fn bundle_json(b: &MimeBundle) -> BTreeMap<String, serde_json::Value> {
    b.data
        .iter()
        .map(|(mime, bytes)| {
            let v = if mime == "application/json" {
                serde_json::from_slice(bytes).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
                })
            } else if mime.starts_with("text/") || mime.ends_with("+xml") {
                serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
            } else {
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            };
            (mime.clone(), v)
        })
        .collect()
}

/// The event for one agent response, if it is one the stream carries.
pub fn event_of(r: &AgentResponse) -> Option<ExecEvent> {
    Some(match r {
        AgentResponse::Stdout(d) => ExecEvent::Stdout {
            text: String::from_utf8_lossy(d).into_owned(),
        },
        AgentResponse::Stderr(d) => ExecEvent::Stderr {
            text: String::from_utf8_lossy(d).into_owned(),
        },
        AgentResponse::Display(b) => ExecEvent::Result {
            data: bundle_json(b),
            is_main_result: false,
        },
        AgentResponse::ExecuteResult(b) => ExecEvent::Result {
            data: bundle_json(b),
            is_main_result: true,
        },
        AgentResponse::Error {
            ename,
            evalue,
            traceback,
        } => ExecEvent::Error {
            name: ename.clone(),
            value: evalue.clone(),
            traceback: traceback.clone(),
        },
        _ => return None,
    })
}

/// Validates `body` into the agent's request.
pub fn request(body: ExecBody) -> Result<ExecRequest, ApiError> {
    if body.code.len() > MAX_CODE_BYTES {
        return Err(ApiError::too_large(format!(
            "the code is {} bytes; the limit is {MAX_CODE_BYTES}",
            body.code.len()
        )));
    }
    Ok(ExecRequest {
        code: body.code,
        timeout_ms: timeout_ms(body.timeout_s)?,
        env: body.env,
    })
}

/// A client's `timeout_s` in milliseconds: finite, in (0, 86400].
fn timeout_ms(timeout_s: Option<f64>) -> Result<Option<u64>, ApiError> {
    match timeout_s {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(Some((s * 1e3) as u64)),
        Some(s) => Err(ApiError::bad_request(format!(
            "timeout_s must be in (0, 86400], got {s}"
        ))),
    }
}

/// Most idle agent connections kept per sandbox.
pub const MAX_IDLE_AGENT_CONNECTIONS: usize = 4;

/// A sandbox's idle agent connections, each registered with the async runtime once, when it
/// was opened. An exec or command takes one (or opens a new one) and gives it back when its
/// stream ended cleanly, which saves the hybrid-vsock handshake, a round trip through the
/// guest, on every cell, and keeps a cell's system calls to its own reads and writes (no
/// switch between blocking and non-blocking, no re-registration). A connection the VMM
/// closed (a merge or rollback resets the guest's vsock) is never handed out: each is
/// checked on the way out, and lifecycle switches clear the pool.
#[derive(Debug, Default)]
pub struct AgentPool {
    idle: std::sync::Mutex<Vec<AsyncAgent>>,
}

impl AgentPool {
    /// A pooled connection, or a new one to `vsock` (counted in `metrics`). Taking from the
    /// pool needs no trip to the blocking pool (a non-blocking check); only opening a new
    /// connection blocks.
    pub async fn checkout(
        &self,
        vsock: &Path,
        metrics: &crate::metrics::Metrics,
    ) -> Result<AsyncAgent, ApiError> {
        if let Some(agent) = self.take() {
            return Ok(agent);
        }
        metrics.agent_connection_opened();
        let vsock = vsock.to_path_buf();
        let agent = crate::app::blocking(move || connect(&vsock)).await?;
        AsyncAgent::from_client(agent).map_err(|e| {
            ApiError::internal(format!(
                "taking over the agent connection: {}",
                fissile_proto::error_chain(&e)
            ))
        })
    }

    /// An idle connection that is still open, if the pool has one.
    fn take(&self) -> Option<AsyncAgent> {
        let mut idle = crate::app::lock(&self.idle);
        while let Some(c) = idle.pop() {
            if c.is_idle_and_open() {
                return Some(c);
            }
        }
        None
    }

    /// Gives back a connection whose last request ended cleanly (dropped if the pool is
    /// full; whether it is still open is checked when it is taken).
    pub fn put(&self, c: AsyncAgent) {
        let mut idle = crate::app::lock(&self.idle);
        if idle.len() < MAX_IDLE_AGENT_CONNECTIONS {
            idle.push(c);
        }
    }

    /// Drops every idle connection and keeps `woken` instead: after a sandbox started or
    /// switched state (merge, rollback: the guest's vsock was reset, so the old ones are
    /// closed), the connection it woke its guest on (`Sandbox::take_agent`) serves the next
    /// request. Called on the runtime or its blocking pool, whose reactor `woken` joins;
    /// anywhere else it is dropped and the next request opens its own.
    pub fn reset_with(&self, woken: Option<AgentClient>) {
        let woken = woken
            .filter(|_| tokio::runtime::Handle::try_current().is_ok())
            .filter(AgentClient::is_idle_and_open)
            .and_then(|c| AsyncAgent::from_client(c).ok());
        let mut idle = crate::app::lock(&self.idle);
        idle.clear();
        idle.extend(woken);
    }
}

/// Connects a fresh agent connection (bounded by the client's handshake timeout).
pub fn connect(vsock: &Path) -> Result<AgentClient, ApiError> {
    AgentClient::connect_hybrid_vsock(vsock, AGENT_VSOCK_PORT).map_err(|e| {
        ApiError::conflict(format!(
            "the sandbox's agent does not answer: {}",
            fissile_proto::error_chain(&e)
        ))
    })
}

/// Streams the cell `req` on `agent` as NDJSON.
pub async fn stream(
    agent: AsyncAgent,
    vsock: std::path::PathBuf,
    req: ExecRequest,
    guard: StreamGuard,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> Response {
    let within = fissile_agent::client::exec_deadline(&req);
    let t0 = Instant::now();
    let interrupt = move || {
        // The client went away: interrupt the cell (the rest is drained).
        Some(tokio::task::spawn_blocking(move || {
            if let Ok(mut other) = connect(&vsock) {
                let _ = other.interrupt();
            }
        }))
    };
    spawn_stream(
        agent,
        Request::Exec(req),
        within,
        guard,
        |r| event_of(r).map(|ev| ev.line()),
        interrupt,
        move |done| {
            metrics.operation("exec", done.is_ok(), t0);
            match done {
                Ok(d) => ExecEvent::Done {
                    execution_count: d.execution_count,
                    duration_ms: d.duration_ns as f64 / 1e6,
                    server_ms: t0.elapsed().as_secs_f64() * 1e3,
                    timed_out: d.timed_out,
                    state_lost: d.state_lost,
                },
                Err(e) => ExecEvent::Failed {
                    message: fissile_proto::error_chain(&e),
                },
            }
            .line()
        },
    )
    .await
}

/// How long the closing line may wait for a client that stopped reading.
const LAST_LINE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `request` on `agent` in a task of the async runtime (no blocking-pool thread between
/// the guest and the client) and answers with its events as NDJSON: `event` makes a line of
/// a response (or skips it), `last` the closing line of its end. A client that goes away
/// (the channel closed) or stops reading until the request's deadline gets `gone` run once
/// (what it starts is awaited before the connection is given back); the rest is read and
/// dropped, so the connection ends between requests and goes back to the sandbox's pool.
async fn spawn_stream(
    mut agent: AsyncAgent,
    request: Request,
    within: std::time::Duration,
    guard: StreamGuard,
    mut event: impl FnMut(&AgentResponse) -> Option<Bytes> + Send + 'static,
    gone: impl FnOnce() -> Option<tokio::task::JoinHandle<()>> + Send + 'static,
    last: impl FnOnce(Result<Done, ClientError>) -> Bytes + Send + 'static,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + within;
        let mut gone = Some(gone);
        let mut gone_work = None;
        // Lines made from the responses at hand, sent together (one chunk, one wake-up of
        // the client) once the next has to be waited for, or after a main result, once the
        // next came or `END_WAIT` passed.
        let mut pending: Vec<u8> = Vec::new();
        // The last line held is a cell's main result: the next response follows at once.
        let mut ending = false;
        let done = async {
            agent.send(&request, deadline, within).await?;
            loop {
                let r = match agent.buffered()? {
                    Some(r) => r,
                    None => {
                        // After a main result, the next response within END_WAIT joins it.
                        let next = if std::mem::take(&mut ending) {
                            tokio::time::timeout(END_WAIT, agent.recv(deadline, within))
                                .await
                                .ok()
                        } else {
                            None
                        };
                        match next {
                            Some(r) => r?,
                            None => {
                                flush(&mut pending, &tx, deadline, &mut gone, &mut gone_work).await;
                                agent.recv(deadline, within).await?
                            }
                        }
                    }
                };
                if r.is_terminal() {
                    return crate::agent_io::outcome(r);
                }
                if gone.is_some()
                    && let Some(line) = event(&r)
                {
                    ending = matches!(r, AgentResponse::ExecuteResult(_));
                    pending.extend_from_slice(&line);
                    if pending.len() >= MAX_PENDING {
                        flush(&mut pending, &tx, deadline, &mut gone, &mut gone_work).await;
                    }
                }
            }
        }
        .await;
        if let Some(work) = gone_work {
            // The interrupt has landed before the connection serves another cell.
            let _ = work.await;
        }
        if done.is_ok() {
            guard.live().agents.put(agent);
        }
        if gone.is_some() {
            pending.extend_from_slice(&last(done));
            let _ = tokio::time::timeout(LAST_LINE_WAIT, tx.send(pending.into())).await;
        }
        drop(guard);
    });
    ndjson_after_first(rx).await
}

/// Most bytes of lines held back to be sent together.
const MAX_PENDING: usize = 64 << 10;

/// How long a cell's main result (the value of its last expression, which the interpreter
/// gives as the cell ends) waits for the lines after it, the cell's end above all, to go out
/// with them: one write and one wake-up of the client instead of two. The agent sends its
/// `done` as soon as the cell's output is drained, so the wait is that short; output still
/// coming after this long goes out as it comes. The same as [`HEAD_WAIT`]: a timer that is
/// not the runtime's next one costs no extra wake-up of its I/O driver.
const END_WAIT: std::time::Duration = HEAD_WAIT;

/// Sends the `pending` lines as one chunk (before `deadline`); a client that went away or
/// stopped reading gets `gone` run (once; what it started is kept in `gone_work`).
async fn flush<G: FnOnce() -> Option<tokio::task::JoinHandle<()>>>(
    pending: &mut Vec<u8>,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    deadline: tokio::time::Instant,
    gone: &mut Option<G>,
    gone_work: &mut Option<tokio::task::JoinHandle<()>>,
) {
    if pending.is_empty() {
        return;
    }
    let chunk = Bytes::from(std::mem::take(pending));
    if gone.is_some()
        && !matches!(
            tokio::time::timeout_at(deadline, tx.send(chunk)).await,
            Ok(Ok(()))
        )
        && let Some(f) = gone.take()
    {
        *gone_work = f();
    }
}

/// How long a streamed response's head waits for its first lines, so that a short cell's
/// head, events and end go out in one write and wake the client once. A stream that has
/// nothing to say sooner gets its head then; no line is ever held back.
const HEAD_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// [`ndjson`], answered once the first lines came on `rx` or [`HEAD_WAIT`] passed.
async fn ndjson_after_first(mut rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response {
    let first = tokio::time::timeout(HEAD_WAIT, rx.recv())
        .await
        .ok()
        .flatten();
    ndjson(first, rx)
}

/// A streamed NDJSON response: the `first` lines, then those received on `rx`.
pub(crate) fn ndjson(first: Option<Bytes>, rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response {
    let lines = tokio_stream::iter(first).chain(tokio_stream::wrappers::ReceiverStream::new(rx));
    let body = Body::from_stream(lines.map(Ok::<_, std::convert::Infallible>));
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response()
}

/// Body of `POST /v1/sandboxes/{id}/commands`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    /// A shell script (run with `/bin/sh -c`), or a program and its arguments (no shell).
    pub cmd: CommandLine,
    /// Working directory (absolute).
    #[serde(default)]
    #[schema(pattern = "^/")]
    pub cwd: Option<String>,
    /// Environment variables added for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Text written to the command's stdin, which is then closed.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Time limit in seconds (then the command's process group is killed).
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 86400.0)]
    pub timeout_s: Option<f64>,
}

/// A command line: a script or an argv.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum CommandLine {
    /// `/bin/sh -c <script>` (not blank).
    Script(String),
    /// Program and arguments (the program not empty).
    Argv(Vec<String>),
}

/// One NDJSON event of a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CommandEvent {
    /// Output on stdout.
    Stdout {
        /// The text (lossy UTF-8).
        text: String,
    },
    /// Output on stderr.
    Stderr {
        /// The text (lossy UTF-8).
        text: String,
    },
    /// The command ended.
    Exit {
        /// Its exit code (`None` if a signal killed it).
        exit_code: Option<i32>,
        /// The signal that killed it, if one did.
        signal: Option<i32>,
        /// The time limit passed (it was killed).
        timed_out: bool,
        /// Run time measured in the guest.
        duration_ms: f64,
        /// Time in the daemon, request to this event.
        server_ms: f64,
    },
    /// The sandbox stopped answering; nothing more follows.
    Failed {
        /// What happened.
        message: String,
    },
}

impl CommandEvent {
    fn line(&self) -> Bytes {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        v.push(b'\n');
        Bytes::from(v)
    }
}

/// Validates `body` into the agent's request.
pub fn command_request(body: CommandBody) -> Result<ShellRequest, ApiError> {
    let command = match body.cmd {
        CommandLine::Script(s) if s.trim().is_empty() => {
            return Err(ApiError::bad_request("cmd is empty"));
        }
        CommandLine::Argv(a) if a.is_empty() || a[0].is_empty() => {
            return Err(ApiError::bad_request("cmd: argv needs a program"));
        }
        CommandLine::Script(s) => ShellCommand::Script(s),
        CommandLine::Argv(a) => ShellCommand::Argv(a),
    };
    let size = match &command {
        ShellCommand::Script(s) => s.len(),
        ShellCommand::Argv(a) => a.iter().map(String::len).sum(),
    } + body.stdin.as_ref().map_or(0, String::len);
    if size > MAX_CODE_BYTES {
        return Err(ApiError::too_large(format!(
            "the command and its stdin are {size} bytes; the limit is {MAX_CODE_BYTES}"
        )));
    }
    if let Some(cwd) = &body.cwd {
        crate::files::guest_path(cwd)?;
    }
    Ok(ShellRequest {
        command,
        cwd: body.cwd,
        env: body.env,
        stdin: body.stdin.map(String::into_bytes).unwrap_or_default(),
        timeout_ms: timeout_ms(body.timeout_s)?,
    })
}

/// Streams the command `req` on `agent` as NDJSON. A client that disconnects stops receiving
/// output; the command runs on until it exits or its time limit passes.
pub async fn stream_command(agent: AsyncAgent, req: ShellRequest, guard: StreamGuard) -> Response {
    let within = fissile_agent::client::shell_deadline(&req);
    let t0 = Instant::now();
    spawn_stream(
        agent,
        Request::Shell(req),
        within,
        guard,
        |r| {
            match r {
                AgentResponse::Stdout(d) => CommandEvent::Stdout {
                    text: String::from_utf8_lossy(d).into_owned(),
                },
                AgentResponse::Stderr(d) => CommandEvent::Stderr {
                    text: String::from_utf8_lossy(d).into_owned(),
                },
                _ => return None,
            }
            .line()
            .into()
        },
        || None,
        move |done| {
            match done {
                Ok(d) => CommandEvent::Exit {
                    exit_code: d.exit_status,
                    signal: d.signal,
                    timed_out: d.timed_out,
                    duration_ms: d.duration_ns as f64 / 1e6,
                    server_ms: t0.elapsed().as_secs_f64() * 1e3,
                },
                Err(e) => CommandEvent::Failed {
                    message: fissile_proto::error_chain(&e),
                },
            }
            .line()
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_json_object_a_line_tagged_by_type() {
        let mut b = MimeBundle::default();
        b.data.insert("text/plain".into(), b"42".to_vec());
        b.data
            .insert("image/png".into(), vec![0x89, b'P', b'N', b'G']);
        b.data
            .insert("application/json".into(), br#"{"a":1}"#.to_vec());

        let ev = event_of(&AgentResponse::ExecuteResult(b)).unwrap();

        let line = ev.line();
        assert!(line.ends_with(b"\n"));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["type"], "result");
        assert_eq!(v["is_main_result"], true);
        assert_eq!(v["data"]["text/plain"], "42");
        assert_eq!(v["data"]["image/png"], "iVBORw==");
        assert_eq!(v["data"]["application/json"]["a"], 1);
    }

    #[test]
    fn bad_timeouts_and_huge_code_are_refused() {
        let body = |t: Option<f64>| ExecBody {
            code: "1".into(),
            timeout_s: t,
            env: BTreeMap::new(),
        };
        assert_eq!(request(body(Some(1.5))).unwrap().timeout_ms, Some(1500));
        assert_eq!(request(body(Some(0.0))).unwrap_err().code, "bad_request");
        assert_eq!(
            request(body(Some(f64::NAN))).unwrap_err().code,
            "bad_request"
        );
        let huge = ExecBody {
            code: "x".repeat(MAX_CODE_BYTES + 1),
            ..body(None)
        };
        assert_eq!(request(huge).unwrap_err().code, "too_large");
    }
}
