//! Guest RAM: always a memfd mapping, so other processes (snapshotd, child VMMs) can map the
//! same pages and a copy-on-write view is one `mmap(MAP_PRIVATE)` away.
//!
//! Two backings ([`Backing`]):
//! * **Fresh** (a booted VM): our own memfd mapped `MAP_SHARED`. To snapshot it we switch
//!   the mapping to a private view of the same memfd, seal the memfd and hand it to
//!   snapshotd as the new snapshot's image: nothing is copied.
//! * **Image** (restored, forked or merged): a `MAP_PRIVATE` view of a snapshot image memfd
//!   from snapshotd; pages not materialized yet fault to snapshotd through userfaultfd
//!   (unless the image is complete). What the VM writes becomes private copies, which
//!   [`dirty`] finds for the next snapshot. A fork's layer over a complete image (through
//!   other layers, perhaps) is mapped with no fault session: the complete image, and each
//!   layer's own pages mapped over it where it has them, the deepest first ([`Layer`]).
//!
//! - [`mapping`]: the unsafe mmap operations (replace in place, advice, bytes).
//! - [`dirty`]: the dirty set of a private view, from pagemap.

pub mod dirty;
pub mod mapping;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use fissile_proto::snapshotd::page_runs;
use fissile_snapshotd_client::client::FaultSession;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use self::mapping::Share;
use crate::arch::x86_64::layout::ram_regions;

/// Guest memory type used everywhere in the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Page size of guest RAM as snapshots see it.
pub const PAGE_SIZE: u64 = 4096;

