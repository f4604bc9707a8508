//! Backend tests on test memory with real unix sockets, driven the way the event thread
//! drives it (epoll readiness), but step by step.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{Epoll, EpollEvent};

use super::connection::{CONN_BUF_ALLOC, ConnState};
use super::muxer::{TXQ, parse_connect};
use super::packet::*;
use super::*;
use crate::devices::virtio::test_utils::{TestQueue, test_irq, test_memory};

const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1024;
/// Guest rx buffers: 4 KiB each, like the Linux driver's.
const RX_BUF: u32 = 4096;
const RX_BUFS_BASE: u64 = 0x40_0000;
const TX_BUFS_BASE: u64 = 0x80_0000;

struct Rig {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    epoll: Arc<Epoll>,
    backend: VsockBackend,
    mem: GuestMemory,
    rx: TestQueue,
    tx: TestQueue,
    ev: TestQueue,
    rx_addr: HashMap<u16, u64>,
    rx_seen: u16,
    next_rx_buf: u64,
    next_tx_buf: u64,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vsock.sock");
    let epoll = Arc::new(Epoll::new().unwrap());
    let mut backend = VsockBackend::new(GUEST_CID, &path, epoll.clone()).unwrap();
    let mem = test_memory();
    let rx = TestQueue::new(&mem, 0x10_0000, 64);
    let tx = TestQueue::new(&mem, 0x20_0000, 64);
    let ev = TestQueue::new(&mem, 0x30_0000, 4);
    backend.activate(
        mem.clone(),
        vec![rx.queue(), tx.queue(), ev.queue()],
        test_irq(),
    );
    Rig {
        _dir: dir,
        path,
        epoll,
        backend,
        mem,
        rx,
        tx,
        ev,
        rx_addr: HashMap::new(),
        rx_seen: 0,
        next_rx_buf: RX_BUFS_BASE,
        next_tx_buf: TX_BUFS_BASE,
    }
}

impl Rig {
    fn give_rx_buffers(&mut self, n: usize) {
        for _ in 0..n {
            let addr = self.next_rx_buf;
            self.next_rx_buf += u64::from(RX_BUF);
            let head = self.rx.add_chain(&self.mem, &[(addr, RX_BUF, true)]);
            self.rx_addr.insert(head, addr);
            self.rx.publish(&self.mem, head);
        }
        self.backend.notify(0);
    }

    /// Waits for host-socket readiness (up to 2 s per wait) and lets the backend handle it,
    /// until `done` holds.
    fn pump_until(&mut self, mut done: impl FnMut(&mut Self) -> bool) {
        let mut events = vec![EpollEvent::default(); 16];
        for _ in 0..200 {
            if done(self) {
                return;
            }
            let n = self.epoll.wait(2000, &mut events).unwrap();
            for ev in &events[..n] {
                self.backend.handle_event(ev.fd(), ev.event_set());
            }
        }
        panic!("condition not reached");
    }

    /// The stream payload the guest receives (`OP_RW`), pumped until at least `n` bytes came.
    fn guest_reads(&mut self, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        self.pump_until(|r| {
            got.extend(
                r.take_rx()
                    .into_iter()
                    .filter(|(h, _)| h.op == OP_RW)
                    .flat_map(|(_, p)| p),
            );
            got.len() >= n
        });
        got
    }

