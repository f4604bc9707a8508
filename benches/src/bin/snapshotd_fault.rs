//! Fault service latency: snapshotd (uffd, pages cached in the store's page cache) against
//! plain anonymous first-touch faults, plus the two ways of resolving a fault measured side
//! by side (populate the shared memfd + UFFDIO_WAKE, vs UFFDIO_COPY into the faulting view).
//! Target: fault service p99 < 50 us.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fissile_snapshotd::client::{Client, LazyMemory, new_uffd, register_missing};
use fissile_snapshotd::store::Store;
use fissile_snapshotd::sys::{self, Mapping};
use userfaultfd::{Event, EventBuffer};

include!("snapshotd_common/helpers.rs");

const PAGES: usize = 16 * 1024; // 64 MiB

fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn touch_all(m: &Mapping, order: &[usize], write: bool) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(order.len());
    for &p in order {
        let t = Instant::now();
        if write {
            m.write_at(p * 4096, &[1]);
        } else {
            std::hint::black_box(m.touch(p * 4096));
        }
        lat.push(t.elapsed());
    }
    lat.sort_unstable();
    lat
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Resolves faults of `view` from `src`, by pwrite into `memfd` + wake, or by UFFDIO_COPY.
fn mechanism(copy: bool, src: &[u8]) -> anyhow::Result<(Vec<Duration>, bool)> {
    let memfd = sys::memfd_create("bench", src.len() as u64)?;
    let view = Mapping::private(memfd.as_fd(), src.len())?;
    let uffd = new_uffd()?;
    register_missing(&uffd, &view)?;
    let stop = Arc::new(AtomicBool::new(false));
    let base = view.addr();
    let handler = {
        let stop = stop.clone();
        let memfd = memfd.try_clone()?;
        let src: &'static [u8] = Box::leak(src.to_vec().into_boxed_slice());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut buf = EventBuffer::new(16);
            while !stop.load(Ordering::Relaxed) {
                let (r, _) = sys::poll2(uffd.as_raw_fd(), -1, 50)?;
                if !r.readable {
                    continue;
                }
                let evs: Vec<_> = uffd.read_events(&mut buf)?.collect();
                for ev in evs {
                    if let Event::Pagefault { addr, .. } = ev? {
                        let a = addr as u64 & !4095;
                        let off = (a - base) as usize;
                        if copy {
                            // SAFETY: `a` is a page of the registered view; the source is a
                            // live 4 KiB slice of `src`.
                            match unsafe {
                                uffd.copy(src[off..].as_ptr().cast(), a as *mut _, 4096, true)
                            } {
                                Ok(_) | Err(userfaultfd::Error::CopyFailed(_)) => {}
                                Err(e) => return Err(e.into()),
                            }
                        } else {
                            memfd.write_all_at(&src[off..off + 4096], off as u64)?;
                            uffd.wake(a as *mut _, 4096)?;
                        }
                    }
                }
            }
            Ok(())
        })
    };
    let lat = touch_all(&view, &shuffled(src.len() / 4096, 3), false);
    stop.store(true, Ordering::Relaxed);
    handler
        .join()
        .map_err(|_| anyhow::anyhow!("handler panicked"))??;
    // Does a second private view see the loaded pages (shared page cache)?
    let second = Mapping::private(memfd.as_fd(), src.len())?;
    let mut b = vec![0u8; 4096];
    second.read_at(4096, &mut b);
    Ok((lat, b == src[4096..8192]))
}

fn main() -> anyhow::Result<()> {
    // Baseline: anonymous first-touch write faults.
    let anon = Mapping::anonymous(PAGES * 4096)?;
    let anon_lat = touch_all(&anon, &shuffled(PAGES, 1), true);
    drop(anon);

    // snapshotd: in-process daemon on a temporary store.
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(&dir.path().join("store"))?);
    let mem = random_memory(5, PAGES);
    // Two snapshots of the same memory (stored once): a session records its snapshot's
    // first-touch order, which a later session on it would prefetch; each run gets its own.
    let create = || store.create(&full_request(mem.as_slice()));
    let id = create()?.id;
    let no_spin_id = create()?.id;
    store.read_all(&id)?; // warm: pack bytes in the page cache ("cached pages")
    let sock = dir.path().join("s.sock");
    let server = serve_in_process(&store, &sock)?;
    let lazy = LazyMemory::restore(Client::connect(&sock)?, &id, None)?;
    let snap_lat = touch_all(lazy.mapping(), &shuffled(PAGES, 2), false);
    // The same with sessions that sleep in poll(2) after every fault (no spin).
    let spin = fissile_snapshotd::server::faults::spin_for_host();
    server.set_fault_spin(Duration::ZERO);
    let no_spin = LazyMemory::restore(Client::connect(&sock)?, &no_spin_id, None)?;
    let no_spin_lat = touch_all(no_spin.mapping(), &shuffled(PAGES, 2), false);
    drop(no_spin);
    let mut check = vec![0u8; 4096];
    lazy.mapping().read_at(77 * 4096, &mut check);
    anyhow::ensure!(
        check == mem[77 * 4096..78 * 4096],
        "wrong bytes through snapshotd"
    );

    let (wake_lat, wake_shared) = mechanism(false, &mem)?;
    let (copy_lat, copy_shared) = mechanism(true, &mem)?;

    let p = |v: &[Duration], q| us(percentile(v, q));
    println!("snapshotd fault service, {PAGES} pages touched once each in random order:");
    println!(
        "  anonymous first-touch fault (baseline): p50 {:.1} us  p99 {:.1} us",
        p(&anon_lat, 0.5),
        p(&anon_lat, 0.99)
    );
    println!(
        "  snapshotd uffd fault (cached pages):    p50 {:.1} us  p99 {:.1} us | ratio p50 {:.2} p99 {:.2} | target p99 < 50 us: {}",
        p(&snap_lat, 0.5),
        p(&snap_lat, 0.99),
        p(&snap_lat, 0.5) / p(&anon_lat, 0.5),
        p(&snap_lat, 0.99) / p(&anon_lat, 0.99),
        if p(&snap_lat, 0.99) < 50.0 {
            "MET"
        } else {
            "MISSED"
        }
    );
    println!(
        "  same, sessions not spinning after a fault (baseline for the spin of {} us): p50 {:.1} us  p99 {:.1} us | spin/no spin p50 {:.2} p99 {:.2}",
        spin.as_micros(),
        p(&no_spin_lat, 0.5),
        p(&no_spin_lat, 0.99),
        p(&snap_lat, 0.5) / p(&no_spin_lat, 0.5),
        p(&snap_lat, 0.99) / p(&no_spin_lat, 0.99),
    );
    println!("  resolution mechanisms (in-process handler, no store):");
    println!(
        "    pwrite into shared memfd + UFFDIO_WAKE: p50 {:.1} us  p99 {:.1} us  second view shares the page: {wake_shared}",
        p(&wake_lat, 0.5),
        p(&wake_lat, 0.99)
    );
    println!(
        "    UFFDIO_COPY into the faulting view:     p50 {:.1} us  p99 {:.1} us  second view shares the page: {copy_shared}",
        p(&copy_lat, 0.5),
        p(&copy_lat, 0.99)
    );
    println!(
        "    ratio wake/copy p50 {:.2}",
        p(&wake_lat, 0.5) / p(&copy_lat, 0.5)
    );
    server.shutdown();
    Ok(())
}
