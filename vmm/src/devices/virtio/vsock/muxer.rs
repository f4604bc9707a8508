//! The vsock backend: host unix sockets on one side, the guest's rx/tx/event queues on the
//! other. Host clients connect to the listening socket and write `CONNECT <port>\n`; we open
//! a stream to that guest port and answer `OK <host port>\n` once the guest accepts (the
//! Firecracker hybrid-vsock convention). Guest connections to host port P are forwarded to
//! `<uds path>_P` if such a socket exists.
//!
//! Bounded memory: at most [`MAX_CONNECTIONS`] connections (handshakes and connections held
//! for a transport reset included), [`CONN_BUF_ALLOC`] held bytes per connection,
//! [`MAX_PENDING_CONTROL`] queued control packets, one 64 KiB bounce buffer.
//!
//! Bounded time (Firecracker's connection timers): a host client must finish its `CONNECT`
//! line within [`HANDSHAKE_TIMEOUT`]; the guest must answer a connection request within
//! [`CONN_REQUEST_TIMEOUT`]; a connection the guest closed must drain to the host within
//! [`CONN_SHUTDOWN_TIMEOUT`]. [`VsockBackend::tick`] (the event thread, every [`TICK`] while a
//! timer is armed) reaps what overstays. With no timer armed the event thread sleeps until a
//! host socket or the guest needs it (at most [`IDLE_WAIT`]), so an idle VM's VMM does not
//! wake twice a second; a timer armed meanwhile on another thread wakes it. Connecting to a
//! host listener for a guest connection never blocks (a full backlog resets the guest's
//! request), so a vCPU thread never waits on a host.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::connection::{CONN_BUF_ALLOC, ConnState, Connection};
use super::packet::*;
use crate::devices::virtio::chain::{LogLimiter, collect_chain};
use crate::devices::virtio::{INT_VRING, IrqTrigger};
use crate::memory::GuestMemory;

/// Largest payload we send or accept per packet.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Most simultaneous connections (host- or guest-initiated, including half-open ones).
pub const MAX_CONNECTIONS: usize = 256;
/// Most control packets waiting for rx buffers.
pub const MAX_PENDING_CONTROL: usize = 1024;
/// Longest accepted `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Most tx packets handled per notification (the largest queue size).
const MAX_TX_PER_NOTIFY: usize = 32768;
/// First host-side port number we hand out.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// A random first host-side port in `FIRST_LOCAL_PORT..2^31`. Each VMM numbers its host
/// connections from its own random start: a guest restored from a snapshot (a fork child,
/// a resumed space) may still hold state for the ports its parent's VMM used, and reusing
/// the same (host port, guest port) pair would collide with it.
fn random_first_port() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    FIRST_LOCAL_PORT + (h.finish() as u32 % FIRST_LOCAL_PORT)
}

/// How long host connections wait for the guest to acknowledge a transport reset.
const RESET_ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a host client may take to send its `CONNECT <port>` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to answer our connection request.
pub const CONN_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection the guest shut down may take to drain to the host.
pub const CONN_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the event thread runs [`VsockBackend::tick`] while a timer is armed.
pub const TICK: Duration = Duration::from_millis(500);
/// The event thread's longest sleep with no timer armed (nothing is due then: this only
/// bounds the wait).
pub const IDLE_WAIT: Duration = Duration::from_secs(30);

/// Event id: transport reset (virtio 1.2, 5.10.6.5).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Queue indexes.
pub const RXQ: usize = 0;
/// Transmit queue (guest to host).
pub const TXQ: usize = 1;
/// Event queue.
pub const EVQ: usize = 2;

/// Key of a connection: (host-side port, guest-side port).
pub type ConnKey = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Listener,
    Wakeup,
    /// The backend's own eventfd: a timer was armed while the event thread slept.
    TimerKick,
    Handshake,
    Conn(ConnKey),
}

/// A host client that has not finished its `CONNECT` line yet.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

#[derive(Debug)]
struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    irq: Arc<IrqTrigger>,
}

