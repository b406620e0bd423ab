//! Insertion of one vector into a built index, and the lists inserts add.
//!
//! The vector goes to the list of its nearest centroid. The list chain is walked from its head
//! with share locks to the first page with a free slot or room for a new code block. At the
//! tail (no next page) the inserter keeps the tail's write lock, extends the relation, fully
//! writes the new page and releases it (WAL record 1), then links it from the tail and releases
//! the tail (record 2). Because the link is set while the tail is locked and the tail is
//! re-checked under that lock, concurrent inserters can never both link a page after the same
//! tail. A crash between the two records leaves an orphan page (see [`crate::check()`]).
//!
//! The refinement tuple goes into the list's refinement chain first, the code (pointing at the
//! item that took it) second: a code a scan can see always has its refinement tuple. A crash in
//! between leaves only an unreferenced refinement tuple of a heap row that never committed,
//! which VACUUM removes.
//!
//! ## New lists: how the lists stay balanced when the data drifts
//! Rows from a distribution the build never saw all go to the few lists nearest to it, which
//! would grow without bound (a scan that probes one then reads a long chain). So a list whose
//! code chain is full at [`list_page_limit`] pages does not grow: the row that would extend it
//! starts a new list instead, with the row itself (normalized for inner product and cosine) as
//! its centroid. Later rows of the new distribution find that centroid nearer than the old ones,
//! so the new lists take them, and each fills to the same bound before it passes rows on in
//! turn. A row far outside its nearest list (its residual [`OUTLIER_RATIO`] times the list's
//! mean) starts a new list at once, so that rows of a new distribution do not pile into old
//! lists whose centroids rank them badly. No row ever moves, so scans running meanwhile stay
//! exact. An index built on an empty table (one list) grows its lists the same way.
//!
//! Adding list `n` (only `n < MAX_LISTS`), all under the meta page's exclusive lock, which
//! serializes list additions (they are rare: one per [`list_page_limit`] pages of inserts):
//! 1. re-read the meta page: if its list count is no longer the one the nearest centroid was
//!    chosen from, release it and insert again from the start (a new list may be nearer);
//! 2. a new refinement head page holding the row's refinement tuple (record);
//! 3. a new code head page holding the row's code (record);
//! 4. the centroid's chunks appended to the centroid chain's tail page, and on new pages
//!    linked after it when it is full (a record per page);
//! 5. the meta page's list count raised to `n + 1` (record).
//!
//! Readers use the meta page's list count and never read centroid items past it, so until step
//! 5 nobody sees the new list, and after it everything it names is complete. A crash before
//! step 5 leaves unreachable head pages (orphans) and centroid items past the count; the next
//! list addition deletes those items and unlinks any page they continued on before appending.
//! Locks: the meta page (block 0) is taken first; new pages come from `extend` (the highest
//! blocks) and are released before the centroid pages are locked, whose tail is locked before
//! any page it is linked to. So locks are still taken in ascending block order.

use crate::common::{
    append_row_to_chain, append_to_chain, centroid_distance, encode_row, find_code_room, prepare,
    read_meta, walk_centroids, PageCopy,
};
use crate::format::{
    block_rows, block_size, encode_block, has_refine, refine_tuple_size, CentroidChunk, Meta,
    META_BLOCK, PAGE_CENTROID, PAGE_LIST, PAGE_META, PAGE_REFINE,
};
use crate::page::{
    maxalign, Opaque, PageRead, PageWrite, Relation, EMPTY_PAGE_FREE_SPACE, ITEM_ID_SIZE,
};
use crate::rabitq::Rotation;
use crate::{Error, Result, Tid, INVALID_BLOCK, MAX_LISTS};

pub use crate::build::AddOutcome as InsertOutcome;

/// A list may grow to this many times the mean list (see [`list_page_limit`]) before inserts
/// start new lists beside it. k-means lists of real embeddings vary a few-fold in size, and a
/// list started from one row is weaker than a trained one, so the bound is loose: on the real
/// 100k set with 30% of it inserted from one side of a hyperplane, a bound of 4× the build's
/// mean added 194 lists and gained no recall at equal time; 8× still bounds every chain.
pub const LIST_GROWTH: u64 = 8;

