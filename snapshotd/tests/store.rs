//! Store tests on real files and a real rocksdb index.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use fissile_snapshotd::store::pack::PACK_HEADER_LEN;
use fissile_snapshotd::store::{
    CompactPolicy, CreateRequest, INDEX_CACHE_BYTES, INDEX_MEMTABLE_BYTES, ReadError, Store,
    TOUCH_PAGES_BLOB, TouchOrderError, touch_pages_storable,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const PS: u32 = 4096;

/// Deterministic test memory: `pages` pages, ~1/4 zero, the rest distinct patterns.
fn memory(seed: u64, pages: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mem = vec![0u8; pages * PS as usize];
    for page in mem.chunks_exact_mut(PS as usize) {
        if rng.random_range(0..4) != 0 {
            rng.fill(&mut page[..64]);
            let b = page[0];
            page[64..]
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = b.wrapping_add((i / 97) as u8));
        }
    }
    mem
}

/// `base` with `n` random pages overwritten (deterministic in `seed`); returns the list.
fn mutate(base: &mut [u8], seed: u64, n: usize) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xdead_beef);
    let pages = base.len() / PS as usize;
    let mut list = Vec::new();
    for _ in 0..n {
        let p = rng.random_range(0..pages);
        rng.fill(&mut base[p * PS as usize..p * PS as usize + 32]);
        list.push(p as u64);
    }
    list
}

fn full(mem: &[u8]) -> CreateRequest<'_> {
    CreateRequest {
        memory: Box::new(mem),
        page_size: PS,
        parent: None,
        dirty_pages: None,
        blobs: BTreeMap::new(),
        labels: BTreeMap::new(),
        touch_order: Vec::new(),
    }
}

#[test]
fn create_full_snapshot_reads_back_identical_with_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mem = memory(1, 300);
    let big_blob: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut req = full(&mem);
    req.blobs.insert("vcpu".into(), vec![1, 2, 3]);
    req.blobs.insert("devices".into(), big_blob.clone());
    req.labels.insert("sandbox".into(), "abc".into());
    req.touch_order = vec![5, 6, 7, 1];
    let out = store.create(&req).unwrap();

    assert_eq!(store.read_all(&out.id).unwrap(), mem);
    assert_eq!(store.read_blob(&out.id, "vcpu").unwrap(), vec![1, 2, 3]);
    assert_eq!(store.read_blob(&out.id, "devices").unwrap(), big_blob);
    let view = store.view(&out.id).unwrap();
    assert_eq!(view.touch_order().collect::<Vec<_>>(), vec![5, 6, 7, 1]);
    assert_eq!(view.manifest.labels["sandbox"], "abc");
    drop(store);
    // Survives reopening.
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.read_all(&out.id).unwrap(), mem);
    assert!(store.check().unwrap().is_ok());
}

#[test]
fn a_recorded_touch_order_is_kept_once_survives_reopening_and_passes_to_layers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mem = memory(3, 64);
    let id = store.create(&full(&mem)).unwrap().id;
    assert_eq!(store.view(&id).unwrap().touch_order().count(), 0);
    // A page beyond the memory is refused and records nothing.
    let err = store.record_touch_order(&id, &[3, 64], &[]).unwrap_err();
    assert!(err.to_string().contains("page 64"), "{err}");
    assert_eq!(store.view(&id).unwrap().touch_order().count(), 0);
    // Nothing to record: nothing recorded, and a later order still may be.
    assert!(!store.record_touch_order(&id, &[], &[]).unwrap());
    // Recorded (the cached view is replaced), then kept: a second order does not replace it.
    assert!(
        store
            .record_touch_order(&id, &[9, 10, 11, 2, 40], &[])
            .unwrap()
    );
    let order = vec![9, 10, 11, 2, 40];
    assert_eq!(
        store.view(&id).unwrap().touch_order().collect::<Vec<_>>(),
        order
    );
    assert!(!store.record_touch_order(&id, &[1], &[]).unwrap());
    assert_eq!(
        store.view(&id).unwrap().touch_order().collect::<Vec<_>>(),
        order
    );
    // A layer created with no order of its own takes its parent's; one with its own keeps it.
    let mut child_mem = mem.clone();
    let dirty = mutate(&mut child_mem, 4, 3);
    let mut req = full(&child_mem);
    req.parent = Some(id.clone());
    req.dirty_pages = Some(dirty.clone());
    let inherits = store.create(&req).unwrap().id;
    req.touch_order = vec![7, 6];
    let own = store.create(&req).unwrap().id;
    drop(req);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.view(&id).unwrap().touch_order().collect::<Vec<_>>(),
        order
    );
    assert_eq!(
        store
            .view(&inherits)
            .unwrap()
            .touch_order()
            .collect::<Vec<_>>(),
        order
    );
    assert_eq!(
        store.view(&own).unwrap().touch_order().collect::<Vec<_>>(),
        vec![7, 6]
    );
    assert_eq!(store.read_all(&id).unwrap(), mem);
    assert_eq!(store.read_all(&inherits).unwrap(), child_mem);
    assert!(store.check().unwrap().is_ok());
}

