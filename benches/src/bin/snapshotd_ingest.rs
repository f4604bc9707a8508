//! Ingest throughput for pages already in the store, against memcpy of the same bytes.
//! Target: >= 1 GB/s per core (one ingest thread).

use std::collections::BTreeMap;
use std::time::Instant;

use fissile_snapshotd::store::{CreateRequest, Store};

include!("snapshotd_common/helpers.rs");

fn main() -> anyhow::Result<()> {
    let mb: usize = std::env::var("INGEST_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let pages = mb * 256;
    let mem = random_memory(1, pages);
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let req = |m: &'static [u8]| CreateRequest {
        memory: Box::new(m),
        page_size: 4096,
        parent: None,
        dirty_pages: None,
        blobs: BTreeMap::new(),
        labels: BTreeMap::new(),
        touch_order: Vec::new(),
    };
    let mem: &'static [u8] = Box::leak(mem.into_boxed_slice());
    let t = Instant::now();
    store.create(&req(mem))?;
    let first = t.elapsed();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let out = store.create(&req(mem))?;
        best = best.min(t.elapsed().as_secs_f64());
        assert_eq!(out.chunks_written, 0);
    }
    let mut dst = vec![0u8; mem.len()];
    dst.copy_from_slice(mem); // fault in
    let mut memcpy_best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(mem);
        std::hint::black_box(&dst);
        memcpy_best = memcpy_best.min(t.elapsed().as_secs_f64());
    }
    let ingest = mem.len() as f64 / best / 1e9;
    let memcpy = mem.len() as f64 / memcpy_best / 1e9;
    println!("snapshotd ingest, {mb} MiB of distinct 4 KiB pages, one thread:");
    println!(
        "  first ingest (all pages new, zstd + pack + fsync): {:.2} GB/s",
        gbps(mem.len(), first)
    );
    println!(
        "  re-ingest (all pages already stored): {ingest:.2} GB/s | baseline memcpy {memcpy:.2} GB/s | ratio {:.3} | target >= 1 GB/s: {}",
        ingest / memcpy,
        if ingest >= 1.0 { "MET" } else { "MISSED" }
    );
    Ok(())
}
