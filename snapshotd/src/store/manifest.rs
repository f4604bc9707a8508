//! Snapshot manifests: what a snapshot is made of, stored in the index's `manifests` family.
//!
//! # Encoding (version 1)
//! ```text
//! "FSMF" | version: u16 LE | payload_len: u32 LE | payload: postcard(Manifest) | blake3(payload)
//! ```
//! Manifests are untrusted input when read back: [`decode`] checks magic, version, length,
//! checksum, then [`Manifest::validate`] checks every field is coherent (page size, runs
//! sorted, in range and non-overlapping, blob sizes).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::pack::Hash;

/// Magic at the start of an encoded manifest.
pub const MANIFEST_MAGIC: &[u8; 4] = b"FSMF";
/// Manifest format version.
pub const MANIFEST_VERSION: u16 = 1;
/// Largest encoded manifest accepted (a full 16 GiB image of distinct pages is ~128 MiB).
pub const MAX_MANIFEST_LEN: usize = 256 << 20;
/// Largest VM-state blob kept inline in the manifest; bigger ones are stored as chunks.
pub const INLINE_BLOB_MAX: usize = 64 << 10;
/// Size of the chunks a large blob is split into.
pub const BLOB_CHUNK_LEN: usize = 1 << 20;
/// Page sizes accepted.
pub const MIN_PAGE_SIZE: u32 = 4096;
/// Page sizes accepted.
pub const MAX_PAGE_SIZE: u32 = 2 << 20;
/// Largest guest memory a snapshot may describe (64 GiB).
pub const MAX_MEMORY_SIZE: u64 = 64 << 30;

/// Checks a snapshot's page size and memory size (every create, before anything is
/// allocated from them, and every manifest read back).
pub fn check_shape(page_size: u32, memory_size: u64) -> Result<(), &'static str> {
    if !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) || !page_size.is_power_of_two() {
        return Err("page size must be a power of two in 4 KiB..=2 MiB");
    }
    if memory_size == 0 || memory_size > MAX_MEMORY_SIZE {
        return Err("memory size must be in 1 byte..=64 GiB");
    }
    if !memory_size.is_multiple_of(u64::from(page_size)) {
        return Err("memory size is not a multiple of the page size");
    }
    Ok(())
}

/// A run of consecutive pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Run {
    /// Pages `start..start + hashes.len()`, each with its own content.
    Pages {
        /// First page index.
        start: u64,
        /// One hash per page.
        hashes: Vec<Hash>,
    },
    /// `count` pages from `start` that all have the same content.
    Repeat {
        /// First page index.
        start: u64,
        /// Number of pages.
        count: u64,
        /// Their common content.
        hash: Hash,
    },
    /// `count` zero pages from `start` (only needed to override a parent's non-zero pages;
    /// zero pages of a full snapshot are simply absent).
    Zero {
        /// First page index.
        start: u64,
        /// Number of pages.
        count: u64,
    },
}

impl Run {
    /// `(start, count)` of the run.
    pub fn span(&self) -> (u64, u64) {
        match self {
            Run::Pages { start, hashes } => (*start, hashes.len() as u64),
            Run::Repeat { start, count, .. } | Run::Zero { start, count } => (*start, *count),
        }
    }
}

/// A named opaque blob (e.g. the VMM's vCPU and device state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobRef {
    /// Small blobs live in the manifest.
    Inline(Vec<u8>),
    /// Large blobs are split into content-addressed chunks of [`BLOB_CHUNK_LEN`].
    Chunks {
        /// Total length.
        len: u64,
        /// Chunk hashes, in order.
        hashes: Vec<Hash>,
    },
}

/// One snapshot's description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The snapshot id (chosen by the store).
    pub id: String,
    /// Guest memory size in bytes (a multiple of `page_size`).
    pub memory_size: u64,
    /// Page size in bytes.
    pub page_size: u32,
    /// The snapshot this one is layered on: pages not in `runs` come from it.
    pub parent: Option<String>,
    /// Number of ancestors (0 for a full snapshot).
    pub depth: u32,
    /// Page map, sorted by start, non-overlapping.
    pub runs: Vec<Run>,
    /// Named VM-state blobs.
    pub blobs: BTreeMap<String, BlobRef>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Pages in the order they were first touched (as `(start, count)` ranges), if recorded;
    /// used to prefetch after a restore.
    pub touch_order: Vec<(u64, u64)>,
}

