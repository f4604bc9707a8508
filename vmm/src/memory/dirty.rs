//! Which pages of a copy-on-write view were written: `/proc/self/pagemap`.
//!
//! A restored (or forked) VM's RAM is a `MAP_PRIVATE` view of a snapshot image. A page the
//! guest, KVM or our device emulation wrote is a private anonymous copy; an untouched or
//! only-read page is the image's page-cache page. pagemap tells the two apart: bit 63
//! present, bit 62 swapped, bit 61 "file page or shared anonymous". So the dirty set since
//! the image is every present-or-swapped page without bit 61, and it catches writes of every
//! kind (no KVM dirty log, no device bitmap to merge). A zero page snapshotd mapped for a
//! read (`UFFDIO_ZEROPAGE`) is present without bit 61 too, so the dirty set holds it as well:
//! harmless, its bytes are the snapshot's zeros. [`copies_in_memory`] leaves it out (bit 56,
//! "exclusively mapped", is never set for the zero page).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;
/// Entries read per pagemap `pread`.
const BATCH: usize = 8192;

/// True for a pagemap entry of a private (copy-on-write) page.
pub fn is_private_copy(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_SWAPPED) != 0 && entry & PM_FILE == 0
}

/// True for a pagemap entry of a private copy in memory (not swapped out) that only this
/// mapping maps: not the shared zero page.
pub fn is_copy_in_memory(entry: u64) -> bool {
    entry & PM_PRESENT != 0 && entry & (PM_FILE | PM_MMAP_EXCLUSIVE) == PM_MMAP_EXCLUSIVE
}

/// True for a pagemap entry of a page in memory (or swapped out): one the process touched
/// since the mapping was made, private copy or not.
pub fn is_resident(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_SWAPPED) != 0
}

/// Indexes (relative to `addr`, in `page_size` units) of the private pages among the `len`
/// bytes at `addr` of this process ([`is_private_copy`]), and beside them every resident page
/// ([`is_resident`]), from one pass.
pub fn private_and_resident_pages(
    addr: *const u8,
    len: usize,
    page_size: usize,
) -> io::Result<(Vec<u64>, Vec<u64>)> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let (mut private, mut resident) = (Vec::new(), Vec::new());
    scan(&pagemap, addr as u64, len, page_size, |page, entry| {
        if is_private_copy(entry) && private.last() != Some(&page) {
            private.push(page);
        }
        if is_resident(entry) && resident.last() != Some(&page) {
            resident.push(page);
        }
    })?;
    Ok((private, resident))
}

/// Indexes (as above) of the private copies in memory among the `len` bytes at `addr`
/// ([`is_copy_in_memory`]; with pages larger than 4 KiB, those whose every 4 KiB part is
/// one): what a trim compares with the image, leaving swapped-out copies where they are.
pub fn copies_in_memory(addr: *const u8, len: usize, page_size: usize) -> io::Result<Vec<u64>> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut copies: Vec<u64> = Vec::new();
    let mut broken: Option<u64> = None;
    scan(&pagemap, addr as u64, len, page_size, |page, entry| {
        if broken == Some(page) {
            return;
        }
        if !is_copy_in_memory(entry) {
            broken = Some(page);
            if copies.last() == Some(&page) {
                copies.pop();
            }
            return;
        }
        if copies.last() != Some(&page) {
            copies.push(page);
        }
    })?;
    Ok(copies)
}

/// Calls `f` with each 4 KiB pagemap entry of the `len` bytes at `addr` and the index (in
/// `page_size` units, relative to `addr`) of the page it belongs to, in address order.
fn scan(
    pagemap: &File,
    addr: u64,
    len: usize,
    page_size: usize,
    mut f: impl FnMut(u64, u64),
) -> io::Result<()> {
    // pagemap has one entry per base (4 KiB) page of the address space.
    const BASE: u64 = 4096;
    if !addr.is_multiple_of(BASE)
        || !(page_size as u64).is_multiple_of(BASE)
        || !len.is_multiple_of(page_size)
    {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let per_page = page_size as u64 / BASE;
    let entries = len as u64 / BASE;
    let mut buf = vec![0u8; BATCH * 8];
    let mut done = 0u64;
    while done < entries {
        let n = (entries - done).min(BATCH as u64) as usize;
        let chunk = &mut buf[..n * 8];
        pagemap.read_exact_at(chunk, (addr / BASE + done) * 8)?;
        for (i, e) in chunk.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().map_err(|_| io::Error::other("pagemap"))?);
            f((done + i as u64) / per_page, entry);
        }
        done += n as u64;
    }
    Ok(())
}

