//! One vsock stream connection between a host unix socket and a guest port: state machine and
//! credit-based flow control (virtio 1.2, 5.10.6.3).

use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

/// Our receive buffer per connection: the most guest-to-host bytes we hold unflushed.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// We sent REQUEST to the guest (host-initiated) and wait for RESPONSE.
    LocalInit,
    /// Data flows both ways.
    Established,
    /// The guest shut down its sending side fully; flush what we hold, then RST.
    PeerClosing,
    /// The host closed its sending side (EOF); we sent SHUTDOWN(SEND). Guest data still
    /// flows to the host until the guest shuts down or resets.
    LocalClosing,
}

/// Flow control or state violation by the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more than our advertised buffer allows.
    #[error("guest exceeded its send credit")]
    CreditExceeded,
    /// Writing to the host socket failed.
    #[error("host socket write failed")]
    HostWrite,
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// State.
    pub state: ConnState,
    /// Host-side port (source port of our packets).
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    /// Guest's receive buffer size (from its last packet).
    pub peer_buf_alloc: u32,
    /// Guest's forwarded count (from its last packet).
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Bytes we have sent to the guest.
    pub tx_cnt: Wrapping<u32>,
    /// Guest bytes we have delivered to the host socket.
    pub fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    pub last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest bytes not yet written to the host socket (bounded by [`CONN_BUF_ALLOC`]).
    pub pending_to_host: Vec<u8>,
    /// The host socket may have data to read (edge-triggered readiness).
    pub host_readable: bool,
    /// We asked the guest for credit and are waiting.
    pub credit_requested: bool,
    /// The guest will send no more data: shut the host socket's write side once flushed.
    pub peer_send_closed: bool,
    /// The host socket's write side has been shut down.
    pub host_write_shut: bool,
    /// When a connection in a transient state (waiting for the guest's answer, draining
    /// after the guest closed) is reset if it is still there.
    pub deadline: Option<std::time::Instant>,
}

impl Connection {
    /// A connection over `stream` (already non-blocking).
    pub fn new(stream: UnixStream, state: ConnState, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            pending_to_host: Vec::new(),
            host_readable: false,
            credit_requested: false,
            peer_send_closed: false,
            host_write_shut: false,
            deadline: None,
        }
    }

    /// Records the guest's credit fields from any packet it sent.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Bytes we may still send to the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Accepts guest data for the host socket: writes what the socket takes now and keeps the
    /// rest (never more than our advertised buffer).
    pub fn push_to_host(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.pending_to_host.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(ConnError::CreditExceeded);
        }
        self.pending_to_host.extend_from_slice(data);
        self.flush_to_host()
    }

    /// Writes held guest data to the host socket until it would block.
    pub fn flush_to_host(&mut self) -> Result<(), ConnError> {
        let mut written = 0;
        while written < self.pending_to_host.len() {
            match self.stream.write(&self.pending_to_host[written..]) {
                Ok(0) => return Err(ConnError::HostWrite),
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(ConnError::HostWrite),
            }
        }
        self.pending_to_host.drain(..written);
        self.fwd_cnt += Wrapping(written as u32);
        Ok(())
    }

    /// True when the guest should hear about freed buffer space.
    pub fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_BUF_ALLOC / 2
    }

    /// Reads host data for the guest into `buf`, at most the guest's credit.
    /// `Ok(None)`: nothing to read now. `Ok(Some(0))`: the host closed its side.
    pub fn read_from_host(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        let max = buf.len().min(self.peer_credit() as usize);
        if max == 0 {
            return Ok(None);
        }
        loop {
            match self.stream.read(&mut buf[..max]) {
                Ok(n) => {
                    if n > 0 {
                        self.tx_cnt += Wrapping(n as u32);
                    } else {
                        self.host_readable = false;
                    }
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return Ok(None);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, ConnState::Established, 1 << 30, 1024), b)
    }

    #[test]
    fn peer_credit_accounts_for_bytes_in_flight_and_wraps() {
        let (mut conn, _peer) = pair();
        conn.update_peer_credit(1000, 0);
        conn.tx_cnt = Wrapping(600);
        assert_eq!(conn.peer_credit(), 400);

        conn.update_peer_credit(1000, 600);
        assert_eq!(conn.peer_credit(), 1000);

        conn.tx_cnt = Wrapping(5);
        conn.update_peer_credit(1000, u32::MAX - 10);
        assert_eq!(
            conn.peer_credit(),
            1000 - 16,
            "16 bytes in flight across the wrap"
        );
    }

    #[test]
    fn host_reads_never_exceed_guest_credit() {
        let (mut conn, mut peer) = pair();
        peer.write_all(&[7u8; 100]).unwrap();
        conn.update_peer_credit(10, 0);
        let mut buf = [0u8; 64];

        assert_eq!(conn.read_from_host(&mut buf).unwrap(), Some(10));
        assert_eq!(
            conn.read_from_host(&mut buf).unwrap(),
            None,
            "credit exhausted"
        );
        conn.update_peer_credit(10, 10);
        assert_eq!(conn.read_from_host(&mut buf).unwrap(), Some(10));
        assert_eq!(conn.tx_cnt.0, 20);
    }

    #[test]
    fn guest_data_beyond_our_buffer_is_a_credit_violation() {
        let (mut conn, _peer) = pair();
        // Nobody reads `_peer`: the socket buffer fills, the rest is held, up to the limit.
        let chunk = vec![1u8; 64 * 1024];
        let mut result = Ok(());
        for _ in 0..64 {
            result = conn.push_to_host(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(ConnError::CreditExceeded));
        assert!(conn.pending_to_host.len() <= CONN_BUF_ALLOC as usize);
    }

    #[test]
    fn delivered_bytes_trigger_a_credit_update_after_half_the_buffer() {
        let (mut conn, mut peer) = pair();
        let half = vec![0u8; (CONN_BUF_ALLOC / 2) as usize];
        let reader = std::thread::spawn(move || {
            let mut sink = vec![0u8; half.len()];
            peer.read_exact(&mut sink).unwrap();
        });

        conn.push_to_host(&vec![0u8; 1000]).unwrap();
        assert!(!conn.needs_credit_update());
        let mut rest = vec![0u8; (CONN_BUF_ALLOC / 2) as usize - 1000];
        conn.push_to_host(&rest).unwrap();
        while !conn.pending_to_host.is_empty() {
            conn.flush_to_host().unwrap();
            std::thread::yield_now();
        }
        rest.clear();
        reader.join().unwrap();

        assert!(conn.needs_credit_update());
        conn.last_fwd_cnt_sent = conn.fwd_cnt;
        assert!(!conn.needs_credit_update());
    }

    #[test]
    fn host_eof_reads_as_zero() {
        let (mut conn, peer) = pair();
        drop(peer);
        conn.update_peer_credit(100, 0);
        let mut buf = [0u8; 8];
        assert_eq!(conn.read_from_host(&mut buf).unwrap(), Some(0));
    }
}
