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
//! A fault only ever reaches us for a page that is not in the image memfd yet (MISSING mode
//! on a private mapping fires for holes only), so "present" pages are resolved by a wake.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::store::{ReadError, SnapshotView, Store, ViewError};
use crate::sys;

/// What a page turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// A zero page: never written to the memfd, resolve with `UFFDIO_ZEROPAGE`.
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
    /// Adopted memfd `dirty` holding the pages in `own`; the others come from `parent`.
    Layered {
        dirty: File,
        own: Vec<u64>,
        parent: Arc<Image>,
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
        })
    }

    /// Adopts `memfd` as the image of snapshot `id`. `layer`: the dirty pages it holds and
    /// the parent image the other pages come from; `None`: it holds every page.
    pub fn adopt(
        id: &str,
        memfd: File,
        memory_size: u64,
        page_size: u32,
        layer: Option<(Vec<u64>, Arc<Image>)>,
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
            Some((mut own, parent)) => {
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
                let image = sys::memfd_create(&format!("fissile-image-{id}"), memory_size)
                    .map_err(ImageError::Memfd)?;
                sys::seal_size(&image).map_err(ImageError::Memfd)?;
                (
                    Source::Layered {
                        dirty: memfd,
                        own,
                        parent,
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

    /// True when every page is in the memfd (a full adopted image): no faults to serve.
    pub fn is_complete(&self) -> bool {
        matches!(self.source, Source::Full)
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
            Source::Layered { dirty, own, parent } => {
                if bit(&self.present, page) {
                    return Ok(PageState::Present);
                }
                if own.binary_search(&page).is_ok() {
                    self.read_page_of(dirty, page, buf)?;
                    self.write_page(page, buf)?;
                    return Ok(PageState::Present);
                }
                match parent.read_page(page, buf)? {
                    PageState::Zero => Ok(PageState::Zero),
                    PageState::Present => {
                        self.write_page(page, buf)?;
                        Ok(PageState::Present)
                    }
                }
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

    /// Pages in first-touch order (store images with a recorded order; empty otherwise).
    pub fn touch_order(&self) -> Vec<u64> {
        match &self.source {
            Source::Store { view, .. } => view.touch_order().collect(),
            _ => Vec::new(),
        }
    }
}

/// Every open image, by snapshot id.
#[derive(Debug, Default)]
pub struct Images {
    map: Mutex<HashMap<String, Arc<Image>>>,
}

impl Images {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Image>>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The image of snapshot `id`, opened from the store on first use.
    pub fn get_or_open(&self, store: &Arc<Store>, id: &str) -> Result<Arc<Image>, ImageError> {
        let mut map = self.lock();
        if let Some(img) = map.get(id) {
            return Ok(img.clone());
        }
        Self::evict_unused(&mut map);
        let img = Arc::new(Image::open(store.clone(), id)?);
        map.insert(id.to_string(), img.clone());
        tracing::info!(snapshot = id, bytes = img.memory_size, "image opened");
        Ok(img)
    }

    /// The image of `id` if it is open.
    pub fn get(&self, id: &str) -> Option<Arc<Image>> {
        self.lock().get(id).cloned()
    }

    /// Registers an adopted image.
    pub fn insert(&self, image: Arc<Image>) {
        let mut map = self.lock();
        Self::evict_unused(&mut map);
        map.insert(image.id.clone(), image);
    }

    /// Forgets the image of `id` (clients keep their descriptors).
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Drops durable adopted images nobody uses any more (no session, no child image): their
    /// memory can be read back from the store. Clients still mapping them keep their pages.
    fn evict_unused(map: &mut HashMap<String, Arc<Image>>) {
        loop {
            let unused: Vec<String> = map
                .iter()
                .filter(|(_, img)| {
                    img.is_adopted() && img.is_durable() && Arc::strong_count(img) == 1
                })
                .map(|(id, _)| id.clone())
                .collect();
            if unused.is_empty() {
                return;
            }
            for id in unused {
                tracing::info!(snapshot = %id, "evicting unused adopted image");
                map.remove(&id);
            }
        }
    }
}
