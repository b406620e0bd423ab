//! Structural verification of an index (for an `amcheck`-style SQL function and tests).
//!
//! Validates the meta page, the centroid chain (page types, chunk order, dimensions, list
//! count) and every list's code and refinement chains (page types, no cycles, no page in two
//! chains, every item parses with the index's code length, every code tuple's refinement tuple
//! is where it points), and returns every indexed heap tid so the caller can
//! verify that every live heap row is reachable. Pages in no chain (orphans, e.g. left by a
//! crash between an extension and its link) are counted, not treated as corruption.

use crate::common::{check_block, read_meta, walk_centroids, ListHeads, PageCopy};
use crate::format::{
    null_tuple_tid, CodeBlock, RefineTuple, META_BLOCK, PAGE_LIST, PAGE_NULLS, PAGE_REFINE,
};
use crate::{BlockNumber, Error, Metric, Result, Tid, INVALID_BLOCK};

/// What [`check`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckReport {
    /// Dimensions.
    pub dims: u32,
    /// Metric.
    pub metric: Metric,
    /// Number of lists.
    pub nlists: u32,
    /// Lists the build made (the rest were added by inserts when lists filled up).
    pub built_lists: u32,
    /// Pages a list's code chain may reach before inserts start new lists beside it
    /// ([`crate::insert::list_page_limit`]).
    pub list_page_limit: u32,
    /// Pages in the relation.
    pub nblocks: BlockNumber,
    /// Pages of the centroid chain.
    pub centroid_pages: u32,
    /// Pages of all code chains.
    pub list_pages: u32,
    /// Pages of all refinement chains.
    pub refine_pages: u32,
    /// Code tuples whose refinement tuple is not in the block they name (0 in a sound index;
    /// a VACUUM running beside the check can make it count a row being removed).
    pub missing_refine: u64,
    /// Refinement tuples no code tuple refers to (left by a crash between the two writes of an
    /// insert, removed by VACUUM with their dead rows).
    pub unreferenced_refine: u64,
    /// Pages in no chain.
    pub orphan_pages: u32,
    /// Lists without tuples.
    pub empty_lists: u32,
    /// Longest list chain, in pages.
    pub longest_chain: u32,
    /// Tuples per list.
    pub list_sizes: Vec<u64>,
    /// Rows with a NULL value (in the NULL chain).
    pub null_tuples: u64,
    /// Pages of the NULL chain.
    pub null_pages: u32,
    /// Every indexed heap tid, NULL rows included, sorted (duplicates kept).
    pub tids: Vec<Tid>,
    /// Tids that appear more than once (extra occurrences).
    pub duplicate_tids: u64,
}

const FREE: u8 = 0;
const META: u8 = 1;
const CENTROID: u8 = 2;
const LIST: u8 = 3;
const REFINE: u8 = 4;
const NULLS: u8 = 5;

