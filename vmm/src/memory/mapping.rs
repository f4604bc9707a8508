//! Operations on the host mappings behind guest RAM that vm-memory does not offer: replacing
//! a mapping in place (fork and merge switch guest RAM to a snapshot image) and advice. All
//! of the module's `unsafe` is here. (Reading guest RAM goes through vm-memory's volatile
//! slices: another process, snapshotd, may write the image pages behind a mapping.)
//!
//! vm-memory owns the mappings (each [`GuestRegionMmap`] unmaps its range when the last
//! clone of the guest memory goes), so pointers held by devices stay valid as long as they
//! hold the memory; the operations here never unmap.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

/// How a memfd is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// `MAP_SHARED`: writes land in the memfd.
    Shared,
    /// `MAP_PRIVATE`: copy-on-write; writes stay in this process.
    Private,
}

impl Share {
    /// The mmap flags.
    pub fn flags(self) -> libc::c_int {
        match self {
            Share::Shared => libc::MAP_SHARED | libc::MAP_NORESERVE,
            Share::Private => libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        }
    }
}

/// Replaces the mapping of `region` in place by `file` at `offset` (the region's offset in
/// the guest RAM layout). The range stays mapped throughout (`MAP_FIXED` replaces atomically),
/// so every pointer into it stays valid; what they read changes. KVM's MMU notifier drops its
/// stale translations. The old pages (private copies, or the shared mapping) are released.
/// Callers pause vCPUs and devices first so nobody observes the switch half way.
pub fn replace(
    region: &GuestRegionMmap<()>,
    file: &File,
    offset: u64,
    share: Share,
) -> io::Result<()> {
    let len = region.len() as usize;
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: MAP_FIXED over exactly the range vm-memory mapped for this region
    // (`as_ptr()..as_ptr()+len`), so no other mapping is touched; the range is never unmapped
    // in between, so concurrent accesses stay memory-safe; `file` is a valid descriptor.
    let ptr = unsafe {
        libc::mmap(
            region.as_ptr().cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            share.flags() | libc::MAP_FIXED,
            file.as_raw_fd(),
            offset,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if ptr.cast::<u8>() != region.as_ptr() {
        return Err(io::Error::other("MAP_FIXED returned another address"));
    }
    Ok(())
}

/// Maps `len` bytes of `file` from `file_offset` privately over the `len` bytes at `offset`
/// in `region`, in place (`MAP_FIXED`): a layer's own pages over its base image. The range
/// stays mapped throughout, as in [`replace`].
pub fn overlay(
    region: &GuestRegionMmap<()>,
    offset: usize,
    len: usize,
    file: &File,
    file_offset: u64,
) -> io::Result<()> {
    if offset
        .checked_add(len)
        .is_none_or(|end| end > region.len() as usize)
    {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let file_offset = libc::off_t::try_from(file_offset)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `offset..offset+len` lies inside the region's live mapping (checked above), so
    // MAP_FIXED replaces part of vm-memory's own mapping and touches no other; the range is
    // never unmapped in between, so pointers into it stay valid; `file` is a valid
    // descriptor.
    let ptr = unsafe {
        let at = region.as_ptr().add(offset);
        let ptr = libc::mmap(
            at.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            Share::Private.flags() | libc::MAP_FIXED,
            file.as_raw_fd(),
            file_offset,
        );
        (ptr, at)
    };
    if ptr.0 == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if ptr.0.cast::<u8>() != ptr.1 {
        return Err(io::Error::other("MAP_FIXED returned another address"));
    }
    Ok(())
}

/// Gives `advice` (`MADV_HUGEPAGE`, `MADV_NOHUGEPAGE`) for the whole region, best effort.
pub fn advise(region: &GuestRegionMmap<()>, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: the range is the region's live mapping; these advice values change how the
    // memory is backed, never its contents or validity.
    let r = unsafe { libc::madvise(region.as_ptr().cast(), region.len() as usize, advice) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Drops this process's private copies among the `len` bytes at `offset` in `region`
/// (`MADV_DONTNEED`): on a `MAP_PRIVATE` file mapping the range then reads the file's pages
/// again, and KVM's MMU notifier drops its translations of it. Callers make sure nothing
/// writes the range meanwhile (a write between deciding to drop a copy and dropping it is
/// lost) and that the file holds what the range should read.
pub fn drop_private(region: &GuestRegionMmap<()>, offset: usize, len: usize) -> io::Result<()> {
    if offset
        .checked_add(len)
        .is_none_or(|end| end > region.len() as usize)
    {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: `offset..offset+len` lies inside the region's live mapping (checked above), so
    // no other mapping is touched; MADV_DONTNEED never unmaps the range, so every pointer
    // into it stays valid, and guest memory is only accessed through volatile slices, so
    // contents changing under a reader is not undefined behaviour.
    let r = unsafe { libc::madvise(region.as_ptr().add(offset).cast(), len, libc::MADV_DONTNEED) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestAddress};

    fn region(f: &File, share: Share) -> GuestRegionMmap<()> {
        let mapping = MmapRegionBuilder::new(4096)
            .with_file_offset(FileOffset::new(f.try_clone().unwrap(), 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(share.flags())
            .build()
            .unwrap();
        GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap()
    }

    #[test]
    fn replace_swaps_contents_at_the_same_address() {
        let a = crate::memory::create_memfd("a", 4096).unwrap();
        let b = crate::memory::create_memfd("b", 4096).unwrap();
        a.write_all_at(b"aaaa", 0).unwrap();
        b.write_all_at(b"bbbb", 0).unwrap();
        let r = region(&a, Share::Shared);
        let addr = r.as_ptr();

        replace(&r, &b, 0, Share::Private).unwrap();

        assert_eq!(r.as_ptr(), addr);
        let mut got = [0u8; 4];
        vm_memory::Bytes::read_slice(&r, &mut got, vm_memory::MemoryRegionAddress(0)).unwrap();
        assert_eq!(&got, b"bbbb");
    }

    #[test]
    fn private_writes_do_not_reach_the_file() {
        let f = crate::memory::create_memfd("p", 4096).unwrap();
        let r = region(&f, Share::Private);
        vm_memory::Bytes::write_slice(&r, b"zz", vm_memory::MemoryRegionAddress(0)).unwrap();
        let mut got = [0u8; 2];
        f.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, [0, 0]);
    }
}