/// An order recorded with its pages' contents keeps them as one blob of large pieces: they
/// read back piece by piece as given, survive reopening, count as references (check, then
/// delete and gc leave nothing), are not inherited by a layer (its pages differ), and a
/// client cannot create a blob of that name. Contents that do not fit the order are refused
/// and record nothing.
#[test]
fn a_touch_order_recorded_with_its_pages_keeps_them_in_pieces_counted_as_references() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mem = memory(5, 512);
    let id = store.create(&full(&mem)).unwrap().id;
    // 300 scattered pages (a quarter of them zero pages): two pieces, 256 + 44 pages.
    let order: Vec<u64> = (0..300u64).map(|i| (i * 7 + 3) % 512).collect();
    let ps = PS as usize;
    let contents: Vec<u8> = order
        .iter()
        .flat_map(|&p| mem[p as usize * ps..(p as usize + 1) * ps].to_vec())
        .collect();
    for (pages, bytes) in [(300, ps + 1), (2, 3 * ps)] {
        let err = store
            .record_touch_order(&id, &order[..pages], &contents[..bytes])
            .unwrap_err();
        assert!(matches!(err, TouchOrderError::Contents { .. }), "{err}");
    }
    assert_eq!(store.view(&id).unwrap().touch_order().count(), 0);
    assert!(store.record_touch_order(&id, &order, &contents).unwrap());
    assert!(store.check().unwrap().is_ok());
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let view = store.view(&id).unwrap();
    assert_eq!(view.touch_order().collect::<Vec<_>>(), order);
    let stored = view.touch_pages().expect("the pages' contents are stored");
    assert_eq!(
        (stored.pages(), stored.pieces(), stored.per_piece()),
        (300, 2, 256)
    );
    assert_eq!(stored.piece_pages(1), 44);
    let (mut got, mut buf) = (Vec::new(), Vec::new());
    for i in 0..stored.pieces() {
        store.read_touch_pages(&view, &stored, i, &mut buf).unwrap();
        got.extend_from_slice(&buf);
    }
    assert!(got == contents, "the pieces differ from the contents given");
    assert!(store.read_touch_pages(&view, &stored, 2, &mut buf).is_err());
    // A layer inherits the order, not the contents.
    let mut child_mem = mem.clone();
    let dirty = mutate(&mut child_mem, 4, 3);
    let mut req = full(&child_mem);
    req.parent = Some(id.clone());
    req.dirty_pages = Some(dirty);
    let child = store.create(&req).unwrap().id;
    drop(req);
    let child_view = store.view(&child).unwrap();
    assert_eq!(child_view.touch_order().collect::<Vec<_>>(), order);
    assert!(child_view.touch_pages().is_none());
    assert_eq!(store.read_all(&child).unwrap(), child_mem);
    // The store's blob names are its own.
    for name in [TOUCH_PAGES_BLOB, "snapshotd/other"] {
        let mut req = full(&mem);
        req.blobs.insert(name.to_string(), vec![1; 8]);
        let err = store.create(&req).unwrap_err();
        assert!(err.to_string().contains("invalid"), "{err}");
    }
    // Contents for an order given at create (none stored with it yet): stored once, and
    // only where there is an order.
    let plain = store.create(&full(&mem)).unwrap().id;
    assert!(!store.record_touch_pages(&plain, &contents).unwrap());
    let mut req = full(&mem);
    req.touch_order = order[..20].to_vec();
    let given = store.create(&req).unwrap().id;
    drop(req);
    assert!(store.view(&given).unwrap().touch_pages().is_none());
    let err = store
        .record_touch_pages(&given, &contents[..21 * ps])
        .unwrap_err();
    assert!(matches!(err, TouchOrderError::Contents { .. }), "{err}");
    assert!(
        store
            .record_touch_pages(&given, &contents[..20 * ps])
            .unwrap()
    );
    assert!(
        !store
            .record_touch_pages(&given, &contents[..20 * ps])
            .unwrap()
    );
    let view = store.view(&given).unwrap();
    let stored = view.touch_pages().expect("stored");
    store.read_touch_pages(&view, &stored, 0, &mut buf).unwrap();
    assert!(
        buf == contents[..20 * ps],
        "the pieces differ from the contents given"
    );
    assert!(store.check().unwrap().is_ok());
    // Pages that do not divide a piece have none stored; 4 KiB pages up to 64 MiB of them.
    assert_eq!(touch_pages_storable(2 << 20), 0);
    assert_eq!(touch_pages_storable(4096), 16_384);
    store.delete(&given).unwrap();
    store.delete(&plain).unwrap();
    // Deleting releases the pieces with the pages: nothing is left after gc.
    store.delete(&child).unwrap();
    store.delete(&id).unwrap();
    store.gc().unwrap();
    assert!(store.check().unwrap().is_ok());
    assert_eq!(store.stats().unwrap().chunks, 0);
    assert_accounted(&store, dir.path());
}

