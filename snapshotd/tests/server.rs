//! Daemon tests: the real `fissile-snapshotd` binary, real sockets, real userfaultfd.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fissile_proto::frame::{encode_frame, read_frame};
use fissile_proto::snapshotd::{
    ErrorCode, MAX_LAYER_DEPTH, Region, Request, Response, SNAPSHOTD_FRAME_CAP,
    SNAPSHOTD_PROTOCOL_VERSION,
};
use fissile_snapshotd::client::{
    Client, CreateOptions, LazyMemory, SessionHooks, made_over, new_uffd, register_missing,
};
use fissile_snapshotd::sys;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

const PS: usize = 4096;

/// A daemon process on a temporary store.
struct Daemon {
    child: Child,
    socket: PathBuf,
    root: PathBuf,
}

impl Daemon {
    fn start(root: &Path) -> Daemon {
        Daemon::start_with(root, &[])
    }

    /// [`Daemon::start`] with more `serve` flags.
    fn start_with(root: &Path, extra: &[&str]) -> Daemon {
        let socket = root.join("snapshotd.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fissile-snapshotd"))
            .args(["serve", "--root"])
            .arg(root.join("store"))
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("READY"), "daemon said {line:?}");
        Daemon {
            child,
            socket,
            root: root.to_path_buf(),
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket).unwrap()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Test memory: mostly non-zero pages with distinct content, some zero pages.
fn memory(seed: u64, pages: usize, zero_every: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mem = vec![0u8; pages * PS];
    for (i, page) in mem.chunks_exact_mut(PS).enumerate() {
        if zero_every == 0 || i % zero_every != 0 {
            rng.fill(&mut page[..]);
        }
    }
    mem
}

fn memfd_with(mem: &[u8]) -> std::fs::File {
    let f = sys::memfd_create("test-mem", mem.len() as u64).unwrap();
    f.write_all_at(mem, 0).unwrap();
    f
}

fn create(client: &mut Client, mem: &[u8], opts: CreateOptions) -> String {
    let f = memfd_with(mem);
    client
        .create_snapshot(
            &f,
            &CreateOptions {
                memory_size: mem.len() as u64,
                ..opts
            },
        )
        .unwrap()
}

