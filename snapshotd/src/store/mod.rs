//! The content-addressed page store (a library; the daemon in [`crate::server`] serves it).
//!
//! # Layout of a store root
//! ```text
//! ROOT/index/            rocksdb; column families:
//!     chunks     blake3 hash (32 bytes) -> ChunkEntry (pack, offset, stored_len, raw_len)
//!     manifests  snapshot id            -> encoded Manifest (see [`manifest`])
//!     children   parent id \0 child id  -> ""   (a snapshot with children cannot be deleted)
//!     meta       "format", "pack.active", "pack.committed", "pack.dead" (pack -> dead bytes)
//! ROOT/packs/NNNNNNNN.pack   append-only pack files (see [`pack`])
//! ```
//!
//! # Durability
//! `create`: append every new chunk to the active pack, `fdatasync` it, then one rocksdb
//! `WriteBatch` with `sync = true` holding the new chunks' entries, the manifest and the new
//! committed length of the active pack; only then is the id returned.
//! After a crash, bytes past `pack.committed` (and pack files numbered after the active one)
//! were never acknowledged: [`Store::open`] truncates/removes them.
//!
//! # Liveness
//! A chunk is live while a manifest references it (a layered manifest references only its
//! own pages and pins its parent: a snapshot with children cannot be deleted). Nothing
//! counts references: a create writes index entries for the chunks it appended and nothing
//! for the ones it found stored, so storing pages again costs their hashing and lookup
//! only. [`Store::delete`] drops the manifest; [`Store::sweep`] (mark and sweep: it marks
//! over a point-in-time view of the index without the writer lock, and marks the manifests
//! committed meanwhile too) then drops the entries no manifest references and adds their
//! bytes to their pack's dead count (`meta` "pack.dead", in the same batch), and
//! [`Store::compact`] (which sweeps first after a delete or an open) rewrites the packs
//! whose dead share passed a [`CompactPolicy`] (the daemon runs it in the background, a
//! pack at a time), [`Store::gc`] every pack with dead bytes (offline, and it measures the
//! dead bytes from the index again). An entry a delete left unreferenced may be found by a
//! create before the sweep: the create's manifest references it, and it stays. A format 1
//! store (reference counts in the entries) is read as it is, and its first write records
//! format 2, which an older binary refuses: the entries carry no counts for it to trust.
//!
//! # Reads
//! Every chunk read is verified against its blake3 hash; a mismatch is a [`ReadError`]
//! naming the snapshot and page, never wrong bytes.

pub mod manifest;
pub mod pack;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};

use self::manifest::{BLOB_CHUNK_LEN, BlobRef, INLINE_BLOB_MAX, Manifest, ManifestError, Run};
use self::pack::{Hash, Location, PACK_HEADER_LEN, PackWriter, RecordError};

/// Default page size.
pub const DEFAULT_PAGE_SIZE: u32 = 4096;
/// Longest parent chain; a create beyond it writes a flattened (full) manifest instead.
pub const MAX_CHAIN_DEPTH: u32 = 16;
/// A pack is sealed and a new one started once it grows past this.
pub const PACK_TARGET_LEN: u64 = 1 << 30;
/// Store format version recorded in `meta`.
pub const STORE_FORMAT_VERSION: u32 = 2;
/// The earlier format, which kept a reference count in each chunk entry: read as it is (the
/// counts never), and recorded as [`STORE_FORMAT_VERSION`] by its first write.
const STORE_FORMAT_COUNTED: u32 = 1;
/// The index's block cache, one for every column family (index and filter blocks included).
pub const INDEX_CACHE_BYTES: usize = 64 << 20;
/// What the index's memtables may hold, all column families together, before RocksDB
/// flushes them (a soft limit: memtables being flushed come on top). With
/// [`INDEX_CACHE_BYTES`] this keeps RocksDB's memory near 128 MiB; by default each column
/// family had its own 32 MiB cache, index and filter blocks outside any cache, and up to two
/// 64 MiB memtables (some 650 MiB for our four).
pub const INDEX_MEMTABLE_BYTES: usize = 64 << 20;
/// The blob holding the contents of a snapshot's first pages in first-touch order
/// ([`Store::record_touch_order`]). Blob names starting `snapshotd/` are the store's own: a
/// create naming one is refused.
pub const TOUCH_PAGES_BLOB: &str = "snapshotd/first-touch-pages";
/// Prefix of the blob names the store keeps for itself.
pub const STORE_BLOB_PREFIX: &str = "snapshotd/";
/// The most bytes of first-touch pages stored with an order (16,384 pages of 4 KiB); a
/// restore prefetches any further pages one by one.
pub const MAX_TOUCH_BYTES_STORED: usize = 64 << 20;

/// How many pages of `page_size` bytes of an order's first pages can have their contents
/// stored with it: none where a page does not divide the pieces ([`BLOB_CHUNK_LEN`]).
pub fn touch_pages_storable(page_size: u32) -> usize {
    let ps = page_size as usize;
    if ps == 0 || !BLOB_CHUNK_LEN.is_multiple_of(ps) {
        return 0;
    }
    MAX_TOUCH_BYTES_STORED / ps
}
const CF_CHUNKS: &str = "chunks";
const CF_MANIFESTS: &str = "manifests";
const CF_CHILDREN: &str = "children";
const CF_META: &str = "meta";
const META_FORMAT: &[u8] = b"format";
const META_ACTIVE: &[u8] = b"pack.active";
const META_COMMITTED: &[u8] = b"pack.committed";
const META_DEAD: &[u8] = b"pack.dead";
/// Bytes of a chunk key (a blake3 hash) that pick its bucket in the chunk index's memtable.
const CHUNK_KEY_PREFIX: usize = 8;
/// Most buckets of a chunk index memtable: about one per entry a full memtable of the
/// default size holds (a quarter of [`INDEX_MEMTABLE_BYTES`], some 100 bytes an entry), 2 MiB
/// of pointers, allocated in the memtable's arena when it starts.
const CHUNK_MEMTABLE_BUCKETS_MAX: usize = 1 << 18;

/// Buckets of a chunk index memtable of `memtable_bytes` (about one per entry it holds, a
/// power of two from 1024 to [`CHUNK_MEMTABLE_BUCKETS_MAX`]): small memtables do not start
/// mostly filled by their bucket array.
fn chunk_memtable_buckets(memtable_bytes: usize) -> usize {
    (memtable_bytes / 100)
        .next_power_of_two()
        .clamp(1024, CHUNK_MEMTABLE_BUCKETS_MAX)
}
/// Pages read and hashed per batch during ingest.
const INGEST_BATCH_PAGES: usize = 256;

/// Index value for one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Where the chunk is.
    pub location: Location,
}

impl ChunkEntry {
    /// Bytes of an entry: the location, then 8 bytes where format 1 kept a reference count
    /// (written as zeros, never read).
    const LEN: usize = 28;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.location.pack.to_le_bytes());
        b[4..12].copy_from_slice(&self.location.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.location.stored_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.location.raw_len.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<ChunkEntry> {
        if b.len() != Self::LEN {
            return None;
        }
        Some(ChunkEntry {
            location: Location {
                pack: u32::from_le_bytes(b[0..4].try_into().ok()?),
                offset: u64::from_le_bytes(b[4..12].try_into().ok()?),
                stored_len: u32::from_le_bytes(b[12..16].try_into().ok()?),
                raw_len: u32::from_le_bytes(b[16..20].try_into().ok()?),
            },
        })
    }
}