/// Errors decoding a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Too short or too long.
    #[error("manifest has a bad length")]
    Length,
    /// Not a manifest.
    #[error("bad manifest magic")]
    Magic,
    /// Another format version.
    #[error("manifest version {0} is not supported")]
    Version(u16),
    /// Checksum mismatch.
    #[error("manifest checksum mismatch")]
    Checksum,
    /// Payload did not decode.
    #[error("manifest payload does not decode")]
    Decode(#[source] postcard::Error),
    /// Payload could not be encoded.
    #[error("manifest could not be encoded")]
    Encode(#[source] postcard::Error),
    /// Decoded but incoherent.
    #[error("invalid manifest: {0}")]
    Invalid(&'static str),
}

impl Manifest {
    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        self.memory_size / u64::from(self.page_size)
    }

    /// Pages in the first-touch order.
    pub fn touch_order_len(&self) -> u64 {
        self.touch_order.iter().map(|(_, c)| *c).sum()
    }

    /// Checks every field is coherent.
    pub fn validate(&self) -> Result<(), ManifestError> {
        check_shape(self.page_size, self.memory_size).map_err(ManifestError::Invalid)?;
        if self.parent.is_none() && self.depth != 0 || self.parent.is_some() && self.depth == 0 {
            return Err(ManifestError::Invalid("depth does not match parent"));
        }
        let pages = self.page_count();
        let mut next = 0u64;
        for run in &self.runs {
            let (start, count) = run.span();
            let end = start
                .checked_add(count)
                .ok_or(ManifestError::Invalid("run overflows"))?;
            if count == 0 || start < next || end > pages {
                return Err(ManifestError::Invalid(
                    "runs unsorted, overlapping or out of range",
                ));
            }
            if matches!(run, Run::Zero { .. }) && self.parent.is_none() {
                return Err(ManifestError::Invalid("zero run in a full snapshot"));
            }
            next = end;
        }
        for (start, count) in &self.touch_order {
            let end = start
                .checked_add(*count)
                .ok_or(ManifestError::Invalid("touch order"))?;
            if end > pages {
                return Err(ManifestError::Invalid("touch order out of range"));
            }
        }
        for blob in self.blobs.values() {
            if let BlobRef::Chunks { len, hashes } = blob {
                let want = len.div_ceil(BLOB_CHUNK_LEN as u64);
                if hashes.len() as u64 != want {
                    return Err(ManifestError::Invalid("blob chunk count"));
                }
            }
        }
        Ok(())
    }

    /// Every distinct chunk this manifest itself references (not its parent's): what keeps
    /// them live (a sweep drops the index entries of chunks no manifest references).
    pub fn distinct_chunks(&self) -> HashSet<Hash> {
        let mut set = HashSet::new();
        for run in &self.runs {
            match run {
                Run::Pages { hashes, .. } => set.extend(hashes.iter().copied()),
                Run::Repeat { hash, .. } => {
                    set.insert(*hash);
                }
                Run::Zero { .. } => {}
            }
        }
        for blob in self.blobs.values() {
            if let BlobRef::Chunks { hashes, .. } = blob {
                set.extend(hashes.iter().copied());
            }
        }
        set
    }
}

/// Encodes a manifest with magic, version, length and checksum.
pub fn encode(m: &Manifest) -> Result<Vec<u8>, ManifestError> {
    let payload = postcard::to_stdvec(m).map_err(ManifestError::Encode)?;
    if payload.len() > MAX_MANIFEST_LEN {
        return Err(ManifestError::Length);
    }
    let mut out = Vec::with_capacity(payload.len() + 42);
    out.extend_from_slice(MANIFEST_MAGIC);
    out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(blake3::hash(&payload).as_bytes());
    Ok(out)
}

/// Decodes and validates a manifest.
pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
    if bytes.len() < 10 + 32 || bytes.len() > MAX_MANIFEST_LEN + 42 {
        return Err(ManifestError::Length);
    }
    if &bytes[..4] != MANIFEST_MAGIC {
        return Err(ManifestError::Magic);
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != MANIFEST_VERSION {
        return Err(ManifestError::Version(version));
    }
    let len = u32::from_le_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]) as usize;
    if bytes.len() != 10 + len + 32 {
        return Err(ManifestError::Length);
    }
    let payload = &bytes[10..10 + len];
    if blake3::hash(payload).as_bytes() != &bytes[10 + len..] {
        return Err(ManifestError::Checksum);
    }
    let m: Manifest = postcard::from_bytes(payload).map_err(ManifestError::Decode)?;
    m.validate()?;
    Ok(m)
}