/// The byte ranges of `file` (the first `size` bytes) that hold data, from SEEK_DATA /
/// SEEK_HOLE: for a memfd, the pages that were ever written.
pub fn data_ranges(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let end = i64::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while pos < end {
        // SAFETY: lseek on a valid descriptor touches no memory.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data after `pos`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = hole.min(end);
        if data >= end {
            break;
        }
        out.push((data as u64, hole as u64));
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::mapping::Share;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{
        Bytes, FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
    };

    #[test]
    fn written_pages_of_a_private_view_are_found_and_read_ones_are_not() {
        let f = crate::memory::create_memfd("dirty", 64 * 4096).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 64 * 4096], 0).unwrap();
        let mapping = MmapRegionBuilder::<()>::new(64 * 4096)
            .with_file_offset(FileOffset::new(f, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(Share::Private.flags())
            .build()
            .unwrap();
        let r = GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap();
        let mut b = [0u8; 1];
        for p in [0u64, 5, 6, 63] {
            r.read_slice(&mut b, MemoryRegionAddress(p * 4096 + 9))
                .unwrap();
        }

        for p in [3u64, 5, 40] {
            r.write_slice(&[2], MemoryRegionAddress(p * 4096 + 100))
                .unwrap();
        }

        let (dirty, resident) =
            private_and_resident_pages(r.as_ptr(), r.len() as usize, 4096).unwrap();
        assert_eq!(dirty, vec![3, 5, 40]);
        // Resident: everything touched, read or written (fault-around may map neighbours of
        // a read too), in address order.
        for p in [0u64, 3, 5, 6, 40, 63] {
            assert!(resident.contains(&p), "page {p} not resident: {resident:?}");
        }
        assert!(resident.windows(2).all(|w| w[0] < w[1]), "{resident:?}");
    }

    #[test]
    fn data_ranges_of_a_sparse_memfd_are_its_written_pages() {
        let f = crate::memory::create_memfd("sparse", 64 * 4096).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 4096], 2 * 4096).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 8192], 10 * 4096).unwrap();
        assert_eq!(
            data_ranges(&f, 64 * 4096).unwrap(),
            vec![(2 * 4096, 3 * 4096), (10 * 4096, 12 * 4096)]
        );
    }

    #[test]
    fn copies_in_memory_are_the_written_pages_and_not_the_zero_page() {
        // An anonymous private mapping: reading a page maps the shared zero page (present,
        // not a file page, not exclusive), writing one makes an exclusive copy.
        let mapping = MmapRegionBuilder::<()>::new(16 * 4096)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .unwrap();
        let r = GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap();
        crate::memory::mapping::advise(&r, libc::MADV_NOHUGEPAGE).unwrap();
        let mut b = [0u8; 1];
        for p in [1u64, 2, 9] {
            r.read_slice(&mut b, MemoryRegionAddress(p * 4096)).unwrap();
        }
        for p in [2u64, 4, 12] {
            r.write_slice(&[7], MemoryRegionAddress(p * 4096 + 1))
                .unwrap();
        }

        let (private, _) = private_and_resident_pages(r.as_ptr(), r.len() as usize, 4096).unwrap();
        assert_eq!(private, vec![1, 2, 4, 9, 12], "zero pages count as dirty");
        let copies = copies_in_memory(r.as_ptr(), r.len() as usize, 4096).unwrap();
        assert_eq!(copies, vec![2, 4, 12]);
        // In 8 KiB pages: only pages whose two halves are both copies.
        r.write_slice(&[7], MemoryRegionAddress(5 * 4096)).unwrap();
        let copies = copies_in_memory(r.as_ptr(), r.len() as usize, 8192).unwrap();
        assert_eq!(copies, vec![2]);
    }

    #[test]
    fn entry_bits_classify_pages() {
        assert!(is_private_copy(PM_PRESENT | 123));
        assert!(is_private_copy(PM_SWAPPED));
        assert!(!is_private_copy(PM_PRESENT | PM_FILE));
        assert!(!is_private_copy(0));
        assert!(is_resident(PM_PRESENT | PM_FILE));
        assert!(is_resident(PM_SWAPPED));
        assert!(!is_resident(PM_FILE));
        assert!(is_copy_in_memory(PM_PRESENT | PM_MMAP_EXCLUSIVE));
        assert!(!is_copy_in_memory(PM_PRESENT), "the zero page");
        assert!(!is_copy_in_memory(PM_PRESENT | PM_FILE | PM_MMAP_EXCLUSIVE));
        assert!(!is_copy_in_memory(PM_SWAPPED));
    }
}