/// No list stops growing below this many pages (small or empty builds have tiny means).
pub const MIN_LIST_PAGES: u32 = 4;

/// A row whose residual against its nearest centroid is this many times the mean residual of
/// that list's rows is no member of it: it starts a new list at once. Rows of a new
/// distribution otherwise fill the old lists nearest to them up to [`list_page_limit`] first,
/// where a scan for them ranks those lists by centroids far from them and misses them. In
/// many dimensions residual norms concentrate near their mean (1.6× is far in the tail for
/// k-means lists of real embeddings and of Gaussian clusters alike).
pub const OUTLIER_RATIO: f32 = 1.6;

/// The outlier rule needs this many rows to know a list's mean residual; a list with fewer
/// is measured by the build's mean ([`Meta::build_mean_f1`]).
pub const OUTLIER_MIN_ROWS: u64 = 16;

/// Below this many dimensions residual norms vary too much for one to tell an outlier (in 2
/// dimensions an eighth of a Gaussian cluster lies past 1.6× the mean radius): only the page
/// bound adds lists.
pub const OUTLIER_MIN_DIMS: u32 = 32;

/// Rows a code page holds when full.
pub fn rows_per_page(padded_dims: usize) -> u64 {
    let per_block = maxalign(block_size(padded_dims)) + ITEM_ID_SIZE;
    let blocks = (EMPTY_PAGE_FREE_SPACE + ITEM_ID_SIZE) / per_block;
    (blocks.max(1) * block_rows(padded_dims)) as u64
}

/// Pages a list's code chain may reach before an insert that would extend it starts a new
/// list instead: [`LIST_GROWTH`] times the mean list of a fresh build of the index's present
/// size (the unrounded [`crate::build::default_lists_curve`] of its rows), at least
/// [`MIN_LIST_PAGES`]: 2400 rows up to 30 000 rows, falling to 800 rows at 100 000 (where a
/// fresh build's lists shrink too, so an index grown by inserts keeps splitting off lists on
/// the way, and a chain grown before stays over the bound, which `rsclip_index_check` shows),
/// `8 · sqrt(rows / 10)` beyond. No row count is
/// kept anywhere (the build's would be stale), so the rows are estimated from the relation's
/// size (`nblocks`) and the code chains' share of the bytes a row costs. The bound follows the
/// index as it grows: rows of the build's distribution keep the lists near their build-time
/// proportions and rarely meet it, while lists that drift makes grow much faster do, and so
/// does the one list of an index built on an empty table.
pub fn list_page_limit(meta: &Meta, nblocks: u32) -> u32 {
    let d = meta.padded_dims as usize;
    let code = block_size(d) as f64 / block_rows(d) as f64;
    let refine = if has_refine(d) {
        (refine_tuple_size(d) + ITEM_ID_SIZE) as f64
    } else {
        0.0
    };
    let centroid_pages = (meta.nlists as u64 * d as u64 * 4).div_ceil(EMPTY_PAGE_FREE_SPACE as u64);
    let list_pages =
        nblocks.saturating_sub(1 + centroid_pages as u32) as f64 * code / (code + refine);
    // Each list's tail page is about half full: counting it as full would overstate the rows
    // most where lists are small (and so the bound would fall early, in the 30k..100k band).
    let rows = (list_pages - meta.nlists as f64 / 2.0).max(0.0) * rows_per_page(d) as f64;
    // The unrounded curve: rounding the lists down would make a one-list bound of all pages
    // below 600 rows (so an index built empty grows its first list unchecked), and bounds that
    // jump down as the index grows past each multiple of 300 rows.
    let mean = if rows > 0.0 {
        rows_mean(rows) / rows_per_page(d) as f64
    } else {
        0.0
    };
    // (Less a hair: 300 rows' worth of pages, an integer, must not round up by float error.)
    ((LIST_GROWTH as f64 * mean - 1e-6).ceil() as u64).clamp(MIN_LIST_PAGES as u64, u32::MAX as u64)
        as u32
}

