//! Index build.
//!
//! [`IndexBuilder::new`] writes the meta page (block 0), one empty head page per list (blocks
//! `1 ..= lists`) and the centroid chain. [`IndexBuilder::add`] assigns each vector to its
//! nearest centroid, encodes it and buffers the tuple in memory, per list.
//! When the buffered tuples exceed `memory_limit_bytes` (the Postgres side passes
//! `maintenance_work_mem` minus what it uses itself), all buffers are flushed: each list's
//! tuples are appended to that list's chain (filling its tail page, then extending with
//! consecutive new pages), and buffering starts again. [`IndexBuilder::finish`] flushes the rest
//! and records the counts in the meta page. With an unlimited budget each list's pages are
//! therefore written contiguously at the end of the build.
//!
//! Memory: the rotated centroids (`lists × D × 4` bytes) plus at most `memory_limit_bytes` of
//! buffered tuples (plus one tuple).
//!
//! Empty tables: pass no centroids (an empty slice); the index gets one list whose centroid is
//! the zero vector. Such an index is correct (RaBitQ codes of the raw vectors) but a scan reads
//! every tuple's code, so it should be rebuilt once the table has data (as with ivfflat).
//!
//! Crash safety: a build is not crash safe by itself; see the crate documentation.

use crate::common::{encode_row, prepare};
use crate::format::{
    block_rows, encode_block, has_refine, refine_tuple_size, CodeBlock, Meta, RowCode, META_BLOCK,
    PAGE_CENTROID, PAGE_LIST, PAGE_META, PAGE_NULLS, PAGE_REFINE, ROTATION_ROUNDS, SLOT_BYTES,
};
use crate::page::{fits, Opaque, PageRead, PageWrite, Relation};
use crate::rabitq::{padded_dims, Rotation};
use crate::{BlockNumber, Error, Metric, Result, Tid, INVALID_BLOCK, MAX_DIMS, MAX_LISTS};

/// Number of lists for a table of `n_rows` rows: `n_rows / 300` up to 30 000 rows (100 lists),
/// rising linearly to 1000 lists at 100 000 rows, `sqrt(10 · n_rows)` beyond (3162 at a
/// million); at least 1, at most [`MAX_LISTS`].
///
/// On the real sentence-embedding set (bench/index.py, 100k rows) 1000 lists reached recall@10
/// 0.95 at about 0.6× the server time of 333 lists: a scan reads fewer rows and pages per probe,
/// and two-level k-means ([`crate::kmeans::kmeans_two_level`]) keeps the build fast. Small
/// tables keep lists of about 300 rows: with 100-row lists the 4000-row real set needed more
/// than the default probes for recall 0.95 (tests/integration/recall.rs).
pub fn default_lists(n_rows: u64) -> u32 {
    (default_lists_curve(n_rows as f64) as u64).clamp(1, MAX_LISTS as u64) as u32
}

/// The curve [`default_lists`] rounds down: unrounded and not raised to 1, so that
/// `n / default_lists_curve(n)` (a default build's mean list) is a smooth function of `n`:
/// 300 rows up to 30 000 rows, falling to 100 at 100 000, `sqrt(n / 10)` beyond, and growing
/// again where [`MAX_LISTS`] caps the lists.
pub fn default_lists_curve(n_rows: f64) -> f64 {
    let l = if n_rows <= 30_000.0 {
        n_rows / 300.0
    } else if n_rows <= 100_000.0 {
        100.0 + (n_rows - 30_000.0) * 900.0 / 70_000.0
    } else {
        (n_rows * 10.0).sqrt()
    };
    l.min(MAX_LISTS as f64)
}

/// Number of sample rows to train `lists` centroids on: 50 per list, at least 10 000.
pub fn sample_size(lists: u32) -> usize {
    (lists as usize * 50).max(10_000)
}