    /// Packets the device has put in the rx queue since the last call.
    fn take_rx(&mut self) -> Vec<(VsockHeader, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.rx.used_idx(&self.mem) {
            let (head, len) = self.rx.used_entry(&self.mem, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = self.rx_addr[&(head as u16)];
            let mut raw = vec![0u8; len as usize];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = VsockHeader::parse(raw[..HDR_SIZE].try_into().unwrap());
            out.push((hdr, raw[HDR_SIZE..].to_vec()));
        }
        out
    }

    /// The guest sends a packet on the tx queue.
    fn guest_send(&mut self, hdr: VsockHeader, payload: &[u8]) {
        let addr = self.next_tx_buf;
        self.next_tx_buf += 0x1_0000 + HDR_SIZE as u64;
        if self.next_tx_buf > 0xe0_0000 {
            self.next_tx_buf = TX_BUFS_BASE;
        }
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + HDR_SIZE as u64))
            .unwrap();
        let head = self.tx.add_chain(
            &self.mem,
            &[(addr, (HDR_SIZE + payload.len()) as u32, false)],
        );
        self.tx.publish(&self.mem, head);
        self.backend.notify(TXQ);
    }

    /// Host client connects and the guest accepts; returns (client, host-side port).
    fn connect(&mut self, guest_buf_alloc: u32) -> (UnixStream, u32) {
        self.give_rx_buffers(1);
        let client = self.client_connecting();
        let mut pkts = Vec::new();
        self.pump_until(|r| {
            pkts.extend(r.take_rx());
            !pkts.is_empty()
        });
        let (req, _) = pkts[0];
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port),
            (HOST_CID, GUEST_CID, GUEST_PORT)
        );
        assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
        let local = req.src_port;
        let resp = guest_hdr(local, OP_RESPONSE, 0, guest_buf_alloc, 0);
        self.guest_send(resp, &[]);
        let mut line = String::new();
        BufReader::new(&client).read_line(&mut line).unwrap();
        assert_eq!(line, format!("OK {local}\n"));
        assert_eq!(
            self.backend.connection_state((local, GUEST_PORT)),
            Some(ConnState::Established)
        );
        (client, local)
    }
}

/// A packet header from the guest's port to host port `local_port`.
fn guest_hdr(local_port: u32, op: u16, len: u32, buf_alloc: u32, fwd_cnt: u32) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: GUEST_PORT,
        dst_port: local_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

/// A host client that has connected to the device's socket at `path` and sent its
/// `CONNECT` line for the guest's port.
fn host_client(path: &std::path::Path) -> UnixStream {
    host_client_sending(path, b"")
}

/// [`host_client`], with `early` written in the same write as the line.
fn host_client_sending(path: &std::path::Path, early: &[u8]) -> UnixStream {
    let mut client = UnixStream::connect(path).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut out = format!("CONNECT {GUEST_PORT}\n").into_bytes();
    out.extend_from_slice(early);
    client.write_all(&out).unwrap();
    client
}

#[test]
fn connect_handshake_sends_request_and_answers_ok() {
    let mut r = rig();
    let (_client, local) = r.connect(CONN_BUF_ALLOC);
    assert!(local >= 1 << 30);
    assert_eq!(r.backend.connection_count(), 1);
}

#[test]
fn a_line_sent_before_the_accept_is_read_with_the_accept() {
    let mut r = rig();
    r.give_rx_buffers(1);
    let _client = host_client(&r.path);
    // One readiness round, the listener's: the accept reads the line that is already there.
    let mut events = vec![EpollEvent::default(); 8];
    let n = r.epoll.wait(2000, &mut events).unwrap();
    assert_eq!(n, 1, "only the listener is ready");
    r.backend
        .handle_event(events[0].fd(), events[0].event_set());
    let pkts = r.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].0.op, OP_REQUEST);
    assert_eq!(pkts[0].0.dst_port, GUEST_PORT);
}

#[test]
fn bytes_flow_both_ways() {
    let mut r = rig();
    let (mut client, local) = r.connect(CONN_BUF_ALLOC);

    client.write_all(b"hello").unwrap();
    r.give_rx_buffers(2);
    assert_eq!(r.guest_reads(5), b"hello");

    r.guest_send(guest_hdr(local, OP_RW, 5, CONN_BUF_ALLOC, 5), b"world");
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");
}

#[test]
fn host_to_guest_respects_guest_credit_until_credit_update() {
    let mut r = rig();
    let guest_buf = 6000;
    let (mut client, local) = r.connect(guest_buf);
    client.write_all(&[0x5a; 20_000]).unwrap();
    r.give_rx_buffers(16);

    let mut delivered = 0usize;
    let mut credit_requested = false;
    r.pump_until(|r| {
        for (h, p) in r.take_rx() {
            match h.op {
                OP_RW => delivered += p.len(),
                OP_CREDIT_REQUEST => credit_requested = true,
                _ => {}
            }
        }
        credit_requested
    });
    assert_eq!(
        delivered, guest_buf as usize,
        "never more than the guest's buffer"
    );

    // The guest consumed everything and says so: the rest flows.
    r.guest_send(
        guest_hdr(local, OP_CREDIT_UPDATE, 0, guest_buf, guest_buf),
        &[],
    );
    r.give_rx_buffers(16);
    delivered += r.guest_reads(guest_buf as usize).len();
    assert_eq!(delivered, 2 * guest_buf as usize);
}