/// The mean rows of a list of a default build of `rows` rows.
fn rows_mean(rows: f64) -> f64 {
    rows / crate::build::default_lists_curve(rows).max(f64::MIN_POSITIVE)
}

/// Index the heap row `tid` whose indexed value is NULL (into the NULL chain: one page).
pub fn insert_null<R: Relation>(rel: &R, tid: Tid) -> Result<()> {
    let meta = read_meta(rel)?;
    crate::common::push_null(rel, meta.null_head, tid)
}

/// Index the heap row `tid` with vector `vector` (not yet rotated).
pub fn insert<R: Relation>(rel: &R, tid: Tid, vector: &[f32]) -> Result<InsertOutcome> {
    loop {
        let meta = read_meta(rel)?;
        let rot = Rotation::new(meta.padded_dims as usize, meta.seed, meta.rounds);
        let Some(v) = prepare(&meta, &rot, vector)? else {
            return Ok(InsertOutcome::SkippedZeroVector);
        };
        let d = meta.padded_dims as usize;
        let mut best_dist = f32::INFINITY;
        let mut best = None;
        let mut best_c = vec![0f32; d];
        walk_centroids(
            rel,
            &meta,
            |_| {},
            |_, heads, c| {
                let dist = centroid_distance(meta.metric, c, &v);
                if dist < best_dist || best.is_none() {
                    best_dist = dist;
                    best = Some(heads);
                    best_c.copy_from_slice(c);
                }
                Ok(())
            },
        )?;
        let heads = best.ok_or_else(|| Error::corrupt(META_BLOCK, "index has no lists"))?;
        let room = find_code_room(rel, heads.code, d)?;
        let mut refine = Vec::new();
        let mut row = encode_row(meta.metric, &mut refine, tid, &v, &best_c);
        let full = room.full && room.pages >= list_page_limit(&meta, rel.nblocks());
        // A list's own rows tell how far its members lie; a young list (a few rows) is
        // measured against the build's rows instead.
        let typical = if room.rows_seen >= OUTLIER_MIN_ROWS {
            room.mean_f1
        } else {
            meta.build_mean_f1
        };
        let outlier = meta.dims >= OUTLIER_MIN_DIMS
            && typical > 0.0
            && row.factors.f1 > OUTLIER_RATIO * typical;
        if (full || outlier)
            && meta.nlists < MAX_LISTS
            && differs(&v, &new_centroid(&meta, &v), &best_c)
        {
            if add_list(rel, &meta, tid, &v)? {
                return Ok(InsertOutcome::Added);
            }
            continue; // another inserter added a list first: it may be the nearer one
        }
        if !refine.is_empty() {
            let (blk, off) = append_to_chain(rel, heads.refine, PAGE_REFINE, &refine)?;
            row.refine_block = blk;
            row.refine_offset = off;
        }
        append_row_to_chain(rel, room.block, d, &row)?;
        return Ok(InsertOutcome::Added);
    }
}

/// The centroid a new list started by rotated row `v` gets: the row, normalized where the
/// build's centroids are (inner product, cosine).
fn new_centroid(meta: &Meta, v: &[f32]) -> Vec<f32> {
    let mut c = v.to_vec();
    if meta.metric.spherical() {
        let n = v.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
        if n > 0.0 {
            c.iter_mut().for_each(|a| *a = (*a as f64 / n) as f32);
        }
    }
    c
}

/// Whether a new list's centroid `c` would be a different point than the nearest list's: rows
/// equal to a full list's centroid (duplicates of one vector) gain nothing from more lists with
/// that same centroid, so they extend the chain.
fn differs(v: &[f32], c: &[f32], nearest: &[f32]) -> bool {
    let gap: f64 = c
        .iter()
        .zip(nearest)
        .map(|(&a, &b)| ((a - b) as f64).powi(2))
        .sum();
    let scale: f64 = v
        .iter()
        .map(|&a| (a as f64).powi(2))
        .sum::<f64>()
        .max(f64::MIN_POSITIVE);
    gap > 1e-10 * scale
}

