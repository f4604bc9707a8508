//! snapshotd: Fissile's content-addressed snapshot store and page server.
//!
//! * [`store`]: the library. Pages are addressed by blake3, stored once (zstd, append-only
//!   pack files, rocksdb index; unreferenced chunks swept after deletes), verified on
//!   every read.
//! * [`server`]: the daemon. A unix-socket API (protocol in
//!   [`fissile_proto::snapshotd`]) to create snapshots from memory handed over as an fd, to
//!   open lazily materialized shared base images, and to serve userfaultfd faults.
//! * [`seccomp`]: the daemon's filter, on every thread once it serves.
//! * [`client`], [`fdio`], [`sys`]: the client VMMs link to talk to the daemon, re-exported
//!   from `fissile-snapshotd-client`, a crate of its own so that the VMM never links the
//!   store (rocksdb, zstd).
//!
//! # How faults are served (decision)
//! A restored VMM maps the snapshot's image memfd `MAP_PRIVATE` and registers the mapping
//! with userfaultfd (MISSING). Holes fault to snapshotd, which resolves them by writing the
//! page into the *shared* memfd (`pwrite`) and then `UFFDIO_WAKE`: the faulting thread
//! retries and maps the page-cache page, so every VM restored from the same snapshot shares
//! one physical copy of each page it has not written. Zero pages are resolved with
//! `UFFDIO_ZEROPAGE` and never materialized. The alternative, `UFFDIO_COPY` into the
//! faulting view, is slightly cheaper per fault but private to one view (no sharing); the
//! `snapshotd_fault` benchmark measures both on this host.

pub mod process;
pub mod seccomp;
pub mod server;
pub mod store;

pub use fissile_snapshotd_client::{client, fdio, sys};

pub use fissile_proto::error_chain;
