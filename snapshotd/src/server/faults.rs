//! The userfaultfd fault service: one thread per client session.
//!
//! The client created the uffd and registered its private view of the image (MISSING mode);
//! this thread polls the uffd and the session socket, resolves each fault by materializing
//! the page in the shared image memfd and waking the faulting thread (or `UFFDIO_ZEROPAGE`
//! for zero pages), and ends when the client closes the socket, the uffd hangs up, or the
//! daemon shuts down. Heartbeats come from the daemon's heartbeat thread
//! ([`super::heartbeat`]), so a slow batch of store reads on this one never looks like a dead
//! page server to the client. Between faults the thread sleeps in poll(2) with no timeout
//! (the daemon's shutdown eventfd wakes it), or until its first-touch recording closes.
//!
//! **Bursts.** A guest faults in bursts (a restore's working set, a new heap). After serving a
//! fault the thread keeps reading the uffd for [`SPIN`] before it sleeps in poll(2) again, so
//! the next fault of a burst is read at once rather than after a wake-up. Only on a host
//! with two CPUs or more ([`spin_for_host`]), on at most half of them at once: on one,
//! spinning would keep the faulting thread from running. An idle session never spins.
//!
//! **First-touch order.** The first session on a fresh store image whose snapshot has no
//! recorded order records the pages its faults bring in (zero pages too), in order (the
//! first [`MAX_RECORDED_PAGES`], within [`RECORD_WINDOW`] of its start), and stores them as
//! the snapshot's order when the window closes or the session ends. Pages that other
//! sessions on the image bring in meanwhile do not fault in its client and are missing from
//! the order: they are faulted in as before. The order is stored with the contents of its
//! first pages (at most [`crate::store::MAX_TOUCH_BYTES_STORED`]), in 1 MiB pieces. The
//! next session on a fresh image of that snapshot (after an eviction or a restart)
//! prefetches them in that order from its start, ahead of the vCPUs that would otherwise
//! fault them in one round trip each: a piece at a time (one index lookup, read, zstd frame
//! and hash for 256 pages), then any further pages of the order one by one. An order given
//! at a snapshot's creation (or inherited) has no contents: the first session that
//! prefetches it page by page to its end stores them then.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fissile_proto::snapshotd::Response;
use userfaultfd::{Event, EventBuffer, Uffd};

use super::Shutdown;
use super::heartbeat::{Heart, Pulse};
use super::image::{Image, MaterializeError, PageState};
use crate::fdio;
use crate::store::TouchPages;
use crate::sys;

/// The most pages a session records as its image's first-touch order (256 MiB of 4 KiB
/// pages): far more than a guest touches before it answers its first request.
pub const MAX_RECORDED_PAGES: usize = 65_536;

/// How long after its start a session records first touches.
pub const RECORD_WINDOW: Duration = Duration::from_secs(30);

/// How long a session keeps reading its uffd after its last fault before it sleeps.
pub const SPIN: Duration = Duration::from_micros(50);

/// The spin for sessions on this host: [`SPIN`] with two CPUs or more, else none; at most
/// half the CPUs spin at once (see [`SPINNERS`]). Call it before the seccomp filter is
/// installed (it may read cgroup files).
pub fn spin_for_host() -> Duration {
    match std::thread::available_parallelism() {
        Ok(n) if n.get() >= 2 => {
            SPINNERS.set_max(n.get() / 2);
            SPIN
        }
        _ => Duration::ZERO,
    }
}

/// Sessions spinning now: a session spins only while fewer than half the host's CPUs do
/// ([`spin_for_host`]), so bursts on many sessions at once leave CPUs to the threads that
/// fault.
static SPINNERS: Share = Share::new(1);

/// Threads doing optional work (spinning, prefetching beyond an image's first thread), all
/// sessions together: at most `max` at once.
struct Share {
    used: AtomicUsize,
    max: AtomicUsize,
}

