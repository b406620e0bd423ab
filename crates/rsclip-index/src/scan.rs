//! Nearest-neighbour scan with exact re-ranking through a callback.
//!
//! [`Scan::new`] reads the meta page and the centroid chain ([`Centroids`], which a caller may
//! also read once and reuse with [`Scan::with_centroids`]) and ranks the lists by the distance of
//! their centroid to the (rotated) query.
//! [`Scan::next`] probes those lists on first use: for every tuple it estimates the distance
//! from the RaBitQ code and pushes a lower bound into a min-heap of candidates. It then pops
//! candidates in lower-bound order and asks the callback for their exact distance (re-ranking),
//! until the smallest exact distance among re-ranked, not yet returned rows is ≤ the smallest
//! remaining lower bound; that row is returned.
//!
//! When the probed lists are exhausted, the next `probes` lists in centroid order are probed
//! (an iterative scan: a filtered query keeps calling `next` until its LIMIT is satisfied), up
//! to `max_probes` lists in all (0 = every list); then `next` returns `None`.
//!
//! **Order**: exact within the set of probed lists, *provided the RaBitQ bounds hold*. They hold
//! with high probability (≥ 99.5% of tuples in the estimator test; in end-to-end tests about
//! 0.2% of returned pairs were out of order — a row whose bound failed comes a little late).
//! Which rows get their 8-bit refinement is chosen with tighter bounds
//! ([`crate::rabitq::PRUNE_EPSILON0`]); a row those rule out wrongly still keeps its sound bound
//! as its key, so that choice costs work, never order.
//! The order is relaxed across expansions (rows of a later expansion may be closer than rows
//! already returned). The Postgres glue can therefore return rows without a re-sort (like
//! ivfflat), or use the executor's reorder queue if strict order is required.
//!
//! The relation is passed to every [`Scan::next`] call instead of being borrowed by the scan,
//! so the scan state can live in the executor's scan opaque between `amgettuple` calls.
//! A heap tid is re-ranked (and returned) at most once. Rows the callback reports gone
//! (`None`) are skipped. The scan holds at most one share lock at a time and none while calling
//! the callback; it does not borrow the relation between calls.

use crate::common::{
    centroid_distance, check_block, prepare, read_meta, walk_centroids, ChainWalk,
};
use crate::format::{
    tuple_tid, BlockFactors, CodeBlock, Meta, RefineTuple, META_BLOCK, PAGE_LIST, PAGE_REFINE,
};
use crate::page::{PageRead, Relation};
use crate::rabitq::{refine_estimate, QueryQuant, Rotation};
use crate::{BlockNumber, Error, Metric, Result, Tid, INVALID_BLOCK};
use rsclip_core::distance::dot;
use rsclip_core::fastscan;
use rsclip_core::int8;
use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

/// Default number of lists to probe: `ceil(1.7 * sqrt(lists)) + 1`, at most `lists`. On the
/// real sentence-embedding set (bench/index.py, 100k rows, 333 lists) that is 33 probes and
/// recall@10 0.95 in PostgreSQL over 200 held-out queries; `1.5` gave 29 probes and 0.947,
/// `ceil(sqrt(lists))` 0.92.
pub fn default_probes(lists: u32) -> u32 {
    ((1.7 * (lists as f64).sqrt()).ceil() as u32 + 1).clamp(1, lists.max(1))
}

/// Counters of one scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Lists probed so far.
    pub lists_probed: u32,
    /// Code chain pages read.
    pub pages_read: u64,
    /// Refinement chain pages read.
    pub refine_pages_read: u64,
    /// Tuples whose distance was estimated.
    pub tuples_estimated: u64,
    /// Tuples whose bounds the 8-bit code tightened.
    pub tuples_refined: u64,
    /// Refinement tuples not found where their code tuple pointed (0 in a sound index).
    pub refine_missing: u64,
    /// Callback calls.
    pub reranked: u64,
    /// Callback calls that returned `None`.
    pub rerank_missing: u64,
    /// Rows returned.
    pub returned: u64,
}

/// A list in the probe order. Its centroid distance is first known within `[lo, hi]` (from the
/// 8-bit centroid codes); `dist` is the exact one once `exact` is set (then `lo == hi == dist`).
#[derive(Clone, Copy, Debug)]
struct ListRef {
    dist: f32,
    lo: f32,
    hi: f32,
    exact: bool,
    list: u32,
    head: BlockNumber,
}

fn list_order(a: &ListRef, b: &ListRef) -> Ordering {
    a.dist.total_cmp(&b.dist).then(a.list.cmp(&b.list))
}

/// A (distance, tid) pair ordered by distance (total order), then tid.
#[derive(Clone, Copy, Debug)]
struct Keyed {
    key: f32,
    tid: Tid,
}

impl PartialEq for Keyed {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Keyed {}
impl PartialOrd for Keyed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Keyed {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key
            .total_cmp(&other.key)
            .then(self.tid.cmp(&other.tid))
    }
}

