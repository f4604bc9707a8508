//! Fuzz targets: every parser that reads bytes a guest, a client or a peer controls. Each
//! target takes arbitrary bytes and must neither panic nor allocate without bound; a decode
//! error is the expected answer to garbage.
//!
//! The same functions serve the stable-Rust mutation runner (`fissile-fuzz run`, what
//! `scripts/fuzz` calls) and the corpus replay (`tests/replay.rs`, part of every `cargo
//! test`), so an input that once crashed a target and was added to `corpus/<target>/` fails
//! CI if the bug comes back.

pub mod seeds;

use std::io::{Cursor, Write as _};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use fissile_proto::agent::{AGENT_FRAME_CAP, AGENT_PROTOCOL_VERSION};
use fissile_proto::snapshotd::{SNAPSHOTD_FRAME_CAP, SNAPSHOTD_PROTOCOL_VERSION};
use fissile_proto::{agent, control, frame, snapshotd};
use fissile_vmm::devices::virtio::block::{DiskImage, execute_request};
use fissile_vmm::devices::virtio::chain::collect_chain;
use fissile_vmm::devices::virtio::net::Net;
use fissile_vmm::devices::virtio::{IrqTrigger, VirtioDevice};
use fissile_vmm::memory::GuestMemory;
use fissile_vmm::snapshot::{MicrovmState, STATE_FORMAT_VERSION, seal};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// A fuzz target: arbitrary bytes in, no panic out.
pub type Target = fn(&[u8]);

/// Every target, by name (the corpus directory under `fuzz/corpus/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("agent_frame", agent_frame),
    ("snapshotd_frame", snapshotd_frame),
    ("control_json", control_json),
    ("vm_state", vm_state),
    ("rootfs_spec", rootfs_spec),
    ("virtio_chain", virtio_chain),
    ("virtio_blk", virtio_blk),
    ("virtio_net", virtio_net),
    ("virtio_vsock", virtio_vsock),
    ("dns_query", dns_query),
    ("proxy_head", proxy_head),
    ("nft_counters", nft_counters),
    ("template_spec", template_spec),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The agent protocol as both peers read it: a frame off the wire (length prefix, cap,
/// version), then its body as a request (what the guest agent decodes from the host) and as
/// a response (what the host decodes from a guest it must not trust).
pub fn agent_frame(data: &[u8]) {
    let _ = frame::read_frame_bytes(&mut Cursor::new(data), AGENT_FRAME_CAP);
    let _ = frame::decode_body::<agent::Request>(data, AGENT_PROTOCOL_VERSION);
    let _ = frame::decode_body::<agent::Response>(data, AGENT_PROTOCOL_VERSION);
}

/// The snapshotd protocol: requests (from VMMs, which a guest may have compromised) and
/// responses.
pub fn snapshotd_frame(data: &[u8]) {
    let _ = frame::read_frame_bytes(&mut Cursor::new(data), SNAPSHOTD_FRAME_CAP);
    let _ = frame::decode_body::<snapshotd::Request>(data, SNAPSHOTD_PROTOCOL_VERSION);
    let _ = frame::decode_body::<snapshotd::Response>(data, SNAPSHOTD_PROTOCOL_VERSION);
}

/// The VMM's control socket: one JSON line per request.
pub fn control_json(data: &[u8]) {
    let _ = serde_json::from_slice::<control::ControlRequest>(data);
    let _ = serde_json::from_slice::<control::ControlResponse>(data);
}

/// The VM-state decoder (validated as untrusted input on every restore): the blob as given,
/// and the bytes sealed with a valid header and checksum so the decoder and validation
/// behind them are reached too.
pub fn vm_state(data: &[u8]) {
    let _ = MicrovmState::decode(data);
    let _ = MicrovmState::decode(&seal(STATE_FORMAT_VERSION, data));
    // Format 2 (no TSC rate), which a VMM still decodes.
    let _ = MicrovmState::decode(&seal(2, data));
}

/// The rootfs template parser (TOML specs).
pub fn rootfs_spec(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = fissile_rootfs::spec::Spec::parse(&text, Path::new("fuzz.toml"));
}

/// The template spec a client sends to `POST /v1/templates` (TOML, checked field by field,
/// packages turned into argv commands).
pub fn template_spec(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = fissiled::template_spec::parse(&text, |base| base == "python-datasci");
}

/// Guest memory for the virtio targets: 64 KiB at GPA 0, a 16-entry split queue at 0 (the
/// descriptor table, then the avail and used rings), buffers anywhere after.
const QUEUE_SIZE: u16 = 16;
const MEM_SIZE: usize = 64 << 10;
const AVAIL: u64 = 16 * QUEUE_SIZE as u64;
const USED: u64 = (AVAIL + 6 + 2 * QUEUE_SIZE as u64 + 3) & !3;
/// Most chains one input may pop (the guest controls the avail index).
const MAX_CHAINS: usize = 64;

/// Lays `data` over guest memory from GPA 0 (descriptor table, avail ring, buffers) and
/// returns the memory and a ready queue over it.
fn guest_queue(data: &[u8]) -> Option<(GuestMemory, Queue)> {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).ok()?;
    let mut q = Queue::new(QUEUE_SIZE).ok()?;
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    Some((mem, q))
}