#[test]
fn uffd_faults_from_many_threads_in_random_order_read_snapshot_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mem = Arc::new(memory(1, 2048, 5));
    let id = create(&mut d.client(), &mem, CreateOptions::default());

    let lazy = Arc::new(LazyMemory::restore(d.client(), &id, None).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (lazy, mem) = (lazy.clone(), mem.clone());
            std::thread::spawn(move || {
                let mut order: Vec<usize> = (0..2048).collect();
                order.shuffle(&mut StdRng::seed_from_u64(t));
                let mut buf = vec![0u8; PS];
                for p in order {
                    lazy.mapping().read_at(p * PS, &mut buf);
                    assert!(
                        buf == mem[p * PS..(p + 1) * PS],
                        "thread {t} page {p} differs"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(lazy.session().failure(), None);
    // Private writes stay private: a second view still sees the snapshot's bytes.
    lazy.mapping().write_at(0, &[0xAA; 16]);
    let second = LazyMemory::restore(d.client(), &id, None).unwrap();
    let mut buf = vec![0u8; 16];
    second.mapping().read_at(0, &mut buf);
    assert_eq!(buf, mem[..16]);
}

#[test]
fn dirty_only_create_blobs_and_prefetch_through_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut c = d.client();
    let base = memory(2, 512, 3);
    let parent = create(&mut c, &base, CreateOptions::default());
    let mut mem = base.clone();
    let dirty = vec![1u64, 7, 100, 511];
    for p in &dirty {
        mem[*p as usize * PS..][..PS].fill((*p as u8).wrapping_add(1));
    }
    let blob: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    let touch: Vec<u64> = (0..512).rev().collect();
    let child = create(
        &mut c,
        &mem,
        CreateOptions {
            parent: Some(parent.clone()),
            dirty_pages: Some(dirty),
            touch_order: touch,
            blobs: vec![("vcpu".into(), blob.clone())],
            labels: vec![("k".into(), "v".into())],
            ..CreateOptions::default()
        },
    );
    let info = c.info(&child).unwrap();
    assert_eq!(info.parent.as_deref(), Some(parent.as_str()));
    assert_eq!(info.blobs, vec!["vcpu".to_string()]);
    assert_eq!(c.get_blob(&child, "vcpu").unwrap(), blob);

    let lazy = LazyMemory::restore(d.client(), &child, None).unwrap();
    let mut buf = vec![0u8; PS];
    lazy.mapping().read_at(0, &mut buf); // served while the prefetch runs
    wait_prefetched(&lazy, 300);
    for p in 0..512 {
        lazy.mapping().read_at(p * PS, &mut buf);
        assert!(buf == mem[p * PS..(p + 1) * PS], "page {p}");
    }
    assert!(matches!(
        c.delete(&parent),
        Err(fissile_snapshotd::client::ClientError::Daemon { .. })
    ));
    drop(lazy); // its fault session used the child's image
    delete_once_unused(&mut c, &child);
    c.delete(&parent).unwrap();
    assert!(c.list().unwrap().is_empty());
}

#[test]
fn a_restore_records_its_first_touches_and_the_next_restore_prefetches_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let mem = memory(8, 256, 4); // every 4th page is a zero page
    let id = create(&mut d.client(), &mem, CreateOptions::default());
    // Page 8 is a zero page: recorded too (its prefetch writes zeros, so it maps with no
    // fault).
    let touched = [201usize, 3, 150, 151, 153, 8, 77];
    let mut buf = vec![0u8; PS];
    {
        let lazy = LazyMemory::restore(d.client(), &id, None).unwrap();
        for p in touched {
            lazy.mapping().read_at(p * PS, &mut buf);
            assert!(buf == mem[p * PS..(p + 1) * PS], "page {p}");
        }
        assert_eq!(lazy.session().failure(), None);
    }
    // The session stores the order as it ends; a restart then opens a fresh image.
    wait_no_conn_threads(d.child.id(), 10, "the first fault session did not end");
    d.kill();
    // The stored order is the pages touched, in the order touched.
    {
        let store = fissile_snapshotd::store::Store::open(&dir.path().join("store")).unwrap();
        let view = store.view(&id).unwrap();
        let order: Vec<u64> = view.touch_order().collect();
        let want: Vec<u64> = touched.iter().map(|&p| p as u64).collect();
        assert_eq!(order, want);
        // With their contents, which the next restore reads in one piece.
        let stored = view.touch_pages().expect("the pages' contents are stored");
        assert_eq!((stored.pages(), stored.pieces()), (touched.len(), 1));
        let mut got = Vec::new();
        store.read_touch_pages(&view, &stored, 0, &mut got).unwrap();
        let want: Vec<u8> = touched
            .iter()
            .flat_map(|&p| mem[p * PS..(p + 1) * PS].to_vec())
            .collect();
        assert!(got == want, "the stored contents differ from the pages");
    }
    let d = Daemon::start(dir.path());
    let lazy = LazyMemory::restore(d.client(), &id, None).unwrap();
    lazy.mapping().read_at(PS, &mut buf); // served while the prefetch runs
    wait_prefetched(&lazy, 7);
    // Exactly the seven pages touched first, nothing else.
    std::thread::sleep(one_beat());
    assert_eq!(lazy.session().progress().1, 7);
    // They map with no fault, the zero page too: only page 1's fault so far.
    for p in [8usize, 201] {
        lazy.mapping().read_at(p * PS, &mut buf);
        assert!(buf == mem[p * PS..(p + 1) * PS], "page {p}");
    }
    std::thread::sleep(one_beat());
    assert_eq!(lazy.session().progress(), (1, 7));
    for p in 0..256 {
        lazy.mapping().read_at(p * PS, &mut buf);
        assert!(buf == mem[p * PS..(p + 1) * PS], "page {p}");
    }
}

/// A restore whose first touches span more than one piece of stored contents: the next
/// restore brings each piece in (every page of the order, none of them faulting), the
/// pages read as the snapshot's, and the store's blob is not listed as the snapshot's (nor
/// can a client create a blob of that name).
#[test]
fn a_recorded_order_over_several_pieces_prefetches_every_page_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let pages = 640;
    let mem = memory(11, pages, 5);
    let id = create(&mut d.client(), &mem, CreateOptions::default());
    // 300 scattered pages (a fifth of them zero pages): pieces of 256 and 44 pages.
    let touched: Vec<usize> = (0..300).map(|i| (i * 7 + 3) % pages).collect();
    let mut buf = vec![0u8; PS];
    {
        let lazy = LazyMemory::restore(d.client(), &id, None).unwrap();
        for &p in &touched {
            lazy.mapping().read_at(p * PS, &mut buf);
        }
        assert_eq!(lazy.session().failure(), None);
    }
    wait_no_conn_threads(d.child.id(), 10, "the first fault session did not end");
    d.kill();
    let d = Daemon::start(dir.path());
    let mut c = d.client();
    let info = c.info(&id).unwrap();
    assert!(info.blobs.is_empty(), "{:?}", info.blobs);
    // A client cannot name a blob as the store's own.
    let f = memfd_with(&mem);
    let err = c
        .create_snapshot(
            &f,
            &CreateOptions {
                memory_size: mem.len() as u64,
                blobs: vec![("snapshotd/first-touch-pages".into(), vec![1; 8])],
                ..CreateOptions::default()
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("store's own"), "{err}");
    let reads_before = read_syscalls(d.child.id());
    let lazy = LazyMemory::restore(c, &id, None).unwrap();
    wait_prefetched(&lazy, touched.len() as u64);
    // Two pieces are two reads of the store; page by page, each of the ~240 pages with
    // content would be one at least (a handful more: the requests, the index).
    let reads = read_syscalls(d.child.id()) - reads_before;
    assert!(
        reads < 100,
        "the daemon read {reads} times to prefetch 300 pages"
    );
    std::thread::sleep(one_beat());
    assert_eq!(lazy.session().progress(), (0, touched.len() as u64));
    for &p in &touched {
        lazy.mapping().read_at(p * PS, &mut buf);
        assert!(buf == mem[p * PS..(p + 1) * PS], "page {p}");
    }
    std::thread::sleep(one_beat());
    assert_eq!(lazy.session().progress().0, 0, "a prefetched page faulted");
    for p in 0..pages {
        lazy.mapping().read_at(p * PS, &mut buf);
        assert!(buf == mem[p * PS..(p + 1) * PS], "page {p}");
    }
    assert_eq!(lazy.session().failure(), None);
}

/// An adopted layer's create may give its first-touch order (a VMM gives its working set):
/// a fault session on the layer prefetches it from its start, before the snapshot is
/// durable and after, from the store; an order naming a page past the memory is refused.
/// After a restart, the first session reading it from the store stores the order's
/// contents with it once its prefetch ends.
#[test]
fn an_adopted_layer_prefetches_the_order_its_create_gave() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let mut c = d.client();
    let pages = 128;
    let base = memory(21, pages, 4);
    let base_fd = sealed_memfd_with(&base);
    let parent = c.create_snapshot(&base_fd, &adopting(base.len())).unwrap();
    let layer = |order: Vec<u64>| {
        let fd = sys::memfd_create("layer", base.len() as u64).unwrap();
        fd.write_all_at(&[0xC1; PS], 7 * PS as u64).unwrap();
        fissile_snapshotd::client::seal_for_adoption(&fd).unwrap();
        let opts = CreateOptions {
            parent: Some(parent.clone()),
            dirty_pages: Some(vec![7]),
            touch_order: order,
            ..adopting(base.len())
        };
        d.client().create_snapshot(&fd, &opts)
    };
    let err = layer(vec![3, pages as u64]).unwrap_err();
    assert!(format!("{err}").contains("beyond the memory"), "{err}");
    let order = vec![100u64, 7, 3, 64];
    let child = layer(order.clone()).unwrap();
    let mut want = base.clone();
    want[7 * PS..8 * PS].fill(0xC1);
    let mut buf = vec![0u8; PS];
    for durable in [false, true] {
        if durable {
            c.wait_durable(&child).unwrap();
        }
        let lazy = LazyMemory::restore(d.client(), &child, None).unwrap();
        wait_prefetched(&lazy, order.len() as u64);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            lazy.session().progress().1,
            order.len() as u64,
            "durable {durable}"
        );
        for p in 0..pages {
            lazy.mapping().read_at(p * PS, &mut buf);
            assert!(
                buf == want[p * PS..(p + 1) * PS],
                "page {p}, durable {durable}"
            );
        }
    }
    // From the store after a restart, the order has no contents yet: this session
    // prefetches it page by page, then stores them with it.
    drop(c);
    wait_no_conn_threads(d.child.id(), 10, "the fault sessions did not end");
    d.kill();
    let d = Daemon::start(dir.path());
    {
        let lazy = LazyMemory::restore(d.client(), &child, None).unwrap();
        wait_prefetched(&lazy, order.len() as u64);
        lazy.mapping().read_at(100 * PS, &mut buf);
        assert!(buf == want[100 * PS..101 * PS]);
    }
    wait_no_conn_threads(d.child.id(), 10, "the fault session did not end");
    drop(d);
    let store = fissile_snapshotd::store::Store::open(&dir.path().join("store")).unwrap();
    let view = store.view(&child).unwrap();
    assert_eq!(view.touch_order().collect::<Vec<_>>(), order);
    let stored = view.touch_pages().expect("the pages' contents are stored");
    assert_eq!(stored.pages(), order.len());
    let mut got = Vec::new();
    store.read_touch_pages(&view, &stored, 0, &mut got).unwrap();
    let expected: Vec<u8> = order
        .iter()
        .flat_map(|&p| want[p as usize * PS..(p as usize + 1) * PS].to_vec())
        .collect();
    assert!(got == expected, "the stored contents differ from the pages");
    assert!(store.check().unwrap().is_ok());
}

/// A fork's layer over a complete image opens as that image plus the layer's own pages
/// (what a fork child maps, with no fault session); before and after the layer is durable.
/// Anything else is refused, and opening its image still works.
#[test]
fn a_layer_over_a_complete_image_opens_as_two_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut c = d.client();
    let pages = 64;
    let base = memory(31, pages, 4);
    let parent = c
        .create_snapshot(&sealed_memfd_with(&base), &adopting(base.len()))
        .unwrap();
    let a5 = [0xA5; PS];
    let child = adopt_layer(
        &mut c,
        &parent,
        base.len(),
        &[(5, &a5), (6, &a5), (40, &a5)],
    );
    for durable in [false, true] {
        if durable {
            c.wait_durable(&child).unwrap();
        }
        let layer = c.open_layer(&child).unwrap();
        assert_eq!(
            (&layer.base, layer.below),
            (&parent, 0),
            "durable {durable}"
        );
        assert_eq!(layer.runs, vec![(5, 2), (40, 1)]);
        assert_eq!(layer.memory_size, base.len() as u64);
        let mut page = vec![0u8; PS];
        layer
            .pages
            .read_exact_at(&mut page, 40 * PS as u64)
            .unwrap();
        assert!(page.iter().all(|&b| b == 0xA5));
        let img = c.open_image(&layer.base).unwrap();
        assert!(img.complete);
        img.memfd.read_exact_at(&mut page, 7 * PS as u64).unwrap();
        assert!(page == base[7 * PS..8 * PS]);
    }
    // A layer over that layer: its parent is a layer with the complete image below it.
    let grandchild = adopt_layer(&mut c, &child, base.len(), &[(6, &[0x5A; PS])]);
    let top = c.open_layer(&grandchild).unwrap();
    assert_eq!(
        (&top.base, top.below, &top.runs),
        (&child, 1, &vec![(6, 1)])
    );
    // A complete image is no layer; nor is a snapshot read from the store.
    let err = c.open_layer(&parent).unwrap_err();
    assert!(format!("{err}").contains("not a layer"), "{err}");
    let stored = create(&mut c, &base, CreateOptions::default());
    let err = c.open_layer(&stored).unwrap_err();
    assert!(format!("{err}").contains("not a layer"), "{err}");
    assert!(c.open_image(&stored).is_ok(), "the connection still serves");
}

