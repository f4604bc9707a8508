//! Append-only pack files holding compressed, content-addressed chunks.
//!
//! # Format (version 1)
//! ```text
//! file   := header record*
//! header := "FSPACK\0\0" | version: u32 LE | reserved: u32        (16 bytes)
//! record := "FSCK" | flags: u8 | 0,0,0 | raw_len: u32 LE | stored_len: u32 LE
//!           | blake3(raw): [u8; 32] | check: u32 LE | payload: [u8; stored_len]
//! ```
//! `check` is the first 4 bytes (LE) of blake3 over the 48 bytes before it, so a scan can
//! tell a record header from garbage. `flags` bit 0 means the payload is zstd-compressed
//! (otherwise it is the raw bytes, used when compression does not help). Every record is
//! self-describing: `check` and recovery scan packs without the index.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Magic at the start of every pack file.
pub const PACK_MAGIC: &[u8; 8] = b"FSPACK\0\0";
/// Pack format version.
pub const PACK_VERSION: u32 = 1;
/// Length of the pack file header.
pub const PACK_HEADER_LEN: u64 = 16;
/// Magic at the start of every record.
pub const RECORD_MAGIC: &[u8; 4] = b"FSCK";
/// Length of a record header.
pub const RECORD_HEADER_LEN: usize = 52;
/// Largest raw chunk accepted (pages up to 2 MiB, blob pieces up to 1 MiB).
pub const MAX_CHUNK_LEN: u32 = 2 << 20;
const FLAG_ZSTD: u8 = 1;
/// zstd level: 1 is the fastest and is what the ingest benchmark measures.
const ZSTD_LEVEL: i32 = 1;

/// A chunk's content hash (blake3 of the raw bytes).
pub type Hash = [u8; 32];

/// Where one record sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Pack file number.
    pub pack: u32,
    /// Offset of the record header in the pack.
    pub offset: u64,
    /// Payload length in the pack.
    pub stored_len: u32,
    /// Length of the raw chunk.
    pub raw_len: u32,
}

impl Location {
    /// Bytes the record occupies in its pack (header included).
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.stored_len)
    }
}

/// Errors reading one record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The pack file could not be read.
    #[error("reading pack {pack} at offset {offset}")]
    Io {
        /// Pack number.
        pack: u32,
        /// Record offset.
        offset: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The record header does not match what the index says.
    #[error(
        "record header in pack {pack} at offset {offset} is corrupt or does not match the index"
    )]
    BadHeader {
        /// Pack number.
        pack: u32,
        /// Record offset.
        offset: u64,
    },
    /// The payload did not decompress to the expected length.
    #[error("payload in pack {pack} at offset {offset} does not decompress")]
    Decompress {
        /// Pack number.
        pack: u32,
        /// Record offset.
        offset: u64,
    },
    /// The bytes do not hash to the chunk's address.
    #[error("content in pack {pack} at offset {offset} does not match its hash")]
    HashMismatch {
        /// Pack number.
        pack: u32,
        /// Record offset.
        offset: u64,
    },
}

/// Path of pack `n` under `dir`.
pub fn pack_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{n:08}.pack"))
}

/// Parses a pack file name back to its number.
pub fn parse_pack_name(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".pack")?;
    if stem.len() != 8 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Encodes one record (header + payload) for `raw` with address `hash`.
pub fn encode_record(hash: &Hash, raw: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let raw_len = u32::try_from(raw.len())
        .ok()
        .filter(|l| *l <= MAX_CHUNK_LEN)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "chunk too large"))?;
    let start = out.len();
    out.resize(start + RECORD_HEADER_LEN, 0);
    ZSTD.with(|z| {
        let mut z = z.borrow_mut();
        if z.is_none() {
            *z = Some((zstd::bulk::Compressor::new(ZSTD_LEVEL)?, Vec::new()));
        }
        let Some((compressor, compressed)) = z.as_mut() else {
            return Err(io::Error::other("no zstd context"));
        };
        compressed.clear();
        compressed.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        compressor.compress_to_buffer(raw, compressed)?;
        let (flags, payload): (u8, &[u8]) = if compressed.len() < raw.len() {
            (FLAG_ZSTD, compressed)
        } else {
            (0, raw)
        };
        let stored_len = payload.len() as u32;
        let hdr = &mut out[start..start + RECORD_HEADER_LEN];
        hdr[0..4].copy_from_slice(RECORD_MAGIC);
        hdr[4] = flags;
        hdr[8..12].copy_from_slice(&raw_len.to_le_bytes());
        hdr[12..16].copy_from_slice(&stored_len.to_le_bytes());
        hdr[16..48].copy_from_slice(hash);
        let check = header_check(&hdr[..48]);
        hdr[48..52].copy_from_slice(&check.to_le_bytes());
        out.extend_from_slice(payload);
        if compressed.capacity() > ZSTD_BUFFER_KEPT {
            // A large chunk's buffer is not held for the thread's life.
            *compressed = Vec::new();
        }
        Ok(())
    })
}

