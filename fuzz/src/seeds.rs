//! Seed inputs: valid encodings of each target's input, from which the runner's mutations
//! start (`fissile-fuzz seed` writes them into `fuzz/corpus/<target>/seed-*`).

use std::path::Path;

use anyhow::Context;
use fissile_proto::agent::{AGENT_PROTOCOL_VERSION, ExecRequest, Request};
use fissile_proto::frame::encode_frame;
use fissile_proto::snapshotd::{self, SNAPSHOTD_PROTOCOL_VERSION};

/// A template spec with every section `POST /v1/templates` takes.
const TEMPLATE_SPEC: &str = r#"name = "taxi"
base = "python-datasci"
warmup = """
import pandas as pd
zones = pd.read_csv("/opt/data/zones.csv")
"""
[apt]
packages = ["curl"]
[pip]
packages = ["tabulate==0.9.0", "pandas[performance]>=2,<4"]
[env]
DATA = "/opt/data"
[[files]]
dest = "/opt/data/zones.csv"
content = "id,borough\n1,EWR\n"
mode = 0o644
[[run]]
command = "mkdir -p /opt/out"
timeout_s = 60
"#;

/// A target's name and its seed inputs.
pub type Seeds = (&'static str, Vec<Vec<u8>>);

/// Every target's seeds, by target name.
pub fn all() -> anyhow::Result<Vec<Seeds>> {
    let mut agent = Vec::new();
    for req in [
        Request::Info,
        Request::Interrupt,
        Request::Echo {
            payload: b"hello".to_vec(),
        },
        Request::Exec(ExecRequest {
            code: "x = 1\nx + 1".into(),
            timeout_ms: Some(1000),
            env: [("A".to_string(), "b".to_string())].into(),
        }),
        Request::AfterRestore {
            entropy: vec![7; 64],
            wall_clock_ns: 1_700_000_000_000_000_000,
        },
        Request::ReadFile {
            path: "/etc/hostname".into(),
            offset: 0,
            max_len: Some(4096),
        },
    ] {
        let frame = encode_frame(AGENT_PROTOCOL_VERSION, &req)?;
        agent.push(frame[4..].to_vec()); // the body: version byte + postcard
        agent.push(frame);
    }
    let mut sd = Vec::new();
    for req in [
        snapshotd::Request::Ping,
        snapshotd::Request::List,
        snapshotd::Request::Stats,
        snapshotd::Request::Memory,
        snapshotd::Request::CreateAbort,
        snapshotd::Request::CreatePages {
            pages: vec![0, 1, 2, 512, u64::MAX],
        },
        snapshotd::Request::Grant {
            uid: 1_000_001,
            snapshots: vec!["a".repeat(64)],
            reset: true,
        },
    ] {
        let frame = encode_frame(SNAPSHOTD_PROTOCOL_VERSION, &req)?;
        sd.push(frame[4..].to_vec());
        sd.push(frame);
    }
    let control = [
        r#"{"op":"status"}"#,
        r#"{"op":"pause"}"#,
        r#"{"op":"snapshot","durable":true}"#,
        r#"{"op":"fork"}"#,
        r#"{"op":"merge","snapshot":"0123456789abcdef"}"#,
        r#"{"op":"rollback","snapshot":"0123456789abcdef"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let spec = include_bytes!("../../rootfs-builder/templates/python-datasci.toml").to_vec();
    Ok(vec![
        ("agent_frame", agent),
        ("snapshotd_frame", sd),
        ("control_json", control),
        ("vm_state", vec![Vec::new(), vec![0; 64]]),
        ("rootfs_spec", vec![spec]),
        ("template_spec", vec![TEMPLATE_SPEC.as_bytes().to_vec()]),
        ("virtio_chain", vec![block_read_request()]),
        ("virtio_blk", vec![block_read_request()]),
        ("virtio_net", vec![net_tx_frame(), block_read_request()]),
        ("virtio_vsock", vec![vsock_conversation()]),
        (
            "dns_query",
            vec![
                fissile_sandbox::net::sniff::a_query(0x1234, "files.example.test")
                    .context("building a DNS query")?,
            ],
        ),
        (
            "proxy_head",
            vec![
                b"GET /data.csv HTTP/1.1\r\nHost: files.example.test:80\r\nAccept: */*\r\n\r\n"
                    .to_vec(),
                fissile_sandbox::net::sniff::minimal_client_hello(b"files.example.test"),
            ],
        ),
        (
            "nft_counters",
            vec![fissile_sandbox::net::nft_counters::example_answer()],
        ),
    ])
}

/// A `virtio_vsock` input: a guest's side of one vsock connection to the target's host
/// listener (request, data, credit update, shutdown, reset), then guest memory whose queue
/// offers two 4 KiB device-writable buffers (what the receive queue fills).
fn vsock_conversation() -> Vec<u8> {
    use fissile_vmm::devices::virtio::vsock::packet::{
        HOST_CID, OP_CREDIT_UPDATE, OP_REQUEST, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_SEND,
        TYPE_STREAM, VsockHeader,
    };
    let packet = |op: u16, flags: u32, payload: &[u8]| {
        let mut p = VsockHeader {
            src_cid: crate::VSOCK_GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: crate::VSOCK_HOST_PORT,
            len: u32::try_from(payload.len()).unwrap_or(0),
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: 65_536,
            fwd_cnt: 0,
        }
        .to_bytes()
        .to_vec();
        p.extend_from_slice(payload);
        p
    };
    let packets = [
        packet(OP_REQUEST, 0, b""),
        packet(OP_RW, 0, b"hello host"),
        packet(OP_CREDIT_UPDATE, 0, b""),
        packet(OP_SHUTDOWN, SHUTDOWN_SEND, b""),
        packet(OP_RST, 0, b""),
    ]
    .concat();
    let mut mem = vec![0u8; 0x3000];
    for (i, addr) in [0x1000u64, 0x2000].into_iter().enumerate() {
        let at = 16 * i;
        mem[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        mem[at + 8..at + 12].copy_from_slice(&4096u32.to_le_bytes());
        mem[at + 12..at + 14].copy_from_slice(&2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
    }
    let avail = 16 * 16;
    mem[avail + 2..avail + 4].copy_from_slice(&2u16.to_le_bytes()); // idx 2: heads 0, 1
    mem[avail + 6..avail + 8].copy_from_slice(&1u16.to_le_bytes());
    let mut input = u16::try_from(packets.len())
        .unwrap_or(u16::MAX)
        .to_le_bytes()
        .to_vec();
    input.extend(packets);
    input.extend(mem);
    input
}

/// Guest memory with one virtio-net transmit chain on the queue: a 12-byte header at 0x1000
/// and a 60-byte frame at 0x2000 (both device-readable).
fn net_tx_frame() -> Vec<u8> {
    let mut mem = vec![0u8; 0x2040];
    let mut desc = |i: usize, addr: u64, len: u32, flags: u16, next: u16| {
        let at = 16 * i;
        mem[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        mem[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        mem[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        mem[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    };
    desc(0, 0x1000, 12, 1, 1);
    desc(1, 0x2000, 60, 0, 0);
    let avail = 16 * 16;
    mem[avail + 2..avail + 4].copy_from_slice(&1u16.to_le_bytes()); // idx = 1, ring[0] = 0
    mem[0x2000..0x2006].fill(0xff); // a broadcast destination
    mem
}

/// Guest memory with one virtio-blk read request on the queue (see `crate::guest_queue`):
/// header at 0x1000, a 512-byte data buffer at 0x2000, the status byte at 0x3000.
fn block_read_request() -> Vec<u8> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let mut mem = vec![0u8; 0x1010];
    let mut desc = |i: usize, addr: u64, len: u32, flags: u16, next: u16| {
        let at = 16 * i;
        mem[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        mem[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        mem[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        mem[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    };
    desc(0, 0x1000, 16, NEXT, 1);
    desc(1, 0x2000, 512, NEXT | WRITE, 2);
    desc(2, 0x3000, 1, WRITE, 0);
    let avail = 16 * 16;
    mem[avail + 2..avail + 4].copy_from_slice(&1u16.to_le_bytes()); // idx = 1
    // ring[0] = 0; the request header (type IN, sector 0) at 0x1000 is all zeroes.
    mem
}

/// Writes every seed into `corpus/<target>/seed-<n>`.
pub fn write_all(corpus: &Path) -> anyhow::Result<()> {
    for (target, seeds) in all()? {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (i, s) in seeds.iter().enumerate() {
            let p = dir.join(format!("seed-{i}"));
            std::fs::write(&p, s).with_context(|| format!("writing {}", p.display()))?;
        }
        println!("{target}: {} seeds", seeds.len());
    }
    Ok(())
}