#[test]
fn a_chain_of_max_depth_layers_opens_as_layers_and_a_deeper_one_is_refused() {
    // What many rounds of fork and merge leave: each round lays a fork snapshot and a winner
    // under the parent's next fork. (Without flattening, which would shorten the chain.)
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--flatten-below", "0"]);
    let mut c = d.client();
    let pages = 64;
    let base = memory(37, pages, 4);
    let mut parent = c
        .create_snapshot(&sealed_memfd_with(&base), &adopting(base.len()))
        .unwrap();
    let mut chain = Vec::new();
    for i in 0..=MAX_LAYER_DEPTH {
        let page = u64::from(i) % pages as u64;
        parent = adopt_layer(&mut c, &parent, base.len(), &[(page, &[i as u8 + 1; PS])]);
        chain.push(parent.clone());
    }
    let deepest_allowed = &chain[MAX_LAYER_DEPTH as usize - 1];
    let top = c.open_layer(deepest_allowed).unwrap();
    assert_eq!(top.below, MAX_LAYER_DEPTH - 1);
    assert_eq!(top.base, chain[MAX_LAYER_DEPTH as usize - 2]);
    let err = c.open_layer(&parent).unwrap_err();
    assert!(format!("{err}").contains("not a layer"), "{err}");
    // Eight rounds of fork and merge still map as layers (the limit was 8: four rounds).
    const _: () = assert!(MAX_LAYER_DEPTH >= 16);
}

#[test]
fn a_deep_layer_is_flattened_after_its_ingest_and_layers_over_it_chain_from_it() {
    use fissile_snapshotd::server::image::FLATTEN_BELOW;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut c = d.client();
    let pages = 64;
    let base = memory(41, pages, 4);
    let mut expected = base.clone();
    let mut top = c
        .create_snapshot(&sealed_memfd_with(&base), &adopting(base.len()))
        .unwrap();
    // FLATTEN_BELOW + 1 layers, each writing one page: a non-zero page over a zero one
    // (page 4, layer 8), pages later layers write again, zeros over a non-zero page (page 3,
    // layer 15, over layer 3 and the base).
    for i in 0..=FLATTEN_BELOW {
        let page = (u64::from(i) * 5) % 12;
        let content = if i == 15 {
            [0u8; PS]
        } else {
            [i as u8 + 1; PS]
        };
        expected[page as usize * PS..][..PS].copy_from_slice(&content);
        top = adopt_layer(&mut c, &top, base.len(), &[(page, &content)]);
    }
    c.wait_durable(&top).unwrap();
    // The ingest thread flattens it right after its ingest.
    let deadline = Instant::now() + Duration::from_secs(20);
    let img = loop {
        let img = c.open_image(&top).unwrap();
        if img.complete {
            break img;
        }
        assert!(
            Instant::now() < deadline,
            "the deep layer was not flattened"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut got = vec![0u8; base.len()];
    img.memfd.read_exact_at(&mut got, 0).unwrap();
    for (i, (g, e)) in got.chunks(PS).zip(expected.chunks(PS)).enumerate() {
        assert!(
            g == e,
            "page {i} of the flattened image differs from its chain"
        );
    }
    // A layer over it chains from it: nothing below.
    let over = adopt_layer(&mut c, &top, base.len(), &[(9, &[0xEE; PS])]);
    let layer = c.open_layer(&over).unwrap();
    assert_eq!((&layer.base, layer.below), (&top, 0));
}

/// How many read system calls process `pid` has made (`syscr` of `/proc/PID/io`).
fn read_syscalls(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("syscr: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

/// Waits (20 s at most, failing the test past that or on a session failure) until the
/// session of `lazy` reports at least `pages` pages prefetched.
fn wait_prefetched(lazy: &LazyMemory, pages: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while lazy.session().progress().1 < pages {
        assert!(
            Instant::now() < deadline,
            "fewer than {pages} pages were prefetched: {:?}",
            lazy.session().progress()
        );
        assert_eq!(lazy.session().wait_failure(Duration::from_millis(50)), None);
    }
}

/// Deletes `id`, retrying while the daemon still counts a user of its image (a fault
/// session ends shortly after its client goes away).
fn delete_once_unused(c: &mut Client, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.delete(id) {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline && e.to_string().contains("in use") => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("deleting {id}: {e}"),
        }
    }
}

const SHARE_ENV: &str = "SNAPSHOTD_TEST_SHARE_CHILD";

/// Child side of `two_processes_opening_same_image_share_physical_pages`.
#[test]
#[ignore = "child-process entry point: run by two_processes_opening_same_image_share_physical_pages"]
fn share_child_touch_all_pages() {
    let spec = std::env::var(SHARE_ENV).expect("run only as the child of its parent test");
    let (socket, id) = spec.split_once('|').unwrap();
    let lazy = LazyMemory::restore(Client::connect(Path::new(socket)).unwrap(), id, None).unwrap();
    let mut sum = 0u64;
    for p in 0..lazy.mapping().len() / PS {
        sum += u64::from(lazy.mapping().touch(p * PS));
    }
    println!("TOUCHED {sum}");
    std::io::stdout().flush().unwrap();
    // Stay alive (with the mapping) until the parent closes stdin.
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
}

/// Sums the smaps fields of the mapping whose path contains `needle`.
fn smaps_of(pid: u32, needle: &str) -> std::collections::HashMap<String, u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut out = std::collections::HashMap::new();
    let mut inside = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = line.contains(needle);
            continue;
        }
        if inside
            && let Some((k, v)) = line.split_once(':')
            && let Some(kb) = v.trim().strip_suffix(" kB")
        {
            *out.entry(k.to_string()).or_default() += kb.trim().parse::<u64>().unwrap_or(0);
        }
    }
    out
}

#[test]
fn two_processes_opening_same_image_share_physical_pages() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let pages = 4096; // 16 MiB, no zero pages
    let mem = memory(3, pages, 0);
    let id = create(&mut d.client(), &mem, CreateOptions::default());
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<Child> = (0..2)
        .map(|_| {
            let mut ch = Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "share_child_touch_all_pages",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(SHARE_ENV, format!("{}|{id}", d.socket.display()))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = BufReader::new(ch.stdout.take().unwrap());
            loop {
                let mut line = String::new();
                assert!(out.read_line(&mut line).unwrap() > 0, "child exited early");
                if line.contains("TOUCHED") {
                    break;
                }
            }
            ch
        })
        .collect();
    let kb = (pages * PS / 1024) as u64;
    for ch in &children {
        let s = smaps_of(ch.id(), &format!("fissile-image-{id}"));
        // Every page is resident and shared with the other process, none private.
        assert!(s["Rss"] >= kb * 95 / 100, "{s:?}");
        // shmem pages filled with pwrite count as dirty: either kind of shared is fine.
        assert!(
            s["Shared_Clean"] + s["Shared_Dirty"] >= kb * 95 / 100,
            "{s:?}"
        );
        assert!(s["Private_Dirty"] + s["Private_Clean"] <= kb / 100, "{s:?}");
        // Two sharers: proportional share is about half.
        assert!(s["Pss"] <= kb * 55 / 100, "{s:?}");
    }
    for ch in &mut children {
        drop(ch.stdin.take());
        ch.wait().unwrap();
    }
}

