//! The daemon's process helpers over calls libc does not wrap safely: the listener a
//! spawner left open, the background threads' priority, and malloc's figures, threshold
//! and trimming. (The VMM never needs them, so they live here, not in the client's `sys`.)

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::sys::set_cloexec;

/// Takes the listening unix socket a spawner left open as descriptor `fd` (`serve
/// --listen-fd`), checking that it is one and that it is bound at `path`; it is made
/// close-on-exec. Call it once, at start, before anything else could own `fd`.
pub fn inherited_listener(
    fd: RawFd,
    path: &std::path::Path,
) -> io::Result<std::os::unix::net::UnixListener> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    if fd < 3 {
        return Err(invalid(format!("descriptor {fd} is a standard stream")));
    }
    // SAFETY: F_GETFD only reads the descriptor's flags; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let int_opt = |opt: libc::c_int| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for writes and `len` holds the size of `v`.
        let r =
            unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(v)
    };
    if int_opt(libc::SO_DOMAIN)? != libc::AF_UNIX
        || int_opt(libc::SO_TYPE)? != libc::SOCK_STREAM
        || int_opt(libc::SO_ACCEPTCONN)? != 1
    {
        return Err(invalid(format!(
            "descriptor {fd} is not a listening unix stream socket"
        )));
    }
    // SAFETY: `fd` is open (checked above) and was inherited at exec: nothing in this process
    // opened it, so nothing else owns it, and the caller takes it once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(&owned)?;
    let listener = std::os::unix::net::UnixListener::from(owned);
    let addr = listener.local_addr()?;
    if addr.as_pathname() != Some(path) {
        return Err(invalid(format!(
            "descriptor {fd} listens at {:?}, not at {}",
            addr.as_pathname(),
            path.display()
        )));
    }
    Ok(listener)
}

/// What malloc holds: bytes allocated and in use, and bytes it keeps free in its arenas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapFigures {
    /// Allocated and in use: in arenas plus malloc's own mappings of large blocks.
    pub in_use: u64,
    /// Free in the arenas, kept rather than given back to the system.
    pub free: u64,
}

/// malloc's figures over all its arenas (glibc's `mallinfo2`); `None` where the C library
/// is not glibc.
pub fn heap_figures() -> Option<HeapFigures> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; it
        // only reads malloc's bookkeeping under malloc's own locks.
        let m = unsafe { libc::mallinfo2() };
        Some(HeapFigures {
            in_use: (m.uordblks + m.hblkhd) as u64,
            free: m.fordblks as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Blocks of at least `bytes` get mappings of their own from malloc, unmapped when freed,
/// and the threshold stays there (glibc otherwise raises it, up to 32 MiB, each time such a
/// block is freed: later ones then come from the arenas, whose freed memory stays with the
/// process). Call it before other threads start. False where the C library is not glibc.
pub fn fix_mmap_threshold(bytes: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let Ok(bytes) = libc::c_int::try_from(bytes) else {
            return false;
        };
        // SAFETY: mallopt takes a parameter number and a value; M_MMAP_THRESHOLD with any
        // int is valid (glibc refuses values above its maximum and returns 0).
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = bytes;
        false
    }
}

/// Lowers the calling thread's scheduling priority to `nice`. Linux keeps a nice value per
/// thread, and `setpriority(PRIO_PROCESS, 0, …)` names the calling thread; threads it
/// starts afterwards inherit the value. Going back up needs privilege, so only a thread that
/// does background work all its life calls this. The serving filter allows exactly
/// `(PRIO_PROCESS, 0, BACKGROUND_NICE)` (`snapshotd/seccomp/x86_64.json`).
pub fn lower_thread_priority(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority reads only its three integer arguments.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Gives the heap memory malloc holds free back to the system (glibc `malloc_trim`: the top
/// of each arena, and whole free pages inside them with `madvise`). True if it released
/// anything.
pub fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes a padding size and works under malloc's own locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
