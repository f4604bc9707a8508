//! Host-side client of the agent protocol, used by tests, benches, the lab and the HTTP API.
//!
//! One [`AgentClient`] is one connection: one request at a time. Open several clients for
//! concurrency (concurrent shell commands, or an `interrupt` while an exec runs).
//!
//! The guest is not trusted. Every call has a deadline (a total one, not per read: a guest
//! that trickles a byte at a time cannot stretch it): [`AgentClient::call_timeout`] for
//! single-response requests, an explicit one for execs and commands. What the client
//! collects on the caller's behalf is capped ([`MAX_COLLECTED_OUTPUT`] for an exec's or a
//! command's output, the caller's limit for a file read); streaming variants hand each piece
//! to the caller and keep nothing.

use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use fissile_proto::agent::{
    AGENT_FRAME_CAP, AGENT_PROTOCOL_VERSION, AgentInfo, DirEntry, Done, ExecRequest,
    FILE_CHUNK_MAX, FailureKind, MimeBundle, Request, Response, ShellRequest,
};
use fissile_proto::frame::{FrameError, encode_frame, read_frame, write_frame};

/// Errors of client calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the socket failed.
    #[error("cannot connect to {0}")]
    Connect(String, #[source] io::Error),
    /// The hybrid-vsock `CONNECT` handshake failed.
    #[error("vsock handshake failed: {0}")]
    Handshake(String),
    /// Sending or receiving a frame failed.
    #[error("agent connection failed")]
    Frame(#[from] FrameError),
    /// The agent refused or could not carry out the request.
    #[error("agent refused the request ({kind:?}): {message}")]
    Failed {
        /// Failure kind reported by the agent.
        kind: FailureKind,
        /// The agent's message.
        message: String,
    },
    /// The agent answered with a response that does not fit the request.
    #[error("unexpected response: {0}")]
    Unexpected(String),
    /// The call did not finish before its deadline.
    #[error("the agent did not finish within {0:?}")]
    Timeout(Duration),
    /// A file is larger than the caller's limit.
    #[error("the file is larger than the limit of {0} bytes")]
    TooLarge(u64),
}

/// Most output bytes [`AgentClient::exec`] and [`AgentClient::shell`] collect (stdout,
/// stderr and rich results together); beyond it output is dropped and the outcome says
/// `truncated`.
pub const MAX_COLLECTED_OUTPUT: usize = 64 << 20;

/// Default deadline of single-response calls.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Everything an exec produced, in order.
#[derive(Debug, Clone, Default)]
pub struct ExecOutcome {
    /// The streamed responses (stdout, stderr, display, execute result, error) in order.
    pub outputs: Vec<Response>,
    /// The terminal `Done`.
    pub done: Done,
    /// Output beyond [`MAX_COLLECTED_OUTPUT`] was dropped.
    pub truncated: bool,
}

impl ExecOutcome {
    /// All stdout, concatenated (lossy UTF-8).
    pub fn stdout(&self) -> String {
        self.concat(|r| match r {
            Response::Stdout(d) => Some(d),
            _ => None,
        })
    }

    /// All stderr, concatenated (lossy UTF-8).
    pub fn stderr(&self) -> String {
        self.concat(|r| match r {
            Response::Stderr(d) => Some(d),
            _ => None,
        })
    }

    fn concat(&self, pick: impl Fn(&Response) -> Option<&Vec<u8>>) -> String {
        let bytes: Vec<u8> = self
            .outputs
            .iter()
            .filter_map(pick)
            .flatten()
            .copied()
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The value of the trailing expression, if any.
    pub fn result(&self) -> Option<&MimeBundle> {
        self.outputs.iter().find_map(|r| match r {
            Response::ExecuteResult(b) => Some(b),
            _ => None,
        })
    }

    /// `text/plain` of the trailing expression, if any.
    pub fn result_text(&self) -> Option<&str> {
        self.result().and_then(|b| b.text("text/plain"))
    }

    /// Display bundles (figures etc.) in order.
    pub fn displays(&self) -> Vec<&MimeBundle> {
        self.outputs
            .iter()
            .filter_map(|r| match r {
                Response::Display(b) => Some(b),
                _ => None,
            })
            .collect()
    }

    /// The error, if the cell raised: `(ename, evalue, traceback)`.
    pub fn error(&self) -> Option<(&str, &str, &[String])> {
        self.outputs.iter().find_map(|r| match r {
            Response::Error {
                ename,
                evalue,
                traceback,
            } => Some((ename.as_str(), evalue.as_str(), traceback.as_slice())),
            _ => None,
        })
    }
}

/// What a shell command produced.
#[derive(Debug, Clone, Default)]
pub struct ShellOutcome {
    /// All stdout.
    pub stdout: Vec<u8>,
    /// All stderr.
    pub stderr: Vec<u8>,
    /// The terminal `Done` (exit status or signal, timed out).
    pub done: Done,
    /// Output beyond [`MAX_COLLECTED_OUTPUT`] was dropped.
    pub truncated: bool,
}

/// The bytes a response carries towards the collection cap.
fn output_bytes(r: &Response) -> usize {
    match r {
        Response::Stdout(d) | Response::Stderr(d) => d.len(),
        Response::Display(b) | Response::ExecuteResult(b) => {
            b.data.values().map(Vec::len).sum::<usize>() + 64
        }
        Response::Error {
            ename,
            evalue,
            traceback,
        } => ename.len() + evalue.len() + traceback.iter().map(String::len).sum::<usize>(),
        _ => 0,
    }
}

/// A stream whose reads fail once a deadline has passed: before each read the socket's
/// receive timeout is set to the time left.
#[derive(Debug)]
struct DeadlineStream {
    stream: UnixStream,
    deadline: Option<(Instant, Duration)>,
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some((at, _)) = self.deadline {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf)
    }
}

/// A connection to a guest agent.
#[derive(Debug)]
pub struct AgentClient {
    reader: BufReader<DeadlineStream>,
    writer: UnixStream,
    call_timeout: Duration,
}

impl AgentClient {
    /// Connects to an agent listening on a unix socket (host mode).
    pub fn connect_unix(path: &Path) -> Result<Self, ClientError> {
        let s = UnixStream::connect(path)
            .map_err(|e| ClientError::Connect(path.display().to_string(), e))?;
        Self::from_stream(s)
    }

    /// Connects through a Firecracker-style hybrid vsock: the VMM's unix socket `uds`,
    /// `CONNECT <port>\n`, `OK <n>\n`, then the protocol.
    pub fn connect_hybrid_vsock(uds: &Path, port: u32) -> Result<Self, ClientError> {
        Self::hybrid_vsock(uds, port, &[])
    }

    /// Connects through a hybrid vsock and wakes a restored guest ([`Self::wake`]) in one
    /// round trip: the `CONNECT` line, `AfterRestore` and `Info` leave in one write, before
    /// any answer is read. The VMM reads the line without consuming what follows it, which
    /// waits in the socket until the guest has accepted the connection, then goes on to it,
    /// so the guest's answers follow the `OK` line with no second trip. `within` bounds the
    /// answers (the client's usual call deadline applies afterwards).
    pub fn connect_hybrid_vsock_waking(
        uds: &Path,
        port: u32,
        entropy: &[u8],
        wall_clock_ns: u64,
        within: Duration,
    ) -> Result<(Self, AgentInfo), ClientError> {
        let mut early = encode_frame(
            AGENT_PROTOCOL_VERSION,
            &Request::AfterRestore {
                entropy: entropy.to_vec(),
                wall_clock_ns,
            },
        )?;
        early.extend(encode_frame(AGENT_PROTOCOL_VERSION, &Request::Info)?);
        let mut client = Self::hybrid_vsock(uds, port, &early)?;
        let info = client.wake_answers(within)?;
        Ok((client, info))
    }

    /// The `CONNECT` handshake, with `early` (whole frames) written right behind the line.
    fn hybrid_vsock(uds: &Path, port: u32, early: &[u8]) -> Result<Self, ClientError> {
        let mut s = UnixStream::connect(uds)
            .map_err(|e| ClientError::Connect(uds.display().to_string(), e))?;
        let ctx = |e: io::Error| ClientError::Connect(uds.display().to_string(), e);
        // A guest that never answers the connection request must not hang us.
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(ctx)?;
        s.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(ctx)?;
        let mut out = format!("CONNECT {port}\n").into_bytes();
        out.extend_from_slice(early);
        s.write_all(&out).map_err(ctx)?;
        // Nothing after the newline may be consumed: the guest's answers may follow it.
        let (line, complete) = handshake_line(&s, 64, "the VMM's answer to `CONNECT`", ctx)?;
        s.set_read_timeout(None).map_err(ctx)?;
        if !complete || !line.starts_with("OK ") {
            return Err(ClientError::Handshake(format!(
                "expected `OK <port>`, got {line:?}"
            )));
        }
        Self::from_stream(s)
    }

    /// Connects to an agent over AF_VSOCK (`cid`:`port`), as a host reaches a guest behind
    /// vhost-vsock (QEMU). The stream is then used like the unix one: both are plain stream
    /// sockets for read, write and the SO_RCVTIMEO/SO_SNDTIMEO timeouts.
    pub fn connect_vsock(cid: u32, port: u32) -> Result<Self, ClientError> {
        let fd = crate::sys::vsock_connect(cid, port)
            .map_err(|e| ClientError::Connect(format!("vsock {cid}:{port}"), e))?;
        Self::from_stream(UnixStream::from(fd))
    }

    /// The connection's socket, for a caller that speaks the protocol itself (fissiled reads
    /// a cell's responses asynchronously); `None` when responses are buffered unread (the
    /// connection is not between requests). [`AgentClient::from_connected`] takes it back.
    pub fn into_idle_stream(self) -> Option<UnixStream> {
        if !self.reader.buffer().is_empty() {
            return None;
        }
        Some(self.reader.into_inner().stream)
    }

    /// A client on a socket already connected to an agent (after the hybrid-vsock handshake,
    /// or one [`AgentClient::into_idle_stream`] gave out, between requests).
    pub fn from_connected(s: UnixStream) -> Result<Self, ClientError> {
        Self::from_stream(s)
    }

    fn from_stream(s: UnixStream) -> Result<Self, ClientError> {
        let writer = s
            .try_clone()
            .map_err(|e| ClientError::Connect("cloned stream".into(), e))?;
        s.set_write_timeout(Some(DEFAULT_CALL_TIMEOUT))
            .map_err(|e| ClientError::Connect("stream".into(), e))?;
        Ok(AgentClient {
            reader: BufReader::with_capacity(
                64 << 10,
                DeadlineStream {
                    stream: s,
                    deadline: None,
                },
            ),
            writer,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        })
    }

    /// Sets the deadline of single-response calls (default [`DEFAULT_CALL_TIMEOUT`]) and of
    /// every write.
    pub fn set_call_timeout(&mut self, t: Duration) -> io::Result<()> {
        self.call_timeout = t;
        self.writer.set_write_timeout(Some(t))
    }

    /// The deadline of single-response calls.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// True when this connection can carry another request: nothing unread is buffered and
    /// the peer has not closed it (a VMM closes its host-side streams when a restore, merge
    /// or rollback resets the guest's vsock). For pools of idle connections.
    pub fn is_idle_and_open(&self) -> bool {
        use std::os::fd::AsRawFd;
        self.reader.buffer().is_empty() && crate::sys::socket_idle(self.writer.as_raw_fd())
    }

    /// Sends one request (low level; read its responses with [`Self::recv`]).
    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        write_frame(&mut self.writer, AGENT_PROTOCOL_VERSION, req)?;
        Ok(())
    }

    /// Receives one response (low level), waiting at most until the deadline of the call in
    /// progress ([`Self::call_timeout`] from now when none is).
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        let within = self.call_timeout;
        if self.reader.get_ref().deadline.is_none() {
            self.reader.get_mut().deadline = Some((Instant::now() + within, within));
            let r = self.recv_frame();
            self.reader.get_mut().deadline = None;
            return r;
        }
        self.recv_frame()
    }

    fn recv_frame(&mut self) -> Result<Response, ClientError> {
        match read_frame(&mut self.reader, AGENT_PROTOCOL_VERSION, AGENT_FRAME_CAP) {
            Ok(r) => Ok(r),
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                let within = self
                    .reader
                    .get_ref()
                    .deadline
                    .map_or(self.call_timeout, |(_, d)| d);
                Err(ClientError::Timeout(within))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends a request and returns its single response within [`Self::call_timeout`];
    /// `Failed` becomes an error.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let within = self.call_timeout;
        self.stream_within(req, within, |_| {})
    }

    /// Sends a request and passes every response to `on` until the terminal one, which is
    /// returned (`Failed` becomes an error); all of it within `within`.
    pub fn stream_within(
        &mut self,
        req: &Request,
        within: Duration,
        mut on: impl FnMut(&Response),
    ) -> Result<Response, ClientError> {
        self.send(req)?;
        self.reader.get_mut().deadline = Some((Instant::now() + within, within));
        let result = loop {
            let r = match self.recv_frame() {
                Ok(r) => r,
                Err(e) => break Err(e),
            };
            if r.is_terminal() {
                break match r {
                    Response::Failed { kind, message } => {
                        Err(ClientError::Failed { kind, message })
                    }
                    r => Ok(r),
                };
            }
            on(&r);
        };
        self.reader.get_mut().deadline = None;
        result
    }

    /// Echo (the transport baseline).
    pub fn echo(&mut self, payload: &[u8]) -> Result<Vec<u8>, ClientError> {
        match self.call(&Request::Echo {
            payload: payload.to_vec(),
        })? {
            Response::EchoReply(p) => Ok(p),
            r => Err(unexpected(&r)),
        }
    }

    /// Agent information.
    pub fn info(&mut self) -> Result<AgentInfo, ClientError> {
        match self.call(&Request::Info)? {
            Response::Info(i) => Ok(i),
            r => Err(unexpected(&r)),
        }
    }

    /// Runs a cell (with no cell time limit) and collects everything it produced.
    pub fn exec_code(&mut self, code: &str) -> Result<ExecOutcome, ClientError> {
        self.exec(&ExecRequest {
            code: code.into(),
            ..ExecRequest::default()
        })
    }

    /// Runs a cell and collects what it produced (up to [`MAX_COLLECTED_OUTPUT`]), within
    /// [`exec_deadline`] of the request.
    pub fn exec(&mut self, req: &ExecRequest) -> Result<ExecOutcome, ClientError> {
        let mut outputs = Vec::new();
        let (mut kept, mut truncated) = (0usize, false);
        let done = self.exec_streaming(req, exec_deadline(req), |r| {
            let n = output_bytes(r);
            if kept + n > MAX_COLLECTED_OUTPUT {
                truncated = true;
            } else {
                kept += n;
                outputs.push(r.clone());
            }
        })?;
        Ok(ExecOutcome {
            outputs,
            done,
            truncated,
        })
    }

    /// Runs a cell, passing each streamed response to `on` as it arrives; returns `Done`,
    /// or [`ClientError::Timeout`] if it has not come within `within`.
    pub fn exec_streaming(
        &mut self,
        req: &ExecRequest,
        within: Duration,
        on: impl FnMut(&Response),
    ) -> Result<Done, ClientError> {
        match self.stream_within(&Request::Exec(req.clone()), within, on)? {
            Response::Done(d) => Ok(d),
            r => Err(unexpected(&r)),
        }
    }

    /// Runs a command and collects its output (up to [`MAX_COLLECTED_OUTPUT`]), within
    /// [`shell_deadline`] of the request.
    pub fn shell(&mut self, req: &ShellRequest) -> Result<ShellOutcome, ClientError> {
        let (mut stdout, mut stderr, mut truncated) = (Vec::new(), Vec::new(), false);
        let done = self.shell_streaming(req, shell_deadline(req), |r| {
            let (buf, d) = match r {
                Response::Stdout(d) => (&mut stdout, d),
                Response::Stderr(d) => (&mut stderr, d),
                _ => return,
            };
            if buf.len() + d.len() > MAX_COLLECTED_OUTPUT {
                truncated = true;
            } else {
                buf.extend_from_slice(d);
            }
        })?;
        Ok(ShellOutcome {
            stdout,
            stderr,
            done,
            truncated,
        })
    }

    /// Runs a command, passing each output chunk to `on` as it arrives; returns `Done`, or
    /// [`ClientError::Timeout`] if it has not come within `within`.
    pub fn shell_streaming(
        &mut self,
        req: &ShellRequest,
        within: Duration,
        on: impl FnMut(&Response),
    ) -> Result<Done, ClientError> {
        match self.stream_within(&Request::Shell(req.clone()), within, on)? {
            Response::Done(d) => Ok(d),
            r => Err(unexpected(&r)),
        }
    }

    /// Writes a whole file (split into [`FILE_CHUNK_MAX`] requests), creating parents.
    pub fn write_file(
        &mut self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<(), ClientError> {
        let mut chunks = data.chunks(FILE_CHUNK_MAX);
        let first = chunks.next().unwrap_or(&[]);
        self.write_file_part(path, first, false, mode)?;
        for c in chunks {
            self.write_file_part(path, c, true, None)?;
        }
        Ok(())
    }

    /// One `WriteFile` request.
    pub fn write_file_part(
        &mut self,
        path: &str,
        data: &[u8],
        append: bool,
        mode: Option<u32>,
    ) -> Result<(), ClientError> {
        let req = Request::WriteFile {
            path: path.into(),
            data: data.to_vec(),
            append,
            mode,
        };
        expect_ok(self.call(&req)?)
    }

    /// Reads a whole file of at most `max` bytes (as many `ReadFile` requests as needed);
    /// [`ClientError::TooLarge`] if it has more.
    pub fn read_file(&mut self, path: &str, max: u64) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        self.read_file_with(path, max, |piece| {
            out.extend_from_slice(piece);
            Ok::<(), ClientError>(())
        })?;
        Ok(out)
    }

    /// Reads a file piece by piece (each at most [`FILE_CHUNK_MAX`] bytes), handing each to
    /// `on`; stops with [`ClientError::TooLarge`] before passing `max` bytes in all (the
    /// guest's `eof` is not needed to end the read). Returns the bytes read.
    pub fn read_file_with<E: From<ClientError>>(
        &mut self,
        path: &str,
        max: u64,
        mut on: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut offset = 0u64;
        loop {
            let want = (max - offset).min(FILE_CHUNK_MAX as u64) + 1;
            let req = Request::ReadFile {
                path: path.into(),
                offset,
                max_len: Some(want),
            };
            match self.call(&req)? {
                Response::FileData { data, eof, .. } => {
                    if offset + data.len() as u64 > max {
                        return Err(ClientError::TooLarge(max).into());
                    }
                    if data.len() as u64 > want {
                        return Err(ClientError::Unexpected(format!(
                            "the agent sent {} bytes for a read of {want}",
                            data.len()
                        ))
                        .into());
                    }
                    offset += data.len() as u64;
                    on(&data)?;
                    if eof || data.is_empty() {
                        return Ok(offset);
                    }
                }
                r => return Err(unexpected(&r).into()),
            }
        }
    }

    /// Lists a directory.
    pub fn list_dir(&mut self, path: &str) -> Result<Vec<DirEntry>, ClientError> {
        match self.call(&Request::ListDir { path: path.into() })? {
            Response::DirEntries { entries, .. } => Ok(entries),
            r => Err(unexpected(&r)),
        }
    }

    /// Removes a file or directory.
    pub fn remove(&mut self, path: &str, recursive: bool) -> Result<(), ClientError> {
        expect_ok(self.call(&Request::Remove {
            path: path.into(),
            recursive,
        })?)
    }

    /// Interrupts the running cell; returns whether one was running.
    pub fn interrupt(&mut self) -> Result<bool, ClientError> {
        match self.call(&Request::Interrupt)? {
            Response::Interrupted { was_running } => Ok(was_running),
            r => Err(unexpected(&r)),
        }
    }

    /// Reseeds the guest CRNG and sets its clock (first call after a restore or fork).
    pub fn after_restore(&mut self, entropy: &[u8], wall_clock_ns: u64) -> Result<(), ClientError> {
        expect_ok(self.call(&Request::AfterRestore {
            entropy: entropy.to_vec(),
            wall_clock_ns,
        })?)
    }

    /// Wakes a restored guest in one round trip: `AfterRestore` (fresh entropy, the wall
    /// clock) and `Info` are sent together and both answers read after, all within one call
    /// deadline. The agent answers a connection's requests in order, so the CRNG is reseeded
    /// before this returns. Both answers are read even when the first is an error, so the
    /// connection stays in step. [`Self::connect_hybrid_vsock_waking`] sends the two with
    /// the connection request itself.
    pub fn wake(&mut self, entropy: &[u8], wall_clock_ns: u64) -> Result<AgentInfo, ClientError> {
        self.send(&Request::AfterRestore {
            entropy: entropy.to_vec(),
            wall_clock_ns,
        })?;
        self.send(&Request::Info)?;
        self.wake_answers(self.call_timeout)
    }

    /// Reads the answers to `AfterRestore` and `Info`, sent in that order, within `within`.
    fn wake_answers(&mut self, within: Duration) -> Result<AgentInfo, ClientError> {
        self.reader.get_mut().deadline = Some((Instant::now() + within, within));
        let restored = self.recv_frame();
        let info = match &restored {
            Ok(_) => self.recv_frame(),
            Err(_) => Err(ClientError::Unexpected("no answer to AfterRestore".into())),
        };
        self.reader.get_mut().deadline = None;
        match restored? {
            Response::Ok => {}
            Response::Failed { kind, message } => {
                return Err(ClientError::Failed { kind, message });
            }
            r => return Err(unexpected(&r)),
        }
        match info? {
            Response::Info(i) => Ok(i),
            r => Err(unexpected(&r)),
        }
    }

    /// Powers the guest off (host mode: the agent exits).
    pub fn poweroff(&mut self) -> Result<(), ClientError> {
        expect_ok(self.call(&Request::Poweroff)?)
    }
}

