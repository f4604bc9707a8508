//! virtio-net over a host tap device.
//!
//! Two queues (receive 0, transmit 1), a MAC in config space. Over a tap, checksum and TCP
//! segmentation offloads both ways (`CSUM`, `GUEST_CSUM`, `GUEST_TSO4/6`, `HOST_TSO4/6`):
//! the tap reads and writes the same 12-byte `virtio_net_hdr_v1` the guest uses, so frames
//! and headers pass through as they are (the kernel validates a guest's header before it
//! builds a packet from it), and the tap's offloads follow what the guest acked. Over a plain
//! datagram backend (the tests, the fuzz target) no offloads: every frame is a plain
//! Ethernet frame behind a zeroed header. Transmit runs on the
//! vCPU thread that notified (one frame per chain, written to the tap without blocking; a
//! full tap drops it as a NIC would). Receive runs on the device's event thread when the tap
//! is readable and on the vCPU thread when the guest adds receive buffers.
//!
//! Host memory is bounded whatever the guest does: one frame buffer for each direction. A
//! guest that never refills its receive queue leaves at most one frame waiting here; the rest
//! wait in the tap's own queue, which the kernel bounds (and drops from). While a snapshot is
//! taken ([`VirtioDevice::quiesce`]) nothing is read from the tap.
//!
//! The backend is any descriptor with one frame per `read`/`write`: a tap ([`tap::open`]) in
//! production, a datagram socket pair in the tests.

pub mod tap;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::chain::{LogLimiter, collect_chain};
use crate::devices::virtio::{
    ActivateError, INT_VRING, IrqTrigger, TYPE_NET, VIRTIO_F_VERSION_1, VirtioDevice,
    read_config_bytes,
};
use crate::memory::GuestMemory;

/// Feature bit: the device has a MAC address in config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Feature bit: the device takes frames with partial checksums (the guest offloads them).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// Feature bit: the driver takes frames with partial checksums.
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
/// Feature bit: the driver takes TCP/IPv4 segments up to 64 KiB.
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
/// Feature bit: the driver takes TCP/IPv6 segments up to 64 KiB.
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
/// Feature bit: the device takes TCP/IPv4 segments up to 64 KiB.
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
/// Feature bit: the device takes TCP/IPv6 segments up to 64 KiB.
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// What a device over a tap offers on top of `VERSION_1 | MAC`.
pub const OFFLOAD_FEATURES: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RX: usize = 0;
/// Transmit queue index.
pub const TX: usize = 1;
/// `struct virtio_net_hdr_v1` (with VERSION_1 the header always has `num_buffers`).
pub const HDR_LEN: usize = 12;
/// Largest frame carried (without the header): a 64 KiB IP packet plus Ethernet and VLAN
/// headers. Without offloads the tap's MTU keeps real frames far smaller.
pub const MAX_FRAME: usize = 65_535 + 18;

const TOKEN_TAP: u64 = 1;
const TOKEN_WAKE: u64 = 2;

/// Creating the device failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Attaching to the tap.
    #[error("virtio-net backend")]
    Tap(#[source] tap::TapError),
    /// The event thread's epoll or eventfd.
    #[error("virtio-net event loop setup")]
    Epoll(#[source] std::io::Error),
    /// Starting the event thread.
    #[error("starting the virtio-net thread")]
    Thread(#[source] std::io::Error),
}

/// Frame and error counters (since the device was created).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest (frames, without headers).
    pub rx_bytes: AtomicU64,
    /// Frames the guest's buffers could not hold (dropped).
    pub rx_dropped: AtomicU64,
    /// Frames sent by the guest to the tap.
    pub tx_frames: AtomicU64,
    /// Bytes sent (frames, without headers).
    pub tx_bytes: AtomicU64,
    /// Frames dropped on transmit (tap full or gone, frame too large or malformed).
    pub tx_dropped: AtomicU64,
}

/// The virtio-net device.
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    /// The backend carries `virtio_net_hdr_v1` (a tap): offloads are offered.
    vnet_hdr: bool,
    queue_sizes: [u16; 2],
    inner: Arc<Mutex<Inner>>,
    counters: Arc<NetCounters>,
    wake: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    backend: File,
    /// Frames cross the backend with their header ([`Net::vnet_hdr`]).
    vnet_hdr: bool,
    active: Option<Active>,
    paused: bool,
    /// A frame read from the backend, header in front, waiting for a receive buffer:
    /// `rx_buf[..rx_pending]` (0: none).
    rx_buf: Vec<u8>,
    rx_pending: usize,
    tx_buf: Vec<u8>,
    counters: Arc<NetCounters>,
    log: LogLimiter,
}