fn raw_send(sock: &mut UnixStream, bytes: &[u8]) {
    let _ = sock.write_all(bytes);
}

fn ping_ok(d: &Daemon) {
    d.client().ping().unwrap();
}

#[test]
fn garbage_messages_do_not_crash_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let read_reply = |s: &mut UnixStream| -> Option<Response> {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        read_frame(s, SNAPSHOTD_PROTOCOL_VERSION, SNAPSHOTD_FRAME_CAP).ok()
    };
    // Random bytes.
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..20 {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        let n = rng.random_range(1..2000);
        let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        raw_send(&mut s, &junk);
    }
    // Oversize length prefix: an error reply, then the connection closes.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    raw_send(&mut s, &u32::MAX.to_le_bytes());
    assert!(matches!(read_reply(&mut s), Some(Response::Error { .. })));
    // Wrong version, then a valid request on the same connection.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    raw_send(&mut s, &encode_frame(9, &Request::Ping).unwrap());
    assert!(matches!(read_reply(&mut s), Some(Response::Error { .. })));
    raw_send(
        &mut s,
        &encode_frame(SNAPSHOTD_PROTOCOL_VERSION, &Request::Ping).unwrap(),
    );
    assert_eq!(read_reply(&mut s), Some(Response::Pong));
    // Undecodable payload.
    raw_send(
        &mut s,
        &[3, 0, 0, 0, SNAPSHOTD_PROTOCOL_VERSION, 0xff, 0xff],
    );
    assert!(matches!(read_reply(&mut s), Some(Response::Error { .. })));
    // Requests needing an fd, sent without one.
    raw_send(
        &mut s,
        &encode_frame(
            SNAPSHOTD_PROTOCOL_VERSION,
            &Request::ServeFaults { regions: vec![] },
        )
        .unwrap(),
    );
    assert!(matches!(read_reply(&mut s), Some(Response::Error { .. })));
    // Out-of-order create pieces.
    raw_send(
        &mut s,
        &encode_frame(
            SNAPSHOTD_PROTOCOL_VERSION,
            &Request::CreateCommit { wait_durable: true },
        )
        .unwrap(),
    );
    assert!(matches!(read_reply(&mut s), Some(Response::Error { .. })));
    // Truncated frame, then hang up.
    let mut t = UnixStream::connect(&d.socket).unwrap();
    raw_send(&mut t, &[100, 0, 0, 0, SNAPSHOTD_PROTOCOL_VERSION, 1]);
    drop(t);
    // A hostile descriptor: a plain file handed over as a "userfaultfd".
    let mut c = d.client();
    let mem = memory(4, 16, 0);
    let id = create(&mut c, &mem, CreateOptions::default());
    let file = memfd_with(&[0u8; 4096]);
    let instance = c.open_image(&id).unwrap().instance;
    let bogus = Client::connect(&d.socket).unwrap().serve_faults(
        &file.as_fd(),
        vec![fissile_proto::snapshotd::Region {
            base: 0x1000_0000,
            len: 4096,
            snapshot: id.clone(),
            offset: 0,
            instance,
        }],
        fissile_snapshotd::client::SessionHooks::default(),
    );
    if let Ok(session) = bogus {
        // The daemon either refuses at once or ends the session with a failure.
        let _ = session.wait_failure(Duration::from_secs(3));
    }
    // Bad region (unaligned) is refused.
    let uffd = fissile_snapshotd::client::new_uffd().unwrap();
    let err = Client::connect(&d.socket).unwrap().serve_faults(
        &uffd,
        vec![fissile_proto::snapshotd::Region {
            base: 0x1001,
            len: 4096,
            snapshot: id.clone(),
            offset: 0,
            instance,
        }],
        fissile_snapshotd::client::SessionHooks::default(),
    );
    assert!(err.is_err());
    ping_ok(&d);
    assert_eq!(c.info(&id).unwrap().id, id);
}

#[test]
fn daemon_death_fails_fault_session_within_bounded_time_and_restart_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let mem = memory(5, 256, 4);
    let id = create(&mut d.client(), &mem, CreateOptions::default());
    let lazy = LazyMemory::restore(d.client(), &id, None).unwrap();
    let mut buf = vec![0u8; PS];
    lazy.mapping().read_at(PS, &mut buf);
    assert!(buf == mem[PS..2 * PS]);
    let mut idle = d.client();
    d.kill();
    let failure = lazy.session().wait_failure(Duration::from_secs(10));
    assert!(
        failure.is_some(),
        "session did not report the dead page server"
    );
    assert!(
        idle.ping().is_err(),
        "a request to a dead daemon must fail, not hang"
    );

    let d2 = Daemon::start(&d.root);
    let lazy2 = LazyMemory::restore(d2.client(), &id, None).unwrap();
    for p in 0..256 {
        lazy2.mapping().read_at(p * PS, &mut buf);
        assert!(buf == mem[p * PS..(p + 1) * PS], "page {p}");
    }
}

const DIE_ENV: &str = "SNAPSHOTD_TEST_DIE_CHILD";

/// Child side of `client_death_ends_its_session`: opens a session, touches one page, and
/// waits to be killed.
#[test]
#[ignore = "child-process entry point: run by client_death_ends_its_session"]
fn die_child_hold_session() {
    let spec = std::env::var(DIE_ENV).expect("run only as the child of its parent test");
    let (socket, id) = spec.split_once('|').unwrap();
    let lazy = LazyMemory::restore(Client::connect(Path::new(socket)).unwrap(), id, None).unwrap();
    lazy.mapping().touch(0);
    println!("HOLDING");
    std::io::stdout().flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
}

/// Connection (and fault-session) threads of the daemon: they are named `snapshotd-conn`.
fn conn_threads(pid: u32) -> usize {
    threads_named(pid, "snapshotd-conn").count()
}

/// The `/proc` directories of `pid`'s threads named `name` (`comm`, at most 15 bytes).
fn threads_named(pid: u32, name: &str) -> impl Iterator<Item = std::path::PathBuf> + '_ {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| t.path())
        .filter(move |t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == name))
}

