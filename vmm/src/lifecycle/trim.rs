//! Trim: give back the private copies of guest pages that ended as they were in the image.
//!
//! A restored or forked guest writes a few hundred pages as it wakes (kernel data, stacks,
//! page tables, the agent's buffers), and about a third of them end with the image's bytes
//! (a lock taken and released, a count raised and lowered). Each is still a private copy:
//! memory the VM holds alone. Trim compares each copy with the image's page while the VM
//! runs, then compares the equal ones again with the VM paused and its devices quiet and
//! drops those, so they are shared with the image (and every other VM mapping it) again.
//! Only VMs on an image (restored, forked, merged, or booted and snapshotted since); why an
//! image with holes is safe too: [`crate::memory::GuestRam::unchanged_copies`].

use fissile_proto::control::{ErrorKind, TrimReply};

use crate::memory::MemoryError;
use crate::vmm::{QueueError, VmCore};
use crate::vstate::vcpu::ControlError;

/// Trimming failed.
#[derive(Debug, thiserror::Error)]
pub enum TrimError {
    /// Pausing the VM failed.
    #[error("pausing the VM")]
    Pause(#[source] ControlError),
    /// Comparing or dropping the copies failed (or the VM is not on an image).
    #[error("comparing guest memory with its image")]
    Memory(#[source] MemoryError),
    /// The lifecycle actor did not answer.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl TrimError {
    /// The control-protocol kind of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TrimError::Pause(ControlError::PauseTimeout(_)) => ErrorKind::Internal,
            TrimError::Pause(_) | TrimError::Memory(MemoryError::WrongBacking(_)) => {
                ErrorKind::Conflict
            }
            TrimError::Memory(_) => ErrorKind::Internal,
            TrimError::Queue(q) => q.kind(),
        }
    }
}

/// Drops the private copies equal to the image's pages: found with the VM running, each
/// compared again and dropped with the VM paused, so the pause is as long as the candidates
/// take, not all the copies.
pub(crate) fn trim(core: &mut VmCore) -> Result<TrimReply, TrimError> {
    core.step("finding private copies equal to the image");
    let found = core.ram.unchanged_copies().map_err(TrimError::Memory)?;
    let (dropped_pages, paused_ms) = core.paused(TrimError::Pause, |core| {
        core.step("dropping private copies equal to the image");
        core.ram
            .drop_unchanged(&found.pages)
            .map_err(TrimError::Memory)
    })?;
    let private_pages = found.copies;
    tracing::info!(private_pages, dropped_pages, paused_ms, "trimmed");
    Ok(TrimReply {
        private_pages,
        dropped_pages,
        paused_ms,
    })
}