/// Backend state; lives behind a mutex shared by the vCPU threads (queue notifications) and
/// the vsock event thread (host socket readiness).
#[derive(Debug)]
pub struct VsockBackend {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Arc<Epoll>,
    owners: HashMap<RawFd, Owner>,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<ConnKey, Connection>,
    control: VecDeque<(ConnKey, u16, u32)>,
    next_local_port: u32,
    active: Option<Active>,
    buf: Vec<u8>,
    log: LogLimiter,
    paused: bool,
    /// When the current pause began (its length is not counted against the timers).
    paused_at: Option<Instant>,
    /// When a transport reset was sent that the guest has not acknowledged yet.
    reset_pending: Option<Instant>,
    /// Host connections waiting for that acknowledgement.
    deferred: Vec<(UnixStream, u32)>,
    /// A transport reset is owed since a restore (sent on resume).
    owe_reset: bool,
    /// Written when a timer is armed while the event thread sleeps [`IDLE_WAIT`].
    timer_kick: EventFd,
    /// The event thread chose [`IDLE_WAIT`] for its current sleep (no timer was armed).
    sleeping: bool,
}

/// Creating the backend failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Binding the host unix socket.
    #[error("binding vsock socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    /// epoll setup.
    #[error("vsock epoll setup")]
    Epoll(#[source] std::io::Error),
    /// Spawning the event thread.
    #[error("spawning the vsock thread")]
    Thread(#[source] std::io::Error),
}

impl VsockBackend {
    /// Binds `uds_path` (replacing a stale socket) and registers it with `epoll`.
    pub fn new(guest_cid: u64, uds_path: &Path, epoll: Arc<Epoll>) -> Result<Self, VsockError> {
        if uds_path.exists() {
            let _ = std::fs::remove_file(uds_path);
        }
        let listener = UnixListener::bind(uds_path)
            .map_err(|e| VsockError::Bind(uds_path.to_path_buf(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VsockError::Bind(uds_path.to_path_buf(), e))?;
        let fd = listener.as_raw_fd();
        watch_readable(&epoll, fd).map_err(VsockError::Epoll)?;
        let timer_kick =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VsockError::Epoll)?;
        let kick_fd = timer_kick.as_raw_fd();
        watch_readable(&epoll, kick_fd).map_err(VsockError::Epoll)?;
        let mut owners = HashMap::new();
        owners.insert(fd, Owner::Listener);
        owners.insert(kick_fd, Owner::TimerKick);
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            owners,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: random_first_port(),
            active: None,
            buf: vec![0; MAX_PKT_PAYLOAD],
            log: LogLimiter::default(),
            paused: false,
            paused_at: None,
            reset_pending: None,
            deferred: Vec::new(),
            owe_reset: false,
            timer_kick,
            sleeping: false,
        })
    }

    /// True while a timer runs: a transport reset waiting for its acknowledgement, a
    /// handshake, a held host client, or a connection with a deadline.
    pub fn timers_armed(&self) -> bool {
        self.reset_pending.is_some()
            || !self.handshakes.is_empty()
            || !self.deferred.is_empty()
            || self.conns.values().any(|c| c.deadline.is_some())
    }

    /// How long the event thread may sleep before its next [`VsockBackend::tick`]: [`TICK`]
    /// while a timer is armed, else [`IDLE_WAIT`], and then a timer armed on another thread
    /// before the thread wakes again wakes it through the backend's kick eventfd.
    pub fn next_wait(&mut self) -> Duration {
        self.sleeping = !self.timers_armed();
        if self.sleeping { IDLE_WAIT } else { TICK }
    }

    /// Called by the event thread, under the lock, as it wakes.
    pub fn woke(&mut self) {
        self.sleeping = false;
    }

    /// Wakes an event thread in its long sleep when a timer has been armed since: every
    /// entry point other threads call (queue notifications, pause and resume) ends here.
    fn kick_if_armed(&mut self) {
        if self.sleeping && self.timers_armed() {
            self.sleeping = false;
            if let Err(e) = self.timer_kick.write(1) {
                tracing::warn!(error = %e, "vsock: waking the event thread failed");
            }
        }
    }

    /// Registers an fd whose readiness only wakes the loop (e.g. a stop eventfd).
    pub fn add_wakeup_fd(&mut self, fd: RawFd) -> std::io::Result<()> {
        watch_readable(&self.epoll, fd)?;
        self.owners.insert(fd, Owner::Wakeup);
        Ok(())
    }

    /// Guest CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// State of a connection.
    pub fn connection_state(&self, key: ConnKey) -> Option<ConnState> {
        self.conns.get(&key).map(|c| c.state)
    }

    /// Starts using the guest's queues.
    pub fn activate(&mut self, mem: GuestMemory, queues: Vec<Queue>, irq: Arc<IrqTrigger>) {
        self.active = Some(Active { mem, queues, irq });
        self.process_rx();
    }

    /// The live queues' state (empty when not activated).
    pub fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .flat_map(|a| a.queues.iter().map(|q| q.state()))
            .collect()
    }

    /// Stops (`true`) or restarts handling host socket readiness (snapshot pause). A
    /// transport reset owed since a restore is delivered on restart.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        if paused {
            self.paused_at.get_or_insert_with(Instant::now);
        } else if let Some(at) = self.paused_at.take() {
            // Nobody could act during the pause (the guest did not run, host data waited):
            // the handshake, connection and reset timers resume where they stopped.
            let pause = at.elapsed();
            for h in self.handshakes.values_mut() {
                h.since += pause;
            }
            for c in self.conns.values_mut() {
                if let Some(d) = c.deadline.as_mut() {
                    *d += pause;
                }
            }
            if let Some(t) = self.reset_pending.as_mut() {
                *t += pause;
            }
        }
        if !paused && std::mem::take(&mut self.owe_reset) {
            // Without an event buffer to carry it the guest never acknowledges: go on.
            if !self.send_transport_reset() {
                self.reset_done();
            }
        }
        self.kick_if_armed();
    }

    /// Owes the guest a transport reset, delivered when the VM runs again (after a restore).
    pub fn reset_on_resume(&mut self) {
        self.drop_all_connections();
        self.owe_reset = true;
    }

    /// The muxer's state in one line (diagnosis): pause and reset state, connections by
    /// state, held host clients, queued control packets, the device's queue indices.
    pub fn debug_state(&self) -> String {
        let mut states: Vec<String> = self
            .conns
            .values()
            .map(|c| format!("{}->{} {:?}", c.local_port, c.peer_port, c.state))
            .collect();
        states.sort();
        let queues: Vec<String> = self
            .active
            .iter()
            .flat_map(|a| a.queues.iter())
            .map(|q| format!("avail {} used {}", q.next_avail(), q.next_used()))
            .collect();
        format!(
            "paused {}, sleeping {}, owe_reset {}, reset_pending {:?}, deferred {}, handshakes {}, control queued {}, active {}, queues [{}], conns [{}]",
            self.paused,
            self.sleeping,
            self.owe_reset,
            self.reset_pending.map(|t| t.elapsed()),
            self.deferred.len(),
            self.handshakes.len(),
            self.control.len(),
            self.active.is_some(),
            queues.join("; "),
            states.join(", ")
        )
    }

    /// True while paused for a snapshot.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Forgets the queues and every connection (driver reset).
    pub fn reset(&mut self) {
        self.active = None;
        self.drop_all_connections();
    }

    fn drop_all_connections(&mut self) {
        for (_, conn) in self.conns.drain() {
            let fd = conn.stream.as_raw_fd();
            self.owners.remove(&fd);
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.control.clear();
    }

    /// Handles readiness of `fd` reported by epoll.
    pub fn handle_event(&mut self, fd: RawFd, events: EventSet) {
        match self.owners.get(&fd).copied() {
            Some(Owner::Listener) => self.accept_all(),
            Some(Owner::Wakeup) | None => {}
            Some(Owner::TimerKick) => {
                // Level-triggered: drain it, or every wait would end at once.
                let _ = self.timer_kick.read();
            }
            Some(Owner::Handshake) => self.read_handshake(fd),
            Some(Owner::Conn(key)) => self.conn_ready(key, events),
        }
        self.process_rx();
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.live() >= MAX_CONNECTIONS {
                        if self.log.allow() {
                            tracing::warn!("vsock: connection limit reached; refusing host client");
                        }
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if watch_readable(&self.epoll, fd).is_err() {
                        continue;
                    }
                    self.owners.insert(fd, Owner::Handshake);
                    self.handshakes.insert(
                        fd,
                        Handshake {
                            stream,
                            line: Vec::new(),
                            since: Instant::now(),
                        },
                    );
                    // A client writes its line as soon as it is connected, often before
                    // the accept: read it now rather than after another epoll round.
                    self.read_handshake(fd);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed");
                    return;
                }
            }
        }
    }

    fn close_handshake(&mut self, fd: RawFd) -> Option<Handshake> {
        self.owners.remove(&fd);
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.handshakes.remove(&fd)
    }

    /// Reads the `CONNECT <port>\n` line, and no data after it (a waking client's first
    /// frames follow the line; they wait in the socket until the guest has accepted).
    fn read_handshake(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        match fissile_proto::uds::read_line_unbuffered(&hs.stream, &mut hs.line, MAX_CONNECT_LINE) {
            Ok(true) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Ok(false) | Err(_) => {
                self.close_handshake(fd);
                return;
            }
        }
        let Some(mut hs) = self.close_handshake(fd) else {
            return;
        };
        let Some(port) = parse_connect(&hs.line) else {
            let _ = hs.stream.write_all(b"ERR bad CONNECT line\n");
            return;
        };
        if self.reset_pending.is_some() || self.owe_reset {
            // The guest has not processed the transport reset yet: a connection request
            // now could be handled before the reset, which would then kill it.
            if self.live() >= MAX_CONNECTIONS {
                let _ = hs.stream.write_all(b"ERR too many connections\n");
                return;
            }
            self.deferred.push((hs.stream, port));
            return;
        }
        self.start_host_connection(hs.stream, port);
    }

    /// Connections, handshakes and held host clients: what counts against
    /// [`MAX_CONNECTIONS`].
    fn live(&self) -> usize {
        self.conns.len() + self.handshakes.len() + self.deferred.len()
    }

    fn start_host_connection(&mut self, stream: UnixStream, port: u32) {
        let local_port = self.allocate_local_port(port);
        let mut conn = Connection::new(stream, ConnState::LocalInit, local_port, port);
        conn.deadline = Some(Instant::now() + CONN_REQUEST_TIMEOUT);
        if self.insert_conn(conn) {
            self.queue_control((local_port, port), OP_REQUEST, 0);
        }
    }

    /// The guest processed our transport reset (it re-posted an event buffer), or we gave
    /// up waiting: start the host connections held meanwhile.
    fn reset_done(&mut self) {
        self.reset_pending = None;
        if self.owe_reset {
            return;
        }
        for (stream, port) in std::mem::take(&mut self.deferred) {
            self.start_host_connection(stream, port);
        }
        self.process_rx();
    }

    /// Periodic housekeeping from the event thread (see [`VsockBackend::tick_at`]).
    pub fn tick(&mut self) {
        self.tick_at(Instant::now());
    }

    /// Housekeeping as of `now`: ends a transport-reset wait the guest never acknowledged,
    /// closes handshakes that never finished, resets connections the guest never answered
    /// and closed ones that never drained.
    pub fn tick_at(&mut self, now: Instant) {
        if self
            .reset_pending
            .is_some_and(|t| now.duration_since(t) > RESET_ACK_TIMEOUT)
        {
            tracing::debug!("vsock: guest did not acknowledge the transport reset; going on");
            self.reset_done();
        }
        let stale: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| now.duration_since(h.since) > HANDSHAKE_TIMEOUT)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            if let Some(mut hs) = self.close_handshake(fd) {
                let _ = hs.stream.write_all(b"ERR no CONNECT line in time\n");
            }
        }
        let expired: Vec<(ConnKey, ConnState)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| now > d))
            .map(|(k, c)| (*k, c.state))
            .collect();
        for (key, state) in expired {
            if self.log.allow() {
                tracing::debug!(?key, ?state, "vsock: connection timed out; resetting");
            }
            if state == ConnState::LocalInit
                && let Some(conn) = self.conns.get_mut(&key)
            {
                let _ = conn
                    .stream
                    .write_all(b"ERR the guest did not accept in time\n");
            }
            self.reset_conn(key);
        }
        self.process_rx();
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    fn insert_conn(&mut self, conn: Connection) -> bool {
        let key = (conn.local_port, conn.peer_port);
        let fd = conn.stream.as_raw_fd();
        let ev = EpollEvent::new(
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            fd as u64,
        );
        if self.epoll.ctl(ControlOperation::Add, fd, ev).is_err() {
            return false;
        }
        self.owners.insert(fd, Owner::Conn(key));
        self.conns.insert(key, conn);
        true
    }

    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            self.owners.remove(&fd);
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    fn reset_conn(&mut self, key: ConnKey) {
        self.remove_conn(key);
        self.queue_control(key, OP_RST, 0);
    }

    fn queue_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        tracing::trace!(op, ?key, "vsock: control packet to the guest");
        if self.control.len() >= MAX_PENDING_CONTROL {
            if self.log.allow() {
                tracing::warn!(op, "vsock: control queue full; packet dropped");
            }
            return;
        }
        self.control.push_back((key, op, flags));
    }

    fn conn_ready(&mut self, key: ConnKey, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
        {
            conn.host_readable = true;
        }
        if events.contains(EventSet::OUT) && !conn.pending_to_host.is_empty() {
            if conn.flush_to_host().is_err() {
                self.reset_conn(key);
                return;
            }
            self.after_host_write(key);
        }
    }

    /// After guest data reached the host socket: credit updates and deferred closes.
    fn after_host_write(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.state == ConnState::PeerClosing && conn.pending_to_host.is_empty() {
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            self.reset_conn(key);
            return;
        }
        if conn.peer_send_closed && !conn.host_write_shut && conn.pending_to_host.is_empty() {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            conn.host_write_shut = true;
        }
        if conn.needs_credit_update() {
            self.queue_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    /// Notification on any queue: drain tx, then fill rx.
    pub fn notify(&mut self, queue: usize) {
        if queue == TXQ {
            self.process_tx();
        }
        if queue == EVQ {
            // The guest refills the event queue right after handling an event.
            self.reset_done();
        }
        self.process_rx();
        self.kick_if_armed();
    }

    /// Handles every packet the guest has sent (at most one queue's worth per call).
    pub fn process_tx(&mut self) {
        let mut used = false;
        for _ in 0..MAX_TX_PER_NOTIFY {
            let parsed = {
                let Some(active) = self.active.as_mut() else {
                    return;
                };
                let mem = &active.mem;
                let Some(txq) = active.queues.get_mut(TXQ) else {
                    return;
                };
                let max = usize::from(txq.size());
                let Some(chain) = txq.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                let parsed = collect_chain(chain, max)
                    .map_err(|e| e.to_string())
                    .and_then(|d| read_packet(mem, &d, &mut self.buf));
                let _ = txq.add_used(mem, head, 0);
                used = true;
                parsed
            };
            match parsed {
                Ok((hdr, len)) => {
                    let payload = std::mem::take(&mut self.buf);
                    self.handle_guest_packet(&hdr, &payload[..len]);
                    self.buf = payload;
                }
                Err(why) => {
                    if self.log.allow() {
                        tracing::warn!(why, "vsock: dropped malformed tx packet");
                    }
                }
            }
        }
        if used {
            self.signal_used(TXQ);
        }
    }

    /// One packet from the guest.
    pub fn handle_guest_packet(&mut self, hdr: &VsockHeader, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            if self.log.allow() {
                tracing::warn!(
                    src = hdr.src_cid,
                    dst = hdr.dst_cid,
                    "vsock: packet with wrong CIDs dropped"
                );
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        tracing::trace!(op = hdr.op, ?key, len = hdr.len, "vsock: guest packet");
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.queue_control(key, OP_RST, 0);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(key, hdr),
                OP_RST => {}
                _ => self.queue_control(key, OP_RST, 0),
            }
            return;
        };
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        match (hdr.op, conn.state) {
            (OP_RESPONSE, ConnState::LocalInit) => {
                conn.state = ConnState::Established;
                conn.deadline = None;
                let line = format!("OK {}\n", conn.local_port);
                if conn.stream.write_all(line.as_bytes()).is_err() {
                    self.reset_conn(key);
                    return;
                }
                conn.host_readable = true;
            }
            (OP_RW, ConnState::Established | ConnState::LocalClosing) => {
                if let Err(e) = conn.push_to_host(payload) {
                    if self.log.allow() {
                        tracing::warn!(error = %e, "vsock: resetting connection");
                    }
                    self.reset_conn(key);
                    return;
                }
                self.after_host_write(key);
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => self.queue_control(key, OP_CREDIT_UPDATE, 0),
            (OP_SHUTDOWN, _) => {
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    conn.peer_send_closed = true;
                }
                if hdr.flags & SHUTDOWN_SEND != 0 && hdr.flags & SHUTDOWN_RCV != 0 {
                    conn.state = ConnState::PeerClosing;
                    conn.deadline = Some(Instant::now() + CONN_SHUTDOWN_TIMEOUT);
                }
                self.after_host_write(key);
            }
            (OP_RST, _) => self.remove_conn(key),
            _ => self.reset_conn(key),
        }
    }

    /// The guest connects to host port `key.0`: forward to `<uds>_<port>` if it exists.
    /// Runs on a vCPU thread: the connect never blocks (a listener with a full backlog
    /// resets the request).
    fn guest_connect(&mut self, key: ConnKey, hdr: &VsockHeader) {
        if self.live() >= MAX_CONNECTIONS {
            self.queue_control(key, OP_RST, 0);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.0));
        let Ok(stream) = connect_nonblocking(Path::new(&path)) else {
            self.queue_control(key, OP_RST, 0);
            return;
        };
        let mut conn = Connection::new(stream, ConnState::Established, key.0, key.1);
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        if self.insert_conn(conn) {
            self.queue_control(key, OP_RESPONSE, 0);
        } else {
            self.queue_control(key, OP_RST, 0);
        }
    }

    fn header_for(&self, key: ConnKey, op: u16, flags: u32, len: u32) -> VsockHeader {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt.0);
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt,
        }
    }

    /// Fills guest rx buffers: queued control packets first, then host data within credit.
    pub fn process_rx(&mut self) {
        let mut used = false;
        loop {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let mem = active.mem.clone();
            let Some(rxq) = active.queues.get_mut(RXQ) else {
                return;
            };
            let max = usize::from(rxq.size());
            let Some(chain) = rxq.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let descs = match collect_chain(chain, max) {
                Ok(d) if d.iter().all(|d| d.is_write_only()) && capacity(&d) >= HDR_SIZE => d,
                _ => {
                    if self.log.allow() {
                        tracing::warn!("vsock: unusable rx buffer dropped");
                    }
                    let _ = self.rx_queue().map(|q| q.add_used(&mem, head, 0));
                    used = true;
                    continue;
                }
            };
            match self.next_rx_packet(capacity(&descs) - HDR_SIZE) {
                Some((hdr, payload_len)) => {
                    let written =
                        write_descs(&mem, &descs, &[&hdr.to_bytes(), &self.buf[..payload_len]]);
                    let _ = self
                        .rx_queue()
                        .map(|q| q.add_used(&mem, head, written as u32));
                    if let Some(conn) = self.conns.get_mut(&(hdr.src_port, hdr.dst_port)) {
                        conn.last_fwd_cnt_sent = Wrapping(hdr.fwd_cnt);
                    }
                    used = true;
                }
                None => {
                    if let Some(q) = self.rx_queue() {
                        q.go_to_previous_position();
                    }
                    break;
                }
            }
        }
        if used {
            self.signal_used(RXQ);
        }
    }

    /// Interrupts the guest for queue `index` unless it suppressed notifications.
    fn signal_used(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let notify = active
            .queues
            .get_mut(index)
            .is_some_and(|q| q.needs_notification(mem).unwrap_or(true));
        if notify {
            active.irq.trigger(INT_VRING);
        }
    }

    fn rx_queue(&mut self) -> Option<&mut Queue> {
        self.active.as_mut()?.queues.get_mut(RXQ)
    }

    /// The next packet for the guest; its payload (if any) is in `self.buf`.
    fn next_rx_packet(&mut self, room: usize) -> Option<(VsockHeader, usize)> {
        if let Some((key, op, flags)) = self.control.pop_front() {
            return Some((self.header_for(key, op, flags, 0), 0));
        }
        let room = room.min(self.buf.len());
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.host_readable && c.state == ConnState::Established)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if conn.peer_credit() == 0 {
                if !conn.credit_requested {
                    conn.credit_requested = true;
                    return Some((self.header_for(key, OP_CREDIT_REQUEST, 0, 0), 0));
                }
                continue;
            }
            match conn.read_from_host(&mut self.buf[..room]) {
                Ok(Some(0)) => {
                    conn.state = ConnState::LocalClosing;
                    // EOF only says the host will send no more; it may still read.
                    return Some((self.header_for(key, OP_SHUTDOWN, SHUTDOWN_SEND, 0), 0));
                }
                Ok(Some(n)) => return Some((self.header_for(key, OP_RW, 0, n as u32), n)),
                Ok(None) => {}
                Err(_) => {
                    self.remove_conn(key);
                    return Some((self.header_for(key, OP_RST, 0, 0), 0));
                }
            }
        }
        None
    }

    /// Tells the guest driver that all connections are gone (after restore/fork); the
    /// acknowledgement timer runs from now.
    pub fn send_transport_reset(&mut self) -> bool {
        let sent = self.write_reset_event();
        if sent {
            self.reset_pending = Some(Instant::now());
            self.kick_if_armed();
        }
        sent
    }

    /// Drops every connection and puts a transport-reset event in the guest's event queue;
    /// true when the guest got it.
    fn write_reset_event(&mut self) -> bool {
        self.drop_all_connections();
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = &active.mem;
        let Some(evq) = active.queues.get_mut(EVQ) else {
            return false;
        };
        let max = usize::from(evq.size());
        let Some(chain) = evq.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let written = match collect_chain(chain, max) {
            Ok(d) if d.iter().all(|d| d.is_write_only()) => {
                write_descs(mem, &d, &[&EVENT_TRANSPORT_RESET.to_le_bytes()])
            }
            _ => 0,
        };
        let _ = evq.add_used(mem, head, written as u32);
        active.irq.trigger(INT_VRING);
        written == 4
    }
}

