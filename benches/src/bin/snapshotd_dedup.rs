//! Dedup: 8 snapshots of an image, each differing from the base in 1% of pages.
//! Target: the 8 cost <= 1.1x one image (one image + 8%).

use fissile_snapshotd::store::Store;

include!("snapshotd_common/helpers.rs");

fn main() -> anyhow::Result<()> {
    let pages = 64 * 256; // 64 MiB
    let base = random_memory(7, pages);
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let create = |m: &[u8]| store.create(&full_request(m));
    create(&base)?;
    let one = store.stats()?.pack_bytes;
    let mut x = 12345u64;
    for s in 1..8u64 {
        let mut m = base.clone();
        for _ in 0..pages / 100 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = (x % pages as u64) as usize;
            m[p * 4096..p * 4096 + 8].copy_from_slice(&(s ^ x).to_le_bytes());
        }
        create(&m)?;
    }
    let all = store.stats()?;
    let raw = 8 * base.len() as u64;
    let ratio = all.pack_bytes as f64 / one as f64;
    println!("snapshotd dedup, 8 snapshots of a 64 MiB image, each 1% different from the base:");
    println!(
        "  store {} bytes | baseline one image {} bytes | ratio {ratio:.3} | target <= 1.1: {}",
        all.pack_bytes,
        one,
        if ratio <= 1.1 { "MET" } else { "MISSED" }
    );
    println!(
        "  vs 8 raw copies {} bytes: ratio {:.3}",
        raw,
        all.pack_bytes as f64 / raw as f64
    );
    Ok(())
}