/// How long [`AgentClient::exec`] waits for a cell: its own time limit plus the grace the
/// agent gives it to obey an interrupt and a margin; a cell without a limit gets an hour.
pub fn exec_deadline(req: &ExecRequest) -> Duration {
    match req.timeout_ms {
        Some(ms) => Duration::from_millis(
            ms.saturating_add(fissile_proto::agent::INTERRUPT_GRACE_MS)
                .saturating_add(30_000),
        ),
        None => Duration::from_secs(3600),
    }
}

/// How long [`AgentClient::shell`] waits for a command: like [`exec_deadline`].
pub fn shell_deadline(req: &ShellRequest) -> Duration {
    match req.timeout_ms {
        Some(ms) => Duration::from_millis(ms.saturating_add(30_000)),
        None => Duration::from_secs(3600),
    }
}

/// A handshake line from `s` ([`fissile_proto::uds::read_line_unbuffered`]: nothing after
/// its newline is consumed), as text, and whether it ended with a newline; one longer than
/// `max` bytes is a handshake error naming `what`, other failures `ctx`'s.
fn handshake_line(
    s: &UnixStream,
    max: usize,
    what: &str,
    ctx: impl Fn(io::Error) -> ClientError,
) -> Result<(String, bool), ClientError> {
    let mut line = Vec::new();
    match fissile_proto::uds::read_line_unbuffered(s, &mut line, max) {
        Ok(complete) => Ok((String::from_utf8_lossy(&line).into_owned(), complete)),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(ClientError::Handshake(format!(
            "{what} is longer than {max} bytes"
        ))),
        Err(e) => Err(ctx(e)),
    }
}