/// The list centroids of an index, read once. They never change after the build (inserts and
/// VACUUM only touch list pages), so a caller may keep them across scans of the same index build
/// and start scans with [`Scan::with_centroids`] without reading the centroid chain again.
#[derive(Debug)]
pub struct Centroids {
    meta: Meta,
    rot: Rotation,
    /// Rotated (and for ip/cosine normalized) centroids, `nlists × padded_dims`.
    data: Vec<f32>,
    /// Head page of each list.
    heads: Vec<BlockNumber>,
    /// `|c|²` of each (rotated) centroid.
    norms2: Vec<f32>,
    /// The centroids as 8-bit codes (`nlists × padded_dims`), which rank them with error bounds
    /// at a quarter of the memory traffic; exact distances are computed only for the lists
    /// those bounds cannot place (see [`Scan::order_next_batch`]).
    codes: Vec<i8>,
    code_info: Vec<CodeInfo>,
}

/// What bounds a centroid's 8-bit product with a query (see [`rsclip_core::int8`]).
#[derive(Clone, Copy, Debug)]
struct CodeInfo {
    scale: f32,
    code_sum: i32,
    error_norm: f32,
    approx_norm: f32,
}

impl Centroids {
    /// Reads the meta page and the whole centroid chain, checking its structure.
    pub fn read<R: Relation>(rel: &R) -> Result<Centroids> {
        let meta = read_meta(rel)?;
        let d = meta.padded_dims as usize;
        let nlists = meta.nlists as usize;
        let mut data = Vec::with_capacity(nlists * d);
        let mut heads = Vec::with_capacity(nlists);
        walk_centroids(
            rel,
            &meta,
            |_| {},
            |_, h, c| {
                data.extend_from_slice(c);
                heads.push(h.code);
                Ok(())
            },
        )?;
        let rot = Rotation::new(d, meta.seed, meta.rounds);
        let norms2 = data.chunks_exact(d.max(1)).map(|c| dot(c, c)).collect();
        let mut codes = Vec::with_capacity(nlists * d);
        let mut code_info = Vec::with_capacity(nlists);
        for c in data.chunks_exact(d.max(1)) {
            let q = int8::quantize_symmetric(c);
            codes.extend_from_slice(&q.codes);
            code_info.push(CodeInfo {
                scale: q.scale,
                code_sum: q.code_sum,
                error_norm: q.error_norm,
                approx_norm: q.approx_norm,
            });
        }
        Ok(Centroids {
            meta,
            rot,
            data,
            heads,
            norms2,
            codes,
            code_info,
        })
    }

    /// Every list with the bounds of its centroid distance to the (rotated) query `q`, from the
    /// 8-bit codes; none exact yet.
    fn rank_bounds(&self, q: &[f32], out: &mut Vec<ListRef>) {
        let d = self.meta.padded_dims as usize;
        let qc = int8::quantize_query(q);
        let q_norm2 = dot(q, q);
        let rounding = 4.0 * (d as f32 + 8.0) * f32::EPSILON;
        let metric = self.meta.metric;
        out.extend(
            self.codes
                .chunks_exact(d.max(1))
                .zip(&self.code_info)
                .zip(&self.heads)
                .enumerate()
                .map(|(list, ((codes, info), &head))| {
                    let raw = int8::offset_dot(&qc.codes, codes, info.code_sum);
                    let ip = info.scale * qc.scale * raw as f32;
                    let err = int8::product_error(info.error_norm, info.approx_norm, &qc, d);
                    let (lo, hi) = match metric {
                        Metric::InnerProduct | Metric::Cosine => (-ip - err, -ip + err),
                        Metric::L2 => {
                            // |c|² + |q|² − 2⟨c,q⟩, against the direct Σ(c−q)² it stands for.
                            let n2 = self.norms2[list] + q_norm2;
                            let slack = 2.0 * err + rounding * n2;
                            (n2 - 2.0 * ip - slack, n2 - 2.0 * ip + slack)
                        }
                    };
                    // A NaN bound (never from validated centroids) places nothing: exact then.
                    let (lo, hi) = if lo <= hi {
                        (lo, hi)
                    } else {
                        (f32::NEG_INFINITY, f32::INFINITY)
                    };
                    ListRef {
                        dist: f32::NAN,
                        lo,
                        hi,
                        exact: false,
                        list: list as u32,
                        head,
                    }
                }),
        );
    }

    /// The meta page these centroids belong to.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Heap bytes held (for callers that bound a cache).
    pub fn memory_bytes(&self) -> usize {
        self.data.len() * 4
            + self.heads.len() * 8
            + self.codes.len()
            + self.code_info.len() * std::mem::size_of::<CodeInfo>()
            + std::mem::size_of::<Self>()
    }

    fn centroid(&self, list: u32) -> &[f32] {
        let d = self.meta.padded_dims as usize;
        &self.data[list as usize * d..(list as usize + 1) * d]
    }
}

/// The heap tids of the rows whose indexed value is NULL (the NULL chain), which the
/// `NULLS FIRST` ordering returns before every other row.
pub fn null_tids<R: Relation>(rel: &R) -> Result<Vec<Tid>> {
    let meta = read_meta(rel)?;
    crate::common::walk_nulls(rel, &meta, |_| {})
}

