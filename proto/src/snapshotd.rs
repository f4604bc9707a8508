//! The snapshotd protocol: VMMs and tools talk to the snapshot daemon over a unix stream
//! socket.
//!
//! # Framing
//! Every message is one [`crate::frame`] frame with version byte
//! [`SNAPSHOTD_PROTOCOL_VERSION`] and a cap of [`SNAPSHOTD_FRAME_CAP`] (1 MiB) in both
//! directions. Requests are small; page lists and blobs are sent in pieces of at most
//! [`MAX_PAGES_PER_MESSAGE`] indexes / [`MAX_BLOB_PIECE`] bytes.
//!
//! # File descriptors
//! Requests that hand over a descriptor ([`Request::CreateBegin`]: the memory, a memfd or
//! any readable file; [`Request::ServeFaults`]: a userfaultfd) carry exactly one fd as
//! `SCM_RIGHTS` on the `sendmsg` that sends the frame's first byte. The reply to
//! [`Request::OpenImage`] ([`Response::ImageOpened`]) carries the image memfd the same way,
//! and the reply to [`Request::OpenLayer`] ([`Response::LayerOpened`]) the memfd of the
//! layer's own pages.
//!
//! # Conversation
//! Strict request/response, one outstanding request per connection, except:
//! * create: `CreateBegin` (+fd), then any number of `CreatePages`, `CreateTouchOrder`,
//!   `CreateBlob`, then `CreateCommit` (→ `Created`) or `CreateAbort`. The pieces are
//!   answered with `Ok`. `Created { durable: true }` is sent only once the snapshot's chunks
//!   and manifest are durable: that is the acknowledgement. An *adopting* create
//!   (`adopt: true`, the fd a sealed memfd) may commit with `wait_durable: false`: the memfd
//!   becomes the snapshot's image at once (so VMMs can map it: fork), `Created { durable:
//!   false }` comes back immediately, and the store ingests it in the background;
//!   `WaitDurable` blocks until that is done. A daemon that dies first loses the snapshot
//!   (it was never acknowledged as durable).
//! * fault session: `ServeFaults` (+uffd) → `FaultSessionStarted`; from then on the
//!   connection carries only daemon → client [`Response::Heartbeat`] every
//!   [`HEARTBEAT_INTERVAL_MS`] and, on failure, one [`Response::SessionFailed`]. The session
//!   ends when either side closes. A client that sees no heartbeat for
//!   [`HEARTBEAT_TIMEOUT_MS`] must treat the page server as gone.

use serde::{Deserialize, Serialize};