/// Parameters of a build.
#[derive(Clone, Debug)]
pub struct BuildParams {
    /// Dimensions of the indexed vectors (1 ..= [`MAX_DIMS`]).
    pub dims: u32,
    /// Distance metric.
    pub metric: Metric,
    /// Seed of the RaBitQ rotation (stored in the meta page).
    pub seed: u64,
    /// Budget for buffered tuples; exceeding it flushes the buffers to the list chains.
    pub memory_limit_bytes: usize,
}

/// What [`IndexBuilder::add`] or [`crate::insert()`] did with a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddOutcome {
    /// The vector was indexed.
    Added,
    /// The vector is zero under the cosine metric (it has no direction) and was not indexed.
    SkippedZeroVector,
}

/// Counts of a finished build.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildStats {
    /// Tuples indexed.
    pub tuples: u64,
    /// Zero vectors skipped (cosine).
    pub skipped_zero: u64,
    /// Rows with a NULL value (in the NULL chain).
    pub nulls: u64,
    /// Times the buffers were flushed (at least 1 when anything was indexed).
    pub flushes: u64,
    /// Number of lists.
    pub lists: u32,
    /// Pages in the index.
    pub nblocks: BlockNumber,
}

/// Writes a new index into an empty relation.
pub struct IndexBuilder<'r, R: Relation> {
    rel: &'r R,
    meta: Meta,
    rot: Rotation,
    /// Rotated centroids, `nlists × D`.
    cents: Vec<f32>,
    /// Tail page of each list's code chain and refinement chain.
    tails: Vec<BlockNumber>,
    refine_tails: Vec<BlockNumber>,
    /// Buffered rows and refinement tuples of each list (the rows not yet pointing at their
    /// refinement tuples).
    buffers: Vec<Vec<RowCode>>,
    refine_buffers: Vec<Vec<u8>>,
    buffered: usize,
    limit: usize,
    stats: BuildStats,
    refine_scratch: Vec<u8>,
    placed: Vec<(BlockNumber, u16)>,
    /// Sum of the written rows' `f1` ([`Meta::build_mean_f1`]).
    f1_sum: f64,
}

/// Append whole tuples (`data` is a concatenation of `tsize`-byte tuples) to the chain of
/// `flags` pages whose tail is `tail`, pushing each tuple's block onto `placed`; returns the new
/// tail. Build only (no concurrent access).
fn append_tuples<R: Relation>(
    rel: &R,
    tail: BlockNumber,
    data: &[u8],
    tsize: usize,
    flags: u16,
    placed: &mut Vec<(BlockNumber, u16)>,
) -> Result<BlockNumber> {
    let mut cur_blk = tail;
    let mut cur = rel.write(tail);
    let mut rest = data.chunks_exact(tsize).peekable();
    loop {
        while let Some(t) = rest.peek() {
            if !fits(&cur, t.len()) {
                break;
            }
            let off = cur
                .add_item(t)
                .ok_or_else(|| Error::corrupt(cur_blk, "page refused an item that fits"))?;
            placed.push((cur_blk, off));
            rest.next();
        }
        if rest.peek().is_none() {
            return Ok(cur_blk);
        }
        let (nb, mut nw) = rel.extend();
        nw.reinit(Opaque::new(flags));
        let mut added = 0;
        while let Some(t) = rest.peek() {
            let Some(off) = nw.add_item(t) else {
                break;
            };
            placed.push((nb, off));
            added += 1;
            rest.next();
        }
        if added == 0 {
            return Err(Error::InvalidArgument(
                "a tuple does not fit on an empty page".into(),
            ));
        }
        drop(nw); // the new page is complete before it is linked
        let o = cur.opaque();
        cur.set_opaque(Opaque { next: nb, ..o });
        drop(cur);
        cur = rel.write(nb);
        cur_blk = nb;
    }
}