/// State of one index scan. Not tied to the relation: pass it to every [`Scan::next`] call.
pub struct Scan {
    meta: Meta,
    /// Rotated (and for cosine normalized) query; empty when the scan returns nothing.
    query: Vec<f32>,
    /// The query quantized once for every probed list (`None` when the scan returns nothing).
    quant: Option<QueryQuant>,
    /// The [`REFINE_TOP`] smallest 1-bit upper bounds seen (a max-heap): a tuple whose lower
    /// bound exceeds the largest is deferred as soon as it is estimated.
    upper_top: BinaryHeap<OrdF32>,
    order: Vec<ListRef>,
    /// Index in `order` of the first list not probed yet.
    next_list: usize,
    probes: usize,
    limit: usize,
    centroids: Arc<Centroids>,
    candidates: BinaryHeap<Reverse<Keyed>>,
    /// Candidates whose lower bound was above the refinement threshold when they were
    /// estimated: they can only matter once the first [`REFINE_TOP`] rows are gone, so they wait
    /// here, unsorted, instead of costing a heap push each (most probed tuples end here).
    deferred: Vec<Keyed>,
    /// The smallest key in `deferred` (infinity when empty): no candidate above it may be
    /// popped before `deferred` is moved into `candidates`.
    deferred_min: f32,
    /// Rows the tight bounds kept from the refinement pass although their sound lower bound
    /// (their key) is below the refinement threshold: refined only if a scan reaches their key
    /// (most never are), before they could be re-ranked. Indexes into `gray` by key.
    gray_heap: BinaryHeap<Reverse<(OrdF32, u32)>>,
    gray: Vec<Pending>,
    results: BinaryHeap<Reverse<Keyed>>,
    seen: HashSet<Tid, BuildHasherDefault<TidHasher>>,
    /// The [`REFINE_TOP`] smallest refined upper bounds seen so far (a max-heap): a tuple whose
    /// 1-bit lower bound exceeds the largest of them cannot be among the first `REFINE_TOP`
    /// rows, so its 8-bit refinement is skipped.
    refined_upper: BinaryHeap<OrdF32>,
    /// The relation size last seen (see [`ChainWalk`]); 0 until the first probe asks.
    nblocks: BlockNumber,
    /// The current batch's tuples between the two passes, and its lists' query offsets.
    pending: Vec<Pending>,
    list_queries: Vec<ListQuery>,
    stats: ScanStats,
}

/// Rows per scan whose bounds the 8-bit refinement tightens (LIMITs up to this many get tight
/// bounds everywhere; later rows are still exact, just re-ranked from looser bounds). 10, the
/// usual LIMIT: 16 refined 1.5× as many rows on the real set, for LIMIT 10.
pub const REFINE_TOP: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq)]
struct OrdF32(f32);
impl Eq for OrdF32 {}
impl PartialOrd for OrdF32 {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF32 {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Scan {
    /// Start a scan for `query`, probing `probes` lists at a time (0 is taken as 1) and at most
    /// `max_probes` lists in all (0 = all lists). A zero query under cosine returns no rows.
    pub fn new<R: Relation>(rel: &R, query: &[f32], probes: u32, max_probes: u32) -> Result<Scan> {
        Scan::with_centroids(Arc::new(Centroids::read(rel)?), query, probes, max_probes)
    }

    /// [`Scan::new`] with centroids read earlier from the same index build.
    pub fn with_centroids(
        centroids: Arc<Centroids>,
        query: &[f32],
        probes: u32,
        max_probes: u32,
    ) -> Result<Scan> {
        let meta = centroids.meta;
        let nlists = meta.nlists as usize;
        let probes = (probes.max(1) as usize).min(nlists);
        let limit = if max_probes == 0 {
            nlists
        } else {
            (max_probes as usize).clamp(probes, nlists)
        };
        let mut scan = Scan {
            meta,
            query: Vec::new(),
            quant: None,
            upper_top: BinaryHeap::with_capacity(REFINE_TOP + 1),
            order: Vec::with_capacity(nlists),
            next_list: 0,
            probes,
            limit,
            centroids: Arc::clone(&centroids),
            candidates: BinaryHeap::new(),
            deferred: Vec::new(),
            deferred_min: f32::INFINITY,
            gray_heap: BinaryHeap::new(),
            gray: Vec::new(),
            results: BinaryHeap::new(),
            seen: HashSet::default(),
            refined_upper: BinaryHeap::with_capacity(REFINE_TOP + 1),
            nblocks: 0,
            pending: Vec::new(),
            list_queries: Vec::new(),
            stats: ScanStats::default(),
        };
        let Some(q) = prepare(&meta, &centroids.rot, query)? else {
            scan.limit = 0;
            return Ok(scan);
        };
        // Bounds only: the lists are ordered exactly a batch at a time as the scan reaches them
        // (most scans never go past the first batch).
        centroids.rank_bounds(&q, &mut scan.order);
        scan.quant = Some(QueryQuant::new(&q));
        scan.query = q;
        Ok(scan)
    }

    /// Counters so far.
    pub fn stats(&self) -> ScanStats {
        self.stats
    }