/// Version byte of every snapshotd frame.
pub const SNAPSHOTD_PROTOCOL_VERSION: u8 = 5;
/// Cap on one frame, both directions.
pub const SNAPSHOTD_FRAME_CAP: u32 = 1 << 20;
/// Most page indexes in one `CreatePages` / `CreateTouchOrder`.
pub const MAX_PAGES_PER_MESSAGE: usize = 64 * 1024;
/// Most bytes in one `CreateBlob` piece or `Blob` reply.
pub const MAX_BLOB_PIECE: usize = 512 * 1024;
/// Most VM-state bytes per snapshot (all blobs together).
pub const MAX_BLOBS_TOTAL: u64 = 256 << 20;
/// Longest snapshot id, blob name, label key or value.
pub const MAX_NAME_LEN: usize = 256;
/// Most labels per snapshot.
pub const MAX_LABELS: usize = 64;
/// Labels with this prefix are the daemon's own: a create that gives one is refused.
pub const RESERVED_LABEL_PREFIX: &str = "fissile.";
/// The label of a snapshot the store wrote as a full manifest because its parent chain was
/// too long (its `parent` is then `None`): the parent it was made over. Only the daemon sets
/// it ([`RESERVED_LABEL_PREFIX`]), so a lineage check may follow it.
pub const LABEL_FLATTENED_FROM: &str = "fissile.flattened_from";
/// Most regions in one `ServeFaults`.
pub const MAX_REGIONS: usize = 64;
/// Most snapshots listed in one `List` reply.
pub const MAX_LIST: usize = 2048;
/// Most runs of pages in one `LayerOpened` (each becomes a mapping of its own in the VMM; a
/// layer with more is opened as an image with a fault session).
pub const MAX_LAYER_RUNS: usize = 4096;
/// Most layers in one `OpenLayer` chain (the layer asked for and those below it). Each
/// round of fork and merge lays two more under a parent's next fork (its fork snapshot and
/// the winner's); what bounds a VM's mappings is the runs of all its layers together.
pub const MAX_LAYER_DEPTH: u32 = 32;
/// snapshotd flattens a layered snapshot with this many layered snapshots below it after its
/// ingest (`serve --flatten-below`): its image gets every page and counts as complete, so
/// layers over it chain from it and a chain never outgrows [`MAX_LAYER_DEPTH`] in rounds of
/// fork and merge.
pub const FLATTEN_BELOW: u32 = MAX_LAYER_DEPTH / 2;
/// Interval of fault-session heartbeats. A beat wakes each idle session's client watchdog
/// (there may be thousands of idle children) and the daemon's one heartbeat thread; 7 beats
/// fit in [`HEARTBEAT_TIMEOUT_MS`], so a heartbeat kept off a CPU for 13 s still raises no
/// false alarm. Either side may change it as long as it stays well under the timeout.
pub const HEARTBEAT_INTERVAL_MS: u64 = 2000;
/// A client that hears nothing for this long declares the page server gone. A daemon that
/// dies closes the session socket, which the client sees at once; this bound is only for a
/// daemon that is alive but stuck, so it is generous: a loaded host (or the lab, 10-50x
/// slower than hardware) can keep the heartbeat thread off a CPU for seconds, and a false
/// alarm stops a healthy VM.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 15_000;

/// `pages` (ascending) as runs `(first page, pages)` of consecutive pages: how a layer's
/// own pages travel in `LayerOpened` and are mapped.
pub fn page_runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

/// One guest memory region served by a fault session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Start address in the client's address space (page aligned).
    pub base: u64,
    /// Length in bytes (page aligned).
    pub len: u64,
    /// Snapshot whose image backs the region.
    pub snapshot: String,
    /// Byte offset of `base` within the snapshot's memory (page aligned).
    pub offset: u64,
    /// The image object the client mapped (`ImageOpened::instance`): a session for an image
    /// that was dropped and opened again since is refused (`Conflict`), never served into a
    /// memfd the client does not map.
    pub instance: u64,
}

