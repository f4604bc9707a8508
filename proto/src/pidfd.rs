//! Process handles that cannot be confused with a later process of the same pid
//! (`pidfd_open(2)`): how a daemon keeps hold of processes it did not start itself (a VMM or
//! snapshotd it re-adopts after a restart) and signals them without racing pid reuse.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Why [`Pidfd::open_matching`] did not return a handle.
#[derive(Debug, thiserror::Error)]
pub enum MatchError {
    /// No such process, or its handle or command line could not be read.
    #[error("{0}")]
    Io(#[source] io::Error),
    /// It is another process.
    #[error("it is not {program} with {arg} (command line: {cmdline})")]
    Other {
        /// The program looked for.
        program: String,
        /// The argument looked for.
        arg: String,
        /// What the process runs.
        cmdline: String,
    },
}

/// A handle on one process.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: u32,
}

impl Pidfd {
    /// Opens a handle on process `pid` (`ESRCH` if there is none).
    pub fn open(pid: u32) -> io::Result<Pidfd> {
        let raw_pid = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no
        // memory is passed.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = i32::try_from(r)
            .map_err(|_| io::Error::other("pidfd_open returned an out-of-range descriptor"))?;
        // SAFETY: `raw` is a descriptor the kernel just created for us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Pidfd { fd, pid })
    }

    /// Opens a handle on process `pid` if it is `program` (its argv[0] ends with it) started
    /// with `arg` among its arguments: how a daemon recognizes a process an earlier run of it
    /// started (a VMM by its control socket, snapshotd by its socket) before taking it over
    /// or stopping it. The error says what the process is instead.
    pub fn open_matching(pid: u32, program: &str, arg: &str) -> Result<Pidfd, MatchError> {
        let handle = Pidfd::open(pid).map_err(MatchError::Io)?;
        let argv = handle.argv().map_err(MatchError::Io)?;
        let is_program = argv.first().is_some_and(|a0| {
            std::path::Path::new(a0)
                .file_name()
                .is_some_and(|n| n.to_string_lossy() == program)
        });
        if !is_program || !argv.iter().skip(1).any(|a| a == arg) {
            return Err(MatchError::Other {
                program: program.to_string(),
                arg: arg.to_string(),
                cmdline: argv.join(" "),
            });
        }
        Ok(handle)
    }