fn expect_ok(r: Response) -> Result<(), ClientError> {
    match r {
        Response::Ok => Ok(()),
        r => Err(unexpected(&r)),
    }
}

/// Whether an agent connection held outside an [`AgentClient`] (an async reader's socket,
/// between requests) is still open with nothing to read: what [`AgentClient::is_idle_and_open`]
/// checks of its own socket, with one non-blocking `MSG_PEEK`.
pub fn socket_is_idle(s: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    crate::sys::socket_idle(s.as_raw_fd())
}

/// The error for a response that does not fit the request (its start, for the message).
pub fn unexpected(r: &Response) -> ClientError {
    let mut s = format!("{r:?}");
    s.truncate(200);
    ClientError::Unexpected(s)
}

/// How long the hybrid-vsock handshake may take (the guest answering the connection).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a host waits for a guest agent's readiness line (see
/// [`fissile_proto::agent::AGENT_READY_PORT`]): bind it *before* the guest boots.
#[derive(Debug)]
pub struct ReadyListener {
    fd: std::os::fd::OwnedFd,
}

impl ReadyListener {
    /// Listens on AF_VSOCK port `port` of the host (a guest behind vhost-vsock, e.g. QEMU).
    pub fn vsock(port: u32) -> Result<Self, ClientError> {
        let fd = crate::sys::vsock_listen(port)
            .map_err(|e| ClientError::Connect(format!("vsock listen {port}"), e))?;
        Ok(Self { fd })
    }

