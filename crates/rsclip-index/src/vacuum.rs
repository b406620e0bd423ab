//! Bulk deletion of dead tuples (`ambulkdelete`).
//!
//! Every list page is first read under a share lock (copied, lock released) and the callback is
//! asked about each tuple (no lock held while it runs). Only pages with dead tuples are then
//! write-locked; the dead tuples are located again under that lock by their heap tid (items may
//! have moved or been added meanwhile) and removed with one compaction (`delete_items`): one
//! WAL record per modified page. Empty pages stay in their chains and are reused by inserts
//! (which take the first page with room), so churn does not grow the index without bound.
//!
//! Each list's code chain is cleaned before its refinement chain, so a code tuple never loses
//! its refinement tuple while it is still visible. The callback is asked about each heap tid
//! twice (once per chain); callers' callbacks are pure lookups.

use crate::common::{read_meta, walk_centroids, ChainWalk, ListHeads, PageCopy};
use crate::format::{
    encode_block, null_tuple_tid, refine_tuple_tid, CodeBlock, FormatError, RowCode, PAGE_LIST,
    PAGE_NULLS, PAGE_REFINE,
};
use crate::page::{PageRead, PageWrite, Relation};
use crate::{Error, Result, Tid, INVALID_BLOCK};
use std::collections::HashSet;

/// Counts of a bulk delete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeleteStats {
    /// Pages visited (code and refinement chains).
    pub pages_visited: u64,
    /// Pages that had dead tuples removed.
    pub pages_modified: u64,
    /// Code tuples removed.
    pub tuples_removed: u64,
    /// Code tuples left (live when visited).
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
        |_, h, _| {
            heads.push(h);
            Ok(())
        },
    )?;
    let mut stats = DeleteStats::default();
    let mut page = PageCopy::default();
    let mut dead = HashSet::new();
    let nulls = clean_chain(
        rel,
        meta.null_head,
        PAGE_NULLS,
        &null_tuple_tid,
        is_dead,
        &mut page,
        &mut dead,
    )?;
    stats.pages_visited += nulls.pages_visited;
    stats.pages_modified += nulls.pages_modified;
    stats.tuples_removed += nulls.tuples_removed;
    stats.tuples_remaining += nulls.tuples_remaining;
    for ListHeads {
        code: head,
        refine: refine_head,
    } in heads
    {
        let code = clean_code_chain(rel, head, d, is_dead, &mut page)?;
        stats.pages_visited += code.pages_visited;
        stats.pages_modified += code.pages_modified;
        stats.tuples_removed += code.tuples_removed;
        stats.tuples_remaining += code.tuples_remaining;
        let refine = clean_chain(
            rel,
            refine_head,
            PAGE_REFINE,
            &|b| refine_tuple_tid(b, d),
            is_dead,
            &mut page,
            &mut dead,
        )?;
        stats.pages_visited += refine.pages_visited;
        stats.pages_modified += refine.pages_modified;
    }
    Ok(stats)
}

/// Removes the rows of dead heap tuples from one code chain: a block that keeps some rows is
/// rewritten in place (same size, order kept), one that keeps none is deleted.
fn clean_code_chain<R: Relation>(
    rel: &R,
    head: crate::BlockNumber,
    d: usize,
    is_dead: &mut dyn FnMut(Tid) -> bool,
    page: &mut PageCopy,
) -> Result<DeleteStats> {
    let mut stats = DeleteStats::default();
    let mut blk = head;
    let mut from = head;
    let mut walk = ChainWalk::new(rel, head);
    let mut dead = HashSet::new();
    while blk != INVALID_BLOCK {
        walk.step(rel, blk, from)?;
        page.load(rel, blk);
        stats.pages_visited += 1;
        if page.opaque().flags != PAGE_LIST {
            return Err(Error::corrupt(
                blk,
                format!("expected a list page, flags are {:#x}", page.opaque().flags),
            ));
        }
        dead.clear();
        let mut live = 0;
        for i in 0..page.len() {
            let Some(b) = page.item(i) else { continue };
            let cb = CodeBlock::decode(b, d)
                .map_err(|e| Error::corrupt(blk, format!("item {}: {}", i + 1, e.0)))?;
            for r in 0..cb.len() {
                let tid = cb.tid(r);
                if is_dead(tid) {
                    dead.insert(tid);
                } else {
                    live += 1;
                }
            }
        }
        let mut next = page.opaque().next;
        if !dead.is_empty() {
            let mut w = rel.write(blk);
            if w.opaque().flags != PAGE_LIST {
                return Err(Error::corrupt(blk, "page changed type under vacuum"));
            }
            let (mut empty, mut removed) = (Vec::new(), 0u64);
            for off in 1..=w.max_offset() {
                let Some(b) = w.item_mut(off) else { continue };
                let (kept, n): (Vec<RowCode>, usize) = {
                    let cb = CodeBlock::decode(b, d).map_err(|e| Error::corrupt(blk, e.0))?;
                    let kept = (0..cb.len())
                        .filter(|&r| !dead.contains(&cb.tid(r)))
                        .map(|r| cb.row(r))
                        .collect();
                    (kept, cb.len())
                };
                if kept.len() == n {
                    continue;
                }
                removed += (n - kept.len()) as u64;
                if kept.is_empty() {
                    empty.push(off);
                } else {
                    b.copy_from_slice(&encode_block(&kept, d));
                }
            }
            if !empty.is_empty() {
                w.delete_items(&empty);
            }
            if removed > 0 {
                stats.pages_modified += 1;
                stats.tuples_removed += removed;
            }
            next = w.opaque().next;
        }
        stats.tuples_remaining += live;
        from = blk;
        blk = next;
    }
    Ok(stats)
}

/// Removes the tuples of dead heap rows from one chain of `flags` pages.
fn clean_chain<R: Relation>(
    rel: &R,
    head: crate::BlockNumber,
    flags: u16,
    tid_of: &dyn Fn(&[u8]) -> std::result::Result<Tid, FormatError>,
    is_dead: &mut dyn FnMut(Tid) -> bool,
    page: &mut PageCopy,
    dead: &mut HashSet<Tid>,
) -> Result<DeleteStats> {
    let mut stats = DeleteStats::default();
    let mut blk = head;
    let mut from = head;
    let mut walk = ChainWalk::new(rel, head);
    while blk != INVALID_BLOCK {
        walk.step(rel, blk, from)?;
        page.load(rel, blk);
        stats.pages_visited += 1;
        if page.opaque().flags != flags {
            return Err(Error::corrupt(
                blk,
                format!(
                    "expected page flags {flags:#x}, found {:#x}",
                    page.opaque().flags
                ),
            ));
        }
        dead.clear();
        let mut live = 0;
        for i in 0..page.len() {
            let Some(b) = page.item(i) else { continue };
            let tid = tid_of(b).map_err(|e| Error::corrupt(blk, e.0))?;
            if is_dead(tid) {
                dead.insert(tid);
            } else {
                live += 1;
            }
        }
        let mut next = page.opaque().next;
        if !dead.is_empty() {
            let mut w = rel.write(blk);
            if w.opaque().flags != flags {
                return Err(Error::corrupt(blk, "page changed type under vacuum"));
            }
            let mut offs = Vec::with_capacity(dead.len());
            for off in 1..=w.max_offset() {
                let Some(b) = w.item(off) else { continue };
                let tid = tid_of(b).map_err(|e| Error::corrupt(blk, e.0))?;
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
    Ok(stats)
}
