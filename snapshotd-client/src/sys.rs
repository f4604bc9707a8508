//! The few system calls libc does not wrap safely: memfd, seals, mmap, poll, fcntl. Most
//! of the client's `unsafe` lives here, the rest in taking ownership of received descriptors
//! (`fdio.rs`); the daemon's is in its userfaultfd ioctls (`fissile-snapshotd`'s
//! `server/faults.rs`) and received descriptors (`server/mod.rs`).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

/// Creates a memfd of `len` bytes (sparse), close-on-exec, with sealing allowed.
pub fn memfd_create(name: &str, len: u64) -> io::Result<File> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call; the flags
    // are valid memfd_create flags.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

/// Seals a memfd's size (no grow, no shrink, no further seals).
pub fn seal_size(file: &File) -> io::Result<()> {
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) on a valid fd with valid seal flags; no memory is touched.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Adds `seals` to a memfd (`F_ADD_SEALS`).
pub fn add_seals(file: &File, seals: i32) -> io::Result<()> {
    // SAFETY: fcntl(F_ADD_SEALS) on a valid fd with valid seal flags; no memory is touched.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals of a memfd (`F_GET_SEALS`).
pub fn seals(file: &File) -> io::Result<i32> {
    // SAFETY: fcntl(F_GET_SEALS) on a valid fd; no memory is touched.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Seals an adopted image must carry: no writes through new mappings or write(2), no size
/// change. (`F_SEAL_WRITE` would also forbid the clients' private writable mappings on
/// kernels before 6.7, so `F_SEAL_FUTURE_WRITE` it is.)
pub const ADOPT_SEALS: i32 = libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// Reopens `file` read-only through /proc (a new open file description on the same inode),
/// so a client can map it privately but never write the shared pages.
pub fn reopen_read_only(file: &File) -> io::Result<File> {
    File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// The byte ranges of `file`'s first `len` bytes that hold data (`SEEK_DATA`, `SEEK_HOLE`):
/// a memfd's holes read as zeros. It moves the file offset, which may be shared with the
/// process that handed the memfd over, but neither lseek with an explicit position nor the
/// positional reads and writes used on memfds here and in the VMM depend on it.
pub fn data_ranges(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let end =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos: libc::off_t = 0;
    while pos < end {
        // SAFETY: lseek(2) on a descriptor `file` keeps open; it touches no memory of ours.
        let start = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if start < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // No data past `pos`.
            }
            return Err(e);
        }
        if start >= end {
            break;
        }
        // SAFETY: as above.
        let stop = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if stop <= start {
            return Err(io::Error::last_os_error());
        }
        let stop = stop.min(end);
        ranges.push((start as u64, stop as u64));
        pos = stop;
    }
    Ok(ranges)
}

/// Sets `O_NONBLOCK` on `fd`'s open file description.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl F_GETFL/F_SETFL on a descriptor borrowed for this call touches no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where the kernel's transparent huge page settings live.
pub const THP_SYSFS: &str = "/sys/kernel/mm/transparent_hugepage";

/// Why this host's shmem settings would break images read lazily from the store, if they
/// would: where a write into a memfd may allocate a huge folio (`shmem_enabled` `always`,
/// `within_size` or `force`, for any folio size), writing one page also makes its
/// neighbours present, as zeros, so userfaultfd never reports them missing and a client
/// reads zeros where the snapshot has data. `thp`: [`THP_SYSFS`] (a test gives another).
pub fn shmem_huge_hazard(thp: &std::path::Path) -> Option<String> {
    fn selected(text: &str) -> Option<&str> {
        let start = text.find('[')? + 1;
        let len = text[start..].find(']')?;
        Some(&text[start..start + len])
    }
    let huge = |v: &str| matches!(v, "always" | "within_size" | "force");
    let top = std::fs::read_to_string(thp.join("shmem_enabled")).ok()?;
    let top = selected(&top)?.to_string();
    if huge(&top) {
        return Some(format!("{}/shmem_enabled is `{top}`", thp.display()));
    }
    let mut sizes: Vec<std::path::PathBuf> = std::fs::read_dir(thp)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("hugepages-"))
        })
        .collect();
    sizes.sort();
    sizes.into_iter().find_map(|dir| {
        let path = dir.join("shmem_enabled");
        let text = std::fs::read_to_string(&path).ok()?;
        let v = selected(&text)?;
        huge(v).then(|| format!("{} is `{v}`", path.display()))
    })
}

/// [`shmem_huge_hazard`] for this host ([`THP_SYSFS`]), as a whole message: the setting,
/// what it would do to images and what to set instead.
pub fn host_shmem_hazard() -> Option<String> {
    shmem_huge_hazard(std::path::Path::new(THP_SYSFS)).map(|setting| {
        format!(
            "{setting}: a page written into a snapshot image would bring its neighbours in as \
             zeros, hiding them from the VMs that read the image lazily; set it to `advise` or \
             `never`"
        )
    })
}

/// Readiness of one fd after [`poll`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Ready {
    /// Readable.
    pub readable: bool,
    /// Hang-up or error.
    pub hangup: bool,
}

