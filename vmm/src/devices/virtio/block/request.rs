//! Parsing and executing one virtio-blk request from a validated descriptor list.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use virtio_queue::desc::split::Descriptor;
use vm_memory::Bytes;

use super::*;
use crate::memory::GuestMemory;

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
const HEADER_SIZE: u32 = 16;

/// The disk behind a block device.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    size: u64,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES],
}

impl DiskImage {
    /// Opens `path` (a file or block device) read-only or read-write. `id` is truncated to
    /// 20 bytes.
    pub fn open(path: &Path, read_only: bool, id: &str) -> std::io::Result<Self> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        let size = file.seek(SeekFrom::End(0))?;
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = id.len().min(VIRTIO_BLK_ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            file,
            size,
            read_only,
            id: id_bytes,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Capacity in sectors (a trailing partial sector is not exposed).
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// A status byte was written; `used_len` bytes were written to guest memory in total.
    Completed {
        /// The virtio-blk status written.
        status: u8,
        /// Bytes written into guest buffers, status byte included.
        used_len: u32,
    },
    /// The chain has no usable status descriptor: nothing can be reported.
    Dropped(&'static str),
}

/// Why a request got IOERR/UNSUPP (for the rate-limited log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    IoErr(&'static str),
    Unsupported,
}

/// Executes one request described by `descs` (already checked to lie in guest RAM).
pub fn execute_request(
    disk: &mut DiskImage,
    mem: &GuestMemory,
    descs: &[Descriptor],
) -> RequestOutcome {
    let (Some(header), Some(status_desc)) = (descs.first(), descs.last()) else {
        return RequestOutcome::Dropped("empty chain");
    };
    if descs.len() < 2 || !status_desc.is_write_only() || status_desc.len() < 1 {
        return RequestOutcome::Dropped("no writable status descriptor");
    }
    let data = &descs[1..descs.len() - 1];
    let result = parse_header(mem, header).and_then(|(ty, sector)| match ty {
        VIRTIO_BLK_T_IN => read_sectors(disk, mem, sector, data),
        VIRTIO_BLK_T_OUT => write_sectors(disk, mem, sector, data),
        VIRTIO_BLK_T_FLUSH => flush(disk),
        VIRTIO_BLK_T_GET_ID => get_id(disk, mem, data),
        _ => Err(Failure::Unsupported),
    });
    let (status, written) = match result {
        Ok(written) => (VIRTIO_BLK_S_OK, written),
        Err(Failure::IoErr(why)) => {
            tracing::debug!(why, "virtio-blk: request failed");
            (VIRTIO_BLK_S_IOERR, 0)
        }
        Err(Failure::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
    };
    if mem.write_obj(status, status_desc.addr()).is_err() {
        return RequestOutcome::Dropped("status descriptor not writable");
    }
    RequestOutcome::Completed {
        status,
        used_len: written.saturating_add(1),
    }
}

fn parse_header(mem: &GuestMemory, header: &Descriptor) -> Result<(u32, u64), Failure> {
    if header.is_write_only() || header.len() < HEADER_SIZE {
        return Err(Failure::IoErr("bad request header descriptor"));
    }
    let mut raw = [0u8; HEADER_SIZE as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| Failure::IoErr("unreadable request header"))?;
    let ty = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[8..16]);
    Ok((ty, u64::from_le_bytes(sector)))
}

/// Checks direction and bounds of the data descriptors; returns the byte offset on disk.
fn check_data(
    disk: &DiskImage,
    sector: u64,
    data: &[Descriptor],
    device_writes: bool,
) -> Result<u64, Failure> {
    let mut total: u64 = 0;
    for d in data {
        if d.is_write_only() != device_writes {
            return Err(Failure::IoErr("data descriptor has the wrong direction"));
        }
        total += u64::from(d.len());
    }
    if !total.is_multiple_of(SECTOR_SIZE) {
        return Err(Failure::IoErr(
            "length is not a multiple of the sector size",
        ));
    }
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(Failure::IoErr("sector out of range"))?;
    let end = offset
        .checked_add(total)
        .ok_or(Failure::IoErr("sector out of range"))?;
    if end > disk.sectors() * SECTOR_SIZE {
        return Err(Failure::IoErr("request past the end of the disk"));
    }
    Ok(offset)
}

fn read_sectors(
    disk: &mut DiskImage,
    mem: &GuestMemory,
    sector: u64,
    data: &[Descriptor],
) -> Result<u32, Failure> {
    let offset = check_data(disk, sector, data, true)?;
    disk.file
        .seek(SeekFrom::Start(offset))
        .map_err(|_| Failure::IoErr("seek"))?;
    let mut written: u32 = 0;
    for d in data {
        mem.read_exact_volatile_from(d.addr(), &mut disk.file, d.len() as usize)
            .map_err(|_| Failure::IoErr("read from disk"))?;
        written = written.saturating_add(d.len());
    }
    Ok(written)
}

fn write_sectors(
    disk: &mut DiskImage,
    mem: &GuestMemory,
    sector: u64,
    data: &[Descriptor],
) -> Result<u32, Failure> {
    if disk.read_only {
        return Err(Failure::IoErr("write to a read-only disk"));
    }
    let offset = check_data(disk, sector, data, false)?;
    disk.file
        .seek(SeekFrom::Start(offset))
        .map_err(|_| Failure::IoErr("seek"))?;
    for d in data {
        mem.write_all_volatile_to(d.addr(), &mut disk.file, d.len() as usize)
            .map_err(|_| Failure::IoErr("write to disk"))?;
    }
    Ok(0)
}

fn flush(disk: &mut DiskImage) -> Result<u32, Failure> {
    if !disk.read_only {
        disk.file.sync_all().map_err(|_| Failure::IoErr("fsync"))?;
    }
    Ok(0)
}

fn get_id(disk: &DiskImage, mem: &GuestMemory, data: &[Descriptor]) -> Result<u32, Failure> {
    let mut remaining: &[u8] = &disk.id;
    let mut written: u32 = 0;
    for d in data {
        if !d.is_write_only() {
            return Err(Failure::IoErr("GET_ID buffer is not writable"));
        }
        let n = remaining.len().min(d.len() as usize);
        mem.write_slice(&remaining[..n], d.addr())
            .map_err(|_| Failure::IoErr("GET_ID write"))?;
        remaining = &remaining[n..];
        written += n as u32;
        if remaining.is_empty() {
            break;
        }
    }
    Ok(written)
}
