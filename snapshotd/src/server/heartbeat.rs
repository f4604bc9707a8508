//! Fault-session heartbeats: one thread beats for every session of the daemon.
//!
//! A session's client must hear from its page server every [`HEARTBEAT_INTERVAL_MS`] (see
//! [`fissile_proto::snapshotd`]). With a thread per session, every idle sandbox on a host
//! woke one more daemon thread each beat; here one [`Heart`] thread wakes once a beat for
//! them all and sleeps without a timeout while no session runs.
//!
//! A beat never blocks the heart: it is sent with `MSG_DONTWAIT`, and a session whose socket
//! is full (its client stopped reading) or closed gets no more beats, so one stuck client
//! cannot silence the others. Each beat is written under the session's writer lock after a
//! look at its stop flag, so no beat follows a session's final failure report.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use fissile_proto::snapshotd::{HEARTBEAT_INTERVAL_MS, Response};

use super::faults::SessionStats;
use crate::fdio;

/// What the heart beats for: one fault session's socket and counters.
#[derive(Debug)]
pub struct Pulse {
    socket: UnixStream,
    /// Serializes writes to the session socket (beats vs. the final failure report).
    writer: Mutex<()>,
    stats: Arc<SessionStats>,
    /// Set when the session stops serving: no beat after that.
    stop: Arc<AtomicBool>,
    /// Set when a beat could not be sent whole: none after that.
    broken: AtomicBool,
    /// Set when the session's faults went to the daemon's total ([`Heart::hand_over`]).
    handed_over: AtomicBool,
}

impl Pulse {
    /// A pulse for the session on `socket` (a clone of it) with these counters and stop flag.
    pub fn new(socket: UnixStream, stats: Arc<SessionStats>, stop: Arc<AtomicBool>) -> Pulse {
        Pulse {
            socket,
            writer: Mutex::new(()),
            stats,
            stop,
            broken: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
        }
    }