/// Adds `fd` to `epoll`, level-triggered for reading, with the fd as its token.
fn watch_readable(epoll: &Epoll, fd: RawFd) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, fd as u64),
    )
}

/// A non-blocking stream connected to the unix socket at `path`, or an error at once (no
/// listener, or its backlog is full: `EAGAIN`).
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

/// Parses `CONNECT <port>` (the newline already stripped; a trailing `\r` is tolerated).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = text.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

fn capacity(descs: &[Descriptor]) -> usize {
    descs.iter().map(|d| d.len() as usize).sum()
}

/// Reads header + payload from device-readable descriptors. Payload goes to `buf`.
fn read_packet(
    mem: &GuestMemory,
    descs: &[Descriptor],
    buf: &mut [u8],
) -> Result<(VsockHeader, usize), String> {
    if descs.iter().any(|d| d.is_write_only()) {
        return Err("tx descriptor is device-writable".into());
    }
    let total = capacity(descs);
    if total < HDR_SIZE {
        return Err("tx packet shorter than the header".into());
    }
    let mut hdr_bytes = [0u8; HDR_SIZE];
    read_descs(mem, descs, 0, &mut hdr_bytes)?;
    let hdr = VsockHeader::parse(&hdr_bytes);
    let len = hdr.len as usize;
    if len > MAX_PKT_PAYLOAD || len > buf.len() || HDR_SIZE + len > total {
        return Err(format!("tx payload length {len} is invalid"));
    }
    read_descs(mem, descs, HDR_SIZE, &mut buf[..len])?;
    Ok((hdr, len))
}