    /// Listens on the unix socket a hybrid-vsock VMM forwards guest port `port` to:
    /// `<vsock uds>_<port>`.
    pub fn hybrid_vsock(uds: &Path, port: u32) -> Result<Self, ClientError> {
        let mut path = uds.as_os_str().to_owned();
        path.push(format!("_{port}"));
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path)
            .map_err(|e| ClientError::Connect(Path::new(&path).display().to_string(), e))?;
        Ok(Self { fd: l.into() })
    }

    /// Waits up to `timeout` for one readiness line; `Ok(None)` on timeout.
    pub fn wait(&self, timeout: Duration) -> Result<Option<String>, ClientError> {
        use std::os::fd::AsRawFd;
        let ctx = |e: io::Error| ClientError::Connect("readiness listener".into(), e);
        crate::sys::set_recv_timeout(self.fd.as_raw_fd(), timeout.max(Duration::from_millis(1)))
            .map_err(ctx)?;
        let conn = match crate::sys::accept(&self.fd) {
            Ok(c) => c,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(ctx(e)),
        };
        crate::sys::set_recv_timeout(conn.as_raw_fd(), Duration::from_secs(5)).map_err(ctx)?;
        let stream = UnixStream::from(conn);
        let (line, _) = handshake_line(&stream, 128, "the readiness line", ctx)?;
        if !line.starts_with("READY") {
            return Err(ClientError::Handshake(format!(
                "expected `READY ...`, got {line:?}"
            )));
        }
        Ok(Some(line))
    }
}
