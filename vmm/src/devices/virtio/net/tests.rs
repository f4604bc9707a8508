//! The device over a datagram socket pair (one frame per read/write, like a tap): what the
//! guest sends reaches the peer, what the peer sends reaches guest buffers, and a hostile or
//! stalled driver costs the host neither memory nor a stuck queue.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::test_utils::{F_NEXT, TestQueue, test_irq, test_memory};

const RXQ: u64 = 0x10_0000;
const TXQ: u64 = 0x18_0000;
const BUFS: u64 = 0x20_0000;
const MAC: [u8; 6] = [0x06, 0, 0xac, 0x10, 0, 2];

struct Rig {
    mem: GuestMemory,
    rxq: TestQueue,
    txq: TestQueue,
    net: Net,
    peer: UnixDatagram,
}

fn rig() -> Rig {
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let backend = File::from(OwnedFd::from(ours));
    let mem = test_memory();
    let rxq = TestQueue::new(&mem, RXQ, 16);
    let txq = TestQueue::new(&mem, TXQ, 16);
    let mut net = Net::with_backend(backend, MAC).unwrap();
    net.activate(mem.clone(), vec![rxq.queue(), txq.queue()], test_irq())
        .unwrap();
    Rig {
        mem,
        rxq,
        txq,
        net,
        peer,
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

impl Rig {
    /// Queues `hdr + data` for transmit in two descriptors and notifies.
    fn send(&mut self, data: &[u8]) {
        self.mem
            .write_slice(&[0u8; HDR_LEN], GuestAddress(BUFS))
            .unwrap();
        self.mem
            .write_slice(data, GuestAddress(BUFS + 0x1000))
            .unwrap();
        let head = self.txq.add_chain(
            &self.mem,
            &[
                (BUFS, HDR_LEN as u32, false),
                (BUFS + 0x1000, data.len() as u32, false),
            ],
        );
        self.txq.publish(&self.mem, head);
        self.net.queue_notify(TX as u32);
    }

    /// Adds a receive buffer of `len` bytes at `addr`.
    fn add_rx(&mut self, addr: u64, len: u32) -> u16 {
        let head = self.rxq.add_chain(&self.mem, &[(addr, len, true)]);
        self.rxq.publish(&self.mem, head);
        head
    }

    fn rx_used(&self) -> u16 {
        self.rxq.used_idx(&self.mem)
    }
}

#[test]
fn config_space_holds_the_mac_and_features_offer_no_offloads() {
    let r = rig();
    let mut mac = [0u8; 6];
    r.net.read_config(0, &mut mac);
    assert_eq!(mac, MAC);
    assert_eq!(
        r.net.avail_features(),
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    );
    assert_eq!(r.net.device_type(), TYPE_NET);
}

#[test]
fn a_transmitted_frame_reaches_the_backend_without_its_header() {
    let mut r = rig();
    let data = frame(1514, 7);
    r.send(&data);

    let mut got = vec![0u8; 4096];
    let n = r.peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &data[..]);
    assert_eq!(r.txq.used_idx(&r.mem), 1);
    assert_eq!(r.txq.used_entry(&r.mem, 0).1, 0);
    assert_eq!(r.net.counters().tx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(r.net.counters().tx_bytes.load(Ordering::Relaxed), 1514);
}

#[test]
fn a_received_frame_lands_behind_a_header_with_one_buffer() {
    let mut r = rig();
    let head = r.add_rx(BUFS, 2048);
    let data = frame(600, 3);
    r.peer.send(&data).unwrap();

    r.net.process_rx();

    assert_eq!(r.rx_used(), 1);
    assert_eq!(
        r.rxq.used_entry(&r.mem, 0),
        (u32::from(head), (HDR_LEN + 600) as u32)
    );
    let mut got = vec![0u8; HDR_LEN + 600];
    r.mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
    assert_eq!(
        &got[..10],
        &[0u8; 10],
        "no offloads: flags, gso, csum all zero"
    );
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[HDR_LEN..], &data[..]);
}

#[test]
fn the_event_thread_delivers_without_a_notify() {
    let mut r = rig();
    r.add_rx(BUFS, 2048);
    r.peer.send(&frame(100, 1)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.rx_used() == 0 {
        assert!(
            Instant::now() < deadline,
            "the net thread did not deliver the frame"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(r.rxq.used_entry(&r.mem, 0).1, (HDR_LEN + 100) as u32);
}

#[test]
fn a_guest_that_never_refills_rx_holds_one_frame_here_and_the_rest_stay_in_the_backend() {
    let mut r = rig();
    let mut sent = 0;
    while sent < 10_000 && r.peer.send(&frame(1500, sent as u8)).is_ok() {
        sent += 1;
    }
    assert!(sent > 1, "the backend took {sent} frames");
    for _ in 0..3 {
        assert_eq!(r.net.process_rx(), 0, "no buffers, nothing delivered");
    }
    {
        let inner = lock(&r.net.inner);
        assert_eq!(inner.rx_pending, HDR_LEN + 1500, "one frame held");
        assert_eq!(inner.rx_buf.len(), HDR_LEN + MAX_FRAME, "no growth");
    }
    // The backend queue stays full, not drained into our memory: only the slot of the one
    // frame held here frees up.
    let more = (0..10)
        .filter(|_| r.peer.send(&frame(1500, 0)).is_ok())
        .count();
    assert!(more <= 1, "{more} more frames fit the backend");

    // One buffer, one frame: the first one sent, in order.
    r.add_rx(BUFS, 2048);
    r.net.queue_notify(RX as u32);
    assert_eq!(r.rx_used(), 1);
    let mut got = vec![0u8; 1500];
    r.mem
        .read_slice(&mut got, GuestAddress(BUFS + HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, frame(1500, 0));
}

#[test]
fn a_frame_larger_than_the_buffer_is_dropped_and_the_buffer_returned() {
    let mut r = rig();
    let small = r.add_rx(BUFS, 64);
    r.peer.send(&frame(1000, 9)).unwrap();
    r.net.process_rx();
    assert_eq!(r.rxq.used_entry(&r.mem, 0), (u32::from(small), 0));
    assert_eq!(r.net.counters().rx_dropped.load(Ordering::Relaxed), 1);
    // The next frame goes to the next buffer.
    r.add_rx(BUFS + 0x1000, 2048);
    r.peer.send(&frame(500, 1)).unwrap();
    r.net.process_rx();
    assert_eq!(r.rxq.used_entry(&r.mem, 1).1, (HDR_LEN + 500) as u32);
}

#[test]
fn hostile_transmit_chains_are_dropped_and_the_queue_moves_on() {
    let mut r = rig();
    let mem = r.mem.clone();
    // 1. A device-writable buffer in a transmit chain.
    let h1 = r
        .txq
        .add_chain(&mem, &[(BUFS, 12, false), (BUFS + 0x1000, 100, true)]);
    r.txq.publish(&mem, h1);
    // 2. A buffer outside guest memory.
    let h2 = r
        .txq
        .add_chain(&mem, &[(BUFS, 12, false), (1 << 40, 100, false)]);
    r.txq.publish(&mem, h2);
    // 3. A frame longer than MAX_FRAME (two 40000-byte pieces).
    let h3 = r.txq.add_chain(
        &mem,
        &[
            (BUFS, 12, false),
            (0x40_0000, 40_000, false),
            (0x50_0000, 40_000, false),
        ],
    );
    r.txq.publish(&mem, h3);
    // 4. A descriptor that loops to itself.
    let h4 = 12;
    r.txq.write_desc(&mem, h4, BUFS, 12, F_NEXT, h4);
    r.txq.publish(&mem, h4);
    // 5. A header and no frame.
    r.txq.skip(1);
    let h5 = r.txq.add_chain(&mem, &[(BUFS, 12, false)]);
    r.txq.publish(&mem, h5);

    r.net.queue_notify(TX as u32);

    assert_eq!(r.txq.used_idx(&mem), 5, "every chain returned");
    assert_eq!(r.net.counters().tx_dropped.load(Ordering::Relaxed), 5);
    assert_eq!(r.net.counters().tx_frames.load(Ordering::Relaxed), 0);
    let mut buf = [0u8; 64];
    assert!(
        r.peer.recv(&mut buf).is_err(),
        "nothing reached the backend"
    );
    // A good frame after all that still goes through.
    r.send(&frame(60, 0));
    assert_eq!(r.peer.recv(&mut buf).unwrap(), 60);
}

#[test]
fn hostile_receive_chains_are_returned_empty() {
    let mut r = rig();
    let mem = r.mem.clone();
    // Out of guest memory, then a read-only buffer, then a good one.
    let bad = r.rxq.add_chain(&mem, &[(1 << 40, 2048, true)]);
    r.rxq.publish(&mem, bad);
    let ro = r.rxq.add_chain(&mem, &[(BUFS, 2048, false)]);
    r.rxq.publish(&mem, ro);
    let good = r.add_rx(BUFS + 0x1000, 2048);
    for i in 0..3 {
        r.peer.send(&frame(200, i)).unwrap();
    }

    r.net.process_rx();

    assert_eq!(r.rx_used(), 3);
    assert_eq!(r.rxq.used_entry(&mem, 0), (u32::from(bad), 0));
    assert_eq!(r.rxq.used_entry(&mem, 1), (u32::from(ro), 0));
    assert_eq!(
        r.rxq.used_entry(&mem, 2),
        (u32::from(good), (HDR_LEN + 200) as u32)
    );
}

#[test]
fn nothing_is_received_while_quiesced_and_it_flows_after() {
    let mut r = rig();
    r.net.quiesce(true);
    r.add_rx(BUFS, 2048);
    r.peer.send(&frame(80, 4)).unwrap();
    r.net.queue_notify(RX as u32);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(r.rx_used(), 0, "guest memory untouched while paused");

    r.net.quiesce(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.rx_used() == 0 {
        assert!(
            Instant::now() < deadline,
            "not delivered after the pause ended"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn queue_states_are_rx_then_tx_and_reset_forgets_them() {
    let mut r = rig();
    let states = r.net.queue_states();
    assert_eq!(states.len(), 2);
    assert_eq!(states[RX].desc_table, RXQ);
    assert_eq!(states[TX].desc_table, TXQ);
    r.net.reset();
    assert!(r.net.queue_states().is_empty());
}

#[test]
fn dropping_the_device_stops_its_thread() {
    let r = rig();
    let t0 = Instant::now();
    drop(r);
    assert!(t0.elapsed() < Duration::from_secs(5));
}

/// Over a real tap (needs root and /dev/net/tun, as the tests run): the device offers the
/// offloads, a guest header the kernel rejects (a TCPv4 segment whose header length runs past
/// its frame) is dropped and counted while the queue moves on, and a frame with a plain header
/// is sent.
#[test]
fn a_tap_backend_offers_offloads_and_the_kernel_judges_guest_headers() {
    let mut net = Net::new("fsl-vnt0", MAC).unwrap();
    link_up("fsl-vnt0");
    assert_eq!(net.avail_features() & OFFLOAD_FEATURES, OFFLOAD_FEATURES);
    net.set_acked_features(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | OFFLOAD_FEATURES);
    let mem = test_memory();
    let rxq = TestQueue::new(&mem, RXQ, 16);
    let mut txq = TestQueue::new(&mem, TXQ, 16);
    net.activate(mem.clone(), vec![rxq.queue(), txq.queue()], test_irq())
        .unwrap();
    let data = frame(1514, 9);
    // flags NEEDS_CSUM, gso TCPV4, hdr_len 4000 (past the frame), gso_size 1448.
    let mut bad = [0u8; HDR_LEN];
    bad[0] = 1;
    bad[1] = 1;
    bad[2..4].copy_from_slice(&4000u16.to_le_bytes());
    bad[4..6].copy_from_slice(&1448u16.to_le_bytes());
    for (i, hdr) in [bad, [0u8; HDR_LEN]].iter().enumerate() {
        let at = BUFS + 0x4000 * i as u64;
        mem.write_slice(hdr, GuestAddress(at)).unwrap();
        mem.write_slice(&data, GuestAddress(at + 0x1000)).unwrap();
        let head = txq.add_chain(
            &mem,
            &[
                (at, HDR_LEN as u32, false),
                (at + 0x1000, data.len() as u32, false),
            ],
        );
        txq.publish(&mem, head);
        net.queue_notify(TX as u32);
    }
    assert_eq!(txq.used_idx(&mem), 2, "both chains returned");
    let c = net.counters();
    eprintln!(
        "tx frames {} dropped {}",
        c.tx_frames.load(Ordering::Relaxed),
        c.tx_dropped.load(Ordering::Relaxed)
    );
    assert_eq!(c.tx_dropped.load(Ordering::Relaxed), 1, "the bad header");
    assert_eq!(c.tx_frames.load(Ordering::Relaxed), 1, "the plain one");
}

/// Brings interface `name` up (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP): a tap that is
/// down refuses every frame written to it.
fn link_up(name: &str) {
    // SAFETY: socket(2) has no memory-safety preconditions; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: both ioctls read and write one `ifreq`, which `req` is, alive for the calls.
    unsafe {
        assert_eq!(libc::ioctl(raw, libc::SIOCGIFFLAGS, &raw mut req), 0);
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(raw, libc::SIOCSIFFLAGS, &raw mut req), 0);
    }
}