/// Most output buffer a thread keeps between records (a page's and then some).
const ZSTD_BUFFER_KEPT: usize = 64 << 10;

thread_local! {
    /// This thread's zstd context and output buffer, reused for every record: making a
    /// context (`zstd::bulk::compress` makes one per call) cost more than compressing the
    /// 4 KiB page with it — 30% of a first ingest's time.
    static ZSTD: std::cell::RefCell<Option<(zstd::bulk::Compressor<'static>, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
    /// This thread's zstd decompression context, reused for every record read: a restore's
    /// prefetch and fault threads read one page at a time, and making a context per page
    /// cost a quarter of decompressing and verifying it. A frame carries everything its
    /// decompression needs, so nothing one record leaves in the context affects the next.
    static UNZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn header_check(first48: &[u8]) -> u32 {
    let h = blake3::hash(first48);
    let b = h.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// A parsed record header.
#[derive(Debug, Clone, Copy)]
pub struct RecordHeader {
    /// Payload flags.
    pub flags: u8,
    /// Raw length.
    pub raw_len: u32,
    /// Stored payload length.
    pub stored_len: u32,
    /// Content hash.
    pub hash: Hash,
}

/// Parses and validates a record header; `None` if it is not a valid header.
pub fn parse_header(hdr: &[u8]) -> Option<RecordHeader> {
    if hdr.len() < RECORD_HEADER_LEN || &hdr[0..4] != RECORD_MAGIC {
        return None;
    }
    let check = u32::from_le_bytes(hdr[48..52].try_into().ok()?);
    if check != header_check(&hdr[..48]) {
        return None;
    }
    let raw_len = u32::from_le_bytes(hdr[8..12].try_into().ok()?);
    let stored_len = u32::from_le_bytes(hdr[12..16].try_into().ok()?);
    if raw_len > MAX_CHUNK_LEN || stored_len > MAX_CHUNK_LEN {
        return None;
    }
    Some(RecordHeader {
        flags: hdr[4],
        raw_len,
        stored_len,
        hash: hdr[16..48].try_into().ok()?,
    })
}

/// Decodes a record's payload and verifies it against `hash`.
pub fn decode_payload(
    loc: &Location,
    hdr: &RecordHeader,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    out.clear();
    if hdr.flags & FLAG_ZSTD != 0 {
        let failed = || RecordError::Decompress {
            pack: loc.pack,
            offset: loc.offset,
        };
        out.reserve(hdr.raw_len as usize);
        let n = UNZSTD.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new().map_err(|_| failed())?);
            }
            let dec = d.as_mut().ok_or_else(failed)?;
            dec.decompress_to_buffer(payload, out).map_err(|_| failed())
        })?;
        if n != hdr.raw_len as usize {
            return Err(failed());
        }
    } else {
        out.extend_from_slice(payload);
    }
    if out.len() != hdr.raw_len as usize || blake3::hash(out).as_bytes() != &hdr.hash {
        return Err(RecordError::HashMismatch {
            pack: loc.pack,
            offset: loc.offset,
        });
    }
    Ok(())
}

/// Reads the record at `loc` from `file`, checks it is the chunk `hash`, and returns its raw
/// bytes in `out`. `scratch` is reused between calls.
pub fn read_record(
    file: &File,
    loc: &Location,
    hash: &Hash,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    let total = loc.record_len() as usize;
    scratch.resize(total, 0);
    file.read_exact_at(scratch, loc.offset)
        .map_err(|source| RecordError::Io {
            pack: loc.pack,
            offset: loc.offset,
            source,
        })?;
    let hdr = parse_header(&scratch[..RECORD_HEADER_LEN])
        .filter(|h| &h.hash == hash && h.stored_len == loc.stored_len && h.raw_len == loc.raw_len)
        .ok_or(RecordError::BadHeader {
            pack: loc.pack,
            offset: loc.offset,
        })?;
    decode_payload(loc, &hdr, &scratch[RECORD_HEADER_LEN..], out)
}

