//! Ingest throughput, against memcpy of the same bytes in the same run, at 1 and 2 ingest
//! threads (and more when the machine has the cores): a first ingest of new pages (hash,
//! look up, zstd, pack, fsync) and a re-ingest of pages already stored (hash, look up).
//! Target: re-ingest >= 1 GB/s per core, scaling with threads.

use std::time::Instant;

use fissile_snapshotd::store::Store;

include!("snapshotd_common/helpers.rs");

fn main() -> anyhow::Result<()> {
    let mb: usize = std::env::var("INGEST_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let pages = mb * 256;
    let mem = random_memory(1, pages);
    let mem: &'static [u8] = Box::leak(mem.into_boxed_slice());
    let mut dst = vec![0u8; mem.len()];
    dst.copy_from_slice(mem); // fault in
    let mut memcpy_best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(mem);
        std::hint::black_box(&dst);
        memcpy_best = memcpy_best.min(t.elapsed().as_secs_f64());
    }
    let memcpy = mem.len() as f64 / memcpy_best / 1e9;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut counts = vec![1, 2];
    if cores > 2 {
        counts.push(cores.min(fissile_snapshotd::store::MAX_INGEST_THREADS));
    }
    println!(
        "snapshotd ingest, {mb} MiB of distinct 4 KiB pages ({cores} CPUs); baseline memcpy \
         {memcpy:.2} GB/s (one thread)"
    );
    let mut one = None;
    for threads in counts {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        store.set_ingest_threads(threads);
        let t = Instant::now();
        store.create(&full_request(mem))?;
        let first = gbps(mem.len(), t.elapsed());
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let out = store.create(&full_request(mem))?;
            best = best.min(t.elapsed().as_secs_f64());
            assert_eq!(out.chunks_written, 0);
        }
        let again = mem.len() as f64 / best / 1e9;
        let (first1, again1) = *one.get_or_insert((first, again));
        println!(
            "  {threads} thread(s): first ingest (new pages: zstd, pack, fsync) {first:.2} GB/s \
             ({:.2}× 1 thread) | re-ingest (stored pages) {again:.2} GB/s ({:.2}× 1 thread, \
             {:.3}× memcpy) | target re-ingest >= {threads} GB/s: {}",
            first / first1,
            again / again1,
            again / memcpy,
            if again >= threads as f64 {
                "MET"
            } else {
                "MISSED"
            }
        );
    }
    Ok(())
}