#[test]
fn ingest_threads_store_the_same_chunks_once_and_read_back_identical() {
    // 700 pages: batches of 256 split across workers; the same page content repeats in
    // different batches (pages 0..100 again at 400..500), so two workers may both find it
    // missing and only one copy may be written. Workers' results come in any order: a
    // layer on the snapshot, its dirty pages in every batch, must read back all the same.
    let mut mem = memory(9, 700);
    let (head, tail) = mem.split_at_mut(400 * PS as usize);
    tail[..100 * PS as usize].copy_from_slice(&head[..100 * PS as usize]);
    let mut written = Vec::new();
    for threads in [1, 2, 3, 8] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.set_ingest_threads(threads);
        let out = store.create(&full(&mem)).unwrap();
        assert_eq!(store.read_all(&out.id).unwrap(), mem, "{threads} threads");
        assert!(store.check().unwrap().is_ok());
        let again = store.create(&full(&mem)).unwrap();
        assert_eq!(
            again.chunks_written, 0,
            "{threads} threads: a re-ingest wrote chunks"
        );
        let mut child = mem.clone();
        let mut dirty: Vec<u64> = (0..700).step_by(7).collect();
        for &p in &dirty {
            child[p as usize * PS as usize..][..PS as usize].fill(p as u8 ^ 0x5a);
        }
        // One of them becomes zeros, overriding the parent's page.
        child[PS as usize * 301..][..PS as usize].fill(0);
        dirty.push(301);
        let mut req = full(&child);
        req.parent = Some(out.id.clone());
        req.dirty_pages = Some(dirty);
        let layer = store.create(&req).unwrap();
        assert_eq!(
            store.read_all(&layer.id).unwrap(),
            child,
            "{threads} threads: a layer"
        );
        written.push((out.chunks_written, out.bytes_written));
    }
    let distinct = mem
        .chunks_exact(PS as usize)
        .filter(|p| p.iter().any(|b| *b != 0))
        .collect::<HashSet<_>>()
        .len() as u64;
    assert_eq!(written[0].0, distinct);
    assert!(written.iter().all(|w| *w == written[0]), "{written:?}");
}

#[test]
fn nearly_identical_snapshots_grow_store_only_by_differing_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let base = memory(2, 1000);
    let first = store.create(&full(&base)).unwrap();
    let chunks_after_first = store.stats().unwrap().chunks;
    let mut total_changed = 0;
    for i in 0..8 {
        let mut mem = base.clone();
        let changed: HashSet<u64> = mutate(&mut mem, 100 + i, 10).into_iter().collect();
        total_changed += changed.len() as u64;
        let out = store.create(&full(&mem)).unwrap();
        assert_eq!(out.chunks_written, changed.len() as u64);
        assert_eq!(store.read_all(&out.id).unwrap(), mem);
    }
    assert_eq!(
        store.stats().unwrap().chunks,
        chunks_after_first + total_changed
    );
    assert_eq!(store.read_all(&first.id).unwrap(), base);
    assert!(store.check().unwrap().is_ok());
}

