//! Restore-to-first-touch of a 1 GiB image through snapshotd, against reading the same bytes
//! from a plain file (an eager restore). Also the time to fault in every page lazily, the
//! store's share of it (and its reads of pages that compress, as a guest's do, which the
//! random memory does not: this binary's own file), and a guest-like working set (1,600
//! scattered pages, what a lab guest touched from its restore to its first result) touched on a fresh image first
//! through userfaultfd alone, then again on another fresh image with the first-touch order
//! that first session recorded prefetched.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use fissile_snapshotd::client::{Client, LazyMemory};
use fissile_snapshotd::store::Store;

include!("snapshotd_common/helpers.rs");

fn main() -> anyhow::Result<()> {
    let mb: usize = std::env::var("RESTORE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let pages = mb * 256;
    let mem = random_memory(9, pages);
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(&dir.path().join("store"))?);
    let id = store.create(&full_request(mem.as_slice()))?.id;
    // The same memory again (the store keeps its pages once), for the working-set runs: a
    // snapshot no session has recorded an order for yet.
    let ws_id = store.create(&full_request(mem.as_slice()))?.id;
    let file = dir.path().join("plain.img");
    std::fs::write(&file, &mem)?;
    drop(mem);
    let sock = dir.path().join("s.sock");
    let server = serve_in_process(&store, &sock)?;

    // Baseline: read the whole image from a plain file (page cache warm) into memory.
    let t = Instant::now();
    let mut buf = Vec::with_capacity(pages * 4096);
    std::fs::File::open(&file)?.read_to_end(&mut buf)?;
    let file_read = t.elapsed();
    drop(buf);

    let t = Instant::now();
    let lazy = LazyMemory::restore(Client::connect(&sock)?, &id, None)?;
    std::hint::black_box(lazy.mapping().touch(12345 * 4096 % (pages * 4096)));
    let first_touch = t.elapsed();
    let t = Instant::now();
    for p in 0..pages {
        std::hint::black_box(lazy.mapping().touch(p * 4096));
    }
    let all = t.elapsed();
    println!("snapshotd restore of a {mb} MiB image:");
    println!(
        "  restore-to-first-touch {:.3} ms | baseline plain-file read of the same bytes {:.1} ms | ratio {:.4}",
        first_touch.as_secs_f64() * 1e3,
        file_read.as_secs_f64() * 1e3,
        first_touch.as_secs_f64() / file_read.as_secs_f64()
    );
    println!(
        "  lazily faulting in every page {:.1} ms ({:.2} GB/s) | ratio to plain-file read {:.2}",
        all.as_secs_f64() * 1e3,
        gbps(pages * 4096, all),
        all.as_secs_f64() / file_read.as_secs_f64()
    );
    // The store's share of that: reading, decompressing and verifying every page.
    let view = store.view(&id)?;
    let mut page = Vec::new();
    let t = Instant::now();
    for p in 0..pages as u64 {
        store.read_page(&view, p, &mut page)?;
        std::hint::black_box(&page);
    }
    let reads = t.elapsed();
    println!(
        "  of which store reads (index, pack read, zstd, blake3) {:.1} ms ({:.1} us a page)",
        reads.as_secs_f64() * 1e3,
        reads.as_secs_f64() * 1e6 / pages as f64
    );
    // The same for pages that compress, as a guest's do (zstd then runs on every read):
    // this program's own file, page by page, its zero pages left out (they are read
    // without zstd); a few pages may not compress and are stored raw.
    let code = std::fs::read("/proc/self/exe")?;
    let code = &code[..code.len() / 4096 * 4096];
    let code_id = store.create(&full_request(code))?.id;
    let code_view = store.view(&code_id)?;
    let code_pages: Vec<u64> = code
        .chunks_exact(4096)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(p, _)| p as u64)
        .collect();
    let t = Instant::now();
    for &p in &code_pages {
        store.read_page(&code_view, p, &mut page)?;
        std::hint::black_box(&page);
    }
    let code_reads = t.elapsed();
    println!(
        "  store reads of {} pages that compress (this binary, zero pages left out) {:.1} ms ({:.1} us a page)",
        code_pages.len(),
        code_reads.as_secs_f64() * 1e3,
        code_reads.as_secs_f64() * 1e6 / code_pages.len().max(1) as f64
    );
    server.shutdown();
    drop(lazy);

    // A working set: scattered pages in a random order (xorshift, as the memory).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut set = std::collections::BTreeSet::new();
    let mut order = Vec::new();
    while order.len() < WORKING_SET.min(pages) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = (x % pages as u64) as usize;
        if set.insert(p) {
            order.push(p);
        }
    }
    let recorded = touch_on_fresh_image(&store, dir.path(), "ws1", &ws_id, &order)?;
    // The session stores the order it recorded as it ends.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while store.view(&ws_id)?.touch_order().count() < order.len() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no first-touch order was recorded"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let prefetched = touch_on_fresh_image(&store, dir.path(), "ws2", &ws_id, &order)?;
    println!(
        "  working set of {} scattered pages on a fresh image: {:.2} ms through userfaultfd \
         (baseline) | {:.2} ms with its recorded order prefetched | ratio {:.2}",
        order.len(),
        recorded.as_secs_f64() * 1e3,
        prefetched.as_secs_f64() * 1e3,
        prefetched.as_secs_f64() / recorded.as_secs_f64()
    );
    Ok(())
}

/// Pages a lab guest touched from its restore to its first result (`lifecycle_bench`).
const WORKING_SET: usize = 1_600;

/// Starts a daemon of its own on `store` (so its image of `id` is fresh), restores `id` and
/// touches `order`: the time from the restore to the last touch.
fn touch_on_fresh_image(
    store: &Arc<Store>,
    dir: &std::path::Path,
    name: &str,
    id: &str,
    order: &[usize],
) -> anyhow::Result<std::time::Duration> {
    let sock = dir.join(format!("{name}.sock"));
    let server = serve_in_process(store, &sock)?;
    let t = Instant::now();
    let lazy = LazyMemory::restore(Client::connect(&sock)?, id, None)?;
    for &p in order {
        std::hint::black_box(lazy.mapping().touch(p * 4096));
    }
    let took = t.elapsed();
    drop(lazy);
    server.shutdown();
    Ok(took)
}
