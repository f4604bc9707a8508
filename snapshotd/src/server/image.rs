//! Snapshot images: one memfd per snapshot, shared by every client that maps it.
//!
//! Two kinds:
//! * **Store images** (a snapshot opened from the store): a sparse memfd filled lazily, page by
//!   page, from the verified chunks in the store when a client faults.
//! * **Adopted images** (an adopting create, i.e. fork): the VMM hands over a sealed memfd
//!   that already holds the memory. A *full* adopted memfd is the image itself: it holds
//!   every page (its holes are zero pages), they are in the page cache already, and the VMM
//!   and all its children share them physically. A *layered* adopted memfd holds only the
//!   pages dirtied since the parent; the image is then a fresh memfd of ours, filled on
//!   first fault from the adopted pages or else from the parent's image (itself adopted or
//!   from the store). No store read, no decompression. (The adopted memfd is sealed against
//!   writes, so it cannot be the layered image: the parent's pages must be written into it.)
//!
//! A layered image depends on its parent image only until it is durable: then it is *rebased*
//! on the store (its own snapshot's flattened view there), keeping only a weak reference to
//! the parent. Its missing pages are copied from the parent's memfd when the parent is still
//! open and has them, else read from the store; nothing is written into the parent on the
//! way. So a VM that snapshots again and again does not pin its whole chain of images (each
//! unused durable one can be evicted, each snapshot deleted), and a fault on a deep layer
//! does not fill every level's memfd.
//!
//! A client maps a layer over a complete image with no fault session (`OpenLayer`): the
//! complete image, then each layer's own pages over it. Each round of fork and merge adds two
//! layers, so a layer with [`FLATTEN_BELOW`] layers below it is *flattened* after its ingest:
//! its memfd gets every page from its chain, it counts as complete, and layers over it chain
//! from it ([`Image::flatten`]).
//!
//! A fault only ever reaches us for a page that is not in the image memfd yet (MISSING mode
//! on a private mapping fires for holes only), so "present" pages are resolved by a wake.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};

use fissile_proto::snapshotd::page_runs;

use crate::store::{
    ReadError, SnapshotView, Store, TouchOrderError, TouchPages, ViewError, touch_pages_storable,
};
use crate::sys;

/// What a page turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// A zero page: resolve with `UFFDIO_ZEROPAGE` (a prefetch may write it as zeros into
    /// the memfd, [`Image::fill_zero_page`]).
    Zero,
    /// Present in the memfd.
    Present,
}

