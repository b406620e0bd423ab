//! On-disk format, version 5. All integers and floats are little endian.
//!
//! ## Pages
//! Every page's [`Opaque`](crate::page::Opaque) carries `next` (the next page of its chain or
//! `INVALID_BLOCK`) and `flags` = exactly one of [`PAGE_META`], [`PAGE_CENTROID`], [`PAGE_LIST`],
//! [`PAGE_REFINE`], [`PAGE_NULLS`].
//!
//! Layout of a freshly built index with `L` lists:
//! - block 0: meta page, one item ([`Meta`], 72 bytes).
//! - blocks `1 ..= L`: the head page of each list's *code chain* (list `i` starts at block
//!   `1 + i`), initially empty;
//! - blocks `L + 1 ..= 2L`: the head page of each list's *refinement chain* (list `i`: block
//!   `1 + L + i`, see [`Meta::refine_head`]); a chain's later pages follow wherever they were
//!   allocated (at the end of a build, the pages of one chain are contiguous).
//! - blocks `2L + 1 ..`: the centroid chain (`Meta::first_centroid_block`);
//! - then the head of the *NULL chain* (`Meta::null_head`): the heap tids of rows whose indexed
//!   value is NULL, which the `NULLS FIRST` ordering operator returns before all others.
//!
//! Why two chains per list: a scan reads every code tuple of the lists it probes but the
//! 8-bit refinement code of only the few rows whose 1-bit bounds leave them in the running.
//! Kept apart, the codes of 96 rows of 384 dimensions fit a page (17 with the 8-bit codes), so
//! a probe reads 6× fewer pages and bytes.
//!
//! ## Meta item (64 bytes)
//! | off | type | field |
//! |----:|------|-------|
//! | 0  | u32 | magic [`MAGIC`] |
//! | 4  | u32 | version (4) |
//! | 8  | u32 | dims |
//! | 12 | u32 | padded dims `D` (dims rounded up to a multiple of 64) |
//! | 16 | u32 | metric (0 inner product, 1 cosine, 2 L2) |
//! | 20 | u32 | number of lists |
//! | 24 | u64 | rotation seed |
//! | 32 | u32 | rotation rounds |
//! | 36 | u32 | first centroid block |
//! | 40 | u32 | first list head block |
//! | 44 | f32 | mean `f1` of the rows the build wrote (about their mean residual norm; 0 when none), see [`crate::insert()`] |
//! | 48 | u64 | tuples indexed by the build |
//! | 56 | u64 | zero vectors skipped by the build (cosine) |
//! | 64 | u32 | head block of the NULL chain |
//! | 68 | u32 | reserved (0) |
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
//! | 12 | u32 | head block of the list's refinement chain; 0 for a built list (its head follows from the layout, see [`Meta::refine_head`]) |
//! | 16 | f32 × n | centroid coordinates `start .. start + n` |
//!
//! ## Code block (8 + 32 · (28 + D/8) bytes: 2440 for 384 dimensions, three per page)
//! A code chain's items are blocks of up to [`block_rows`] rows (32; 1 when `D` > 1792, where
//! 32 codes would not fit a page), their fields stored column by column so that a scan
//! estimates a whole block at once: codes in the [`fastscan`] layout, constants in arrays of
//! floats. `C` is the capacity; slots at and past the count are zero.
//!
//! | off | type | field |
//! |----:|------|-------|
//! | 0  | u16 | rows used (1 ..= C) |
//! | 2  | u16 | capacity `C` (must equal [`block_rows`]) |
//! | 4  | u32 | reserved (0) |
//! | 8  | u32 × C | heap blocks |
//! | 8 + 4C | u16 × C | heap offsets |
//! | 8 + 6C | u16 × C | offset of each row's refinement tuple when written (a hint, see below) |
//! | 8 + 8C | u32 × C | block of each row's refinement tuple (`INVALID_BLOCK` when `D` > 4096: none) |
//! | 8 + 12C | f32 × C × 4 | estimator constants `k0`, `f1`, `h`, `e1` (one array each, see [`RowFactors`]) |
//! | 8 + 28C | | sign bits of the rotated residuals `r = x - c`: the fast-scan layout when `C` = 32, else the row's `D/64` little-endian words (bit `i % 64` of word `i / 64` is 1 iff coordinate `i` ≥ 0) |
//!
//! Inserts fill the last block of a chain's first page with room, or add a block; VACUUM
//! rewrites a block without its dead rows (in place, order kept), or deletes it when none is
//! left.
//!
//! ## Refinement tuple (24 + D bytes: 408 for 384 dimensions), in a refinement chain
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
//! | 16 | f32 | `|r|` |
//! | 20 | f32 | `<r, c>` |
//! | 24 | u8 × D | rotated residual ≈ `lo + delta * u_i` (round to nearest) |