/// Waits until the daemon has no connection threads left (clients of earlier steps are
/// gone); panics after `secs`.
fn wait_no_conn_threads(pid: u32, secs: u64, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while conn_threads(pid) > 0 {
        assert!(Instant::now() < deadline, "{why}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn client_death_ends_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mem = memory(6, 64, 0);
    let id = create(&mut d.client(), &mem, CreateOptions::default());
    wait_no_conn_threads(
        d.child.id(),
        10,
        "the create connection's thread did not end",
    );
    let exe = std::env::current_exe().unwrap();
    for _ in 0..3 {
        let mut ch = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "die_child_hold_session",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIE_ENV, format!("{}|{id}", d.socket.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(ch.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("HOLDING") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "child exited early");
        }
        assert!(
            conn_threads(d.child.id()) > 0,
            "no session thread while a client holds one"
        );
        ch.kill().unwrap();
        ch.wait().unwrap();
    }
    // Sessions notice the closed socket within one poll interval; allow generous time.
    wait_no_conn_threads(d.child.id(), 10, "session threads of dead clients remain");
    ping_ok(&d);
}

/// A sealed memfd holding `mem`, ready to be adopted.
fn sealed_memfd_with(mem: &[u8]) -> std::fs::File {
    let f = memfd_with(mem);
    fissile_snapshotd::client::seal_for_adoption(&f).unwrap();
    f
}

/// Adopts, over `parent`, a layer of a `len`-byte memory whose own pages are `pages` (each a
/// page number and its bytes); returns its id.
fn adopt_layer(c: &mut Client, parent: &str, len: usize, pages: &[(u64, &[u8])]) -> String {
    let fd = sys::memfd_create("layer", len as u64).unwrap();
    for &(p, bytes) in pages {
        fd.write_all_at(bytes, p * PS as u64).unwrap();
    }
    fissile_snapshotd::client::seal_for_adoption(&fd).unwrap();
    let opts = CreateOptions {
        parent: Some(parent.to_string()),
        dirty_pages: Some(pages.iter().map(|&(p, _)| p).collect()),
        ..adopting(len)
    };
    c.create_snapshot(&fd, &opts).unwrap()
}

/// Options for a create that adopts a sealed memfd of `len` bytes and answers before the
/// snapshot is durable (add a parent, dirty pages, blobs or an order with `..adopting(len)`).
fn adopting(len: usize) -> CreateOptions {
    CreateOptions {
        memory_size: len as u64,
        adopt: true,
        no_wait_durable: true,
        ..CreateOptions::default()
    }
}

fn read_all(lazy: &LazyMemory, pages: usize) -> Vec<u8> {
    let mut out = vec![0u8; pages * PS];
    for p in 0..pages {
        lazy.mapping()
            .read_at(p * PS, &mut out[p * PS..(p + 1) * PS]);
    }
    out
}

#[test]
fn the_daemon_compacts_packs_after_a_delete_under_its_filter_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        dir.path(),
        &[
            "--compact-min-mib",
            "1",
            "--compact-dead-percent",
            "20",
            "--compact-interval-s",
            "3600",
        ],
    );
    let mut c = d.client();
    // Random pages do not compress: each snapshot holds about 4 MiB of the pack.
    let (gone, kept) = (memory(31, 1024, 0), memory(32, 1024, 7));
    let ig = create(&mut c, &gone, CreateOptions::default());
    let ik = create(&mut c, &kept, CreateOptions::default());
    // A VM restored before the compaction faults half its pages in before, half after.
    let early = LazyMemory::restore(d.client(), &ik, None).unwrap();
    let mut buf = vec![0u8; PS];
    for p in 0..512 {
        early.mapping().read_at(p * PS, &mut buf);
        assert!(buf == kept[p * PS..(p + 1) * PS], "page {p} before");
    }
    let before = c.stats().unwrap().pack_bytes;
    delete_once_unused(&mut c, &ig);
    // The delete wakes the compactor (the interval is an hour): the dead 4 MiB go.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let now = c.stats().unwrap().pack_bytes;
        if now + (3 << 20) < before {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "packs still {now} bytes (were {before}) 30 s after the delete"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        after > (3 << 20),
        "the survivor's chunks stay ({after} bytes)"
    );
    assert_eq!(read_all(&early, 1024), kept);
    assert_eq!(early.session().failure(), None);
    let late = LazyMemory::restore(d.client(), &ik, None).unwrap();
    assert_eq!(read_all(&late, 1024), kept);
    // Compaction ran under the daemon's seccomp filter (`kill` by default): it lives.
    ping_ok(&d);
}

#[test]
fn adopted_images_serve_at_once_layer_on_their_parent_and_become_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let mut c = d.client();
    let pages = 256;
    // Full adoption: the memfd is the image (holes are zero pages).
    let base = memory(11, pages, 4);
    let base_fd = sealed_memfd_with(&base);
    let parent = c
        .create_snapshot(
            &base_fd,
            &CreateOptions {
                blobs: vec![("vmstate".into(), b"state-1".to_vec())],
                ..adopting(base.len())
            },
        )
        .unwrap();
    // Usable before it is durable: blobs, info and the image itself.
    assert_eq!(c.get_blob(&parent, "vmstate").unwrap(), b"state-1");
    let lazy = LazyMemory::restore(d.client(), &parent, None).unwrap();
    assert!(read_all(&lazy, pages) == base, "full adopted image differs");

    // Layered adoption: a memfd with only the dirty pages; the rest comes from the parent.
    let dirty: Vec<u64> = vec![0, 3, 77, 255];
    let mut child_mem = base.clone();
    // Sparse: only the dirty pages are written (a written zero page would be "present").
    let layer_fd = sys::memfd_create("layer", base.len() as u64).unwrap();
    for &p in &dirty {
        let page = &mut child_mem[p as usize * PS..][..PS];
        page.fill(0xC0 ^ p as u8);
        layer_fd.write_all_at(page, p * PS as u64).unwrap();
    }
    fissile_snapshotd::client::seal_for_adoption(&layer_fd).unwrap();
    let child = c
        .create_snapshot(
            &layer_fd,
            &CreateOptions {
                parent: Some(parent.clone()),
                dirty_pages: Some(dirty.clone()),
                ..adopting(base.len())
            },
        )
        .unwrap();
    let lazy_child = LazyMemory::restore(d.client(), &child, None).unwrap();
    assert!(
        read_all(&lazy_child, pages) == child_mem,
        "layered adopted image differs"
    );

    // Both become durable; after a daemon restart the store serves the same bytes.
    c.wait_durable(&child).unwrap();
    assert!(c.info(&parent).unwrap().durable);
    assert!(c.info(&child).unwrap().durable);
    drop((lazy, lazy_child));
    d.kill();
    let d2 = Daemon::start(dir.path());
    let from_store = LazyMemory::restore(d2.client(), &child, None).unwrap();
    assert!(
        read_all(&from_store, pages) == child_mem,
        "ingested layered snapshot differs"
    );
    assert_eq!(
        d2.client().get_blob(&parent, "vmstate").unwrap(),
        b"state-1"
    );
}

/// The nice value of each of `pid`'s threads named `name` (`/proc/.../stat` field 19).
fn nice_of_threads(pid: u32, name: &str) -> Vec<i64> {
    threads_named(pid, name)
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.join("stat")).ok()?;
            // After `(comm)`: field 3 is the state, so field 19 (nice) is the 17th.
            let rest = stat.rsplit_once(')')?.1;
            rest.split_whitespace().nth(16)?.parse().ok()
        })
        .collect()
}

#[test]
fn the_ingest_runs_at_a_lower_priority_than_the_daemon_serves_at() {
    let dir = tempfile::tempdir().unwrap();
    // The default filter kills the daemon on a syscall it does not allow: the threads lower
    // their priority under it (they may start after it is installed).
    let d = Daemon::start(dir.path());
    let mut c = d.client();
    let mem = memory(5, 64, 4);
    let fd = sealed_memfd_with(&mem);
    let id = c.create_snapshot(&fd, &adopting(mem.len())).unwrap();
    c.wait_durable(&id).unwrap();
    let pid = d.child.id();
    let nice = fissile_snapshotd::server::BACKGROUND_NICE as i64;
    assert_eq!(
        nice_of_threads(pid, "snapshotd-inges"),
        vec![nice],
        "ingest thread"
    );
    // Housekeeping's malloc_trim holds malloc's locks: it keeps the daemon's priority.
    assert_eq!(
        nice_of_threads(pid, "snapshotd-house"),
        vec![0],
        "housekeeping thread"
    );
    // This client's connection is served at the daemon's priority.
    let conns = nice_of_threads(pid, "snapshotd-conn");
    assert!(
        !conns.is_empty() && conns.iter().all(|n| *n == 0),
        "connection threads: {conns:?}"
    );
    ping_ok(&d);
}

