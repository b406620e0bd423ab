//! On-disk format, version 3. All integers and floats are little endian.
//!
//! ## Pages
//! Every page's [`Opaque`](crate::page::Opaque) carries `next` (the next page of its chain or
//! `INVALID_BLOCK`) and `flags` = exactly one of [`PAGE_META`], [`PAGE_CENTROID`], [`PAGE_LIST`],
//! [`PAGE_REFINE`].
//!
//! Layout of a freshly built index with `L` lists:
//! - block 0: meta page, one item ([`Meta`], 64 bytes).
//! - blocks `1 ..= L`: the head page of each list's *code chain* (list `i` starts at block
//!   `1 + i`), initially empty;
//! - blocks `L + 1 ..= 2L`: the head page of each list's *refinement chain* (list `i`: block
//!   `1 + L + i`, see [`Meta::refine_head`]); a chain's later pages follow wherever they were
//!   allocated (at the end of a build, the pages of one chain are contiguous).
//! - blocks `2L + 1 ..`: the centroid chain (`Meta::first_centroid_block`).
//!
//! Why two chains per list: a scan reads every code tuple of the lists it probes but the
//! 8-bit refinement code of only the few rows whose 1-bit bounds leave them in the running.
//! Kept apart, code tuples are 72 bytes for 384 dimensions (about 100 per page instead of 17),
//! so a probe reads 6× fewer pages and bytes.
//!
//! ## Meta item (64 bytes)
//! | off | type | field |
//! |----:|------|-------|
//! | 0  | u32 | magic [`MAGIC`] |
//! | 4  | u32 | version (3) |
//! | 8  | u32 | dims |
//! | 12 | u32 | padded dims `D` (dims rounded up to a multiple of 64) |
//! | 16 | u32 | metric (0 inner product, 1 cosine, 2 L2) |
//! | 20 | u32 | number of lists |
//! | 24 | u64 | rotation seed |
//! | 32 | u32 | rotation rounds |
//! | 36 | u32 | first centroid block |
//! | 40 | u32 | first list head block |
//! | 44 | u32 | reserved (0) |
//! | 48 | u64 | tuples indexed by the build |
//! | 56 | u64 | zero vectors skipped by the build (cosine) |
//!
//! ## Centroid item (16 + 4n bytes)
//! Centroids are stored *rotated* (the RaBitQ rotation applied to the zero-padded centroid,
//! `D` floats), split into chunks that fill the pages of the centroid chain; the chunks of one
//! centroid are consecutive items (possibly spanning pages), in list order.
//!
//! | off | type | field |
//! |----:|------|-------|
//! | 0  | u32 | list number |
//! | 4  | u32 | head block of the list's code chain |
//! | 8  | u32 | index of the first float of this chunk within the centroid |
//! | 12 | u32 | reserved (0) |
//! | 16 | f32 × n | centroid coordinates `start .. start + n` |
//!
//! ## Code tuple (24 + D/8 bytes: 72 for 384 dimensions, 120 for 768), in a code chain
//! | off | type | field |
//! |----:|------|-------|
//! | 0  | u32 | heap block |
//! | 4  | u16 | heap offset |
//! | 6  | u16 | offset of the refinement tuple in its block when written (a hint, see below) |
//! | 8  | f32 | `|r|`: norm of the residual `r = x - c` |
//! | 12 | f32 | `<ō, o>`: inner product of the unit residual with its 1-bit quantization |
//! | 16 | f32 | `<r, c>` |
//! | 20 | u32 | block of the refinement chain holding this row's refinement tuple (`INVALID_BLOCK` when `D` > 4096: no refinement) |
//! | 24 | u64 × D/64 | sign bits of the rotated residual: bit `i % 64` of word `i / 64` is 1 iff coordinate `i` ≥ 0 |
//!
//! ## Refinement tuple (16 + D bytes: 400 for 384 dimensions), in a refinement chain
//! Written before its code tuple (a crash in between leaves an unreferenced refinement tuple,
//! removed by VACUUM with its dead heap row). Readers look at the offset the code tuple names
//! and check the heap tid there; VACUUM's compaction only moves tuples to lower offsets of the
//! same page, so on a mismatch they search down from it.
//!
//! | off | type | field |
//! |----:|------|-------|
//! | 0  | u32 | heap block |
//! | 4  | u16 | heap offset |
//! | 6  | u16 | flags (0; reserved) |
//! | 8  | f32 | `lo` of the 8-bit code |
//! | 12 | f32 | `delta` of the 8-bit code |
//! | 16 | u8 × D | rotated residual ≈ `lo + delta * u_i` (round to nearest) |

