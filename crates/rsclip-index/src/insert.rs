//! Insertion of one vector into a built index.
//!
//! The vector goes to the list of its nearest centroid. The list chain is walked from its head
//! with share locks; the row goes into the last code block of the first page with a free slot
//! or room for a new block (re-checked under the write lock), so space freed by vacuum is
//! reused. At the tail (no next page) the inserter keeps the
//! tail's write lock, extends the relation, fully writes the new page and releases it (WAL
//! record 1), then links it from the tail and releases the tail (record 2). Because the link is
//! set while the tail is locked and the tail is re-checked under that lock, concurrent
//! inserters can never both link a page after the same tail. A crash between the two records
//! leaves an orphan page (see [`crate::check()`]).
//!
//! The refinement tuple goes into the list's refinement chain first, the code (pointing at the
//! item that took it) second: a code a scan can see always has its refinement tuple. A crash in between leaves only an unreferenced refinement tuple of a heap row that
//! never committed, which VACUUM removes.

use crate::common::{
    append_row_to_chain, append_to_chain, centroid_distance, encode_row, prepare, read_meta,
    walk_centroids,
};
use crate::format::PAGE_REFINE;
use crate::rabitq::Rotation;
use crate::{Error, Result, Tid, INVALID_BLOCK};

pub use crate::build::AddOutcome as InsertOutcome;

/// Index the heap row `tid` with vector `vector` (not yet rotated).
pub fn insert<R: crate::page::Relation>(
    rel: &R,
    tid: Tid,
    vector: &[f32],
) -> Result<InsertOutcome> {
    let meta = read_meta(rel)?;
    let rot = Rotation::new(meta.padded_dims as usize, meta.seed, meta.rounds);
    let Some(v) = prepare(&meta, &rot, vector)? else {
        return Ok(InsertOutcome::SkippedZeroVector);
    };
    let d = meta.padded_dims as usize;
    let mut best_dist = f32::INFINITY;
    let mut best_head = INVALID_BLOCK;
    let mut best_c = vec![0f32; d];
    walk_centroids(
        rel,
        &meta,
        |_| {},
        |_, head, c| {
            let dist = centroid_distance(meta.metric, c, &v);
            if dist < best_dist || best_head == INVALID_BLOCK {
                best_dist = dist;
                best_head = head;
                best_c.copy_from_slice(c);
            }
            Ok(())
        },
    )?;
    let mut refine = Vec::new();
    let mut row = encode_row(meta.metric, &mut refine, tid, &v, &best_c);
    if !refine.is_empty() {
        let refine_head = meta.refine_head(best_head).ok_or_else(|| {
            Error::corrupt(best_head, "centroid names a block that is no list head")
        })?;
        let (blk, off) = append_to_chain(rel, refine_head, PAGE_REFINE, &refine)?;
        row.refine_block = blk;
        row.refine_offset = off;
    }
    append_row_to_chain(rel, best_head, d, &row)?;
    Ok(InsertOutcome::Added)
}
