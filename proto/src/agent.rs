//! The guest agent protocol: what the host (tests, benches, the lab, the HTTP API) says to
//! `fissile-agent`, the persistent Python REPL and init inside each sandbox.
//!
//! # Transport
//! * In a guest: AF_VSOCK stream socket, port [`AGENT_VSOCK_PORT`] (1024), any CID. On the
//!   host side of a Firecracker-style hybrid vsock, connect to the VMM's vsock unix socket,
//!   send `CONNECT 1024\n`, read the line `OK <host port>\n`; from then on the stream carries
//!   this protocol.
//! * Readiness: see [`AGENT_READY_PORT`].
//! * On a host (development, tests, benches): a unix stream socket
//!   (`fissile-agent --listen-unix PATH`), same protocol byte for byte.
//!
//! # Encoding
//! Every message is one [`crate::frame`] frame: a 4-byte little-endian length `N`
//! (`1 <= N <= cap`), then `N` bytes: the version byte [`AGENT_PROTOCOL_VERSION`], then the
//! message encoded with `postcard` (serde; enums are a varint variant index followed by their
//! fields in declaration order, integers are varints, `Vec<u8>`/`String` are a varint length
//! then bytes). The cap on both directions is [`AGENT_FRAME_CAP`] (16 MiB); the agent splits
//! output into chunks of at most [`STREAM_CHUNK_MAX`] bytes and file reads into pieces of at
//! most [`FILE_CHUNK_MAX`] bytes, so no response gets near it.
//!
//! # Conversation
//! One request at a time per connection: the client writes one [`Request`], then reads
//! [`Response`]s until the terminal one ([`Response::is_terminal`]); then it may send the next
//! request on the same connection. A client that wants concurrency opens several connections
//! (that is how shell commands run concurrently, and how [`Request::Interrupt`] reaches an
//! exec that is running on another connection).
//!
//! * `Exec` streams `Stdout` / `Stderr` / `Display` / `ExecuteResult` / `Error`, then ends with
//!   `Done`. There is one Python REPL per agent: execs run one at a time, **a second exec is
//!   queued (FIFO) until the first one ends**, it is never refused. `Done::duration_ns` counts
//!   only the cell's own run time, not the time spent in the queue.
//! * `Shell` streams `Stdout` / `Stderr`, then `Done` with `exit_status` (or `signal`). Shell
//!   commands run concurrently with each other and with an exec.
//! * Every other request gets exactly one response.
//! * A request that cannot be carried out at all ends with `Failed` (also terminal).
//!
//! A frame the agent cannot read (garbage, wrong version, empty) gets a `Failed` with
//! [`FailureKind::BadFrame`] and the connection stays usable; an oversize or truncated frame
//! gets a `Failed` (when possible) and the connection is closed, because the stream is out of
//! sync. Neither affects the agent, the REPL or other connections.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version byte of every agent protocol frame.
pub const AGENT_PROTOCOL_VERSION: u8 = 1;

/// AF_VSOCK port the guest agent listens on (any CID).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Host port of the readiness signal: once the guest agent listens on
/// [`AGENT_VSOCK_PORT`], it connects to the host (CID 2) on this port, writes one line
/// `READY <agent version>\n` and closes. A host waits for that instead of polling. (With a
/// hybrid vsock the VMM forwards it to the unix socket `<vsock uds>_1025`.)
pub const AGENT_READY_PORT: u32 = 1025;

/// Cap on one frame in either direction (version byte + payload).
pub const AGENT_FRAME_CAP: u32 = crate::frame::DEFAULT_FRAME_CAP;

/// Largest `Stdout` / `Stderr` chunk the agent sends.
pub const STREAM_CHUNK_MAX: usize = 64 << 10;

/// Largest piece of file data in one `ReadFile` response; clients writing larger files
/// split them into `WriteFile` requests of at most this size (the first truncating, the
/// following ones with `append`).
pub const FILE_CHUNK_MAX: usize = 8 << 20;

/// Most directory entries returned by one `ListDir` (`DirEntries::truncated` says if more).
pub const LIST_DIR_MAX: usize = 100_000;