/// Append `rows` to the code chain whose tail is `tail`: first into the tail's last block if
/// it has free slots, then as new blocks, on the tail and then on new pages; returns the new
/// tail. Build only (no concurrent access).
fn append_rows<R: Relation>(
    rel: &R,
    tail: BlockNumber,
    rows: &[RowCode],
    d: usize,
) -> Result<BlockNumber> {
    let cap = block_rows(d);
    let mut cur_blk = tail;
    let mut cur = rel.write(tail);
    let mut rest = rows;
    let last = cur.max_offset();
    if last > 0 {
        if let Some(b) = cur.item_mut(last) {
            let mut merged: Vec<RowCode> = {
                let cb = CodeBlock::decode(b, d).map_err(|e| Error::corrupt(tail, e.0))?;
                (0..cb.len()).map(|i| cb.row(i)).collect()
            };
            if merged.len() < cap {
                let take = (cap - merged.len()).min(rest.len());
                merged.extend_from_slice(&rest[..take]);
                b.copy_from_slice(&encode_block(&merged, d));
                rest = &rest[take..];
            }
        }
    }
    let mut blocks = rest.chunks(cap).peekable();
    loop {
        while let Some(chunk) = blocks.peek() {
            let item = encode_block(chunk, d);
            if !fits(&cur, item.len()) {
                break;
            }
            cur.add_item(&item)
                .ok_or_else(|| Error::corrupt(cur_blk, "page refused an item that fits"))?;
            blocks.next();
        }
        if blocks.peek().is_none() {
            return Ok(cur_blk);
        }
        let (nb, mut nw) = rel.extend();
        nw.reinit(Opaque::new(PAGE_LIST));
        drop(nw);
        let o = cur.opaque();
        cur.set_opaque(Opaque { next: nb, ..o });
        drop(cur);
        cur = rel.write(nb);
        cur_blk = nb;
        if !fits(&cur, crate::format::block_size(d)) {
            return Err(Error::InvalidArgument(
                "a code block does not fit on an empty page".into(),
            ));
        }
    }
}

/// One thread's share of a batch: each row's list (`None`: skipped zero vector) and the
/// concatenated code and refinement tuples of the rows that have one.
type EncodedChunk = (Vec<Option<u32>>, Vec<RowCode>, Vec<u8>);

/// Prepares `vectors` (normalize, rotate), finds each one's nearest centroid and encodes its
/// row (appending its refinement tuple to `refine`): per input row its list, `None` for a zero
/// vector under cosine (not indexed), and the code tuples of the rows that have a list. The
/// nearest centroids are found four rows against four centroids at a time
/// ([`crate::kmeans::assign`]), with the same result for a row in any batch.
fn assign_and_encode(
    meta: &Meta,
    rot: &Rotation,
    cents: &[f32],
    tids: &[Tid],
    vectors: &[f32],
    refine: &mut Vec<u8>,
) -> Result<EncodedRows> {
    let dims = meta.dims as usize;
    let d = meta.padded_dims as usize;
    if vectors.len() != tids.len() * dims {
        return Err(Error::DimensionMismatch {
            expected: meta.dims,
            got: (vectors.len() / tids.len().max(1)).min(u32::MAX as usize) as u32,
        });
    }
    let mut prepared = Vec::with_capacity(tids.len() * d);
    let mut present = Vec::with_capacity(tids.len());
    for v in vectors.chunks_exact(dims) {
        match prepare(meta, rot, v)? {
            Some(p) => {
                prepared.extend_from_slice(&p);
                present.push(true);
            }
            None => present.push(false),
        }
    }
    let mut best = vec![(0u32, 0f32); prepared.len() / d];
    crate::kmeans::assign(&prepared, d, cents, meta.metric != Metric::L2, 1, &mut best);
    let mut lists = Vec::with_capacity(tids.len());
    let mut rows = Vec::with_capacity(best.len());
    let mut next = 0;
    for (&tid, &present) in tids.iter().zip(&present) {
        if !present {
            lists.push(None);
            continue;
        }
        let list = best[next].0;
        let v = &prepared[next * d..(next + 1) * d];
        next += 1;
        let c = &cents[list as usize * d..(list as usize + 1) * d];
        rows.push(encode_row(meta.metric, refine, tid, v, c));
        lists.push(Some(list));
    }
    Ok((lists, rows))
}

