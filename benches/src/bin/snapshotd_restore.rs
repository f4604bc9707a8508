//! Restore-to-first-touch of a 1 GiB image through snapshotd, against reading the same bytes
//! from a plain file (an eager restore). Also the time to fault in every page lazily.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use fissile_snapshotd::client::{Client, LazyMemory};
use fissile_snapshotd::server::Server;
use fissile_snapshotd::store::{CreateRequest, Store};

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
    let id = store
        .create(&CreateRequest {
            memory: Box::new(mem.as_slice()),
            page_size: 4096,
            parent: None,
            dirty_pages: None,
            blobs: BTreeMap::new(),
            labels: BTreeMap::new(),
            touch_order: Vec::new(),
        })?
        .id;
    let file = dir.path().join("plain.img");
    std::fs::write(&file, &mem)?;
    drop(mem);
    let server = Server::new(store.clone());
    let sock = dir.path().join("s.sock");
    let listener = Server::bind(&sock)?;
    {
        let server = server.clone();
        std::thread::spawn(move || server.serve(listener));
    }

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
    server.shutdown();
    Ok(())
}
