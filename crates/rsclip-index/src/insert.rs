//! Insertion of one vector into a built index.
//!
//! The vector goes to the list of its nearest centroid. The list chain is walked from its head
//! with share locks; the tuple goes on the first page with room (re-checked under the write
//! lock), so space freed by vacuum is reused. At the tail (no next page) the inserter keeps the
//! tail's write lock, extends the relation, fully writes the new page and releases it (WAL
//! record 1), then links it from the tail and releases the tail (record 2). Because the link is
//! set while the tail is locked and the tail is re-checked under that lock, concurrent
//! inserters can never both link a page after the same tail. A crash between the two records
//! leaves an orphan page (see [`crate::check()`]).

use crate::common::{
    centroid_distance, encode_tuple, prepare, read_meta, walk_centroids, ChainWalk,
};
use crate::format::PAGE_LIST;
use crate::page::{fits, Opaque, PageRead, PageWrite, Relation};
use crate::rabitq::Rotation;
use crate::{BlockNumber, Error, Result, Tid, INVALID_BLOCK};

pub use crate::build::AddOutcome as InsertOutcome;

/// Insert the heap row `tid` with vector `vector`.
pub fn insert<R: Relation>(rel: &R, tid: Tid, vector: &[f32]) -> Result<InsertOutcome> {
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
    let mut tuple = Vec::new();
    encode_tuple(&mut tuple, tid, &v, &best_c);
    insert_into_list(rel, best_head, &tuple)?;
    Ok(InsertOutcome::Added)
}

fn expect_list_page(flags: u16, blk: BlockNumber) -> Result<()> {
    if flags != PAGE_LIST {
        return Err(Error::corrupt(
            blk,
            format!("expected a list page, flags are {flags:#x}"),
        ));
    }
    Ok(())
}

/// Put `tuple` on the first page of the chain starting at `head` that has room, extending the
/// chain at its tail if none has.
pub(crate) fn insert_into_list<R: Relation>(
    rel: &R,
    head: BlockNumber,
    tuple: &[u8],
) -> Result<()> {
    let mut blk = head;
    let mut from = head;
    let mut walk = ChainWalk::new(rel, head);
    loop {
        walk.step(rel, blk, from)?;
        let (room, next) = {
            let page = rel.read(blk);
            expect_list_page(page.opaque().flags, blk)?;
            (fits(&page, tuple.len()), page.opaque().next)
        };
        if !room && next != INVALID_BLOCK {
            from = blk;
            blk = next;
            continue;
        }
        let mut w = rel.write(blk);
        let o = w.opaque();
        expect_list_page(o.flags, blk)?;
        if fits(&w, tuple.len()) {
            w.add_item(tuple)
                .ok_or_else(|| Error::corrupt(blk, "page refused an item that fits"))?;
            return Ok(());
        }
        if o.next != INVALID_BLOCK {
            // someone filled the page or linked a successor meanwhile: go on
            drop(w);
            from = blk;
            blk = o.next;
            continue;
        }
        // `blk` is the tail and full: extend while holding it
        let (nb, mut nw) = rel.extend();
        nw.reinit(Opaque::new(PAGE_LIST));
        if nw.add_item(tuple).is_none() {
            return Err(Error::InvalidArgument(
                "tuple does not fit on an empty page".into(),
            ));
        }
        drop(nw); // WAL record 1: the complete new page
        w.set_opaque(Opaque { next: nb, ..o });
        drop(w); // WAL record 2: the link
        return Ok(());
    }
}