    /// Holds off beats while the session writes its own message (set its stop flag first).
    pub fn write_lock(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends one beat unless the session stopped or an earlier beat failed. Never waits for
    /// the writer lock: its holder is the session writing its failure report (it stops).
    fn beat(&self) {
        if self.stop.load(Ordering::Relaxed) || self.broken.load(Ordering::Relaxed) {
            return;
        }
        let _guard = match self.writer.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        let hb = Response::Heartbeat {
            faults: self.stats.faults.load(Ordering::Relaxed),
            prefetched: self.stats.prefetched.load(Ordering::Relaxed),
        };
        if let Err(e) = fdio::send_msg_nowait(&self.socket, &hb) {
            // The client no longer reads (or is gone): its watchdog reports the silence.
            tracing::debug!(error = %e, "a heartbeat could not be sent; no more for this session");
            self.broken.store(true, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Default)]
struct Members {
    pulses: Vec<Weak<Pulse>>,
    /// Whether the thread runs.
    started: bool,
    /// Set when the [`Heart`] drops: the thread ends.
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    members: Mutex<Members>,
    /// Signalled when a session joins or the heart closes.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The daemon's heartbeat thread (started with its first session).
#[derive(Debug, Default)]
pub struct Heart {
    shared: Arc<Shared>,
}

impl Heart {
    /// A heart with no sessions and no thread yet.
    pub fn new() -> Heart {
        Heart::default()
    }

    /// Beats for `pulse` from now on, until it is dropped.
    pub fn add(&self, pulse: &Arc<Pulse>) {
        let mut m = self.shared.lock();
        m.pulses.push(Arc::downgrade(pulse));
        if !m.started {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("snapshotd-heartbeat".into())
                .spawn(move || beat_forever(&shared));
            match spawned {
                Ok(_) => m.started = true,
                // The sessions' clients will report the silence; the next session tries again.
                Err(e) => tracing::error!(error = %e, "cannot start the heartbeat thread"),
            }
        }
        drop(m);
        self.shared.changed.notify_all();
    }

    /// Adds the faults of `pulse`'s session, which no longer serves, to `total` (the
    /// daemon's count of ended sessions' faults), under the lock [`Heart::faults_served`]
    /// reads under: a reading counts them once, never twice or not at all.
    pub fn hand_over(&self, pulse: &Pulse, total: &AtomicU64) {
        let _members = self.shared.lock();
        total.fetch_add(
            pulse.stats.faults.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        pulse.handed_over.store(true, Ordering::Relaxed);
    }

    /// `total` (ended sessions' faults) plus the faults of the sessions not handed over yet.
    pub fn faults_served(&self, total: &AtomicU64) -> u64 {
        let members = self.shared.lock();
        let live: u64 = members
            .pulses
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|p| !p.handed_over.load(Ordering::Relaxed))
            .map(|p| p.stats.faults.load(Ordering::Relaxed))
            .sum();
        total.load(Ordering::Relaxed) + live
    }

    /// Sessions beaten for now (those not yet dropped).
    pub fn sessions(&self) -> usize {
        self.shared
            .lock()
            .pulses
            .iter()
            .filter(|p| p.strong_count() > 0)
            .count()
    }
}

impl Drop for Heart {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

/// The heartbeat thread: a beat to every live session each interval; asleep, without a
/// timeout, while there are none.
fn beat_forever(shared: &Shared) {
    let interval = Duration::from_millis(HEARTBEAT_INTERVAL_MS);
    let mut next = Instant::now() + interval;
    loop {
        let mut m = shared.lock();
        let live: Vec<Arc<Pulse>> = loop {
            if m.closed {
                return;
            }
            m.pulses.retain(|p| p.strong_count() > 0);
            if m.pulses.is_empty() {
                m = shared.changed.wait(m).unwrap_or_else(|p| p.into_inner());
                next = Instant::now() + interval;
                continue;
            }
            let now = Instant::now();
            if now >= next {
                break m.pulses.iter().filter_map(Weak::upgrade).collect();
            }
            m = shared
                .changed
                .wait_timeout(m, next - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        drop(m);
        for pulse in &live {
            pulse.beat();
        }
        drop(live);
        // The next beat one interval on; after a stall, one interval from now (no burst).
        next = (next + interval).max(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdio::FdStream;

    fn pulse() -> (Arc<Pulse>, FdStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let stats = Arc::new(SessionStats::default());
        stats.faults.store(3, Ordering::Relaxed);
        let pulse = Arc::new(Pulse::new(ours, stats, Arc::new(AtomicBool::new(false))));
        (pulse, FdStream::new(theirs))
    }

    #[test]
    fn one_thread_beats_for_every_session_and_stops_at_a_stopped_one() {
        let heart = Heart::new();
        let (a, mut ra) = pulse();
        let (b, mut rb) = pulse();
        heart.add(&a);
        heart.add(&b);
        assert_eq!(heart.sessions(), 2);
        for r in [&mut ra, &mut rb] {
            r.stream()
                .set_read_timeout(Some(Duration::from_millis(3 * HEARTBEAT_INTERVAL_MS)))
                .unwrap();
            match r.read_msg::<Response>().unwrap() {
                Response::Heartbeat { faults, .. } => assert_eq!(faults, 3),
                other => panic!("{other:?}"),
            }
        }
        // A stopped session hears nothing more, the other still does: after the stop, at most
        // the beat already on its way, then silence over two more beats.
        a.stop.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(HEARTBEAT_INTERVAL_MS / 2));
        ra.stream().set_nonblocking(true).unwrap();
        let _ = ra.read_msg::<Response>();
        ra.stream().set_nonblocking(false).unwrap();
        ra.stream()
            .set_read_timeout(Some(Duration::from_millis(2 * HEARTBEAT_INTERVAL_MS + 500)))
            .unwrap();
        assert!(ra.read_msg::<Response>().is_err(), "a beat after the stop");
        let _ = rb.read_msg::<Response>().unwrap();
        drop(a);
        let _ = rb.read_msg::<Response>().unwrap();
        // The thread may still hold `a` for the rest of its round.
        let deadline = Instant::now() + Duration::from_secs(5);
        while heart.sessions() != 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(heart.sessions(), 1);
    }

    #[test]
    fn a_client_that_stops_reading_never_blocks_the_heart() {
        let heart = Heart::new();
        let (stuck, _never_read) = pulse();
        // Fill the stuck session's socket so that a blocking write would wait forever.
        stuck.socket.set_nonblocking(true).unwrap();
        let junk = [0u8; 4096];
        while std::io::Write::write(&mut &stuck.socket, &junk).is_ok() {}
        stuck.socket.set_nonblocking(false).unwrap();
        let (ok, mut r) = pulse();
        heart.add(&stuck);
        heart.add(&ok);
        r.stream()
            .set_read_timeout(Some(Duration::from_millis(3 * HEARTBEAT_INTERVAL_MS)))
            .unwrap();
        for _ in 0..2 {
            assert!(matches!(
                r.read_msg::<Response>().unwrap(),
                Response::Heartbeat { .. }
            ));
        }
        assert!(stuck.broken.load(Ordering::Relaxed));
    }
}
