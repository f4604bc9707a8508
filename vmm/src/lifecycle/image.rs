//! Guest RAM on a snapshot image: connecting to snapshotd, mapping an image (with a fault
//! session unless it is complete) or a fork's layers over a complete image (none needed),
//! and what a dead page server does to this VMM.

use std::path::Path;

use fissile_proto::snapshotd::{MAX_LAYER_DEPTH, Region};
use fissile_snapshotd_client::client::{
    self as sd, Client, ClientError, OpenedImage, SessionHooks,
};

use crate::memory::{GuestRam, ImageFaults, Layer, MAX_LAYER_MAPPINGS, MemoryError, PAGE_SIZE};
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

/// A snapshot that maps as layers over a complete image, with no fault session
/// ([`open_layered`]).
#[derive(Debug)]
pub(crate) struct Layered {
    /// The complete image.
    pub base: OpenedImage,
    /// The snapshot whose image `base` is.
    pub base_name: String,
    /// The layers, the deepest first (the snapshot's own last).
    pub layers: Vec<Layer>,
    /// The snapshot of each layer, in the same order.
    pub names: Vec<String>,
}

impl Layered {
    /// How many of the layers lie at or below `snapshot`, if it is in this chain (its base,
    /// or one of its layers): the layers after them are what `snapshot` lacks.
    fn at_or_below(&self, snapshot: &str) -> Option<usize> {
        if self.base_name == snapshot {
            return Some(0);
        }
        self.names.iter().position(|n| n == snapshot).map(|i| i + 1)
    }
}

/// `snapshot` as layers over a complete image, if snapshotd hands it out that way (a fork's
/// layer, perhaps over other layers, whose images are open); `None` means the usual way,
/// the snapshot's own image with a fault session. `client` is connected to `socket`; after a
/// refusal it still is (a new connection if the daemon dropped the old one).
pub(crate) fn open_layered(client: &mut Client, socket: &Path, snapshot: &str) -> Option<Layered> {
    let mut layers = Vec::new();
    let mut names = Vec::new();
    let mut sizes = Vec::new();
    let mut name = snapshot.to_string();
    let (base, base_name) = loop {
        let opened = client.open_layer(&name);
        let layer = or_refused(opened, client, socket, &name)?;
        let fits = u64::from(layer.page_size) == PAGE_SIZE
            && layers.len() < MAX_LAYER_DEPTH as usize
            && layer.below < MAX_LAYER_DEPTH;
        if !fits {
            return None;
        }
        let (below, parent) = (layer.below, layer.base.clone());
        sizes.push(layer.memory_size);
        layers.push(Layer {
            pages: layer.pages,
            runs: layer.runs,
        });
        names.push(std::mem::replace(&mut name, parent));
        if below == 0 {
            let opened = client.open_image(&name);
            break (or_refused(opened, client, socket, &name)?, name);
        }
    };
    layers.reverse();
    names.reverse();
    // What snapshotd said, checked before anything is mapped: every memfd as large as the
    // memory, the runs within it, ascending and apart, and not too many of them.
    let size = base.memory_size;
    let fits = base.complete
        && u64::from(base.page_size) == PAGE_SIZE
        && sizes.iter().all(|&s| s == size)
        && layers
            .iter()
            .all(|l| l.pages.metadata().is_ok_and(|m| m.len() >= size))
        && crate::memory::check_layers(&layers, size / PAGE_SIZE).is_ok();
    fits.then_some(Layered {
        base,
        base_name,
        layers,
        names,
    })
}

/// `opened` (a request of [`open_layered`] about `snapshot`), or `None` after logging why.
/// On a failure other than the daemon's answer the connection is in doubt (a daemon of an
/// older build may close it over a request it does not know; a reply may still be on its
/// way, never to be read as the next request's), so `client` becomes a new one (if that
/// fails too, what the caller asks next says why).
fn or_refused<T>(
    opened: Result<T, ClientError>,
    client: &mut Client,
    socket: &Path,
    snapshot: &str,
) -> Option<T> {
    let e = match opened {
        Ok(v) => return Some(v),
        Err(e) => e,
    };
    tracing::debug!(error = %fissile_proto::error_chain(&e), %snapshot, "not opened as layers");
    if !matches!(e, ClientError::Daemon { .. })
        && let Ok(fresh) = Client::connect(socket)
    {
        *client = fresh;
    }
    None
}