/// What [`assign_and_encode`] returns: each input row's list and the encoded rows.
type EncodedRows = (Vec<Option<u32>>, Vec<RowCode>);

impl<'r, R: Relation> IndexBuilder<'r, R> {
    /// Start a build into the empty relation `rel` with `centroids` (row-major
    /// `lists × dims`, original space, e.g. from [`crate::train_centroids`]; empty = one zero
    /// centroid). For inner product and cosine the centroids are normalized.
    pub fn new(rel: &'r R, params: &BuildParams, centroids: &[f32]) -> Result<Self> {
        let dims = params.dims as usize;
        if dims == 0 {
            return Err(Error::InvalidArgument(
                "dimensions must be at least 1".into(),
            ));
        }
        if params.dims > MAX_DIMS {
            return Err(Error::TooManyDims {
                dims: params.dims,
                max: MAX_DIMS,
            });
        }
        if !centroids.len().is_multiple_of(dims) {
            return Err(Error::InvalidArgument(format!(
                "{} centroid floats are not a multiple of {dims} dimensions",
                centroids.len()
            )));
        }
        if !centroids.iter().all(|v| v.is_finite()) {
            return Err(Error::NonFiniteValue);
        }
        let zero = vec![0f32; dims];
        let centroids = if centroids.is_empty() {
            &zero[..]
        } else {
            centroids
        };
        let nlists = centroids.len() / dims;
        if nlists > MAX_LISTS as usize {
            return Err(Error::InvalidArgument(format!(
                "{nlists} lists, at most {MAX_LISTS} are supported"
            )));
        }
        if rel.nblocks() != 0 {
            return Err(Error::RelationNotEmpty {
                nblocks: rel.nblocks(),
            });
        }
        let d = padded_dims(dims);
        let rot = Rotation::new(d, params.seed, ROTATION_ROUNDS);
        let mut cents = Vec::with_capacity(nlists * d);
        for c in centroids.chunks_exact(dims) {
            let mut v = vec![0f32; d];
            v[..dims].copy_from_slice(c);
            if params.metric.spherical() {
                let n = c.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
                if n > 0.0 {
                    v.iter_mut().for_each(|a| *a = (*a as f64 / n) as f32);
                }
            }
            rot.rotate_in_place(&mut v);
            cents.extend_from_slice(&v);
        }

        // block 0: meta (rewritten below once the block numbers are known)
        let (b0, mut w) = rel.extend();
        if b0 != META_BLOCK {
            return Err(Error::RelationNotEmpty { nblocks: b0 });
        }
        w.reinit(Opaque::new(PAGE_META));
        let mut meta = Meta {
            dims: params.dims,
            padded_dims: d as u32,
            metric: params.metric,
            nlists: nlists as u32,
            seed: params.seed,
            rounds: ROTATION_ROUNDS,
            // Known before the pages exist: the layout puts it after the 2 × nlists heads.
            first_centroid_block: 1 + 2 * nlists as u32,
            first_list_block: 1,
            build_tuples: 0,
            build_skipped: 0,
            build_mean_f1: 0.0,
            // Placeholder until the page exists (the meta page is rewritten at the end).
            null_head: INVALID_BLOCK - 1,
        };
        w.add_item(&meta.encode())
            .ok_or_else(|| Error::corrupt(META_BLOCK, "meta item does not fit"))?;
        drop(w);

        // list head pages: code chains, then refinement chains (Meta::refine_head)
        let mut heads = Vec::with_capacity(nlists);
        for _ in 0..nlists {
            let (b, mut w) = rel.extend();
            w.reinit(Opaque::new(PAGE_LIST));
            heads.push(b);
        }
        let mut refine_heads = Vec::with_capacity(nlists);
        for _ in 0..nlists {
            let (b, mut w) = rel.extend();
            w.reinit(Opaque::new(PAGE_REFINE));
            refine_heads.push(b);
        }

        // centroid chain
        let (first, mut w) = rel.extend();
        w.reinit(Opaque::new(PAGE_CENTROID));
        let mut cur_blk = first;
        for (list, c) in cents.chunks_exact(d).enumerate() {
            (w, cur_blk) = crate::common::append_centroid_chunks(
                rel,
                w,
                cur_blk,
                list as u32,
                heads[list],
                0,
                c,
            )?;
        }
        drop(w);

        // NULL chain head
        let (null_head, mut w) = rel.extend();
        w.reinit(Opaque::new(PAGE_NULLS));
        drop(w);

        meta.first_centroid_block = first;
        meta.first_list_block = heads[0];
        meta.null_head = null_head;
        let builder = IndexBuilder {
            rel,
            meta,
            rot,
            cents,
            tails: heads,
            refine_tails: refine_heads,
            buffers: vec![Vec::new(); nlists],
            refine_buffers: vec![Vec::new(); nlists],
            buffered: 0,
            limit: params.memory_limit_bytes,
            stats: BuildStats {
                lists: nlists as u32,
                ..BuildStats::default()
            },
            refine_scratch: Vec::new(),
            placed: Vec::new(),
            f1_sum: 0.0,
        };
        builder.write_meta()?;
        Ok(builder)
    }