#[test]
fn a_snapshot_flattened_past_the_chain_limit_names_its_parent_and_reserved_labels_are_refused() {
    use fissile_proto::snapshotd::LABEL_FLATTENED_FROM;
    use fissile_snapshotd::store::MAX_CHAIN_DEPTH;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut c = d.client();
    let mem = memory(43, 8, 0);
    let mut parent = create(&mut c, &mem, CreateOptions::default());
    // Past the store's chain limit a create is written as a full manifest with no parent;
    // the label says what it was made over (what merge's lineage check follows).
    for _ in 0..=MAX_CHAIN_DEPTH {
        let opts = CreateOptions {
            parent: Some(parent.clone()),
            dirty_pages: Some(vec![1]),
            ..CreateOptions::default()
        };
        let id = create(&mut c, &mem, opts);
        let info = c.info(&id).unwrap();
        assert_eq!(made_over(&info).as_ref(), Some(&parent), "{info:?}");
        parent = id;
    }
    let flattened = c.info(&parent).unwrap();
    assert_eq!(flattened.parent, None, "the last create is past the limit");
    // A client cannot forge that label (nor any other of the daemon's own).
    let forged = CreateOptions {
        labels: vec![(LABEL_FLATTENED_FROM.to_string(), parent.clone())],
        memory_size: mem.len() as u64,
        ..CreateOptions::default()
    };
    let err = c.create_snapshot(&memfd_with(&mem), &forged).unwrap_err();
    assert!(format!("{err}").contains("daemon's own"), "{err}");
    assert!(c.info(&parent).is_ok(), "the connection still serves");
}

#[test]
fn adopting_an_unsealed_memfd_is_refused_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut c = d.client();
    let mem = memory(12, 16, 0);
    let unsealed = memfd_with(&mem);

    let err = c
        .create_snapshot(
            &unsealed,
            &CreateOptions {
                memory_size: mem.len() as u64,
                adopt: true,
                ..CreateOptions::default()
            },
        )
        .unwrap_err();

    assert!(
        err.to_string().contains("sealed") || format!("{err:?}").contains("sealed"),
        "{err:?}"
    );
    // The connection and daemon keep working.
    let id = create(&mut c, &mem, CreateOptions::default());
    assert!(c.info(&id).unwrap().durable);
}

/// The adopt path sizes per-page state from the request: a page size of 0 or a huge sparse
/// memfd must be refused before anything is allocated, and the daemon goes on serving.
#[test]
fn adopting_creates_with_impossible_sizes_are_refused_and_the_daemon_lives() {
    use fissile_snapshotd::fdio::FdStream;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cases: [(u64, u32); 3] = [(1 << 20, 0), (1 << 20, 3000), (1 << 50, 4096)];
    for (memory_size, page_size) in cases {
        let memfd = sys::memfd_create("hostile", memory_size).unwrap();
        sys::add_seals(&memfd, sys::ADOPT_SEALS).unwrap();
        let mut conn = FdStream::new(UnixStream::connect(&d.socket).unwrap());
        let begin = Request::CreateBegin {
            memory_size,
            page_size,
            parent: None,
            dirty_only: false,
            labels: vec![],
            adopt: true,
        };
        conn.write_msg(&begin, Some(&memfd)).unwrap();
        let reply: Response = conn.read_msg().unwrap();
        match reply {
            Response::Error { code, message } => {
                assert_eq!(code, ErrorCode::BadRequest, "{message}");
            }
            other => panic!("{memory_size}/{page_size} accepted: {other:?}"),
        }
        // A commit after the refused begin has nothing to commit.
        conn.write_msg(
            &Request::CreateCommit {
                wait_durable: false,
            },
            None,
        )
        .unwrap();
        let reply: Response = conn.read_msg().unwrap();
        assert!(matches!(reply, Response::Error { .. }), "{reply:?}");
        ping_ok(&d);
    }
}

/// A snapshot a VM is restored from lazily (its fault session uses the image) cannot be
/// deleted while the session lives; afterwards it can.
#[test]
fn delete_of_a_snapshot_in_use_is_refused_until_its_last_user_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mem = memory(11, 64, 0);
    let id = create(&mut d.client(), &mem, CreateOptions::default());
    let lazy = LazyMemory::restore(d.client(), &id, None).unwrap();
    assert_eq!(lazy.mapping().touch(3 * 4096), mem[3 * 4096]);

    let err = d.client().delete(&id).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    assert_eq!(
        lazy.mapping().touch(9 * 4096),
        mem[9 * 4096],
        "the VM still works"
    );

    drop(lazy);
    delete_once_unused(&mut d.client(), &id);
    let stats = d.client().stats().unwrap();
    assert_eq!(stats.snapshots, 0);
}

/// `Memory` says where the heap goes: the index's one bounded cache, its memtables (which
/// the snapshots just created went through), and malloc's figures, the index among them.
#[test]
fn the_daemon_reports_its_heap_by_owner() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let before = d.client().memory().unwrap();
    assert_eq!(
        before.index_cache_capacity,
        fissile_snapshotd::store::INDEX_CACHE_BYTES as u64,
        "{before:?}"
    );
    for seed in 0..4 {
        create(
            &mut d.client(),
            &memory(40 + seed, 256, 0),
            CreateOptions::default(),
        );
    }
    let m = d.client().memory().unwrap();
    assert!(
        m.index_memtable_bytes > before.index_memtable_bytes,
        "{before:?} → {m:?}"
    );
    assert!(
        m.heap_in_use_bytes
            >= m.index_cache_bytes + m.index_memtable_bytes + m.index_table_reader_bytes,
        "malloc's figures hold the index's: {m:?}"
    );
    assert_eq!(
        m.own_heap_bytes(),
        m.heap_in_use_bytes
            - m.index_cache_bytes
            - m.index_memtable_bytes
            - m.index_table_reader_bytes
    );
}