/// Copies bytes starting at logical offset `skip` of the descriptor list into `out`.
fn read_descs(
    mem: &GuestMemory,
    descs: &[Descriptor],
    mut skip: usize,
    out: &mut [u8],
) -> Result<(), String> {
    let mut done = 0;
    for d in descs {
        if done == out.len() {
            break;
        }
        let len = d.len() as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(out.len() - done);
        mem.read_slice(
            &mut out[done..done + n],
            GuestAddress(d.addr().0 + skip as u64),
        )
        .map_err(|e| e.to_string())?;
        done += n;
        skip = 0;
    }
    if done < out.len() {
        return Err("descriptor chain too short".into());
    }
    Ok(())
}

/// Writes `parts`, one after the other, across the descriptors (no copy into one buffer
/// first); returns the bytes written.
fn write_descs(mem: &GuestMemory, descs: &[Descriptor], parts: &[&[u8]]) -> usize {
    let mut done = 0;
    let mut descs = descs.iter();
    // Where the current descriptor's free room starts, and how much is left of it.
    let mut at: Option<(GuestAddress, usize)> = None;
    for part in parts {
        let mut part = *part;
        while !part.is_empty() {
            let (addr, room) = match at {
                Some((a, r)) if r > 0 => (a, r),
                _ => match descs.next() {
                    Some(d) => (d.addr(), d.len() as usize),
                    None => return done,
                },
            };
            let n = room.min(part.len());
            if n > 0 && mem.write_slice(&part[..n], addr).is_err() {
                return done;
            }
            done += n;
            part = &part[n..];
            at = addr
                .0
                .checked_add(n as u64)
                .map(|a| (GuestAddress(a), room - n));
        }
    }
    done
}