//!
//! ## NULL tuple (6 bytes), in the NULL chain
//! The heap tid (block u32, offset u16) of a row whose indexed value is NULL. Inserts add to the
//! chain's head page; when it is full its items move to a new page linked right after it (that
//! page first, complete, then the emptied head), so the head never changes and an insert reads
//! one page.

use crate::page::MAX_ITEM_SIZE;
use crate::rabitq::padded_dims;
use crate::{BlockNumber, Metric, Tid, INVALID_BLOCK, MAX_DIMS, MAX_LISTS};
use rsclip_core::fastscan;
use std::fmt;

/// Magic number of the meta page ("RSIQ").
pub const MAGIC: u32 = 0x5153_4952;
/// Format version written by this crate (5: a NULL chain, lists added by inserts; 4: codes in
/// fast-scan blocks of 32 rows; 3: one code tuple per row; 3 to 5 keep refinement codes in
/// chains of their own, 2 kept them in the list tuples).
pub const VERSION: u32 = 5;
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
/// Opaque flag of NULL chain pages.
pub const PAGE_NULLS: u16 = 0x0010;
/// Size of a NULL tuple (a heap tid).
pub const NULL_TUPLE_SIZE: usize = 6;
/// Rotation rounds used by new indexes.
pub const ROTATION_ROUNDS: u32 = 3;
/// Size of the centroid item header.
pub const CENTROID_HEADER: usize = 16;
/// Size of the code block header (row count, capacity, reserved).
pub const BLOCK_HEADER: usize = 8;
/// Bytes per row of a code block besides its code: heap tid, refinement location, 4 floats.
pub const SLOT_BYTES: usize = 28;
/// Size of the refinement tuple header (tid, flags, `lo`, `delta`, `|r|`, `<r, c>`).
pub const REFINE_HEADER: usize = 24;
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
#[derive(Clone, Copy, Debug, PartialEq)]
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
    /// Mean `f1` (nearly proportional to the residual norm) of the rows the build wrote: how
    /// far a row usually is from its list's centroid. 0 when the build wrote none.
    pub build_mean_f1: f32,
    /// Head page of the NULL chain.
    pub null_head: BlockNumber,
}

// `build_mean_f1` is finite in every decoded or built meta page, so equality is an equivalence.
impl Eq for Meta {}

impl Meta {
    /// Encoded size.
    pub const SIZE: usize = 72;

    /// Lists the build made (later lists are added by inserts, see [`crate::insert()`]): the
    /// build lays out their code heads, then their refinement heads, then the centroid chain.
    pub fn built_lists(&self) -> u32 {
        self.first_centroid_block
            .saturating_sub(self.first_list_block)
            / 2
    }

    /// Head of the refinement chain of the built list whose code chain starts at `head`, or
    /// `None` when `head` is not a built list's head (a list added later names its refinement
    /// head in its centroid item).
    pub fn refine_head(&self, head: BlockNumber) -> Option<BlockNumber> {
        let built = self.built_lists();
        let i = head.checked_sub(self.first_list_block)?;
        (i < built).then(|| head + built)
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
        b[44..48].copy_from_slice(&self.build_mean_f1.to_le_bytes());
        b[48..56].copy_from_slice(&self.build_tuples.to_le_bytes());
        b[56..64].copy_from_slice(&self.build_skipped.to_le_bytes());
        b[64..68].copy_from_slice(&self.null_head.to_le_bytes());
        b
    }