/// The maintenance commands that ask a running daemon: `ls --socket` lists what it holds,
/// `memory --socket` and `stats --socket` print its figures (the `--root` forms need it
/// stopped: rocksdb's lock).
#[test]
fn the_cli_asks_a_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let id = create(
        &mut d.client(),
        &memory(50, 16, 0),
        CreateOptions::default(),
    );
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fissile-snapshotd"))
            .args(args)
            .arg("--socket")
            .arg(&d.socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let ls = cli(&["ls"]);
    let listed: serde_json::Value = serde_json::from_str(ls.trim()).unwrap();
    assert_eq!(listed["id"], id.as_str(), "{ls}");
    let memory: serde_json::Value = serde_json::from_str(&cli(&["memory"])).unwrap();
    assert_eq!(
        memory["index_cache_capacity"],
        fissile_snapshotd::store::INDEX_CACHE_BYTES as u64
    );
    let stats: serde_json::Value = serde_json::from_str(&cli(&["stats"])).unwrap();
    assert_eq!(stats["snapshots"], 1);
    // Offline, the store is the daemon's: its lock says so.
    let out = Command::new(env!("CARGO_BIN_EXE_fissile-snapshotd"))
        .args(["ls", "--root"])
        .arg(dir.path().join("store"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn an_image_evicted_between_open_and_serve_faults_is_not_a_livelock() {
    // No budget for unused images: every one is evicted as soon as nothing holds it.
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--image-cache-mib", "0"]);
    let mem = memory(11, 64, 0);
    let id = create(&mut d.client(), &mem, CreateOptions::default());

    // A first user materializes page 0 in the image (so it has resident bytes to evict).
    let first = LazyMemory::restore(d.client(), &id, None).unwrap();
    let mut buf = vec![0u8; PS];
    first.mapping().read_at(0, &mut buf);
    assert_eq!(buf, mem[..PS]);

    // A second opens the image (the first still pins it) and maps it ...
    let mut c = d.client();
    let image = c.open_image(&id).unwrap();
    let mapping = image.map_private().unwrap();
    let uffd = new_uffd().unwrap();
    register_missing(&uffd, &mapping).unwrap();
    drop(c);
    let regions = vec![Region {
        base: mapping.addr(),
        len: mapping.len() as u64,
        snapshot: id.clone(),
        offset: 0,
        instance: image.instance,
    }];
    // ... the first goes away: the image is unused and over budget, but was opened just
    // now: it stays for the grace period, and a session then serves the mapped memfd.
    drop(first);
    ping_ok(&d);
    let session = d
        .client()
        .serve_faults(&uffd, regions, SessionHooks::default())
        .unwrap();
    read_page_within(mapping.addr() as usize, 5, &mem, session);

    // Past the grace period with no user it is evicted; a session for the old object (a
    // client that opened it and waited) is refused instead of served into a new memfd.
    let late = d.client().open_image(&id).unwrap();
    let late_map = late.map_private().unwrap();
    let late_uffd = new_uffd().unwrap();
    register_missing(&late_uffd, &late_map).unwrap();
    std::thread::sleep(Duration::from_millis(
        fissile_snapshotd::server::image::OPEN_GRACE_MS + 500,
    ));
    // Each connection that closes makes the daemon trim its images; the first session's
    // end is seen asynchronously, so wait (bounded) until the image is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.client().stats().unwrap().images > 0 {
        assert!(
            Instant::now() < deadline,
            "the unused image was never evicted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = d.client().serve_faults(
        &late_uffd,
        vec![Region {
            base: late_map.addr(),
            len: late_map.len() as u64,
            snapshot: id.clone(),
            offset: 0,
            instance: late.instance,
        }],
        SessionHooks::default(),
    );
    let Err(err) = refused else {
        panic!("a session for an evicted image object was accepted");
    };
    assert!(err.to_string().contains("opened again"), "{err}");
}

#[test]
fn a_session_makes_a_blocking_userfaultfd_non_blocking_and_serves_it() {
    // A client could hand over a blocking uffd and read its own events first: a session
    // thread reading it must never block, so the daemon sets O_NONBLOCK itself.
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mem = memory(12, 64, 5);
    let id = create(&mut d.client(), &mem, CreateOptions::default());
    let image = d.client().open_image(&id).unwrap();
    let mapping = image.map_private().unwrap();
    let uffd = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(false)
        .user_mode_only(false)
        .create()
        .unwrap();
    let flags = || {
        use std::os::fd::AsRawFd;
        // SAFETY: F_GETFL on a descriptor this test holds open.
        unsafe { libc::fcntl(uffd.as_raw_fd(), libc::F_GETFL) }
    };
    assert_eq!(flags() & libc::O_NONBLOCK, 0);
    register_missing(&uffd, &mapping).unwrap();
    let session = d
        .client()
        .serve_faults(
            &uffd,
            vec![Region {
                base: mapping.addr(),
                len: mapping.len() as u64,
                snapshot: id.clone(),
                offset: 0,
                instance: image.instance,
            }],
            SessionHooks::default(),
        )
        .unwrap();
    let session = read_page_within(mapping.addr() as usize, 7, &mem, session);
    let session = read_page_within(mapping.addr() as usize, 10, &mem, session);
    assert_ne!(
        flags() & libc::O_NONBLOCK,
        0,
        "the daemon left the uffd blocking"
    );
    assert_eq!(session.failure(), None);
}

/// Reads page `page` of the mapping at `addr` on a thread and gives the session back; fails
/// if the fault is not resolved within 10 s (the session is then leaked, the thread left
/// blocked).
fn read_page_within(
    addr: usize,
    page: usize,
    mem: &[u8],
    session: fissile_snapshotd::client::FaultSession,
) -> fissile_snapshotd::client::FaultSession {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; PS];
        // SAFETY: the caller's mapping outlives this read: it waits for it, or panics while
        // still holding the mapping (the thread then stays blocked on the page).
        unsafe {
            std::ptr::copy_nonoverlapping((addr + page * PS) as *const u8, buf.as_mut_ptr(), PS)
        };
        let _ = tx.send(buf);
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(got) => {
            assert!(
                got == mem[page * PS..(page + 1) * PS],
                "page {page} differs"
            );
            session
        }
        Err(_) => {
            let failure = session.failure();
            std::mem::forget(session);
            panic!("a fault on the mapped image never resolved (session failure: {failure:?})");
        }
    }
}

/// Runs `f` on a thread of its own whose credentials are `uid`/`gid` (Linux credentials are
/// per thread at the system-call level; only that thread changes), as a jailed VMM would
/// connect.
fn as_vmm<T: Send + 'static>(uid: u32, gid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: raw setresgid/setresuid change only this thread's credentials; no memory
        // is passed.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn a_jailed_vmm_reads_only_what_it_was_granted_or_created() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "needs root (per-thread credentials of a jailed VMM): run the tests as root"
    );
    const UID: u32 = 1_234_567;
    const GID: u32 = 999_999;
    let dir = tempfile::tempdir().unwrap();
    // The VMM reaches the socket through the tempdir (in a jail it is bound in its root).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let d = Daemon::start_with(dir.path(), &["--vmm-gid", &GID.to_string()]);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let mem = memory(21, 16, 0);
    let ours = create(&mut d.client(), &mem, CreateOptions::default());
    let theirs = create(
        &mut d.client(),
        &memory(22, 16, 0),
        CreateOptions::default(),
    );
    let socket = d.socket.clone();
    let vmm = move |f: fn(&mut Client, &str, &str) -> String, a: &str, b: &str| {
        let (socket, a, b) = (socket.clone(), a.to_string(), b.to_string());
        as_vmm(UID, GID, move || {
            let mut c = Client::connect(&socket).unwrap();
            f(&mut c, &a, &b)
        })
    };
    let open = |c: &mut Client, id: &str, _: &str| match c.open_image(id) {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string(),
    };

    // Nothing granted: not even a hint that the snapshot exists.
    let denied = vmm(open, &ours, "");
    assert!(
        denied.contains("no snapshot") && denied.contains("for this VMM"),
        "{denied}"
    );
    // A stranger uid outside the group is refused at the door.
    let socket = d.socket.clone();
    let stranger = as_vmm(4_321, 4_321, move || {
        Client::connect(&socket).and_then(|mut c| c.ping()).is_err()
    });
    assert!(stranger, "a peer outside the VMM group was served");

    d.client()
        .grant(UID, std::slice::from_ref(&ours), true)
        .unwrap();
    assert_eq!(vmm(open, &ours, ""), "ok");
    let denied = vmm(open, &theirs, "");
    assert!(
        denied.contains("no snapshot"),
        "another lineage's snapshot opened: {denied}"
    );
    let refused = vmm(
        |c, id, _| {
            let list = c.list().map(|_| ()).map_err(|e| e.to_string());
            let delete = c.delete(id).map_err(|e| e.to_string());
            let grant = c
                .grant(1, &[id.to_string()], false)
                .map_err(|e| e.to_string());
            format!("{list:?} {delete:?} {grant:?}")
        },
        &ours,
        "",
    );
    assert_eq!(
        refused.matches("may not list, delete or grant").count(),
        3,
        "{refused}"
    );
    let heap = vmm(
        |c, _, _| {
            c.memory()
                .map(|_| ())
                .map_err(|e| e.to_string())
                .err()
                .unwrap_or_default()
        },
        "",
        "",
    );
    assert!(
        heap.contains("may not ask for the daemon's memory"),
        "{heap}"
    );

    // What it creates on its granted base is its own, the base's ancestors included.
    let created = vmm(
        |c, base, _| {
            let id = create(
                c,
                &memory(23, 16, 0),
                CreateOptions {
                    parent: Some(base.to_string()),
                    dirty_pages: Some(vec![1, 2]),
                    ..CreateOptions::default()
                },
            );
            let info = c.info(&id).unwrap();
            assert_eq!(info.parent.as_deref(), Some(base));
            c.open_image(&id).unwrap();
            id
        },
        &ours,
        "",
    );
    // Layering on another lineage is refused.
    let layered = vmm(
        |c, theirs, _| {
            let mem = memory(24, 16, 0);
            let f = memfd_with(&mem);
            let r = c.create_snapshot(
                &f,
                &CreateOptions {
                    memory_size: mem.len() as u64,
                    parent: Some(theirs.to_string()),
                    dirty_pages: Some(vec![1]),
                    ..CreateOptions::default()
                },
            );
            format!("{r:?}")
        },
        &theirs,
        "",
    );
    assert!(layered.contains("no snapshot"), "{layered}");

    // A new VMM with the same uid starts from nothing.
    d.client().grant(UID, &[], true).unwrap();
    for id in [&ours, &created] {
        let denied = vmm(open, id, "");
        assert!(denied.contains("no snapshot"), "{id}: {denied}");
    }
}