/// Polls `fds` for input with a timeout in milliseconds (negative: none); a negative fd is
/// skipped (never ready). Interrupted by a signal, it reports nothing ready.
pub fn poll<const N: usize>(fds: [RawFd; N], timeout_ms: i32) -> io::Result<[Ready; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `pfds` is a valid array of N pollfd structs for the duration of the call.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([Ready::default(); N]);
        }
        return Err(e);
    }
    Ok(pfds.map(|p| Ready {
        readable: p.revents & libc::POLLIN != 0,
        hangup: p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0,
    }))
}

/// Polls two fds for input with a timeout in milliseconds ([`poll`]).
pub fn poll2(a: RawFd, b: RawFd, timeout_ms: i32) -> io::Result<(Ready, Ready)> {
    let [ra, rb] = poll([a, b], timeout_ms)?;
    Ok((ra, rb))
}

/// Sends `buf` on the connected socket `fd` without blocking and without SIGPIPE; returns
/// how many bytes went (`WouldBlock` if none could).
pub fn send_nowait(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the call; `fd` is open.
    let r = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// A memory mapping owned by this process, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory; access through `read_at`/`write_at` copies bytes and
// the raw pointer is only handed out as an address for uffd registration.
unsafe impl Send for Mapping {}
// SAFETY: as above; concurrent `read_at` calls only read.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(len: usize, flags: libc::c_int, fd: RawFd) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh mapping at an address chosen by the kernel; it overlaps nothing we
        // own. For file mappings `fd` is valid for the call.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        Ok(Mapping { ptr, len })
    }

    /// Maps `len` bytes of `fd` copy-on-write (`MAP_PRIVATE`): writes stay in this process.
    pub fn private(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        Mapping::map(len, libc::MAP_PRIVATE, fd.as_raw_fd())
    }

    /// Maps `len` bytes of `fd` shared (`MAP_SHARED`).
    pub fn shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        Mapping::map(len, libc::MAP_SHARED, fd.as_raw_fd())
    }

    /// Maps `len` bytes of anonymous private memory.
    pub fn anonymous(len: usize) -> io::Result<Mapping> {
        Mapping::map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Start pointer (for registering with userfaultfd).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if empty (never: mappings are non-empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies bytes out of the mapping (may fault, and through userfaultfd may block until
    /// the page server resolves the fault).
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) {
        assert!(
            offset.checked_add(buf.len()).is_some_and(|e| e <= self.len),
            "read out of range"
        );
        // SAFETY: the range is inside the mapping (checked above), which stays mapped while
        // `self` lives; `buf` is a distinct Rust buffer so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
    }

    /// Copies bytes into the mapping.
    pub fn write_at(&self, offset: usize, data: &[u8]) {
        assert!(
            offset
                .checked_add(data.len())
                .is_some_and(|e| e <= self.len),
            "write out of range"
        );
        // SAFETY: the range is inside the mapping (checked above) and `data` is a distinct
        // buffer. Concurrent writers to the same bytes race only on plain bytes (no Rust
        // references into the mapping exist).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
    }

    /// Reads one byte (touching the page).
    pub fn touch(&self, offset: usize) -> u8 {
        assert!(offset < self.len, "touch out of range");
        // SAFETY: `offset` is inside the mapping (checked above).
        unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(offset)) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping created by `Mapping::map` and not yet
        // unmapped; no references into it outlive `self`.
        let r = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if r != 0 {
            tracing::error!(error = %io::Error::last_os_error(), "munmap failed");
        }
    }
}

/// Takes ownership of a raw fd received over SCM_RIGHTS.
///
/// # Safety
/// `fd` must be a valid, open descriptor owned by nobody else.
pub unsafe fn own_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Marks `fd` close-on-exec (descriptors received over `SCM_RIGHTS` arrive without it).
pub fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl(F_SETFD) on a descriptor we own; no memory is passed.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thp(top: &str, sizes: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("shmem_enabled"), top).unwrap();
        for (size, v) in sizes {
            let d = dir.path().join(format!("hugepages-{size}"));
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("shmem_enabled"), v).unwrap();
        }
        dir
    }

    #[test]
    fn shmem_settings_that_allocate_huge_folios_on_write_are_a_hazard() {
        let top_never = "always within_size advise [never] deny force\n";
        let size_never = "always inherit within_size advise [never]\n";
        let ok = thp(top_never, &[("64kB", size_never), ("2048kB", size_never)]);
        assert_eq!(shmem_huge_hazard(ok.path()), None);
        let advise = thp("always within_size [advise] never deny force\n", &[]);
        assert_eq!(shmem_huge_hazard(advise.path()), None);
        for v in [
            "[always] within_size",
            "always [within_size]",
            "deny [force]",
        ] {
            let d = thp(v, &[]);
            assert!(shmem_huge_hazard(d.path()).is_some(), "{v}");
        }
        let sized = thp(
            top_never,
            &[("64kB", "[always] inherit within_size advise never")],
        );
        let why = shmem_huge_hazard(sized.path()).unwrap();
        assert!(why.contains("hugepages-64kB"), "{why}");
        // Unreadable settings (no THP in the kernel): no hazard to report.
        assert_eq!(
            shmem_huge_hazard(std::path::Path::new("/nonexistent")),
            None
        );
    }
}