#[test]
fn guest_exceeding_our_credit_gets_reset_and_memory_stays_bounded() {
    let mut r = rig();
    let (client, local) = r.connect(CONN_BUF_ALLOC);
    r.give_rx_buffers(8);
    let chunk = vec![1u8; 64 * 1024];

    // Nobody reads `client`: the socket buffer fills, then our 256 KiB buffer, then RST.
    for i in 0..16u32 {
        r.guest_send(
            guest_hdr(local, OP_RW, chunk.len() as u32, CONN_BUF_ALLOC, 0),
            &chunk,
        );
        if r.backend.connection_count() == 0 {
            assert!(i >= 4, "reset only after our buffer was exceeded");
            break;
        }
    }

    assert_eq!(r.backend.connection_count(), 0);
    let rst = r
        .take_rx()
        .into_iter()
        .any(|(h, _)| h.op == OP_RST && h.src_port == local);
    assert!(rst, "guest told about the reset");
    drop(client);
}

#[test]
fn host_eof_sends_shutdown_and_guest_rst_removes_the_connection() {
    let mut r = rig();
    let (client, local) = r.connect(CONN_BUF_ALLOC);
    r.give_rx_buffers(2);

    drop(client);
    let mut shutdown = None;
    r.pump_until(|r| {
        shutdown = r
            .take_rx()
            .into_iter()
            .find(|(h, _)| h.op == OP_SHUTDOWN)
            .map(|(h, _)| h);
        shutdown.is_some()
    });
    assert_eq!(shutdown.unwrap().flags, SHUTDOWN_SEND);
    assert_eq!(
        r.backend.connection_state((local, GUEST_PORT)),
        Some(ConnState::LocalClosing)
    );

    r.guest_send(guest_hdr(local, OP_RST, 0, 0, 0), &[]);
    assert_eq!(r.backend.connection_count(), 0);
}

#[test]
fn host_half_close_still_receives_guest_output() {
    let mut r = rig();
    let (mut client, local) = r.connect(CONN_BUF_ALLOC);
    r.give_rx_buffers(2);

    client.shutdown(std::net::Shutdown::Write).unwrap();
    r.pump_until(|r| r.take_rx().iter().any(|(h, _)| h.op == OP_SHUTDOWN));
    r.guest_send(guest_hdr(local, OP_RW, 6, CONN_BUF_ALLOC, 0), b"output");
    let mut hdr = guest_hdr(local, OP_SHUTDOWN, 0, CONN_BUF_ALLOC, 0);
    hdr.flags = SHUTDOWN_SEND;
    r.guest_send(hdr, &[]);

    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"output");
}

#[test]
fn guest_full_shutdown_flushes_then_resets() {
    let mut r = rig();
    let (mut client, local) = r.connect(CONN_BUF_ALLOC);
    r.give_rx_buffers(2);

    r.guest_send(guest_hdr(local, OP_RW, 3, CONN_BUF_ALLOC, 0), b"bye");
    let mut hdr = guest_hdr(local, OP_SHUTDOWN, 0, CONN_BUF_ALLOC, 0);
    hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    r.guest_send(hdr, &[]);

    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert_eq!(
        rest, b"bye",
        "data before the shutdown is delivered, then EOF"
    );
    assert_eq!(r.backend.connection_count(), 0);
    assert!(r.take_rx().iter().any(|(h, _)| h.op == OP_RST));
}

