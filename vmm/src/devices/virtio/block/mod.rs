//! virtio-blk: a read-only root image or a writable scratch image backed by a file or a
//! block device. Requests are served synchronously on the notifying vCPU thread.

mod device;
mod request;

pub use device::{Block, BlockError};
pub use request::{DiskImage, RequestOutcome, SECTOR_SIZE, execute_request};

/// Request type: read from the disk.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write to the disk.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Feature: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature: read-only device.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature: flush supported.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Length of the device id string returned by GET_ID.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

#[cfg(test)]
mod tests;