/// What a switch of this VM's RAM (merge, rollback) maps ([`open_for_switch`]).
#[derive(Debug)]
pub(crate) enum SwitchTo {
    /// Layers over a complete image: no fault session.
    Layers(Layered),
    /// The snapshot's image (with a fault session unless it is complete).
    Image(OpenedImage),
}

/// Opens `snapshot` for a switch: as layers over a complete image where snapshotd hands it
/// out that way, else its image.
pub(crate) fn open_for_switch(
    client: &mut Client,
    socket: &Path,
    snapshot: &str,
) -> Result<SwitchTo, ClientError> {
    match open_layered(client, socket, snapshot) {
        Some(l) => Ok(SwitchTo::Layers(l)),
        None => client.open_image(snapshot).map(SwitchTo::Image),
    }
}

/// Switches guest RAM to `to` (opened for `snapshot`). The VM must be paused; on an error
/// its memory may be half switched.
///
/// Where `snapshot` is layers over the snapshot RAM is a complete view of now (a winner
/// merged into its fork's parent, or a rollback to this VM's latest snapshot), RAM moves in
/// place ([`GuestRam::advance`]): only the pages this VM wrote and the layers' own pages
/// change, and the guest's working set stays mapped. Else every mapping is replaced.
/// Returns whether RAM moved in place.
pub(crate) fn switch(
    ram: &mut GuestRam,
    socket: &Path,
    snapshot: &str,
    to: SwitchTo,
) -> Result<bool, ImageError> {
    match to {
        SwitchTo::Layers(mut l) => {
            match in_place_from(ram, &l).and_then(|at| Some((at, private_pages(ram)?))) {
                Some((at, private)) => {
                    let layers = l.layers.split_off(at);
                    tracing::info!(
                        snapshot,
                        layers = layers.len(),
                        dropped = private.len(),
                        "switching memory in place"
                    );
                    ram.advance(snapshot, layers, &private)
                        .map_err(ImageError::Memory)?;
                    Ok(true)
                }
                None => ram
                    .switch_to_layers(snapshot, l.base.memfd, l.base.memory_size, l.layers)
                    .map_err(ImageError::Memory)
                    .map(|()| false),
            }
        }
        SwitchTo::Image(image) => attach(ram, socket, snapshot, image, true).map(|()| false),
    }
}

/// Every private copy in RAM (what a move in place drops); `None` (and a full switch, which
/// needs no pagemap) where pagemap cannot be read.
fn private_pages(ram: &GuestRam) -> Option<Vec<u64>> {
    match ram.dirty_and_resident_pages() {
        Ok((private, _)) => Some(private),
        Err(e) => {
            tracing::warn!(error = %fissile_proto::error_chain(&e), "switching memory whole");
            None
        }
    }
}

/// How many of `l`'s layers RAM has already, where RAM can move to `l` in place: RAM is a
/// complete view of a snapshot in `l`'s chain, and RAM's layers with the rest of `l`'s
/// leave room for one more (this VM's next snapshot, a fork's, is then mapped in place too).
fn in_place_from(ram: &GuestRam, l: &Layered) -> Option<usize> {
    let at = l.at_or_below(ram.base_snapshot()?)?;
    let (_, ours) = ram.complete_view()?;
    let more = &l.layers[at..];
    fits_over(ours, more.len() + 1, crate::memory::mappings(more)).then_some(at)
}

/// Whether `depth` more layers making `runs` mappings fit over RAM's layers `ours`: at most
/// [`MAX_LAYER_DEPTH`] layers and [`MAX_LAYER_MAPPINGS`] mappings in all.
pub(crate) fn fits_over(ours: &[Layer], depth: usize, runs: usize) -> bool {
    ours.len() + depth <= MAX_LAYER_DEPTH as usize
        && crate::memory::mappings(ours) + runs <= MAX_LAYER_MAPPINGS
}
