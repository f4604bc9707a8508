//! Flattening a deep layer: after the ingest of a layer with `FLATTEN_BELOW` layers below it,
//! snapshotd fills its image with every page from its chain. This times that, from the
//! moment the layer is durable until its image answers as complete, on an in-process daemon,
//! against copying the same non-zero pages from one memfd into another with the same
//! positional reads and writes (the copy a flatten cannot avoid).
//!
//! Usage: `snapshotd_flatten` (native; `FLATTEN_MB`, default 512, is the memory size; a third
//! of its pages hold data, as a booted guest's do, and each layer writes 2,000 pages).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fissile_proto::snapshotd::FLATTEN_BELOW;
use fissile_snapshotd::client::{Client, CreateOptions, seal_for_adoption};
use fissile_snapshotd::store::Store;
use fissile_snapshotd::sys;

include!("snapshotd_common/helpers.rs");

const PS: u64 = 4096;
/// Pages each layer writes.
const LAYER_PAGES: u64 = 2000;

fn adopting(len: u64) -> CreateOptions {
    CreateOptions {
        memory_size: len,
        adopt: true,
        no_wait_durable: true,
        ..CreateOptions::default()
    }
}

fn main() -> anyhow::Result<()> {
    let mb: u64 = std::env::var("FLATTEN_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let len = mb << 20;
    let pages = len / PS;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(&dir.path().join("store"))?);
    let sock = dir.path().join("s.sock");
    let _server = serve_in_process(&store, &sock)?;
    let mut c = Client::connect(&sock)?;

    // The complete image: every third page holds data.
    let data: Vec<u64> = (0..pages).filter(|p| p % 3 == 0).collect();
    let page = random_memory(3, 1);
    let base = sys::memfd_create("base", len)?;
    for &p in &data {
        base.write_all_at(&page, p * PS)?;
    }
    seal_for_adoption(&base)?;
    let mut top = c.create_snapshot(&base, &adopting(len))?;
    // FLATTEN_BELOW + 1 layers, each writing LAYER_PAGES pages spread over the memory.
    for i in 0..=u64::from(FLATTEN_BELOW) {
        let layer = sys::memfd_create("layer", len)?;
        let step = pages / LAYER_PAGES;
        let dirty: Vec<u64> = (0..LAYER_PAGES).map(|k| k * step + i % step).collect();
        for &p in &dirty {
            layer.write_all_at(&page, p * PS)?;
        }
        seal_for_adoption(&layer)?;
        let opts = CreateOptions {
            parent: Some(top.clone()),
            dirty_pages: Some(dirty),
            ..adopting(len)
        };
        top = c.create_snapshot(&layer, &opts)?;
    }
    c.wait_durable(&top)?;
    // The ingest thread flattens it right after marking it durable.
    let t = Instant::now();
    let deadline = t + Duration::from_secs(600);
    while !c.open_image(&top)?.complete {
        anyhow::ensure!(Instant::now() < deadline, "{top} was not flattened");
        std::thread::sleep(Duration::from_millis(1));
    }
    let flatten = t.elapsed();
    let written = c.stats()?.image_bytes;

    // Baseline: the same pages (the base's data and the layers' pages) copied with pread
    // and pwrite into a fresh memfd.
    let mut wanted = data.clone();
    let step = pages / LAYER_PAGES;
    for i in 0..=u64::from(FLATTEN_BELOW) {
        wanted.extend((0..LAYER_PAGES).map(|k| k * step + i % step));
    }
    wanted.sort_unstable();
    wanted.dedup();
    let dst = sys::memfd_create("copy", len)?;
    let mut buf = vec![0u8; PS as usize];
    let t = Instant::now();
    for &p in &wanted {
        base.read_exact_at(&mut buf, p * PS)?;
        dst.write_all_at(&buf, p * PS)?;
    }
    let copy = t.elapsed();
    let bytes = wanted.len() as u64 * PS;
    println!(
        "snapshotd_flatten: {mb} MiB, a third of its pages data; {} layers of {LAYER_PAGES} pages",
        FLATTEN_BELOW + 1
    );
    println!(
        "  flatten (durable -> complete): {:8.1} ms for {} pages ({:.2} GB/s); images hold {} MiB",
        flatten.as_secs_f64() * 1e3,
        wanted.len(),
        gbps(bytes as usize, flatten),
        written >> 20
    );
    println!(
        "  the same pages copied memfd to memfd (pread/pwrite): {:8.1} ms ({:.2} GB/s); ratio {:.2}x",
        copy.as_secs_f64() * 1e3,
        gbps(bytes as usize, copy),
        flatten.as_secs_f64() / copy.as_secs_f64()
    );
    Ok(())
}