#[derive(Debug)]
struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    irq: Arc<IrqTrigger>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl Net {
    /// A device with MAC `mac` attached to the tap `tap_name`.
    pub fn new(tap_name: &str, mac: [u8; 6]) -> Result<Self, NetError> {
        Self::build(tap::open(tap_name).map_err(NetError::Tap)?, mac, true)
    }

    /// A device over `backend`: a non-blocking descriptor that reads and writes one plain
    /// Ethernet frame per call (a datagram socket); no offloads.
    pub fn with_backend(backend: File, mac: [u8; 6]) -> Result<Self, NetError> {
        Self::build(backend, mac, false)
    }

    fn build(backend: File, mac: [u8; 6], vnet_hdr: bool) -> Result<Self, NetError> {
        let epoll = Epoll::new().map_err(NetError::Epoll)?;
        let wake = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(NetError::Epoll)?,
        );
        // Edge-triggered: a tap with data and no guest buffer must not spin the thread; the
        // guest's refill (queue notify) drains it instead.
        epoll
            .ctl(
                ControlOperation::Add,
                backend.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_TAP),
            )
            .map_err(NetError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_WAKE),
            )
            .map_err(NetError::Epoll)?;
        let counters = Arc::new(NetCounters::default());
        let inner = Arc::new(Mutex::new(Inner {
            backend,
            vnet_hdr,
            active: None,
            paused: false,
            rx_buf: vec![0; HDR_LEN + MAX_FRAME],
            rx_pending: 0,
            tx_buf: Vec::with_capacity(HDR_LEN + MAX_FRAME),
            counters: counters.clone(),
            log: LogLimiter::default(),
        }));
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (inner, wake, stopping) = (inner.clone(), wake.clone(), stopping.clone());
            std::thread::Builder::new()
                .name("fissile-net".into())
                .spawn(move || event_loop(&epoll, &inner, &wake, &stopping))
                .map_err(NetError::Thread)?
        };
        Ok(Self {
            mac,
            vnet_hdr,
            queue_sizes: [QUEUE_SIZE; 2],
            inner,
            counters,
            wake,
            stopping,
            thread: Some(thread),
        })
    }

    /// The device's counters.
    pub fn counters(&self) -> &Arc<NetCounters> {
        &self.counters
    }

    /// Delivers what the backend has to the guest (also what the event thread does).
    pub fn process_rx(&self) -> usize {
        lock(&self.inner).process_rx()
    }

    /// Sends what the guest queued for transmit.
    pub fn process_tx(&self) -> usize {
        lock(&self.inner).process_tx()
    }
}

fn event_loop(epoll: &Epoll, inner: &Mutex<Inner>, wake: &EventFd, stopping: &AtomicBool) {
    crate::seccomp::enter(crate::seccomp::ThreadClass::Net);
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        match epoll.wait(1000, &mut events) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "virtio-net: epoll_wait failed; the net thread exits");
                return;
            }
        }
        let _ = wake.read();
        if stopping.load(Ordering::Acquire) {
            return;
        }
        // Also after a timeout: a frame left pending while the guest had no buffer.
        lock(inner).process_rx();
    }
}