    /// Parse and validate the meta item.
    pub fn decode(b: &[u8]) -> Result<Meta, FormatError> {
        if b.len() < 8 {
            return err(format!("meta item has {} bytes", b.len()));
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
                format!(
                    "unsupported format version {version}, written by a newer rsclip (this one \
                     reads format {VERSION}): install that version, or REINDEX with this one"
                )
            });
        }
        if b.len() != Meta::SIZE {
            return err(format!(
                "meta item has {} bytes, expected {}",
                b.len(),
                Meta::SIZE
            ));
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
        let build_mean_f1 = f32::from_bits(u32_at(b, 44));
        if !(build_mean_f1.is_finite() && build_mean_f1 >= 0.0) {
            return err(format!("invalid mean residual {build_mean_f1}"));
        }
        if (first_list_block as u64) + 2 * nlists as u64 > INVALID_BLOCK as u64 {
            return err(format!(
                "first list block {first_list_block} leaves no room for {nlists} lists"
            ));
        }
        let built = first_centroid_block.checked_sub(first_list_block);
        if !built.is_some_and(|b| b >= 2 && b.is_multiple_of(2) && b / 2 <= nlists) {
            return err(format!(
                "centroid chain at block {first_centroid_block} does not follow the heads of \
                 at most {nlists} lists from block {first_list_block}"
            ));
        }
        let null_head = u32_at(b, 64);
        if null_head == 0 || null_head == INVALID_BLOCK {
            return err(format!("invalid NULL chain head {null_head}"));
        }
        if u32_at(b, 68) != 0 {
            return err("reserved meta field is not zero");
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
            build_mean_f1,
            null_head,
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
    /// Head block of the list's refinement chain for a list added after the build; 0 for a
    /// built list, whose refinement head follows from the layout ([`Meta::refine_head`]).
    pub refine_head: BlockNumber,
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
        Ok(CentroidChunk {
            list: u32_at(b, 0),
            head: u32_at(b, 4),
            start: u32_at(b, 8),
            refine_head: u32_at(b, 12),
            raw: &b[CENTROID_HEADER..],
        })
    }
}

/// Encode a centroid chunk item (`refine_head` 0 for a built list).
pub fn encode_centroid_chunk(
    list: u32,
    head: BlockNumber,
    refine_head: BlockNumber,
    start: u32,
    floats: &[f32],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(CENTROID_HEADER + 4 * floats.len());
    b.extend_from_slice(&list.to_le_bytes());
    b.extend_from_slice(&head.to_le_bytes());
    b.extend_from_slice(&start.to_le_bytes());
    b.extend_from_slice(&refine_head.to_le_bytes());
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

/// Rows per code block of `padded_dims` dimensions: 32 (the fast-scan layout) when such a block
/// fits a page, else 1 (more than 1792 dimensions: codes stay row by row).
pub fn block_rows(padded_dims: usize) -> usize {
    if BLOCK_HEADER + 32 * (SLOT_BYTES + padded_dims / 8) <= MAX_ITEM_SIZE {
        fastscan::BLOCK
    } else {
        1
    }
}

/// Size of a code block item for `padded_dims` dimensions.
pub fn block_size(padded_dims: usize) -> usize {
    BLOCK_HEADER + block_rows(padded_dims) * (SLOT_BYTES + padded_dims / 8)
}

/// Size of a refinement tuple for `padded_dims` dimensions.
pub fn refine_tuple_size(padded_dims: usize) -> usize {
    REFINE_HEADER + padded_dims
}

/// One row's code, as build, insert and VACUUM handle it before it is packed into a block.
#[derive(Clone, Debug, PartialEq)]
pub struct RowCode {
    /// Heap tuple id.
    pub tid: Tid,
    /// Block of the refinement tuple ([`INVALID_BLOCK`]: none).
    pub refine_block: BlockNumber,
    /// Offset of the refinement tuple in `refine_block` when it was written. A hint: VACUUM's
    /// compaction may move it to a lower offset of the same page (readers then search down).
    pub refine_offset: u16,
    /// The estimator's per-row constants (see [`crate::rabitq`]).
    pub factors: RowFactors,
    /// Sign bits of the rotated residual, `D / 64` words.
    pub bits: Vec<u64>,
}

/// Per-row constants of the 1-bit estimator (see [`crate::rabitq::row_factors`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowFactors {
    /// Metric-dependent constant term.
    pub k0: f32,
    /// `|r| / <ō, o>`: the scale of `<ō, q̄>` (0 for a zero residual).
    pub f1: f32,
    /// `f1 · (2·popcount − D) / sqrt(D)`: the coefficient of the query's quantization offset.
    pub h: f32,
    /// `|r| · sqrt(1 − <ō,o>²) / <ō,o>`: the coefficient of the error bound.
    pub e1: f32,
}

impl RowFactors {
    fn valid(&self) -> bool {
        self.k0.is_finite()
            && self.f1.is_finite()
            && self.f1 >= 0.0
            && self.h.is_finite()
            && self.e1.is_finite()
            && self.e1 >= 0.0
    }
}