#[test]
fn hostile_tx_packets_are_dropped_or_reset_without_panic() {
    let mut r = rig();
    r.give_rx_buffers(4);

    // Length field larger than the buffer the guest provided.
    let mut lying = guest_hdr(5, OP_RW, 60_000, 0, 0);
    r.guest_send(lying, b"short");
    // Wrong source CID (spoofing another VM).
    lying = guest_hdr(5, OP_RW, 0, 0, 0);
    lying.src_cid = 42;
    r.guest_send(lying, &[]);
    // Header descriptor outside guest RAM.
    let head = r.tx.add_chain(&r.mem, &[(1 << 40, HDR_SIZE as u32, false)]);
    r.tx.publish(&r.mem, head);
    r.backend.notify(TXQ);
    // Device-writable descriptor on the tx queue.
    let head =
        r.tx.add_chain(&r.mem, &[(TX_BUFS_BASE, HDR_SIZE as u32, true)]);
    r.tx.publish(&r.mem, head);
    r.backend.notify(TXQ);
    // Data for a connection that does not exist: answered with RST.
    r.guest_send(guest_hdr(77, OP_RW, 0, 0, 0), &[]);

    let replies = r.take_rx();
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].0.op, OP_RST);
    assert_eq!(replies[0].0.src_port, 77);
    assert_eq!(
        r.tx.used_idx(&r.mem),
        5,
        "every tx chain is returned to the guest"
    );
    assert_eq!(r.backend.connection_count(), 0);
}

#[test]
fn guest_connect_to_missing_host_port_is_reset() {
    let mut r = rig();
    r.give_rx_buffers(1);

    r.guest_send(guest_hdr(52, OP_REQUEST, 0, CONN_BUF_ALLOC, 0), &[]);

    let replies = r.take_rx();
    assert_eq!(replies[0].0.op, OP_RST);
}

#[test]
fn guest_connect_forwards_to_port_suffixed_socket() {
    let mut r = rig();
    let mut side = r.path.clone().into_os_string();
    side.push("_52");
    let listener = std::os::unix::net::UnixListener::bind(&side).unwrap();
    r.give_rx_buffers(1);

    r.guest_send(guest_hdr(52, OP_REQUEST, 0, CONN_BUF_ALLOC, 0), &[]);
    let (mut host, _) = listener.accept().unwrap();
    r.guest_send(guest_hdr(52, OP_RW, 2, CONN_BUF_ALLOC, 0), b"hi");

    assert_eq!(r.take_rx()[0].0.op, OP_RESPONSE);
    let mut buf = [0u8; 2];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi");
}

#[test]
fn bad_connect_line_closes_the_client() {
    let mut r = rig();
    let mut client = UnixStream::connect(&r.path).unwrap();
    client.write_all(b"HELLO there\n").unwrap();
    client.set_nonblocking(true).unwrap();

    let mut answer = Vec::new();
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        let n = r.epoll.wait(2000, &mut events).unwrap();
        assert!(n > 0, "backend never answered");
        for ev in &events[..n] {
            r.backend.handle_event(ev.fd(), ev.event_set());
        }
        match client.read_to_end(&mut answer) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }

    assert!(answer.starts_with(b"ERR"), "{answer:?}");
    assert_eq!(r.backend.connection_count(), 0);
}

#[test]
fn connect_line_parser_accepts_only_connect_port() {
    assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
    assert_eq!(parse_connect(b"CONNECT 1024\r"), Some(1024));
    assert_eq!(parse_connect(b"CONNECT"), None);
    assert_eq!(parse_connect(b"CONNECT -1"), None);
    assert_eq!(parse_connect(b"connect 5"), None);
    assert_eq!(parse_connect(&[0xff, 0xfe]), None);
}

#[test]
fn transport_reset_event_drops_connections() {
    let mut r = rig();
    let (_client, _local) = r.connect(CONN_BUF_ALLOC);
    let head = r.ev.add_chain(&r.mem, &[(0xf0_0000, 4, true)]);
    r.ev.publish(&r.mem, head);
    r.mem
        .write_obj(0xffff_ffffu32, GuestAddress(0xf0_0000))
        .unwrap();

    assert!(r.backend.send_transport_reset());

    assert_eq!(r.ev.used_entry(&r.mem, 0), (u32::from(head), 4));
    assert_eq!(r.mem.read_obj::<u32>(GuestAddress(0xf0_0000)).unwrap(), 0);
    assert_eq!(r.backend.connection_count(), 0);
}

#[test]
fn device_config_space_holds_the_guest_cid() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Vsock::new(7, &dir.path().join("v.sock")).unwrap();
    let mut cid = [0u8; 8];

    dev.read_config(0, &mut cid);

    assert_eq!(u64::from_le_bytes(cid), 7);
    assert_eq!(dev.queue_max_sizes().len(), 3);
}