    fn write_meta(&self) -> Result<()> {
        let mut w = self.rel.write(META_BLOCK);
        let item = w
            .item_mut(1)
            .ok_or_else(|| Error::corrupt(META_BLOCK, "meta item missing"))?;
        if item.len() != Meta::SIZE {
            return Err(Error::corrupt(META_BLOCK, "meta item has the wrong size"));
        }
        item.copy_from_slice(&self.meta.encode());
        Ok(())
    }

    /// Index a heap row whose indexed value is NULL (the NULL chain: returned first by the
    /// `NULLS FIRST` ordering operator, by no other).
    pub fn add_null(&mut self, tid: Tid) -> Result<()> {
        crate::common::push_null(self.rel, self.meta.null_head, tid)?;
        self.stats.nulls += 1;
        Ok(())
    }

    /// Index one heap row.
    pub fn add(&mut self, tid: Tid, vector: &[f32]) -> Result<AddOutcome> {
        let mut refine = std::mem::take(&mut self.refine_scratch);
        refine.clear();
        let encoded = assign_and_encode(
            &self.meta,
            &self.rot,
            &self.cents,
            &[tid],
            vector,
            &mut refine,
        );
        let outcome = match encoded {
            Ok((lists, mut rows)) if lists[0].is_some() => {
                let list = lists[0].expect("checked") as usize;
                self.append_encoded(list, rows.pop().expect("one row per list"), &refine)
            }
            Ok(_) => {
                self.stats.skipped_zero += 1;
                Ok(AddOutcome::SkippedZeroVector)
            }
            Err(e) => Err(e),
        };
        self.refine_scratch = refine;
        outcome
    }