/// Start list `seen.nlists` with row `tid` (rotated vector `v`) as its only row (see the module
/// documentation for the steps). Returns false, having changed nothing, when the meta page no
/// longer equals `seen`.
fn add_list<R: Relation>(rel: &R, seen: &Meta, tid: Tid, v: &[f32]) -> Result<bool> {
    let mut mw = rel.write(META_BLOCK);
    if mw.opaque().flags != PAGE_META {
        return Err(Error::corrupt(META_BLOCK, "block 0 is not a meta page"));
    }
    let meta = Meta::decode(
        mw.item(1)
            .ok_or_else(|| Error::corrupt(META_BLOCK, "meta item missing"))?,
    )
    .map_err(|e| Error::corrupt(META_BLOCK, e.0))?;
    if meta != *seen {
        return Ok(false);
    }
    let d = meta.padded_dims as usize;
    let c = new_centroid(&meta, v);
    let mut refine = Vec::new();
    let mut row = encode_row(meta.metric, &mut refine, tid, v, &c);
    let refine_head = {
        let (b, mut w) = rel.extend();
        w.reinit(Opaque::new(PAGE_REFINE));
        if !refine.is_empty() {
            row.refine_offset = w.add_item(&refine).ok_or_else(|| {
                Error::corrupt(b, "a refinement tuple does not fit an empty page")
            })?;
            row.refine_block = b;
        }
        b
    };
    let code_head = {
        let (b, mut w) = rel.extend();
        w.reinit(Opaque::new(PAGE_LIST));
        w.add_item(&encode_block(std::slice::from_ref(&row), d))
            .ok_or_else(|| Error::corrupt(b, "a code block does not fit an empty page"))?;
        b
    };
    append_centroid(rel, &meta, code_head, refine_head, &c)?;
    let grown = Meta {
        nlists: meta.nlists + 1,
        ..meta
    };
    mw.item_mut(1)
        .ok_or_else(|| Error::corrupt(META_BLOCK, "meta item missing"))?
        .copy_from_slice(&grown.encode());
    drop(mw); // the list exists from this record on
    Ok(true)
}