#[test]
fn a_host_client_that_never_sends_connect_is_closed_after_the_handshake_timeout() {
    let mut r = rig();
    let mut silent = UnixStream::connect(&r.path).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The listener becomes readable: the client is accepted as a handshake.
    let mut events = vec![EpollEvent::default(); 4];
    let n = r.epoll.wait(2000, &mut events).unwrap();
    for ev in &events[..n] {
        r.backend.handle_event(ev.fd(), ev.event_set());
    }

    r.backend.tick_at(Instant::now());
    let mut probe = [0u8; 1];
    silent.set_nonblocking(true).unwrap();
    assert!(
        silent.read(&mut probe).is_err(),
        "still open before the timeout"
    );
    silent.set_nonblocking(false).unwrap();

    r.backend
        .tick_at(Instant::now() + muxer::HANDSHAKE_TIMEOUT + Duration::from_secs(1));

    let mut answer = String::new();
    silent.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("ERR"), "{answer:?}");
}

#[test]
fn a_connection_the_guest_never_answers_is_reset_after_the_request_timeout() {
    let mut r = rig();
    r.give_rx_buffers(4);
    let mut client = r.client_connecting();
    let mut pkts = Vec::new();
    r.pump_until(|r| {
        pkts.extend(r.take_rx());
        !pkts.is_empty()
    });
    assert_eq!(pkts[0].0.op, OP_REQUEST);
    let key = (pkts[0].0.src_port, GUEST_PORT);
    assert_eq!(r.backend.connection_state(key), Some(ConnState::LocalInit));

    r.backend
        .tick_at(Instant::now() + muxer::CONN_REQUEST_TIMEOUT + Duration::from_secs(1));

    assert_eq!(r.backend.connection_state(key), None);
    let rst: Vec<_> = r.take_rx().into_iter().map(|(h, _)| h.op).collect();
    assert_eq!(rst, vec![OP_RST], "the guest is told to forget it");
    let mut answer = String::new();
    client.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("ERR"), "{answer:?}");
}

#[test]
fn a_guest_connect_to_a_host_listener_with_a_full_backlog_is_reset_without_blocking() {
    use socket2::{Domain, SockAddr, Socket, Type};
    let mut r = rig();
    let mut path = r.path.clone().into_os_string();
    path.push("_5000");
    let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
    listener.listen(0).unwrap();
    // Fill the backlog (nobody accepts).
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None).unwrap();
        if s.connect(&SockAddr::unix(&path).unwrap()).is_err() {
            break;
        }
        fillers.push(s);
    }
    r.give_rx_buffers(2);
    let mut hdr = guest_hdr(5000, OP_REQUEST, 0, CONN_BUF_ALLOC, 0);
    hdr.src_port = 7777;

    let t = Instant::now();
    r.guest_send(hdr, &[]);

    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the vCPU path blocked"
    );
    let ops: Vec<_> = r.take_rx().into_iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![OP_RST]);
}

#[test]
fn dropping_a_paused_device_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Vsock::new(7, &dir.path().join("v.sock")).unwrap();
    dev.quiesce(true);
    // Let the event thread reach its pause wait (its epoll wakes at least every 500 ms).
    let _c = UnixStream::connect(dir.path().join("v.sock")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (tx, rx) = std::sync::mpsc::channel();

    std::thread::spawn(move || {
        drop(dev);
        let _ = tx.send(());
    });

    rx.recv_timeout(Duration::from_secs(5))
        .expect("Vsock::drop hung while the device was paused");
}

impl Rig {
    /// A host client that has sent its `CONNECT` line, accepted and read by the backend.
    fn client_connecting(&mut self) -> UnixStream {
        self.client_connecting_sending(b"")
    }

    /// [`Rig::client_connecting`], with `early` written in the same write as the line.
    fn client_connecting_sending(&mut self, early: &[u8]) -> UnixStream {
        let client = host_client_sending(&self.path, early);
        let mut events = vec![EpollEvent::default(); 8];
        // Accept, then read the handshake line (two readiness rounds at most).
        for _ in 0..4 {
            let n = self.epoll.wait(200, &mut events).unwrap();
            for ev in &events[..n] {
                self.backend.handle_event(ev.fd(), ev.event_set());
            }
        }
        client
    }

