//! The VMM's own log, capped. It goes to stderr, usually a file the orchestrator opened, and
//! a guest decides how often some lines are written (a broken queue it keeps notifying, bad
//! descriptors, exits nothing handles): at a line per VM exit that is megabytes a second of
//! the host's disk. So the log stops at a cap (default [`VMM_LOG_CAP`], or
//! `$FISSILE_VMM_LOG_CAP` bytes), saying so once; what the VMM does is unaffected.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Default cap of the VMM's log (as the console log's).
pub const VMM_LOG_CAP: u64 = 16 << 20;

/// A log writer that stops after `cap` bytes (for `tracing_subscriber::fmt().with_writer`).
#[derive(Debug)]
pub struct CappedLog<W> {
    inner: Mutex<W>,
    written: AtomicU64,
    cap: u64,
}

impl CappedLog<std::io::Stderr> {
    /// Stderr, capped at `$FISSILE_VMM_LOG_CAP` bytes or [`VMM_LOG_CAP`].
    pub fn stderr() -> Self {
        let cap = std::env::var("FISSILE_VMM_LOG_CAP")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(VMM_LOG_CAP);
        Self::new(std::io::stderr(), cap)
    }
}

impl<W: Write> CappedLog<W> {
    /// `inner`, capped at `cap` bytes.
    pub fn new(inner: W, cap: u64) -> Self {
        Self {
            inner: Mutex::new(inner),
            written: AtomicU64::new(0),
            cap,
        }
    }

    /// Bytes offered so far (written or dropped).
    pub fn offered(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    fn write_line(&self, buf: &[u8]) {
        let len = buf.len() as u64;
        let before = self.written.fetch_add(len, Ordering::Relaxed);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if before.saturating_add(len) <= self.cap {
            let _ = inner.write_all(buf);
        } else if before <= self.cap {
            let _ = writeln!(
                inner,
                "fissile-vmm: log capped at {} bytes; later lines are dropped",
                self.cap
            );
        }
        let _ = inner.flush();
    }
}

/// One write through a [`CappedLog`].
#[derive(Debug)]
pub struct CappedWriter<'a, W: Write> {
    log: &'a CappedLog<W>,
}

impl<W: Write> Write for CappedWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.log.write_line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + 'a> tracing_subscriber::fmt::MakeWriter<'a> for CappedLog<W> {
    type Writer = CappedWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        CappedWriter { log: self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_stops_at_its_cap_and_says_so_once() {
        let log = CappedLog::new(Vec::new(), 100);
        for i in 0..10 {
            let mut w = tracing_subscriber::fmt::MakeWriter::make_writer(&log);
            w.write_all(format!("line {i:02} of a guest-driven flood....\n").as_bytes())
                .unwrap();
        }
        assert_eq!(log.offered(), 10 * 36);
        let out = String::from_utf8(log.inner.into_inner().unwrap()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert_eq!(lines[0], "line 00 of a guest-driven flood....");
        assert!(lines[2].contains("log capped at 100 bytes"), "{out}");
        assert!(out.len() < 100 + 80, "{out}");
    }
}
