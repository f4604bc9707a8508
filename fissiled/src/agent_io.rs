//! An agent connection read and written on the async runtime: how an exec streams a cell's
//! responses without a thread of the blocking pool in between (one hop fewer per cell, and
//! per event, than [`AgentClient`]'s blocking calls). The frames are the agent protocol's
//! ([`fissile_proto::frame`]), under the same caps and deadlines.
//!
//! The socket is registered with the runtime for reading only. A Unix socket tells a writer
//! that it may write again each time its peer reads (the VMM taking a request off the
//! socket), and a registration for both would wake this side for that once per request, for
//! nothing: a request is a few bytes, written at once. Only a write that would block waits,
//! through a second registration made for that write alone.

use std::io::{Read as _, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use fissile_agent::AgentClient;
use fissile_agent::client::ClientError;
use fissile_proto::agent::{
    AGENT_FRAME_CAP, AGENT_PROTOCOL_VERSION, Done, Request, Response as AgentResponse,
};
use fissile_proto::frame::{FrameError, decode_body, encode_frame};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Bytes one read takes off the socket at most.
const READ_CHUNK: usize = 64 << 10;

/// One agent connection, between requests or in one.
#[derive(Debug)]
pub struct AsyncAgent {
    /// Non-blocking, registered for reading.
    sock: AsyncFd<UnixStream>,
    /// Bytes read and not yet decoded (at most one frame's beyond what was asked for).
    buf: Vec<u8>,
    /// Where reads land before they join `buf` (allocated on the first read).
    scratch: Vec<u8>,
}

impl AsyncAgent {
    /// Takes over an idle connection (an error when it is not between requests).
    pub fn from_client(agent: AgentClient) -> Result<AsyncAgent, ClientError> {
        let std = agent.into_idle_stream().ok_or_else(|| {
            ClientError::Unexpected("the agent connection was not between requests".into())
        })?;
        std.set_nonblocking(true).map_err(FrameError::Io)?;
        Ok(AsyncAgent {
            sock: register(std, Interest::READABLE).map_err(FrameError::Io)?,
            buf: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// True when this connection can carry another request: nothing unread here and, on the
    /// socket, nothing to read and no end of stream (a VMM closes its host-side streams when
    /// a merge or rollback resets the guest's vsock). One `MSG_PEEK`, not the runtime's
    /// readiness, which may not have seen a close yet. For the sandbox's pool.
    pub fn is_idle_and_open(&self) -> bool {
        self.buf.is_empty() && fissile_agent::client::socket_is_idle(self.sock.get_ref().as_fd())
    }

    /// Sends one request, before `deadline`.
    pub async fn send(
        &mut self,
        req: &Request,
        deadline: tokio::time::Instant,
        within: Duration,
    ) -> Result<(), ClientError> {
        let frame = encode_frame(AGENT_PROTOCOL_VERSION, req)?;
        match tokio::time::timeout_at(deadline, self.write_all(&frame)).await {
            Err(_) => Err(ClientError::Timeout(within)),
            Ok(r) => Ok(r.map_err(FrameError::Io)?),
        }
    }

    /// Writes `bytes` whole: at once when the socket takes them (a request almost always
    /// fits), else waiting for room through a registration for writing made here.
    async fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        let mut writable: Option<AsyncFd<std::os::fd::OwnedFd>> = None;
        while !bytes.is_empty() {
            let written = match &writable {
                None => match self.sock.get_ref().write(bytes) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let fd = self.sock.get_ref().as_fd().try_clone_to_owned()?;
                        writable = Some(register(fd, Interest::WRITABLE)?);
                        continue;
                    }
                    r => r,
                },
                Some(w) => {
                    let mut ready = w.writable().await?;
                    match ready.try_io(|_| self.sock.get_ref().write(bytes)) {
                        Ok(r) => r,
                        Err(_would_block) => continue,
                    }
                }
            };
            match written {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what the socket has (waiting until it has something) onto `buf`; 0 at its end.
    async fn read_some(&mut self) -> std::io::Result<usize> {
        if self.scratch.is_empty() {
            self.scratch = vec![0; READ_CHUNK];
        }
        loop {
            let mut ready = self.sock.readable().await?;
            match ready.try_io(|s| s.get_ref().read(&mut self.scratch)) {
                Ok(Ok(n)) => {
                    self.buf.extend_from_slice(&self.scratch[..n]);
                    return Ok(n);
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }

    /// Receives one response before `deadline` (`within` names it in the error). Cancel-safe:
    /// dropped while it waits, it has lost nothing (what it read stays buffered).
    pub async fn recv(
        &mut self,
        deadline: tokio::time::Instant,
        within: Duration,
    ) -> Result<AgentResponse, ClientError> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(frame);
            }
            // Checked before every read, not only when one waits: a guest whose output is
            // always ready must not stretch the deadline either.
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Timeout(within));
            }
            match tokio::time::timeout_at(deadline, self.read_some()).await {
                Err(_) => return Err(ClientError::Timeout(within)),
                Ok(Ok(0)) if self.buf.is_empty() => return Err(FrameError::Eof.into()),
                Ok(Ok(0)) => return Err(FrameError::Truncated.into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(FrameError::Io(e).into()),
            }
        }
    }

    /// The first whole frame already read, decoded and consumed, if there is one (never
    /// waits).
    pub fn buffered(&mut self) -> Result<Option<AgentResponse>, ClientError> {
        let Some(&[a, b, c, d]) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([a, b, c, d]);
        if len == 0 {
            return Err(FrameError::Empty.into());
        }
        if len > AGENT_FRAME_CAP {
            return Err(FrameError::TooLarge {
                len: u64::from(len),
                cap: AGENT_FRAME_CAP,
            }
            .into());
        }
        let end = 4 + len as usize;
        let Some(body) = self.buf.get(4..end) else {
            return Ok(None);
        };
        let response = decode_body(body, AGENT_PROTOCOL_VERSION);
        self.buf.drain(..end);
        Ok(Some(response?))
    }
}

/// A type that owns one descriptor for its whole life: what [`register`] takes.
trait OwnsFd: std::os::fd::AsRawFd {}
impl OwnsFd for UnixStream {}
impl OwnsFd for std::os::fd::OwnedFd {}

/// `fd` registered with the runtime for `interest` only (this module's one `unsafe`: tokio's
/// safe constructors are deprecated, since they cannot know that a descriptor stays open).
fn register<T: OwnsFd>(fd: T, interest: Interest) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `T` is a `UnixStream` or an `OwnedFd` (`OwnsFd` is this module's and has no
    // other implementation): each owns one descriptor, which `as_raw_fd` always names and
    // which stays open while the `AsyncFd` holds `fd`; nothing in this module takes it out
    // (`into_inner`) or closes it, and dropping the `AsyncFd` deregisters it before closing it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// What a request's terminal response means: `Done`, or the agent's failure as
/// [`ClientError::Failed`] (anything else is unexpected).
pub fn outcome(r: AgentResponse) -> Result<Done, ClientError> {
    match r {
        AgentResponse::Done(d) => Ok(d),
        AgentResponse::Failed { kind, message } => Err(ClientError::Failed { kind, message }),
        r => Err(fissile_agent::client::unexpected(&r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fissile_proto::frame::write_frame;

    /// A peer speaking the protocol's frames over a socket pair (no agent: this checks the
    /// framing, caps and deadlines; the lab's API suite runs cells through real agents).
    fn pair() -> (AsyncAgent, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let agent = AsyncAgent::from_client(AgentClient::from_connected(a).unwrap()).unwrap();
        (agent, b)
    }

    fn soon() -> (tokio::time::Instant, Duration) {
        let within = Duration::from_secs(5);
        (tokio::time::Instant::now() + within, within)
    }

    #[tokio::test]
    async fn frames_split_anyhow_are_read_whole_and_in_order_and_reusable_until_closed() {
        let (mut agent, mut peer) = pair();
        let (deadline, within) = soon();
        agent.send(&Request::Info, deadline, within).await.unwrap();
        let sent: Request =
            fissile_proto::frame::read_frame(&mut peer, AGENT_PROTOCOL_VERSION, AGENT_FRAME_CAP)
                .unwrap();
        assert!(matches!(sent, Request::Info));
        // Two frames written a byte at a time, then one whole.
        let mut bytes = Vec::new();
        write_frame(
            &mut bytes,
            AGENT_PROTOCOL_VERSION,
            &AgentResponse::Stdout(b"hi".to_vec()),
        )
        .unwrap();
        write_frame(
            &mut bytes,
            AGENT_PROTOCOL_VERSION,
            &AgentResponse::Done(Done::default()),
        )
        .unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            for b in &bytes {
                peer.write_all(std::slice::from_ref(b)).unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
            peer
        });
        let first = agent.recv(deadline, within).await.unwrap();
        assert!(
            matches!(first, AgentResponse::Stdout(ref d) if d == b"hi"),
            "{first:?}"
        );
        let second = agent.recv(deadline, within).await.unwrap();
        assert!(matches!(second, AgentResponse::Done(_)), "{second:?}");
        let peer = writer.join().unwrap();
        assert!(agent.is_idle_and_open(), "between requests");
        drop(peer);
        assert!(
            !agent.is_idle_and_open(),
            "a connection its peer closed is not reusable"
        );
    }

    /// A request larger than the socket's buffer waits for room (the registration for
    /// writing made for it) and arrives whole; one the peer never reads ends at its deadline.
    #[tokio::test]
    async fn a_request_larger_than_the_socket_buffer_is_written_whole_or_times_out() {
        use fissile_proto::agent::ExecRequest;
        let code = "x".repeat(4 << 20);
        let req = Request::Exec(ExecRequest {
            code: code.clone(),
            ..ExecRequest::default()
        });
        let (mut agent, mut peer) = pair();
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let got: Request = fissile_proto::frame::read_frame(
                &mut peer,
                AGENT_PROTOCOL_VERSION,
                AGENT_FRAME_CAP,
            )
            .unwrap();
            (got, peer)
        });
        let (deadline, within) = soon();
        agent.send(&req, deadline, within).await.unwrap();
        let (got, _peer) = reader.join().unwrap();
        assert!(matches!(got, Request::Exec(ref e) if e.code == code));

        let (mut agent, _peer) = pair();
        let within = Duration::from_millis(100);
        let deadline = tokio::time::Instant::now() + within;
        let e = agent.send(&req, deadline, within).await.unwrap_err();
        assert!(matches!(e, ClientError::Timeout(_)), "{e:?}");
    }

    #[tokio::test]
    async fn oversized_empty_and_cut_frames_and_silence_are_errors() {
        use std::io::Write;
        let (mut agent, mut peer) = pair();
        let (deadline, within) = soon();
        peer.write_all(&(AGENT_FRAME_CAP + 1).to_le_bytes())
            .unwrap();
        let e = agent.recv(deadline, within).await.unwrap_err();
        assert!(
            matches!(e, ClientError::Frame(FrameError::TooLarge { .. })),
            "{e:?}"
        );

        let (mut agent, mut peer) = pair();
        peer.write_all(&0u32.to_le_bytes()).unwrap();
        let e = agent.recv(deadline, within).await.unwrap_err();
        assert!(matches!(e, ClientError::Frame(FrameError::Empty)), "{e:?}");

        let (mut agent, mut peer) = pair();
        peer.write_all(&[9, 0, 0, 0, AGENT_PROTOCOL_VERSION])
            .unwrap();
        drop(peer);
        let e = agent.recv(deadline, within).await.unwrap_err();
        assert!(
            matches!(e, ClientError::Frame(FrameError::Truncated)),
            "{e:?}"
        );
        assert!(!agent.is_idle_and_open(), "half a frame is not idle");

        // Output that is always ready does not stretch the deadline.
        let (mut agent, mut peer) = pair();
        let mut bytes = Vec::new();
        for _ in 0..64 {
            write_frame(
                &mut bytes,
                AGENT_PROTOCOL_VERSION,
                &AgentResponse::Stdout(vec![b'x'; 1000]),
            )
            .unwrap();
        }
        peer.write_all(&bytes).unwrap();
        let within = Duration::from_millis(50);
        let deadline = tokio::time::Instant::now() + within;
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut read = 0;
        let e = loop {
            match agent.recv(deadline, within).await {
                Ok(_) => read += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(e, ClientError::Timeout(_)), "{e:?}");
        assert!(read < 64, "read all {read} frames past the deadline");

        let (mut agent, _peer) = pair();
        let within = Duration::from_millis(100);
        let e = agent
            .recv(tokio::time::Instant::now() + within, within)
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Timeout(_)), "{e:?}");
    }
}