/// The pack currently being appended to.
#[derive(Debug)]
pub struct PackWriter {
    /// Pack number.
    pub number: u32,
    file: File,
    len: u64,
    buf: Vec<u8>,
}

impl PackWriter {
    /// Creates a new, empty pack (header written and synced).
    pub fn create(dir: &Path, number: u32) -> io::Result<PackWriter> {
        let path = pack_path(dir, number);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let mut header = Vec::with_capacity(PACK_HEADER_LEN as usize);
        header.extend_from_slice(PACK_MAGIC);
        header.extend_from_slice(&PACK_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        file.write_all(&header)?;
        file.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok(PackWriter {
            number,
            file,
            len: PACK_HEADER_LEN,
            buf: Vec::new(),
        })
    }

    /// Opens an existing pack for appending, truncating it to `committed` bytes (bytes past
    /// the last indexed record are garbage from an interrupted ingest).
    pub fn open_truncated(dir: &Path, number: u32, committed: u64) -> io::Result<PackWriter> {
        let path = pack_path(dir, number);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        check_pack_header(&file)?;
        let actual = file.metadata()?.len();
        if actual < committed {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("pack {number} is {actual} bytes, index says {committed} are committed"),
            ));
        }
        if actual > committed {
            tracing::warn!(
                pack = number,
                actual,
                committed,
                "truncating uncommitted pack tail"
            );
            file.set_len(committed)?;
            file.sync_all()?;
        }
        Ok(PackWriter {
            number,
            file,
            len: committed,
            buf: Vec::new(),
        })
    }

    /// Current length (committed + buffered appends).
    pub fn len(&self) -> u64 {
        self.len + self.buf.len() as u64
    }

    /// True if the pack holds only its header.
    pub fn is_empty(&self) -> bool {
        self.len() == PACK_HEADER_LEN
    }

    /// Appends a chunk (buffered; call [`PackWriter::sync`] before indexing it).
    pub fn append(&mut self, hash: &Hash, raw: &[u8]) -> io::Result<Location> {
        let offset = self.len();
        let before = self.buf.len();
        encode_record(hash, raw, &mut self.buf)?;
        let stored_len = (self.buf.len() - before - RECORD_HEADER_LEN) as u32;
        if self.buf.len() >= 8 << 20 {
            self.flush()?;
        }
        Ok(Location {
            pack: self.number,
            offset,
            stored_len,
            raw_len: raw.len() as u32,
        })
    }

    /// Appends an already-encoded record (used by GC to move records unchanged).
    pub fn append_encoded(
        &mut self,
        record: &[u8],
        stored_len: u32,
        raw_len: u32,
    ) -> io::Result<Location> {
        let offset = self.len();
        self.buf.extend_from_slice(record);
        if self.buf.len() >= 8 << 20 {
            self.flush()?;
        }
        Ok(Location {
            pack: self.number,
            offset,
            stored_len,
            raw_len,
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.len)?;
            self.len += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes buffered records and makes them durable (fdatasync).
    pub fn sync(&mut self) -> io::Result<u64> {
        self.flush()?;
        self.file.sync_data()?;
        Ok(self.len)
    }

    /// Drops buffered records and truncates back to `len` (failed ingest).
    pub fn rollback(&mut self, len: u64) -> io::Result<()> {
        self.buf.clear();
        if self.len > len {
            self.file.set_len(len)?;
            self.len = len;
        }
        Ok(())
    }
}

/// Checks the 16-byte pack header.
pub fn check_pack_header(file: &File) -> io::Result<()> {
    let mut hdr = [0u8; PACK_HEADER_LEN as usize];
    file.read_exact_at(&mut hdr, 0)?;
    if &hdr[..8] != PACK_MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad pack magic"));
    }
    let version = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    if version != PACK_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("pack version {version}, expected {PACK_VERSION}"),
        ));
    }
    Ok(())
}

/// One record found by [`scan_pack`].
#[derive(Debug)]
pub struct ScannedRecord {
    /// Where it is.
    pub location: Location,
    /// Its claimed hash.
    pub hash: Hash,
    /// Whether its payload verified.
    pub valid: bool,
}