fn selftest(mode: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fissile-snapshotd"))
        .args(["seccomp-selftest", mode])
        .output()
        .unwrap()
}

#[test]
fn a_process_started_under_the_filter_kills_the_daemon_and_log_mode_lets_it_run() {
    use std::os::unix::process::ExitStatusExt;
    let out = selftest("kill");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{stderr}");
    // What serving needs still works under the filter.
    assert!(stderr.contains("serve filter installed"), "{stderr}");
    assert!(stderr.contains("a file written and removed"), "{stderr}");
    assert!(stderr.contains("a thread started and joined"), "{stderr}");
    assert!(!stderr.contains("was not stopped"), "{stderr}");

    for mode in ["log", "off"] {
        let out = selftest(mode);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{mode}: {stderr}");
        assert!(
            stderr.contains("a process was not stopped"),
            "{mode}: {stderr}"
        );
    }
}

#[test]
fn every_thread_of_a_serving_daemon_runs_under_the_filter() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    // Work first, so connection and rocksdb threads exist.
    let mut c = d.client();
    let id = create(&mut c, &memory(7, 64, 4), CreateOptions::default());
    assert!(c.open_image(&id).is_ok());
    let pid = d.child.id();
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(field("Seccomp:"), "2", "{status}");
        assert_eq!(field("Seccomp_filters:"), "2", "{status}");
        threads += 1;
    }
    assert!(threads > 2, "only {threads} threads");
    ping_ok(&d);
}

/// RocksDB's background work under the daemon's seccomp filter: with tiny memtables a few
/// dozen snapshots make it flush memtables to tables and compact them, on its own threads
/// (which the filter covers); the daemon must live through it and keep serving. (In the
/// soak, a daemon whose memtables first filled up died at that point.)
#[test]
fn the_daemon_lives_through_index_flushes_and_compactions_under_its_filter() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_with(
        dir.path(),
        &["--index-memtable-kib", "256", "--seccomp", "kill"],
    );
    let mut c = d.client();
    let mut kept = std::collections::VecDeque::new();
    for seed in 0..40 {
        let mem = memory(1000 + seed, 1024, 0);
        let id = create(&mut c, &mem, CreateOptions::default());
        kept.push_back((id, mem));
        if kept.len() > 3 {
            let (old, _) = kept.pop_front().unwrap();
            c.delete(&old).unwrap();
        }
    }
    // Let background compactions run, then the daemon must still be there and serve.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon died (a syscall outside its filter?)"
    );
    let tables = std::fs::read_dir(dir.path().join("store/index"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".sst"))
        })
        .count();
    assert!(
        tables > 0,
        "no memtable was flushed: the test tested nothing"
    );
    let (id, mem) = kept.back().unwrap();
    let mut c = d.client();
    let image = c.open_image(id).unwrap();
    assert_eq!(image.memory_size, mem.len() as u64);
    assert!(c.stats().unwrap().snapshots >= 3);
    d.kill();
}

/// Voluntary context switches of `pid`'s threads whose name starts with `prefix`, summed.
fn wakeups_of_threads(pid: u32, prefix: &str) -> (usize, u64) {
    let mut threads = 0;
    let mut switches = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.trim().starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        threads += 1;
        switches += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    (threads, switches)
}

/// An idle fault session sleeps in poll(2) with no timeout; a daemon stopping in-process
/// (as the benchmarks stop theirs) still ends it, through its shutdown eventfd.
#[test]
fn a_shutdown_ends_fault_sessions_asleep_in_poll() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(fissile_snapshotd::store::Store::open(&dir.path().join("store")).unwrap());
    let server = fissile_snapshotd::server::Server::new(store);
    let socket = dir.path().join("s.sock");
    let listener = fissile_snapshotd::server::Server::bind(&socket).unwrap();
    let serving = server.clone();
    std::thread::spawn(move || serving.serve(listener));
    let mut c = Client::connect(&socket).unwrap();
    let mem = memory(5, 16, 1);
    let id = create(&mut c, &mem, CreateOptions::default());
    let lazy = LazyMemory::restore(Client::connect(&socket).unwrap(), &id, None).unwrap();
    let mut buf = vec![0u8; PS];
    lazy.mapping().read_at(0, &mut buf);
    assert!(buf == mem[..PS]);
    // Asleep now (its first-touch recording stays open for 30 s).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lazy.session().failure(), None);
    server.shutdown();
    let failure = lazy.session().wait_failure(Duration::from_secs(10));
    assert!(
        failure
            .as_deref()
            .is_some_and(|f| f.contains("connection closed")),
        "the session did not end: {failure:?}"
    );
}

/// Long enough for a session's client to hear a heartbeat sent after now.
fn one_beat() -> Duration {
    Duration::from_millis(fissile_proto::snapshotd::HEARTBEAT_INTERVAL_MS + 300)
}

#[test]
fn idle_fault_sessions_wake_the_daemon_once_a_heartbeat_for_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut c = d.client();
    let mem = memory(9, 64, 1);
    let id = create(&mut c, &mem, CreateOptions::default());
    drop(c); // its connection thread ends
    let sessions = 4;
    let lazies: Vec<LazyMemory> = (0..sessions)
        .map(|_| LazyMemory::restore(d.client(), &id, None).unwrap())
        .collect();
    let mut buf = vec![0u8; PS];
    for lazy in &lazies {
        lazy.mapping().read_at(0, &mut buf);
        assert!(buf == mem[..PS]);
    }
    let pid = d.child.id();
    // The heartbeat thread starts with the first session on the daemon's side; the create's
    // connection thread ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (wakeups_of_threads(pid, "snapshotd-heart").0 == 0
        || wakeups_of_threads(pid, "snapshotd-conn").0 != sessions)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default())
        .collect();
    let (hearts, heart_before) = wakeups_of_threads(pid, "snapshotd-heart");
    assert_eq!(
        hearts, 1,
        "{sessions} sessions, one heartbeat thread: {names:?}"
    );
    // Each session is served on its connection's thread.
    let (conns, conn_before) = wakeups_of_threads(pid, "snapshotd-conn");
    assert_eq!(conns, sessions, "{names:?}");

    let idle_ms = 6000;
    std::thread::sleep(Duration::from_millis(idle_ms));

    let heart = wakeups_of_threads(pid, "snapshotd-heart").1 - heart_before;
    let conn = wakeups_of_threads(pid, "snapshotd-conn").1 - conn_before;
    let beats = idle_ms / fissile_proto::snapshotd::HEARTBEAT_INTERVAL_MS;
    // A beat is one wake-up (plus, rarely, a contended lock) for all sessions; a thread per
    // session woke `sessions` times a beat, and fault threads polling with a timeout once
    // each a beat more.
    assert!(
        heart <= 2 * beats + 2,
        "the heartbeat thread woke {heart} times in {idle_ms} ms ({beats} beats)"
    );
    assert!(
        conn <= 2,
        "{sessions} idle fault threads woke {conn} times in {idle_ms} ms"
    );
    for lazy in &lazies {
        assert_eq!(lazy.session().failure(), None, "the client still hears it");
        lazy.mapping().read_at(PS, &mut buf);
        assert!(buf == mem[PS..2 * PS], "still served");
    }
    // Pages 0 and 1 each faulted once (the others found them in the image), in sessions
    // still running: the daemon's count has them.
    let served = d.client().stats().unwrap().faults_served;
    assert!(served >= 2, "faults served by live sessions: {served}");
}