/// Creating or switching guest RAM failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A step of creating the memfd failed.
    #[error("guest memory backing file: {0}")]
    MemoryBackingFile(&'static str, #[source] std::io::Error),
    /// vm-memory refused the regions.
    #[error("mapping guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// Mapping a region failed.
    #[error("mapping guest memory region at {0:#x}")]
    MapRegion(u64, #[source] vm_memory::mmap::MmapRegionError),
    /// Assembling the regions failed.
    #[error("assembling guest memory regions")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// Size does not fit the host's address space.
    #[error("guest memory size {0} bytes is too large for this host")]
    TooLarge(u64),
    /// An image has another size than the VM's memory.
    #[error("snapshot image is {image} bytes, the VM has {vm}")]
    SizeMismatch {
        /// Image size.
        image: u64,
        /// VM memory size.
        vm: u64,
    },
    /// Replacing the mapping (fork, merge) failed.
    #[error("switching guest memory to another image")]
    Replace(#[source] std::io::Error),
    /// A layer's page runs are not ascending, apart and within the memory.
    #[error("a layer's pages: {0}")]
    BadLayer(String),
    /// Mapping a layer's pages over its base image failed.
    #[error("mapping a layer's pages over its base image")]
    Overlay(#[source] std::io::Error),
    /// Reading the dirty set failed.
    #[error("reading /proc/self/pagemap")]
    Pagemap(#[source] std::io::Error),
    /// The operation needs another backing.
    #[error("guest memory is {0}")]
    WrongBacking(&'static str),
    /// Dropping private copies failed.
    #[error("dropping private copies of guest pages")]
    Drop(#[source] std::io::Error),
    /// A page index beyond guest memory.
    #[error("page {0} is beyond guest memory")]
    PageOutOfRange(u64),
    /// Copying guest memory (reading a frozen memfd back) failed.
    #[error("copying guest memory: {0}")]
    Copy(&'static str, #[source] std::io::Error),
}

/// What [`GuestRam::unchanged_copies`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unchanged {
    /// Private copies in memory.
    pub copies: u64,
    /// Those equal to the image's page (memory offsets / [`PAGE_SIZE`]), in order.
    pub pages: Vec<u64>,
}

/// What backs guest RAM now.
#[derive(Debug)]
pub enum Backing {
    /// Our own memfd, mapped shared (a freshly booted VM).
    Fresh {
        /// The memfd (created with `MFD_ALLOW_SEALING`).
        memfd: File,
    },
    /// A private view of snapshot `snapshot`'s memory.
    Image {
        /// The snapshot whose memory RAM holds (but for the VM's private copies): its own
        /// image, or an ancestor's image with layers over it up to this snapshot's.
        snapshot: String,
        /// The image memfd (read-only descriptor from snapshotd); for layers mapped over a
        /// complete image, that image's.
        image: File,
        /// The fault session serving its holes (`None` for complete images).
        faults: Option<ImageFaults>,
        /// Layers mapped over `image`, the deepest first ([`GuestRam::from_layers`]).
        layers: Vec<Layer>,
    },
}

/// A layer's own pages, mapped privately over the image (and the layers below) where it has
/// them.
#[derive(Debug)]
pub struct Layer {
    /// Descriptor of the memfd holding them at their offsets in the memory.
    pub pages: File,
    /// Them as `(first page, pages)`: ascending and apart (checked when mapped).
    pub runs: Vec<(u64, u64)>,
}

impl Layer {
    /// Whether `page` is one of the layer's own.
    fn holds(&self, page: u64) -> bool {
        let i = self.runs.partition_point(|&(first, _)| first <= page);
        i > 0 && page < self.runs[i - 1].0 + self.runs[i - 1].1
    }
}

/// The most mappings layers may add to guest RAM, all together (each run is one, and may
/// split another in two; a process has at most about 65,000).
pub const MAX_LAYER_MAPPINGS: usize = 8192;

/// How many mappings `layers` add to guest RAM: one per run.
pub(crate) fn mappings(layers: &[Layer]) -> usize {
    layers.iter().map(|l| l.runs.len()).sum()
}

/// Checks every layer's runs ([`check_runs`]) and that they make at most
/// [`MAX_LAYER_MAPPINGS`] mappings.
pub(crate) fn check_layers(layers: &[Layer], pages: u64) -> Result<(), MemoryError> {
    check_layers_over(0, layers, pages)
}

/// [`check_layers`] for `layers` mapped over layers that made `mapped` mappings already.
fn check_layers_over(mapped: usize, layers: &[Layer], pages: u64) -> Result<(), MemoryError> {
    let runs = mapped + mappings(layers);
    if runs > MAX_LAYER_MAPPINGS {
        return Err(MemoryError::BadLayer(format!(
            "{runs} runs of pages in {} layers (at most {MAX_LAYER_MAPPINGS})",
            layers.len()
        )));
    }
    layers.iter().try_for_each(|l| check_runs(&l.runs, pages))
}

/// Checks that `runs` are ascending, apart, non-empty and within `pages` pages.
fn check_runs(runs: &[(u64, u64)], pages: u64) -> Result<(), MemoryError> {
    let mut end = 0u64;
    for (i, &(first, n)) in runs.iter().enumerate() {
        let last = first.checked_add(n).filter(|&e| n > 0 && e <= pages);
        match last {
            Some(e) if i == 0 || first > end => end = e,
            _ => {
                return Err(MemoryError::BadLayer(format!(
                    "run {i} ({first}, {n}) is empty, overlaps or touches the one before, or \
                     ends past page {pages}"
                )));
            }
        }
    }
    Ok(())
}

/// A userfaultfd and the snapshotd session serving it. Field order matters: the session
/// ends before the uffd closes.
#[derive(Debug)]
pub struct ImageFaults {
    /// The session.
    pub session: FaultSession,
    /// The uffd the guest RAM is registered with.
    pub uffd: userfaultfd::Uffd,
}

/// Guest RAM: the vm-memory regions (which own the mappings) and their backing.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemory,
    backing: Backing,
    size: u64,
}

/// Creates a memfd of `size` bytes, close-on-exec, sealable.
pub fn create_memfd(name: &str, size: u64) -> Result<File, MemoryError> {
    let cname = CString::new(name).map_err(|_| {
        MemoryError::MemoryBackingFile(
            "name",
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )
    })?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call; the flags are
    // valid memfd_create flags. The return value is checked before use.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
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

/// Maps `file` as guest RAM of `size` bytes laid out around the MMIO gap.
fn map_regions(file: &File, size: u64, share: Share) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::new();
    for (gpa, len, offset) in ram_regions(size) {
        let len = usize::try_from(len).map_err(|_| MemoryError::TooLarge(size))?;
        let fd = file
            .try_clone()
            .map_err(|e| MemoryError::MemoryBackingFile("dup", e))?;
        let mapping = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(share.flags())
            .build()
            .map_err(|e| MemoryError::MapRegion(gpa, e))?;
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or(MemoryError::TooLarge(size))?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(MemoryError::Regions)
}

impl GuestRam {
    /// Fresh RAM of `size` bytes in a new memfd (a booting VM).
    pub fn fresh(size: u64) -> Result<GuestRam, MemoryError> {
        let memfd = create_memfd("fissile-guest-ram", size)?;
        let memory = map_regions(&memfd, size, Share::Shared)?;
        advise_huge_pages(&memory);
        Ok(GuestRam {
            memory,
            backing: Backing::Fresh { memfd },
            size,
        })
    }

    /// RAM as a private view of `snapshot`'s image (`image`, `image_size` bytes).
    pub fn from_image(
        snapshot: &str,
        image: File,
        image_size: u64,
        size: u64,
    ) -> Result<GuestRam, MemoryError> {
        if image_size != size {
            return Err(MemoryError::SizeMismatch {
                image: image_size,
                vm: size,
            });
        }
        let memory = map_regions(&image, size, Share::Private)?;
        Ok(GuestRam {
            memory,
            backing: Backing::Image {
                snapshot: snapshot.to_string(),
                image,
                faults: None,
                layers: Vec::new(),
            },
            size,
        })
    }

    /// RAM as a private view of layer `snapshot`: the complete image `base` (`base_size`
    /// bytes) with `layers` mapped privately over it, the deepest first (each run checked:
    /// ascending, apart, within the memory). No page faults to anyone: every file is complete.
    pub fn from_layers(
        snapshot: &str,
        base: File,
        base_size: u64,
        layers: Vec<Layer>,
        size: u64,
    ) -> Result<GuestRam, MemoryError> {
        check_layers(&layers, size / PAGE_SIZE)?;
        let mut ram = GuestRam::from_image(snapshot, base, base_size, size)?;
        ram.map_layers(&layers)?;
        if let Backing::Image { layers: ours, .. } = &mut ram.backing {
            *ours = layers;
        }
        Ok(ram)
    }

    /// Maps each of `layers`' runs privately over guest RAM, the deepest first.
    fn map_layers(&self, layers: &[Layer]) -> Result<(), MemoryError> {
        for layer in layers {
            self.for_each_part(&layer.runs, |region, offset, len, memory_offset| {
                mapping::overlay(region, offset, len, &layer.pages, memory_offset)
                    .map_err(MemoryError::Overlay)
            })?;
        }
        Ok(())
    }

    /// Calls `f` with each part of `runs` (memory page, count) that lies in one region of
    /// guest RAM: the region, the part's offset in it and length (bytes), and its offset in
    /// guest memory.
    fn for_each_part(
        &self,
        runs: &[(u64, u64)],
        mut f: impl FnMut(&GuestRegionMmap<()>, usize, usize, u64) -> Result<(), MemoryError>,
    ) -> Result<(), MemoryError> {
        for ((_, len, offset), region) in ram_regions(self.size).into_iter().zip(self.memory.iter())
        {
            let (first, end) = (offset / PAGE_SIZE, (offset + len) / PAGE_SIZE);
            for &(p, n) in runs {
                let (from, to) = (p.max(first), (p + n).min(end));
                if from < to {
                    f(
                        region,
                        ((from - first) * PAGE_SIZE) as usize,
                        ((to - from) * PAGE_SIZE) as usize,
                        from * PAGE_SIZE,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Switches RAM to a private view of layer `snapshot` (fork, merge): the complete image
    /// `base` with `layers` over it, as in [`GuestRam::from_layers`]. Every private page is
    /// dropped. The VM must be paused.
    pub fn switch_to_layers(
        &mut self,
        snapshot: &str,
        base: File,
        base_size: u64,
        layers: Vec<Layer>,
    ) -> Result<(), MemoryError> {
        check_layers(&layers, self.size / PAGE_SIZE)?;
        self.switch_to_image(&base, base_size)?;
        self.set_image(snapshot, base, None);
        self.map_layers(&layers)?;
        if let Backing::Image { layers: ours, .. } = &mut self.backing {
            *ours = layers;
        }
        Ok(())
    }

    /// Moves RAM in place to `snapshot`: the snapshot RAM is a complete view of (with no
    /// fault session) with `layers` over it, the deepest first. The private copies of
    /// `drop` (pages in order) are dropped first: a merge or rollback passes every private
    /// copy, since the target holds none of what this VM wrote; a snapshot of this VM passes
    /// none, since its own layer holds exactly those pages. Then each layer's runs are
    /// mapped over. Unlike a switch, every other page stays mapped, so the guest's working
    /// set (and KVM's translations of it) survive. The VM must be paused.
    pub fn advance(
        &mut self,
        snapshot: &str,
        layers: Vec<Layer>,
        drop: &[u64],
    ) -> Result<(), MemoryError> {
        let Backing::Image {
            faults: None,
            layers: ours,
            ..
        } = &self.backing
        else {
            return Err(MemoryError::WrongBacking("not a complete image view"));
        };
        check_layers_over(mappings(ours), &layers, self.size / PAGE_SIZE)?;
        self.drop_pages(drop)?;
        self.map_layers(&layers)?;
        if let Backing::Image {
            snapshot: name,
            layers: ours,
            ..
        } = &mut self.backing
        {
            *name = snapshot.to_string();
            ours.extend(layers);
        }
        Ok(())
    }

    /// The layers mapped over the image (the deepest first), and the image, when RAM is
    /// a complete image with layers over it or without (no fault session): what a layer
    /// snapshot of this VM can be mapped over without one.
    pub fn complete_view(&self) -> Option<(&File, &[Layer])> {
        match &self.backing {
            Backing::Image {
                image,
                faults: None,
                layers,
                ..
            } => Some((image, layers)),
            _ => None,
        }
    }

    /// The guest memory (clones share the mappings).
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The current backing.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// The snapshot whose image backs RAM (`None` for a fresh VM).
    pub fn base_snapshot(&self) -> Option<&str> {
        match &self.backing {
            Backing::Image { snapshot, .. } => Some(snapshot),
            Backing::Fresh { .. } => None,
        }
    }

    /// Host address ranges of guest RAM: `(host address, length, offset in the memory)`.
    pub fn host_ranges(&self) -> Vec<(*mut u8, usize, u64)> {
        ram_regions(self.size)
            .into_iter()
            .zip(self.memory.iter())
            .map(|((_, len, offset), r)| (r.as_ptr(), len as usize, offset))
            .collect()
    }

    /// Fresh RAM only: switches the mapping to a private view of our memfd (same contents,
    /// from now on copy-on-write) and returns the memfd, ready to be sealed and adopted as a
    /// snapshot image. The VM must be paused.
    pub fn freeze_fresh(&mut self) -> Result<File, MemoryError> {
        let Backing::Fresh { memfd } = &self.backing else {
            return Err(MemoryError::WrongBacking("not fresh"));
        };
        self.replace_all(memfd)?;
        memfd
            .try_clone()
            .map_err(|e| MemoryError::MemoryBackingFile("dup", e))
    }

    /// Undoes [`GuestRam::freeze_fresh`] when no snapshot came of it: copies the (possibly
    /// sealed) memfd's data into a new memfd and maps that shared again. The VM must be
    /// paused and unchanged since the freeze.
    pub fn unfreeze(&mut self) -> Result<(), MemoryError> {
        let Backing::Fresh { memfd } = &self.backing else {
            return Err(MemoryError::WrongBacking("not fresh"));
        };
        let fresh = create_memfd("fissile-guest-ram", self.size)?;
        let ranges =
            dirty::data_ranges(memfd, self.size).map_err(|e| MemoryError::Copy("SEEK_DATA", e))?;
        let mut buf = vec![0u8; 1 << 20];
        for (start, end) in ranges {
            let mut pos = start;
            while pos < end {
                let n = ((end - pos) as usize).min(buf.len());
                memfd
                    .read_exact_at(&mut buf[..n], pos)
                    .map_err(|e| MemoryError::Copy("read", e))?;
                fresh
                    .write_all_at(&buf[..n], pos)
                    .map_err(|e| MemoryError::Copy("write", e))?;
                pos += n as u64;
            }
        }
        for ((_, _, offset), region) in ram_regions(self.size).into_iter().zip(self.memory.iter()) {
            mapping::replace(region, &fresh, offset, Share::Shared)
                .map_err(MemoryError::Replace)?;
        }
        self.backing = Backing::Fresh { memfd: fresh };
        Ok(())
    }

    /// Records that RAM is now a view of `snapshot`'s image `image` (after
    /// [`GuestRam::freeze_fresh`] the mapping already is).
    pub fn set_image(&mut self, snapshot: &str, image: File, faults: Option<ImageFaults>) {
        self.backing = Backing::Image {
            snapshot: snapshot.to_string(),
            image,
            faults,
            layers: Vec::new(),
        };
    }

    /// Switches RAM to a private view of `snapshot`'s `image` (fork, merge): every private
    /// page is dropped. The VM must be paused. Register the new mapping for faults and
    /// record it with [`GuestRam::set_image`] afterwards.
    pub fn switch_to_image(&mut self, image: &File, image_size: u64) -> Result<(), MemoryError> {
        if image_size != self.size {
            return Err(MemoryError::SizeMismatch {
                image: image_size,
                vm: self.size,
            });
        }
        // The old session (if any) serves a mapping that is about to disappear, and the
        // new mapping covers a layer's pages.
        if let Backing::Image { faults, layers, .. } = &mut self.backing {
            faults.take();
            layers.clear();
        }
        self.replace_all(image)
    }

    fn replace_all(&self, file: &File) -> Result<(), MemoryError> {
        for ((_, _, offset), region) in ram_regions(self.size).into_iter().zip(self.memory.iter()) {
            mapping::replace(region, file, offset, Share::Private).map_err(MemoryError::Replace)?;
        }
        Ok(())
    }

    /// Image-backed RAM: the pages (memory offsets / [`PAGE_SIZE`]) written since the image
    /// was mapped, and every page in memory (read or written since then: the guest's working
    /// set), each in order, from one pass over pagemap.
    pub fn dirty_and_resident_pages(&self) -> Result<(Vec<u64>, Vec<u64>), MemoryError> {
        if !matches!(self.backing, Backing::Image { .. }) {
            return Err(MemoryError::WrongBacking("not an image view"));
        }
        let (mut dirty, mut resident) = (Vec::new(), Vec::new());
        for (addr, len, offset) in self.host_ranges() {
            let (d, r) = dirty::private_and_resident_pages(addr, len, PAGE_SIZE as usize)
                .map_err(MemoryError::Pagemap)?;
            dirty.extend(d.into_iter().map(|p| p + offset / PAGE_SIZE));
            resident.extend(r.into_iter().map(|p| p + offset / PAGE_SIZE));
        }
        Ok((dirty, resident))
    }

    /// Image-backed RAM: the private copies in memory (not swapped out, not the zero page)
    /// whose bytes equal the image's page, in order (memory offsets / [`PAGE_SIZE`]), and how
    /// many copies there are. The VM may run meanwhile (the reads are volatile): a copy it
    /// changes afterwards fails [`GuestRam::drop_unchanged`]'s second comparison.
    ///
    /// An image with a fault session may still have holes, which read as zeros. That is
    /// safe here: a page is copied only after the guest (or KVM, or a device) touched it
    /// through the mapping, and snapshotd resolves that fault by writing the page into the
    /// memfd, or, for a page that is zeros in the snapshot, by mapping the zero page and
    /// leaving the hole. So a copy's page in the memfd holds the snapshot's bytes, or is a
    /// hole of a zero page; and a dropped page's next fault is resolved the same way.
    pub fn unchanged_copies(&self) -> Result<Unchanged, MemoryError> {
        let image = self.image()?;
        let mut found = Unchanged::default();
        let (mut theirs, mut ours) = (vec![0u8; PAGE_SIZE as usize], vec![0u8; PAGE_SIZE as usize]);
        for (addr, len, offset) in self.host_ranges() {
            let copies = dirty::copies_in_memory(addr, len, PAGE_SIZE as usize)
                .map_err(MemoryError::Pagemap)?;
            found.copies += copies.len() as u64;
            for p in copies {
                let page = p + offset / PAGE_SIZE;
                if self.equal_to_image(image, page, &mut theirs, &mut ours)? {
                    found.pages.push(page);
                }
            }
        }
        Ok(found)
    }

    /// Drops each of `pages` ([`GuestRam::unchanged_copies`]) whose copy still equals the
    /// image's page, so the page is the image's (or its layer's) page-cache page again (shared with every VM
    /// mapping the image; the next write copies it again). Returns how many it dropped. The
    /// VM must be paused and its devices quiet: a write between this comparison and the drop
    /// would be lost.
    pub fn drop_unchanged(&self, pages: &[u64]) -> Result<u64, MemoryError> {
        let image = self.image()?;
        let (mut theirs, mut ours) = (vec![0u8; PAGE_SIZE as usize], vec![0u8; PAGE_SIZE as usize]);
        let mut equal = Vec::with_capacity(pages.len());
        for &page in pages {
            if self.equal_to_image(image, page, &mut theirs, &mut ours)? {
                equal.push(page);
            }
        }
        self.drop_pages(&equal)?;
        Ok(equal.len() as u64)
    }

    /// Drops the private copies of `pages` (memory offsets / [`PAGE_SIZE`], in order), one
    /// `MADV_DONTNEED` per run of consecutive pages: each reads its file's page again.
    fn drop_pages(&self, pages: &[u64]) -> Result<(), MemoryError> {
        self.for_each_part(&page_runs(pages), |region, offset, len, _| {
            mapping::drop_private(region, offset, len).map_err(MemoryError::Drop)
        })
    }

    /// Whether page `page` of guest RAM (memory offset / [`PAGE_SIZE`]) holds the bytes of
    /// the image's page (`theirs` and `ours`: a page of scratch each).
    fn equal_to_image(
        &self,
        image: &File,
        page: u64,
        theirs: &mut [u8],
        ours: &mut [u8],
    ) -> Result<bool, MemoryError> {
        // The topmost layer holding the page, else the image.
        let source = match &self.backing {
            Backing::Image { layers, .. } => layers
                .iter()
                .rev()
                .find(|l| l.holds(page))
                .map_or(image, |l| &l.pages),
            Backing::Fresh { .. } => image,
        };
        source
            .read_exact_at(theirs, page * PAGE_SIZE)
            .map_err(|e| MemoryError::Copy("reading the image", e))?;
        self.read_page(page, ours)?;
        Ok(theirs == ours)
    }

    fn image(&self) -> Result<&File, MemoryError> {
        match &self.backing {
            Backing::Image { image, .. } => Ok(image),
            Backing::Fresh { .. } => Err(MemoryError::WrongBacking("not an image view")),
        }
    }

    /// Copies page `page` of guest RAM into `out` (`PAGE_SIZE` bytes). The VM must be
    /// paused for the copy to be consistent; the copy is volatile either way (snapshotd may
    /// be filling holes of the image this memory maps).
    pub fn read_page(&self, page: u64, out: &mut [u8]) -> Result<(), MemoryError> {
        let off = page * PAGE_SIZE;
        let out = out
            .get_mut(..PAGE_SIZE as usize)
            .ok_or(MemoryError::PageOutOfRange(page))?;
        for ((_, len, offset), region) in ram_regions(self.size).into_iter().zip(self.memory.iter())
        {
            if off >= offset && off + PAGE_SIZE <= offset + len {
                region
                    .get_slice(MemoryRegionAddress(off - offset), out.len())
                    .map_err(|_| MemoryError::PageOutOfRange(page))?
                    .copy_to(out);
                return Ok(());
            }
        }
        Err(MemoryError::PageOutOfRange(page))
    }

    /// blake3 of all of guest RAM (faults in every page), and of each MiB of it (first 8
    /// bytes, hex). The VM must be paused for the hash to mean anything.
    pub fn hash(&self) -> (blake3::Hash, Vec<String>) {
        let mut h = blake3::Hasher::new();
        let mut chunks = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        for region in self.memory.iter() {
            let len = region.len() as usize;
            let mut pos = 0;
            while pos < len {
                let n = (len - pos).min(buf.len());
                match region.get_slice(MemoryRegionAddress(pos as u64), n) {
                    Ok(slice) => {
                        slice.copy_to(&mut buf[..n]);
                    }
                    // Inside the region by construction; hash what is there.
                    Err(_) => buf[..n].fill(0),
                }
                h.update(&buf[..n]);
                chunks.push(blake3::hash(&buf[..n]).to_hex()[..16].to_string());
                pos += n;
            }
        }
        (h.finalize(), chunks)
    }
}

/// Asks for transparent huge pages on guest RAM. Every guest page the host has not mapped
/// yet costs a nested page fault, and with 4 KiB shmem pages a booting guest takes tens of
/// thousands of them (in the lab ~50 µs each). With 2 MiB pages it takes dozens. For shmem
/// (our memfd) this needs `/sys/kernel/mm/transparent_hugepage/shmem_enabled` set to
/// `advise` (or `within_size`/`always`); with `never` the advice is a no-op.
fn advise_huge_pages(memory: &GuestMemory) {
    for region in memory.iter() {
        if let Err(e) = mapping::advise(region, libc::MADV_HUGEPAGE) {
            tracing::debug!(error = %e, "MADV_HUGEPAGE refused");
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
    use vm_memory::Bytes;

    #[test]
    fn guest_writes_land_in_the_shared_memfd() {
        let ram = GuestRam::fresh(64 << 20).unwrap();

        ram.memory()
            .write_slice(b"fissile", GuestAddress(0x1234))
            .unwrap();

        let Backing::Fresh { memfd } = ram.backing() else {
            panic!()
        };
        let mut buf = [0u8; 7];
        memfd.read_exact_at(&mut buf, 0x1234).unwrap();
        assert_eq!(&buf, b"fissile");
        assert_eq!(memfd.metadata().unwrap().len(), 64 << 20);
    }

    #[test]
    fn freeze_keeps_contents_and_later_writes_stay_private() {
        let mut ram = GuestRam::fresh(64 << 20).unwrap();
        ram.memory()
            .write_slice(b"before", GuestAddress(0x5000))
            .unwrap();

        let memfd = ram.freeze_fresh().unwrap();
        ram.set_image("s1", memfd.try_clone().unwrap(), None);
        ram.memory()
            .write_slice(b"after!", GuestAddress(0x5000))
            .unwrap();
        ram.memory()
            .write_slice(b"x", GuestAddress(0x9000))
            .unwrap();

        let mut buf = [0u8; 6];
        memfd.read_exact_at(&mut buf, 0x5000).unwrap();
        assert_eq!(&buf, b"before", "the frozen image changed");
        ram.memory()
            .read_slice(&mut buf, GuestAddress(0x5000))
            .unwrap();
        assert_eq!(&buf, b"after!");
        assert_eq!(ram.dirty_and_resident_pages().unwrap().0, vec![5, 9]);
    }

    #[test]
    fn a_layer_maps_its_own_pages_over_its_base_and_trims_against_them() {
        let size = 64u64 << 20;
        let base = create_memfd("base", size).unwrap();
        let layer = create_memfd("layer", size).unwrap();
        for p in 0..12u64 {
            base.write_all_at(&[b'b'; 4096], p * PAGE_SIZE).unwrap();
        }
        // The layer's own pages: 3, 4 and 9 (other offsets of its memfd hold junk that must
        // never show).
        for p in [3u64, 4, 9] {
            layer.write_all_at(&[b'L'; 4096], p * PAGE_SIZE).unwrap();
        }
        layer.write_all_at(&[b'?'; 4096], 5 * PAGE_SIZE).unwrap();
        let ram = GuestRam::from_layers(
            "l",
            base.try_clone().unwrap(),
            size,
            vec![Layer {
                pages: layer.try_clone().unwrap(),
                runs: vec![(3, 2), (9, 1)],
            }],
            size,
        )
        .unwrap();
        let page = |p: u64| {
            let mut b = vec![0u8; 4096];
            ram.read_page(p, &mut b).unwrap();
            b[0]
        };
        let seen: Vec<u8> = (0..12).map(page).collect();
        assert_eq!(seen, b"bbbLLbbbbLbb".to_vec());
        assert_eq!(page(100), 0, "a hole of the base reads as zeros");
        // Nothing is private until written; then a write to an own page and to a base page
        // are both dirty, and each trims against its own file.
        assert!(ram.dirty_and_resident_pages().unwrap().0.is_empty());
        ram.memory()
            .write_slice(&[b'L'; 8], GuestAddress(4 * PAGE_SIZE))
            .unwrap();
        ram.memory()
            .write_slice(&[b'b'; 8], GuestAddress(6 * PAGE_SIZE))
            .unwrap();
        ram.memory()
            .write_slice(b"new", GuestAddress(9 * PAGE_SIZE))
            .unwrap();
        assert_eq!(ram.dirty_and_resident_pages().unwrap().0, vec![4, 6, 9]);
        let same = ram.unchanged_copies().unwrap();
        assert_eq!(
            same.pages,
            vec![4, 6],
            "9 changed; 4 equals the layer's page, 6 the base's"
        );
        assert_eq!(ram.drop_unchanged(&same.pages).unwrap(), 2);
        assert_eq!(ram.dirty_and_resident_pages().unwrap().0, vec![9]);
        assert_eq!(
            (page(4), page(6)),
            (b'L', b'b'),
            "dropped copies read their file again"
        );
    }

    #[test]
    fn layers_stack_the_topmost_wins_and_a_switch_drops_private_pages() {
        let size = 64u64 << 20;
        let base = create_memfd("base", size).unwrap();
        let (l1, l2) = (
            create_memfd("l1", size).unwrap(),
            create_memfd("l2", size).unwrap(),
        );
        for p in 0..10u64 {
            base.write_all_at(&[b'b'; 4096], p * PAGE_SIZE).unwrap();
        }
        for p in [3u64, 4] {
            l1.write_all_at(&[b'1'; 4096], p * PAGE_SIZE).unwrap();
        }
        for p in [4u64, 7] {
            l2.write_all_at(&[b'2'; 4096], p * PAGE_SIZE).unwrap();
        }
        let layer = |f: &File, runs: Vec<(u64, u64)>| Layer {
            pages: f.try_clone().unwrap(),
            runs,
        };
        let mut ram = GuestRam::fresh(size).unwrap();
        ram.memory()
            .write_slice(b"private", GuestAddress(5 * PAGE_SIZE))
            .unwrap();
        let memfd = ram.freeze_fresh().unwrap();
        ram.set_image("fresh", memfd, None);
        ram.memory()
            .write_slice(b"private", GuestAddress(5 * PAGE_SIZE))
            .unwrap();
        ram.switch_to_layers(
            "l2",
            base.try_clone().unwrap(),
            size,
            vec![layer(&l1, vec![(3, 2)]), layer(&l2, vec![(4, 1), (7, 1)])],
        )
        .unwrap();
        let mut b = vec![0u8; 4096];
        let seen: Vec<u8> = (0..10)
            .map(|p| {
                ram.read_page(p, &mut b).unwrap();
                b[0]
            })
            .collect();
        assert_eq!(seen, b"bbb12bb2bb".to_vec());
        assert!(ram.dirty_and_resident_pages().unwrap().0.is_empty());
        assert_eq!(ram.base_snapshot(), Some("l2"));
        let (image, layers) = ram.complete_view().unwrap();
        assert_eq!(layers.len(), 2);
        image.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b[0], b'b');
        // A copy is unchanged when it equals the topmost layer holding its page: page 3's
        // (layer 1) and page 7's (layer 2); page 4 equal to layer 1 is not, layer 2 has it.
        ram.memory()
            .write_slice(&[b'1'; 4], GuestAddress(3 * PAGE_SIZE))
            .unwrap();
        ram.memory()
            .write_slice(&[b'1'; 4096], GuestAddress(4 * PAGE_SIZE))
            .unwrap();
        ram.memory()
            .write_slice(&[b'2'; 4], GuestAddress(7 * PAGE_SIZE))
            .unwrap();
        assert_eq!(ram.dirty_and_resident_pages().unwrap().0, vec![3, 4, 7]);
        assert_eq!(ram.unchanged_copies().unwrap().pages, vec![3, 7]);
    }

    #[test]
    fn advancing_in_place_keeps_the_working_set_mapped_and_reads_as_a_switch() {
        let size = 64u64 << 20;
        let base = create_memfd("base", size).unwrap();
        for p in 0..10u64 {
            base.write_all_at(&[b'b'; 4096], p * PAGE_SIZE).unwrap();
        }
        let (own, winner) = (
            create_memfd("own", size).unwrap(),
            create_memfd("winner", size).unwrap(),
        );
        let layer = |f: &File, runs: Vec<(u64, u64)>| Layer {
            pages: f.try_clone().unwrap(),
            runs,
        };
        let mut ram = GuestRam::from_image("s0", base.try_clone().unwrap(), size, size).unwrap();
        let page = |ram: &GuestRam, p: u64| {
            let mut b = vec![0u8; 4096];
            ram.read_page(p, &mut b).unwrap();
            b[0]
        };
        // The guest reads pages 1 and 2 and writes 5 and 6.
        assert_eq!((page(&ram, 1), page(&ram, 2)), (b'b', b'b'));
        for p in [5u64, 6] {
            ram.memory()
                .write_slice(&[b'o'; 4096], GuestAddress(p * PAGE_SIZE))
                .unwrap();
            own.write_all_at(&[b'o'; 4096], p * PAGE_SIZE).unwrap();
        }
        // Its snapshot: its own layer (the pages it wrote) mapped over them.
        ram.advance("s1", vec![layer(&own, vec![(5, 2)])], &[])
            .unwrap();
        let (dirty, resident) = ram.dirty_and_resident_pages().unwrap();
        assert!(dirty.is_empty(), "the layer replaced the private copies");
        assert!(
            resident.contains(&1) && resident.contains(&2),
            "pages read before stay mapped: {resident:?}"
        );
        // A merge: the guest wrote pages 3 and 6 since; the winner's layer over s1 holds
        // 6 and 8.
        for p in [3u64, 6] {
            ram.memory()
                .write_slice(b"mine", GuestAddress(p * PAGE_SIZE))
                .unwrap();
        }
        for p in [6u64, 8] {
            winner.write_all_at(&[b'w'; 4096], p * PAGE_SIZE).unwrap();
        }
        let (private, _) = ram.dirty_and_resident_pages().unwrap();
        assert_eq!(private, vec![3, 6]);
        ram.advance("w", vec![layer(&winner, vec![(6, 1), (8, 1)])], &private)
            .unwrap();
        let (dirty, resident) = ram.dirty_and_resident_pages().unwrap();
        assert!(dirty.is_empty());
        assert!(resident.contains(&1) && resident.contains(&2));
        assert_eq!(ram.base_snapshot(), Some("w"));
        assert_eq!(ram.complete_view().unwrap().1.len(), 2);
        // The same memory as the winner's chain mapped from scratch.
        let fresh = GuestRam::from_layers(
            "w",
            base.try_clone().unwrap(),
            size,
            vec![
                layer(&own, vec![(5, 2)]),
                layer(&winner, vec![(6, 1), (8, 1)]),
            ],
            size,
        )
        .unwrap();
        let seen: Vec<u8> = (0..10).map(|p| page(&ram, p)).collect();
        assert_eq!(seen, b"bbbbbowbwb".to_vec());
        assert_eq!(seen, (0..10).map(|p| page(&fresh, p)).collect::<Vec<u8>>());
        assert_eq!(ram.hash().0, fresh.hash().0);
    }

    #[test]
    fn advancing_past_the_mapping_limit_is_refused_and_changes_nothing() {
        let size = 128u64 << 20;
        let base = create_memfd("base", size).unwrap();
        let many: Vec<(u64, u64)> = (0..MAX_LAYER_MAPPINGS as u64).map(|i| (2 * i, 1)).collect();
        let f = || create_memfd("layer", size).unwrap();
        let mut ram = GuestRam::from_layers(
            "l",
            base.try_clone().unwrap(),
            size,
            vec![Layer {
                pages: f(),
                runs: many,
            }],
            size,
        )
        .unwrap();
        ram.memory()
            .write_slice(b"kept", GuestAddress(PAGE_SIZE))
            .unwrap();
        let err = ram
            .advance(
                "m",
                vec![Layer {
                    pages: f(),
                    runs: vec![(30_000, 1)],
                }],
                &[1],
            )
            .unwrap_err();
        assert!(matches!(err, MemoryError::BadLayer(_)), "{err}");
        assert_eq!(ram.base_snapshot(), Some("l"));
        assert_eq!(ram.dirty_and_resident_pages().unwrap().0, vec![1]);
        let mut b = [0u8; 4];
        ram.memory()
            .read_slice(&mut b, GuestAddress(PAGE_SIZE))
            .unwrap();
        assert_eq!(&b, b"kept");
        // Fresh RAM has no snapshot to advance from.
        let mut fresh = GuestRam::fresh(64 << 20).unwrap();
        assert!(matches!(
            fresh.advance("x", Vec::new(), &[]),
            Err(MemoryError::WrongBacking(_))
        ));
    }

    #[test]
    fn a_layer_with_bad_runs_is_refused() {
        let size = 64u64 << 20;
        let pages = size / PAGE_SIZE;
        let f = || create_memfd("x", size).unwrap();
        for runs in [
            vec![(3, 0)],
            vec![(3, 2), (4, 1)],
            vec![(3, 2), (5, 1)],
            vec![(9, 1), (3, 1)],
            vec![(pages - 1, 2)],
            vec![(u64::MAX, 2)],
        ] {
            let layers = vec![Layer {
                pages: f(),
                runs: runs.clone(),
            }];
            let err = GuestRam::from_layers("l", f(), size, layers, size).unwrap_err();
            assert!(matches!(err, MemoryError::BadLayer(_)), "{runs:?}: {err}");
        }
    }

    #[test]
    fn switching_to_an_image_drops_private_pages() {
        let image = create_memfd("img", 64 << 20).unwrap();
        image.write_all_at(b"image", 0x3000).unwrap();
        let mut ram =
            GuestRam::from_image("a", image.try_clone().unwrap(), 64 << 20, 64 << 20).unwrap();
        ram.memory()
            .write_slice(b"dirty", GuestAddress(0x3000))
            .unwrap();
        assert_eq!(ram.dirty_and_resident_pages().unwrap().0, vec![3]);

        ram.switch_to_image(&image, 64 << 20).unwrap();
        ram.set_image("a", image, None);

        let mut buf = [0u8; 5];
        ram.memory()
            .read_slice(&mut buf, GuestAddress(0x3000))
            .unwrap();
        assert_eq!(&buf, b"image");
        assert!(ram.dirty_and_resident_pages().unwrap().0.is_empty());
    }

    #[test]
    fn copies_equal_to_the_image_are_dropped_and_changed_ones_kept() {
        let image = create_memfd("img", 64 << 20).unwrap();
        for p in 2..8u64 {
            image.write_all_at(&[p as u8; 16], p * PAGE_SIZE).unwrap();
        }
        let ram =
            GuestRam::from_image("a", image.try_clone().unwrap(), 64 << 20, 64 << 20).unwrap();
        let write = |page: u64, at: u64, bytes: &[u8]| {
            ram.memory()
                .write_slice(bytes, GuestAddress(page * PAGE_SIZE + at))
                .unwrap()
        };
        let read = |page: u64, at: u64, n: usize| {
            let mut buf = vec![0u8; n];
            ram.memory()
                .read_slice(&mut buf, GuestAddress(page * PAGE_SIZE + at))
                .unwrap();
            buf
        };
        // Pages 2, 3, 4 and 7 written back as they were (a run of three, then one alone);
        // 5 changed; 6 changed and then changed back; 9 (zeros in the image) written zeros.
        for p in [2u64, 3, 4, 7] {
            write(p, 0, &[p as u8; 16]);
        }
        write(5, 8, b"changed");
        write(6, 0, b"x");
        write(6, 0, &[6]);
        write(9, 100, &[0; 8]);
        write(10, 4095, b"y");
        assert_eq!(
            ram.dirty_and_resident_pages().unwrap().0,
            vec![2, 3, 4, 5, 6, 7, 9, 10]
        );

        let found = ram.unchanged_copies().unwrap();
        assert_eq!(found.copies, 8);
        assert_eq!(found.pages, vec![2, 3, 4, 6, 7, 9]);
        // A candidate changed between the two passes stays.
        write(4, 0, b"late");
        assert_eq!(ram.drop_unchanged(&found.pages).unwrap(), 5);
        assert_eq!(read(4, 0, 4), b"late");
        write(4, 0, &[4; 4]);
        assert_eq!(ram.dirty_and_resident_pages().unwrap().0, vec![4, 5, 10]);
        assert_eq!(ram.unchanged_copies().unwrap().pages, vec![4]);
        ram.drop_unchanged(&[4]).unwrap();
        assert_eq!(ram.dirty_and_resident_pages().unwrap().0, vec![5, 10]);
        for p in [2u64, 3, 4, 6, 7] {
            assert_eq!(read(p, 0, 16), vec![p as u8; 16], "page {p}");
        }
        assert_eq!(read(5, 0, 15), b"\x05\x05\x05\x05\x05\x05\x05\x05changed");
        assert_eq!(read(10, 4095, 1), b"y");
        // A dropped page is copied again by the next write, and the image stays as it was.
        write(3, 0, b"again");
        assert_eq!(ram.dirty_and_resident_pages().unwrap().0, vec![3, 5, 10]);
        let mut buf = [0u8; 5];
        image.read_exact_at(&mut buf, 3 * PAGE_SIZE).unwrap();
        assert_eq!(buf, [3; 5]);
    }

    #[test]
    fn trimming_needs_an_image() {
        let fresh = GuestRam::fresh(64 << 20).unwrap();
        assert!(matches!(
            fresh.unchanged_copies(),
            Err(MemoryError::WrongBacking(_))
        ));
        assert!(matches!(
            fresh.drop_unchanged(&[1]),
            Err(MemoryError::WrongBacking(_))
        ));
    }

    #[test]
    fn an_image_of_another_size_is_refused() {
        let image = create_memfd("img", 64 << 20).unwrap();
        let err = GuestRam::from_image("a", image, 64 << 20, 128 << 20).unwrap_err();
        assert!(matches!(err, MemoryError::SizeMismatch { .. }), "{err}");
    }
}