    fn post_event_buffer(&mut self) {
        let head = self.ev.add_chain(&self.mem, &[(0xf0_0000, 4, true)]);
        self.ev.publish(&self.mem, head);
    }
}

#[test]
fn after_a_restore_host_clients_wait_for_the_guests_reset_acknowledgement() {
    let mut r = rig();
    r.give_rx_buffers(4);
    r.backend.set_paused(true);
    r.backend.reset_on_resume();
    let _client = r.client_connecting();
    assert!(
        r.take_rx().is_empty(),
        "held while the restored VM is paused"
    );
    r.post_event_buffer();

    r.backend.set_paused(false);

    assert_eq!(r.ev.used_idx(&r.mem), 1, "transport reset event delivered");
    assert!(
        r.take_rx().is_empty(),
        "still held until the guest acknowledges"
    );
    // The guest acknowledges by re-posting an event buffer.
    r.post_event_buffer();
    r.backend.notify(2);
    let ops: Vec<_> = r.take_rx().into_iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![OP_REQUEST]);
}

#[test]
fn a_reset_the_guest_never_acknowledges_releases_held_clients_after_the_timeout() {
    let mut r = rig();
    r.give_rx_buffers(4);
    r.backend.set_paused(true);
    r.backend.reset_on_resume();
    r.post_event_buffer();
    r.backend.set_paused(false);
    let _client = r.client_connecting();
    assert!(r.take_rx().is_empty());

    r.backend.tick_at(Instant::now() + Duration::from_secs(3));

    let ops: Vec<_> = r.take_rx().into_iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![OP_REQUEST]);
}

#[test]
fn host_clients_beyond_the_connection_limit_are_refused() {
    let mut r = rig();
    let mut held = Vec::new();
    for _ in 0..muxer::MAX_CONNECTIONS {
        held.push(UnixStream::connect(&r.path).unwrap());
    }
    let mut events = vec![EpollEvent::default(); 8];
    for _ in 0..4 {
        let n = r.epoll.wait(200, &mut events).unwrap();
        for ev in &events[..n] {
            r.backend.handle_event(ev.fd(), ev.event_set());
        }
    }
    let mut extra = UnixStream::connect(&r.path).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for _ in 0..4 {
        let n = r.epoll.wait(200, &mut events).unwrap();
        for ev in &events[..n] {
            r.backend.handle_event(ev.fd(), ev.event_set());
        }
    }

    let mut b = [0u8; 1];
    assert_eq!(extra.read(&mut b).unwrap(), 0, "closed at once");
    drop(held);
}