    /// Handles on every running `program` with `arg` among its arguments (see
    /// [`Pidfd::open_matching`]), found in `/proc`: for a process whose pid was not recorded.
    pub fn find_all(program: &str, arg: &str) -> io::Result<Vec<Pidfd>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc")? {
            let Some(pid) = entry?
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Gone meanwhile, another program or unreadable: not one of those looked for.
            if let Ok(p) = Pidfd::open_matching(pid, program, arg) {
                found.push(p);
            }
        }
        Ok(found)
    }

    /// The pid it was opened for.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process's command line (arguments joined by spaces), read after the handle was
    /// opened: if the handle's process is still alive afterwards, this was its command line.
    pub fn cmdline(&self) -> io::Result<String> {
        Ok(self.argv()?.join(" "))
    }

    /// The process's arguments, read as [`Pidfd::cmdline`] is.
    pub fn argv(&self) -> io::Result<Vec<String>> {
        let raw = std::fs::read(format!("/proc/{}/cmdline", self.pid))?;
        if self.exited(Duration::ZERO)? {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the process exited",
            ));
        }
        let mut argv: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if argv.last().is_some_and(String::is_empty) {
            argv.pop(); // the terminating NUL
        }
        Ok(argv)
    }

    /// Sends `signal` to the process (a no-op error `ESRCH` once it is gone).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with a null siginfo and no flags reads no memory of ours;
        // the descriptor is valid for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit; true if it has.
    pub fn exited(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        loop {
            // SAFETY: `pfd` is one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&raw mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return Ok(r > 0);
        }
    }

    /// For a child of this process: its exit status once it has exited, and the child
    /// reaped (`block`: waits for the exit; otherwise `None` while it runs). An error for a
    /// process that is not this process's child or was reaped already (`ECHILD`).
    pub fn reap(&self, block: bool) -> io::Result<Option<std::process::ExitStatus>> {
        use std::os::unix::process::ExitStatusExt;
        let id = libc::id_t::try_from(self.fd.as_raw_fd())
            .map_err(|_| io::Error::other("a negative descriptor"))?;
        let flags = libc::WEXITED | if block { 0 } else { libc::WNOHANG };
        loop {
            // SAFETY: an all-zero siginfo_t is a valid value of that plain C struct.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid writes only into `info`, which lives across the call; the
            // descriptor is valid for the call.
            let r = unsafe { libc::waitid(libc::P_PIDFD, id, &raw mut info, flags) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // SAFETY: waitid filled in a SIGCHLD siginfo (or left it zeroed under WNOHANG),
            // whose pid and status fields these read.
            let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
            if pid == 0 {
                return Ok(None);
            }
            // The encoding of wait(2)'s status word, which ExitStatus holds.
            let raw = match info.si_code {
                libc::CLD_EXITED => (status & 0xff) << 8,
                libc::CLD_DUMPED => (status & 0x7f) | 0x80,
                _ => status & 0x7f,
            };
            return Ok(Some(std::process::ExitStatus::from_raw(raw)));
        }
    }

    /// SIGKILL, then waits up to `timeout` for the exit; true if it exited.
    pub fn kill(&self, timeout: Duration) -> bool {
        let _ = self.signal(libc::SIGKILL);
        self.exited(timeout).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_reaped_with_its_exit_status() {
        let child = std::process::Command::new("sh")
            .args(["-c", "read x; exit 7"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let p = Pidfd::open(child.id()).unwrap();
        assert!(p.reap(false).unwrap().is_none(), "it is still running");
        drop(child); // closes its stdin: it exits
        let status = p.reap(true).unwrap().unwrap();
        assert_eq!(status.code(), Some(7));
        assert!(p.reap(false).is_err(), "reaped once");

        #[expect(clippy::zombie_processes, reason = "reaped through its pidfd")]
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let p = Pidfd::open(child.id()).unwrap();
        p.signal(libc::SIGKILL).unwrap();
        let status = p.reap(true).unwrap().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }

    #[test]
    fn a_handle_sees_its_process_command_line_and_its_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let p = Pidfd::open(child.id()).unwrap();
        // Until the child has exec'd, its command line is still ours.
        let mut tries = 0;
        while !p.cmdline().unwrap().starts_with("sleep 30") {
            tries += 1;
            assert!(tries < 500, "{}", p.cmdline().unwrap());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!p.exited(Duration::ZERO).unwrap());

        assert!(p.kill(Duration::from_secs(5)));

        assert!(p.exited(Duration::ZERO).unwrap());
        let _ = child.wait();
        assert!(p.cmdline().is_err());
    }

    #[test]
    fn find_all_finds_the_processes_with_the_argument_only() {
        let arg = format!("{}.{}", 40 + std::process::id() % 50, std::process::id());
        let mut children: Vec<_> = (0..2)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg(&arg)
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut other = std::process::Command::new("sleep")
            .arg("31")
            .spawn()
            .unwrap();
        let mut tries = 0;
        let found = loop {
            let found = Pidfd::find_all("sleep", &arg).unwrap();
            if found.len() == 2 {
                break found;
            }
            tries += 1;
            assert!(tries < 500, "found {} of 2", found.len());
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut pids: Vec<u32> = found.iter().map(Pidfd::pid).collect();
        pids.sort_unstable();
        let mut want: Vec<u32> = children.iter().map(std::process::Child::id).collect();
        want.sort_unstable();
        assert_eq!(pids, want);
        for p in &found {
            assert!(p.kill(Duration::from_secs(5)));
        }
        for c in &mut children {
            c.wait().unwrap();
        }
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    fn open_matching_wants_the_program_and_the_exact_argument() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut tries = 0;
        while Pidfd::open_matching(child.id(), "sleep", "30").is_err() {
            tries += 1;
            assert!(tries < 500, "the child never exec'd sleep");
            std::thread::sleep(Duration::from_millis(10));
        }
        for (program, arg) in [
            ("sleep", "3"),
            ("sleep", "300"),
            ("sleepy", "30"),
            ("30", "sleep"),
        ] {
            match Pidfd::open_matching(child.id(), program, arg) {
                Err(MatchError::Other { cmdline, .. }) => assert_eq!(cmdline, "sleep 30"),
                other => panic!("{program} {arg}: {other:?}"),
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(matches!(
            Pidfd::open_matching(child.id(), "sleep", "30"),
            Err(MatchError::Io(_))
        ));
    }
}
