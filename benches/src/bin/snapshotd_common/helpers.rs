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
