//! A process this library started (a VMM, snapshotd): a plain child, or a jailed program in a
//! pid namespace of its own ([`crate::jail::spawn`]), which is this process's child too but
//! was not forked by [`std::process::Command`] itself, so it is held by a pidfd. Either way
//! it is signalled through a handle that cannot name a later process of the same pid, and
//! its exit status is known once reaped.

use std::io;
use std::process::{Child, ChildStdout, ExitStatus};

use fissile_proto::pidfd::Pidfd;

/// A child process of this one.
#[derive(Debug)]
pub struct Process {
    kind: Kind,
    /// Its standard output, when the command piped it.
    stdout: Option<ChildStdout>,
}

#[derive(Debug)]
enum Kind {
    /// Forked by [`std::process::Command`].
    Child(Child),
    /// Made by a jail's first process with `CLONE_PARENT`; `status` once reaped.
    Jailed {
        handle: Pidfd,
        status: Option<ExitStatus>,
    },
}

impl Process {
    /// A child [`std::process::Command`] started.
    pub fn from_child(mut child: Child) -> Process {
        let stdout = child.stdout.take();
        Process {
            kind: Kind::Child(child),
            stdout,
        }
    }

    /// A jailed program (this process's child) held by `handle`.
    pub(crate) fn jailed(handle: Pidfd, stdout: Option<ChildStdout>) -> Process {
        Process {
            kind: Kind::Jailed {
                handle,
                status: None,
            },
            stdout,
        }
    }

    /// Its pid, as this process's pid namespace numbers it.
    pub fn id(&self) -> u32 {
        match &self.kind {
            Kind::Child(c) => c.id(),
            Kind::Jailed { handle, .. } => handle.pid(),
        }
    }

    /// Takes its standard output (when piped).
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.stdout.take()
    }

    /// SIGKILL (nothing once it has been reaped).
    pub fn kill(&mut self) -> io::Result<()> {
        match &mut self.kind {
            Kind::Child(c) => c.kill(),
            Kind::Jailed {
                status: Some(_), ..
            } => Ok(()),
            Kind::Jailed { handle, .. } => handle.signal(libc::SIGKILL),
        }
    }

    /// Its exit status if it has exited (reaping it), without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.reap(false)
    }

    /// Waits for it to exit (reaping it).
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        self.reap(true)?
            .ok_or_else(|| io::Error::other("waited and it had not exited"))
    }

    fn reap(&mut self, block: bool) -> io::Result<Option<ExitStatus>> {
        match &mut self.kind {
            Kind::Child(c) if block => c.wait().map(Some),
            Kind::Child(c) => c.try_wait(),
            Kind::Jailed { handle, status } => {
                if status.is_none() {
                    *status = handle.reap(block)?;
                }
                Ok(*status)
            }
        }
    }
}