    /// The next row, nearest first: `(tid, exact distance)`, or `None` when the scan is done.
    /// `rerank(tid)` must return the exact distance of the heap row ([`Metric::distance`]
    /// between its vector and the query), or `None` if the row is gone or invisible.
    pub fn next<R: Relation>(
        &mut self,
        rel: &R,
        rerank: &mut dyn FnMut(Tid) -> Option<f32>,
    ) -> Result<Option<(Tid, f32)>> {
        loop {
            let gray_min = self.gray_heap.peek().map(|g| (g.0).0 .0);
            let active_min = match (self.candidates.peek(), gray_min) {
                (Some(c), Some(g)) => Some(c.0.key.min(g)),
                (Some(c), None) => Some(c.0.key),
                (None, g) => g,
            };
            if !self.deferred.is_empty() && active_min.is_none_or(|k| k > self.deferred_min) {
                self.candidates.extend(self.deferred.drain(..).map(Reverse));
                self.deferred_min = f32::INFINITY;
            }
            let best_result = self.results.peek().map(|r| r.0);
            let best_candidate = self.candidates.peek().map(|c| c.0);
            let beats = |k: f32, other: Option<f32>| {
                other.is_none_or(|o| k.total_cmp(&o) != Ordering::Greater)
            };
            if let Some(r) = best_result {
                if beats(r.key, best_candidate.map(|c| c.key)) && beats(r.key, gray_min) {
                    self.results.pop();
                    self.stats.returned += 1;
                    return Ok(Some((r.tid, r.key)));
                }
            }
            if let Some(g) = gray_min {
                if best_candidate.is_none_or(|c| g < c.key) {
                    let Reverse((_, at)) = self.gray_heap.pop().expect("peeked");
                    let m = self.gray[at as usize];
                    if self.gray_heap.is_empty() {
                        self.gray.clear();
                    }
                    self.refine_one(rel, &m)?;
                    continue;
                }
            }
            match best_candidate {
                Some(c) => {
                    self.candidates.pop();
                    if self.seen.insert(c.tid) {
                        self.stats.reranked += 1;
                        match rerank(c.tid) {
                            Some(dist) => self.results.push(Reverse(Keyed {
                                key: dist,
                                tid: c.tid,
                            })),
                            None => self.stats.rerank_missing += 1,
                        }
                    }
                }
                None => {
                    debug_assert!(best_result.is_none() && self.gray_heap.is_empty());
                    if !self.probe_next_batch(rel)? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Probe the next `probes` lists; false when no list is left within `max_probes`.
    ///
    /// Two passes: every code tuple of the batch is bounded from its 1-bit code first
    /// ([`Scan::estimate_list`]); then the rows that may be among the first [`REFINE_TOP`] get
    /// their 8-bit refinement, in lower-bound order ([`Scan::refine_pending`]), which stops as
    /// soon as the refined upper bounds rule the rest out: few refinement pages are read.
    fn probe_next_batch<R: Relation>(&mut self, rel: &R) -> Result<bool> {
        if self.next_list >= self.limit {
            return Ok(false);
        }
        let end = (self.next_list + self.probes).min(self.limit);
        self.order_next_batch(end - self.next_list);
        let batch: Vec<ListRef> = self.order[self.next_list..end].to_vec();
        // Most estimated rows end in `deferred`: grow it once, not by doubling. The meta page's
        // count is only a hint (it may be stale or damaged): capped.
        let per_list = (self.meta.build_tuples / self.meta.nlists.max(1) as u64).min(1 << 12);
        self.deferred
            .reserve(((per_list as usize + 32) * batch.len()).min(1 << 20));
        self.next_list = end;
        let centroids = Arc::clone(&self.centroids);
        self.pending.clear();
        self.list_queries.clear();
        for r in &batch {
            self.estimate_list(rel, r, centroids.centroid(r.list))?;
        }
        self.refine_pending(rel)?;
        Ok(true)
    }

    /// Moves the `m` nearest lists not probed yet, in exact distance order, to the front of
    /// `order[next_list..]`. Only lists whose bounds reach the `m`-th smallest upper bound can
    /// be among them: at least `m` lists are at or below it, and every other list is above.
    /// Their exact distances are computed (and kept for later batches); the rest stay bounds.
    fn order_next_batch(&mut self, m: usize) {
        let rest = &mut self.order[self.next_list..];
        if m == 0 {
            return;
        }
        let candidates = if m < rest.len() {
            rest.select_nth_unstable_by(m - 1, |a, b| a.hi.total_cmp(&b.hi));
            let threshold = rest[m - 1].hi;
            let mut n = m;
            for i in m..rest.len() {
                if rest[i].lo <= threshold {
                    rest.swap(i, n);
                    n += 1;
                }
            }
            &mut rest[..n]
        } else {
            rest
        };
        let metric = self.meta.metric;
        for r in candidates.iter_mut().filter(|r| !r.exact) {
            r.dist = centroid_distance(metric, self.centroids.centroid(r.list), &self.query);
            (r.lo, r.hi, r.exact) = (r.dist, r.dist, true);
        }
        if m < candidates.len() {
            candidates.select_nth_unstable_by(m, list_order);
        }
        candidates[..m].sort_unstable_by(list_order);
    }

    /// First pass over one list: bounds every row from its 1-bit code, a block at a time, into
    /// `pending` (or straight into `deferred` when it cannot be among the first [`REFINE_TOP`]).
    fn estimate_list<R: Relation>(&mut self, rel: &R, r: &ListRef, c: &[f32]) -> Result<()> {
        let d = self.meta.padded_dims as usize;
        let metric = self.meta.metric;
        let qq = self
            .quant
            .take()
            .expect("a scan with a query has its quantization");
        let cq = dot(c, &self.query);
        let w_norm2 = match metric {
            Metric::L2 => r.dist,
            _ => {
                (qq.norm() * qq.norm() + self.centroids.norms2[r.list as usize] - 2.0 * cq).max(0.0)
            }
        };
        let w_norm = w_norm2.sqrt();
        let w: Vec<f32> = self.query.iter().zip(c).map(|(q, c)| q - c).collect();
        let w_sum = lane_sum(&w);
        let lq = self.list_queries.len() as u32;
        self.list_queries.push(ListQuery {
            w,
            w_sum,
            w_norm,
            cq,
        });
        self.stats.lists_probed += 1;
        let errs = ErrorScales {
            eps: qq.eps_for(w_norm),
            qerr: qq.quant_err() + 1e-5 * w_norm,
            prune_eps: qq.prune_eps_for(w_norm),
            prune_qerr: qq.prune_quant_err() + 1e-5 * w_norm,
        };
        let lo = qq.lo();
        let mut sums = [0u32; fastscan::BLOCK];
        let mut factors: BlockFactors = [[0f32; fastscan::BLOCK]; 4];
        let mut out = Bounds {
            key: [0f32; fastscan::BLOCK],
            lower: [0f32; fastscan::BLOCK],
            upper: [0f32; fastscan::BLOCK],
        };
        let mut terms = [0f32; fastscan::BLOCK];
        let mut blk = r.head;
        let mut from = r.head;
        let mut walk = ChainWalk::with_size(r.head, self.nblocks);
        let result = (|| -> Result<()> {
            while blk != INVALID_BLOCK {
                walk.step(rel, blk, from)?;
                // Estimated in place under the share lock (no callback runs here).
                let page = rel.read(blk);
                let opaque = page.opaque();
                self.stats.pages_read += 1;
                if opaque.flags != PAGE_LIST {
                    return Err(Error::corrupt(
                        blk,
                        format!("expected a list page, flags are {:#x}", opaque.flags),
                    ));
                }
                for off in 1..=page.max_offset() {
                    let Some(b) = page.item(off) else { continue };
                    let cb = CodeBlock::decode_into(b, d, &mut factors)
                        .map_err(|e| Error::corrupt(blk, format!("item {off}: {}", e.0)))?;
                    let n = cb.len();
                    if cb.packed() {
                        qq.level_sums_packed(cb.codes(), &mut sums);
                    } else {
                        sums[0] = qq.level_sum(cb.codes());
                    }
                    qq.level_terms(&sums, &mut terms);
                    let bounds = BlockBounds {
                        terms: &terms,
                        factors: &factors,
                        lo,
                        errs,
                        cq,
                        w_norm2,
                    };
                    match metric {
                        Metric::InnerProduct => bounds.inner_product(&mut out),
                        Metric::Cosine => bounds.cosine(&mut out),
                        Metric::L2 => bounds.l2(&mut out),
                    }
                    // Unused slots never count as the block's smallest key.
                    out.key[n..].fill(f32::INFINITY);
                    self.stats.tuples_estimated += n as u64;
                    let thr = if self.upper_top.len() >= REFINE_TOP {
                        self.upper_top.peek().map_or(f32::INFINITY, |u| u.0)
                    } else {
                        f32::INFINITY
                    };
                    // Keys are the looser lower bounds (key <= lower): a block whose smallest
                    // key is above the threshold has no row to refine.
                    let key_min = block_min(&out.key);
                    if key_min > thr {
                        // The whole block waits (most blocks of the farther lists).
                        self.deferred_min = self.deferred_min.min(key_min);
                        self.deferred.extend((0..n).map(|i| Keyed {
                            key: out.key[i],
                            tid: cb.tid(i),
                        }));
                        continue;
                    }
                    for i in 0..n {
                        let thr = if self.upper_top.len() >= REFINE_TOP {
                            self.upper_top.peek().map_or(f32::INFINITY, |u| u.0)
                        } else {
                            f32::INFINITY
                        };
                        if out.key[i] > thr {
                            self.defer(out.key[i], cb.tid(i));
                            continue;
                        }
                        if out.upper[i] < thr {
                            self.upper_top.push(OrdF32(out.upper[i]));
                            if self.upper_top.len() > REFINE_TOP {
                                self.upper_top.pop();
                            }
                        }
                        let (refine_block, refine_offset) = cb.refine(i);
                        self.pending.push(Pending {
                            key: out.key[i],
                            lower: out.lower[i],
                            upper: out.upper[i],
                            tid: cb.tid(i),
                            refine_block,
                            refine_offset,
                            list_query: lq,
                        });
                    }
                }
                drop(page);
                from = blk;
                blk = opaque.next;
            }
            Ok(())
        })();
        self.quant = Some(qq);
        self.nblocks = walk.nblocks();
        result
    }

    /// The [`REFINE_TOP`]-th smallest upper bound known (refined ones), infinity before.
    fn refined_threshold(&self) -> f32 {
        if self.refined_upper.len() >= REFINE_TOP {
            self.refined_upper.peek().map_or(f32::INFINITY, |u| u.0)
        } else {
            f32::INFINITY
        }
    }

    fn defer(&mut self, lower: f32, tid: Tid) {
        self.deferred_min = self.deferred_min.min(lower);
        self.deferred.push(Keyed { key: lower, tid });
    }

    /// Second pass: moves `pending` into the candidates, refining the rows that can still be
    /// among the first [`REFINE_TOP`] and deferring the others.
    fn refine_pending<R: Relation>(&mut self, rel: &R) -> Result<()> {
        let mut pending = std::mem::take(&mut self.pending);
        // A row whose lower bound exceeds the REFINE_TOP-th smallest upper bound of any
        // REFINE_TOP rows cannot be among the first REFINE_TOP: 1-bit upper bounds of this
        // batch count too, so the first batch already prunes.
        let mut threshold = self.refined_threshold();
        if pending.len() >= REFINE_TOP {
            let mut uppers: Vec<f32> = pending.iter().map(|p| p.upper).collect();
            let (_, kth, _) = uppers.select_nth_unstable_by(REFINE_TOP - 1, f32::total_cmp);
            threshold = threshold.min(*kth);
        }
        let mut to_refine = Vec::with_capacity(pending.len() / 4);
        for p in pending.drain(..) {
            if p.lower > threshold {
                self.skip_refine(p, threshold);
            } else if p.refine_block == INVALID_BLOCK {
                // Too wide for refinement codes: the 1-bit bound is all there is.
                self.candidates.push(Reverse(Keyed {
                    key: p.key,
                    tid: p.tid,
                }));
            } else {
                to_refine.push(p);
            }
        }
        self.pending = pending;
        to_refine.sort_unstable_by(|a, b| a.lower.total_cmp(&b.lower));
        // Chunks in lower-bound order let the refined bounds prune the rest, at one page read
        // per chunk member (they are scattered). When bounds cannot separate the rows (no
        // structure in the data: nearly every row is a candidate), many rows share each page:
        // then one pass in page order, a read per page, is far cheaper.
        let mut blocks: Vec<BlockNumber> = to_refine.iter().map(|p| p.refine_block).collect();
        blocks.sort_unstable();
        blocks.dedup();
        let chunk = if to_refine.len() >= DENSE_REFINES_PER_PAGE * blocks.len() {
            to_refine.len()
        } else {
            REFINE_CHUNK
        };
        let mut group: Vec<Pending> = Vec::with_capacity(REFINE_CHUNK);
        let mut at = 0;
        while at < to_refine.len() {
            let threshold = threshold.min(self.refined_threshold());
            let end = (at + chunk).min(to_refine.len());
            group.clear();
            for p in &to_refine[at..end] {
                if p.lower > threshold {
                    self.skip_refine(*p, threshold);
                } else {
                    group.push(*p);
                }
            }
            at = end;
            if group.is_empty() {
                // Sorted by lower bound: everything after is above the threshold too.
                for &p in &to_refine[at..] {
                    self.skip_refine(p, threshold);
                }
                break;
            }
            // One page read per distinct refinement block of the chunk.
            group.sort_unstable_by_key(|p| p.refine_block);
            let mut i = 0;
            while i < group.len() {
                let blk = group[i].refine_block;
                let mut j = i;
                while j < group.len() && group[j].refine_block == blk {
                    j += 1;
                }
                let page = self.read_refine_page(rel, blk)?;
                for m in &group[i..j] {
                    self.refine_member(&page, blk, m)?;
                }
                drop(page);
                i = j;
            }
        }
        Ok(())
    }

    /// A row the tight bounds keep from refinement (its tight lower bound is above
    /// `threshold`): it waits in `deferred` when its key is above `threshold` too, else in the
    /// gray heap, to be refined if the scan reaches its key.
    fn skip_refine(&mut self, p: Pending, threshold: f32) {
        if p.key > threshold || p.refine_block == INVALID_BLOCK {
            self.defer(p.key, p.tid);
        } else {
            self.gray_heap
                .push(Reverse((OrdF32(p.key), self.gray.len() as u32)));
            self.gray.push(p);
        }
    }

    /// Refines one gray row: a page read of its own.
    fn refine_one<R: Relation>(&mut self, rel: &R, m: &Pending) -> Result<()> {
        let page = self.read_refine_page(rel, m.refine_block)?;
        self.refine_member(&page, m.refine_block, m)
    }

    /// Share-locks refinement page `blk`, checked to be inside the relation and a refinement
    /// page (a code tuple names it).
    fn read_refine_page<'a, R: Relation>(
        &mut self,
        rel: &'a R,
        blk: BlockNumber,
    ) -> Result<R::Read<'a>> {
        if blk >= self.nblocks {
            self.nblocks = rel.nblocks();
        }
        check_block(blk, self.nblocks, META_BLOCK)?;
        let page = rel.read(blk);
        self.stats.refine_pages_read += 1;
        if page.opaque().flags != PAGE_REFINE {
            return Err(Error::corrupt(
                blk,
                format!(
                    "a code tuple points here for its refinement, but flags are {:#x}",
                    page.opaque().flags
                ),
            ));
        }
        Ok(page)
    }

    /// Tightens `m`'s key from its refinement tuple on `page` (block `blk`, read with
    /// [`Scan::read_refine_page`]) and makes it a candidate.
    fn refine_member<P: PageRead>(
        &mut self,
        page: &P,
        blk: BlockNumber,
        m: &Pending,
    ) -> Result<()> {
        let Some((off, b)) = find_refine(page, m.refine_offset, m.tid) else {
            // No refinement tuple where the code tuple says (not written by this crate's
            // operations): the 1-bit bound still holds.
            self.stats.refine_missing += 1;
            self.candidates.push(Reverse(Keyed {
                key: m.key,
                tid: m.tid,
            }));
            return Ok(());
        };
        let d = self.meta.padded_dims as usize;
        let rt = RefineTuple::decode(b, d)
            .map_err(|e| Error::corrupt(blk, format!("item {off}: {}", e.0)))?;
        let lq = &self.list_queries[m.list_query as usize];
        let fine = refine_estimate(rt.lo, rt.delta, rt.codes, &lq.w, lq.w_sum, lq.w_norm);
        let metric = self.meta.metric;
        let (_, fine_lower) = estimate_distance(
            metric, fine.value, fine.error, rt.norm, rt.rc, lq.w_norm, lq.cq,
        );
        let (_, fine_upper) = estimate_distance(
            metric,
            fine.value,
            -fine.error,
            rt.norm,
            rt.rc,
            lq.w_norm,
            lq.cq,
        );
        self.stats.tuples_refined += 1;
        self.refined_upper.push(OrdF32(fine_upper));
        if self.refined_upper.len() > REFINE_TOP {
            self.refined_upper.pop();
        }
        self.candidates.push(Reverse(Keyed {
            key: m.key.max(fine_lower),
            tid: m.tid,
        }));
        Ok(())
    }
}

/// The refinement tuple of heap row `tid` on `page`: at offset `hint` where it was written, or
/// below it if VACUUM compacted the page since (compaction keeps the order of the items).
fn find_refine<P: PageRead>(page: &P, hint: u16, tid: Tid) -> Option<(u16, &[u8])> {
    let top = hint.min(page.max_offset());
    (1..=top).rev().find_map(|off| {
        let b = page.item(off)?;
        (tuple_tid(b) == Some(tid)).then_some((off, b))
    })
}

/// The 1-bit bounds of one block's 32 slots, one metric per loop: straight-line arithmetic
/// without a branch inside, so that each loop vectorizes (a `match` inside the loop kept it
/// scalar, a fifth of the scan's time). Unused slots are computed and ignored.
///
/// Two confidence levels: `key` is the lower bound at [`crate::rabitq::EPSILON0`], which orders
/// the candidates; `lower` and `upper` are at [`crate::rabitq::PRUNE_EPSILON0`] and only choose
/// which rows get refined.
struct BlockBounds<'a> {
    terms: &'a [f32; fastscan::BLOCK],
    factors: &'a BlockFactors,
    lo: f32,
    errs: ErrorScales,
    cq: f32,
    w_norm2: f32,
}

/// The per-list error scales of both confidence levels.
#[derive(Clone, Copy)]
struct ErrorScales {
    eps: f32,
    qerr: f32,
    prune_eps: f32,
    prune_qerr: f32,
}

/// One block's bounds: see [`BlockBounds`].
struct Bounds {
    key: [f32; fastscan::BLOCK],
    lower: [f32; fastscan::BLOCK],
    upper: [f32; fastscan::BLOCK],
}

// Each loop indexes six arrays by slot: plain index loops, which vectorize.
#[allow(clippy::needless_range_loop)]
impl BlockBounds<'_> {
    /// `(t, err, prune_err)` of slot `i`: the estimate's code-dependent part and its error
    /// bounds at both confidence levels.
    #[inline(always)]
    fn term(&self, i: usize) -> (f32, f32, f32) {
        let [_, f1, h, e1] = self.factors;
        let e = &self.errs;
        (
            f1[i] * self.terms[i] + self.lo * h[i],
            e1[i] * e.eps + f1[i] * e.qerr,
            e1[i] * e.prune_eps + f1[i] * e.prune_qerr,
        )
    }