/// Descriptor chains as the devices walk them (`collect_chain`: loops, lengths, buffers
/// outside guest RAM), then completed on the used ring.
pub fn virtio_chain(data: &[u8]) {
    let Some((mem, mut q)) = guest_queue(data) else {
        return;
    };
    let mut heads = Vec::new();
    if let Ok(iter) = q.iter(&mem) {
        for chain in iter.take(MAX_CHAINS) {
            heads.push(chain.head_index());
            let _ = collect_chain(chain, usize::from(QUEUE_SIZE));
        }
    }
    for head in heads {
        let _ = q.add_used(&mem, head, 0);
    }
}

/// virtio-blk requests from guest chains, executed against a small scratch disk.
pub fn virtio_blk(data: &[u8]) {
    static DISK: OnceLock<Option<Mutex<(tempfile::TempPath, DiskImage)>>> = OnceLock::new();
    let disk = DISK.get_or_init(|| {
        let file = tempfile::NamedTempFile::new().ok()?;
        file.as_file().set_len(64 << 10).ok()?;
        let path = file.into_temp_path();
        let image = DiskImage::open(&path, false, "fuzz").ok()?;
        Some(Mutex::new((path, image)))
    });
    let Some(disk) = disk else {
        return;
    };
    let mut disk = disk.lock().unwrap_or_else(|p| p.into_inner());
    let Some((mem, mut q)) = guest_queue(data) else {
        return;
    };
    let Ok(iter) = q.iter(&mem) else {
        return;
    };
    for chain in iter.take(MAX_CHAINS) {
        if let Ok(descs) = collect_chain(chain, usize::from(QUEUE_SIZE)) {
            let _ = execute_request(&mut disk.1, &mem, &descs);
        }
    }
}

/// virtio-net over a datagram socket pair: the input is guest memory holding both queues'
/// rings (the same layout, as a hostile driver may set up); the device sends what the
/// transmit chains hold, then a frame from the peer goes into whatever the receive chains
/// describe. One device, reset between inputs.
pub fn virtio_net(data: &[u8]) {
    use std::os::unix::net::UnixDatagram;
    type Rig = Mutex<Option<(Net, UnixDatagram)>>;
    static NET: OnceLock<Rig> = OnceLock::new();
    let rig = NET.get_or_init(|| {
        let make = || {
            let (ours, peer) = UnixDatagram::pair().ok()?;
            ours.set_nonblocking(true).ok()?;
            peer.set_nonblocking(true).ok()?;
            let backend = std::fs::File::from(std::os::fd::OwnedFd::from(ours));
            let net = Net::with_backend(backend, [6, 0, 0, 0, 0, 1]).ok()?;
            Some((net, peer))
        };
        Mutex::new(make())
    });
    let Some((net, peer)) = &mut *rig.lock().unwrap_or_else(|p| p.into_inner()) else {
        return;
    };
    let (Some((mem, rx)), Some((_, tx))) = (guest_queue(data), guest_queue(data)) else {
        return;
    };
    let Ok(irq) = IrqTrigger::new() else {
        return;
    };
    net.reset();
    if net
        .activate(mem, vec![rx, tx], std::sync::Arc::new(irq))
        .is_err()
    {
        return;
    }
    net.process_tx();
    let mut buf = [0u8; 2048];
    while peer.recv(&mut buf).is_ok() {}
    let _ = peer.send(&data[..data.len().min(1514)]);
    net.process_rx();
    net.reset();
}