#[cfg(test)]
mod write_tests {
    use super::*;
    use crate::devices::virtio::test_utils::test_memory;

    #[test]
    fn parts_are_written_across_descriptors_as_one_run() {
        let mem = test_memory();
        let desc = |addr: u64, len: u32| Descriptor::new(addr, len, 0, 0);
        // A header split over two descriptors (one empty between), the payload over the
        // rest; the last descriptor has room to spare.
        let descs = [
            desc(0x1000, 30),
            desc(0x2000, 0),
            desc(0x3000, 20),
            desc(0x4000, 100),
        ];
        let header: Vec<u8> = (0..44).collect();
        let payload: Vec<u8> = (100..160).collect();
        assert_eq!(write_descs(&mem, &descs, &[&header, &payload]), 104);
        let read = |addr: u64, len: usize| {
            let mut b = vec![0u8; len];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b
        };
        let mut got = read(0x1000, 30);
        got.extend(read(0x3000, 20));
        got.extend(read(0x4000, 54));
        assert_eq!(got, [header.clone(), payload.clone()].concat());
        // Too little room: what fits is written and counted.
        let short = [desc(0x5000, 50)];
        assert_eq!(write_descs(&mem, &short, &[&header, &payload]), 50);
        assert_eq!(write_descs(&mem, &[], &[&header]), 0);
    }
}
