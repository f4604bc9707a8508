//! The agent's only waiter: one thread calls `waitpid(-1)` forever, reaping every child (and,
//! as PID 1, every orphan reparented to us), and hands exit statuses to whoever spawned the
//! process. Nothing else in the agent may wait for a child (no `Child::wait`).
//!
//! Spawning and registration happen under the reaper's lock, and the reaper delivers a status
//! under the same lock, so a child that exits before its spawner registers it cannot be
//! missed, and a status is never delivered to a later process that reused the pid.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::sys::{self, ChildExit};

struct State {
    waiters: HashMap<i32, Sender<ChildExit>>,
    /// Bumped on every spawn, so a reaper that found no children knows when to look again.
    generation: u64,
}

struct Reaper {
    state: Mutex<State>,
    spawned: Condvar,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<&'static Reaper> = OnceLock::new();
    REAPER.get_or_init(|| {
        let r: &'static Reaper = Box::leak(Box::new(Reaper {
            state: Mutex::new(State {
                waiters: HashMap::new(),
                generation: 0,
            }),
            spawned: Condvar::new(),
        }));
        if let Err(e) = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reap_forever(r))
        {
            tracing::error!(error = %e, "cannot start the reaper thread");
        }
        r
    })
}

/// Starts the reaper thread now (as PID 1, before any orphan can appear).
pub(crate) fn start() {
    reaper();
}

fn reap_forever(r: &'static Reaper) {
    loop {
        let generation = match r.state.lock() {
            Ok(s) => s.generation,
            Err(p) => p.into_inner().generation,
        };
        match sys::wait_any() {
            Ok((pid, exit)) => {
                let mut s = r.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(tx) = s.waiters.remove(&pid) {
                    // The receiver may be gone (nobody cares any more): fine.
                    let _ = tx.send(exit);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                let mut s = r.state.lock().unwrap_or_else(|p| p.into_inner());
                while s.generation == generation {
                    s = r.spawned.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!(error = %e, "waitpid failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Spawns `cmd` and registers it with the reaper; the receiver gets its exit status once.
///
/// The returned `Child` must never be waited on.
pub(crate) fn spawn(cmd: &mut Command) -> io::Result<(Child, Receiver<ChildExit>)> {
    let r = reaper();
    let mut s = r.state.lock().unwrap_or_else(|p| p.into_inner());
    let child = cmd.spawn()?;
    let pid = i32::try_from(child.id())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "pid out of range"))?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    s.waiters.insert(pid, tx);
    s.generation += 1;
    r.spawned.notify_all();
    Ok((child, rx))
}

/// Describes an exit status in words, for messages to the user.
pub(crate) fn describe(exit: ChildExit) -> String {
    match exit {
        ChildExit::Exited(code) => format!("exited with status {code}"),
        ChildExit::Signaled(sig) => format!("was killed by signal {sig} ({})", signal_name(sig)),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGKILL => "SIGKILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    }
}