use crate::page::MAX_ITEM_SIZE;
use crate::rabitq::padded_dims;
use crate::{BlockNumber, Metric, Tid, INVALID_BLOCK, MAX_DIMS, MAX_LISTS};
use std::fmt;

/// Magic number of the meta page ("RSIQ").
pub const MAGIC: u32 = 0x5153_4952;
/// Format version written by this crate (3: refinement codes in chains of their own; 2 kept
/// them in the list tuples).
pub const VERSION: u32 = 3;
/// Block number of the meta page.
pub const META_BLOCK: BlockNumber = 0;
/// Opaque flag of the meta page.
pub const PAGE_META: u16 = 0x0001;
/// Opaque flag of centroid pages.
pub const PAGE_CENTROID: u16 = 0x0002;
/// Opaque flag of list (code chain) pages.
pub const PAGE_LIST: u16 = 0x0004;
/// Opaque flag of refinement chain pages.
pub const PAGE_REFINE: u16 = 0x0008;
/// Rotation rounds used by new indexes.
pub const ROTATION_ROUNDS: u32 = 3;
/// Size of the centroid item header.
pub const CENTROID_HEADER: usize = 16;
/// Size of the code tuple header (before the code bits).
pub const LIST_TUPLE_HEADER: usize = 24;
/// Size of the refinement tuple header (tid, flags, `lo`, `delta`).
pub const REFINE_HEADER: usize = 16;
/// Largest padded dimension count whose tuples carry the 8-bit refinement code (a tuple must fit
/// a page); wider indexes use the 1-bit code alone.
pub const REFINE_MAX_DIMS: usize = 4096;

/// Whether list tuples of `padded_dims` carry the refinement code.
pub fn has_refine(padded_dims: usize) -> bool {
    padded_dims <= REFINE_MAX_DIMS
}

/// Invalid bytes: why they cannot be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatError(pub String);

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FormatError {}

fn err<T>(msg: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError(msg.into()))
}

#[inline]
fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

#[inline]
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline]
fn u64_at(b: &[u8], off: usize) -> u64 {
    u32_at(b, off) as u64 | (u32_at(b, off + 4) as u64) << 32
}

/// The meta page contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Dimensions of the indexed vectors.
    pub dims: u32,
    /// `dims` rounded up to a multiple of 64 (the rotation and code length).
    pub padded_dims: u32,
    /// Distance metric.
    pub metric: Metric,
    /// Number of lists (at least 1).
    pub nlists: u32,
    /// Seed of the RaBitQ rotation.
    pub seed: u64,
    /// Rounds of the rotation.
    pub rounds: u32,
    /// First page of the centroid chain.
    pub first_centroid_block: BlockNumber,
    /// Head page of list 0 (informational).
    pub first_list_block: BlockNumber,
    /// Tuples written by the build.
    pub build_tuples: u64,
    /// Zero vectors skipped by the build (cosine).
    pub build_skipped: u64,
}

impl Meta {
    /// Encoded size.
    pub const SIZE: usize = 64;

    /// Head of the refinement chain of the list whose code chain starts at `head`, or `None`
    /// when `head` is not a list head of this layout.
    pub fn refine_head(&self, head: BlockNumber) -> Option<BlockNumber> {
        let i = head.checked_sub(self.first_list_block)?;
        (i < self.nlists).then(|| head + self.nlists)
    }

    /// Encode as the meta item.
    pub fn encode(&self) -> [u8; Meta::SIZE] {
        let mut b = [0u8; Meta::SIZE];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        b[8..12].copy_from_slice(&self.dims.to_le_bytes());
        b[12..16].copy_from_slice(&self.padded_dims.to_le_bytes());
        b[16..20].copy_from_slice(&self.metric.code().to_le_bytes());
        b[20..24].copy_from_slice(&self.nlists.to_le_bytes());
        b[24..32].copy_from_slice(&self.seed.to_le_bytes());
        b[32..36].copy_from_slice(&self.rounds.to_le_bytes());
        b[36..40].copy_from_slice(&self.first_centroid_block.to_le_bytes());
        b[40..44].copy_from_slice(&self.first_list_block.to_le_bytes());
        b[48..56].copy_from_slice(&self.build_tuples.to_le_bytes());
        b[56..64].copy_from_slice(&self.build_skipped.to_le_bytes());
        b
    }