/// A request from the host to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Replies [`Response::EchoReply`] with the same payload (the transport baseline).
    Echo {
        /// Bytes to send back.
        payload: Vec<u8>,
    },
    /// Replies [`Response::Info`].
    Info,
    /// Runs a Python cell in the persistent REPL (queued behind a running one).
    Exec(ExecRequest),
    /// Runs a command, concurrently with anything else.
    Shell(ShellRequest),
    /// Creates or overwrites (or appends to) a file; replies `Ok`.
    WriteFile {
        /// Absolute path in the guest; parent directories are created.
        path: String,
        /// File contents (at most [`FILE_CHUNK_MAX`] per request is a good size).
        data: Vec<u8>,
        /// Append instead of truncating.
        append: bool,
        /// Permission bits (e.g. `0o755`); `None` keeps the default (0644 on creation).
        mode: Option<u32>,
    },
    /// Reads part of a file; replies [`Response::FileData`].
    ReadFile {
        /// Path in the guest.
        path: String,
        /// Byte offset to start at.
        offset: u64,
        /// Most bytes to return; `None` or anything above [`FILE_CHUNK_MAX`] means that cap.
        max_len: Option<u64>,
    },
    /// Lists a directory; replies [`Response::DirEntries`].
    ListDir {
        /// Directory path in the guest.
        path: String,
    },
    /// Removes a file, symlink or directory; replies `Ok`.
    Remove {
        /// Path in the guest.
        path: String,
        /// Remove a directory with its contents.
        recursive: bool,
    },
    /// Sends SIGINT (KeyboardInterrupt) to the running cell, if any; replies
    /// [`Response::Interrupted`].
    Interrupt,
    /// First thing to send after a snapshot restore or fork: reseeds the kernel CRNG with
    /// host entropy (RNDADDENTROPY + RNDRESEEDCRNG) and sets the wall clock. Guest mode only
    /// (in host mode it is refused with [`FailureKind::Unsupported`]); replies `Ok`.
    AfterRestore {
        /// Fresh random bytes from the host (at least 32 recommended, at most 4096 used).
        entropy: Vec<u8>,
        /// Wall clock, nanoseconds since the Unix epoch.
        wall_clock_ns: u64,
    },
    /// Replies `Ok`, then syncs and powers the guest off (host mode: the agent exits).
    Poweroff,
}

/// A Python cell to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecRequest {
    /// Python source; the value of a trailing expression is returned as `ExecuteResult`.
    pub code: String,
    /// Run time limit in milliseconds (`None`: no limit). When it passes, the cell gets a
    /// KeyboardInterrupt and the REPL's state is kept; if the cell ignores it for
    /// [`INTERRUPT_GRACE_MS`], the interpreter is killed and restarted (`Done::state_lost`).
    pub timeout_ms: Option<u64>,
    /// Environment variables set in `os.environ` for the duration of this cell only.
    pub env: BTreeMap<String, String>,
}

/// How long a cell may ignore a KeyboardInterrupt before the interpreter is restarted.
pub const INTERRUPT_GRACE_MS: u64 = 2_000;

/// A command to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShellRequest {
    /// What to run.
    pub command: ShellCommand,
    /// Working directory (`None`: the agent's, `/` in a guest).
    pub cwd: Option<String>,
    /// Environment variables added to the agent's environment.
    pub env: BTreeMap<String, String>,
    /// Bytes written to the command's stdin, which is then closed.
    pub stdin: Vec<u8>,
    /// Run time limit in milliseconds (`None`: no limit); on expiry the whole process group
    /// is killed with SIGKILL and `Done::timed_out` is set.
    pub timeout_ms: Option<u64>,
}

/// The command of a [`ShellRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShellCommand {
    /// Program and arguments, run without a shell (looked up in `PATH`).
    Argv(Vec<String>),
    /// A script run with `/bin/sh -c`.
    Script(String),
}

/// A Jupyter-style MIME bundle: MIME type -> content. Text types (`text/plain`,
/// `text/html`, ...) hold UTF-8; `image/png` holds the PNG file's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MimeBundle {
    /// MIME type -> content bytes.
    pub data: BTreeMap<String, Vec<u8>>,
}