    /// Index many heap rows: `vectors` holds `tids.len()` rows of `dims` floats. Assigning and
    /// encoding (the CPU-bound part: one distance per list per row) runs on up to `threads`
    /// threads; the tuples are then buffered and written by the calling thread in input order,
    /// so the index is the same as after `add` row by row. The threads never touch the relation.
    pub fn add_batch(&mut self, tids: &[Tid], vectors: &[f32], threads: usize) -> Result<()> {
        let dims = self.meta.dims as usize;
        if vectors.len() != tids.len() * dims {
            return Err(Error::InvalidArgument(format!(
                "{} floats are not {} rows of {dims} dimensions",
                vectors.len(),
                tids.len()
            )));
        }
        let threads = threads.clamp(1, tids.len().max(1));
        let per_thread = tids.len().div_ceil(threads);
        let (meta, rot, cents) = (&self.meta, &self.rot, &self.cents[..]);
        let encode_chunk = |tids: &[Tid], vectors: &[f32]| -> Result<EncodedChunk> {
            let mut refine = Vec::new();
            let (lists, rows) = assign_and_encode(meta, rot, cents, tids, vectors, &mut refine)?;
            Ok((lists, rows, refine))
        };
        let chunks: Vec<Result<EncodedChunk>> = if threads == 1 {
            vec![encode_chunk(tids, vectors)]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = tids
                    .chunks(per_thread)
                    .zip(vectors.chunks(per_thread * dims))
                    .map(|(t, v)| s.spawn(move || encode_chunk(t, v)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect()
            })
        };
        let d = self.meta.padded_dims as usize;
        let rsize = if has_refine(d) {
            refine_tuple_size(d)
        } else {
            0
        };
        for chunk in chunks {
            let (lists, rows, refine) = chunk?;
            let mut tuples = rows.into_iter();
            let mut refines = refine.chunks(rsize.max(1));
            for list in lists {
                match list {
                    Some(list) => {
                        let tuple = tuples.next().ok_or_else(|| {
                            Error::InvalidArgument("encoded batch is short".into())
                        })?;
                        let r = if rsize > 0 {
                            refines.next().ok_or_else(|| {
                                Error::InvalidArgument("encoded batch is short".into())
                            })?
                        } else {
                            &[][..]
                        };
                        self.append_encoded(list as usize, tuple, r)?;
                    }
                    None => self.stats.skipped_zero += 1,
                }
            }
        }
        Ok(())
    }

    fn append_encoded(&mut self, list: usize, row: RowCode, refine: &[u8]) -> Result<AddOutcome> {
        // What a buffered row costs: its slot and code, its Vec, its refinement bytes.
        self.buffered += SLOT_BYTES + row.bits.len() * 8 + 48 + refine.len();
        self.f1_sum += row.factors.f1 as f64;
        self.buffers[list].push(row);
        self.refine_buffers[list].extend_from_slice(refine);
        self.stats.tuples += 1;
        if self.buffered > self.limit {
            self.flush()?;
        }
        Ok(AddOutcome::Added)
    }

    /// Append every buffered row to its chains: the refinement tuples first, so that each row
    /// can name the item that took its refinement tuple.
    fn flush(&mut self) -> Result<()> {
        let d = self.meta.padded_dims as usize;
        for list in 0..self.buffers.len() {
            if self.buffers[list].is_empty() {
                continue;
            }
            if !self.refine_buffers[list].is_empty() {
                self.placed.clear();
                self.refine_tails[list] = append_tuples(
                    self.rel,
                    self.refine_tails[list],
                    &self.refine_buffers[list],
                    refine_tuple_size(d),
                    PAGE_REFINE,
                    &mut self.placed,
                )?;
                self.refine_buffers[list].clear();
                if self.placed.len() != self.buffers[list].len() {
                    return Err(Error::InvalidArgument(
                        "code and refinement tuples do not pair up".into(),
                    ));
                }
                for (r, &(blk, off)) in self.buffers[list].iter_mut().zip(&self.placed) {
                    r.refine_block = blk;
                    r.refine_offset = off;
                }
            }
            self.tails[list] = append_rows(self.rel, self.tails[list], &self.buffers[list], d)?;
            self.buffers[list].clear();
        }
        self.buffered = 0;
        self.stats.flushes += 1;
        Ok(())
    }

    /// Write the remaining tuples and the final counts.
    pub fn finish(mut self) -> Result<BuildStats> {
        if self.buffered > 0 {
            self.flush()?;
        }
        self.meta.build_tuples = self.stats.tuples;
        self.meta.build_skipped = self.stats.skipped_zero;
        if self.stats.tuples > 0 {
            self.meta.build_mean_f1 = (self.f1_sum / self.stats.tuples as f64) as f32;
        }
        self.write_meta()?;
        self.stats.nblocks = self.rel.nblocks();
        Ok(self.stats)
    }
}