/// Client → daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness check → `Pong`.
    Ping,
    /// Start a snapshot of the attached memory fd (`memory_size` bytes from offset 0).
    /// With `parent` and `dirty_only`, only pages listed by `CreatePages` are read.
    CreateBegin {
        /// Bytes of memory.
        memory_size: u64,
        /// Page size (4096 unless the VMM uses larger pages).
        page_size: u32,
        /// Layer on this snapshot.
        parent: Option<String>,
        /// Only the pages listed by `CreatePages` may differ from the parent.
        dirty_only: bool,
        /// Labels.
        labels: Vec<(String, String)>,
        /// The fd is a memfd sealed with `F_SEAL_FUTURE_WRITE | F_SEAL_SHRINK | F_SEAL_GROW`
        /// that the daemon keeps as the snapshot's image: with `dirty_only` it holds the
        /// dirty pages (the rest come from the parent's image), otherwise the whole memory
        /// (holes are zero pages). The client must no longer write to it.
        adopt: bool,
    },
    /// More dirty page indexes.
    CreatePages {
        /// Page indexes.
        pages: Vec<u64>,
    },
    /// More of the first-touch order.
    CreateTouchOrder {
        /// Page indexes in order.
        pages: Vec<u64>,
    },
    /// Append `data` to the named VM-state blob.
    CreateBlob {
        /// Blob name.
        name: String,
        /// Next piece.
        data: Vec<u8>,
    },
    /// Ingest → `Created`. With `wait_durable` (always, unless the create adopts its
    /// memfd) the reply comes once the snapshot is durable.
    CreateCommit {
        /// Reply only once the snapshot is durable.
        wait_durable: bool,
    },
    /// Drop the pending create.
    CreateAbort,
    /// Get the snapshot's shared image memfd → `ImageOpened` + fd.
    OpenImage {
        /// Snapshot id.
        snapshot: String,
    },
    /// Serve faults of the attached userfaultfd for these regions; turns the connection into
    /// a fault session.
    ServeFaults {
        /// The client's mappings.
        regions: Vec<Region>,
    },
    /// Describe one snapshot → `Info`.
    Info {
        /// Snapshot id.
        snapshot: String,
    },
    /// Read `MAX_BLOB_PIECE` bytes of a blob from `offset` → `Blob`.
    GetBlob {
        /// Snapshot id.
        snapshot: String,
        /// Blob name.
        name: String,
        /// Byte offset.
        offset: u64,
    },
    /// List snapshots → `List`.
    List,
    /// Delete a snapshot → `Ok`.
    Delete {
        /// Snapshot id.
        snapshot: String,
    },
    /// Store figures → `Stats`.
    Stats,
    /// Wait until a snapshot is durable → `Ok` (or `Error` if its ingest failed).
    WaitDurable {
        /// Snapshot id.
        snapshot: String,
    },
    /// Let the jailed VMM of `uid` read these snapshots (and their ancestors) → `Ok`. Only
    /// the orchestrator may grant (a peer that is not a jailed VMM); a jailed VMM may use
    /// only what it was granted and what it created itself. `reset` forgets earlier grants
    /// first (a new VMM with a reused uid).
    Grant {
        /// The VMM's uid.
        uid: u32,
        /// Snapshot ids (at most [`MAX_GRANT`]).
        snapshots: Vec<String>,
        /// Forget this uid's earlier grants first.
        reset: bool,
    },
    /// The daemon's memory by owner → `Memory`. Last, like every addition: postcard numbers
    /// variants by position, so a new one in the middle would renumber the rest for peers
    /// of an older build; and a request of its own, not more fields on `Stats`, which an
    /// older daemon still answers.
    Memory,
    /// How a layer adopted from a fork maps without a fault session → `LayerOpened` + the
    /// read-only memfd of its own pages (at their offsets in the memory). Only for a layer
    /// whose other pages all come from open adopted layers (at most [`MAX_LAYER_DEPTH`])
    /// over an image that is complete and open; otherwise an `Error` (`BadRequest`), and the
    /// client opens the layer's image as usual.
    OpenLayer {
        /// The layer's snapshot id.
        snapshot: String,
    },
}

/// Most snapshots one `Grant` names.
pub const MAX_GRANT: usize = 64;

/// Description of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Id.
    pub id: String,
    /// Memory size in bytes.
    pub memory_size: u64,
    /// Page size.
    pub page_size: u32,
    /// Parent snapshot.
    pub parent: Option<String>,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Blob names.
    pub blobs: Vec<String>,
    /// Creation time (ms since the epoch).
    pub created_unix_ms: u64,
    /// True once its chunks and manifest are durable in the store.
    pub durable: bool,
}

/// Where the daemon's heap goes (`Memory`). Its anonymous RSS less the index's figures and
/// the heap malloc keeps free is the daemon's own heap; the images it serves are memfds,
/// outside its heap (`Stats::image_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFigures {
    /// The index's block cache: bytes in it (data, index and filter blocks).
    pub index_cache_bytes: u64,
    /// The block cache's capacity.
    pub index_cache_capacity: u64,
    /// The index's memtables, all column families.
    pub index_memtable_bytes: u64,
    /// The index's table readers outside the block cache.
    pub index_table_reader_bytes: u64,
    /// Heap bytes allocated and in use (malloc's arenas and its own mappings; 0 where the
    /// daemon's C library does not say).
    pub heap_in_use_bytes: u64,
    /// Heap bytes malloc holds free in its arenas (not given back to the system).
    pub heap_free_bytes: u64,
}