#[test]
fn layered_snapshot_from_dirty_pages_reads_back_and_pins_parent() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let base = memory(3, 200);
    let parent = store.create(&full(&base)).unwrap();
    let mut mem = base.clone();
    let mut dirty = mutate(&mut mem, 9, 5);
    // A page that becomes zero must override the parent's content.
    let nz = (0..200)
        .find(|p| {
            base[p * PS as usize..][..PS as usize]
                .iter()
                .any(|b| *b != 0)
        })
        .unwrap();
    mem[nz * PS as usize..(nz + 1) * PS as usize].fill(0);
    dirty.push(nz as u64);
    let mut req = full(&mem);
    req.parent = Some(parent.id.clone());
    req.dirty_pages = Some(dirty.clone());
    let child = store.create(&req).unwrap();
    assert_eq!(store.read_all(&child.id).unwrap(), mem);
    assert!(child.pages_scanned <= dirty.len() as u64);
    let v = store.view(&child.id).unwrap();
    assert_eq!(v.manifest.parent.as_deref(), Some(parent.id.as_str()));

    assert!(
        store.delete(&parent.id).is_err(),
        "parent with a child must not be deletable"
    );
    store.delete(&child.id).unwrap();
    store.delete(&parent.id).unwrap();
    // Their chunks stay indexed until a sweep (no create references them meanwhile).
    let unreferenced = store.check().unwrap().unreferenced;
    assert!(unreferenced > 0);
    assert_eq!(store.sweep().unwrap(), unreferenced);
    assert_eq!(store.stats().unwrap().chunks, 0);
    let gc = store.gc().unwrap();
    assert!(gc.bytes_after < gc.bytes_before, "{gc:?}");
    assert!(store.check().unwrap().is_ok());
}

#[test]
fn deep_chains_are_flattened_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut mem = memory(4, 64);
    let mut id = store.create(&full(&mem)).unwrap().id;
    for i in 0..40 {
        let dirty = mutate(&mut mem, 1000 + i, 2);
        let mut req = full(&mem);
        req.parent = Some(id.clone());
        req.dirty_pages = Some(dirty);
        id = store.create(&req).unwrap().id;
        assert_eq!(store.read_all(&id).unwrap(), mem, "generation {i}");
    }
    assert!(store.view(&id).unwrap().manifest.depth <= 16);
    assert!(store.check().unwrap().is_ok());
}

#[test]
fn gc_after_delete_keeps_survivors_intact() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = memory(5, 300);
    let b = memory(6, 300);
    let ia = store.create(&full(&a)).unwrap().id;
    let ib = store.create(&full(&b)).unwrap().id;
    store.delete(&ia).unwrap();
    let gc = store.gc().unwrap();
    assert!(
        gc.chunks_moved > 0 && gc.bytes_after < gc.bytes_before,
        "{gc:?}"
    );
    assert_eq!(store.read_all(&ib).unwrap(), b);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.read_all(&ib).unwrap(), b);
    assert!(store.check().unwrap().is_ok());
}

/// Pack bytes = headers + live records + dead bytes, as the store records them.
fn assert_accounted(store: &Store, root: &Path) {
    let s = store.stats().expect("store figures");
    let packs = std::fs::read_dir(root.join("packs"))
        .expect("packs dir")
        .count() as u64;
    assert_eq!(
        s.pack_bytes,
        packs * PACK_HEADER_LEN + s.stored_bytes + s.dead_bytes,
        "{s:?} over {packs} packs"
    );
}

