//! Guest RAM on a snapshot image: connecting to snapshotd, mapping an image (with a fault
//! session unless it is complete), and what a dead page server does to this VMM.

use std::path::Path;

use fissile_proto::snapshotd::Region;
use fissile_snapshotd::client::{self as sd, Client, ClientError, OpenedImage, SessionHooks};

use crate::memory::{GuestRam, ImageFaults, MemoryError};
use crate::seccomp::{self, ThreadClass};

/// Mapping a snapshot image as guest RAM failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// snapshotd could not open the image.
    #[error("opening the image in snapshotd")]
    Open(#[source] ClientError),
    /// Replacing the mapping.
    #[error("switching guest memory to the image")]
    Memory(#[source] MemoryError),
    /// The userfaultfd or its fault session.
    #[error("starting the image's fault session")]
    Faults(#[source] ClientError),
}

/// Connects to snapshotd (bounded: the client's connect, read and write timeouts).
pub(crate) fn connect(socket: &Path) -> Result<Client, super::SnapshotError> {
    Client::connect(socket).map_err(super::SnapshotError::Store)
}

/// What a failed page server does to this VMM: the guest's vCPUs may be blocked inside a
/// fault that will never be served, which no signal interrupts, so the process ends at
/// once (`_exit`: no atexit handlers or stdio flushing racing the other threads).
pub(crate) fn page_server_failed(msg: &str) {
    tracing::error!(error = msg, "the page server failed; this VM cannot go on");
    let line = format!("fissile-vmm: the page server (snapshotd) failed: {msg}; stopping\n");
    // SAFETY: write(2) on fd 2 with a valid buffer of `line.len()` bytes, then _exit(2):
    // neither has memory-safety preconditions.
    unsafe {
        libc::write(2, line.as_ptr().cast(), line.len());
        libc::_exit(4);
    }
}

/// Maps `image` of `snapshot` as guest RAM's backing (`switch`: replace the current
/// mapping; else RAM already maps it), with a fault session unless the image is complete.
/// The VM must be paused (or not started yet).
pub(crate) fn attach(
    ram: &mut GuestRam,
    socket: &Path,
    snapshot: &str,
    image: OpenedImage,
    switch: bool,
) -> Result<(), ImageError> {
    if switch {
        ram.switch_to_image(&image.memfd, image.memory_size)
            .map_err(ImageError::Memory)?;
    }
    let faults = if image.complete {
        None
    } else {
        let uffd = sd::new_uffd().map_err(ImageError::Faults)?;
        let mut regions = Vec::new();
        for (addr, len, offset) in ram.host_ranges() {
            sd::register_missing_at(&uffd, addr, len).map_err(ImageError::Faults)?;
            regions.push(Region {
                base: addr as u64,
                len: len as u64,
                snapshot: snapshot.to_string(),
                offset,
                instance: image.instance,
            });
        }
        let session = Client::connect(socket)
            .and_then(|c| {
                let hooks = SessionHooks {
                    thread_start: Some(|| seccomp::enter(ThreadClass::Watchdog)),
                    on_failure: Some(Box::new(page_server_failed)),
                };
                c.serve_faults(&uffd, regions, hooks)
            })
            .map_err(ImageError::Faults)?;
        Some(ImageFaults { session, uffd })
    };
    ram.set_image(snapshot, image.memfd, faults);
    Ok(())
}