impl MimeBundle {
    /// The content for `mime` as text, if present and valid UTF-8.
    pub fn text(&self, mime: &str) -> Option<&str> {
        self.data
            .get(mime)
            .and_then(|d| std::str::from_utf8(d).ok())
    }

    /// The raw content for `mime`, if present.
    pub fn get(&self, mime: &str) -> Option<&[u8]> {
        self.data.get(mime).map(Vec::as_slice)
    }
}

/// A response (or one part of a streamed response) from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Output the cell or command wrote to stdout (at most [`STREAM_CHUNK_MAX`] bytes).
    Stdout(Vec<u8>),
    /// Output the cell or command wrote to stderr (at most [`STREAM_CHUNK_MAX`] bytes).
    Stderr(Vec<u8>),
    /// Rich output shown during the cell (e.g. a matplotlib figure as `image/png`).
    Display(MimeBundle),
    /// The value of the cell's trailing expression (`text/plain`, plus `text/html` when the
    /// object has `_repr_html_`).
    ExecuteResult(MimeBundle),
    /// The cell raised (or the interpreter died / was restarted: `ename` is then
    /// [`INTERPRETER_RESTARTED`]).
    Error {
        /// Exception class name, e.g. `ZeroDivisionError`.
        ename: String,
        /// Exception message.
        evalue: String,
        /// Formatted traceback lines (the agent's own frames removed).
        traceback: Vec<String>,
    },
    /// Terminal response of `Exec` and `Shell`.
    Done(Done),
    /// Terminal response of `Echo`.
    EchoReply(Vec<u8>),
    /// Terminal response of `Info`.
    Info(AgentInfo),
    /// Terminal response of `ReadFile`.
    FileData {
        /// The bytes read.
        data: Vec<u8>,
        /// True when the read reached the end of the file.
        eof: bool,
        /// Size of the file when it was read.
        size: u64,
    },
    /// Terminal response of `ListDir`.
    DirEntries {
        /// Entries sorted by name (`.` and `..` excluded).
        entries: Vec<DirEntry>,
        /// True when the directory had more than [`LIST_DIR_MAX`] entries.
        truncated: bool,
    },
    /// Terminal response of `Interrupt`.
    Interrupted {
        /// True when a cell was running and got SIGINT.
        was_running: bool,
    },
    /// Terminal success of requests with nothing to return.
    Ok,
    /// Terminal: the request could not be carried out.
    Failed {
        /// What kind of failure.
        kind: FailureKind,
        /// Human-readable detail.
        message: String,
    },
}

impl Response {
    /// True for the response that ends a request's stream.
    pub fn is_terminal(&self) -> bool {
        !matches!(
            self,
            Response::Stdout(_)
                | Response::Stderr(_)
                | Response::Display(_)
                | Response::ExecuteResult(_)
                | Response::Error { .. }
        )
    }
}

/// `ename` of the [`Response::Error`] sent when the interpreter died or had to be killed
/// and was restarted, losing all state.
pub const INTERPRETER_RESTARTED: &str = "InterpreterRestarted";

/// End of an exec or a shell command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Done {
    /// Exec: the cell's number in this interpreter (1, 2, ...; restarts from 1 after a
    /// restart). Shell: 0.
    pub execution_count: u64,
    /// Guest-side run time in nanoseconds (excluding time queued behind another exec).
    pub duration_ns: u64,
    /// Shell: the exit code, if the command exited. Exec: `None`.
    pub exit_status: Option<i32>,
    /// Shell: the signal that killed the command, if it was killed.
    pub signal: Option<i32>,
    /// The time limit passed (exec: interrupted; shell: killed).
    pub timed_out: bool,
    /// Exec: the interpreter died or was killed and has been restarted; every variable and
    /// import of earlier cells is gone.
    pub state_lost: bool,
}