/// Scans a pack from its header, returning every record and where a scan stopped (the first
/// byte that is not a valid record header, or the end of the file).
pub fn scan_pack(file: &File, number: u32) -> io::Result<(Vec<ScannedRecord>, u64)> {
    check_pack_header(file)?;
    let end = file.metadata()?.len();
    let mut off = PACK_HEADER_LEN;
    let mut out = Vec::new();
    let mut hdr_buf = [0u8; RECORD_HEADER_LEN];
    let mut payload = Vec::new();
    let mut raw = Vec::new();
    while off + RECORD_HEADER_LEN as u64 <= end {
        file.read_exact_at(&mut hdr_buf, off)?;
        let Some(hdr) = parse_header(&hdr_buf) else {
            break;
        };
        let location = Location {
            pack: number,
            offset: off,
            stored_len: hdr.stored_len,
            raw_len: hdr.raw_len,
        };
        if off + location.record_len() > end {
            break;
        }
        payload.resize(hdr.stored_len as usize, 0);
        file.read_exact_at(&mut payload, off + RECORD_HEADER_LEN as u64)?;
        let valid = decode_payload(&location, &hdr, &payload, &mut raw).is_ok();
        out.push(ScannedRecord {
            location,
            hash: hdr.hash,
            valid,
        });
        off += location.record_len();
    }
    Ok((out, off))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_flip_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path(), 0).unwrap();
        let page: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let hash = *blake3::hash(&page).as_bytes();
        let loc = w.append(&hash, &page).unwrap();
        w.sync().unwrap();
        let f = File::open(pack_path(dir.path(), 0)).unwrap();
        let (mut s, mut out) = (Vec::new(), Vec::new());
        read_record(&f, &loc, &hash, &mut s, &mut out).unwrap();
        assert_eq!(out, page);
        // Flip one payload byte.
        let rw = OpenOptions::new()
            .write(true)
            .open(pack_path(dir.path(), 0))
            .unwrap();
        let pos = loc.offset + RECORD_HEADER_LEN as u64 + 3;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, pos).unwrap();
        rw.write_all_at(&[b[0] ^ 0x40], pos).unwrap();
        assert!(read_record(&f, &loc, &hash, &mut s, &mut out).is_err());
        let (recs, _) = scan_pack(&f, 0).unwrap();
        assert_eq!(recs.len(), 1);
        assert!(!recs[0].valid);
    }

    /// The thread's reused decompression context: a record that fails to decode (a payload
    /// cut short, garbage, a frame longer than its header says) leaves nothing behind that
    /// changes how the next one decodes.
    #[test]
    fn a_failed_decode_does_not_spoil_the_next() {
        let page: Vec<u8> = (0..4096u32).map(|i| (i % 13) as u8).collect();
        let hash = *blake3::hash(&page).as_bytes();
        let mut rec = Vec::new();
        encode_record(&hash, &page, &mut rec).unwrap();
        let hdr = parse_header(&rec).unwrap();
        assert_ne!(hdr.flags & FLAG_ZSTD, 0, "the page compresses");
        let payload = rec[RECORD_HEADER_LEN..].to_vec();
        let loc = Location {
            pack: 0,
            offset: 0,
            stored_len: hdr.stored_len,
            raw_len: hdr.raw_len,
        };
        let mut out = Vec::new();
        let good = |out: &mut Vec<u8>| {
            decode_payload(&loc, &hdr, &payload, out).unwrap();
            assert_eq!(*out, page);
        };
        good(&mut out);
        let short = &payload[..payload.len() / 2];
        assert!(decode_payload(&loc, &hdr, short, &mut out).is_err());
        good(&mut out);
        let garbage: Vec<u8> = payload.iter().map(|b| b ^ 0x5a).collect();
        assert!(decode_payload(&loc, &hdr, &garbage, &mut out).is_err());
        good(&mut out);
        // A frame whose header is intact and whose blocks are not: decoding gets under way
        // in the reused context before it fails.
        let mut torn = payload.clone();
        for b in &mut torn[8..] {
            *b ^= 0x5a;
        }
        assert!(decode_payload(&loc, &hdr, &torn, &mut out).is_err());
        good(&mut out);
        let mut longer = Vec::new();
        let big: Vec<u8> = page.iter().chain(page.iter()).copied().collect();
        encode_record(blake3::hash(&big).as_bytes(), &big, &mut longer).unwrap();
        let mut out = Vec::with_capacity(3 * 4096);
        assert!(decode_payload(&loc, &hdr, &longer[RECORD_HEADER_LEN..], &mut out).is_err());
        good(&mut out);
    }
}
