//! Validating descriptor chains the guest hands us. Everything here is hostile input: chains
//! may loop, be longer than the queue, point outside guest RAM, or have absurd lengths.

use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryBackend;

use crate::memory::GuestMemory;

/// Why a descriptor chain was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain has no descriptors (unreadable head).
    #[error("empty descriptor chain")]
    Empty,
    /// The chain loops, is longer than the queue, or a `next` index is out of range.
    #[error("descriptor chain is longer than {0} or loops")]
    TooLong(usize),
    /// A descriptor's buffer is not entirely inside guest RAM.
    #[error("descriptor buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
}

/// Walks a chain into a vector of at most `max` descriptors (the queue size), checking that
/// every buffer lies in guest RAM. Allocation is bounded by `max`.
pub fn collect_chain(
    chain: DescriptorChain<&GuestMemory>,
    max: usize,
) -> Result<Vec<Descriptor>, ChainError> {
    let mem = chain.memory();
    let mut descs = Vec::new();
    for desc in chain.clone() {
        if descs.len() >= max {
            return Err(ChainError::TooLong(max));
        }
        let len = desc.len();
        if len > 0 && !GuestMemoryBackend::check_range(mem, desc.addr(), len as usize) {
            return Err(ChainError::OutOfRange {
                addr: desc.addr().0,
                len,
            });
        }
        descs.push(desc);
    }
    match descs.last() {
        None => Err(ChainError::Empty),
        // The iterator stops early (ttl exhausted, next index out of range, unreadable
        // descriptor) while the last descriptor still claims a successor.
        Some(last) if last.has_next() => Err(ChainError::TooLong(max)),
        Some(_) => Ok(descs),
    }
}

/// A tiny rate limiter for guest-triggered warnings: logs the first few, then every 1000th.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogLimiter {
    count: u64,
}

impl LogLimiter {
    /// True when this occurrence should be logged.
    pub fn allow(&mut self) -> bool {
        self.count = self.count.wrapping_add(1);
        self.count <= 10 || self.count.is_multiple_of(1000)
    }
}
