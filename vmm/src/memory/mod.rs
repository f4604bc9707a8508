//! Guest RAM: one memfd, mapped `MAP_SHARED` into the VMM, so other processes (snapshotd, a
//! child VMM) can map the same pages later and a private copy-on-write view is one `mmap` away.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::ram_regions;

/// Guest memory type used everywhere in the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Creating guest RAM failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A step of creating the memfd failed.
    #[error("guest memory backing file: {0}")]
    MemoryBackingFile(&'static str, #[source] std::io::Error),
    /// vm-memory refused the regions.
    #[error("mapping guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// Size does not fit the host's address space.
    #[error("guest memory size {0} bytes is too large for this host")]
    TooLarge(u64),
}

/// Guest RAM plus the memfd that backs it.
#[derive(Debug)]
pub struct GuestRam {
    /// The mapped memory.
    pub memory: GuestMemory,
    /// The backing memfd (offset 0 = GPA 0; the part above 4 GiB follows the low part).
    pub memfd: File,
    /// Total size in bytes.
    pub size: u64,
}

/// Creates a sealed-size-free memfd of `size` bytes with `MFD_CLOEXEC`.
pub fn create_memfd(name: &str, size: u64) -> Result<File, MemoryError> {
    let cname = CString::new(name).map_err(|_| {
        MemoryError::MemoryBackingFile(
            "name",
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )
    })?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call; the flags are
    // valid memfd_create flags. The return value is checked before use.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::MemoryBackingFile(
            "memfd_create",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just returned by memfd_create, is valid, and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)
        .map_err(|e| MemoryError::MemoryBackingFile("truncate", e))?;
    Ok(file)
}

/// Creates guest RAM of `size` bytes laid out around the MMIO gap, backed by a memfd.
pub fn create_guest_ram(size: u64) -> Result<GuestRam, MemoryError> {
    let memfd = create_memfd("fissile-guest-ram", size)?;
    let mut ranges = Vec::new();
    for (gpa, len, offset) in ram_regions(size) {
        let len = usize::try_from(len).map_err(|_| MemoryError::TooLarge(size))?;
        let fd = memfd
            .try_clone()
            .map_err(|e| MemoryError::MemoryBackingFile("dup", e))?;
        ranges.push((GuestAddress(gpa), len, Some(FileOffset::new(fd, offset))));
    }
    let memory = GuestMemory::from_ranges_with_files(ranges).map_err(MemoryError::Map)?;
    advise_huge_pages(&memory);
    Ok(GuestRam {
        memory,
        memfd,
        size,
    })
}

/// Asks for transparent huge pages on guest RAM. Every guest page the host has not mapped
/// yet costs a nested page fault, and with 4 KiB shmem pages a booting guest takes tens of
/// thousands of them (in the lab ~50 µs each). With 2 MiB pages it takes dozens. For shmem
/// (our memfd) this needs `/sys/kernel/mm/transparent_hugepage/shmem_enabled` set to
/// `advise` (or `within_size`/`always`); with `never` the advice is a no-op.
fn advise_huge_pages(memory: &GuestMemory) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in memory.iter() {
        let (ptr, len) = (region.as_ptr(), region.len() as usize);
        // SAFETY: `ptr..ptr+len` is a live mapping owned by `memory`; MADV_HUGEPAGE only
        // changes how the kernel backs it, never its contents or validity.
        let r = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "MADV_HUGEPAGE refused");
        }
    }
    if std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .is_ok_and(|s| s.contains("[never]") || s.contains("[deny]"))
    {
        tracing::info!(
            "shmem huge pages are off (transparent_hugepage/shmem_enabled); guest RAM uses \
             4 KiB pages: set it to `advise` for faster boots"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    #[test]
    fn guest_writes_land_in_the_shared_memfd() {
        let ram = create_guest_ram(64 << 20).unwrap();

        ram.memory
            .write_slice(b"fissile", GuestAddress(0x1234))
            .unwrap();

        let mut buf = [0u8; 7];
        ram.memfd.read_exact_at(&mut buf, 0x1234).unwrap();
        assert_eq!(&buf, b"fissile");
        assert_eq!(ram.memfd.metadata().unwrap().len(), 64 << 20);
    }
}
