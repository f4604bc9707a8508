//! Build progress on stderr: one line per stage with the elapsed time, and on a terminal a
//! ticking elapsed counter while a long stage runs.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Stage reporter.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    stage_start: Instant,
    tty: bool,
    ticker: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// Starts the clock.
    pub fn new() -> Progress {
        let now = Instant::now();
        Progress {
            start: now,
            stage_start: now,
            tty: std::io::stderr().is_terminal(),
            ticker: None,
        }
    }

    /// Announces a new stage.
    pub fn stage(&mut self, name: &str, what: &str) {
        self.stop_ticker();
        self.stage_start = Instant::now();
        eprintln!(
            "[rootfs {:>6.1}s] {name}: {what}",
            self.start.elapsed().as_secs_f64()
        );
        if self.tty {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let (start, name) = (self.stage_start, name.to_owned());
            let handle = std::thread::spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(500));
                    eprint!("\r  {name}: {:>5}s elapsed", start.elapsed().as_secs());
                    let _ = std::io::stderr().flush();
                }
                eprint!("\r\x1b[K");
            });
            self.ticker = Some((stop, handle));
        }
    }

    /// Prints a note (cache hits, results).
    pub fn note(&mut self, msg: &str) {
        self.stop_ticker();
        eprintln!(
            "[rootfs {:>6.1}s] {msg}",
            self.start.elapsed().as_secs_f64()
        );
    }

    fn stop_ticker(&mut self) {
        if let Some((stop, handle)) = self.ticker.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
            eprintln!(
                "[rootfs {:>6.1}s]   done in {:.1}s",
                self.start.elapsed().as_secs_f64(),
                self.stage_start.elapsed().as_secs_f64()
            );
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop_ticker();
    }
}
