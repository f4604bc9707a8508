//! A split virtqueue laid out in test memory, driven the way a guest driver would, including
//! the ways a hostile driver would.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::IrqTrigger;
use crate::memory::GuestMemory;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// 16 MiB of anonymous test memory at GPA 0.
pub fn test_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

pub fn test_irq() -> Arc<IrqTrigger> {
    Arc::new(IrqTrigger::new().unwrap())
}

/// A driver-side view of one split queue.
#[derive(Debug)]
pub struct TestQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl TestQueue {
    /// Lays out a queue of `size` entries at `base` (descriptor table, avail, used rings).
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        mem.write_obj(0u16, GuestAddress(avail)).unwrap();
        mem.write_obj(0u16, GuestAddress(avail + 2)).unwrap();
        mem.write_obj(0u16, GuestAddress(used + 2)).unwrap();
        Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device-side queue, configured and ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index` verbatim.
    pub fn write_desc(
        &self,
        mem: &GuestMemory,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc + 16 * u64::from(index);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Writes a linked chain of `(addr, len, write_only)` buffers; returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            let last = i + 1 == bufs.len();
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.write_desc(
                mem,
                index,
                addr,
                len,
                flags,
                index.wrapping_add(1) % self.size,
            );
            self.next_desc = (self.next_desc + 1) % self.size;
        }
        head
    }

    /// Skips `n` descriptor slots (used by tests that wrote descriptors by hand).
    pub fn skip(&mut self, n: u16) {
        self.next_desc = (self.next_desc + n) % self.size;
    }

    /// Makes chain `head` available to the device.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Number of used entries the device has published.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used ring entry `i`: (descriptor head, length written).
    pub fn used_entry(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}