    /// Parse and validate the meta item.
    pub fn decode(b: &[u8]) -> Result<Meta, FormatError> {
        if b.len() != Meta::SIZE {
            return err(format!(
                "meta item has {} bytes, expected {}",
                b.len(),
                Meta::SIZE
            ));
        }
        if u32_at(b, 0) != MAGIC {
            return err(format!("bad magic number {:#010x}", u32_at(b, 0)));
        }
        let version = u32_at(b, 4);
        if version != VERSION {
            return err(if version < VERSION {
                format!(
                    "the index has format version {version}, written by an older rsclip; this \
                     version reads format {VERSION}: REINDEX it"
                )
            } else {
                format!("unsupported format version {version} (this rsclip reads {VERSION})")
            });
        }
        let dims = u32_at(b, 8);
        if dims == 0 || dims > MAX_DIMS {
            return err(format!("invalid dimensions {dims}"));
        }
        let padded = u32_at(b, 12);
        if padded as usize != padded_dims(dims as usize) {
            return err(format!("padded dimensions {padded} do not match {dims}"));
        }
        let metric = Metric::from_code(u32_at(b, 16))
            .ok_or_else(|| FormatError(format!("unknown metric {}", u32_at(b, 16))))?;
        let nlists = u32_at(b, 20);
        if nlists == 0 || nlists > MAX_LISTS {
            return err(format!("invalid number of lists {nlists}"));
        }
        let rounds = u32_at(b, 32);
        if rounds == 0 || rounds > 16 {
            return err(format!("invalid rotation rounds {rounds}"));
        }
        let first_centroid_block = u32_at(b, 36);
        let first_list_block = u32_at(b, 40);
        for (name, blk) in [
            ("centroid", first_centroid_block),
            ("list", first_list_block),
        ] {
            if blk == 0 || blk == INVALID_BLOCK {
                return err(format!("invalid first {name} block {blk}"));
            }
        }
        if u32_at(b, 44) != 0 {
            return err("reserved meta field is not zero");
        }
        if (first_list_block as u64) + 2 * nlists as u64 > INVALID_BLOCK as u64 {
            return err(format!(
                "first list block {first_list_block} leaves no room for {nlists} lists"
            ));
        }
        Ok(Meta {
            dims,
            padded_dims: padded,
            metric,
            nlists,
            seed: u64_at(b, 24),
            rounds,
            first_centroid_block,
            first_list_block,
            build_tuples: u64_at(b, 48),
            build_skipped: u64_at(b, 56),
        })
    }
}

/// One chunk of a stored centroid.
#[derive(Clone, Copy, Debug)]
pub struct CentroidChunk<'a> {
    /// List number.
    pub list: u32,
    /// Head block of the list.
    pub head: BlockNumber,
    /// Index of the first float of the chunk.
    pub start: u32,
    raw: &'a [u8],
}

impl<'a> CentroidChunk<'a> {
    /// Number of floats in the chunk.
    pub fn len(&self) -> usize {
        self.raw.len() / 4
    }

    /// Whether the chunk has no floats (never true for a parsed chunk).
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Copy the floats into `out` (of length [`CentroidChunk::len`]); fails on NaN/infinity.
    pub fn copy_to(&self, out: &mut [f32]) -> Result<(), FormatError> {
        for (o, c) in out.iter_mut().zip(self.raw.chunks_exact(4)) {
            let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if !v.is_finite() {
                return err("centroid contains NaN or infinity");
            }
            *o = v;
        }
        Ok(())
    }