/// Verify the whole index.
pub fn check<R: crate::page::Relation>(rel: &R) -> Result<CheckReport> {
    let meta = read_meta(rel)?;
    let d = meta.padded_dims as usize;
    let mut owner = vec![FREE; rel.nblocks() as usize];
    owner[META_BLOCK as usize] = META;
    let mut centroid_blocks = Vec::new();
    let mut heads = Vec::new();
    walk_centroids(
        rel,
        &meta,
        |b| centroid_blocks.push(b),
        |_, h, _| {
            heads.push(h);
            Ok(())
        },
    )?;
    for &b in &centroid_blocks {
        if owner[b as usize] != FREE {
            return Err(Error::corrupt(b, "centroid page is also in another chain"));
        }
        owner[b as usize] = CENTROID;
    }
    let mut report = CheckReport {
        dims: meta.dims,
        metric: meta.metric,
        nlists: meta.nlists,
        built_lists: meta.built_lists(),
        list_page_limit: crate::insert::list_page_limit(&meta, rel.nblocks()),
        nblocks: 0,
        centroid_pages: centroid_blocks.len() as u32,
        list_pages: 0,
        refine_pages: 0,
        missing_refine: 0,
        unreferenced_refine: 0,
        orphan_pages: 0,
        empty_lists: 0,
        longest_chain: 0,
        list_sizes: Vec::with_capacity(heads.len()),
        null_tuples: 0,
        null_pages: 0,
        tids: Vec::new(),
        duplicate_tids: 0,
    };
    let mut page = PageCopy::default();
    let (mut refs, mut have) = (Vec::new(), Vec::new());
    for (
        list,
        &ListHeads {
            code: head,
            refine: refine_head,
        },
    ) in heads.iter().enumerate()
    {
        refs.clear();
        have.clear();
        let mut count = 0u64;
        let chain = walk_chain(
            rel,
            &mut owner,
            &mut page,
            &format!("list {list}"),
            head,
            PAGE_LIST,
            LIST,
            |blk, i, b| {
                let cb = CodeBlock::decode(b, d)
                    .map_err(|e| Error::corrupt(blk, format!("item {}: {}", i + 1, e.0)))?;
                for r in 0..cb.len() {
                    let tid = cb.tid(r);
                    report.tids.push(tid);
                    refs.push((tid, cb.refine(r).0));
                    count += 1;
                }
                Ok(())
            },
        )?;
        let refine_chain = walk_chain(
            rel,
            &mut owner,
            &mut page,
            &format!("list {list}"),
            refine_head,
            PAGE_REFINE,
            REFINE,
            |blk, i, b| {
                let t = RefineTuple::decode(b, d)
                    .map_err(|e| Error::corrupt(blk, format!("item {}: {}", i + 1, e.0)))?;
                have.push((t.tid, blk));
                Ok(())
            },
        )?;
        have.sort_unstable();
        let mut used = vec![false; have.len()];
        for &(tid, blk) in &refs {
            if blk == crate::INVALID_BLOCK {
                if crate::format::has_refine(d) {
                    report.missing_refine += 1;
                }
                continue;
            }
            match have.binary_search(&(tid, blk)) {
                Ok(i) => used[i] = true,
                Err(_) => report.missing_refine += 1,
            }
        }
        report.unreferenced_refine += used.iter().filter(|&&u| !u).count() as u64;
        report.list_pages += chain;
        report.refine_pages += refine_chain;
        report.longest_chain = report.longest_chain.max(chain);
        if count == 0 {
            report.empty_lists += 1;
        }
        report.list_sizes.push(count);
    }
    report.null_pages = walk_chain(
        rel,
        &mut owner,
        &mut page,
        "the NULL chain",
        meta.null_head,
        PAGE_NULLS,
        NULLS,
        |blk, i, b| {
            let tid = null_tuple_tid(b)
                .map_err(|e| Error::corrupt(blk, format!("item {}: {}", i + 1, e.0)))?;
            report.tids.push(tid);
            report.null_tuples += 1;
            Ok(())
        },
    )?;
    report.nblocks = owner.len() as BlockNumber;
    report.orphan_pages = owner.iter().filter(|&&o| o == FREE).count() as u32;
    report.tids.sort_unstable();
    report.duplicate_tids = report.tids.windows(2).filter(|w| w[0] == w[1]).count() as u64;
    Ok(report)
}

/// Walks one chain of `flags` pages from `head`, marking its pages in `owner` and calling `f`
/// for each item; returns its length in pages.
#[allow(clippy::too_many_arguments)]
fn walk_chain<R: crate::page::Relation>(
    rel: &R,
    owner: &mut Vec<u8>,
    page: &mut PageCopy,
    chain_name: &str,
    head: BlockNumber,
    flags: u16,
    mark: u8,
    mut f: impl FnMut(BlockNumber, usize, &[u8]) -> Result<()>,
) -> Result<u32> {
    let mut blk = head;
    let mut from = head;
    let mut chain = 0u32;
    while blk != INVALID_BLOCK {
        let nb = rel.nblocks();
        check_block(blk, nb, from)?;
        if owner.len() < nb as usize {
            owner.resize(nb as usize, FREE);
        }
        if owner[blk as usize] != FREE {
            return Err(Error::corrupt(
                blk,
                format!("{chain_name} reaches a page already in a chain (cycle or shared page)"),
            ));
        }
        owner[blk as usize] = mark;
        page.load(rel, blk);
        if page.opaque().flags != flags {
            return Err(Error::corrupt(
                blk,
                format!(
                    "expected page flags {flags:#x} in {chain_name}, found {:#x}",
                    page.opaque().flags
                ),
            ));
        }
        for i in 0..page.len() {
            let b = page
                .item(i)
                .ok_or_else(|| Error::corrupt(blk, format!("item {} is unused", i + 1)))?;
            f(blk, i, b)?;
        }
        chain += 1;
        from = blk;
        blk = page.opaque().next;
    }
    Ok(chain)
}
