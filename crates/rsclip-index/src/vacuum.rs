//! Bulk deletion of dead tuples (`ambulkdelete`).
//!
//! Every list page is first read under a share lock (copied, lock released) and the callback is
//! asked about each tuple (no lock held while it runs). Only pages with dead tuples are then
//! write-locked; the dead tuples are located again under that lock by their heap tid (items may
//! have moved or been added meanwhile) and removed with one compaction (`delete_items`): one
//! WAL record per modified page. Empty pages stay in their chains and are reused by inserts
//! (which take the first page with room), so churn does not grow the index without bound.

use crate::common::{read_meta, walk_centroids, ChainWalk, PageCopy};
use crate::format::{list_tuple_tid, PAGE_LIST};
use crate::page::{PageRead, PageWrite, Relation};
use crate::{Error, Result, Tid, INVALID_BLOCK};
use std::collections::HashSet;

/// Counts of a bulk delete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeleteStats {
    /// List pages visited.
    pub pages_visited: u64,
    /// Pages that had dead tuples removed.
    pub pages_modified: u64,
    /// Tuples removed.
    pub tuples_removed: u64,
    /// Tuples left (live when visited).
    pub tuples_remaining: u64,
}

/// Remove every tuple whose heap tid `is_dead` says is dead.
pub fn bulk_delete<R: Relation>(
    rel: &R,
    is_dead: &mut dyn FnMut(Tid) -> bool,
) -> Result<DeleteStats> {
    let meta = read_meta(rel)?;
    let d = meta.padded_dims as usize;
    let mut heads = Vec::with_capacity(meta.nlists as usize);
    walk_centroids(
        rel,
        &meta,
        |_| {},
        |_, head, _| {
            heads.push(head);
            Ok(())
        },
    )?;
    let mut stats = DeleteStats::default();
    let mut page = PageCopy::default();
    let mut dead = HashSet::new();
    for head in heads {
        let mut blk = head;
        let mut from = head;
        let mut walk = ChainWalk::new(rel, head);
        while blk != INVALID_BLOCK {
            walk.step(rel, blk, from)?;
            page.load(rel, blk);
            stats.pages_visited += 1;
            if page.opaque().flags != PAGE_LIST {
                return Err(Error::corrupt(blk, "expected a list page"));
            }
            dead.clear();
            let mut live = 0;
            for i in 0..page.len() {
                let Some(b) = page.item(i) else { continue };
                let tid = list_tuple_tid(b, d).map_err(|e| Error::corrupt(blk, e.0))?;
                if is_dead(tid) {
                    dead.insert(tid);
                } else {
                    live += 1;
                }
            }
            let mut next = page.opaque().next;
            if !dead.is_empty() {
                let mut w = rel.write(blk);
                if w.opaque().flags != PAGE_LIST {
                    return Err(Error::corrupt(blk, "expected a list page"));
                }
                let mut offs = Vec::with_capacity(dead.len());
                for off in 1..=w.max_offset() {
                    let Some(b) = w.item(off) else { continue };
                    let tid = list_tuple_tid(b, d).map_err(|e| Error::corrupt(blk, e.0))?;
                    if dead.contains(&tid) {
                        offs.push(off);
                    }
                }
                if !offs.is_empty() {
                    w.delete_items(&offs);
                    stats.pages_modified += 1;
                    stats.tuples_removed += offs.len() as u64;
                }
                next = w.opaque().next;
            }
            stats.tuples_remaining += live;
            from = blk;
            blk = next;
        }
    }
    Ok(stats)
}
