//! Lazily materialized base images: one sparse memfd per snapshot, shared by every client.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
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
}

/// Errors materializing one page.
#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    /// The page could not be read from the store.
    #[error("reading page")]
    Read(#[source] ReadError),
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

/// One snapshot's shared image.
#[derive(Debug)]
pub struct Image {
    view: Arc<SnapshotView>,
    store: Arc<Store>,
    memfd: File,
    present: Vec<AtomicU64>,
    materialized: AtomicU64,
}

impl Image {
    fn open(store: Arc<Store>, id: &str) -> Result<Image, ImageError> {
        let view = store.view(id).map_err(ImageError::View)?;
        let memfd = sys::memfd_create(&format!("fissile-image-{id}"), view.memory_size())
            .map_err(ImageError::Memfd)?;
        sys::seal_size(&memfd).map_err(ImageError::Memfd)?;
        let words = view.page_count().div_ceil(64) as usize;
        Ok(Image {
            present: (0..words).map(|_| AtomicU64::new(0)).collect(),
            view,
            store,
            memfd,
            materialized: AtomicU64::new(0),
        })
    }

    /// The snapshot.
    pub fn view(&self) -> &Arc<SnapshotView> {
        &self.view
    }

    /// A read-only descriptor of the image memfd for a client to map `MAP_PRIVATE`.
    pub fn client_fd(&self) -> io::Result<File> {
        sys::reopen_read_only(&self.memfd)
    }

    /// Pages written into the memfd so far.
    pub fn materialized_pages(&self) -> u64 {
        self.materialized.load(Ordering::Relaxed)
    }

    fn is_present(&self, page: u64) -> bool {
        let w = &self.present[(page / 64) as usize];
        w.load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Makes `page` available: a zero page is reported as such; any other page is read from
    /// the store (verified) and written into the shared memfd, once.
    pub fn materialize(&self, page: u64, buf: &mut Vec<u8>) -> Result<PageState, MaterializeError> {
        match self.view.page(page) {
            None => {
                return Err(MaterializeError::Read(ReadError::OutOfRange {
                    snapshot: self.view.id().to_string(),
                    page,
                }));
            }
            Some(None) => return Ok(PageState::Zero),
            Some(Some(_)) => {}
        }
        if self.is_present(page) {
            return Ok(PageState::Present);
        }
        self.store
            .read_page(&self.view, page, buf)
            .map_err(MaterializeError::Read)?;
        let off = page * u64::from(self.view.page_size());
        self.memfd
            .write_all_at(buf, off)
            .map_err(|source| MaterializeError::Write { page, source })?;
        let prev = self.present[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
        if prev & (1 << (page % 64)) == 0 {
            self.materialized.fetch_add(1, Ordering::Relaxed);
        }
        Ok(PageState::Present)
    }
}

/// Every open image, by snapshot id.
#[derive(Debug, Default)]
pub struct Images {
    map: Mutex<HashMap<String, Arc<Image>>>,
}

impl Images {
    /// The image of snapshot `id`, opened on first use.
    pub fn get_or_open(&self, store: &Arc<Store>, id: &str) -> Result<Arc<Image>, ImageError> {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(img) = map.get(id) {
            return Ok(img.clone());
        }
        let img = Arc::new(Image::open(store.clone(), id)?);
        map.insert(id.to_string(), img.clone());
        tracing::info!(
            snapshot = id,
            bytes = img.view.memory_size(),
            "image opened"
        );
        Ok(img)
    }

    /// Forgets the image of `id` (clients keep their descriptors).
    pub fn remove(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }
}