/// Errors opening an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The snapshot could not be loaded.
    #[error("loading snapshot")]
    View(#[source] ViewError),
    /// The memfd could not be created.
    #[error("creating image memfd")]
    Memfd(#[source] io::Error),
    /// The memfd handed over for adoption is unsuitable.
    #[error("adopted memfd: {0}")]
    Adopt(String),
    /// The snapshot in the store does not match the image being rebased on it.
    #[error("snapshot {0} in the store has another memory or page size than its image")]
    StoreMismatch(String),
}

/// Errors materializing one page.
#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    /// The page is beyond the image.
    #[error("page {page} is beyond snapshot {snapshot}")]
    OutOfRange {
        /// Snapshot id.
        snapshot: String,
        /// Page index.
        page: u64,
    },
    /// The page could not be read from the store.
    #[error("reading page")]
    Read(#[source] ReadError),
    /// Reading it from an image memfd (this one's or a parent's) failed.
    #[error("reading page {page} of image {parent}")]
    Parent {
        /// Parent snapshot id.
        parent: String,
        /// Page index.
        page: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing it into the memfd failed.
    #[error("writing page {page} into the image memfd")]
    Write {
        /// Page index.
        page: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Where the pages of an image come from.
#[derive(Debug)]
enum Source {
    /// Lazily from the store.
    Store {
        view: Arc<SnapshotView>,
        store: Arc<Store>,
    },
    /// Adopted memfd holding every page (holes are zero pages).
    Full,
    /// Adopted memfd `dirty` holding the pages in `own`; the others come from `base`.
    /// `order`: the pages its creator gave as its first-touch order, which a fault session
    /// prefetches (as it does a store image's).
    Layered {
        dirty: File,
        own: Vec<u64>,
        base: RwLock<Base>,
        order: Vec<u64>,
    },
}

/// Where a layered image's pages that it does not hold itself come from.
#[derive(Debug, Clone)]
enum Base {
    /// The parent's image (until this snapshot is durable).
    Parent(Arc<Image>),
    /// This snapshot's own view in the store, the parent's memfd first while it is open.
    Store {
        view: Arc<SnapshotView>,
        store: Arc<Store>,
        parent: Weak<Image>,
    },
}

/// One snapshot's shared image.
#[derive(Debug)]
pub struct Image {
    id: String,
    memory_size: u64,
    page_size: u32,
    source: Source,
    memfd: File,
    present: Vec<AtomicU64>,
    materialized: AtomicU64,
    durable: AtomicBool,
    /// Its background ingest failed: it will never be durable.
    failed: AtomicBool,
    /// When it was last handed out ([`Images`]' clock), for LRU eviction.
    last_used: AtomicU64,
    /// When it was last handed out (ms since the epoch): not evicted within
    /// [`OPEN_GRACE_MS`] of that, so a client that opened it can start its fault session.
    touched_ms: AtomicU64,
    /// This object's number: a client names it in its fault session's regions, and an
    /// image evicted and opened again (a new memfd) is refused rather than served into a
    /// memfd the client never mapped.
    instance: u64,
    /// A fault session claimed the recording of the first-touch order
    /// ([`Image::claim_touch_recording`]).
    recording_claimed: AtomicBool,
    /// A layered image whose memfd was filled with every page ([`Image::flatten`]).
    flat: AtomicBool,
}

/// A layered image with this many layered images below it, or more, is flattened after its
/// ingest ([`Image::flatten`]) unless configured otherwise: each round of fork and merge lays
/// two layers under a parent's next fork, and chains longer than `MAX_LAYER_DEPTH` map with
/// a fault session.
pub use fissile_proto::snapshotd::FLATTEN_BELOW;

/// Longest chain of images [`Image::open_chain`] walks (for a flatten or a layer view).
const MAX_CHAIN_WALK: usize = 1024;

/// How long after it was last handed out an unused image stays, whatever the budget.
pub const OPEN_GRACE_MS: u64 = 5_000;

/// A new image object's [`Image::instance`].
fn next_instance() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn bitmap(pages: u64) -> Vec<AtomicU64> {
    (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

fn bit(map: &[AtomicU64], page: u64) -> bool {
    map.get((page / 64) as usize)
        .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
}

impl Image {
    fn open(store: Arc<Store>, id: &str) -> Result<Image, ImageError> {
        let view = store.view(id).map_err(ImageError::View)?;
        let memfd = sys::memfd_create(&format!("fissile-image-{id}"), view.memory_size())
            .map_err(ImageError::Memfd)?;
        sys::seal_size(&memfd).map_err(ImageError::Memfd)?;
        Ok(Image {
            id: id.to_string(),
            memory_size: view.memory_size(),
            page_size: view.page_size(),
            present: bitmap(view.page_count()),
            source: Source::Store { view, store },
            memfd,
            materialized: AtomicU64::new(0),
            durable: AtomicBool::new(true),
            failed: AtomicBool::new(false),
            last_used: AtomicU64::new(0),
            touched_ms: AtomicU64::new(wall_ms()),
            instance: next_instance(),
            recording_claimed: AtomicBool::new(false),
            flat: AtomicBool::new(false),
        })
    }

    /// Adopts `memfd` as the image of snapshot `id`. `layer`: the dirty pages it holds, the
    /// parent image the other pages come from, and the first-touch order to prefetch (pages
    /// past the memory are dropped); `None`: it holds every page.
    pub fn adopt(
        id: &str,
        memfd: File,
        memory_size: u64,
        page_size: u32,
        layer: Option<(Vec<u64>, Arc<Image>, Vec<u64>)>,
    ) -> Result<Image, ImageError> {
        let seals =
            sys::seals(&memfd).map_err(|e| ImageError::Adopt(format!("F_GET_SEALS: {e}")))?;
        if seals & sys::ADOPT_SEALS != sys::ADOPT_SEALS {
            return Err(ImageError::Adopt(format!(
                "seals {seals:#x} lack F_SEAL_FUTURE_WRITE|F_SEAL_SHRINK|F_SEAL_GROW"
            )));
        }
        let len = memfd
            .metadata()
            .map_err(|e| ImageError::Adopt(e.to_string()))?
            .len();
        if len != memory_size {
            return Err(ImageError::Adopt(format!(
                "memfd is {len} bytes, the snapshot {memory_size}"
            )));
        }
        let pages = memory_size / u64::from(page_size);
        let (source, memfd) = match layer {
            None => (Source::Full, memfd),
            Some((mut own, parent, mut order)) => {
                if parent.memory_size != memory_size || parent.page_size != page_size {
                    return Err(ImageError::Adopt(
                        "parent image has another memory or page size".into(),
                    ));
                }
                own.sort_unstable();
                own.dedup();
                if own.last().is_some_and(|&p| p >= pages) {
                    return Err(ImageError::Adopt("dirty page beyond the memory".into()));
                }
                order.retain(|&p| p < pages);
                let image = sys::memfd_create(&format!("fissile-image-{id}"), memory_size)
                    .map_err(ImageError::Memfd)?;
                sys::seal_size(&image).map_err(ImageError::Memfd)?;
                (
                    Source::Layered {
                        dirty: memfd,
                        own,
                        base: RwLock::new(Base::Parent(parent)),
                        order,
                    },
                    image,
                )
            }
        };
        Ok(Image {
            id: id.to_string(),
            memory_size,
            page_size,
            present: bitmap(pages),
            source,
            memfd,
            materialized: AtomicU64::new(0),
            durable: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            last_used: AtomicU64::new(0),
            touched_ms: AtomicU64::new(wall_ms()),
            instance: next_instance(),
            recording_claimed: AtomicBool::new(false),
            flat: AtomicBool::new(false),
        })
    }

    /// Snapshot id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Memory size in bytes.
    pub fn memory_size(&self) -> u64 {
        self.memory_size
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The store view, for images opened from the store.
    pub fn view(&self) -> Option<&Arc<SnapshotView>> {
        match &self.source {
            Source::Store { view, .. } => Some(view),
            _ => None,
        }
    }

    /// True when the snapshot is durable in the store.
    pub fn is_durable(&self) -> bool {
        self.durable.load(Ordering::Acquire)
    }

    /// Marks the snapshot durable (its background ingest finished).
    pub fn set_durable(&self) {
        self.durable.store(true, Ordering::Release);
    }

    /// Marks the snapshot durable and, for a layered image, rebases it on `store` (see the
    /// module docs): from now on it holds its parent's image only weakly. If its view cannot
    /// be loaded it stays on its parent (correct, only not freed) and the error is returned.
    pub fn set_durable_in(&self, store: &Arc<Store>) -> Result<(), ImageError> {
        self.set_durable();
        let Source::Layered { base, .. } = &self.source else {
            return Ok(());
        };
        let parent = match &*base
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Base::Parent(p) => p.clone(),
            Base::Store { .. } => return Ok(()),
        };
        let view = store.view(&self.id).map_err(ImageError::View)?;
        if view.memory_size() != self.memory_size || view.page_size() != self.page_size {
            return Err(ImageError::StoreMismatch(self.id.clone()));
        }
        *base
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Base::Store {
            view,
            store: store.clone(),
            parent: Arc::downgrade(&parent),
        };
        Ok(())
    }

    /// True when this image is layered on its parent's image (not yet rebased on the store).
    pub fn holds_parent(&self) -> bool {
        match &self.source {
            Source::Layered { base, .. } => matches!(
                *base
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Base::Parent(_)
            ),
            _ => false,
        }
    }

    /// Marks its background ingest failed (it is usable while in use, then dropped).
    pub fn set_failed(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Bytes of memory its memfds hold now (shmem blocks actually allocated).
    pub fn resident_bytes(&self) -> u64 {
        let blocks = |f: &File| f.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
        match &self.source {
            Source::Layered { dirty, .. } => blocks(&self.memfd) + blocks(dirty),
            _ => blocks(&self.memfd),
        }
    }

    /// True when every page is in the memfd (a full adopted image, or a flattened layered
    /// one): no faults to serve.
    pub fn is_complete(&self) -> bool {
        matches!(self.source, Source::Full) || self.flat.load(Ordering::Acquire)
    }

    /// For a layered image: the layered images below it down to a complete open one, the
    /// nearest first, and that one; `None` when the chain is not open (an image read from
    /// the store, or one evicted) or longer than [`MAX_CHAIN_WALK`].
    fn open_chain(&self) -> Option<(Vec<Arc<Image>>, Arc<Image>)> {
        let mut layers = Vec::new();
        let mut cur = self.parent_image()?;
        loop {
            if cur.memory_size != self.memory_size || cur.page_size != self.page_size {
                return None;
            }
            if cur.is_complete() {
                return Some((layers, cur));
            }
            if layers.len() >= MAX_CHAIN_WALK {
                return None;
            }
            let next = cur.parent_image()?;
            layers.push(cur);
            cur = next;
        }
    }

    /// How many layered images lie below this layered one, down to a complete open image
    /// (`None`: not layered, or the chain is not open).
    pub fn layers_below(&self) -> Option<u32> {
        if !matches!(self.source, Source::Layered { .. }) {
            return None;
        }
        self.open_chain()
            .map(|(layers, _)| u32::try_from(layers.len()).unwrap_or(u32::MAX))
    }

    /// Fills this layered image's memfd with every page it lacks, each from the topmost
    /// image of its chain that holds it (its own adopted pages, a layer's below, else the
    /// complete image at the bottom; zero pages stay holes), then counts it complete: a
    /// client maps it with no fault session, and layers over it chain from here. Pages a
    /// fault session wrote meanwhile are left alone (they hold the same bytes). Costs one
    /// copy of the memory's non-zero pages. Returns false, changing nothing a client sees,
    /// when the chain is not open.
    pub fn flatten(&self) -> Result<bool, MaterializeError> {
        if !matches!(self.source, Source::Layered { .. }) {
            return Ok(false);
        }
        if self.is_complete() {
            return Ok(true);
        }
        let Some((layers, base)) = self.open_chain() else {
            return Ok(false);
        };
        let ps = u64::from(self.page_size);
        let count = self.memory_size / ps;
        // The pages that may be non-zero: the base's data and every layer's own.
        let mut pages: Vec<u64> = Vec::new();
        let ranges = sys::data_ranges(&base.memfd, self.memory_size).map_err(|source| {
            MaterializeError::Parent {
                parent: base.id.clone(),
                page: 0,
                source,
            }
        })?;
        for (from, to) in ranges {
            pages.extend(from / ps..to.div_ceil(ps));
        }
        // This image and the layers below it, the topmost first.
        let chain: Vec<&Image> = std::iter::once(self)
            .chain(layers.iter().map(|l| &**l))
            .collect();
        for img in &chain {
            if let Source::Layered { own, .. } = &img.source {
                pages.extend_from_slice(own);
            }
        }
        pages.sort_unstable();
        pages.dedup();
        let mut buf = vec![0u8; ps as usize];
        for page in pages {
            if page >= count || bit(&self.present, page) {
                continue;
            }
            let (from, file) = chain
                .iter()
                .find_map(|&img| img.own_page(page).map(|f| (img, f)))
                .unwrap_or((&*base, &base.memfd));
            file.read_exact_at(&mut buf, page * ps)
                .map_err(|source| MaterializeError::Parent {
                    parent: from.id.clone(),
                    page,
                    source,
                })?;
            if buf.iter().any(|&b| b != 0) {
                self.write_page(page, &buf)?;
            }
        }
        self.flat.store(true, Ordering::Release);
        Ok(true)
    }

    /// The adopted memfd holding `page`, if this is a layered image that holds it itself.
    fn own_page(&self, page: u64) -> Option<&File> {
        match &self.source {
            Source::Layered { dirty, own, .. } if own.binary_search(&page).is_ok() => Some(dirty),
            _ => None,
        }
    }

    /// For a layered image whose other pages all come from open layered images (with it, at
    /// most `max_depth`) over a complete open image: how a client maps it without a fault
    /// session ([`LayerView`]). `None` for any other image.
    pub fn layer_view(&self, max_depth: u32) -> Option<LayerView<'_>> {
        let Source::Layered { dirty, own, .. } = &self.source else {
            return None;
        };
        let (layers, complete) = self.open_chain()?;
        // This layer and `below` layers under it.
        let below = u32::try_from(layers.len())
            .ok()
            .filter(|&b| b < max_depth)?;
        let parent = layers.first().unwrap_or(&complete);
        Some(LayerView {
            base: parent.id.clone(),
            below,
            pages: dirty,
            runs: page_runs(own),
        })
    }

    /// A layered image's parent image, while it is open.
    fn parent_image(&self) -> Option<Arc<Image>> {
        let Source::Layered { base, .. } = &self.source else {
            return None;
        };
        match &*base
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Base::Parent(p) => Some(p.clone()),
            Base::Store { parent, .. } => parent.upgrade(),
        }
    }

    /// True for adopted images (their memory lives only here until evicted).
    pub fn is_adopted(&self) -> bool {
        !matches!(self.source, Source::Store { .. })
    }

    /// A read-only descriptor of the image memfd for a client to map `MAP_PRIVATE`.
    pub fn client_fd(&self) -> io::Result<File> {
        sys::reopen_read_only(&self.memfd)
    }

    /// The memory to ingest into the store: the adopted memfd (for a layered image only
    /// its dirty pages are meaningful).
    pub fn ingest_source(&self) -> &File {
        match &self.source {
            Source::Layered { dirty, .. } => dirty,
            _ => &self.memfd,
        }
    }

    /// Pages written into the memfd by this daemon so far.
    pub fn materialized_pages(&self) -> u64 {
        self.materialized.load(Ordering::Relaxed)
    }

    fn mark_present(&self, page: u64) {
        let prev = self.present[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
        if prev & (1 << (page % 64)) == 0 {
            self.materialized.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes zeros for `page`, a zero page of the snapshot not yet in the memfd, so a client
    /// maps it without a fault (a prefetch; a fault on it is resolved with a zero page
    /// instead). Only for images read from the store, whose holes are all pages not yet
    /// materialized; elsewhere it does nothing.
    pub fn fill_zero_page(&self, page: u64, buf: &mut Vec<u8>) -> Result<(), MaterializeError> {
        let Source::Store { view, .. } = &self.source else {
            return Ok(());
        };
        if !matches!(view.page(page), Some(None)) || bit(&self.present, page) {
            return Ok(());
        }
        buf.clear();
        buf.resize(self.page_size as usize, 0);
        self.write_page(page, buf)
    }

    /// Makes `page` available in the memfd (or says it is a zero page), once.
    pub fn materialize(&self, page: u64, buf: &mut Vec<u8>) -> Result<PageState, MaterializeError> {
        if page >= self.memory_size / u64::from(self.page_size) {
            return Err(MaterializeError::OutOfRange {
                snapshot: self.id.clone(),
                page,
            });
        }
        match &self.source {
            // Every page with content is in the memfd already, so a fault should only ever
            // come for a hole; check rather than trust it (zeros installed over real data
            // would corrupt the guest).
            Source::Full => self.read_own(page, buf),
            Source::Store { view, store } => {
                match view.page(page) {
                    None => {
                        return Err(MaterializeError::OutOfRange {
                            snapshot: self.id.clone(),
                            page,
                        });
                    }
                    Some(None) => return Ok(PageState::Zero),
                    Some(Some(_)) => {}
                }
                if bit(&self.present, page) {
                    return Ok(PageState::Present);
                }
                store
                    .read_page(view, page, buf)
                    .map_err(MaterializeError::Read)?;
                self.write_page(page, buf)?;
                Ok(PageState::Present)
            }
            Source::Layered {
                dirty, own, base, ..
            } => {
                if bit(&self.present, page) {
                    return Ok(PageState::Present);
                }
                if own.binary_search(&page).is_ok() {
                    self.read_page_of(dirty, page, buf)?;
                    self.write_page(page, buf)?;
                    return Ok(PageState::Present);
                }
                let base = base
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let state = match base {
                    Base::Parent(parent) => parent.read_page(page, buf)?,
                    Base::Store {
                        view,
                        store,
                        parent,
                    } => match parent
                        .upgrade()
                        .map(|p| p.peek_page(page, buf))
                        .transpose()?
                    {
                        Some(Some(state)) => state,
                        _ => match view.page(page) {
                            None => {
                                return Err(MaterializeError::OutOfRange {
                                    snapshot: self.id.clone(),
                                    page,
                                });
                            }
                            Some(None) => PageState::Zero,
                            Some(Some(_)) => {
                                store
                                    .read_page(&view, page, buf)
                                    .map_err(MaterializeError::Read)?;
                                PageState::Present
                            }
                        },
                    },
                };
                if state == PageState::Present {
                    self.write_page(page, buf)?;
                }
                Ok(state)
            }
        }
    }

    /// The bytes of `page` in `buf` (`Present`), or `Zero` for a zero page.
    fn read_page(&self, page: u64, buf: &mut Vec<u8>) -> Result<PageState, MaterializeError> {
        match &self.source {
            Source::Full => self.read_own(page, buf),
            _ => match self.materialize(page, buf)? {
                PageState::Zero => Ok(PageState::Zero),
                PageState::Present => self.read_own(page, buf).map(|_| PageState::Present),
            },
        }
    }

    /// The bytes of `page` if this image has them without any work (a full image, or a page
    /// already materialized); `None` otherwise. Never writes into this image.
    fn peek_page(
        &self,
        page: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Option<PageState>, MaterializeError> {
        if page >= self.memory_size / u64::from(self.page_size) {
            return Ok(None);
        }
        match &self.source {
            Source::Full => self.read_own(page, buf).map(Some),
            _ if bit(&self.present, page) => {
                self.read_page_of(&self.memfd, page, buf)?;
                Ok(Some(PageState::Present))
            }
            _ => Ok(None),
        }
    }

    /// Reads `page` from this image's memfd: `Zero` when it is all zeros (a hole reads so).
    fn read_own(&self, page: u64, buf: &mut Vec<u8>) -> Result<PageState, MaterializeError> {
        self.read_page_of(&self.memfd, page, buf)?;
        if buf.iter().all(|&b| b == 0) {
            Ok(PageState::Zero)
        } else {
            Ok(PageState::Present)
        }
    }

    /// Reads `page` of this image's layout from `file` (its memfd or its adopted dirty pages).
    fn read_page_of(
        &self,
        file: &File,
        page: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), MaterializeError> {
        buf.resize(self.page_size as usize, 0);
        file.read_exact_at(buf, page * u64::from(self.page_size))
            .map_err(|source| MaterializeError::Parent {
                parent: self.id.clone(),
                page,
                source,
            })
    }

    fn write_page(&self, page: u64, data: &[u8]) -> Result<(), MaterializeError> {
        self.memfd
            .write_all_at(data, page * u64::from(self.page_size))
            .map_err(|source| MaterializeError::Write { page, source })?;
        self.mark_present(page);
        Ok(())
    }

    /// This object's number (see the field).
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// Pages in first-touch order: a store image's recorded one, an adopted layer's from its
    /// create; empty for a full adopted image (every page is in it).
    pub fn touch_order(&self) -> Vec<u64> {
        match &self.source {
            Source::Store { view, .. } => view.touch_order().collect(),
            Source::Layered { order, .. } => order.clone(),
            Source::Full => Vec::new(),
        }
    }

    /// Claims the recording of this snapshot's first-touch order for one fault session:
    /// true once per image object, only for an image read from the store whose snapshot has
    /// no order yet, and only while the image holds no page (so the pages its client touches
    /// come to the session as faults, in order, but for those another session brings in
    /// meanwhile).
    pub fn claim_touch_recording(&self) -> bool {
        match &self.source {
            Source::Store { view, .. }
                if view.manifest.touch_order.is_empty()
                    && self.materialized.load(Ordering::Acquire) == 0 =>
            {
                !self.recording_claimed.swap(true, Ordering::AcqRel)
            }
            _ => false,
        }
    }

    /// Gives the claim back (the session recorded nothing, or left the contents to a later
    /// one), so a later session may record or store them.
    pub fn release_touch_recording(&self) {
        self.recording_claimed.store(false, Ordering::Release);
    }

    /// Stores `pages` as the snapshot's first-touch order, unless it has one (see
    /// [`Store::record_touch_order`]); false for an image not read from the store.
    ///
    /// With `contents`, the contents of its first pages (at most [`touch_pages_storable`])
    /// are stored with it, read from this image: pages not in the memfd are brought in
    /// first, and a page that cannot be ends the contents there (the rest is prefetched page
    /// by page). Without, a later session stores them ([`Image::store_touch_pages`]).
    pub fn record_touch_order(
        &self,
        pages: &[u64],
        contents: bool,
    ) -> Result<bool, TouchOrderError> {
        let Source::Store { store, .. } = &self.source else {
            return Ok(false);
        };
        let contents = if contents {
            self.contents_of(pages)
        } else {
            Vec::new()
        };
        store.record_touch_order(&self.id, pages, &contents)
    }

    /// Claims the storing of the contents of this snapshot's first-touch pages for one fault
    /// session: true once per image object, only for an image read from the store whose
    /// snapshot has an order (given at its creation or inherited) and no contents.
    pub fn claim_touch_pages(&self) -> bool {
        match &self.source {
            Source::Store { view, .. }
                if !view.manifest.touch_order.is_empty() && view.touch_pages().is_none() =>
            {
                !self.recording_claimed.swap(true, Ordering::AcqRel)
            }
            _ => false,
        }
    }

    /// Stores the contents of the snapshot's first-touch pages (at most
    /// [`touch_pages_storable`]), read from this image, with its order (see
    /// [`Store::record_touch_pages`]), so the next restore prefetches them in pieces. Call
    /// it once its session prefetched the order: then every page is in the memfd already.
    pub fn store_touch_pages(&self) -> Result<bool, TouchOrderError> {
        let Source::Store { store, view } = &self.source else {
            return Ok(false);
        };
        let order: Vec<u64> = view.touch_order().collect();
        store.record_touch_pages(&self.id, &self.contents_of(&order))
    }

    /// The contents of the first of `pages` (at most [`touch_pages_storable`]), one after
    /// another, read from this image: pages not in the memfd are brought in first. Each page
    /// read is checked against its hash in the snapshot's page map; a page that cannot be
    /// brought in, or reads otherwise, ends the contents there.
    fn contents_of(&self, pages: &[u64]) -> Vec<u8> {
        let Source::Store { view, .. } = &self.source else {
            return Vec::new();
        };
        let ps = self.page_size as usize;
        let take = pages.len().min(touch_pages_storable(self.page_size));
        let mut contents = Vec::with_capacity(take * ps);
        let mut buf = Vec::new();
        for &page in &pages[..take] {
            let read = match self.materialize(page, &mut buf) {
                Ok(PageState::Present) => self.read_page_of(&self.memfd, page, &mut buf),
                Ok(PageState::Zero) => {
                    buf.clear();
                    buf.resize(ps, 0);
                    Ok(())
                }
                Err(e) => Err(e),
            };
            if let Err(e) = read {
                tracing::warn!(
                    snapshot = self.id, page, error = %crate::error_chain(&e),
                    "storing the first-touch pages' contents up to this page only"
                );
                break;
            }
            let fits = match view.page(page) {
                Some(Some(hash)) => blake3::hash(&buf).as_bytes() == hash,
                Some(None) => buf.iter().all(|&b| b == 0),
                None => false,
            };
            if !fits {
                tracing::error!(
                    snapshot = self.id,
                    page,
                    "a page in the image differs from the snapshot's; storing the first-touch \
                     pages' contents up to this page only"
                );
                break;
            }
            contents.extend_from_slice(&buf);
        }
        contents
    }

    /// The stored contents of this image's first pages in first-touch order, if any (only an
    /// image read from the store has them).
    pub fn touch_pages(&self) -> Option<TouchPages> {
        match &self.source {
            Source::Store { view, .. } => view.touch_pages(),
            _ => None,
        }
    }

    /// Brings in piece `index` of `stored` (this image's [`Image::touch_pages`]): `pages`
    /// are the order's pages from that piece's first on. Pages already in the memfd are
    /// left alone; the others, zero pages too, are written from the piece, so a client maps
    /// them without a fault. Returns how many pages of the piece are in the memfd now (all
    /// unless `stop` was set meanwhile, which stops it early).
    pub fn install_touch_pages(
        &self,
        stored: &TouchPages,
        index: usize,
        pages: &[u64],
        stop: &AtomicBool,
        buf: &mut Vec<u8>,
    ) -> Result<u64, MaterializeError> {
        let Source::Store { view, store } = &self.source else {
            return Ok(0);
        };
        store
            .read_touch_pages(view, stored, index, buf)
            .map_err(MaterializeError::Read)?;
        let ps = self.page_size as usize;
        let mut done = 0;
        for (page, data) in pages.iter().copied().zip(buf.chunks_exact(ps)) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if view.page(page).is_none() {
                return Err(MaterializeError::OutOfRange {
                    snapshot: self.id.clone(),
                    page,
                });
            }
            if !bit(&self.present, page) {
                self.write_page(page, data)?;
            }
            done += 1;
        }
        Ok(done)
    }
}

/// Every open image, by snapshot id, within a memory budget.
///
/// An image nobody uses (no fault session, no layered child image, not being ingested) can
/// be dropped: a durable one is read back from the store when needed again. Unused images
/// are kept, least recently used first out, while the images' memory stays within the
/// budget; one whose ingest failed is dropped as soon as it is unused (it can never be read
/// back). Clients that mapped an image keep their own reference to its pages.
#[derive(Debug)]
pub struct Images {
    map: Mutex<HashMap<String, Arc<Image>>>,
    /// Snapshots whose store delete runs ([`Images::delete_unused`]), outside `map`'s lock
    /// so opens of other snapshots go on while it waits for the store's writer lock; an
    /// open of one of them waits for its end. Changed with `map` held (taken after it).
    deleting: Mutex<HashSet<String>>,
    /// Notified as a delete ends.
    deleted: Condvar,
    budget: u64,
    clock: AtomicU64,
    /// [`OPEN_GRACE_MS`], or less in tests.
    grace_ms: u64,
}

impl Default for Images {
    fn default() -> Self {
        Self::new(DEFAULT_IMAGE_BUDGET)
    }
}

/// The mark of a delete of `id` running ([`Images::delete_unused`]): taken off, and the
/// opens waiting for it woken, when dropped (a delete that panicked too).
struct Deleting<'a> {
    images: &'a Images,
    id: &'a str,
}

impl Drop for Deleting<'_> {
    fn drop(&mut self) {
        self.images.lock_deleting().remove(self.id);
        self.images.deleted.notify_all();
    }
}

/// How many hold `img` besides the set (fault sessions, layered children, an ingest).
fn users_of(img: &Arc<Image>) -> usize {
    Arc::strong_count(img).saturating_sub(1)
}

/// Default memory budget for unused images kept hot.
pub const DEFAULT_IMAGE_BUDGET: u64 = 4 << 30;

impl Images {
    /// An empty set keeping at most `budget` bytes of unused images.
    pub fn new(budget: u64) -> Self {
        Self::with_grace(budget, OPEN_GRACE_MS)
    }

    /// [`Images::new`] keeping images handed out in the last `grace_ms` whatever the budget.
    pub fn with_grace(budget: u64, grace_ms: u64) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            deleting: Mutex::new(HashSet::new()),
            deleted: Condvar::new(),
            budget,
            clock: AtomicU64::new(1),
            grace_ms,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Image>>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_deleting(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.deleting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The set's lock, once no delete of `id` runs (waiting for one that does).
    fn lock_unless_deleting(
        &self,
        id: &str,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Image>>> {
        loop {
            let map = self.lock();
            if !self.lock_deleting().contains(id) {
                return map;
            }
            drop(map);
            let mut deleting = self.lock_deleting();
            while deleting.contains(id) {
                deleting = self
                    .deleted
                    .wait(deleting)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
    }

    fn touch(&self, img: &Image) {
        img.last_used.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        img.touched_ms.store(wall_ms(), Ordering::Relaxed);
    }

    /// The image of snapshot `id`, opened from the store on first use.
    pub fn get_or_open(&self, store: &Arc<Store>, id: &str) -> Result<Arc<Image>, ImageError> {
        let mut map = self.lock_unless_deleting(id);
        if let Some(img) = map.get(id) {
            self.touch(img);
            return Ok(img.clone());
        }
        let started = std::time::Instant::now();
        let img = Arc::new(Image::open(store.clone(), id)?);
        self.touch(&img);
        map.insert(id.to_string(), img.clone());
        tracing::info!(
            snapshot = id,
            bytes = img.memory_size,
            ms = started.elapsed().as_millis() as u64,
            "image opened"
        );
        Ok(img)
    }

    /// The image of `id` if it is open (and no delete of it runs).
    pub fn get(&self, id: &str) -> Option<Arc<Image>> {
        let map = self.lock();
        if self.lock_deleting().contains(id) {
            return None;
        }
        let img = map.get(id)?;
        self.touch(img);
        Some(img.clone())
    }

    /// Registers an adopted image.
    pub fn insert(&self, image: Arc<Image>) {
        self.touch(&image);
        self.lock().insert(image.id.clone(), image);
    }

    /// Forgets the image of `id` (clients keep their descriptors).
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Runs `delete` (the store's delete of snapshot `id`) unless its image is in use, then,
    /// if it succeeded, forgets the image. The check marks `id` as being deleted under the
    /// set's lock, and `delete` runs without it: opens of other snapshots go on meanwhile,
    /// and no open, fault session or layered create can take this image between the check
    /// and the delete (each waits for the delete's end and, once it is gone, finds the
    /// snapshot gone from the store too). `Err` carries the image's users when it is in
    /// use; `delete` did not run.
    pub fn delete_unused<T, E>(
        &self,
        id: &str,
        delete: impl FnOnce() -> Result<T, E>,
    ) -> Result<Result<T, E>, usize> {
        {
            // After any other delete of `id` has ended.
            let map = self.lock_unless_deleting(id);
            let users = map.get(id).map_or(0, users_of);
            if users > 0 {
                return Err(users);
            }
            self.lock_deleting().insert(id.to_string());
        }
        let marked = Deleting { images: self, id };
        let out = delete();
        let mut map = self.lock();
        if out.is_ok() {
            map.remove(id);
        }
        // With the set's lock held: an open that waited finds the image gone with the mark.
        drop(marked);
        drop(map);
        Ok(out)
    }

    /// How many users besides this set hold the image of `id` (fault sessions, layered
    /// children, an ingest in progress); 0 when it is not open.
    pub fn users(&self, id: &str) -> usize {
        self.lock().get(id).map_or(0, users_of)
    }

    /// Open images and the memory they hold.
    pub fn usage(&self) -> (usize, u64) {
        let map = self.lock();
        (map.len(), map.values().map(|i| i.resident_bytes()).sum())
    }

    /// Drops unused images whose ingest failed, then unused durable ones, least recently
    /// used first, until the images fit the budget. Returns the ids of dropped images whose
    /// ingest had failed (those snapshots are gone).
    pub fn trim(&self) -> Vec<String> {
        // Closing an image frees its memory, up to gigabytes: the images dropped here are
        // closed once the lock, which every open, adoption and restore takes, is released
        // (the caller may be a background thread at a low priority).
        let mut evicted = Vec::new();
        let failed = self.trim_into(&mut evicted);
        drop(evicted);
        failed
    }

    fn trim_into(&self, evicted: &mut Vec<Arc<Image>>) -> Vec<String> {
        let mut map = self.lock();
        let unused = |img: &Arc<Image>| users_of(img) == 0;
        let failed: Vec<String> = map
            .iter()
            .filter(|(_, img)| unused(img) && img.failed.load(Ordering::Acquire))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &failed {
            tracing::warn!(snapshot = %id, "dropping an unused image whose ingest failed");
            evicted.extend(map.remove(id));
        }
        let mut total: u64 = map.values().map(|i| i.resident_bytes()).sum();
        if total <= self.budget {
            return failed;
        }
        let now = wall_ms();
        let mut candidates: Vec<(u64, String, u64)> = map
            .iter()
            .filter(|(_, img)| {
                unused(img)
                    && img.is_durable()
                    && now.saturating_sub(img.touched_ms.load(Ordering::Relaxed)) >= self.grace_ms
            })
            .map(|(id, img)| {
                (
                    img.last_used.load(Ordering::Relaxed),
                    id.clone(),
                    img.resident_bytes(),
                )
            })
            .collect();
        candidates.sort_unstable();
        for (_, id, bytes) in candidates {
            if total <= self.budget {
                break;
            }
            tracing::info!(snapshot = %id, bytes, "evicting an unused image (LRU)");
            evicted.extend(map.remove(&id));
            total = total.saturating_sub(bytes);
        }
        failed
    }
}

/// How a layered image maps without a fault session ([`Image::layer_view`]).
#[derive(Debug)]
pub struct LayerView<'a> {
    /// Its parent's snapshot id.
    pub base: String,
    /// Layered images between the parent and the complete image (0: the parent is it).
    pub below: u32,
    /// The memfd holding its own pages at their offsets.
    pub pages: &'a File,
    /// Its own pages as ascending runs `(first, count)`.
    pub runs: Vec<(u64, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adopted(id: &str, pages: u64) -> Arc<Image> {
        let memfd = sys::memfd_create("t", pages * 4096).unwrap();
        for p in 0..pages {
            memfd.write_all_at(&[1u8; 4096], p * 4096).unwrap();
        }
        sys::add_seals(&memfd, sys::ADOPT_SEALS).unwrap();
        Arc::new(Image::adopt(id, memfd, pages * 4096, 4096, None).unwrap())
    }

    #[test]
    fn unused_durable_images_are_evicted_lru_first_within_the_budget() {
        let images = Images::with_grace(3 * 4096 * 16, 0);
        for id in ["a", "b", "c", "d"] {
            let img = adopted(id, 16);
            img.set_durable();
            images.insert(img);
        }
        let _b = images.get("b").unwrap(); // in use, and recently used
        let _ = images.get("a"); // recently used, unused

        let failed = images.trim();

        assert!(failed.is_empty());
        let (n, bytes) = images.usage();
        assert!(bytes <= 3 * 4096 * 16, "{bytes}");
        assert_eq!(n, 3);
        assert!(
            images.get("c").is_none(),
            "the least recently used went first"
        );
        assert!(images.get("b").is_some() && images.get("a").is_some());
    }

    fn create(store: &Store, id: &str, mem: &[u8], parent: Option<(&str, Vec<u64>)>) {
        let (parent, dirty_pages) = match parent {
            Some((p, d)) => (Some(p.to_string()), Some(d)),
            None => (None, None),
        };
        let req = crate::store::CreateRequest {
            memory: Box::new(mem),
            page_size: 4096,
            parent,
            dirty_pages,
            blobs: Default::default(),
            labels: Default::default(),
            touch_order: Vec::new(),
        };
        store.create_as(id, &req).unwrap();
    }

    /// While a delete waits (for the store's writer lock, here for a channel), an open of
    /// another snapshot goes on, and an open of the one being deleted waits for the delete
    /// and then finds it gone.
    #[test]
    fn opens_of_other_snapshots_go_on_while_a_delete_waits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mem = vec![7u8; 4 * 4096];
        create(&store, "gone", &mem, None);
        create(&store, "other", &mem, None);
        let images = Arc::new(Images::new(1 << 30));
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let deleter = {
            let (images, store) = (images.clone(), store.clone());
            std::thread::spawn(move || {
                images.delete_unused("gone", || {
                    wait.recv().unwrap();
                    store.delete("gone")
                })
            })
        };
        while !images.lock_deleting().contains("gone") {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let other = {
            let (images, store) = (images.clone(), store.clone());
            std::thread::spawn(move || images.get_or_open(&store, "other").map(|_| ()))
        };
        let t = std::time::Instant::now();
        while !other.is_finished() && t.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(
            other.is_finished(),
            "an open of another snapshot waited for the delete"
        );
        other
            .join()
            .unwrap()
            .expect("another snapshot opens meanwhile");
        let opener = {
            let (images, store) = (images.clone(), store.clone());
            std::thread::spawn(move || images.get_or_open(&store, "gone").map(|_| ()))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!opener.is_finished(), "an open of it waits for the delete");
        go.send(()).unwrap();
        deleter.join().unwrap().expect("unused").expect("deleted");
        assert!(
            matches!(
                opener.join().unwrap(),
                Err(ImageError::View(ViewError::NotFound(_)))
            ),
            "found gone"
        );
        assert!(images.lock_deleting().is_empty());
    }

    #[test]
    fn a_durable_layer_lets_go_of_its_parent_and_never_writes_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let pages = 8u64;
        // Parent snapshot: page p filled with byte p+1, page 7 zero.
        let mut mem = vec![0u8; (pages * 4096) as usize];
        for p in 0..7 {
            mem[(p * 4096) as usize..((p + 1) * 4096) as usize].fill(p as u8 + 1);
        }
        create(&store, "parent", &mem, None);
        let images = Images::new(1 << 30);
        let parent = images.get_or_open(&store, "parent").unwrap();

        // The child changed page 1 only.
        let dirty = sys::memfd_create("dirty", pages * 4096).unwrap();
        dirty.write_all_at(&[0xaa; 4096], 4096).unwrap();
        sys::add_seals(&dirty, sys::ADOPT_SEALS).unwrap();
        let child = Arc::new(
            Image::adopt(
                "child",
                dirty,
                pages * 4096,
                4096,
                Some((vec![1], parent.clone(), vec![2, 0, 1, pages])),
            )
            .unwrap(),
        );
        // The order its create gave, in order, without the page past the memory.
        assert_eq!(child.touch_order(), vec![2, 0, 1]);
        let mut buf = Vec::new();
        // Before it is durable a fault goes through the parent's image (and fills it).
        assert_eq!(child.materialize(0, &mut buf).unwrap(), PageState::Present);
        assert_eq!(parent.materialized_pages(), 1);
        assert!(child.holds_parent());

        let mut child_mem = mem.clone();
        child_mem[4096..8192].fill(0xaa);
        create(&store, "child", &child_mem, Some(("parent", vec![1])));
        child.set_durable_in(&store).unwrap();

        assert!(!child.holds_parent());
        drop(parent);
        assert_eq!(
            images.users("parent"),
            0,
            "the child no longer pins its parent"
        );
        let parent = images.get("parent").unwrap();
        // Page 0 is in the parent's memfd: copied from there. Page 2 is not: read from the
        // store, without filling the parent on the way. Page 1 is the child's own, 7 a zero.
        for (page, want) in [(0u64, 1u8), (1, 0xaa), (2, 3), (5, 6)] {
            assert_eq!(
                child.materialize(page, &mut buf).unwrap(),
                PageState::Present
            );
            let mut got = vec![0u8; 4096];
            child.memfd.read_exact_at(&mut got, page * 4096).unwrap();
            assert!(got.iter().all(|&b| b == want), "page {page}");
        }
        assert_eq!(child.materialize(7, &mut buf).unwrap(), PageState::Zero);
        assert_eq!(
            parent.materialized_pages(),
            1,
            "nothing written into the parent"
        );

        // With the parent's image gone entirely, pages still come from the store.
        drop(parent);
        images.remove("parent");
        assert_eq!(child.materialize(6, &mut buf).unwrap(), PageState::Present);
        let mut got = vec![0u8; 4096];
        child.memfd.read_exact_at(&mut got, 6 * 4096).unwrap();
        assert!(got.iter().all(|&b| b == 7));
    }

    #[test]
    fn an_image_handed_out_within_the_grace_period_is_not_evicted() {
        let images = Images::with_grace(0, 60_000);
        let img = adopted("fresh", 4);
        img.set_durable();
        images.insert(img);
        assert!(images.trim().is_empty());
        assert!(
            images.get("fresh").is_some(),
            "evicted within its grace period"
        );
        let later = Images::with_grace(0, 0);
        let img = adopted("old", 4);
        img.set_durable();
        later.insert(img);
        later.trim();
        assert!(
            later.get("old").is_none(),
            "kept past its grace period, over budget"
        );
    }

    #[test]
    fn a_delete_is_atomic_with_opens_and_refused_while_in_use() {
        let images = Arc::new(Images::with_grace(0, 0));
        let img = adopted("snap", 4);
        img.set_durable();
        images.insert(img.clone());
        assert_eq!(
            images.delete_unused("snap", || Ok::<(), ()>(())),
            Err(1),
            "in use"
        );
        assert!(
            images.get("snap").is_some(),
            "a refused delete keeps the image"
        );
        drop(img);
        // An open that starts while the delete runs waits for it and finds nothing.
        let opened = images.delete_unused("snap", || {
            let other = images.clone();
            let open = std::thread::spawn(move || other.get("snap").is_some());
            std::thread::sleep(std::time::Duration::from_millis(50));
            Ok::<_, ()>(open)
        });
        let open = opened.expect("unused").expect("deleted");
        assert!(
            !open.join().unwrap(),
            "no open between the check and the delete"
        );
        assert!(images.get("snap").is_none());
    }

    #[test]
    fn in_use_pending_and_failed_images_follow_their_rules() {
        let images = Images::with_grace(0, 0);
        let pending = adopted("pending", 4);
        images.insert(pending.clone());
        drop(pending);
        let failed = adopted("failed", 4);
        failed.set_failed();
        images.insert(failed);
        let used = adopted("used", 4);
        used.set_durable();
        images.insert(used.clone());

        let dropped = images.trim();

        assert_eq!(dropped, vec!["failed".to_string()]);
        assert!(images.get("pending").is_some(), "not durable yet: kept");
        assert_eq!(images.users("used"), 1);
        assert!(images.get("used").is_some(), "in use: kept");
    }
}