/// A parsed code block: up to [`block_rows`] rows.
#[derive(Clone, Copy, Debug)]
pub struct CodeBlock<'a> {
    b: &'a [u8],
    cap: usize,
    count: usize,
    dims: usize,
}

/// The estimator constants of a block's slots, column by column (`k0, f1, h, e1`; unused slots
/// 0): [`CodeBlock::decode_into`] fills them.
pub type BlockFactors = [[f32; fastscan::BLOCK]; 4];

impl<'a> CodeBlock<'a> {
    /// Parse and validate a code block (every used slot is checked).
    pub fn decode(b: &'a [u8], padded_dims: usize) -> Result<CodeBlock<'a>, FormatError> {
        let mut factors = [[0f32; fastscan::BLOCK]; 4];
        Self::decode_into(b, padded_dims, &mut factors)
    }

    /// [`CodeBlock::decode`], also parsing the slots' constants into `factors` (a scan reuses
    /// one array for every block).
    #[inline]
    pub fn decode_into(
        b: &'a [u8],
        padded_dims: usize,
        factors: &mut BlockFactors,
    ) -> Result<CodeBlock<'a>, FormatError> {
        if b.len() != block_size(padded_dims) {
            return err(format!(
                "code block has {} bytes, expected {}",
                b.len(),
                block_size(padded_dims)
            ));
        }
        let cap = block_rows(padded_dims);
        let (count, stored_cap, reserved) =
            (u16_at(b, 0) as usize, u16_at(b, 2) as usize, u32_at(b, 4));
        if stored_cap != cap || reserved != 0 {
            return err(format!(
                "code block header is invalid (capacity {stored_cap}, expected {cap}; reserved {reserved:#x})"
            ));
        }
        if count == 0 || count > cap {
            return err(format!(
                "code block holds {count} rows, expected 1 to {cap}"
            ));
        }
        for (f, arr) in factors.iter_mut().enumerate() {
            let o = BLOCK_HEADER + (12 + 4 * f) * cap;
            for (a, c) in arr.iter_mut().zip(b[o..o + 4 * cap].chunks_exact(4)) {
                *a = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        // Runs once per block a scan reads: checks without early exits, so that they vectorize.
        let [k0, f1, h, e1] = &*factors;
        let mut ok = true;
        for i in 0..count {
            ok &= k0[i].is_finite()
                & f1[i].is_finite()
                & (f1[i] >= 0.0)
                & h[i].is_finite()
                & e1[i].is_finite()
                & (e1[i] >= 0.0);
        }
        let offs = &b[BLOCK_HEADER + 4 * cap..BLOCK_HEADER + 4 * cap + 2 * count];
        let zero_offset = offs
            .chunks_exact(2)
            .fold(false, |z, c| z | (c[0] | c[1] == 0));
        let blk = CodeBlock {
            b,
            cap,
            count,
            dims: padded_dims,
        };
        if !ok || zero_offset {
            return Err(blk.slot_error());
        }
        Ok(blk)
    }

    #[cold]
    fn slot_error(&self) -> FormatError {
        for i in 0..self.count {
            if self.tid(i).offset == 0 {
                return FormatError(format!("code block row {i} has heap offset 0"));
            }
            if !self.factors(i).valid() {
                return FormatError(format!(
                    "code block row {i} has invalid estimator constants {:?}",
                    self.factors(i)
                ));
            }
        }
        FormatError("code block is invalid".into())
    }

    /// Rows used.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no row is used (never true of a decoded block).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the codes are in the fast-scan layout ([`fastscan`]), else row by row.
    pub fn packed(&self) -> bool {
        self.cap == fastscan::BLOCK
    }

    /// Heap tid of row `i`.
    #[inline]
    pub fn tid(&self, i: usize) -> Tid {
        Tid {
            block: u32_at(self.b, BLOCK_HEADER + 4 * i),
            offset: u16_at(self.b, BLOCK_HEADER + 4 * self.cap + 2 * i),
        }
    }

    /// Refinement tuple location of row `i`.
    #[inline]
    pub fn refine(&self, i: usize) -> (BlockNumber, u16) {
        (
            u32_at(self.b, BLOCK_HEADER + 8 * self.cap + 4 * i),
            u16_at(self.b, BLOCK_HEADER + 6 * self.cap + 2 * i),
        )
    }

    /// Estimator constants of row `i`.
    pub fn factors(&self, i: usize) -> RowFactors {
        let f = |field: usize| {
            let o = BLOCK_HEADER + (12 + 4 * field) * self.cap + 4 * i;
            f32::from_le_bytes([self.b[o], self.b[o + 1], self.b[o + 2], self.b[o + 3]])
        };
        RowFactors {
            k0: f(0),
            f1: f(1),
            h: f(2),
            e1: f(3),
        }
    }

    /// The code area: the fast-scan layout when [`CodeBlock::packed`], else the row's words.
    pub fn codes(&self) -> &'a [u8] {
        &self.b[BLOCK_HEADER + SLOT_BYTES * self.cap..]
    }

    /// Row `i` unpacked.
    pub fn row(&self, i: usize) -> RowCode {
        let (refine_block, refine_offset) = self.refine(i);
        let bits = if self.packed() {
            fastscan::get_code(self.codes(), self.dims, i)
        } else {
            self.codes()
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()
        };
        RowCode {
            tid: self.tid(i),
            refine_block,
            refine_offset,
            factors: self.factors(i),
            bits,
        }
    }
}

/// Encode `rows` (1 to [`block_rows`] of them) as one code block item.
pub fn encode_block(rows: &[RowCode], padded_dims: usize) -> Vec<u8> {
    let cap = block_rows(padded_dims);
    assert!(!rows.is_empty() && rows.len() <= cap);
    let mut b = vec![0u8; block_size(padded_dims)];
    b[0..2].copy_from_slice(&(rows.len() as u16).to_le_bytes());
    b[2..4].copy_from_slice(&(cap as u16).to_le_bytes());
    let put = |b: &mut [u8], o: usize, v: &[u8]| b[o..o + v.len()].copy_from_slice(v);
    for (i, r) in rows.iter().enumerate() {
        put(&mut b, BLOCK_HEADER + 4 * i, &r.tid.block.to_le_bytes());
        put(
            &mut b,
            BLOCK_HEADER + 4 * cap + 2 * i,
            &r.tid.offset.to_le_bytes(),
        );
        put(
            &mut b,
            BLOCK_HEADER + 6 * cap + 2 * i,
            &r.refine_offset.to_le_bytes(),
        );
        put(
            &mut b,
            BLOCK_HEADER + 8 * cap + 4 * i,
            &r.refine_block.to_le_bytes(),
        );
        let f = r.factors;
        for (k, v) in [f.k0, f.f1, f.h, f.e1].into_iter().enumerate() {
            put(
                &mut b,
                BLOCK_HEADER + (12 + 4 * k) * cap + 4 * i,
                &v.to_le_bytes(),
            );
        }
    }
    let codes = &mut b[BLOCK_HEADER + SLOT_BYTES * cap..];
    if cap == fastscan::BLOCK {
        for (i, r) in rows.iter().enumerate() {
            fastscan::set_code(codes, padded_dims, i, &r.bits);
        }
    } else {
        for (c, w) in codes.chunks_exact_mut(8).zip(&rows[0].bits) {
            c.copy_from_slice(&w.to_le_bytes());
        }
    }
    b
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
    /// `|r|`.
    pub norm: f32,
    /// `<r, c>`.
    pub rc: f32,
    /// The rotated residual quantized to 8 bits, `lo + delta * u` per coordinate (`D` bytes).
    pub codes: &'a [u8],
}

/// The heap tid at the start of a refinement tuple; `None` if too short.
#[inline]
pub fn tuple_tid(b: &[u8]) -> Option<Tid> {
    let h = b.first_chunk::<6>()?;
    Some(Tid {
        block: u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
        offset: u16::from_le_bytes([h[4], h[5]]),
    })
}

/// Encode a NULL tuple.
pub fn encode_null_tuple(tid: Tid) -> [u8; NULL_TUPLE_SIZE] {
    let mut b = [0u8; NULL_TUPLE_SIZE];
    b[0..4].copy_from_slice(&tid.block.to_le_bytes());
    b[4..6].copy_from_slice(&tid.offset.to_le_bytes());
    b
}

/// The heap tid of a NULL tuple.
pub fn null_tuple_tid(b: &[u8]) -> Result<Tid, FormatError> {
    if b.len() != NULL_TUPLE_SIZE {
        return err(format!(
            "NULL tuple has {} bytes, expected {NULL_TUPLE_SIZE}",
            b.len()
        ));
    }
    match tuple_tid(b) {
        Some(t) if t.offset != 0 => Ok(t),
        _ => err("NULL tuple has heap offset 0"),
    }
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
        let f = |o: usize| f32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let (lo, delta, norm, rc) = (f(8), f(12), f(16), f(20));
        if !(lo.is_finite() && delta.is_finite() && delta >= 0.0) {
            return err(format!("refinement tuple has invalid scale {lo} {delta}"));
        }
        if !(norm.is_finite() && norm >= 0.0 && rc.is_finite()) {
            return err(format!(
                "refinement tuple has invalid residual norm {norm} or <r,c> {rc}"
            ));
        }
        Ok(RefineTuple {
            tid,
            lo,
            delta,
            norm,
            rc,
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

/// Append an encoded refinement tuple to `out`.
pub fn encode_refine_tuple(
    out: &mut Vec<u8>,
    tid: Tid,
    lo: f32,
    delta: f32,
    norm: f32,
    rc: f32,
    u: &[u8],
) {
    out.extend_from_slice(&tid.block.to_le_bytes());
    out.extend_from_slice(&tid.offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&lo.to_le_bytes());
    out.extend_from_slice(&delta.to_le_bytes());
    out.extend_from_slice(&norm.to_le_bytes());
    out.extend_from_slice(&rc.to_le_bytes());
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
            build_mean_f1: 0.75,
            null_head: 202,
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
            (44, f32::NAN.to_bits()),
            (44, (-1f32).to_bits()),
            (64, 0),
            (64, u32::MAX),
            (68, 1),
        ] {
            let mut c = b;
            c[off..off + 4].copy_from_slice(&val.to_le_bytes());
            assert!(Meta::decode(&c).is_err(), "offset {off}");
        }
        assert!(Meta::decode(&b[..71]).is_err());
        assert!(Meta::decode(&b[..64]).is_err());
    }

    #[test]
    fn other_format_versions_say_what_to_do() {
        let b = meta().encode();
        for (version, says) in [(VERSION - 1, "older rsclip"), (VERSION + 1, "newer rsclip")] {
            let mut c = b;
            c[4..8].copy_from_slice(&version.to_le_bytes());
            let e = format!("{:?}", Meta::decode(&c).unwrap_err());
            assert!(e.contains(says) && e.contains("REINDEX"), "{e}");
        }
        // A version 4 meta item was 64 bytes: the version is read before the size.
        let mut c = b[..64].to_vec();
        c[4..8].copy_from_slice(&4u32.to_le_bytes());
        let e = Meta::decode(&c).unwrap_err();
        assert!(
            e.0.contains("older rsclip") && e.0.contains("REINDEX"),
            "{e}"
        );
    }

    #[test]
    fn null_tuple_roundtrip() {
        let tid = Tid {
            block: 70_000,
            offset: 9,
        };
        assert_eq!(null_tuple_tid(&encode_null_tuple(tid)), Ok(tid));
        assert!(null_tuple_tid(&encode_null_tuple(Tid {
            block: 1,
            offset: 0
        }))
        .is_err());
        assert!(null_tuple_tid(&[0u8; 8]).is_err());
    }

    fn row(i: u32, d: usize) -> RowCode {
        RowCode {
            tid: Tid {
                block: 7 + i,
                offset: 3,
            },
            refine_block: 99 + i,
            refine_offset: 17,
            factors: RowFactors {
                k0: -0.25 * i as f32,
                f1: 1.5,
                h: -0.1,
                e1: 0.8,
            },
            bits: (0..d / 64)
                .map(|w| ((w as u64 + 1) * 0x9E37_79B9) ^ i as u64)
                .collect(),
        }
    }

    #[test]
    fn block_roundtrip() {
        for d in [128usize, 384, 1792, 1856, 16_000 / 64 * 64] {
            let cap = block_rows(d);
            assert_eq!(cap, if d <= 1792 { 32 } else { 1 }, "{d}");
            assert!(block_size(d) <= MAX_ITEM_SIZE);
            for n in [1, cap.min(5), cap] {
                let rows: Vec<RowCode> = (0..n as u32).map(|i| row(i, d)).collect();
                let b = encode_block(&rows, d);
                assert_eq!(b.len(), block_size(d));
                let blk = CodeBlock::decode(&b, d).unwrap();
                assert_eq!(blk.len(), n);
                assert_eq!(blk.packed(), cap == 32);
                for (i, r) in rows.iter().enumerate() {
                    assert_eq!(&blk.row(i), r, "{d} dims, row {i}");
                    let mut f = [[0f32; 32]; 4];
                    CodeBlock::decode_into(&b, d, &mut f).unwrap();
                    assert_eq!((f[0][i], f[3][i]), (r.factors.k0, r.factors.e1));
                }
                assert!(CodeBlock::decode(&b[1..], d).is_err());
                let mut bad = b.clone();
                bad[0..2].copy_from_slice(&(cap as u16 + 1).to_le_bytes());
                assert!(CodeBlock::decode(&bad, d).is_err());
                let mut bad = b.clone();
                bad[0..2].copy_from_slice(&0u16.to_le_bytes());
                assert!(CodeBlock::decode(&bad, d).is_err());
                // a NaN in the last used row's e1
                let mut bad = b.clone();
                let o = BLOCK_HEADER + 24 * cap + 4 * (n - 1);
                bad[o..o + 4].copy_from_slice(&f32::NAN.to_le_bytes());
                assert!(CodeBlock::decode(&bad, d).is_err());
                // heap offset 0
                let mut bad = b.clone();
                let o = BLOCK_HEADER + 4 * cap;
                bad[o..o + 2].copy_from_slice(&0u16.to_le_bytes());
                assert!(CodeBlock::decode(&bad, d).is_err());
            }
        }
    }

    #[test]
    fn refine_tuple_roundtrip() {
        let tid = Tid {
            block: 7,
            offset: 3,
        };
        let u: Vec<u8> = (0..128).map(|i| i as u8).collect();
        let mut r = Vec::new();
        encode_refine_tuple(&mut r, tid, -0.5, 0.01, 1.25, -0.3, &u);
        assert_eq!(r.len(), refine_tuple_size(128));
        let rt = RefineTuple::decode(&r, 128).unwrap();
        assert_eq!(
            (rt.tid, rt.lo, rt.delta, rt.norm, rt.rc, rt.codes),
            (tid, -0.5, 0.01, 1.25, -0.3, &u[..])
        );
        assert_eq!(refine_tuple_tid(&r, 128), Ok(tid));
        assert_eq!(tuple_tid(&r), Some(tid));
        assert!(RefineTuple::decode(&r, 192).is_err());
        let mut bad = r.clone();
        bad[12..16].copy_from_slice(&(-1f32).to_le_bytes());
        assert!(RefineTuple::decode(&bad, 128).is_err());
        let mut bad = r.clone();
        bad[16..20].copy_from_slice(&f32::INFINITY.to_le_bytes());
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
        // Lists added by inserts do not move the built lists' refinement heads.
        let grown = Meta { nlists: 140, ..m };
        assert_eq!(grown.built_lists(), 100);
        assert_eq!(grown.refine_head(100), Some(200));
        assert_eq!(grown.refine_head(101), None);
        assert_eq!(Meta::decode(&grown.encode()), Ok(grown));
        // More built lists than lists, or a layout that is no build's, are corrupt.
        assert!(Meta::decode(&Meta { nlists: 99, ..m }.encode()).is_err());
        assert!(Meta::decode(
            &Meta {
                first_centroid_block: 200,
                ..m
            }
            .encode()
        )
        .is_err());
        let mut b = m.encode();
        b[4..8].copy_from_slice(&2u32.to_le_bytes());
        let e = Meta::decode(&b).unwrap_err();
        assert!(e.0.contains("REINDEX"), "{e}");
    }

    #[test]
    fn centroid_chunk_roundtrip() {
        let b = encode_centroid_chunk(3, 17, 0, 64, &[1.0, -2.0]);
        let c = CentroidChunk::decode(&b).unwrap();
        assert_eq!(
            (c.list, c.head, c.refine_head, c.start, c.len()),
            (3, 17, 0, 64, 2)
        );
        let b = encode_centroid_chunk(3, 17, 905, 0, &[1.0]);
        assert_eq!(CentroidChunk::decode(&b).unwrap().refine_head, 905);
        let mut out = [0f32; 2];
        c.copy_to(&mut out).unwrap();
        assert_eq!(out, [1.0, -2.0]);
        assert!(CentroidChunk::decode(&b[..18]).is_err());
        assert_eq!(centroid_chunk_capacity(8148), (8144 - 16) / 4);
    }
}