    /// Parse a centroid item.
    pub fn decode(b: &'a [u8]) -> Result<CentroidChunk<'a>, FormatError> {
        if b.len() < CENTROID_HEADER + 4 || !(b.len() - CENTROID_HEADER).is_multiple_of(4) {
            return err(format!("centroid item has invalid length {}", b.len()));
        }
        if u32_at(b, 12) != 0 {
            return err("reserved centroid field is not zero");
        }
        Ok(CentroidChunk {
            list: u32_at(b, 0),
            head: u32_at(b, 4),
            start: u32_at(b, 8),
            raw: &b[CENTROID_HEADER..],
        })
    }
}

/// Encode a centroid chunk item.
pub fn encode_centroid_chunk(list: u32, head: BlockNumber, start: u32, floats: &[f32]) -> Vec<u8> {
    let mut b = Vec::with_capacity(CENTROID_HEADER + 4 * floats.len());
    b.extend_from_slice(&list.to_le_bytes());
    b.extend_from_slice(&head.to_le_bytes());
    b.extend_from_slice(&start.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for f in floats {
        b.extend_from_slice(&f.to_le_bytes());
    }
    b
}

/// Most floats of a centroid chunk that fit in `free` bytes of page free space.
pub fn centroid_chunk_capacity(free: usize) -> usize {
    let usable = free.min(MAX_ITEM_SIZE) & !7;
    usable.saturating_sub(CENTROID_HEADER) / 4
}

/// Size of a code tuple for `padded_dims` dimensions.
pub fn list_tuple_size(padded_dims: usize) -> usize {
    LIST_TUPLE_HEADER + padded_dims / 8
}

/// Size of a refinement tuple for `padded_dims` dimensions.
pub fn refine_tuple_size(padded_dims: usize) -> usize {
    REFINE_HEADER + padded_dims
}

/// A parsed list tuple.
#[derive(Clone, Copy, Debug)]
pub struct ListTuple<'a> {
    /// Heap tuple id.
    pub tid: Tid,
    /// `|r|`.
    pub norm: f32,
    /// `<ō, o>`.
    pub dot_oo: f32,
    /// `<r, c>`.
    pub rc: f32,
    /// Code bits, `D / 8` bytes (little-endian u64 words).
    pub code: &'a [u8],
    /// Block of the refinement tuple ([`INVALID_BLOCK`]: none).
    pub refine_block: BlockNumber,
    /// Offset of the refinement tuple in `refine_block` when it was written. A hint: VACUUM's
    /// compaction may move it to a lower offset of the same page (readers then search down).
    pub refine_offset: u16,
}

/// A parsed refinement tuple.
#[derive(Clone, Copy, Debug)]
pub struct RefineTuple<'a> {
    /// Heap tuple id.
    pub tid: Tid,
    /// Offset of the 8-bit code.
    pub lo: f32,
    /// Step of the 8-bit code.
    pub delta: f32,
    /// The rotated residual quantized to 8 bits, `lo + delta * u` per coordinate (`D` bytes).
    pub codes: &'a [u8],
}

/// The heap tid of a tuple of either kind (both start with it); `None` if too short.
#[inline]
pub fn tuple_tid(b: &[u8]) -> Option<Tid> {
    let h = b.first_chunk::<6>()?;
    Some(Tid {
        block: u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
        offset: u16::from_le_bytes([h[4], h[5]]),
    })
}

