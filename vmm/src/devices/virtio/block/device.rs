//! The virtio-blk device: one request queue, config space with the capacity.

use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::request::{DiskImage, RequestOutcome, execute_request};
use super::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};
use crate::devices::virtio::chain::{LogLimiter, collect_chain};
use crate::devices::virtio::{
    ActivateError, INT_VRING, IrqTrigger, TYPE_BLOCK, VIRTIO_F_VERSION_1, VirtioDevice,
    read_config_bytes,
};
use crate::memory::GuestMemory;

/// Queue size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// Creating a block device failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened or sized.
    #[error("opening disk image {0}")]
    Open(std::path::PathBuf, #[source] std::io::Error),
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: DiskImage,
    acked_features: u64,
    config: [u8; 16],
    queue_sizes: [u16; 1],
    active: Option<Active>,
    bad_request_log: LogLimiter,
}

#[derive(Debug)]
struct Active {
    mem: GuestMemory,
    queue: Queue,
    irq: Arc<IrqTrigger>,
}

impl Block {
    /// A block device over `path`; `id` is what GET_ID returns (at most 20 bytes).
    pub fn new(path: &Path, read_only: bool, id: &str) -> Result<Self, BlockError> {
        let disk = DiskImage::open(path, read_only, id)
            .map_err(|e| BlockError::Open(path.to_path_buf(), e))?;
        let mut config = [0u8; 16];
        config[0..8].copy_from_slice(&disk.sectors().to_le_bytes());
        // size_max (8..12) stays 0; seg_max leaves room for the header and status.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        Ok(Self {
            disk,
            acked_features: 0,
            config,
            queue_sizes: [QUEUE_SIZE],
            active: None,
            bad_request_log: LogLimiter::default(),
        })
    }

    /// The disk behind this device.
    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    /// Serves every available request; returns how many were completed or dropped.
    pub fn process_queue(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let mem = &active.mem;
        let max = usize::from(active.queue.size());
        let mut handled = 0;
        while let Some(chain) = active.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let used_len = match collect_chain(chain, max) {
                Ok(descs) => match execute_request(&mut self.disk, mem, &descs) {
                    RequestOutcome::Completed { used_len, .. } => used_len,
                    RequestOutcome::Dropped(why) => {
                        if self.bad_request_log.allow() {
                            tracing::warn!(why, "virtio-blk: dropped malformed request");
                        }
                        0
                    }
                },
                Err(e) => {
                    if self.bad_request_log.allow() {
                        tracing::warn!(error = %e, "virtio-blk: dropped malformed descriptor chain");
                    }
                    0
                }
            };
            if let Err(e) = active.queue.add_used(mem, head, used_len) {
                if self.bad_request_log.allow() {
                    tracing::warn!(error = %e, "virtio-blk: cannot add used entry");
                }
                continue;
            }
            handled += 1;
        }
        if handled > 0 && active.queue.needs_notification(mem).unwrap_or(true) {
            active.irq.trigger(INT_VRING);
        }
        handled
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.disk.read_only() {
            VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | ro
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "virtio-blk: config write ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        mut queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let queue = queues.remove(0);
        self.active = Some(Active { mem, queue, irq });
        Ok(())
    }

    fn queue_notify(&mut self, _index: u32) {
        self.process_queue();
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }

    fn quiesce(&mut self, _paused: bool) {
        // Requests are served on the vCPU thread that notified: nothing runs on its own.
    }

    fn restored(&mut self) {}
}