/// Host data that arrives while the device is paused for a snapshot reaches the guest once
/// the pause ends. (Connection sockets are edge-triggered: the event thread that wakes for
/// that data during the pause must handle it after the pause, not drop it, or the data
/// stays in the socket until the host writes again — a client waiting for an answer to it
/// never gets one.)
#[test]
fn host_data_written_during_a_pause_reaches_the_guest_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    let mem = test_memory();
    let mut rx = TestQueue::new(&mem, 0x10_0000, 64);
    let mut tx = TestQueue::new(&mem, 0x20_0000, 64);
    let ev = TestQueue::new(&mem, 0x30_0000, 4);
    dev.activate(
        mem.clone(),
        vec![rx.queue(), tx.queue(), ev.queue()],
        test_irq(),
    )
    .unwrap();
    let mut rx_addr = HashMap::new();
    for i in 0..8u64 {
        let addr = RX_BUFS_BASE + i * u64::from(RX_BUF);
        let head = rx.add_chain(&mem, &[(addr, RX_BUF, true)]);
        rx_addr.insert(head, addr);
        rx.publish(&mem, head);
    }
    dev.queue_notify(0);
    // The device's own thread handles the host socket: wait (bounded) for rx packets.
    let mut seen = 0u16;
    let mut wait_rx = |what: &str| -> (VsockHeader, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while rx.used_idx(&mem) == seen {
            assert!(Instant::now() < deadline, "no rx packet: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (head, len) = rx.used_entry(&mem, seen);
        seen = seen.wrapping_add(1);
        let mut raw = vec![0u8; len as usize];
        mem.read_slice(&mut raw, GuestAddress(rx_addr[&(head as u16)]))
            .unwrap();
        let hdr = VsockHeader::parse(raw[..HDR_SIZE].try_into().unwrap());
        (hdr, raw[HDR_SIZE..].to_vec())
    };

    let mut client = host_client(&path);
    let (req, _) = wait_rx("connection request");
    assert_eq!(req.op, OP_REQUEST);
    let local = req.src_port;
    // The guest accepts.
    let resp = guest_hdr(local, OP_RESPONSE, 0, CONN_BUF_ALLOC, 0);
    mem.write_slice(&resp.to_bytes(), GuestAddress(TX_BUFS_BASE))
        .unwrap();
    let head = tx.add_chain(&mem, &[(TX_BUFS_BASE, HDR_SIZE as u32, false)]);
    tx.publish(&mem, head);
    dev.queue_notify(TXQ as u32);
    let mut line = String::new();
    BufReader::new(&client).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {local}\n"));

    dev.quiesce(true);
    client.write_all(b"during the pause").unwrap();
    // Long enough for the event thread to wake for the data and find the device paused.
    std::thread::sleep(Duration::from_millis(300));
    dev.quiesce(false);

    let (hdr, payload) = wait_rx("the data written during the pause");
    assert_eq!((hdr.op, hdr.src_port), (OP_RW, local));
    assert_eq!(payload, b"during the pause");
}

/// The time a snapshot pause lasts does not count against a connection the guest has not
/// answered yet (the guest could not run meanwhile).
#[test]
fn a_pause_does_not_count_against_the_guests_answer_time() {
    let mut r = rig();
    r.give_rx_buffers(4);
    let before = Instant::now();
    let mut client = r.client_connecting();
    let ops: Vec<_> = r.take_rx().into_iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![OP_REQUEST]);

    r.backend.set_paused(true);
    std::thread::sleep(Duration::from_secs(1));
    r.backend.set_paused(false);
    // Past the answer timeout counted from the request, not counting the pause.
    r.backend
        .tick_at(before + muxer::CONN_REQUEST_TIMEOUT + Duration::from_millis(500));

    client.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    match client.read(&mut b) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the connection was reset during its pause: {other:?}"),
    }
    assert!(r.take_rx().iter().all(|(h, _)| h.op != OP_RST));
}

#[test]
fn bytes_sent_with_the_connect_line_reach_the_guest_once_it_accepts_after_a_reset() {
    // The host's one-round-trip wake-up: `CONNECT`, then requests, in one write before any
    // answer, while the restored guest has not acknowledged its transport reset yet.
    let mut r = rig();
    r.give_rx_buffers(4);
    r.backend.set_paused(true);
    r.backend.reset_on_resume();
    let client = r.client_connecting_sending(b"wake up");
    r.post_event_buffer();
    r.backend.set_paused(false);
    assert!(
        r.take_rx().is_empty(),
        "held until the reset is acknowledged"
    );
    r.post_event_buffer();
    r.backend.notify(2);

    let pkts = r.take_rx();
    let ops: Vec<_> = pkts.iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![OP_REQUEST], "no data before the guest accepts");
    let local = pkts[0].0.src_port;
    r.guest_send(guest_hdr(local, OP_RESPONSE, 0, CONN_BUF_ALLOC, 0), &[]);

    let mut line = String::new();
    BufReader::new(&client).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {local}\n"));
    assert_eq!(
        r.guest_reads(7),
        b"wake up",
        "what followed the line, whole and in order"
    );
}