impl Share {
    const fn new(max: usize) -> Share {
        Share {
            used: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// A place in the share, if one is free; given back when the slot drops.
    fn take(&'static self) -> Option<ShareSlot> {
        let max = self.max.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ShareSlot(self))
    }
}

/// Stores of first-touch pages' contents running at once, all sessions together: each holds
/// up to [`crate::store::MAX_TOUCH_BYTES_STORED`] and their compressed pieces in memory
/// while it runs.
static CONTENTS_STORES: Share = Share::new(2);

/// A place taken in a [`Share`].
struct ShareSlot(&'static Share);

impl Drop for ShareSlot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One image's first-touch order being recorded.
#[derive(Debug)]
struct Recording {
    image: Arc<Image>,
    pages: Vec<u64>,
    /// The pages in `pages` (a page that faults again, e.g. a zero page the guest gave back,
    /// is recorded once).
    seen: std::collections::HashSet<u64>,
}

impl Recording {
    /// Stores the order (on this thread).
    fn save(self) {
        if self.pages.is_empty() {
            // Nothing faulted: a later session may still record.
            self.image.release_touch_recording();
            return;
        }
        // Its pages' contents too, unless as many stores of them as allowed run already.
        let slot = CONTENTS_STORES.take();
        match self.image.record_touch_order(&self.pages, slot.is_some()) {
            Ok(recorded) => tracing::debug!(
                snapshot = self.image.id(),
                pages = self.pages.len(),
                recorded,
                "first-touch order"
            ),
            Err(e) => tracing::warn!(
                snapshot = self.image.id(), error = %crate::error_chain(&e),
                "could not record the first-touch order"
            ),
        }
    }
}

/// One region of the client's address space, with its image.
#[derive(Debug, Clone)]
pub struct SessionRegion {
    /// Client start address.
    pub base: u64,
    /// Length.
    pub len: u64,
    /// Offset within the snapshot's memory.
    pub offset: u64,
    /// The image.
    pub image: Arc<Image>,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Polling or reading the uffd failed.
    #[error("userfaultfd read failed")]
    Uffd(#[source] userfaultfd::Error),
    /// The uffd could not be made non-blocking.
    #[error("making the userfaultfd non-blocking")]
    NonBlocking(#[source] std::io::Error),
    /// poll(2) failed.
    #[error("poll failed")]
    Poll(#[source] std::io::Error),
    /// A fault address is outside every region.
    #[error("fault at {0:#x} is outside the session's regions")]
    OutsideRegions(u64),
    /// A page could not be materialized (e.g. corrupt store data).
    #[error("materializing a page")]
    Materialize(#[source] MaterializeError),
    /// Resolving the fault failed.
    #[error("resolving fault at {addr:#x}")]
    Resolve {
        /// Page address.
        addr: u64,
        /// Cause.
        #[source]
        source: userfaultfd::Error,
    },
}

/// Counters of one session.
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Faults resolved.
    pub faults: AtomicU64,
    /// Pages prefetched.
    pub prefetched: AtomicU64,
}

/// A running fault session.
#[derive(Debug)]
pub struct Session {
    uffd: Uffd,
    regions: Vec<SessionRegion>,
    socket: UnixStream,
    /// The session's heartbeats (and the lock its final failure report takes).
    pulse: Option<Arc<Pulse>>,
    stats: Arc<SessionStats>,
    stop: Arc<AtomicBool>,
    /// The daemon's count of faults served by ended sessions (this one's are added when it
    /// stops serving).
    served_total: Arc<AtomicU64>,
    /// When the session started (for [`RECORD_WINDOW`]).
    started: Instant,
    /// First-touch orders still being recorded (see the module docs).
    recording: Vec<Recording>,
    /// Threads storing orders whose recording closed; joined when the session ends.
    savers: Vec<std::thread::JoinHandle<()>>,
    /// How long to keep reading the uffd after a fault ([`SPIN`] or none).
    spin: Duration,
}

impl Session {
    /// Prepares a session on `uffd` for `regions`, reporting on `socket`; its faults are
    /// added to `served_total` when it ends; `spin` as from [`spin_for_host`].
    pub fn new(
        uffd: Uffd,
        regions: Vec<SessionRegion>,
        socket: UnixStream,
        served_total: Arc<AtomicU64>,
        spin: Duration,
    ) -> Session {
        let mut recording: Vec<Recording> = Vec::new();
        for r in &regions {
            if !recording.iter().any(|x| Arc::ptr_eq(&x.image, &r.image))
                && r.image.claim_touch_recording()
            {
                recording.push(Recording {
                    image: r.image.clone(),
                    pages: Vec::new(),
                    seen: std::collections::HashSet::new(),
                });
            }
        }
        let stats = Arc::new(SessionStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let pulse = match socket.try_clone() {
            Ok(s) => Some(Arc::new(Pulse::new(s, stats.clone(), stop.clone()))),
            Err(e) => {
                // Its client reports the silence and stops its VM.
                tracing::error!(error = %e, "cannot clone the session socket for heartbeats");
                None
            }
        };
        Session {
            uffd,
            regions,
            socket,
            pulse,
            stats,
            stop,
            served_total,
            started: Instant::now(),
            recording,
            savers: Vec::new(),
            spin,
        }
    }

    /// Serves faults until the client goes away or `shutdown` is set, with `heart` beating
    /// for it. A failure is reported to the client as [`Response::SessionFailed`] before
    /// returning it.
    pub fn run(mut self, shutdown: &Shutdown, heart: &Heart) -> Result<(), SessionError> {
        if let Some(p) = &self.pulse {
            heart.add(p);
        }
        let prefetchers = self.start_prefetch();
        let res = self.serve(shutdown);
        self.stop.store(true, Ordering::Relaxed);
        // Final now (only `serve` counts faults): the daemon's total takes them over from
        // the heart's sum of live sessions.
        let faults = self.stats.faults.load(Ordering::Relaxed);
        match &self.pulse {
            Some(p) => heart.hand_over(p, &self.served_total),
            None => {
                self.served_total.fetch_add(faults, Ordering::Relaxed);
            }
        }
        // No beat from here on: the heart looks at `stop` under this lock.
        let pulse = self.pulse.take();
        let guard = pulse.as_ref().map(|p| p.write_lock());
        if let Err(e) = &res {
            let msg = Response::SessionFailed {
                message: crate::error_chain(e),
            };
            let _ = fdio::write_msg(&self.socket, &msg, None);
        }
        drop(guard);
        drop(pulse);
        // The client has its answer; now what may wait (prefetch threads stop within one
        // piece or page, unless one is storing the order's contents; storing an order may
        // wait for the store's writer lock).
        for p in prefetchers {
            if p.join().is_err() {
                tracing::error!("a prefetch thread panicked");
            }
        }
        for rec in std::mem::take(&mut self.recording) {
            rec.save();
        }
        for saver in std::mem::take(&mut self.savers) {
            if saver.join().is_err() {
                tracing::error!("a thread storing a first-touch order panicked");
            }
        }
        tracing::info!(
            faults,
            prefetched = self.stats.prefetched.load(Ordering::Relaxed),
            "fault session ended"
        );
        res
    }

    fn serve(&mut self, shutdown: &Shutdown) -> Result<(), SessionError> {
        // The client made it, and a read must never block this thread (the client could
        // read the event first): ours is non-blocking whatever it chose.
        sys::set_nonblocking(self.uffd.as_fd()).map_err(SessionError::NonBlocking)?;
        let mut events = EventBuffer::new(64);
        let mut buf = Vec::new();
        while !shutdown.is_set() {
            let [u, s, _] = sys::poll(
                [
                    self.uffd.as_raw_fd(),
                    self.socket.as_raw_fd(),
                    shutdown.wake_fd(),
                ],
                self.poll_timeout_ms(shutdown),
            )
            .map_err(SessionError::Poll)?;
            if !self.recording.is_empty() && self.started.elapsed() >= RECORD_WINDOW {
                for rec in std::mem::take(&mut self.recording) {
                    self.save_in_background(rec);
                }
            }
            if s.readable || s.hangup {
                // After `FaultSessionStarted` the client sends nothing: data or EOF both end
                // the session.
                let mut b = [0u8; 64];
                match (&self.socket).read(&mut b) {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => {
                        tracing::warn!("client sent data on a fault session; ending it");
                        return Ok(());
                    }
                }
            }
            if u.hangup && !u.readable {
                return Ok(());
            }
            if u.readable
                && self.drain(&mut events, &mut buf)? > 0
                && !self.spin.is_zero()
                && let Some(_slot) = SPINNERS.take()
            {
                // The rest of the burst, read as it comes (see the module docs).
                let mut until = Instant::now() + self.spin;
                while Instant::now() < until && !shutdown.is_set() {
                    if self.drain(&mut events, &mut buf)? > 0 {
                        until = Instant::now() + self.spin;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        Ok(())
    }

    /// How long `serve` may sleep in poll(2): until the first-touch recording closes, if
    /// one is open; else for good, unless the daemon has no shutdown eventfd to wake it
    /// (then a second at a time, to look at the flag).
    fn poll_timeout_ms(&self, shutdown: &Shutdown) -> i32 {
        let forever = if shutdown.wake_fd() < 0 { 1000 } else { -1 };
        if self.recording.is_empty() {
            return forever;
        }
        let left = RECORD_WINDOW.saturating_sub(self.started.elapsed());
        let ms = i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX);
        if forever < 0 { ms } else { ms.min(forever) }
    }

    /// Reads the uffd's pending events (none if it has none) and serves them; returns how
    /// many faults it served.
    fn drain(
        &mut self,
        events: &mut EventBuffer,
        buf: &mut Vec<u8>,
    ) -> Result<usize, SessionError> {
        let evs: Vec<_> = self
            .uffd
            .read_events(events)
            .map_err(SessionError::Uffd)?
            .collect();
        let mut served = 0;
        for ev in evs {
            match ev.map_err(SessionError::Uffd)? {
                Event::Pagefault { addr, .. } => {
                    self.resolve(addr as u64, buf)?;
                    served += 1;
                }
                other => tracing::debug!(?other, "ignoring uffd event"),
            }
        }
        Ok(served)
    }

    fn resolve(&mut self, addr: u64, buf: &mut Vec<u8>) -> Result<(), SessionError> {
        let r = self
            .regions
            .iter()
            .find(|r| addr >= r.base && addr - r.base < r.len)
            .ok_or(SessionError::OutsideRegions(addr))?
            .clone();
        let ps = u64::from(r.image.page_size());
        let page_addr = addr & !(ps - 1);
        let page = (page_addr - r.base + r.offset) / ps;
        let state = r
            .image
            .materialize(page, buf)
            .map_err(SessionError::Materialize)?;
        let ptr = page_addr as *mut libc::c_void;
        let res = match state {
            // SAFETY: `ptr..ptr+ps` lies in a region the client registered with this uffd;
            // ZEROPAGE only installs a zero page in the client's address space.
            PageState::Zero => unsafe { self.uffd.zeropage(ptr, ps as usize, true) }.map(|_| ()),
            PageState::Present => self.uffd.wake(ptr, ps as usize),
        };
        match res {
            Ok(()) => {}
            // Already mapped (a racing fault on the same page): just wake.
            Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {
                let _ = self.uffd.wake(ptr, ps as usize);
            }
            Err(source) => {
                return Err(SessionError::Resolve {
                    addr: page_addr,
                    source,
                });
            }
        }
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = self
            .recording
            .iter()
            .position(|x| Arc::ptr_eq(&x.image, &r.image))
            && self.recording[i].seen.insert(page)
        {
            self.recording[i].pages.push(page);
            if self.recording[i].pages.len() >= MAX_RECORDED_PAGES {
                let rec = self.recording.swap_remove(i);
                self.save_in_background(rec);
            }
        }
        Ok(())
    }

    /// Stores a closed recording on a thread of its own: the store's writer lock may be
    /// held by a create for a while, and faults must not wait for it.
    fn save_in_background(&mut self, rec: Recording) {
        let rec = Arc::new(Mutex::new(Some(rec)));
        let theirs = rec.clone();
        let spawned = std::thread::Builder::new()
            .name("snapshotd-touch-order".into())
            .spawn(move || {
                super::run_in_background("first-touch order");
                if let Some(rec) = theirs.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    rec.save();
                }
            });
        match spawned {
            Ok(h) => self.savers.push(h),
            Err(e) => {
                tracing::warn!(error = %e, "could not start a thread; storing the order here");
                if let Some(rec) = rec.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    rec.save();
                }
            }
        }
    }

    /// Fills each image in its recorded first-touch order, from the session's start: the
    /// client starts one before its vCPUs run. One thread per image, and more where the
    /// host has CPUs to spare ([`prefetch_for_host`]): they take the order
    /// [`PREFETCH_BATCH`] pages at a time from one cursor, so its earliest pages still come
    /// first.
    fn start_prefetch(&self) -> Vec<std::thread::JoinHandle<()>> {
        let mut threads = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for r in &self.regions {
            if !seen.insert(r.image.id().to_string()) {
                continue;
            }
            let order: Arc<[u64]> = r.image.touch_order().into();
            if order.is_empty() {
                continue;
            }
            // The order's first pages whose contents are stored with it come in pieces
            // (`next_piece`); the rest page by page (`next`, from the first page after them).
            let stored = r.image.touch_pages().map(Arc::new);
            let next_piece = Arc::new(AtomicUsize::new(0));
            let next = Arc::new(AtomicUsize::new(stored.as_ref().map_or(0, |s| s.pages())));
            // A page that fails stops all of the image's prefetch threads: the rest of the
            // order then faults in as usual.
            let failed = Arc::new(AtomicBool::new(false));
            let wanted = stored.as_ref().map_or(0, |s| s.pieces())
                + (order.len() - next.load(Ordering::Relaxed)).div_ceil(PREFETCH_BATCH);
            let extra = (1..MAX_PREFETCH_THREADS.min(wanted)).map_while(|_| PREFETCH_EXTRA.take());
            let slots: Vec<_> = std::iter::once(None).chain(extra.map(Some)).collect();
            let end = Arc::new(PrefetchEnd {
                image: r.image.clone(),
                order: order.len(),
                stored: stored.as_ref().map_or(0, |s| s.pages()),
                started: Instant::now(),
                running: AtomicUsize::new(slots.len()),
                cut_short: AtomicBool::new(false),
            });
            for slot in slots {
                let (image, order) = (r.image.clone(), order.clone());
                let cursors = Cursors {
                    stored: stored.clone(),
                    next_piece: next_piece.clone(),
                    next: next.clone(),
                };
                let (stop, stats, failed) = (self.stop.clone(), self.stats.clone(), failed.clone());
                let thread_end = end.clone();
                let spawned = std::thread::Builder::new()
                    .name("snapshotd-prefetch".into())
                    .spawn(move || {
                        let done = prefetch(&image, &order, &cursors, &stop, &failed, &stats);
                        drop(slot);
                        thread_end.thread_ended(done);
                    });
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not start prefetch");
                        // Counted as cut short: were it the image's only thread, nothing
                        // would bring the order in, and the contents are not stored on
                        // this (the session's) thread.
                        end.thread_ended(false);
                    }
                }
            }
        }
        threads
    }
}

/// Pages a prefetch thread takes from its image's order at a time.
pub const PREFETCH_BATCH: usize = 16;

/// The most threads that prefetch one image.
const MAX_PREFETCH_THREADS: usize = 4;

/// Prefetch threads beyond each image's first, all sessions together: at most the host's
/// CPUs less one ([`prefetch_for_host`]); none on a host with one CPU, where a second
/// thread would only take turns with the first and with the vCPUs it feeds.
static PREFETCH_EXTRA: Share = Share::new(0);

/// Sizes prefetching to this host: images are prefetched by more than one thread only
/// where there are CPUs beyond one. Call it before the seccomp filter is installed (it
/// may read cgroup files).
pub fn prefetch_for_host() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    PREFETCH_EXTRA.set_max(cpus - 1);
}

/// What the last of an image's prefetch threads does as it ends.
struct PrefetchEnd {
    image: Arc<Image>,
    /// Pages in the order.
    order: usize,
    /// Of them, pages whose contents are stored with it.
    stored: usize,
    started: Instant,
    /// Threads that have not ended yet.
    running: AtomicUsize,
    /// Set by a thread that stopped before the order's end (session over, a failure).
    cut_short: AtomicBool,
}

impl PrefetchEnd {
    /// One thread ended (`done`: it found the order's end). The last one logs the
    /// prefetch's time and, when every thread got to the end, so the whole order is in the
    /// image, stores its pages' contents with it if the snapshot has none (at a background
    /// priority: the next restore is what they are for).
    fn thread_ended(&self, done: bool) {
        if !done {
            self.cut_short.store(true, Ordering::Release);
        }
        if self.running.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        tracing::info!(
            snapshot = self.image.id(),
            order = self.order,
            stored = self.stored,
            ms = self.started.elapsed().as_millis() as u64,
            "prefetch ended"
        );
        if self.cut_short.load(Ordering::Acquire) || !self.image.claim_touch_pages() {
            return;
        }
        let Some(_slot) = CONTENTS_STORES.take() else {
            // Left to a later session.
            self.image.release_touch_recording();
            return;
        };
        super::run_in_background("snapshotd-prefetch");
        if let Err(e) = self.image.store_touch_pages() {
            tracing::warn!(
                snapshot = self.image.id(), error = %crate::error_chain(&e),
                "could not store the first-touch pages"
            );
        }
    }
}

/// Where an image's prefetch threads are in its order.
struct Cursors {
    /// The contents of the order's first pages, stored with it.
    stored: Option<Arc<TouchPages>>,
    /// The next piece of `stored` to bring in.
    next_piece: Arc<AtomicUsize>,
    /// The next page of the order to bring in page by page (those after `stored`'s).
    next: Arc<AtomicUsize>,
}

/// One prefetch thread: takes the pieces of the order's stored pages one at a time, then
/// batches of the rest of `order`, until none is left (returns true), `stop` (the
/// session's) is set, or a page fails here or on another of the image's threads (`failed`,
/// which this thread sets when one of its pages fails).
fn prefetch(
    image: &Image,
    order: &[u64],
    cursors: &Cursors,
    stop: &AtomicBool,
    failed: &AtomicBool,
    stats: &SessionStats,
) -> bool {
    let fail = |e: MaterializeError| {
        if !failed.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %crate::error_chain(&e), "prefetch stopped");
        }
        false
    };
    let mut buf = Vec::new();
    if let Some(stored) = &cursors.stored {
        loop {
            let index = cursors.next_piece.fetch_add(1, Ordering::Relaxed);
            if index >= stored.pieces() {
                break;
            }
            if stop.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed) {
                return false;
            }
            let pages = order.get(index * stored.per_piece()..).unwrap_or_default();
            match image.install_touch_pages(stored, index, pages, stop, &mut buf) {
                Ok(n) => {
                    stats.prefetched.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => return fail(e),
            }
        }
    }
    loop {
        let from = cursors.next.fetch_add(PREFETCH_BATCH, Ordering::Relaxed);
        let Some(batch) = order.get(from..order.len().min(from + PREFETCH_BATCH)) else {
            return true;
        };
        for &page in batch {
            if stop.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed) {
                return false;
            }
            // A zero page is written as zeros: the client's touch then maps it without a
            // fault, which is what prefetching it is for.
            let done = match image.materialize(page, &mut buf) {
                Ok(PageState::Present) => Ok(()),
                Ok(PageState::Zero) => image.fill_zero_page(page, &mut buf),
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                return fail(e);
            }
            stats.prefetched.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Extra prefetch threads take at most the host's share of slots, all sessions
    /// together, and give each back when they end.
    #[test]
    fn extra_prefetch_threads_are_capped_and_give_their_slots_back() {
        PREFETCH_EXTRA.set_max(2);
        let a = PREFETCH_EXTRA.take().expect("a first slot");
        let b = PREFETCH_EXTRA.take().expect("a second slot");
        assert!(PREFETCH_EXTRA.take().is_none(), "a third past the cap");
        drop(a);
        let c = PREFETCH_EXTRA.take().expect("the slot given back");
        assert_eq!(PREFETCH_EXTRA.used.load(Ordering::Relaxed), 2);
        drop((b, c));
        assert_eq!(PREFETCH_EXTRA.used.load(Ordering::Relaxed), 0);
        PREFETCH_EXTRA.set_max(0);
        assert!(PREFETCH_EXTRA.take().is_none(), "none on a one-CPU host");
    }
}