/// What `Info` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// `fissile-agent` crate version.
    pub agent_version: String,
    /// [`AGENT_PROTOCOL_VERSION`].
    pub protocol_version: u8,
    /// True when running as the guest's init (PID 1 / `--init`).
    pub guest_mode: bool,
    /// The agent's process id.
    pub pid: u32,
    /// Nanoseconds since the agent started (monotonic clock; includes time paused in a
    /// snapshot only if the guest clock counted it).
    pub uptime_ns: u64,
    /// `sys.version` of the REPL's interpreter, once it has started.
    pub python_version: Option<String>,
    /// Cells run by the current interpreter.
    pub execution_count: u64,
    /// The guest's host name.
    pub hostname: String,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// File name (not the full path); lossy UTF-8.
    pub name: String,
    /// Entry type (symlinks are not followed).
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// Type of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Anything else (fifo, socket, device).
    Other,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The frame could not be read (garbage, wrong version, empty, oversize).
    BadFrame,
    /// The request is well formed but invalid (e.g. empty argv).
    BadRequest,
    /// A path does not exist.
    NotFound,
    /// Permission denied.
    PermissionDenied,
    /// The target exists / is not empty / is a directory, etc.
    Conflict,
    /// Not available in this mode (e.g. `AfterRestore` on a host).
    Unsupported,
    /// Too many connections or commands.
    Busy,
    /// Any other I/O error.
    Io,
    /// An internal error of the agent (e.g. the interpreter cannot be started).
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameError, read_frame, write_frame};

    #[test]
    fn every_request_round_trips_through_a_frame() {
        let requests = vec![
            Request::Echo {
                payload: vec![0, 1, 255],
            },
            Request::Info,
            Request::Exec(ExecRequest {
                code: "1+1".into(),
                timeout_ms: Some(5),
                env: [("A".to_string(), "b".to_string())].into(),
            }),
            Request::Shell(ShellRequest {
                command: ShellCommand::Argv(vec!["ls".into(), "-l".into()]),
                cwd: Some("/tmp".into()),
                env: BTreeMap::new(),
                stdin: vec![1, 2],
                timeout_ms: None,
            }),
            Request::WriteFile {
                path: "/a".into(),
                data: vec![0; 3],
                append: true,
                mode: Some(0o600),
            },
            Request::ReadFile {
                path: "/a".into(),
                offset: 7,
                max_len: None,
            },
            Request::ListDir { path: "/".into() },
            Request::Remove {
                path: "/a".into(),
                recursive: false,
            },
            Request::Interrupt,
            Request::AfterRestore {
                entropy: vec![9; 32],
                wall_clock_ns: 1 << 60,
            },
            Request::Poweroff,
        ];
        let mut buf = Vec::new();
        for r in &requests {
            write_frame(&mut buf, AGENT_PROTOCOL_VERSION, r).unwrap();
        }
        let mut rd = &buf[..];
        for r in &requests {
            let got: Request =
                read_frame(&mut rd, AGENT_PROTOCOL_VERSION, AGENT_FRAME_CAP).unwrap();
            assert_eq!(&got, r);
        }
        assert!(matches!(
            read_frame::<_, Request>(&mut rd, AGENT_PROTOCOL_VERSION, AGENT_FRAME_CAP),
            Err(FrameError::Eof)
        ));
    }

    #[test]
    fn streamed_parts_are_not_terminal_and_done_is() {
        assert!(!Response::Stdout(vec![]).is_terminal());
        assert!(!Response::Display(MimeBundle::default()).is_terminal());
        assert!(
            !Response::Error {
                ename: "E".into(),
                evalue: String::new(),
                traceback: vec![]
            }
            .is_terminal()
        );
        assert!(Response::Done(Done::default()).is_terminal());
        assert!(
            Response::Failed {
                kind: FailureKind::Io,
                message: String::new()
            }
            .is_terminal()
        );
    }

    #[test]
    fn mime_bundle_text_returns_utf8_only() {
        let mut b = MimeBundle::default();
        b.data.insert("text/plain".into(), b"2".to_vec());
        b.data.insert("image/png".into(), vec![0x89, 0xff]);
        assert_eq!(b.text("text/plain"), Some("2"));
        assert_eq!(b.text("image/png"), None);
        assert_eq!(b.get("image/png"), Some(&[0x89, 0xff][..]));
    }
}