/// Errors opening a store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Creating the directory layout failed.
    #[error("creating store directory {0}")]
    CreateDir(PathBuf, #[source] io::Error),
    /// rocksdb refused to open.
    #[error("opening the index")]
    Index(#[source] rocksdb::Error),
    /// The index is from another store format.
    #[error("store format {0} is not supported")]
    Format(u32),
    /// The meta family holds garbage.
    #[error("index metadata is corrupt: {0}")]
    Meta(&'static str),
    /// Recovering the active pack failed.
    #[error("recovering pack files")]
    Packs(#[source] io::Error),
    /// Measuring the packs' dead bytes (a store from before they were recorded) failed.
    #[error("measuring dead bytes in packs")]
    Measure(#[source] GcError),
}

/// Errors creating a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// Bad request (sizes, page list).
    #[error("invalid create request: {0}")]
    Invalid(String),
    /// The parent could not be loaded.
    #[error("loading parent snapshot")]
    Parent(#[source] Box<ViewError>),
    /// Reading the source memory failed.
    #[error("reading source memory")]
    Source(#[source] io::Error),
    /// Index read or write failed.
    #[error("index")]
    Index(#[source] rocksdb::Error),
    /// Pack append or sync failed.
    #[error("writing pack")]
    Pack(#[source] io::Error),
    /// The manifest could not be encoded.
    #[error("encoding manifest")]
    Manifest(#[source] ManifestError),
    /// The index holds a corrupt chunk entry.
    #[error("index entry for a chunk is corrupt")]
    CorruptEntry,
    /// An ingest worker thread panicked.
    #[error("an ingest worker thread failed")]
    Worker,
}

/// Errors loading a snapshot's resolved view.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// No such snapshot.
    #[error("snapshot {0} not found")]
    NotFound(String),
    /// Index read failed.
    #[error("index")]
    Index(#[source] rocksdb::Error),
    /// The stored manifest is corrupt.
    #[error("manifest of snapshot {0} is corrupt")]
    Corrupt(String, #[source] ManifestError),
    /// The parent chain is inconsistent.
    #[error("parent chain of snapshot {0} is inconsistent")]
    Chain(String),
}

/// Errors reading a page or blob.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Page index beyond the snapshot's memory.
    #[error("page {page} is out of range for snapshot {snapshot}")]
    OutOfRange {
        /// Snapshot id.
        snapshot: String,
        /// Page index.
        page: u64,
    },
    /// The index has no entry for a referenced chunk.
    #[error("snapshot {snapshot} page {page}: chunk missing from the index")]
    MissingChunk {
        /// Snapshot id.
        snapshot: String,
        /// Page index (or blob chunk index).
        page: u64,
    },
    /// The chunk failed verification.
    #[error("snapshot {snapshot} page {page}: stored data is corrupt")]
    Corrupt {
        /// Snapshot id.
        snapshot: String,
        /// Page index (or blob chunk index).
        page: u64,
        /// What failed.
        #[source]
        source: RecordError,
    },
    /// Opening a pack file failed.
    #[error("snapshot {snapshot} page {page}: opening pack")]
    Pack {
        /// Snapshot id.
        snapshot: String,
        /// Page index.
        page: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Index read failed.
    #[error("index")]
    Index(#[source] rocksdb::Error),
    /// No blob of that name.
    #[error("snapshot {snapshot} has no blob {name}")]
    NoBlob {
        /// Snapshot id.
        snapshot: String,
        /// Blob name.
        name: String,
    },
    /// The snapshot could not be loaded.
    #[error("loading snapshot")]
    View(#[source] ViewError),
}

/// Errors deleting a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// Loading the snapshot failed.
    #[error("loading snapshot")]
    View(#[source] ViewError),
    /// Other snapshots are layered on it.
    #[error("snapshot {0} has children; delete them first")]
    HasChildren(String),
    /// Index read or write failed.
    #[error("index")]
    Index(#[source] rocksdb::Error),
}

/// Errors recording a snapshot's first-touch order ([`Store::record_touch_order`]).
#[derive(Debug, thiserror::Error)]
pub enum TouchOrderError {
    /// Loading the snapshot failed.
    #[error("loading snapshot")]
    View(#[source] ViewError),
    /// A page is beyond the snapshot's memory.
    #[error("page {page} is beyond the snapshot's {pages} pages")]
    OutOfRange {
        /// The page.
        page: u64,
        /// The snapshot's page count.
        pages: u64,
    },
    /// The manifest with the order does not validate.
    #[error("validating the manifest with the order")]
    Invalid(#[source] ManifestError),
    /// The manifest could not be encoded.
    #[error("encoding the manifest")]
    Encode(#[source] ManifestError),
    /// The pages' contents given do not fit the order.
    #[error("{bytes} bytes of page contents for an order of {pages} pages")]
    Contents {
        /// Bytes given.
        bytes: usize,
        /// Pages in the order.
        pages: usize,
    },
    /// Storing the pages' contents failed.
    #[error("storing the pages' contents")]
    Ingest(#[source] Box<CreateError>),
    /// Syncing the pack failed.
    #[error("syncing the pack")]
    Pack(#[source] io::Error),
    /// Index write failed.
    #[error("reading or writing the index")]
    Index(#[source] rocksdb::Error),
}

/// Errors during garbage collection.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// Index read or write failed.
    #[error("index")]
    Index(#[source] rocksdb::Error),
    /// Pack read, write or removal failed.
    #[error("pack files")]
    Pack(#[source] io::Error),
    /// A live chunk could not be read intact while moving it.
    #[error("live chunk could not be moved")]
    Record(#[source] RecordError),
    /// The index holds a corrupt chunk entry.
    #[error("index entry for a chunk is corrupt")]
    CorruptEntry,
    /// A manifest does not decode: a sweep cannot tell what it references, and drops nothing.
    #[error("manifest of snapshot {0} is corrupt; nothing swept")]
    CorruptManifest(String, #[source] ManifestError),
    /// A manifest written during a sweep's mark could not be read; nothing swept.
    #[error("reading a manifest written during the sweep; nothing swept")]
    Manifest(#[source] ViewError),
    /// A pack holds bytes that are not records before its end; it is left as it is.
    #[error("pack {pack} has unreadable bytes at offset {offset}; left as it is")]
    Unreadable {
        /// Pack number.
        pack: u32,
        /// Where its records stop.
        offset: u64,
    },
    /// A live record does not verify; its pack is left as it is (never laundered).
    #[error("live chunk at pack {pack} offset {offset} does not verify; pack left as it is")]
    CorruptLive {
        /// Pack number.
        pack: u32,
        /// Record offset.
        offset: u64,
    },
}

/// When [`Store::compact`] rewrites packs: a pack qualifies once `pack_dead_percent` of its
/// bytes are dead, and a compaction runs once the qualifying packs together hold
/// `min_reclaim_bytes` dead bytes (so a pack is never rewritten for a few dead records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactPolicy {
    /// Share of a pack's bytes (percent, 1-100) that must be dead for it to be rewritten.
    pub pack_dead_percent: u8,
    /// Dead bytes the qualifying packs must hold together before anything is rewritten.
    pub min_reclaim_bytes: u64,
}

impl Default for CompactPolicy {
    fn default() -> Self {
        CompactPolicy {
            pack_dead_percent: 25,
            min_reclaim_bytes: 64 << 20,
        }
    }
}

/// Errors running the consistency check itself (problems found are in the report).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Index read failed.
    #[error("index")]
    Index(#[source] rocksdb::Error),
    /// Listing or reading pack files failed.
    #[error("pack files")]
    Pack(#[source] io::Error),
}

/// What to snapshot.
#[derive(Debug)]
pub struct CreateRequest<'a> {
    /// Guest memory, `memory_size` bytes, read page by page.
    pub memory: Box<dyn PageSource + 'a>,
    /// Page size (a power of two, 4 KiB..2 MiB).
    pub page_size: u32,
    /// Layer on this snapshot.
    pub parent: Option<String>,
    /// With a parent: only these pages may differ from it (`None`: compare every page).
    pub dirty_pages: Option<Vec<u64>>,
    /// Named VM-state blobs.
    pub blobs: BTreeMap<String, Vec<u8>>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Pages in first-touch order, for prefetch after restore.
    pub touch_order: Vec<u64>,
}

/// A source of guest memory bytes.
pub trait PageSource: std::fmt::Debug + Sync {
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `buf.len()` bytes at `offset` into `buf`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl PageSource for &[u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let src = self
            .get(start..start + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl PageSource for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        PageSource::read_at(&self.as_slice(), offset, buf)
    }
}

/// A file (e.g. a memfd handed over by a VMM) of a given length, read with `pread`.
#[derive(Debug)]
pub struct FileSource {
    /// The file.
    pub file: File,
    /// Bytes to snapshot.
    pub len: u64,
}

impl PageSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// The stored contents of a snapshot's first pages in first-touch order
/// ([`SnapshotView::touch_pages`]), in pieces of [`TouchPages::per_piece`] pages.
#[derive(Debug, Clone)]
pub struct TouchPages {
    blob: BlobRef,
    pages: usize,
    per_piece: usize,
}

impl TouchPages {
    /// Pages stored: the first this many of the order.
    pub fn pages(&self) -> usize {
        self.pages
    }
    /// Pieces to read ([`Store::read_touch_pages`]).
    pub fn pieces(&self) -> usize {
        self.pages.div_ceil(self.per_piece)
    }
    /// Pages in piece `index`: the order's pages from `index * per_piece()` on.
    pub fn piece_pages(&self, index: usize) -> usize {
        self.pages
            .saturating_sub(index * self.per_piece)
            .min(self.per_piece)
    }
    /// Pages in each piece but the last.
    pub fn per_piece(&self) -> usize {
        self.per_piece
    }
}

/// A snapshot with its parent chain resolved into one page map.
#[derive(Debug)]
pub struct SnapshotView {
    /// The snapshot's own manifest.
    pub manifest: Manifest,
    pages: Vec<Option<Hash>>,
}

impl SnapshotView {
    /// Snapshot id.
    pub fn id(&self) -> &str {
        &self.manifest.id
    }
    /// Memory size in bytes.
    pub fn memory_size(&self) -> u64 {
        self.manifest.memory_size
    }
    /// Page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.manifest.page_size
    }
    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        self.pages.len() as u64
    }
    /// Content hash of `page` (`None` for a zero page), or `None` out of range.
    pub fn page(&self, page: u64) -> Option<Option<&Hash>> {
        self.pages
            .get(usize::try_from(page).ok()?)
            .map(Option::as_ref)
    }
    /// Pages in recorded first-touch order.
    pub fn touch_order(&self) -> impl Iterator<Item = u64> + '_ {
        self.manifest
            .touch_order
            .iter()
            .flat_map(|(s, c)| *s..s.saturating_add(*c))
    }
    /// The stored contents of the first pages of the first-touch order, if any
    /// ([`Store::record_touch_order`]). `None` too for a blob that does not fit the order
    /// (a manifest is untrusted input): a restore then prefetches page by page.
    pub fn touch_pages(&self) -> Option<TouchPages> {
        let blob = self.manifest.blobs.get(TOUCH_PAGES_BLOB)?;
        let ps = self.page_size() as usize;
        let len = match blob {
            BlobRef::Inline(data) => data.len(),
            BlobRef::Chunks { len, .. } => usize::try_from(*len).ok()?,
        };
        let order = self.manifest.touch_order_len();
        let pages = len / ps;
        if len == 0
            || !len.is_multiple_of(ps)
            || pages > touch_pages_storable(self.page_size())
            || pages as u64 > order
        {
            return None;
        }
        Some(TouchPages {
            blob: blob.clone(),
            pages,
            per_piece: match blob {
                BlobRef::Inline(_) => pages,
                BlobRef::Chunks { .. } => BLOB_CHUNK_LEN / ps,
            },
        })
    }
    /// Number of non-zero pages.
    pub fn nonzero_pages(&self) -> u64 {
        self.pages.iter().filter(|p| p.is_some()).count() as u64
    }
}

/// One line of [`Store::list`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotInfo {
    /// Id.
    pub id: String,
    /// Memory size.
    pub memory_size: u64,
    /// Page size.
    pub page_size: u32,
    /// Parent.
    pub parent: Option<String>,
    /// Pages stored in this manifest's own runs.
    pub own_pages: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time.
    pub created_unix_ms: u64,
}

/// Result of [`Store::check`].
#[derive(Debug, Default, serde::Serialize)]
pub struct CheckReport {
    /// Snapshots examined.
    pub snapshots: u64,
    /// Chunks examined and verified.
    pub chunks: u64,
    /// Of them, chunks no manifest references (a delete's, until the next sweep): not a
    /// problem.
    pub unreferenced: u64,
    /// Everything wrong, one line each; empty means consistent.
    pub problems: Vec<String>,
}

impl CheckReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Result of [`Store::gc`] and [`Store::compact`].
#[derive(Debug, Default, serde::Serialize)]
pub struct GcReport {
    /// Packs rewritten or removed.
    pub packs_compacted: u64,
    /// Live chunks moved.
    pub chunks_moved: u64,
    /// Bytes of pack files before.
    pub bytes_before: u64,
    /// Bytes of pack files after.
    pub bytes_after: u64,
}

/// Store-wide figures.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct StoreStats {
    /// Snapshots.
    pub snapshots: u64,
    /// Chunks in the index (those a delete left unreferenced until the next sweep too).
    pub chunks: u64,
    /// Sum of raw chunk lengths.
    pub raw_bytes: u64,
    /// Sum of stored (compressed) lengths incl. record headers.
    pub stored_bytes: u64,
    /// Pack file bytes on disk.
    pub pack_bytes: u64,
    /// Bytes of pack files that hold no live chunk (reclaimed by compaction; a deleted
    /// snapshot's chunks count from the sweep that drops them).
    pub dead_bytes: u64,
}

/// Result of one ingest.
#[derive(Debug, Clone)]
pub struct CreateOutcome {
    /// New snapshot id.
    pub id: String,
    /// Pages hashed.
    pub pages_scanned: u64,
    /// Chunks newly written to a pack.
    pub chunks_written: u64,
    /// Bytes appended to packs.
    pub bytes_written: u64,
}

/// The store: one per root directory (rocksdb holds a lock on the index).
#[derive(Debug)]
pub struct Store {
    packs_dir: PathBuf,
    db: DB,
    writer: Mutex<PackWriter>,
    gc_lock: RwLock<()>,
    /// Dead bytes per pack (as recorded in `meta`); changed only with `writer` held (taken
    /// first when both are).
    dead: Mutex<BTreeMap<u32, u64>>,
    readers: Mutex<HashMap<u32, Arc<File>>>,
    views: Mutex<HashMap<String, Arc<SnapshotView>>>,
    seq: AtomicU64,
    root: PathBuf,
    /// Threads that read, hash, look up and compress pages during a create.
    ingest_threads: AtomicUsize,
    /// Set by a delete (and at open: one may have come just before a crash); the daemon's
    /// housekeeping, [`Store::compact`] and [`Store::gc`] sweep when it is set.
    sweep_due: AtomicBool,
    /// Held through a sweep: one at a time (each notes commits in `sweep_log`).
    sweeping: Mutex<()>,
    /// While a sweep marks without the writer lock: the manifests committed meanwhile
    /// (creates and first-touch orders note them, under the writer lock).
    sweep_log: Mutex<Option<Vec<String>>>,
    /// Opened as format 1: the first write that leaves a count untrue (any, here) records
    /// format 2 in its batch, so a binary that trusts counts refuses the store after it.
    format_pending: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Most threads one create uses.
pub const MAX_INGEST_THREADS: usize = 8;

fn default_ingest_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(MAX_INGEST_THREADS)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn sync_opts() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The index's memory (see [`Store::index_memory`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexMemory {
    /// The block cache capacity each column family reports (one shared cache: all equal
    /// [`INDEX_CACHE_BYTES`]).
    pub cache_capacity: Vec<u64>,
    /// Bytes in the block cache, as each column family reports it (one shared cache: all
    /// equal).
    pub cache_usage: Vec<u64>,
    /// Bytes in memtables, all column families.
    pub memtables: u64,
    /// Bytes of table readers held outside the block cache, all column families.
    pub table_readers: u64,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, recovering from any interrupted ingest.
    pub fn open(root: &Path) -> Result<Store, OpenError> {
        Store::open_with(root, INDEX_MEMTABLE_BYTES)
    }

    /// [`Store::open`] with `memtable_bytes` of index memtables (all families together; a
    /// memtable is a quarter of it) instead of [`INDEX_MEMTABLE_BYTES`]: small values make
    /// RocksDB flush and compact its tables after a few snapshots (the daemon's
    /// `--index-memtable-kib`, for tests of those background paths).
    pub fn open_with(root: &Path, memtable_bytes: usize) -> Result<Store, OpenError> {
        let packs_dir = root.join("packs");
        for d in [root.to_path_buf(), root.join("index"), packs_dir.clone()] {
            fs::create_dir_all(&d).map_err(|e| OpenError::CreateDir(d.clone(), e))?;
        }
        // Bounded memory: one block cache holding index and filter blocks too, and one
        // memtable budget, shared by every column family.
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_db_write_buffer_size(memtable_bytes);
        // Four shards of 16 MiB: a chunk table's filter block (~2 MiB for a 64 MiB table:
        // with the prefix extractor below it holds each key's 8-byte prefix beside the key)
        // must fit in a shard, or the cache drops it after every use and reads it again.
        let mut cache_opts = rocksdb::LruCacheOptions::default();
        cache_opts.set_capacity(INDEX_CACHE_BYTES);
        cache_opts.set_num_shard_bits(2);
        let cache = rocksdb::Cache::new_lru_cache_opts(&cache_opts);
        let cf_opts = |bloom: bool| {
            let mut bbo = rocksdb::BlockBasedOptions::default();
            if bloom {
                bbo.set_bloom_filter(10.0, false);
            }
            bbo.set_block_cache(&cache);
            bbo.set_cache_index_and_filter_blocks(true);
            bbo.set_pin_l0_filter_and_index_blocks_in_cache(true);
            let mut o = Options::default();
            o.set_block_based_table_factory(&bbo);
            o.set_write_buffer_size(memtable_bytes / 4);
            o
        };
        // The chunk index's keys are blake3 hashes, uniformly spread: its memtable is a hash
        // table of small skiplists on their first 8 bytes, so an ingest's look-up of a page
        // it saw before is a bucket and a step or two, not a walk down a skiplist of every
        // chunk written since the last flush. Its scans must ask for total order
        // (`chunk_scan`): a prefix iterator over this memtable starts nowhere.
        let mut chunks_opts = cf_opts(true);
        chunks_opts.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(
            CHUNK_KEY_PREFIX,
        ));
        chunks_opts.set_memtable_factory(rocksdb::MemtableFactory::HashSkipList {
            bucket_count: chunk_memtable_buckets(memtable_bytes / 4),
            height: 4,
            branching_factor: 4,
        });
        // A hash memtable takes one writer at a time (ours are serialized anyway).
        opts.set_allow_concurrent_memtable_write(false);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunks_opts),
            ColumnFamilyDescriptor::new(CF_MANIFESTS, cf_opts(false)),
            ColumnFamilyDescriptor::new(CF_CHILDREN, cf_opts(false)),
            ColumnFamilyDescriptor::new(CF_META, cf_opts(false)),
        ];
        let db =
            DB::open_cf_descriptors(&opts, root.join("index"), cfs).map_err(OpenError::Index)?;
        let meta = db
            .cf_handle(CF_META)
            .ok_or(OpenError::Meta("missing meta family"))?;
        let get_u64 = |k: &[u8]| -> Result<Option<u64>, OpenError> {
            match db.get_cf(meta, k).map_err(OpenError::Index)? {
                None => Ok(None),
                Some(v) => Ok(Some(u64::from_le_bytes(
                    v.as_slice()
                        .try_into()
                        .map_err(|_| OpenError::Meta("bad meta value"))?,
                ))),
            }
        };
        // A format 1 store is read as it is; its first write records format 2.
        let format_pending = match get_u64(META_FORMAT)? {
            None => false,
            Some(v) if v == u64::from(STORE_FORMAT_VERSION) => false,
            Some(v) if v == u64::from(STORE_FORMAT_COUNTED) => true,
            Some(v) => return Err(OpenError::Format(v as u32)),
        };
        let active = get_u64(META_ACTIVE)?;
        let writer = match active {
            None => {
                // Fresh store (or a crash before the first commit): start pack 0.
                let w = PackWriter::create(&packs_dir, 0).map_err(OpenError::Packs)?;
                let mut b = WriteBatch::default();
                b.put_cf(
                    meta,
                    META_FORMAT,
                    u64::from(STORE_FORMAT_VERSION).to_le_bytes(),
                );
                b.put_cf(meta, META_ACTIVE, 0u64.to_le_bytes());
                b.put_cf(meta, META_COMMITTED, PACK_HEADER_LEN.to_le_bytes());
                db.write_opt(b, &sync_opts()).map_err(OpenError::Index)?;
                w
            }
            Some(active) => {
                let active = u32::try_from(active).map_err(|_| OpenError::Meta("active pack"))?;
                let committed =
                    get_u64(META_COMMITTED)?.ok_or(OpenError::Meta("committed length"))?;
                remove_packs_after(&packs_dir, active).map_err(OpenError::Packs)?;
                PackWriter::open_truncated(&packs_dir, active, committed)
                    .map_err(OpenError::Packs)?
            }
        };
        let recorded = db
            .get_cf(meta, META_DEAD)
            .map_err(OpenError::Index)?
            .and_then(|v| decode_dead(&v))
            .map(|mut dead| {
                // Packs a compaction removed after recording them as wholly dead.
                dead.retain(|&n, _| pack::pack_path(&packs_dir, n).exists());
                dead
            });
        let seq = AtomicU64::new(now_ms());
        let store = Store {
            packs_dir,
            db,
            writer: Mutex::new(writer),
            gc_lock: RwLock::new(()),
            dead: Mutex::new(recorded.clone().unwrap_or_default()),
            readers: Mutex::new(HashMap::new()),
            views: Mutex::new(HashMap::new()),
            seq,
            root: root.to_path_buf(),
            ingest_threads: AtomicUsize::new(default_ingest_threads()),
            sweep_due: AtomicBool::new(true),
            sweeping: Mutex::new(()),
            sweep_log: Mutex::new(None),
            format_pending: AtomicBool::new(format_pending),
        };
        if recorded.is_none() {
            // A new store, or one from before dead bytes were recorded: measure them once.
            let writer = lock(&store.writer);
            store
                .remeasure_dead(&writer, &mut lock(&store.dead))
                .map_err(OpenError::Measure)?;
        }
        Ok(store)
    }

    /// How many threads a create uses to read, hash, look up and compress pages (at least
    /// one; the default is the CPUs available, at most [`MAX_INGEST_THREADS`]).
    pub fn set_ingest_threads(&self, n: usize) {
        self.ingest_threads
            .store(n.clamp(1, MAX_INGEST_THREADS), Ordering::Relaxed);
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // The four families are created by `open` (create_missing_column_families), so the
        // handle always exists while the DB is open.
        match self.db.cf_handle(name) {
            Some(cf) => cf,
            None => unreachable!("column family {name} is created at open"),
        }
    }

    /// A fresh snapshot id (24 hex digits).
    pub fn new_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let h =
            blake3::hash(format!("{:?}|{nanos}|{}|{n}", self.root, std::process::id()).as_bytes());
        hex(&h.as_bytes()[..12])
    }

    /// Loads the resolved view of snapshot `id` (cached).
    pub fn view(&self, id: &str) -> Result<Arc<SnapshotView>, ViewError> {
        if let Some(v) = lock(&self.views).get(id) {
            return Ok(v.clone());
        }
        let view = Arc::new(self.resolve(id)?);
        let mut views = lock(&self.views);
        if views.len() >= 64 {
            views.clear();
        }
        views.insert(id.to_string(), view.clone());
        Ok(view)
    }

    fn manifest_exists(&self, id: &str) -> Result<bool, CreateError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_MANIFESTS), id.as_bytes())
            .map_err(CreateError::Index)?
            .is_some())
    }

    fn load_manifest(&self, id: &str) -> Result<Manifest, ViewError> {
        let bytes = self
            .db
            .get_pinned_cf(self.cf(CF_MANIFESTS), id.as_bytes())
            .map_err(ViewError::Index)?
            .ok_or_else(|| ViewError::NotFound(id.to_string()))?;
        let m = manifest::decode(&bytes).map_err(|e| ViewError::Corrupt(id.to_string(), e))?;
        if m.id != id {
            return Err(ViewError::Chain(id.to_string()));
        }
        Ok(m)
    }

    fn resolve(&self, id: &str) -> Result<SnapshotView, ViewError> {
        let top = self.load_manifest(id)?;
        let mut chain = vec![top];
        while let Some(parent) = chain.last().and_then(|m| m.parent.clone()) {
            let m = self.load_manifest(&parent)?;
            let child = &chain[chain.len() - 1];
            if chain.len() > MAX_CHAIN_DEPTH as usize + 1
                || m.memory_size != child.memory_size
                || m.page_size != child.page_size
                || m.depth + 1 != child.depth
            {
                return Err(ViewError::Chain(id.to_string()));
            }
            chain.push(m);
        }
        let count =
            usize::try_from(chain[0].page_count()).map_err(|_| ViewError::Chain(id.to_string()))?;
        let mut pages: Vec<Option<Hash>> = vec![None; count];
        for m in chain.iter().rev() {
            for run in &m.runs {
                match run {
                    Run::Pages { start, hashes } => {
                        let s = *start as usize;
                        for (i, h) in hashes.iter().enumerate() {
                            pages[s + i] = Some(*h);
                        }
                    }
                    Run::Repeat { start, count, hash } => {
                        pages[*start as usize..(*start + *count) as usize].fill(Some(*hash));
                    }
                    Run::Zero { start, count } => {
                        pages[*start as usize..(*start + *count) as usize].fill(None);
                    }
                }
            }
        }
        let manifest = chain.swap_remove(0);
        Ok(SnapshotView { manifest, pages })
    }

    fn pack_file(&self, n: u32) -> io::Result<Arc<File>> {
        let mut readers = lock(&self.readers);
        if let Some(f) = readers.get(&n) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(pack::pack_path(&self.packs_dir, n))?);
        readers.insert(n, f.clone());
        Ok(f)
    }

    /// Every chunk index entry, in key order: memtables included, which only a total-order
    /// iterator sees in a hash memtable (the only way this index is scanned). Such an
    /// iterator sorts a copy of the memtable's entries first: scans are for stats, checks and
    /// compaction, never per page.
    fn chunk_scan(&self) -> rocksdb::DBIteratorWithThreadMode<'_, DB> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_total_order_seek(true);
        self.db
            .iterator_cf_opt(self.cf(CF_CHUNKS), ro, rocksdb::IteratorMode::Start)
    }

    fn get_entry(&self, hash: &Hash) -> Result<Option<ChunkEntry>, rocksdb::Error> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_CHUNKS), hash)?
            .and_then(|v| ChunkEntry::decode(&v)))
    }

    /// Reads and verifies chunk `hash`; `what` names the snapshot and page for errors.
    fn read_chunk(
        &self,
        hash: &Hash,
        snapshot: &str,
        page: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), ReadError> {
        let _g = self
            .gc_lock
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = self
            .get_entry(hash)
            .map_err(ReadError::Index)?
            .ok_or_else(|| ReadError::MissingChunk {
                snapshot: snapshot.to_string(),
                page,
            })?;
        let file = self
            .pack_file(entry.location.pack)
            .map_err(|source| ReadError::Pack {
                snapshot: snapshot.to_string(),
                page,
                source,
            })?;
        let mut scratch = Vec::new();
        pack::read_record(&file, &entry.location, hash, &mut scratch, out).map_err(|source| {
            ReadError::Corrupt {
                snapshot: snapshot.to_string(),
                page,
                source,
            }
        })
    }

    /// Reads page `page` of `view` into `out` (resized to the page size). Returns `false`
    /// (and zero bytes) for a zero page.
    pub fn read_page(
        &self,
        view: &SnapshotView,
        page: u64,
        out: &mut Vec<u8>,
    ) -> Result<bool, ReadError> {
        let slot = view.page(page).ok_or_else(|| ReadError::OutOfRange {
            snapshot: view.id().to_string(),
            page,
        })?;
        match slot {
            None => {
                out.clear();
                out.resize(view.page_size() as usize, 0);
                Ok(false)
            }
            Some(hash) => {
                self.read_chunk(hash, view.id(), page, out)?;
                if out.len() != view.page_size() as usize {
                    return Err(ReadError::Corrupt {
                        snapshot: view.id().to_string(),
                        page,
                        source: RecordError::BadHeader { pack: 0, offset: 0 },
                    });
                }
                Ok(true)
            }
        }
    }

    /// Reads a whole snapshot's memory into a buffer (tests, tools).
    pub fn read_all(&self, id: &str) -> Result<Vec<u8>, ReadError> {
        let view = self.view(id).map_err(ReadError::View)?;
        let ps = view.page_size() as usize;
        let mut mem = vec![0u8; view.memory_size() as usize];
        let mut buf = Vec::new();
        for p in 0..view.page_count() {
            if self.read_page(&view, p, &mut buf)? {
                mem[p as usize * ps..(p as usize + 1) * ps].copy_from_slice(&buf);
            }
        }
        Ok(mem)
    }

    /// Reads the named VM-state blob of snapshot `id`.
    pub fn read_blob(&self, id: &str, name: &str) -> Result<Vec<u8>, ReadError> {
        let view = self.view(id).map_err(ReadError::View)?;
        let blob = view
            .manifest
            .blobs
            .get(name)
            .ok_or_else(|| ReadError::NoBlob {
                snapshot: id.to_string(),
                name: name.to_string(),
            })?;
        match blob {
            BlobRef::Inline(b) => Ok(b.clone()),
            BlobRef::Chunks { len, hashes } => {
                let mut out = Vec::with_capacity(*len as usize);
                let mut buf = Vec::new();
                for (i, h) in hashes.iter().enumerate() {
                    self.read_chunk(h, id, i as u64, &mut buf)?;
                    out.extend_from_slice(&buf);
                }
                if out.len() as u64 != *len {
                    return Err(ReadError::MissingChunk {
                        snapshot: id.to_string(),
                        page: hashes.len() as u64,
                    });
                }
                Ok(out)
            }
        }
    }

    /// Creates a snapshot; returns once its chunks and manifest are durable.
    pub fn create(&self, req: &CreateRequest<'_>) -> Result<CreateOutcome, CreateError> {
        self.create_as(&self.new_id(), req)
    }

    /// Creates a snapshot under an id chosen before (with [`Store::new_id`]), e.g. one the
    /// daemon already handed out for an image it ingests in the background.
    pub fn create_as(
        &self,
        id: &str,
        req: &CreateRequest<'_>,
    ) -> Result<CreateOutcome, CreateError> {
        if id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(CreateError::Invalid(format!("snapshot id {id:?}")));
        }
        let t0 = Instant::now();
        let mut writer = lock(&self.writer);
        let start_len = writer.len();
        let result = self.create_locked(&mut writer, id, req);
        if result.is_err()
            && let Err(e) = writer.rollback(start_len)
        {
            tracing::error!(error = %e, "rolling back pack after failed create");
        }
        if let Ok(o) = &result {
            tracing::info!(
                id = %o.id, pages = o.pages_scanned, written = o.chunks_written,
                bytes = o.bytes_written, ms = t0.elapsed().as_millis() as u64, "snapshot created"
            );
        }
        result
    }

    fn create_locked(
        &self,
        writer: &mut PackWriter,
        id: &str,
        req: &CreateRequest<'_>,
    ) -> Result<CreateOutcome, CreateError> {
        let ps = req.page_size;
        let memory_size = req.memory.len();
        manifest::check_shape(ps, memory_size).map_err(|why| {
            CreateError::Invalid(format!("page size {ps}, memory size {memory_size}: {why}"))
        })?;
        let page_count = memory_size / u64::from(ps);
        let parent = match &req.parent {
            None => None,
            Some(p) => {
                // Read again under the writer lock: a view cached before the parent's
                // delete must not found a layer (or a flattened copy) on swept chunks.
                if !self.manifest_exists(p)? {
                    return Err(CreateError::Parent(Box::new(ViewError::NotFound(
                        p.clone(),
                    ))));
                }
                let v = self.view(p).map_err(|e| CreateError::Parent(Box::new(e)))?;
                if v.memory_size() != memory_size || v.page_size() != ps {
                    return Err(CreateError::Invalid(
                        "memory or page size differs from the parent's".into(),
                    ));
                }
                Some(v)
            }
        };
        if req.dirty_pages.is_some() && parent.is_none() {
            return Err(CreateError::Invalid(
                "a dirty page list needs a parent".into(),
            ));
        }
        let scan: Vec<(u64, u64)> = match &req.dirty_pages {
            None => vec![(0, page_count)],
            Some(list) => {
                let mut list = list.clone();
                list.sort_unstable();
                list.dedup();
                if list.last().is_some_and(|l| *l >= page_count) {
                    return Err(CreateError::Invalid("dirty page beyond memory size".into()));
                }
                manifest::build_ranges(&list)
            }
        };
        if req.touch_order.iter().any(|p| *p >= page_count) {
            return Err(CreateError::Invalid(
                "touch order page beyond memory size".into(),
            ));
        }
        let flatten = parent
            .as_ref()
            .is_some_and(|p| p.manifest.depth + 1 > MAX_CHAIN_DEPTH);
        let mut ing = Ingest::new(self, writer);
        // Per changed page: (index, content).
        let mut entries: Vec<(u64, Option<Hash>)> = Vec::new();
        let zero = vec![0u8; ps as usize];
        let threads = self.ingest_threads.load(Ordering::Relaxed).max(1);
        let mut bufs: Vec<Vec<u8>> = (0..threads)
            .map(|_| vec![0u8; INGEST_BATCH_PAGES * ps as usize])
            .collect();
        let batches: Vec<(u64, usize)> = scan
            .iter()
            .flat_map(|&(start, count)| {
                (start..start + count)
                    .step_by(INGEST_BATCH_PAGES)
                    .map(move |p| {
                        (
                            p,
                            (start + count - p).min(INGEST_BATCH_PAGES as u64) as usize,
                        )
                    })
            })
            .collect();
        let mut pages_scanned = 0u64;
        // The changed pages of one scanned batch (taken in any order; sorted after).
        // `remember`: keep the chunks found stored, for later batches to skip (workers that
        // cannot see them have no use for them).
        let mut take = |ing: &mut Ingest<'_>, batch: (u64, usize), scanned: Scanned, remember| {
            let found = if remember { scanned.found } else { Vec::new() };
            ing.absorb(found, scanned.missing)?;
            for (i, h) in scanned.hashes.iter().enumerate() {
                let idx = batch.0 + i as u64;
                let differs = match &parent {
                    Some(pv) => pv.page(idx).flatten() != h.as_ref(),
                    None => h.is_some(),
                };
                if differs {
                    entries.push((idx, *h));
                }
            }
            pages_scanned += batch.1 as u64;
            Ok::<(), CreateError>(())
        };
        let memory = &*req.memory;
        let zero = zero.as_slice();
        if threads == 1 || batches.len() == 1 {
            for &batch in &batches {
                let scanned = scan_batch(self, memory, batch, ps, zero, &ing.known, &mut bufs[0])?;
                take(&mut ing, batch, scanned, true)?;
            }
        } else {
            // The workers read, hash, look up and compress batches taken from one cursor;
            // this thread takes their results as they come (appends, the page list), so no
            // worker waits for another's batch or for this thread. Workers cannot see what
            // this create has already appended (`ing.known` changes under them): a chunk in
            // two batches may be looked up and compressed twice, and is appended once.
            let next = AtomicUsize::new(0);
            let stop = AtomicBool::new(false);
            let no_known = HashSet::new();
            let result = std::thread::scope(|scope| {
                let (tx, rx) = std::sync::mpsc::sync_channel(threads);
                let workers: Vec<_> = bufs
                    .iter_mut()
                    .map(|buf| {
                        let (tx, next, stop, batches, no_known) =
                            (tx.clone(), &next, &stop, &batches, &no_known);
                        scope.spawn(move || {
                            while !stop.load(Ordering::Relaxed) {
                                let Some(&batch) =
                                    batches.get(next.fetch_add(1, Ordering::Relaxed))
                                else {
                                    break;
                                };
                                let scanned =
                                    scan_batch(self, memory, batch, ps, zero, no_known, buf);
                                if tx.send((batch, scanned)).is_err() {
                                    break;
                                }
                            }
                        })
                    })
                    .collect();
                drop(tx);
                let mut taken = 0;
                let mut failed = None;
                for (batch, scanned) in rx.iter() {
                    if let Err(e) =
                        scanned.and_then(|scanned| take(&mut ing, batch, scanned, false))
                    {
                        stop.store(true, Ordering::Relaxed);
                        failed = Some(e);
                        break;
                    }
                    taken += 1;
                }
                // Workers waiting to send see the channel closed and stop.
                drop(rx);
                // Joined here, so a worker's panic is this create's error, not a panic of
                // the scope (which would skip the caller's rollback of the pack).
                let panicked = workers
                    .into_iter()
                    .map(|w| w.join())
                    .filter(Result::is_err)
                    .count();
                match failed {
                    Some(e) => Err(e),
                    None if panicked > 0 || taken != batches.len() => Err(CreateError::Worker),
                    None => Ok(()),
                }
            });
            result?;
            entries.sort_unstable_by_key(|&(idx, _)| idx);
        }
        let (parent_id, depth) = match (&parent, flatten) {
            (Some(pv), false) => (Some(pv.id().to_string()), pv.manifest.depth + 1),
            _ => (None, 0),
        };
        let mut labels = req.labels.clone();
        if let (Some(pv), true) = (&parent, flatten) {
            // Too deep: write a full manifest (parent's pages + changes), no data dependency.
            labels.insert(
                fissile_proto::snapshotd::LABEL_FLATTENED_FROM.into(),
                pv.id().to_string(),
            );
            let mut full: Vec<Option<Hash>> = pv.pages.clone();
            for (idx, h) in &entries {
                full[*idx as usize] = *h;
            }
            entries = full
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.map(|h| (i as u64, Some(h))))
                .collect();
        }
        let mut blobs = BTreeMap::new();
        if let Some(name) = req.blobs.keys().find(|n| n.starts_with(STORE_BLOB_PREFIX)) {
            return Err(CreateError::Invalid(format!(
                "the blob name {name:?} is the store's own (names starting {STORE_BLOB_PREFIX:?} are)"
            )));
        }
        for (name, data) in &req.blobs {
            blobs.insert(name.clone(), ing.store_blob(data)?);
        }
        if self.manifest_exists(id)? {
            return Err(CreateError::Invalid(format!(
                "snapshot {id} already exists"
            )));
        }
        let id = id.to_string();
        let m = Manifest {
            id: id.clone(),
            memory_size,
            page_size: ps,
            parent: parent_id.clone(),
            depth,
            runs: manifest::build_runs(&entries),
            blobs,
            labels,
            created_unix_ms: now_ms(),
            // None given: the parent's, which a layer on it mostly shares.
            touch_order: match &parent {
                Some(p) if req.touch_order.is_empty() => p.manifest.touch_order.clone(),
                _ => manifest::build_ranges(&req.touch_order),
            },
        };
        m.validate().map_err(CreateError::Manifest)?;
        let encoded = manifest::encode(&m).map_err(CreateError::Manifest)?;
        let (chunks_written, bytes_written) = (ing.chunks_written, ing.bytes_written);
        let committed = ing.writer.sync().map_err(CreateError::Pack)?;
        let mut batch =
            self.manifest_batch(&ing.appended, &id, &encoded, (ing.writer.number, committed));
        if let Some(p) = &parent_id {
            batch.put_cf(self.cf(CF_CHILDREN), child_key(p, &id), b"");
        }
        self.commit(batch).map_err(CreateError::Index)?;
        self.note_committed(&id);
        Ok(CreateOutcome {
            id,
            pages_scanned,
            chunks_written,
            bytes_written,
        })
    }

    /// The index writes that commit manifest `encoded` of snapshot `id`: the entries of the
    /// chunks it appended (`appended`), the manifest, and the active pack with its committed
    /// length (`pack`: number, length). Chunks it found stored need no write.
    fn manifest_batch(
        &self,
        appended: &[(Hash, ChunkEntry)],
        id: &str,
        encoded: &[u8],
        (pack, committed): (u32, u64),
    ) -> WriteBatch {
        let mut batch = WriteBatch::default();
        for (hash, e) in appended {
            batch.put_cf(self.cf(CF_CHUNKS), hash, e.encode());
        }
        batch.put_cf(self.cf(CF_MANIFESTS), id.as_bytes(), encoded);
        let meta = self.cf(CF_META);
        batch.put_cf(meta, META_ACTIVE, u64::from(pack).to_le_bytes());
        batch.put_cf(meta, META_COMMITTED, committed.to_le_bytes());
        batch
    }

    /// Deletes snapshot `id` (refused while snapshots are layered on it).
    pub fn delete(&self, id: &str) -> Result<(), DeleteError> {
        let _w = lock(&self.writer);
        let m = self.load_manifest(id).map_err(DeleteError::View)?;
        let prefix = child_prefix(id);
        let children = self.cf(CF_CHILDREN);
        if let Some(item) = self.db.prefix_iterator_cf(children, &prefix).next() {
            let (k, _) = item.map_err(DeleteError::Index)?;
            if k.starts_with(&prefix) {
                return Err(DeleteError::HasChildren(id.to_string()));
            }
        }
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_MANIFESTS), id.as_bytes());
        if let Some(p) = &m.parent {
            batch.delete_cf(children, child_key(p, id));
        }
        self.commit(batch).map_err(DeleteError::Index)?;
        // Its chunks no other manifest references go at the next sweep.
        self.sweep_due.store(true, Ordering::Release);
        lock(&self.views).remove(id);
        tracing::info!(snapshot = id, "snapshot deleted");
        Ok(())
    }

    /// Records `pages` as snapshot `id`'s first-touch order (what a restore prefetches),
    /// unless it has one already: an order given at its creation, inherited from its parent
    /// or recorded by an earlier restore is kept. Returns whether it was recorded.
    ///
    /// `contents` holds the contents of the order's first pages, one page after another
    /// (empty: none; at most [`touch_pages_storable`] pages). They are stored with the
    /// order as the blob [`TOUCH_PAGES_BLOB`], in [`BLOB_CHUNK_LEN`] chunks, so a restore
    /// reads them in a few large reads and zstd frames instead of one index lookup, read
    /// and frame per page ([`SnapshotView::touch_pages`]). They must be the snapshot's own
    /// contents of those pages (the caller read them from the store): the store cannot
    /// tell otherwise. A snapshot layered on this one inherits its order, not the blob.
    pub fn record_touch_order(
        &self,
        id: &str,
        pages: &[u64],
        contents: &[u8],
    ) -> Result<bool, TouchOrderError> {
        self.touch_write(id, Some(pages), contents)
    }

    /// Stores `contents` as the contents of the first pages of snapshot `id`'s first-touch
    /// order, as [`Store::record_touch_order`] does with a new order: for an order given at
    /// its creation or inherited, which has none. Returns whether they were stored (not
    /// when the snapshot has no order, or has contents already).
    pub fn record_touch_pages(&self, id: &str, contents: &[u8]) -> Result<bool, TouchOrderError> {
        self.touch_write(id, None, contents)
    }

    /// [`Store::record_touch_order`] (`pages` given) or [`Store::record_touch_pages`].
    fn touch_write(
        &self,
        id: &str,
        pages: Option<&[u64]>,
        contents: &[u8],
    ) -> Result<bool, TouchOrderError> {
        // Hashed and compressed before the writer lock, which creates wait for.
        let pieces = encode_blob(contents).map_err(|e| TouchOrderError::Ingest(Box::new(e)))?;
        let mut writer = lock(&self.writer);
        let start_len = writer.len();
        let result = self.touch_write_locked(&mut writer, id, pages, contents, pieces);
        if result.is_err()
            && let Err(e) = writer.rollback(start_len)
        {
            tracing::error!(error = %e, "rolling back pack after a failed first-touch order");
        }
        result
    }

    fn touch_write_locked(
        &self,
        writer: &mut PackWriter,
        id: &str,
        pages: Option<&[u64]>,
        contents: &[u8],
        pieces: Vec<EncodedChunk>,
    ) -> Result<bool, TouchOrderError> {
        let mut m = self.load_manifest(id).map_err(TouchOrderError::View)?;
        let order_len = match pages {
            Some(pages) => {
                if !m.touch_order.is_empty() || pages.is_empty() {
                    return Ok(false);
                }
                let count = m.page_count();
                if let Some(&page) = pages.iter().find(|p| **p >= count) {
                    return Err(TouchOrderError::OutOfRange { page, pages: count });
                }
                pages.len()
            }
            None => {
                if m.touch_order.is_empty()
                    || m.blobs.contains_key(TOUCH_PAGES_BLOB)
                    || contents.is_empty()
                {
                    return Ok(false);
                }
                usize::try_from(m.touch_order_len()).unwrap_or(usize::MAX)
            }
        };
        let ps = m.page_size as usize;
        let stored = contents.len() / ps;
        if !contents.len().is_multiple_of(ps)
            || stored > order_len.min(touch_pages_storable(m.page_size))
        {
            return Err(TouchOrderError::Contents {
                bytes: contents.len(),
                pages: order_len,
            });
        }
        let mut ing = Ingest::new(self, writer);
        if stored > 0 {
            let blob = ing
                .store_encoded_blob(contents, pieces)
                .map_err(|e| TouchOrderError::Ingest(Box::new(e)))?;
            m.blobs.insert(TOUCH_PAGES_BLOB.to_string(), blob);
        }
        if let Some(pages) = pages {
            m.touch_order = manifest::build_ranges(pages);
        }
        m.validate().map_err(TouchOrderError::Invalid)?;
        let encoded = manifest::encode(&m).map_err(TouchOrderError::Encode)?;
        let committed = ing.writer.sync().map_err(TouchOrderError::Pack)?;
        let batch =
            self.manifest_batch(&ing.appended, id, &encoded, (ing.writer.number, committed));
        self.commit(batch).map_err(TouchOrderError::Index)?;
        self.note_committed(id);
        lock(&self.views).remove(id);
        match pages {
            Some(_) => tracing::info!(
                snapshot = id,
                pages = order_len,
                stored,
                "first-touch order recorded"
            ),
            None => tracing::info!(
                snapshot = id,
                pages = order_len,
                stored,
                "first-touch pages stored"
            ),
        }
        Ok(true)
    }

    /// Reads piece `index` of `view`'s stored first-touch pages ([`TouchPages`]) into `out`.
    pub fn read_touch_pages(
        &self,
        view: &SnapshotView,
        pages: &TouchPages,
        index: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), ReadError> {
        let first = (index * pages.per_piece) as u64;
        match (&pages.blob, index) {
            (BlobRef::Inline(data), 0) => {
                out.clear();
                out.extend_from_slice(data);
            }
            (BlobRef::Chunks { hashes, .. }, i) if i < hashes.len() => {
                self.read_chunk(&hashes[i], view.id(), first, out)?;
            }
            _ => {
                return Err(ReadError::OutOfRange {
                    snapshot: view.id().to_string(),
                    page: first,
                });
            }
        }
        let want = pages.piece_pages(index) * view.page_size() as usize;
        if out.len() != want {
            return Err(ReadError::MissingChunk {
                snapshot: view.id().to_string(),
                page: first,
            });
        }
        Ok(())
    }

    /// Lists every snapshot.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>, ViewError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_MANIFESTS), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item.map_err(ViewError::Index)?;
            let id = String::from_utf8_lossy(&k).into_owned();
            let m = manifest::decode(&v).map_err(|e| ViewError::Corrupt(id.clone(), e))?;
            out.push(SnapshotInfo {
                own_pages: m.runs.iter().map(|r| r.span().1).sum(),
                id,
                memory_size: m.memory_size,
                page_size: m.page_size,
                parent: m.parent,
                labels: m.labels,
                created_unix_ms: m.created_unix_ms,
            });
        }
        Ok(out)
    }

    fn pack_numbers(&self) -> io::Result<Vec<u32>> {
        let mut v = Vec::new();
        for e in fs::read_dir(&self.packs_dir)? {
            let e = e?;
            if let Some(n) = e.file_name().to_str().and_then(pack::parse_pack_name) {
                v.push(n);
            }
        }
        v.sort_unstable();
        Ok(v)
    }

    fn pack_bytes(&self) -> io::Result<u64> {
        let mut total = 0;
        for n in self.pack_numbers()? {
            total += fs::metadata(pack::pack_path(&self.packs_dir, n))?.len();
        }
        Ok(total)
    }

    /// What the index (RocksDB) holds in memory now, and its bounds.
    pub fn index_memory(&self) -> IndexMemory {
        let prop = |cf: &str, name: &str| {
            self.db
                .property_int_value_cf(self.cf(cf), name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        let families = [CF_CHUNKS, CF_MANIFESTS, CF_CHILDREN, CF_META];
        IndexMemory {
            cache_capacity: families
                .iter()
                .map(|cf| prop(cf, "rocksdb.block-cache-capacity"))
                .collect(),
            cache_usage: families
                .iter()
                .map(|cf| prop(cf, "rocksdb.block-cache-usage"))
                .collect(),
            memtables: families
                .iter()
                .map(|cf| prop(cf, "rocksdb.cur-size-all-mem-tables"))
                .sum(),
            table_readers: families
                .iter()
                .map(|cf| prop(cf, "rocksdb.estimate-table-readers-mem"))
                .sum(),
        }
    }

    /// Store-wide figures.
    pub fn stats(&self) -> Result<StoreStats, CheckError> {
        let mut s = StoreStats::default();
        for item in self.chunk_scan() {
            let (_, v) = item.map_err(CheckError::Index)?;
            if let Some(e) = ChunkEntry::decode(&v) {
                s.chunks += 1;
                s.raw_bytes += u64::from(e.location.raw_len);
                s.stored_bytes += e.location.record_len();
            }
        }
        s.snapshots = self
            .db
            .iterator_cf(self.cf(CF_MANIFESTS), rocksdb::IteratorMode::Start)
            .count() as u64;
        s.pack_bytes = self.pack_bytes().map_err(CheckError::Pack)?;
        s.dead_bytes = self.dead_bytes();
        Ok(s)
    }

    /// Verifies the whole store: manifests decode, chains resolve, every chunk a manifest
    /// references is indexed, every indexed chunk reads back and verifies, pack files are
    /// intact.
    pub fn check(&self) -> Result<CheckReport, CheckError> {
        let _w = lock(&self.writer);
        let mut rep = CheckReport::default();
        let mut referenced: HashSet<Hash> = HashSet::new();
        let mut ids = HashSet::new();
        let mut parents = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_MANIFESTS), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item.map_err(CheckError::Index)?;
            let id = String::from_utf8_lossy(&k).into_owned();
            rep.snapshots += 1;
            match manifest::decode(&v) {
                Err(e) => rep
                    .problems
                    .push(format!("snapshot {id}: manifest corrupt: {e}")),
                Ok(m) => {
                    if m.id != id {
                        rep.problems
                            .push(format!("snapshot {id}: manifest names {}", m.id));
                    }
                    referenced.extend(m.distinct_chunks());
                    if let Some(p) = m.parent.clone() {
                        parents.push((id.clone(), p));
                    }
                    ids.insert(id);
                }
            }
        }
        for (child, parent) in &parents {
            if !ids.contains(parent) {
                rep.problems
                    .push(format!("snapshot {child}: parent {parent} missing"));
            }
            let has = self
                .db
                .get_pinned_cf(self.cf(CF_CHILDREN), child_key(parent, child))
                .map_err(CheckError::Index)?;
            if has.is_none() {
                rep.problems.push(format!(
                    "snapshot {child}: not registered as child of {parent}"
                ));
            }
        }
        let meta = self.cf(CF_META);
        let active = self
            .db
            .get_cf(meta, META_ACTIVE)
            .map_err(CheckError::Index)?
            .and_then(|v| v.try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0) as u32;
        let committed = self
            .db
            .get_cf(meta, META_COMMITTED)
            .map_err(CheckError::Index)?
            .and_then(|v| v.try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0);
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        for item in self.chunk_scan() {
            let (k, v) = item.map_err(CheckError::Index)?;
            rep.chunks += 1;
            let Ok(hash) = <Hash>::try_from(&k[..]) else {
                rep.problems
                    .push(format!("chunk key {} has a bad length", hex(&k)));
                continue;
            };
            let Some(e) = ChunkEntry::decode(&v) else {
                rep.problems
                    .push(format!("chunk {}: index entry corrupt", hex(&hash)));
                continue;
            };
            seen.insert(hash);
            if !referenced.contains(&hash) {
                rep.unreferenced += 1;
            }
            if e.location.pack == active && e.location.offset + e.location.record_len() > committed
            {
                rep.problems.push(format!(
                    "chunk {}: beyond the committed end of the active pack",
                    hex(&hash)
                ));
            }
            let res = self
                .pack_file(e.location.pack)
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    pack::read_record(&f, &e.location, &hash, &mut scratch, &mut out)
                        .map_err(|e| e.to_string())
                });
            if let Err(msg) = res {
                rep.problems.push(format!("chunk {}: {msg}", hex(&hash)));
            }
        }
        for h in &referenced {
            if !seen.contains(h) {
                rep.problems.push(format!(
                    "chunk {} referenced but missing from the index",
                    hex(h)
                ));
            }
        }
        for n in self.pack_numbers().map_err(CheckError::Pack)? {
            let f = File::open(pack::pack_path(&self.packs_dir, n)).map_err(CheckError::Pack)?;
            if let Err(e) = pack::check_pack_header(&f) {
                rep.problems.push(format!("pack {n}: {e}"));
            }
        }
        Ok(rep)
    }

    /// Writes `batch` durably, with format 2 in it while the store is still recorded as
    /// format 1 (the caller holds the writer lock): every write that leaves a count untrue
    /// goes through here.
    fn commit(&self, mut batch: WriteBatch) -> Result<(), rocksdb::Error> {
        if self.format_pending.load(Ordering::Acquire) {
            batch.put_cf(
                self.cf(CF_META),
                META_FORMAT,
                u64::from(STORE_FORMAT_VERSION).to_le_bytes(),
            );
        }
        self.db.write_opt(batch, &sync_opts())?;
        self.format_pending.store(false, Ordering::Release);
        Ok(())
    }

    /// Manifest `id` was committed (the writer lock held): a sweep marking meanwhile marks it.
    fn note_committed(&self, id: &str) {
        if let Some(log) = lock(&self.sweep_log).as_mut() {
            log.push(id.to_string());
        }
    }

    /// Drops the index entries of the chunks no manifest references (a delete's, until
    /// then in the index) and adds their bytes to their packs' dead counts, in one batch.
    /// Marks without the writer lock, over a point-in-time view of the index taken under
    /// it (manifests committed meanwhile are noted and marked after), then takes the lock
    /// to drop what is still unreferenced: creates wait only for the drop. Returns the
    /// entries dropped. A manifest that does not decode stops it before anything is
    /// dropped (the next delete or open asks for another).
    pub fn sweep(&self) -> Result<u64, GcError> {
        let _one = lock(&self.sweeping);
        let t = Instant::now();
        let point = {
            let _writer = lock(&self.writer);
            // Cleared first: a delete after this point (which waits for the writer lock)
            // sets it again.
            self.sweep_due.store(false, Ordering::Release);
            *lock(&self.sweep_log) = Some(Vec::new());
            self.db.snapshot()
        };
        let candidates = self.unreferenced_at(&point);
        drop(point);
        let _writer = lock(&self.writer);
        let mut dead = lock(&self.dead);
        let committed = lock(&self.sweep_log).take().unwrap_or_default();
        let dropped = self.drop_unreferenced(candidates?, &committed, &mut dead)?;
        tracing::info!(
            dropped,
            ms = t.elapsed().as_millis() as u64,
            "unreferenced chunks swept"
        );
        Ok(dropped)
    }

    /// [`Store::sweep`] if a delete (or the store's open) came since the last one; else 0.
    pub fn sweep_if_due(&self) -> Result<u64, GcError> {
        if self.sweep_due.load(Ordering::Acquire) {
            self.sweep()
        } else {
            Ok(0)
        }
    }

    /// The chunks indexed at `point` that no manifest at `point` references.
    fn unreferenced_at(
        &self,
        point: &rocksdb::SnapshotWithThreadMode<'_, DB>,
    ) -> Result<HashSet<Hash>, GcError> {
        let mut live: HashSet<Hash> = HashSet::new();
        for item in point.iterator_cf(self.cf(CF_MANIFESTS), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(GcError::Index)?;
            let m = manifest::decode(&v).map_err(|e| {
                GcError::CorruptManifest(String::from_utf8_lossy(&k).into_owned(), e)
            })?;
            live.extend(m.distinct_chunks());
        }
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_total_order_seek(true);
        let mut unreferenced = HashSet::new();
        for item in point.iterator_cf_opt(self.cf(CF_CHUNKS), ro, rocksdb::IteratorMode::Start) {
            let (k, _) = item.map_err(GcError::Index)?;
            let hash = <Hash>::try_from(&k[..]).map_err(|_| GcError::CorruptEntry)?;
            if !live.contains(&hash) {
                unreferenced.insert(hash);
            }
        }
        Ok(unreferenced)
    }

    /// Drops the index entries of `candidates` (unreferenced at a point in time) that no
    /// manifest of `committed` (those written since) references, where they are now, and
    /// counts their bytes dead; `writer` and `dead` held by the caller.
    fn drop_unreferenced(
        &self,
        mut candidates: HashSet<Hash>,
        committed: &[String],
        dead: &mut BTreeMap<u32, u64>,
    ) -> Result<u64, GcError> {
        for id in committed {
            match self.load_manifest(id) {
                Ok(m) => {
                    for h in m.distinct_chunks() {
                        candidates.remove(&h);
                    }
                }
                // Deleted since: it protects nothing.
                Err(ViewError::NotFound(_)) => {}
                Err(e) => return Err(GcError::Manifest(e)),
            }
        }
        let mut batch = WriteBatch::default();
        let mut now_dead = dead.clone();
        let mut dropped = 0u64;
        for hash in candidates {
            // Where it is now (a compaction may have moved it since).
            let Some(e) = self.get_entry(&hash).map_err(GcError::Index)? else {
                continue;
            };
            batch.delete_cf(self.cf(CF_CHUNKS), hash);
            *now_dead.entry(e.location.pack).or_default() += e.location.record_len();
            dropped += 1;
        }
        if dropped > 0 {
            batch.put_cf(self.cf(CF_META), META_DEAD, encode_dead(&now_dead));
            self.commit(batch).map_err(GcError::Index)?;
            *dead = now_dead;
        }
        Ok(dropped)
    }

    /// Bytes of pack files that hold no live chunk (as recorded; chunks a delete left
    /// unreferenced count once swept; [`Store::gc`] measures).
    pub fn dead_bytes(&self) -> u64 {
        lock(&self.dead).values().sum()
    }

    /// The packs `policy` would rewrite now and the dead bytes they hold together.
    pub fn reclaimable(&self, policy: &CompactPolicy) -> io::Result<(Vec<u32>, u64)> {
        let writer = lock(&self.writer);
        let dead = lock(&self.dead);
        let mut victims = Vec::new();
        let mut total = 0;
        for (&n, &d) in dead.iter() {
            let size = if n == writer.number {
                writer.len()
            } else {
                match fs::metadata(pack::pack_path(&self.packs_dir, n)) {
                    Ok(m) => m.len(),
                    // Already removed (the map drops it at the next open).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            };
            if d > 0
                && d.saturating_mul(100) >= size.saturating_mul(u64::from(policy.pack_dead_percent))
            {
                victims.push(n);
                total += d;
            }
        }
        Ok((victims, total))
    }

    /// Sweeps if a delete came since the last sweep ([`Store::sweep_if_due`]; a failed
    /// sweep is logged, and the dead bytes already counted are still reclaimed), then
    /// rewrites the packs `policy` selects, one at a time (ingests and deletes wait only for
    /// the pack being rewritten, or a sweep's drop), if together they hold at least its
    /// `min_reclaim_bytes`. Reads go on throughout. What the daemon runs in the background.
    pub fn compact(&self, policy: &CompactPolicy) -> Result<GcReport, GcError> {
        // A failed sweep leaves the dead bytes already counted to reclaim.
        if let Err(e) = self.sweep_if_due() {
            tracing::warn!(error = %crate::error_chain(&e), "sweep failed");
        }
        let mut rep = GcReport {
            bytes_before: self.pack_bytes().map_err(GcError::Pack)?,
            ..GcReport::default()
        };
        let (victims, total) = self.reclaimable(policy).map_err(GcError::Pack)?;
        if total < policy.min_reclaim_bytes.max(1) {
            rep.bytes_after = rep.bytes_before;
            return Ok(rep);
        }
        for n in victims {
            let mut writer = lock(&self.writer);
            let mut dead = lock(&self.dead);
            if !dead.contains_key(&n) {
                continue;
            }
            rep.chunks_moved += self.compact_pack(&mut writer, &mut dead, n)?;
            rep.packs_compacted += 1;
        }
        rep.bytes_after = self.pack_bytes().map_err(GcError::Pack)?;
        tracing::info!(?rep, "compaction done");
        Ok(rep)
    }

    /// Reclaims every dead byte: measures them from the index (correcting the recorded
    /// counts), then rewrites every pack that holds any (moving its live records to the active
    /// pack) or removes it when none is live.
    pub fn gc(&self) -> Result<GcReport, GcError> {
        let _one = lock(&self.sweeping);
        let mut writer = lock(&self.writer);
        let mut rep = GcReport {
            bytes_before: self.pack_bytes().map_err(GcError::Pack)?,
            ..GcReport::default()
        };
        let mut dead = lock(&self.dead);
        // The writer lock held throughout: nothing commits meanwhile.
        self.sweep_due.store(false, Ordering::Release);
        let point = self.db.snapshot();
        let unreferenced = self.unreferenced_at(&point);
        drop(point);
        self.drop_unreferenced(unreferenced?, &[], &mut dead)?;
        self.remeasure_dead(&writer, &mut dead)?;
        let victims: Vec<u32> = dead.keys().copied().collect();
        for n in victims {
            rep.chunks_moved += self.compact_pack(&mut writer, &mut dead, n)?;
            rep.packs_compacted += 1;
        }
        rep.bytes_after = self.pack_bytes().map_err(GcError::Pack)?;
        tracing::info!(?rep, "gc done");
        Ok(rep)
    }

    /// Replaces the recorded dead counts with [`Store::measure_dead`]'s, durably first
    /// (`writer` and `dead` held: nothing changes either meanwhile).
    fn remeasure_dead(
        &self,
        writer: &PackWriter,
        dead: &mut BTreeMap<u32, u64>,
    ) -> Result<(), GcError> {
        let measured = self.measure_dead(writer)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), META_DEAD, encode_dead(&measured));
        self.db
            .write_opt(batch, &sync_opts())
            .map_err(GcError::Index)?;
        *dead = measured;
        Ok(())
    }

    /// Dead bytes per pack from a scan of the index (`writer` held: nothing changes it).
    fn measure_dead(&self, writer: &PackWriter) -> Result<BTreeMap<u32, u64>, GcError> {
        let mut live: HashMap<u32, u64> = HashMap::new();
        for item in self.chunk_scan() {
            let (_, v) = item.map_err(GcError::Index)?;
            let e = ChunkEntry::decode(&v).ok_or(GcError::CorruptEntry)?;
            *live.entry(e.location.pack).or_default() += e.location.record_len();
        }
        let mut dead = BTreeMap::new();
        for n in self.pack_numbers().map_err(GcError::Pack)? {
            let size = if n == writer.number {
                writer.len()
            } else {
                fs::metadata(pack::pack_path(&self.packs_dir, n))
                    .map_err(GcError::Pack)?
                    .len()
            };
            let d = size
                .saturating_sub(PACK_HEADER_LEN)
                .saturating_sub(live.get(&n).copied().unwrap_or(0));
            if d > 0 {
                dead.insert(n, d);
            }
        }
        Ok(dead)
    }

    /// Moves pack `n`'s live records (those the index points at) to the active pack, commits
    /// their new places and the dead counts without `n`, then removes `n`. The active pack is
    /// sealed first if it is `n`. A pack that does not scan to its end, or whose live records
    /// do not verify, is left as it is.
    fn compact_pack(
        &self,
        writer: &mut PackWriter,
        dead: &mut BTreeMap<u32, u64>,
        n: u32,
    ) -> Result<u64, GcError> {
        if n == writer.number {
            self.rotate(writer).map_err(GcError::Pack)?;
        }
        let file = self.pack_file(n).map_err(GcError::Pack)?;
        let (records, end) = pack::scan_pack(&file, n).map_err(GcError::Pack)?;
        let size = file.metadata().map_err(GcError::Pack)?.len();
        if end != size {
            return Err(GcError::Unreadable {
                pack: n,
                offset: end,
            });
        }
        let mut moved: Vec<(Hash, ChunkEntry)> = Vec::new();
        let mut record = Vec::new();
        for r in records {
            let Some(e) = self.get_entry(&r.hash).map_err(GcError::Index)? else {
                continue;
            };
            if e.location != r.location {
                continue;
            }
            if !r.valid {
                return Err(GcError::CorruptLive {
                    pack: n,
                    offset: r.location.offset,
                });
            }
            record.resize(r.location.record_len() as usize, 0);
            file.read_exact_at(&mut record, r.location.offset)
                .map_err(GcError::Pack)?;
            let location = writer
                .append_encoded(&record, r.location.stored_len, r.location.raw_len)
                .map_err(GcError::Pack)?;
            moved.push((r.hash, ChunkEntry { location }));
        }
        let committed = writer.sync().map_err(GcError::Pack)?;
        // Recorded as wholly dead until it is gone: a crash before the removal leaves a pack
        // the next compaction removes, not one nothing accounts for.
        let mut now_dead = dead.clone();
        now_dead.insert(n, size.saturating_sub(PACK_HEADER_LEN));
        let mut batch = WriteBatch::default();
        for (hash, e) in &moved {
            batch.put_cf(self.cf(CF_CHUNKS), hash, e.encode());
        }
        let meta = self.cf(CF_META);
        batch.put_cf(meta, META_ACTIVE, u64::from(writer.number).to_le_bytes());
        batch.put_cf(meta, META_COMMITTED, committed.to_le_bytes());
        batch.put_cf(meta, META_DEAD, encode_dead(&now_dead));
        {
            let _g = self
                .gc_lock
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Moved entries carry no count a format 1 binary could trust.
            self.commit(batch).map_err(GcError::Index)?;
            *dead = now_dead;
            lock(&self.readers).remove(&n);
            fs::remove_file(pack::pack_path(&self.packs_dir, n)).map_err(GcError::Pack)?;
            dead.remove(&n);
        }
        File::open(&self.packs_dir)
            .and_then(|d| d.sync_all())
            .map_err(GcError::Pack)?;
        Ok(moved.len() as u64)
    }

    /// Starts a new active pack (recorded in the index with the next commit).
    fn rotate(&self, writer: &mut PackWriter) -> io::Result<()> {
        writer.sync()?;
        *writer = PackWriter::create(&self.packs_dir, writer.number + 1)?;
        Ok(())
    }
}