impl<'a> RefineTuple<'a> {
    /// Parse and validate a refinement tuple.
    pub fn decode(b: &'a [u8], padded_dims: usize) -> Result<RefineTuple<'a>, FormatError> {
        if b.len() != refine_tuple_size(padded_dims) {
            return err(format!(
                "refinement tuple has {} bytes, expected {}",
                b.len(),
                refine_tuple_size(padded_dims)
            ));
        }
        let tid = Tid {
            block: u32_at(b, 0),
            offset: u16_at(b, 4),
        };
        if tid.offset == 0 {
            return err("refinement tuple has heap offset 0");
        }
        if u16_at(b, 6) != 0 {
            return err(format!(
                "refinement tuple has unknown flags {:#x}",
                u16_at(b, 6)
            ));
        }
        let lo = f32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let delta = f32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        if !(lo.is_finite() && delta.is_finite() && delta >= 0.0) {
            return err(format!("refinement tuple has invalid scale {lo} {delta}"));
        }
        Ok(RefineTuple {
            tid,
            lo,
            delta,
            codes: &b[REFINE_HEADER..],
        })
    }
}

/// Read only the heap tid of a refinement tuple (for vacuum); validates the length.
pub fn refine_tuple_tid(b: &[u8], padded_dims: usize) -> Result<Tid, FormatError> {
    if b.len() != refine_tuple_size(padded_dims) {
        return err(format!(
            "refinement tuple has {} bytes, expected {}",
            b.len(),
            refine_tuple_size(padded_dims)
        ));
    }
    match tuple_tid(b) {
        Some(t) if t.offset != 0 => Ok(t),
        _ => err("refinement tuple has heap offset 0"),
    }
}

/// Read only the heap tid of a list tuple (for vacuum); validates the length.
pub fn list_tuple_tid(b: &[u8], padded_dims: usize) -> Result<Tid, FormatError> {
    if b.len() != list_tuple_size(padded_dims) {
        return err(format!(
            "list tuple has {} bytes, expected {}",
            b.len(),
            list_tuple_size(padded_dims)
        ));
    }
    let tid = Tid {
        block: u32_at(b, 0),
        offset: u16_at(b, 4),
    };
    if tid.offset == 0 {
        return err("list tuple has heap offset 0");
    }
    Ok(tid)
}

impl<'a> ListTuple<'a> {
    /// Parse and validate a list tuple.
    #[inline]
    pub fn decode(b: &'a [u8], padded_dims: usize) -> Result<ListTuple<'a>, FormatError> {
        // Runs once per probed tuple: the header is read as one fixed-size array (no per-field
        // bounds checks) and every check is a plain comparison; messages are built only on
        // failure.
        if b.len() != list_tuple_size(padded_dims) {
            return err(format!(
                "list tuple has {} bytes, expected {}",
                b.len(),
                list_tuple_size(padded_dims)
            ));
        }
        let Some((h, rest)) = b.split_first_chunk::<LIST_TUPLE_HEADER>() else {
            return err("list tuple shorter than its header");
        };
        let f = |o: usize| f32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let tid = Tid {
            block: u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
            offset: u16::from_le_bytes([h[4], h[5]]),
        };
        let refine_offset = u16::from_le_bytes([h[6], h[7]]);
        let (norm, dot_oo, rc) = (f(8), f(12), f(16));
        let valid = tid.offset != 0
            && norm.is_finite()
            && norm >= 0.0
            && dot_oo.is_finite()
            && dot_oo > 0.0
            && dot_oo <= 1.001
            && rc.is_finite();
        if !valid {
            return Err(Self::header_error(tid, norm, dot_oo));
        }
        Ok(ListTuple {
            tid,
            norm,
            dot_oo,
            rc,
            code: rest,
            refine_block: u32::from_le_bytes([h[20], h[21], h[22], h[23]]),
            refine_offset,
        })
    }

    #[cold]
    fn header_error(tid: Tid, norm: f32, dot_oo: f32) -> FormatError {
        FormatError(if tid.offset == 0 {
            "list tuple has heap offset 0".to_string()
        } else if !(norm.is_finite() && norm >= 0.0) {
            format!("list tuple has invalid residual norm {norm}")
        } else if !(dot_oo.is_finite() && dot_oo > 0.0 && dot_oo <= 1.001) {
            format!("list tuple has invalid <o,ō> {dot_oo}")
        } else {
            "list tuple has non-finite <r,c>".to_string()
        })
    }
}

/// Append an encoded code tuple to `out`.
#[allow(clippy::too_many_arguments)]
pub fn encode_list_tuple(
    out: &mut Vec<u8>,
    tid: Tid,
    norm: f32,
    dot_oo: f32,
    rc: f32,
    bits: &[u64],
    refine_block: BlockNumber,
    refine_offset: u16,
) {
    out.extend_from_slice(&tid.block.to_le_bytes());
    out.extend_from_slice(&tid.offset.to_le_bytes());
    out.extend_from_slice(&refine_offset.to_le_bytes());
    out.extend_from_slice(&norm.to_le_bytes());
    out.extend_from_slice(&dot_oo.to_le_bytes());
    out.extend_from_slice(&rc.to_le_bytes());
    out.extend_from_slice(&refine_block.to_le_bytes());
    for w in bits {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Point an encoded code tuple at the item that received its refinement tuple.
pub fn set_refine_location(code_tuple: &mut [u8], blk: BlockNumber, off: u16) {
    code_tuple[6..8].copy_from_slice(&off.to_le_bytes());
    code_tuple[20..24].copy_from_slice(&blk.to_le_bytes());
}

/// Append an encoded refinement tuple to `out`.
pub fn encode_refine_tuple(out: &mut Vec<u8>, tid: Tid, lo: f32, delta: f32, u: &[u8]) {
    out.extend_from_slice(&tid.block.to_le_bytes());
    out.extend_from_slice(&tid.offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&lo.to_le_bytes());
    out.extend_from_slice(&delta.to_le_bytes());
    out.extend_from_slice(u);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            dims: 768,
            padded_dims: 768,
            metric: Metric::Cosine,
            nlists: 100,
            seed: 0xdead_beef_1234,
            rounds: ROTATION_ROUNDS,
            first_centroid_block: 201,
            first_list_block: 1,
            build_tuples: 12345,
            build_skipped: 3,
        }
    }

    #[test]
    fn meta_roundtrip_and_validation() {
        let m = meta();
        let b = m.encode();
        assert_eq!(Meta::decode(&b), Ok(m));
        for (off, val) in [
            (0usize, 1u32),
            (4, 1),
            (8, 0),
            (8, 20000),
            (12, 769),
            (16, 9),
            (20, 0),
            (32, 0),
            (36, 0),
            (44, 1),
        ] {
            let mut c = b;
            c[off..off + 4].copy_from_slice(&val.to_le_bytes());
            assert!(Meta::decode(&c).is_err(), "offset {off}");
        }
        assert!(Meta::decode(&b[..63]).is_err());
    }

    #[test]
    fn tuple_roundtrip() {
        let mut out = Vec::new();
        let tid = Tid {
            block: 7,
            offset: 3,
        };
        encode_list_tuple(&mut out, tid, 1.5, 0.8, -0.25, &[1, 2], INVALID_BLOCK, 0);
        assert_eq!(out.len(), list_tuple_size(128));
        set_refine_location(&mut out, 99, 17);
        let t = ListTuple::decode(&out, 128).unwrap();
        assert_eq!(t.tid, tid);
        assert_eq!(
            (t.norm, t.dot_oo, t.rc, t.refine_block, t.refine_offset),
            (1.5, 0.8, -0.25, 99, 17)
        );
        assert_eq!(t.code.len(), 16);
        assert_eq!(t.code[0], 1);
        assert_eq!(t.code[8], 2);
        assert_eq!(tuple_tid(&out), Some(tid));
        assert!(ListTuple::decode(&out, 192).is_err());
        let mut bad = out.clone();
        bad[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(ListTuple::decode(&bad, 128).is_err());
        let mut bad = out.clone();
        bad[4] = 0;
        assert!(ListTuple::decode(&bad, 128).is_err());

        let u: Vec<u8> = (0..128).map(|i| i as u8).collect();
        let mut r = Vec::new();
        encode_refine_tuple(&mut r, tid, -0.5, 0.01, &u);
        assert_eq!(r.len(), refine_tuple_size(128));
        let rt = RefineTuple::decode(&r, 128).unwrap();
        assert_eq!(
            (rt.tid, rt.lo, rt.delta, rt.codes),
            (tid, -0.5, 0.01, &u[..])
        );
        assert_eq!(refine_tuple_tid(&r, 128), Ok(tid));
        assert!(RefineTuple::decode(&r, 192).is_err());
        let mut bad = r.clone();
        bad[12..16].copy_from_slice(&(-1f32).to_le_bytes());
        assert!(RefineTuple::decode(&bad, 128).is_err());
        let mut bad = r.clone();
        bad[6] = 1;
        assert!(RefineTuple::decode(&bad, 128).is_err());
    }

    #[test]
    fn refine_heads_and_old_versions() {
        let m = meta();
        assert_eq!(m.refine_head(1), Some(101));
        assert_eq!(m.refine_head(100), Some(200));
        assert_eq!(m.refine_head(0), None);
        assert_eq!(m.refine_head(101), None);
        let mut b = m.encode();
        b[4..8].copy_from_slice(&2u32.to_le_bytes());
        let e = Meta::decode(&b).unwrap_err();
        assert!(e.0.contains("REINDEX"), "{e}");
    }

    #[test]
    fn centroid_chunk_roundtrip() {
        let b = encode_centroid_chunk(3, 17, 64, &[1.0, -2.0]);
        let c = CentroidChunk::decode(&b).unwrap();
        assert_eq!((c.list, c.head, c.start, c.len()), (3, 17, 64, 2));
        let mut out = [0f32; 2];
        c.copy_to(&mut out).unwrap();
        assert_eq!(out, [1.0, -2.0]);
        assert!(CentroidChunk::decode(&b[..18]).is_err());
        assert_eq!(centroid_chunk_capacity(8148), (8144 - 16) / 4);
    }
}