    fn inner_product(&self, out: &mut Bounds) {
        let k0 = &self.factors[0];
        for i in 0..fastscan::BLOCK {
            let (t, err, prune_err) = self.term(i);
            let ip = self.cq + k0[i] + t;
            out.key[i] = -(ip + err);
            out.lower[i] = -(ip + prune_err);
            out.upper[i] = -(ip - prune_err);
        }
    }

    fn cosine(&self, out: &mut Bounds) {
        let k0 = &self.factors[0];
        for i in 0..fastscan::BLOCK {
            let (t, err, prune_err) = self.term(i);
            let ip = self.cq + k0[i] + t;
            out.key[i] = 1.0 - (ip + err);
            out.lower[i] = 1.0 - (ip + prune_err);
            out.upper[i] = 1.0 - (ip - prune_err);
        }
    }

    fn l2(&self, out: &mut Bounds) {
        let k0 = &self.factors[0];
        for i in 0..fastscan::BLOCK {
            let (t, err, prune_err) = self.term(i);
            let d2 = k0[i] + self.w_norm2 - 2.0 * t;
            out.key[i] = (d2 - 2.0 * err).max(0.0).sqrt();
            out.lower[i] = (d2 - 2.0 * prune_err).max(0.0).sqrt();
            out.upper[i] = (d2 + 2.0 * prune_err).max(0.0).sqrt();
        }
    }
}

/// The smallest of 32 bounds (NaN-free: bounds come from finite, validated factors), in 8
/// lanes so that it vectorizes.
#[inline]
fn block_min(v: &[f32; fastscan::BLOCK]) -> f32 {
    let mut m = [f32::INFINITY; 8];
    for c in v.chunks_exact(8) {
        for j in 0..8 {
            m[j] = if c[j] < m[j] { c[j] } else { m[j] };
        }
    }
    m.iter()
        .fold(f32::INFINITY, |a, &b| if b < a { b } else { a })
}

/// `Σ v` in 8 lanes (a sequential f32 sum cannot vectorize; this runs once per probed list).
fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for j in 0..8 {
            acc[j] += c[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// What the refinement pass needs of a probed list: the query's offset from its centroid.
struct ListQuery {
    w: Vec<f32>,
    w_sum: f32,
    w_norm: f32,
    cq: f32,
}

/// A code tuple bounded from its 1-bit code, waiting for the refinement pass.
#[derive(Clone, Copy, Debug)]
struct Pending {
    /// The 1-bit lower bound it is ordered by (at [`crate::rabitq::EPSILON0`]).
    key: f32,
    /// The 1-bit bounds that choose whether it is refined (at [`crate::rabitq::PRUNE_EPSILON0`]).
    lower: f32,
    upper: f32,
    tid: Tid,
    refine_block: BlockNumber,
    refine_offset: u16,
    list_query: u32,
}

/// Refinements per distinct refinement page from which a batch is refined in page order.
const DENSE_REFINES_PER_PAGE: usize = 8;

/// Refinements ordered by lower bound are done this many at a time, grouped by page.
const REFINE_CHUNK: usize = 32;

/// Hashes a heap tid with one multiply: the `seen` set is probed once per re-ranked row, and
/// SipHash's flooding resistance buys nothing for tids the index itself produced.
#[derive(Default)]
struct TidHasher(u64);

impl Hasher for TidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u16(&mut self, v: u16) {
        self.write_u64(v as u64);
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(29) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The estimated distance and its lower bound for one tuple (exposed for tests and tools).
pub fn estimate_distance(
    metric: Metric,
    est_value: f32,
    est_error: f32,
    norm_r: f32,
    rc: f32,
    w_norm: f32,
    cq: f32,
) -> (f32, f32) {
    match metric {
        Metric::L2 => {
            let base = norm_r * norm_r + w_norm * w_norm;
            let d2 = base - 2.0 * est_value;
            let lb2 = base - 2.0 * (est_value + est_error);
            (d2.max(0.0).sqrt(), lb2.max(0.0).sqrt())
        }
        Metric::InnerProduct => (-(cq + rc + est_value), -(cq + rc + est_value + est_error)),
        Metric::Cosine => (
            1.0 - (cq + rc + est_value),
            1.0 - (cq + rc + est_value + est_error),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::memory::MemoryRelation;
    use crate::rng::Rng;
    use crate::{train_centroids, BuildParams, IndexBuilder};

    /// An index of `n` rows around `clusters` centres (unit length for ip/cosine).
    fn index(metric: Metric, n: usize, dims: usize, lists: u32) -> MemoryRelation {
        let mut rng = Rng::new(3);
        let centres: Vec<f64> = (0..40 * dims).map(|_| rng.gaussian()).collect();
        let mut data = Vec::with_capacity(n * dims);
        for _ in 0..n {
            let c = rng.below(40) as usize;
            data.extend((0..dims).map(|j| (centres[c * dims + j] + 0.7 * rng.gaussian()) as f32));
        }
        let rel = MemoryRelation::new();
        let cents = train_centroids(metric, &data, dims, lists, 42, 2).unwrap();
        let params = BuildParams {
            dims: dims as u32,
            metric,
            seed: 7,
            memory_limit_bytes: usize::MAX,
        };
        let mut b = IndexBuilder::new(&rel, &params, &cents).unwrap();
        for (i, row) in data.chunks_exact(dims).enumerate() {
            let tid = Tid {
                block: (i / 50) as u32,
                offset: (i % 50 + 1) as u16,
            };
            b.add(tid, row).unwrap();
        }
        b.finish().unwrap();
        rel
    }

    /// The batches, ordered from the 8-bit bounds with exact distances only where needed, are
    /// exactly the lists in exact centroid-distance order, a batch at a time; and most lists
    /// never get an exact distance.
    #[test]
    fn batches_follow_the_exact_centroid_order() {
        let (n, dims, lists) = (6000, 100, 400);
        for metric in [Metric::InnerProduct, Metric::Cosine, Metric::L2] {
            let rel = index(metric, n, dims, lists);
            let centroids = Arc::new(Centroids::read(&rel).unwrap());
            let mut rng = Rng::new(11);
            for (probes, max_probes) in [(1, 0), (8, 0), (32, 100), (400, 0), (7, 23)] {
                let q: Vec<f32> = (0..dims).map(|_| rng.gaussian() as f32).collect();
                let mut scan =
                    Scan::with_centroids(Arc::clone(&centroids), &q, probes, max_probes).unwrap();
                let mut want: Vec<(f32, u32)> = (0..lists)
                    .map(|l| {
                        let c = centroids.centroid(l);
                        (centroid_distance(metric, c, &scan.query), l)
                    })
                    .collect();
                want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let mut got = Vec::new();
                while scan.next_list < scan.limit {
                    let end = (scan.next_list + scan.probes).min(scan.limit);
                    scan.order_next_batch(end - scan.next_list);
                    got.extend(
                        scan.order[scan.next_list..end]
                            .iter()
                            .map(|r| (r.dist, r.list)),
                    );
                    scan.next_list = end;
                    if got.len() == probes as usize {
                        let exact = scan.order.iter().filter(|r| r.exact).count();
                        if (probes as usize) < lists as usize {
                            assert!(
                                exact <= (probes as usize) * 2 + 24,
                                "{metric:?}: {exact} exact distances for {probes} probes"
                            );
                        }
                    }
                }
                let limit = if max_probes == 0 {
                    lists
                } else {
                    max_probes.max(probes)
                };
                assert_eq!(got.len(), limit as usize);
                assert_eq!(
                    got,
                    want[..limit as usize].to_vec(),
                    "{metric:?} probes {probes}"
                );
            }
        }
    }
}