/// Append list `meta.nlists`'s centroid `c` after the chain's first `meta.nlists` centroids,
/// deleting what an interrupted addition left after them. The caller holds the meta page's
/// exclusive lock, so no other writer touches the centroid chain.
fn append_centroid<R: Relation>(
    rel: &R,
    meta: &Meta,
    code_head: u32,
    refine_head: u32,
    c: &[f32],
) -> Result<()> {
    let d = meta.padded_dims as usize;
    let floats = meta.nlists as u64 * d as u64;
    // Find the page holding the last chunk of the last centroid, and how many of its items
    // belong to the first nlists centroids.
    let mut blk = meta.first_centroid_block;
    let mut from = META_BLOCK;
    let mut seen = 0u64;
    let mut page = PageCopy::default();
    let mut steps = 0u32;
    let keep = loop {
        crate::common::check_block(blk, rel.nblocks(), from)?;
        steps += 1;
        if steps > rel.nblocks() {
            return Err(Error::corrupt(blk, "cycle in the centroid chain"));
        }
        page.load(rel, blk);
        if page.opaque().flags != PAGE_CENTROID {
            return Err(Error::corrupt(blk, "expected a centroid page"));
        }
        let mut keep = 0usize;
        for i in 0..page.len() {
            if seen == floats {
                break;
            }
            let b = page
                .item(i)
                .ok_or_else(|| Error::corrupt(blk, format!("centroid item {} unused", i + 1)))?;
            seen += CentroidChunk::decode(b)
                .map_err(|e| Error::corrupt(blk, e.0))?
                .len() as u64;
            keep = i + 1;
        }
        if seen == floats {
            break keep;
        }
        if seen > floats || page.opaque().next == INVALID_BLOCK {
            return Err(Error::corrupt(
                meta.first_centroid_block,
                format!(
                    "centroid chain does not hold {} whole centroids",
                    meta.nlists
                ),
            ));
        }
        from = blk;
        blk = page.opaque().next;
    };
    let mut w = rel.write(blk);
    let stale: Vec<u16> = (keep as u16 + 1..=w.max_offset()).collect();
    if !stale.is_empty() {
        w.delete_items(&stale);
    }
    let o = w.opaque();
    if o.next != INVALID_BLOCK {
        w.set_opaque(Opaque {
            next: INVALID_BLOCK,
            ..o
        });
    }
    crate::common::append_centroid_chunks(rel, w, blk, meta.nlists, code_head, refine_head, c)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Metric;

    fn meta(dims: u32, nlists: u32) -> Meta {
        Meta {
            dims,
            padded_dims: dims.div_ceil(64) * 64,
            metric: Metric::Cosine,
            nlists,
            seed: 1,
            rounds: crate::format::ROTATION_ROUNDS,
            first_centroid_block: 3,
            first_list_block: 1,
            build_tuples: 0,
            build_skipped: 0,
            build_mean_f1: 0.0,
            null_head: 4,
        }
    }

    /// Pages of `rows` rows of `dims` dimensions.
    fn pages_for(dims: u32, rows: u64) -> f64 {
        rows as f64 / rows_per_page(dims.div_ceil(64) as usize * 64) as f64
    }

    #[test]
    fn page_bound_is_flat_up_to_30k_rows_and_follows_a_fresh_build_beyond() {
        for dims in [64u32, 96, 384, 768] {
            let pd = dims.div_ceil(64) as usize * 64;
            let flat = (8.0 * pages_for(dims, 300) - 1e-6).ceil().max(4.0) as u32;
            let mut last = None;
            // One list growing from empty to 30k rows and many lists alike: the bound never
            // moves (no one-list bound of all pages, no float jump at 300-row multiples).
            for nlists in [1u32, 7, 60] {
                for nblocks in (5..4_000u32).step_by(7) {
                    let m = meta(dims, nlists);
                    let code = block_size(pd) as f64 / block_rows(pd) as f64;
                    let refine = if has_refine(pd) {
                        (refine_tuple_size(pd) + ITEM_ID_SIZE) as f64
                    } else {
                        0.0
                    };
                    let centroid_pages = (nlists as u64 * pd as u64 * 4)
                        .div_ceil(EMPTY_PAGE_FREE_SPACE as u64)
                        as f64;
                    let list_pages =
                        (nblocks as f64 - 1.0 - centroid_pages) * code / (code + refine);
                    let rows = (list_pages - nlists as f64 / 2.0) * rows_per_page(pd) as f64;
                    if rows <= 0.0 || rows > 30_000.0 {
                        continue;
                    }
                    let b = list_page_limit(&m, nblocks);
                    assert_eq!(b, flat, "dims {dims}, {nlists} lists, {nblocks} blocks");
                    last = Some(b);
                }
            }
            assert!(last.is_some(), "dims {dims}: no size up to 30k rows tried");
            // 30k..100k: a default build's lists shrink from 300 to 100 rows, and so does the
            // bound; past 100k it grows as sqrt(rows / 10).
            let at = |rows: u64| {
                let m = meta(dims, 100);
                let code = block_size(pd) as f64 / block_rows(pd) as f64;
                let refine = if has_refine(pd) {
                    (refine_tuple_size(pd) + ITEM_ID_SIZE) as f64
                } else {
                    0.0
                };
                let list_pages = pages_for(dims, rows) + 50.0;
                let nblocks = (list_pages * (code + refine) / code).ceil() as u32 + 1 + 8;
                list_page_limit(&m, nblocks)
            };
            assert!(at(100_000) < at(30_000), "dims {dims}");
            assert!(at(1_000_000) > at(100_000), "dims {dims}");
            let want = (8.0 * pages_for(dims, 100)).ceil().max(4.0) as u32;
            assert!(
                at(100_000).abs_diff(want) <= 1,
                "dims {dims}: {} at 100k, want about {want}",
                at(100_000)
            );
        }
    }
}
