// Shared helpers for the snapshotd benchmarks (included with `include!`).

/// Percentile of sorted samples.
#[allow(dead_code)]
fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    if sorted.is_empty() {
        return std::time::Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Memory of `pages` pages of incompressible, distinct content (xorshift).
#[allow(dead_code)]
fn random_memory(seed: u64, pages: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut mem = vec![0u8; pages * 4096];
    for chunk in mem.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    mem
}

#[allow(dead_code)]
fn gbps(bytes: usize, d: std::time::Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// A create of a whole snapshot of `mem` (4 KiB pages, no parent, blob, label or order).
#[allow(dead_code)]
fn full_request(mem: &[u8]) -> fissile_snapshotd::store::CreateRequest<'_> {
    fissile_snapshotd::store::CreateRequest {
        memory: Box::new(mem),
        page_size: 4096,
        parent: None,
        dirty_pages: None,
        blobs: std::collections::BTreeMap::new(),
        labels: std::collections::BTreeMap::new(),
        touch_order: Vec::new(),
    }
}

/// A snapshotd server of this process on `store`, serving `socket` on a thread of its own.
#[allow(dead_code)]
fn serve_in_process(
    store: &std::sync::Arc<fissile_snapshotd::store::Store>,
    socket: &std::path::Path,
) -> anyhow::Result<std::sync::Arc<fissile_snapshotd::server::Server>> {
    let server = fissile_snapshotd::server::Server::new(store.clone());
    let listener = fissile_snapshotd::server::Server::bind(socket)?;
    let serving = server.clone();
    std::thread::spawn(move || serving.serve(listener));
    Ok(server)
}