#[test]
fn a_sweep_drops_only_unreferenced_chunks_and_a_create_keeps_those_it_finds() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // `b` shares its first 300 pages with `a`.
    let a = memory(21, 600);
    let mut b = memory(22, 600);
    b[..300 * PS as usize].copy_from_slice(&a[..300 * PS as usize]);
    let pages = |m: &[u8]| -> HashSet<Vec<u8>> {
        m.chunks_exact(PS as usize)
            .filter(|p| p.iter().any(|x| *x != 0))
            .map(<[u8]>::to_vec)
            .collect()
    };
    let (in_a, in_b) = (pages(&a), pages(&b));
    let only_a = in_a.difference(&in_b).count() as u64;
    assert!(only_a > 100 && in_b.len() > 300);
    let ia = store.create(&full(&a)).unwrap().id;
    let ib = store.create(&full(&b)).unwrap().id;
    assert_eq!(store.sweep().unwrap(), 0);
    assert_eq!(store.stats().unwrap().chunks, only_a + in_b.len() as u64);
    store.delete(&ia).unwrap();
    // `a`'s own pages go; the shared ones stay for `b`.
    assert_eq!(store.sweep().unwrap(), only_a);
    assert_eq!(store.stats().unwrap().chunks, in_b.len() as u64);
    assert_eq!(store.read_all(&ib).unwrap(), b);
    assert!(store.check().unwrap().is_ok());
    assert_eq!(store.sweep_if_due().unwrap(), 0, "nothing deleted since");

    // Deleted, then stored again before a sweep: the create finds every chunk still
    // indexed, writes none, and its manifest keeps them.
    store.delete(&ib).unwrap();
    assert_eq!(store.check().unwrap().unreferenced, in_b.len() as u64);
    let again = store.create(&full(&b)).unwrap();
    assert_eq!(again.chunks_written, 0);
    assert_eq!(store.sweep().unwrap(), 0);
    assert_eq!(store.read_all(&again.id).unwrap(), b);

    // A delete the store did not sweep before it closed (a crash) is swept after the open.
    store.delete(&again.id).unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.sweep_if_due().unwrap(), in_b.len() as u64);
    assert_eq!(store.stats().unwrap().chunks, 0);
    assert!(store.check().unwrap().is_ok());
    assert_accounted(&store, dir.path());
}

#[test]
fn sweeps_record_dead_bytes_durably_and_compaction_reclaims_them_while_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (a, b) = (memory(15, 600), memory(16, 600));
    let ia = store.create(&full(&a)).unwrap().id;
    let ib = store.create(&full(&b)).unwrap().id;
    assert_eq!(store.dead_bytes(), 0);
    assert_accounted(&store, dir.path());
    store.delete(&ia).unwrap();
    // Counted by the sweep that drops the chunks only `ia` referenced.
    assert_eq!(store.dead_bytes(), 0);
    assert!(store.sweep().unwrap() > 0);
    let dead = store.dead_bytes();
    assert!(dead > 0);
    assert_accounted(&store, dir.path());
    // Recorded with the sweep: a reopened store knows them without measuring.
    drop(store);
    let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
    assert_eq!(store.dead_bytes(), dead);
    assert_accounted(&store, dir.path());

    // Below either threshold nothing is rewritten.
    let picky = CompactPolicy {
        pack_dead_percent: 100,
        min_reclaim_bytes: 1,
    };
    let rep = store.compact(&picky).unwrap();
    assert_eq!(
        (rep.packs_compacted, rep.bytes_after),
        (0, rep.bytes_before)
    );
    let big = CompactPolicy {
        pack_dead_percent: 1,
        min_reclaim_bytes: dead + 1,
    };
    assert_eq!(store.compact(&big).unwrap().packs_compacted, 0);
    assert_eq!(store.dead_bytes(), dead);

    // Reads of the survivor go on during the compaction and always see its bytes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, stop, ib, b) = (store.clone(), stop.clone(), ib.clone(), b.clone());
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                assert_eq!(store.read_all(&ib).unwrap(), b);
                reads += 1;
            }
            reads
        })
    };
    let rep = store
        .compact(&CompactPolicy {
            pack_dead_percent: 1,
            min_reclaim_bytes: dead,
        })
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    assert!(
        rep.packs_compacted == 1
            && rep.chunks_moved > 0
            && rep.bytes_after + dead <= rep.bytes_before + PACK_HEADER_LEN,
        "{rep:?} dead {dead}"
    );
    assert_eq!(store.dead_bytes(), 0);
    assert_accounted(&store, dir.path());
    assert_eq!(store.read_all(&ib).unwrap(), b);
    assert!(store.check().unwrap().is_ok());
    // A new snapshot after the compaction dedups against the moved chunks.
    let again = store.create(&full(&b)).unwrap();
    assert_eq!(again.chunks_written, 0);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.dead_bytes(), 0);
    assert_eq!(store.read_all(&ib).unwrap(), b);
    assert!(store.check().unwrap().is_ok());
}

