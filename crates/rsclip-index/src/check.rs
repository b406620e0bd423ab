//! Structural verification of an index (for an `amcheck`-style SQL function and tests).
//!
//! Validates the meta page, the centroid chain (page types, chunk order, dimensions, list
//! count) and every list chain (page types, no cycles, no page in two chains, every item
//! parses with the index's code length), and returns every indexed heap tid so the caller can
//! verify that every live heap row is reachable. Pages in no chain (orphans, e.g. left by a
//! crash between an extension and its link) are counted, not treated as corruption.

use crate::common::{check_block, read_meta, walk_centroids, PageCopy};
use crate::format::{ListTuple, META_BLOCK, PAGE_LIST};
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
    /// Pages in the relation.
    pub nblocks: BlockNumber,
    /// Pages of the centroid chain.
    pub centroid_pages: u32,
    /// Pages of all list chains.
    pub list_pages: u32,
    /// Pages in no chain.
    pub orphan_pages: u32,
    /// Lists without tuples.
    pub empty_lists: u32,
    /// Longest list chain, in pages.
    pub longest_chain: u32,
    /// Tuples per list.
    pub list_sizes: Vec<u64>,
    /// Every indexed heap tid, sorted (duplicates kept).
    pub tids: Vec<Tid>,
    /// Tids that appear more than once (extra occurrences).
    pub duplicate_tids: u64,
}

const FREE: u8 = 0;
const META: u8 = 1;
const CENTROID: u8 = 2;
const LIST: u8 = 3;

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
        |_, head, _| {
            heads.push(head);
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
        nblocks: 0,
        centroid_pages: centroid_blocks.len() as u32,
        list_pages: 0,
        orphan_pages: 0,
        empty_lists: 0,
        longest_chain: 0,
        list_sizes: Vec::with_capacity(heads.len()),
        tids: Vec::new(),
        duplicate_tids: 0,
    };
    let mut page = PageCopy::default();
    for (list, &head) in heads.iter().enumerate() {
        let mut blk = head;
        let mut from = head;
        let mut chain = 0u32;
        let mut count = 0u64;
        while blk != INVALID_BLOCK {
            let nb = rel.nblocks();
            check_block(blk, nb, from)?;
            if owner.len() < nb as usize {
                owner.resize(nb as usize, FREE);
            }
            if owner[blk as usize] != FREE {
                return Err(Error::corrupt(
                    blk,
                    format!("list {list} reaches a page already in a chain (cycle or shared page)"),
                ));
            }
            owner[blk as usize] = LIST;
            page.load(rel, blk);
            if page.opaque().flags != PAGE_LIST {
                return Err(Error::corrupt(
                    blk,
                    format!("expected a list page, flags are {:#x}", page.opaque().flags),
                ));
            }
            for i in 0..page.len() {
                let b = page
                    .item(i)
                    .ok_or_else(|| Error::corrupt(blk, format!("item {} is unused", i + 1)))?;
                let t = ListTuple::decode(b, d)
                    .map_err(|e| Error::corrupt(blk, format!("item {}: {}", i + 1, e.0)))?;
                report.tids.push(t.tid);
                count += 1;
            }
            chain += 1;
            from = blk;
            blk = page.opaque().next;
        }
        report.list_pages += chain;
        report.longest_chain = report.longest_chain.max(chain);
        if count == 0 {
            report.empty_lists += 1;
        }
        report.list_sizes.push(count);
    }
    report.nblocks = owner.len() as BlockNumber;
    report.orphan_pages = owner.iter().filter(|&&o| o == FREE).count() as u32;
    report.tids.sort_unstable();
    report.duplicate_tids = report.tids.windows(2).filter(|w| w[0] == w[1]).count() as u64;
    Ok(report)
}