/// With no timer armed the event thread may sleep long; any timer arms the short tick, and
/// one armed from another thread while the thread sleeps wakes it through the kick eventfd,
/// which the event handler drains.
#[test]
fn the_event_thread_sleeps_long_only_with_no_timer_armed() {
    let mut r = rig();
    r.give_rx_buffers(4);
    assert!(!r.backend.timers_armed());
    assert_eq!(r.backend.next_wait(), muxer::IDLE_WAIT);

    // A transport reset armed (as a resume does, on another thread) while it sleeps.
    r.post_event_buffer();
    assert!(r.backend.send_transport_reset());
    assert!(r.backend.timers_armed());
    let mut events = vec![EpollEvent::default(); 8];
    let n = r.epoll.wait(0, &mut events).unwrap();
    assert_eq!(n, 1, "the kick wakes the sleeping thread");
    r.backend.woke();
    r.backend
        .handle_event(events[0].fd(), events[0].event_set());
    assert_eq!(
        r.epoll.wait(0, &mut events).unwrap(),
        0,
        "the kick was drained"
    );
    assert_eq!(r.backend.next_wait(), muxer::TICK);

    // The guest acknowledges; a host client's handshake arms its own timer.
    r.post_event_buffer();
    r.backend.notify(2);
    assert_eq!(r.backend.next_wait(), muxer::IDLE_WAIT);
    let _client = UnixStream::connect(&r.path).unwrap();
    let n = r.epoll.wait(1000, &mut events).unwrap();
    r.backend.woke();
    for ev in &events[..n] {
        r.backend.handle_event(ev.fd(), ev.event_set());
    }
    assert_eq!(r.backend.next_wait(), muxer::TICK, "a handshake is timed");
}

/// The device's own event thread, asleep with no timer armed, still ends a transport-reset
/// wait the guest never acknowledges on time: the resume that armed it woke the thread.
#[test]
fn a_reset_armed_while_the_event_thread_sleeps_still_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    let mem = test_memory();
    let rx = TestQueue::new(&mem, 0x10_0000, 64);
    let tx = TestQueue::new(&mem, 0x20_0000, 64);
    let mut ev = TestQueue::new(&mem, 0x30_0000, 4);
    let head = ev.add_chain(&mem, &[(0xf0_0000, 4, true)]);
    ev.publish(&mem, head);
    dev.activate(
        mem.clone(),
        vec![rx.queue(), tx.queue(), ev.queue()],
        test_irq(),
    )
    .unwrap();
    // The thread finishes its first tick and goes to its long sleep.
    wait_for_state(&dev, "sleeping true", Duration::from_secs(5));
    dev.restored();
    dev.quiesce(true);
    dev.quiesce(false);
    assert!(
        !dev.debug_state().contains("reset_pending None"),
        "the reset went out: {}",
        dev.debug_state()
    );
    // The guest never re-posts an event buffer: the wait ends after its timeout and a tick.
    wait_for_state(&dev, "reset_pending None", Duration::from_secs(6));
}

/// Polls the device's one-line state until it contains `what`; fails after `within`.
fn wait_for_state(dev: &Vsock, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !dev.debug_state().contains(what) {
        assert!(
            Instant::now() < deadline,
            "no {what:?} within {within:?}: {}",
            dev.debug_state()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A deadline armed on a vCPU thread (the guest closes a connection whose data has not
/// drained to a host client that does not read) wakes an event thread in its long sleep.
#[test]
fn a_deadline_armed_by_a_queue_notification_wakes_the_sleeping_event_thread() {
    let mut r = rig();
    let (_client, local) = r.connect(CONN_BUF_ALLOC);
    // More than the host socket holds: the rest waits in the connection.
    let chunk = vec![7u8; muxer::MAX_PKT_PAYLOAD];
    for _ in 0..(CONN_BUF_ALLOC as usize / chunk.len()) {
        let hdr = guest_hdr(local, OP_RW, chunk.len() as u32, CONN_BUF_ALLOC, 0);
        r.guest_send(hdr, &chunk);
    }
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let n = r.epoll.wait(0, &mut events).unwrap();
        if n == 0 {
            break;
        }
        for ev in &events[..n] {
            r.backend.handle_event(ev.fd(), ev.event_set());
        }
    }
    assert_eq!(r.backend.next_wait(), muxer::IDLE_WAIT, "no timer yet");

    let mut hdr = guest_hdr(local, OP_SHUTDOWN, 0, CONN_BUF_ALLOC, 0);
    hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    r.guest_send(hdr, &[]);

    assert_eq!(
        r.backend.connection_state((local, GUEST_PORT)),
        Some(ConnState::PeerClosing),
        "the data is still draining"
    );
    assert!(
        r.epoll.wait(0, &mut events).unwrap() >= 1,
        "the kick wakes the sleeping thread"
    );
}