#[test]
fn flipped_byte_in_pack_gives_read_error_naming_snapshot_and_page() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mem = memory(7, 50);
    let id = store.create(&full(&mem)).unwrap().id;
    // Flip one byte in the middle of the pack's records.
    let pack = dir.path().join("packs/00000000.pack");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let pos = len / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, pos).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], pos).unwrap();

    let view = store.view(&id).unwrap();
    let mut buf = Vec::new();
    let mut errors = Vec::new();
    for p in 0..view.page_count() {
        match store.read_page(&view, p, &mut buf) {
            Ok(_) => assert_eq!(
                buf,
                mem[p as usize * 4096..][..4096],
                "wrong bytes for page {p}"
            ),
            Err(e) => errors.push((p, e)),
        }
    }
    assert_eq!(errors.len(), 1, "exactly one page is damaged");
    let (page, err) = &errors[0];
    match err {
        ReadError::Corrupt {
            snapshot, page: p, ..
        } => {
            assert_eq!(snapshot, &id);
            assert_eq!(p, page);
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains(&id) && err.to_string().contains(&format!("page {page}")));
    let report = store.check().unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
}

#[test]
fn invalid_create_requests_return_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let odd = vec![1u8; 5000];
    assert!(store.create(&full(&odd)).is_err());
    let mem = memory(8, 4);
    let mut req = full(&mem);
    req.page_size = 3000;
    assert!(store.create(&req).is_err());
    let mut req = full(&mem);
    req.parent = Some("nope".into());
    assert!(store.create(&req).is_err());
    let id = store.create(&full(&mem)).unwrap().id;
    let mut req = full(&mem);
    req.parent = Some(id);
    req.dirty_pages = Some(vec![99]);
    assert!(store.create(&req).is_err());
    assert!(store.check().unwrap().is_ok());
}

// ---- SIGKILL durability ------------------------------------------------------------------

const CHILD_ENV: &str = "SNAPSHOTD_TEST_KILL_CHILD_ROOT";
const CHILD_PAGES: usize = 256;

/// Memory of snapshot `seed`: full if `parent_seed` is None, else the parent's memory with a
/// few pages changed.
fn child_memory(seed: u64, parent_seed: Option<u64>) -> (Vec<u8>, Vec<u64>) {
    match parent_seed {
        None => (memory(seed, CHILD_PAGES), Vec::new()),
        Some(ps) => {
            let mut m = memory(ps, CHILD_PAGES);
            let dirty = mutate(&mut m, seed, 8);
            (m, dirty)
        }
    }
}

/// Helper run as a child process by `sigkill_during_ingest_never_loses_acknowledged_snapshots`:
/// ingests, deletes and collects forever, printing what was acknowledged.
#[test]
#[ignore = "child-process entry point: run by sigkill_during_ingest_never_loses_acknowledged_snapshots"]
fn sigkill_child_ingest_loop() {
    let root = std::env::var(CHILD_ENV).expect("run only as the child of its parent test");
    let base_seed: u64 = std::env::var("SNAPSHOTD_TEST_SEED")
        .unwrap()
        .parse()
        .unwrap();
    let store = Store::open(Path::new(&root)).unwrap();
    let mut fulls: Vec<(String, u64)> = Vec::new();
    let mut layered: Vec<String> = Vec::new();
    for i in 0u64.. {
        let seed = base_seed * 1_000_000 + i;
        if i % 3 == 2 && !fulls.is_empty() {
            let (pid, pseed) = fulls[fulls.len() - 1].clone();
            let (mem, dirty) = child_memory(seed, Some(pseed));
            let mut req = full(&mem);
            req.parent = Some(pid);
            req.dirty_pages = Some(dirty);
            let id = store.create(&req).unwrap().id;
            println!("ACK {id} {seed} {pseed}");
            layered.push(id);
        } else {
            let (mem, _) = child_memory(seed, None);
            let id = store.create(&full(&mem)).unwrap().id;
            println!("ACK {id} {seed} -");
            fulls.push((id, seed));
        }
        if i % 4 == 3 && layered.len() > 1 {
            let victim = layered.remove(0);
            println!("DELETING {victim}");
            store.delete(&victim).unwrap();
            println!("DELETED {victim}");
        }
        if i % 7 == 6 {
            println!("GC");
            store.gc().unwrap();
        }
    }
}

