//! The client of snapshotd (Fissile's snapshot store and page server): what VMMs, tools and
//! tests link to talk to the daemon. No store here (no rocksdb, no zstd): the daemon is
//! `fissile-snapshotd`, which re-exports these modules.
//!
//! * [`client`]: create snapshots, open images and layers, fault sessions, lazy memory.
//! * [`fdio`]: frames with file descriptors attached (SCM_RIGHTS).
//! * [`sys`]: the system calls libc does not wrap safely (memfd, seals, mmap, poll, fcntl).

pub mod client;
pub mod fdio;
pub mod sys;

pub use fissile_proto::error_chain;