/// Compresses a per-page list (`None` = zero/absent, `Some(hash)`) into runs. `explicit_zero`
/// emits [`Run::Zero`] for `Some(None)` entries (layered manifests).
pub fn build_runs(pages: &[(u64, Option<Hash>)]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for &(idx, content) in pages {
        let extended = match (runs.last_mut(), content) {
            (Some(Run::Zero { start, count }), None) if *start + *count == idx => {
                *count += 1;
                true
            }
            (Some(Run::Repeat { start, count, hash }), Some(h))
                if *start + *count == idx && *hash == h =>
            {
                *count += 1;
                true
            }
            (Some(Run::Pages { start, hashes }), Some(h))
                if *start + hashes.len() as u64 == idx =>
            {
                if hashes.len() >= 2
                    && hashes[hashes.len() - 1] == h
                    && hashes[hashes.len() - 2] == h
                {
                    // Turn a trailing pair of identical pages + this one into a Repeat run.
                    hashes.truncate(hashes.len() - 2);
                    let rstart = idx - 2;
                    if hashes.is_empty() {
                        runs.pop();
                    }
                    runs.push(Run::Repeat {
                        start: rstart,
                        count: 3,
                        hash: h,
                    });
                } else {
                    hashes.push(h);
                }
                true
            }
            _ => false,
        };
        if !extended {
            runs.push(match content {
                None => Run::Zero {
                    start: idx,
                    count: 1,
                },
                Some(h) => Run::Pages {
                    start: idx,
                    hashes: vec![h],
                },
            });
        }
    }
    runs
}

/// Compresses a page list into `(start, count)` ranges.
pub fn build_ranges(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((s, c)) if *s + *c == p => *c += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let pages = vec![
            (0, Some([1; 32])),
            (1, Some([2; 32])),
            (2, Some([2; 32])),
            (3, Some([2; 32])),
            (4, Some([2; 32])),
            (7, Some([3; 32])),
        ];
        Manifest {
            id: "x".into(),
            memory_size: 16 * 4096,
            page_size: 4096,
            parent: None,
            depth: 0,
            runs: build_runs(&pages),
            blobs: BTreeMap::from([("vcpu".into(), BlobRef::Inline(vec![1, 2, 3]))]),
            labels: BTreeMap::new(),
            created_unix_ms: 1,
            touch_order: build_ranges(&[3, 4, 5, 0]),
        }
    }

    #[test]
    fn build_runs_compresses_repeats_and_keeps_order() {
        let m = sample();
        assert_eq!(m.runs.len(), 3, "{:?}", m.runs);
        assert!(matches!(
            m.runs[1],
            Run::Repeat {
                start: 1,
                count: 4,
                ..
            }
        ));
        m.validate().unwrap();
    }

    #[test]
    fn decode_flipped_byte_returns_checksum_error() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(decode(&bytes).unwrap(), sample());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(decode(&b).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn validate_overlapping_runs_returns_invalid() {
        let mut m = sample();
        m.runs.push(Run::Zero { start: 0, count: 1 });
        assert!(matches!(m.validate(), Err(ManifestError::Invalid(_))));
    }
}