#[test]
fn sigkill_during_ingest_never_loses_acknowledged_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let exe = std::env::current_exe().unwrap();
    let mut rng = StdRng::seed_from_u64(42);
    let mut acked: HashMap<String, (u64, Option<u64>)> = HashMap::new();
    let mut maybe_deleted: HashSet<String> = HashSet::new();
    for round in 0..25u64 {
        let mut child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "sigkill_child_ingest_loop",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &root)
            .env("SNAPSHOTD_TEST_SEED", (round + 1).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let kill_after = rng.random_range(1..12);
        let mut events = 0;
        let handle = |line: &str, acked: &mut HashMap<_, _>, maybe: &mut HashSet<String>| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["ACK", id, seed, parent] => {
                    acked.insert(id.to_string(), (seed.parse().unwrap(), parent.parse().ok()));
                }
                ["DELETING", id] => {
                    maybe.insert(id.to_string());
                }
                ["DELETED", id] => {
                    acked.remove(*id);
                    maybe.remove(*id);
                }
                _ => {}
            }
        };
        for line in lines.by_ref() {
            let line = line.unwrap();
            handle(&line, &mut acked, &mut maybe_deleted);
            events += 1;
            if events >= kill_after {
                break;
            }
        }
        // Kill at a random point in the next operation.
        std::thread::sleep(std::time::Duration::from_micros(
            rng.random_range(0..20_000),
        ));
        child.kill().unwrap();
        child.wait().unwrap();
        // Lines printed before death were acknowledged before it.
        for line in lines {
            let Ok(line) = line else { break };
            handle(&line, &mut acked, &mut maybe_deleted);
        }

        let store = Store::open(&root).unwrap();
        let report = store.check().unwrap();
        assert!(report.is_ok(), "round {round}: {:?}", report.problems);
        let existing: HashSet<String> = store.list().unwrap().into_iter().map(|s| s.id).collect();
        for (id, (seed, parent)) in &acked {
            if maybe_deleted.contains(id) && !existing.contains(id) {
                continue;
            }
            let (mem, _) = child_memory(*seed, *parent);
            assert_eq!(
                store.read_all(id).unwrap(),
                mem,
                "round {round}: snapshot {id} differs"
            );
        }
        acked.retain(|id, _| existing.contains(id));
        maybe_deleted.clear();
    }
    assert!(
        acked.len() > 10,
        "too few snapshots acknowledged: {}",
        acked.len()
    );
}

/// RocksDB's memory is held in: every column family uses the one block cache of
/// `INDEX_CACHE_BYTES` (not a default cache each), and what snapshots write waits in
/// memtables within `INDEX_MEMTABLE_BYTES`.
#[test]
fn the_index_uses_one_bounded_cache_and_bounded_memtables() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let m = store.index_memory();
    assert_eq!(m.cache_capacity, vec![INDEX_CACHE_BYTES as u64; 4], "{m:?}");

    let mut mem = memory(7, 4096);
    let mut parent = store.create(&full(&mem)).unwrap().id;
    for seed in 0..20 {
        let dirty = mutate(&mut mem, seed, 512);
        let mut req = full(&mem);
        req.parent = Some(parent);
        req.dirty_pages = Some(dirty);
        parent = store.create(&req).unwrap().id;
        assert_eq!(store.read_all(&parent).unwrap(), mem);
    }
    let m = store.index_memory();
    assert!(
        m.memtables > 0,
        "the snapshots went through memtables: {m:?}"
    );
    assert!(m.memtables <= INDEX_MEMTABLE_BYTES as u64, "{m:?}");
    // Reopened, the index is in tables (recovery flushes the memtables) and reads go
    // through the block cache; every family reports the same usage: one cache (separate
    // caches would report their own, the untouched ones zero).
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.read_all(&parent).unwrap(), mem);
    let m = store.index_memory();
    assert!(m.cache_usage[0] > 0, "{m:?}");
    assert!(
        m.cache_usage.iter().all(|u| *u == m.cache_usage[0]),
        "{m:?}"
    );
    assert!(m.cache_usage[0] <= INDEX_CACHE_BYTES as u64, "{m:?}");
}