impl Inner {
    /// Moves frames from the backend into receive buffers until either runs out.
    fn process_rx(&mut self) -> usize {
        if self.paused {
            return 0;
        }
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let mem = &active.mem;
        let max = usize::from(active.rx.size());
        let mut used = 0;
        loop {
            if self.rx_pending == 0 {
                let at = if self.vnet_hdr { 0 } else { HDR_LEN };
                match self.backend.read(&mut self.rx_buf[at..]) {
                    Ok(0) => break,
                    Ok(n) if at + n <= HDR_LEN => {
                        // A header without a frame: nothing to deliver.
                        self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(n) => {
                        if !self.vnet_hdr {
                            // A zeroed header: no offloads.
                            self.rx_buf[..HDR_LEN].fill(0);
                        }
                        // One buffer per frame (no MRG_RXBUF).
                        self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                        self.rx_pending = at + n;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if self.log.allow() {
                            tracing::warn!(error = %e, "virtio-net: reading the tap failed");
                        }
                        break;
                    }
                }
            }
            let Some(chain) = active.rx.pop_descriptor_chain(mem) else {
                // No buffer: the frame waits here (one frame at most), the rest in the tap.
                break;
            };
            let head = chain.head_index();
            let frame = &self.rx_buf[..self.rx_pending];
            let written = match collect_chain(chain, max) {
                Ok(descs) => {
                    let room: u64 = descs
                        .iter()
                        .filter(|d| d.is_write_only())
                        .map(|d| u64::from(d.len()))
                        .sum();
                    if room < frame.len() as u64 {
                        // Without MRG_RXBUF a frame must fit one chain: drop it, return the
                        // buffer empty (the driver counts a length error).
                        self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                        0
                    } else {
                        write_to_chain(mem, &descs, frame)
                    }
                }
                Err(e) => {
                    if self.log.allow() {
                        tracing::warn!(error = %e, "virtio-net: dropped malformed rx chain");
                    }
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            if written > 0 {
                self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .rx_bytes
                    .fetch_add((self.rx_pending - HDR_LEN) as u64, Ordering::Relaxed);
            }
            self.rx_pending = 0;
            if active.rx.add_used(mem, head, written).is_ok() {
                used += 1;
            }
        }
        if used > 0 && active.rx.needs_notification(mem).unwrap_or(true) {
            active.irq.trigger(INT_VRING);
        }
        used
    }

    /// Sends every chain the guest queued for transmit.
    fn process_tx(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let mem = &active.mem;
        let max = usize::from(active.tx.size());
        let mut used = 0;
        while let Some(chain) = active.tx.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let frame = match collect_chain(chain, max) {
                Ok(descs) => gather(mem, &descs, &mut self.tx_buf),
                Err(e) => Err(e.to_string()),
            };
            match frame {
                Ok(()) if self.tx_buf.len() > HDR_LEN => {
                    let out = if self.vnet_hdr {
                        &self.tx_buf[..]
                    } else {
                        &self.tx_buf[HDR_LEN..]
                    };
                    match self.backend.write(out) {
                        // A tap or datagram socket takes a frame whole or not at all (a tap
                        // refuses a header that does not describe its frame: EINVAL).
                        Ok(n) if n == out.len() => {
                            self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                            self.counters
                                .tx_bytes
                                .fetch_add((self.tx_buf.len() - HDR_LEN) as u64, Ordering::Relaxed);
                        }
                        Ok(_) => {
                            self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            // Full (EAGAIN/ENOBUFS) or down: dropped, as on a wire.
                            self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                            if e.kind() != std::io::ErrorKind::WouldBlock && self.log.allow() {
                                tracing::warn!(error = %e, "virtio-net: writing to the tap failed");
                            }
                        }
                    }
                }
                Ok(()) => {
                    self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(why) => {
                    self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    if self.log.allow() {
                        tracing::warn!(why, "virtio-net: dropped malformed tx chain");
                    }
                }
            }
            if active.tx.add_used(mem, head, 0).is_ok() {
                used += 1;
            }
        }
        if used > 0 && active.tx.needs_notification(mem).unwrap_or(true) {
            active.irq.trigger(INT_VRING);
        }
        used
    }
}

/// Copies the readable descriptors of a transmit chain (header + frame) into `buf`, at most
/// `HDR_LEN + MAX_FRAME` bytes.
fn gather(
    mem: &GuestMemory,
    descs: &[virtio_queue::desc::split::Descriptor],
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    buf.clear();
    for d in descs {
        if d.is_write_only() {
            return Err("a transmit chain has a device-writable buffer".into());
        }
        let len = d.len() as usize;
        if buf.len() + len > HDR_LEN + MAX_FRAME {
            return Err(format!("frame longer than {MAX_FRAME} bytes"));
        }
        let start = buf.len();
        buf.resize(start + len, 0);
        mem.read_slice(&mut buf[start..], d.addr())
            .map_err(|e| format!("reading the frame: {e}"))?;
    }
    Ok(())
}

/// Writes `data` across the chain's device-writable buffers (which hold at least that many
/// bytes); returns the bytes written (0 on a memory error).
fn write_to_chain(
    mem: &GuestMemory,
    descs: &[virtio_queue::desc::split::Descriptor],
    data: &[u8],
) -> u32 {
    let mut off = 0;
    for d in descs.iter().filter(|d| d.is_write_only()) {
        if off == data.len() {
            break;
        }
        let n = (d.len() as usize).min(data.len() - off);
        if mem
            .write_slice(&data[off..off + n], GuestAddress(d.addr().0))
            .is_err()
        {
            return 0;
        }
        off += n;
    }
    off as u32
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        let offloads = if self.vnet_hdr { OFFLOAD_FEATURES } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | offloads
    }

    fn set_acked_features(&mut self, features: u64) {
        if !self.vnet_hdr {
            return;
        }
        // What the kernel may hand the guest: only what its driver said it takes.
        let mut flags = 0;
        if features & VIRTIO_NET_F_GUEST_CSUM != 0 {
            flags |= tap::TUN_F_CSUM;
            if features & VIRTIO_NET_F_GUEST_TSO4 != 0 {
                flags |= tap::TUN_F_TSO4;
            }
            if features & VIRTIO_NET_F_GUEST_TSO6 != 0 {
                flags |= tap::TUN_F_TSO6;
            }
        }
        let inner = lock(&self.inner);
        if let Err(e) = tap::set_offload(&inner.backend, flags) {
            // Without them the kernel sends plain frames, which every driver takes.
            tracing::warn!(error = %e, flags, "virtio-net: cannot set the tap's offloads");
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR.
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        mut queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        let tx = queues.remove(TX);
        let rx = queues.remove(RX);
        lock(&self.inner).active = Some(Active { mem, rx, tx, irq });
        // Frames may have arrived before the driver was ready.
        let _ = self.wake.write(1);
        Ok(())
    }

    fn queue_notify(&mut self, index: u32) {
        let mut inner = lock(&self.inner);
        match index as usize {
            RX => {
                inner.process_rx();
            }
            TX => {
                inner.process_tx();
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        let mut inner = lock(&self.inner);
        inner.active = None;
        inner.rx_pending = 0;
        if inner.vnet_hdr {
            // The next driver acks its own; until then, plain frames.
            let _ = tap::set_offload(&inner.backend, 0);
        }
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        lock(&self.inner)
            .active
            .iter()
            .flat_map(|a| [a.rx.state(), a.tx.state()])
            .collect()
    }

    fn quiesce(&mut self, paused: bool) {
        lock(&self.inner).paused = paused;
        if !paused {
            // Frames that arrived meanwhile raised no new edge: look now.
            let _ = self.wake.write(1);
        }
    }

    fn restored(&mut self) {
        // A frame held for the old VM's guest belongs to another network view; the tap
        // itself is this VMM's own.
        lock(&self.inner).rx_pending = 0;
    }
}

#[cfg(test)]
mod tests;