/// virtio-vsock as a guest drives it. The input is a packet stream (a 2-byte length, then
/// headers and payloads: any ops, ports, lengths and credit) and guest memory with the
/// queues (what follows). The packets go through the muxer, which connects the guest to a
/// host listener for port [`VSOCK_HOST_PORT`] and answers into the receive queue's buffers
/// the memory describes; the host side writes to what it accepted and its socket events are
/// handled between packets; then the transmit queue's own chains; the device reset between
/// inputs.
pub fn virtio_vsock(data: &[u8]) {
    use fissile_vmm::devices::virtio::vsock::VsockBackend;
    use fissile_vmm::devices::virtio::vsock::packet::{HDR_SIZE, VsockHeader};
    use std::os::unix::net::{UnixListener, UnixStream};
    use vmm_sys_util::epoll::{Epoll, EpollEvent};
    struct Rig {
        _dir: tempfile::TempDir,
        epoll: std::sync::Arc<Epoll>,
        backend: VsockBackend,
        listener: UnixListener,
    }
    static RIG: OnceLock<Mutex<Option<Rig>>> = OnceLock::new();
    let rig = RIG.get_or_init(|| {
        let make = || {
            let dir = tempfile::tempdir().ok()?;
            let path = dir.path().join("v.sock");
            let epoll = std::sync::Arc::new(Epoll::new().ok()?);
            let backend = VsockBackend::new(VSOCK_GUEST_CID, &path, epoll.clone()).ok()?;
            let listener =
                UnixListener::bind(dir.path().join(format!("v.sock_{VSOCK_HOST_PORT}"))).ok()?;
            listener.set_nonblocking(true).ok()?;
            Some(Rig {
                _dir: dir,
                epoll,
                backend,
                listener,
            })
        };
        Mutex::new(make())
    });
    let mut rig = rig.lock().unwrap_or_else(|p| p.into_inner());
    let Some(Rig {
        epoll,
        backend,
        listener,
        ..
    }) = &mut *rig
    else {
        return;
    };
    let Some((len, data)) = data.split_first_chunk::<2>() else {
        return;
    };
    let (packets, memory) = data.split_at(usize::from(u16::from_le_bytes(*len)).min(data.len()));
    let (Some((mem, rx)), Some((_, tx)), Some((_, ev))) = (
        guest_queue(memory),
        guest_queue(memory),
        guest_queue(memory),
    ) else {
        return;
    };
    let Ok(irq) = IrqTrigger::new() else {
        return;
    };
    backend.activate(mem, vec![rx, tx, ev], std::sync::Arc::new(irq));
    let mut accepted: Vec<UnixStream> = Vec::new();
    let mut events = vec![EpollEvent::default(); 16];
    let mut rest = packets;
    for _ in 0..MAX_CHAINS {
        let Some((head, after)) = rest.split_first_chunk::<HDR_SIZE>() else {
            break;
        };
        let hdr = VsockHeader::parse(head);
        let n = usize::try_from(hdr.len)
            .unwrap_or(usize::MAX)
            .min(after.len());
        backend.handle_guest_packet(&hdr, &after[..n]);
        rest = &after[n..];
        while let Ok((s, _)) = listener.accept() {
            let _ = s.set_nonblocking(true);
            let _ = (&s).write_all(b"host bytes");
            accepted.push(s);
        }
        if let Ok(k) = epoll.wait(0, &mut events) {
            for e in &events[..k] {
                backend.handle_event(e.fd(), e.event_set());
            }
        }
        backend.process_rx();
    }
    backend.process_tx();
    backend.tick();
    backend.reset();
}

/// The guest's context id in the `virtio_vsock` target.
pub const VSOCK_GUEST_CID: u64 = 3;
/// The host port a listener answers on in the `virtio_vsock` target.
pub const VSOCK_HOST_PORT: u32 = 1234;

/// A guest's DNS query as the sandbox's resolver reads it (question, refusal built from
/// it), and the same bytes as an upstream's reply to the proxy's own lookup.
pub fn dns_query(data: &[u8]) {
    use fissile_sandbox::net::sniff;
    let id = match sniff::dns_question(data) {
        Ok(q) => q.id,
        Err(e) => e.id().unwrap_or(0),
    };
    let _ = sniff::dns_refusal(data, id, sniff::DnsFailure::Refused);
    let _ = sniff::a_records(data, id);
}

/// The first bytes of a guest's connection as the domain proxy reads them (HTTP Host or
/// TLS SNI), whole and cut at every length the proxy may have read so far, and the request
/// it forwards (`Connection: close`): still one complete request head, naming the same Host.
pub fn proxy_head(data: &[u8]) {
    use fissile_sandbox::net::sniff;
    let data = &data[..data.len().min(sniff::MAX_HEAD)];
    for cut in [data.len(), data.len() / 2, 5.min(data.len())] {
        let name = sniff::requested_name(&data[..cut]);
        if let Some(out) = sniff::close_after_first_request(&data[..cut]) {
            assert_eq!(
                sniff::requested_name(&out),
                name,
                "the rewrite changed the Host"
            );
        }
    }
}

/// The kernel's answer to a dump of nftables counters (what `/metrics` reads from every
/// sandbox's namespace), as one datagram and split in two.
pub fn nft_counters(data: &[u8]) {
    use fissile_sandbox::net::nft_counters::parse;
    let mut out = Vec::new();
    let _ = parse(data, 1, &mut out);
    let (a, b) = data.split_at(data.len() / 2);
    let mut out = Vec::new();
    if parse(a, 1, &mut out).is_ok() {
        let _ = parse(b, 1, &mut out);
    }
}