impl MemoryFigures {
    /// The heap in use less what the index holds: the daemon's own allocations.
    pub fn own_heap_bytes(&self) -> u64 {
        self.heap_in_use_bytes.saturating_sub(
            self.index_cache_bytes
                .saturating_add(self.index_memtable_bytes)
                .saturating_add(self.index_table_reader_bytes),
        )
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Malformed or out-of-order request, or limits exceeded.
    BadRequest,
    /// The request needed an fd and none came.
    MissingFd,
    /// No such snapshot or blob.
    NotFound,
    /// Stored data failed verification.
    Corrupt,
    /// The operation conflicts with the store's state (e.g. deleting a parent).
    Conflict,
    /// Anything else.
    Internal,
}

/// Daemon → client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Reply to `Ping`.
    Pong,
    /// Generic success.
    Ok,
    /// The snapshot exists: durable, or (adopting create without `wait_durable`) mapped
    /// and being ingested.
    Created {
        /// Its id.
        id: String,
        /// True when its chunks and manifest are durable.
        durable: bool,
    },
    /// The image memfd is attached (map it `MAP_PRIVATE`).
    ImageOpened {
        /// The image object's number, for `Region::instance`.
        instance: u64,
        /// Snapshot id.
        snapshot: String,
        /// Bytes.
        memory_size: u64,
        /// Page size.
        page_size: u32,
        /// Every page is in the memfd already (holes are zero pages): a client may map it
        /// without a fault session.
        complete: bool,
    },
    /// Reply to `Info`.
    Info(SnapshotInfo),
    /// A piece of a blob.
    Blob {
        /// Whole blob length.
        total_len: u64,
        /// Bytes from the requested offset.
        data: Vec<u8>,
    },
    /// Reply to `List`.
    List {
        /// Snapshots (at most `MAX_LIST`).
        snapshots: Vec<SnapshotInfo>,
        /// True if more exist.
        truncated: bool,
    },
    /// Reply to `Stats`.
    Stats {
        /// Snapshots.
        snapshots: u64,
        /// Chunks in the index (a deleted snapshot's until the sweep after the delete).
        chunks: u64,
        /// Raw bytes of all chunks.
        raw_bytes: u64,
        /// Bytes on disk in packs.
        pack_bytes: u64,
        /// Snapshot images open in the daemon.
        images: u64,
        /// Memory those images hold.
        image_bytes: u64,
        /// Faults served since the daemon started, by running fault sessions too.
        faults_served: u64,
    },
    /// The fault session runs.
    FaultSessionStarted,
    /// Fault session liveness, with progress counters.
    Heartbeat {
        /// Faults resolved so far.
        faults: u64,
        /// Pages prefetched so far.
        prefetched: u64,
    },
    /// The fault session stopped serving (the client must stop the VM).
    SessionFailed {
        /// Why.
        message: String,
    },
    /// The request failed.
    Error {
        /// Category.
        code: ErrorCode,
        /// Human-readable cause.
        message: String,
    },
    /// Reply to `Memory` (last, like every addition).
    Memory(MemoryFigures),
    /// Reply to `OpenLayer`: `base` is the layer's parent; with `below` 0 its image is
    /// complete (`OpenImage`), else it is a layer too (`OpenLayer` it). Map the complete
    /// image privately, then each layer's memfd privately over it at its `runs`, the deepest
    /// first. The layer and those below it are at most [`MAX_LAYER_DEPTH`].
    LayerOpened {
        /// The snapshot holding every page the layer does not.
        base: String,
        /// How many of the images from `base` down to the complete one are layers (0:
        /// `base`'s image is complete).
        below: u32,
        /// Bytes.
        memory_size: u64,
        /// Page size.
        page_size: u32,
        /// The layer's own pages as `(first page, pages)`, ascending, apart, at most
        /// [`MAX_LAYER_RUNS`].
        runs: Vec<(u64, u64)>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_become_runs_of_consecutive_pages() {
        assert_eq!(page_runs(&[]), vec![]);
        assert_eq!(
            page_runs(&[3, 4, 5, 9, 11, 12]),
            vec![(3, 3), (9, 1), (11, 2)]
        );
    }
    use crate::frame::{encode_frame, read_frame};

    /// Postcard numbers variants by position: peers of another build (a VMM or a daemon
    /// adopted across an upgrade) agree on these only while variants are only ever added at
    /// the end. A variant inserted in the middle renumbers the rest and fails here.
    #[test]
    fn variant_numbers_on_the_wire_never_change() {
        let number = |bytes: Vec<u8>| bytes[5]; // length (4), version (1), variant
        let req = |r: &Request| number(encode_frame(SNAPSHOTD_PROTOCOL_VERSION, r).unwrap());
        let resp = |r: &Response| number(encode_frame(SNAPSHOTD_PROTOCOL_VERSION, r).unwrap());
        assert_eq!(req(&Request::Ping), 0);
        assert_eq!(req(&Request::List), 11);
        assert_eq!(req(&Request::Stats), 13);
        let wait = Request::WaitDurable {
            snapshot: String::new(),
        };
        assert_eq!(req(&wait), 14);
        let grant = Request::Grant {
            uid: 0,
            snapshots: Vec::new(),
            reset: false,
        };
        assert_eq!(req(&grant), 15);
        assert_eq!(req(&Request::Memory), 16);
        assert_eq!(resp(&Response::Pong), 0);
        assert_eq!(resp(&Response::FaultSessionStarted), 8);
        let beat = Response::Heartbeat {
            faults: 0,
            prefetched: 0,
        };
        assert_eq!(resp(&beat), 9);
        let error = Response::Error {
            code: ErrorCode::Internal,
            message: String::new(),
        };
        assert_eq!(resp(&error), 11);
        let memory = Response::Memory(MemoryFigures {
            index_cache_bytes: 0,
            index_cache_capacity: 0,
            index_memtable_bytes: 0,
            index_table_reader_bytes: 0,
            heap_in_use_bytes: 0,
            heap_free_bytes: 0,
        });
        assert_eq!(resp(&memory), 12);
        let layer = Request::OpenLayer {
            snapshot: String::new(),
        };
        assert_eq!(req(&layer), 17);
        let opened = Response::LayerOpened {
            base: String::new(),
            below: 0,
            memory_size: 0,
            page_size: 0,
            runs: Vec::new(),
        };
        assert_eq!(resp(&opened), 13);
    }

    #[test]
    fn largest_page_list_fits_the_cap() {
        let req = Request::CreatePages {
            pages: vec![u64::MAX; MAX_PAGES_PER_MESSAGE],
        };
        let buf = encode_frame(SNAPSHOTD_PROTOCOL_VERSION, &req).unwrap();
        let got: Request = read_frame(
            &mut &buf[..],
            SNAPSHOTD_PROTOCOL_VERSION,
            SNAPSHOTD_FRAME_CAP,
        )
        .unwrap();
        assert_eq!(got, req);
        let blob = Request::CreateBlob {
            name: "x".repeat(MAX_NAME_LEN),
            data: vec![0xff; MAX_BLOB_PIECE],
        };
        assert!(
            encode_frame(SNAPSHOTD_PROTOCOL_VERSION, &blob)
                .unwrap()
                .len()
                < SNAPSHOTD_FRAME_CAP as usize
        );
    }
}