/// `pack.dead`: (pack number u32, dead bytes u64) little-endian pairs.
fn encode_dead(dead: &BTreeMap<u32, u64>) -> Vec<u8> {
    let mut v = Vec::with_capacity(dead.len() * 12);
    for (n, d) in dead {
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&d.to_le_bytes());
    }
    v
}

/// The inverse of [`encode_dead`]; `None` for anything malformed (then measured again).
fn decode_dead(v: &[u8]) -> Option<BTreeMap<u32, u64>> {
    if !v.len().is_multiple_of(12) {
        return None;
    }
    v.chunks_exact(12)
        .map(|c| {
            Some((
                u32::from_le_bytes(c[..4].try_into().ok()?),
                u64::from_le_bytes(c[4..].try_into().ok()?),
            ))
        })
        .collect()
}

fn child_prefix(parent: &str) -> Vec<u8> {
    let mut k = parent.as_bytes().to_vec();
    k.push(0);
    k
}

fn child_key(parent: &str, child: &str) -> Vec<u8> {
    let mut k = child_prefix(parent);
    k.extend_from_slice(child.as_bytes());
    k
}

/// Removes pack files numbered after `active` (created by an ingest that never committed).
fn remove_packs_after(dir: &Path, active: u32) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if let Some(n) = e.file_name().to_str().and_then(pack::parse_pack_name)
            && n > active
        {
            tracing::warn!(pack = n, "removing uncommitted pack");
            fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// State of one ingest: chunks this snapshot references, written or found.
/// A chunk the store did not have, encoded as its pack record.
#[derive(Debug)]
struct EncodedChunk {
    hash: Hash,
    record: Vec<u8>,
    stored_len: u32,
    raw_len: u32,
}

/// Blob `data`'s pieces of [`BLOB_CHUNK_LEN`], each hashed and encoded as a pack record;
/// none for a blob small enough ([`INLINE_BLOB_MAX`]) to live in its manifest.
fn encode_blob(data: &[u8]) -> Result<Vec<EncodedChunk>, CreateError> {
    if data.len() <= INLINE_BLOB_MAX {
        return Ok(Vec::new());
    }
    data.chunks(BLOB_CHUNK_LEN)
        .map(|piece| encode_chunk(blake3::hash(piece).as_bytes(), piece))
        .collect()
}

/// `raw` with address `h` as a pack record (compressed when that is smaller).
fn encode_chunk(h: &Hash, raw: &[u8]) -> Result<EncodedChunk, CreateError> {
    let mut record = Vec::new();
    pack::encode_record(h, raw, &mut record).map_err(CreateError::Pack)?;
    Ok(EncodedChunk {
        hash: *h,
        stored_len: (record.len() - pack::RECORD_HEADER_LEN) as u32,
        raw_len: raw.len() as u32,
        record,
    })
}

/// One batch of pages, read and hashed: each page's hash (`None`: all zero), the index
/// entries of chunks the store has, the records of those it does not.
#[derive(Debug)]
struct Scanned {
    hashes: Vec<Option<Hash>>,
    found: Vec<Hash>,
    missing: Vec<EncodedChunk>,
}

/// Reads pages `batch` (first page, count) of `memory` into `buf`, hashes them, looks up in
/// one sorted multi-get the chunks neither `known` nor the batch has seen, and encodes the
/// missing ones (compression happens here, on the worker).
fn scan_batch(
    store: &Store,
    memory: &dyn PageSource,
    (start, n): (u64, usize),
    ps: u32,
    zero: &[u8],
    known: &HashSet<Hash>,
    buf: &mut [u8],
) -> Result<Scanned, CreateError> {
    let ps = ps as usize;
    let bytes = &mut buf[..n * ps];
    memory
        .read_at(start * ps as u64, bytes)
        .map_err(CreateError::Source)?;
    let hashes: Vec<Option<Hash>> = bytes
        .chunks_exact(ps)
        .map(|page| (page != zero).then(|| *blake3::hash(page).as_bytes()))
        .collect();
    let mut lookup: Vec<(usize, Hash)> = Vec::new();
    let mut asked = HashSet::new();
    for (i, h) in hashes.iter().enumerate() {
        if let Some(h) = h
            && !known.contains(h)
            && asked.insert(*h)
        {
            lookup.push((i, *h));
        }
    }
    let mut scanned = Scanned {
        hashes,
        found: Vec::new(),
        missing: Vec::new(),
    };
    if lookup.is_empty() {
        return Ok(scanned);
    }
    // Sorted keys let rocksdb walk the table files' blocks in one pass (the memtable is
    // hashed: each key is a bucket).
    lookup.sort_unstable_by_key(|a| a.1);
    let keys: Vec<&[u8]> = lookup.iter().map(|(_, h)| h.as_slice()).collect();
    let found = store
        .db
        .batched_multi_get_cf(store.cf(CF_CHUNKS), keys, true);
    for ((i, h), res) in lookup.iter().zip(found) {
        match res.map_err(CreateError::Index)? {
            Some(v) => {
                ChunkEntry::decode(&v).ok_or(CreateError::CorruptEntry)?;
                scanned.found.push(*h);
            }
            None => scanned
                .missing
                .push(encode_chunk(h, &bytes[i * ps..(i + 1) * ps])?),
        }
    }
    Ok(scanned)
}

struct Ingest<'a> {
    store: &'a Store,
    writer: &'a mut PackWriter,
    /// Chunks this ingest found stored or appended.
    known: HashSet<Hash>,
    /// Those it appended, with their entries (what its commit writes to the index).
    appended: Vec<(Hash, ChunkEntry)>,
    chunks_written: u64,
    bytes_written: u64,
}

impl<'a> Ingest<'a> {
    /// An ingest appending to `writer`, nothing known or written yet.
    fn new(store: &'a Store, writer: &'a mut PackWriter) -> Ingest<'a> {
        Ingest {
            store,
            writer,
            known: HashSet::new(),
            appended: Vec::new(),
            chunks_written: 0,
            bytes_written: 0,
        }
    }

    /// Takes one scanned batch: chunks the store has (remembered, so later batches skip
    /// their lookup), and records of chunks it does not (appended unless an earlier batch
    /// appended the same chunk).
    fn absorb(&mut self, found: Vec<Hash>, missing: Vec<EncodedChunk>) -> Result<(), CreateError> {
        self.known.extend(found);
        for m in missing {
            if self.known.insert(m.hash) {
                self.append_encoded(&m)?;
            }
        }
        Ok(())
    }

    /// Appends an encoded chunk to the pack being written (a new pack when it is full).
    fn append_encoded(&mut self, m: &EncodedChunk) -> Result<ChunkEntry, CreateError> {
        if self.writer.len() >= PACK_TARGET_LEN {
            self.store.rotate(self.writer).map_err(CreateError::Pack)?;
        }
        let location = self
            .writer
            .append_encoded(&m.record, m.stored_len, m.raw_len)
            .map_err(CreateError::Pack)?;
        self.chunks_written += 1;
        self.bytes_written += location.record_len();
        let entry = ChunkEntry { location };
        self.appended.push((m.hash, entry));
        Ok(entry)
    }

    fn store_blob(&mut self, data: &[u8]) -> Result<BlobRef, CreateError> {
        self.store_encoded_blob(data, encode_blob(data)?)
    }

    /// Stores blob `data`, whose pieces [`encode_blob`] gave: in the manifest when it has
    /// none, else each piece appended unless the store has it already.
    fn store_encoded_blob(
        &mut self,
        data: &[u8],
        pieces: Vec<EncodedChunk>,
    ) -> Result<BlobRef, CreateError> {
        if pieces.is_empty() {
            return Ok(BlobRef::Inline(data.to_vec()));
        }
        let hashes = pieces.iter().map(|p| p.hash).collect();
        for piece in pieces {
            if self.known.insert(piece.hash)
                && self
                    .store
                    .get_entry(&piece.hash)
                    .map_err(CreateError::Index)?
                    .is_none()
            {
                self.append_encoded(&piece)?;
            }
        }
        Ok(BlobRef::Chunks {
            len: data.len() as u64,
            hashes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pages` distinct, non-zero pages.
    fn memory(pages: usize, seed: u8) -> Vec<u8> {
        (0..pages * 4096)
            .map(|i| ((i / 4096) as u8) ^ ((i / 4096 / 256) as u8 * 31) ^ seed ^ (i % 253) as u8)
            .collect()
    }

    fn request(mem: &[u8]) -> CreateRequest<'_> {
        CreateRequest {
            memory: Box::new(mem),
            page_size: DEFAULT_PAGE_SIZE,
            parent: None,
            dirty_pages: None,
            blobs: BTreeMap::new(),
            labels: BTreeMap::new(),
            touch_order: Vec::new(),
        }
    }

    fn format(store: &Store) -> Option<Vec<u8>> {
        store
            .db
            .get_cf(store.cf(CF_META), META_FORMAT)
            .expect("get")
    }

    /// A format 1 store (a reference count in each entry) is read as it is; its first
    /// write records format 2; its counts are never read, and its chunks go once
    /// unreferenced.
    #[test]
    fn a_format_1_store_is_read_as_is_and_its_first_write_makes_it_format_2() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mem = memory(64, 1);
        let id = {
            let store = Store::open(dir.path()).expect("open");
            let id = store.create(&request(&mem)).expect("create").id;
            // As format 1 wrote it: the format, and a count of 3 in every entry.
            let mut batch = WriteBatch::default();
            for item in store.chunk_scan() {
                let (k, v) = item.expect("entry");
                let mut v = v.to_vec();
                v[20..28].copy_from_slice(&3u64.to_le_bytes());
                batch.put_cf(store.cf(CF_CHUNKS), k, v);
            }
            let counted = u64::from(STORE_FORMAT_COUNTED).to_le_bytes();
            batch.put_cf(store.cf(CF_META), META_FORMAT, counted);
            store.db.write(batch).expect("write");
            id
        };
        let v1 = Some(u64::from(STORE_FORMAT_COUNTED).to_le_bytes().to_vec());
        let store = Store::open(dir.path()).expect("a format 1 store opens");
        assert_eq!(store.read_all(&id).expect("read"), mem);
        assert!(store.check().expect("check").is_ok());
        assert_eq!(format(&store), v1, "reads leave it format 1");
        let chunks = store.stats().expect("stats").chunks;
        assert!(chunks > 60, "{chunks}");
        store.delete(&id).expect("delete");
        let v2 = Some(u64::from(STORE_FORMAT_VERSION).to_le_bytes().to_vec());
        assert_eq!(format(&store), v2, "the delete recorded format 2");
        assert_eq!(
            store.sweep().expect("sweep"),
            chunks,
            "counts of 3 kept nothing"
        );
        assert_eq!(store.stats().expect("stats").chunks, 0);
    }

    /// A create that commits while a sweep marks (without the writer lock) keeps the
    /// chunks it found stored unreferenced: the sweep marks what was committed meanwhile.
    #[test]
    fn a_create_during_a_sweeps_mark_keeps_the_chunks_it_references() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mem = memory(300, 2);
        let first = store.create(&request(&mem)).expect("create").id;
        let chunks = store.stats().expect("stats").chunks;
        assert!(chunks > 250, "{chunks}");
        store.delete(&first).expect("delete");
        // A sweep's first step: the point it marks at, commits noted from here on.
        let point = {
            let _writer = lock(&store.writer);
            *lock(&store.sweep_log) = Some(Vec::new());
            store.db.snapshot()
        };
        // Meanwhile the same pages again: every chunk found indexed, none written.
        let again = store.create(&request(&mem)).expect("create");
        assert_eq!(again.chunks_written, 0);
        let candidates = store.unreferenced_at(&point).expect("mark");
        drop(point);
        assert_eq!(candidates.len() as u64, chunks, "unreferenced at the point");
        let _writer = lock(&store.writer);
        let mut dead = lock(&store.dead);
        let committed = lock(&store.sweep_log).take().expect("noting");
        assert_eq!(committed, vec![again.id.clone()]);
        assert_eq!(
            store
                .drop_unreferenced(candidates.clone(), &committed, &mut dead)
                .expect("drop"),
            0
        );
        drop((dead, _writer));
        assert_eq!(store.read_all(&again.id).expect("read"), mem);
        assert!(store.check().expect("check").is_ok());
    }

    /// A source whose read fails part way through.
    #[derive(Debug)]
    struct FailingAt(Vec<u8>, u64);

    impl PageSource for FailingAt {
        fn len(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            if offset >= self.1 {
                return Err(io::Error::other("the source failed"));
            }
            buf.copy_from_slice(&self.0[offset as usize..][..buf.len()]);
            Ok(())
        }
    }

    /// An ingest whose source fails in a later batch, on several workers, fails as a
    /// whole, appends nothing that stays, and leaves the store as it was.
    #[test]
    fn an_ingest_whose_source_fails_part_way_fails_whole_on_every_thread_count() {
        for threads in [1, 2, 4] {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(dir.path()).expect("open");
            store.set_ingest_threads(threads);
            let mem = memory(2000, 3);
            let fail_at = 1500 * 4096;
            let mut req = request(&mem);
            req.memory = Box::new(FailingAt(mem.clone(), fail_at));
            let err = store.create(&req).expect_err("the source failed");
            assert!(matches!(err, CreateError::Source(_)), "{threads}: {err:?}");
            assert_eq!(store.list().expect("list").len(), 0);
            assert_eq!(store.stats().expect("stats").chunks, 0, "{threads}");
            let ok = store.create(&request(&mem)).expect("a create after it");
            assert_eq!(store.read_all(&ok.id).expect("read"), mem);
            assert!(store.check().expect("check").is_ok());
        }
    }
}
