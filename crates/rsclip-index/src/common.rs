//! Helpers shared by the index operations.

use crate::format::{
    block_rows, block_size, centroid_chunk_capacity, encode_block, encode_centroid_chunk,
    encode_null_tuple, encode_refine_tuple, null_tuple_tid, CentroidChunk, CodeBlock, Meta,
    RowCode, META_BLOCK, PAGE_CENTROID, PAGE_LIST, PAGE_META, PAGE_NULLS,
};
use crate::page::{fits, Opaque, PageRead, PageWrite, Relation};
use crate::rabitq::{encode, row_factors, Rotation};
use crate::{BlockNumber, Error, Metric, Result, Tid, INVALID_BLOCK};
use rsclip_core::distance::{dot, l2_squared};

/// A copy of a page's items and opaque, taken under a share lock.
#[derive(Default)]
pub(crate) struct PageCopy {
    pub opaque: Option<Opaque>,
    data: Vec<u8>,
    items: Vec<Option<(usize, usize)>>,
}

impl PageCopy {
    /// Share-lock `blk`, copy it, release the lock.
    pub fn load<R: Relation>(&mut self, rel: &R, blk: BlockNumber) {
        let page = rel.read(blk);
        self.data.clear();
        self.items.clear();
        self.opaque = Some(page.opaque());
        for off in 1..=page.max_offset() {
            match page.item(off) {
                Some(b) => {
                    self.items.push(Some((self.data.len(), b.len())));
                    self.data.extend_from_slice(b);
                }
                None => self.items.push(None),
            }
        }
    }

    pub fn opaque(&self) -> Opaque {
        self.opaque.unwrap_or(Opaque::new(0))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Item at 0-based index `i` (offset `i + 1`).
    pub fn item(&self, i: usize) -> Option<&[u8]> {
        let (s, l) = (*self.items.get(i)?)?;
        Some(&self.data[s..s + l])
    }
}

/// Reads and validates the meta page (block 0).
pub fn read_meta<R: Relation>(rel: &R) -> Result<Meta> {
    if rel.nblocks() == 0 {
        return Err(Error::corrupt(META_BLOCK, "index has no meta page"));
    }
    let page = rel.read(META_BLOCK);
    if page.opaque().flags != PAGE_META {
        return Err(Error::corrupt(
            META_BLOCK,
            format!(
                "block 0 is not a meta page (flags {:#x})",
                page.opaque().flags
            ),
        ));
    }
    let item = page
        .item(1)
        .ok_or_else(|| Error::corrupt(META_BLOCK, "meta item missing"))?;
    Meta::decode(item).map_err(|e| Error::corrupt(META_BLOCK, e.0))
}

/// Check a block number read from a page before following it.
pub(crate) fn check_block(blk: BlockNumber, nblocks: BlockNumber, from: BlockNumber) -> Result<()> {
    if blk == META_BLOCK || blk >= nblocks {
        return Err(Error::corrupt(
            from,
            format!("points to block {blk}, outside the index ({nblocks} blocks)"),
        ));
    }
    Ok(())
}

/// Validates the blocks of one chain walk against the relation's size, asking for the size
/// only when a block lies beyond the last answer: in Postgres `nblocks` is an `lseek` system
/// call, and asking twice per page made it a large part of a scan. A chain may grow while it is
/// walked (an insert extends the relation and links the new page), so a block past the cached
/// size is only corrupt if it is past the fresh size too.
pub(crate) struct ChainWalk {
    head: BlockNumber,
    nblocks: BlockNumber,
    steps: u32,
}

impl ChainWalk {
    pub(crate) fn new<R: Relation>(rel: &R, head: BlockNumber) -> ChainWalk {
        ChainWalk {
            head,
            nblocks: rel.nblocks(),
            steps: 0,
        }
    }

    /// A walk that starts from a size learnt earlier (a scan walks many chains).
    pub(crate) fn with_size(head: BlockNumber, nblocks: BlockNumber) -> ChainWalk {
        ChainWalk {
            head,
            nblocks,
            steps: 0,
        }
    }

    /// The relation size last seen.
    pub(crate) fn nblocks(&self) -> BlockNumber {
        self.nblocks
    }

    /// Check `blk` (read from block `from`, or the head itself) before it is read.
    pub(crate) fn step<R: Relation>(
        &mut self,
        rel: &R,
        blk: BlockNumber,
        from: BlockNumber,
    ) -> Result<()> {
        if blk >= self.nblocks {
            self.nblocks = rel.nblocks();
        }
        check_block(blk, self.nblocks, from)?;
        self.steps += 1;
        if self.steps > self.nblocks {
            // More pages than the relation has: the chain has a cycle.
            self.nblocks = rel.nblocks();
            if self.steps > self.nblocks {
                return Err(Error::corrupt(self.head, "cycle in a list chain"));
            }
        }
        Ok(())
    }
}

/// Check dimensions and values of an input vector; normalize it for cosine (returns `None` for
/// a zero vector under cosine), zero-pad and rotate it.
pub(crate) fn prepare(meta: &Meta, rot: &Rotation, x: &[f32]) -> Result<Option<Vec<f32>>> {
    if x.len() != meta.dims as usize {
        return Err(Error::DimensionMismatch {
            expected: meta.dims,
            got: x.len().min(u32::MAX as usize) as u32,
        });
    }
    if !x.iter().all(|v| v.is_finite()) {
        return Err(Error::NonFiniteValue);
    }
    let mut v = vec![0f32; meta.padded_dims as usize];
    v[..x.len()].copy_from_slice(x);
    if meta.metric == Metric::Cosine {
        let n = x.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
        if n == 0.0 || !n.is_finite() {
            return Ok(None);
        }
        for a in &mut v {
            *a = (*a as f64 / n) as f32;
        }
    }
    rot.rotate_in_place(&mut v);
    Ok(Some(v))
}

/// Distance used to rank lists: squared L2 to the centroid, or negative inner product.
pub(crate) fn centroid_distance(metric: Metric, c: &[f32], q: &[f32]) -> f32 {
    match metric {
        Metric::L2 => l2_squared(c, q),
        Metric::InnerProduct | Metric::Cosine => -dot(c, q),
    }
}

/// Encode row `tid` with rotated vector `v` in the list with rotated centroid `c`: its code
/// (pointing at no refinement yet: the caller sets the location once the refinement tuple is
/// placed) and, when the width allows one, its refinement tuple (appended to `refine`).
pub(crate) fn encode_row(
    metric: Metric,
    refine: &mut Vec<u8>,
    tid: Tid,
    v: &[f32],
    c: &[f32],
) -> RowCode {
    let resid: Vec<f32> = v.iter().zip(c).map(|(a, b)| a - b).collect();
    let code = encode(&resid);
    let factors = row_factors(metric, &resid, c, &code);
    if crate::format::has_refine(resid.len()) {
        let (lo, delta, u) = crate::rabitq::quantize_u8(&resid);
        let rc = dot(&resid, c);
        encode_refine_tuple(refine, tid, lo, delta, code.norm, rc, &u);
    }
    RowCode {
        tid,
        refine_block: INVALID_BLOCK,
        refine_offset: 0,
        factors,
        bits: code.bits,
    }
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

/// Where a code page can take one more row: a block with a free slot (its offset; VACUUM
/// leaves slots free in any block), or room for a new block (`Some(None)`); `None` when it is
/// full.
fn code_page_room(
    page: &dyn PageReadDyn,
    blk: BlockNumber,
    d: usize,
) -> Result<Option<Option<u16>>> {
    for off in (1..=page.max_offset_dyn()).rev() {
        if let Some(b) = page.item_dyn(off) {
            let cb = CodeBlock::decode(b, d)
                .map_err(|e| Error::corrupt(blk, format!("item {off}: {}", e.0)))?;
            if cb.len() < block_rows(d) {
                return Ok(Some(Some(off)));
            }
        }
    }
    Ok(page.fits_dyn(block_size(d)).then_some(None))
}

/// Where a code chain can take one more row, as a walk under share locks found it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct CodeRoom {
    /// The first page with room, or the tail when no page has any.
    pub block: BlockNumber,
    /// Pages walked, `block` included (the chain's length when it is full).
    pub pages: u32,
    /// Whether no page had room: adding the row extends the chain.
    pub full: bool,
    /// Rows on the pages walked.
    pub rows_seen: u64,
    /// Their mean `f1` (`|r| / <ō, o>`, nearly proportional to the residual norm: `<ō, o>`
    /// barely varies in many dimensions), 0 when none.
    pub mean_f1: f32,
}

/// Walks the code chain from `head` to its first page with room for a row.
pub(crate) fn find_code_room<R: Relation>(
    rel: &R,
    head: BlockNumber,
    d: usize,
) -> Result<CodeRoom> {
    let mut blk = head;
    let mut from = head;
    let mut walk = ChainWalk::new(rel, head);
    let mut pages = 0u32;
    let (mut rows, mut f1_sum) = (0u64, 0f64);
    loop {
        walk.step(rel, blk, from)?;
        pages += 1;
        let (room, next) = {
            let page = rel.read(blk);
            expect_list_page(page.opaque().flags, blk)?;
            for off in 1..=page.max_offset() {
                if let Some(b) = page.item(off) {
                    let cb = CodeBlock::decode(b, d)
                        .map_err(|e| Error::corrupt(blk, format!("item {off}: {}", e.0)))?;
                    rows += cb.len() as u64;
                    f1_sum += (0..cb.len()).map(|i| cb.factors(i).f1 as f64).sum::<f64>();
                }
            }
            (code_page_room(&page, blk, d)?, page.opaque().next)
        };
        if room.is_some() || next == INVALID_BLOCK {
            return Ok(CodeRoom {
                block: blk,
                pages,
                full: room.is_none(),
                rows_seen: rows,
                mean_f1: if rows == 0 {
                    0.0
                } else {
                    (f1_sum / rows as f64) as f32
                },
            });
        }
        from = blk;
        blk = next;
    }
}

/// Add `row` to a code chain, walking it from `start` (its head, or any page of it: pages never
/// leave a chain): into the last block of the first page whose blocks have a free slot, or as
/// a new block on the first page with room for one, else on a new page linked at the tail.
/// Same locking as [`append_to_chain`].
pub(crate) fn append_row_to_chain<R: Relation>(
    rel: &R,
    start: BlockNumber,
    d: usize,
    row: &RowCode,
) -> Result<()> {
    let mut blk = start;
    let mut from = start;
    let mut walk = ChainWalk::new(rel, start);
    loop {
        walk.step(rel, blk, from)?;
        let (r, next) = {
            let page = rel.read(blk);
            expect_list_page(page.opaque().flags, blk)?;
            (code_page_room(&page, blk, d)?, page.opaque().next)
        };
        if r.is_none() && next != INVALID_BLOCK {
            from = blk;
            blk = next;
            continue;
        }
        let mut w = rel.write(blk);
        let o = w.opaque();
        expect_list_page(o.flags, blk)?;
        match code_page_room(&w, blk, d)? {
            Some(Some(off)) => {
                let b = w
                    .item_mut(off)
                    .ok_or_else(|| Error::corrupt(blk, "code block vanished under the lock"))?;
                let mut rows: Vec<RowCode> = {
                    let cb = CodeBlock::decode(b, d).map_err(|e| Error::corrupt(blk, e.0))?;
                    (0..cb.len()).map(|i| cb.row(i)).collect()
                };
                rows.push(row.clone());
                b.copy_from_slice(&encode_block(&rows, d));
                return Ok(());
            }
            Some(None) => {
                w.add_item(&encode_block(std::slice::from_ref(row), d))
                    .ok_or_else(|| Error::corrupt(blk, "page refused an item that fits"))?;
                return Ok(());
            }
            None if o.next != INVALID_BLOCK => {
                drop(w);
                from = blk;
                blk = o.next;
                continue;
            }
            None => {}
        }
        let (nb, mut nw) = rel.extend();
        nw.reinit(Opaque::new(PAGE_LIST));
        if nw
            .add_item(&encode_block(std::slice::from_ref(row), d))
            .is_none()
        {
            return Err(Error::InvalidArgument(
                "a code block does not fit on an empty page".into(),
            ));
        }
        drop(nw); // WAL record 1: the complete new page
        w.set_opaque(Opaque { next: nb, ..o });
        drop(w); // WAL record 2: the link
        return Ok(());
    }
}

/// Object-safe view of [`PageRead`] (read and write guards are different types).
pub(crate) trait PageReadDyn {
    fn max_offset_dyn(&self) -> u16;
    fn item_dyn(&self, off: u16) -> Option<&[u8]>;
    fn fits_dyn(&self, len: usize) -> bool;
}

impl<P: PageRead> PageReadDyn for P {
    fn max_offset_dyn(&self) -> u16 {
        self.max_offset()
    }
    fn item_dyn(&self, off: u16) -> Option<&[u8]> {
        self.item(off)
    }
    fn fits_dyn(&self, len: usize) -> bool {
        fits(self, len)
    }
}

/// Append `tuple` to the chain starting at `head` (pages of type `flags`): into the first page
/// with room, else onto a new page linked at the tail. Returns the block and offset that
/// received it.
/// Concurrency: holds one lock at a time except while linking a new page (the tail's exclusive
/// lock, taken first, then the new page's); readers see the new page complete before the link.
pub(crate) fn append_to_chain<R: Relation>(
    rel: &R,
    head: BlockNumber,
    flags: u16,
    tuple: &[u8],
) -> Result<(BlockNumber, u16)> {
    let expect = |f: u16, blk: BlockNumber| -> Result<()> {
        if f != flags {
            return Err(Error::corrupt(
                blk,
                format!("expected page flags {flags:#x}, found {f:#x}"),
            ));
        }
        Ok(())
    };
    let mut blk = head;
    let mut from = head;
    let mut walk = ChainWalk::new(rel, head);
    loop {
        walk.step(rel, blk, from)?;
        let (room, next) = {
            let page = rel.read(blk);
            expect(page.opaque().flags, blk)?;
            (fits(&page, tuple.len()), page.opaque().next)
        };
        if !room && next != INVALID_BLOCK {
            from = blk;
            blk = next;
            continue;
        }
        let mut w = rel.write(blk);
        let o = w.opaque();
        expect(o.flags, blk)?;
        if fits(&w, tuple.len()) {
            let off = w
                .add_item(tuple)
                .ok_or_else(|| Error::corrupt(blk, "page refused an item that fits"))?;
            return Ok((blk, off));
        }
        if o.next != INVALID_BLOCK {
            drop(w);
            from = blk;
            blk = o.next;
            continue;
        }
        let (nb, mut nw) = rel.extend();
        nw.reinit(Opaque::new(flags));
        let Some(off) = nw.add_item(tuple) else {
            return Err(Error::InvalidArgument(
                "tuple does not fit on an empty page".into(),
            ));
        };
        drop(nw); // WAL record 1: the complete new page
        w.set_opaque(Opaque { next: nb, ..o });
        drop(w); // WAL record 2: the link
        return Ok((nb, off));
    }
}

/// The head pages of one list's two chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ListHeads {
    /// Head of the code chain.
    pub code: BlockNumber,
    /// Head of the refinement chain.
    pub refine: BlockNumber,
}

/// Walk the centroid chain: call `on_page` for each page and `f(list, heads, centroid)` for
/// each complete (rotated) centroid, in list order, up to the meta page's list count. Items
/// past that count are a list being added (or one a crash interrupted, see
/// [`crate::insert()`]) and are not read. Validates what it reads.
pub(crate) fn walk_centroids<R: Relation>(
    rel: &R,
    meta: &Meta,
    mut on_page: impl FnMut(BlockNumber),
    mut f: impl FnMut(u32, ListHeads, &[f32]) -> Result<()>,
) -> Result<()> {
    let d = meta.padded_dims as usize;
    let nb = rel.nblocks();
    let mut buf = vec![0f32; d];
    let mut filled = 0usize;
    let mut list = 0u32;
    let mut heads = ListHeads {
        code: INVALID_BLOCK,
        refine: INVALID_BLOCK,
    };
    let mut blk = meta.first_centroid_block;
    let mut from = META_BLOCK;
    let mut steps = 0u32;
    let mut page = PageCopy::default();
    while blk != INVALID_BLOCK && list < meta.nlists {
        check_block(blk, nb, from)?;
        steps += 1;
        if steps > nb {
            return Err(Error::corrupt(blk, "cycle in the centroid chain"));
        }
        page.load(rel, blk);
        on_page(blk);
        if page.opaque().flags != PAGE_CENTROID {
            return Err(Error::corrupt(
                blk,
                format!(
                    "expected a centroid page, flags are {:#x}",
                    page.opaque().flags
                ),
            ));
        }
        for i in 0..page.len() {
            if list >= meta.nlists {
                break;
            }
            let bytes = page
                .item(i)
                .ok_or_else(|| Error::corrupt(blk, format!("centroid item {} unused", i + 1)))?;
            let ch = CentroidChunk::decode(bytes).map_err(|e| Error::corrupt(blk, e.0))?;
            if ch.list != list || ch.start as usize != filled {
                return Err(Error::corrupt(
                    blk,
                    format!(
                        "centroid chunk out of order: list {} start {}, expected list {list} start {filled}",
                        ch.list, ch.start
                    ),
                ));
            }
            if filled == 0 {
                check_block(ch.head, nb, blk)?;
                let refine = if list < meta.built_lists() {
                    if ch.refine_head != 0 {
                        return Err(Error::corrupt(
                            blk,
                            format!("built list {list} names a refinement head"),
                        ));
                    }
                    meta.refine_head(ch.head).ok_or_else(|| {
                        Error::corrupt(
                            blk,
                            format!("list {list} has a head that is no list head block"),
                        )
                    })?
                } else {
                    check_block(ch.refine_head, nb, blk)?;
                    ch.refine_head
                };
                heads = ListHeads {
                    code: ch.head,
                    refine,
                };
            } else if ch.head != heads.code
                || (list >= meta.built_lists() && ch.refine_head != heads.refine)
            {
                return Err(Error::corrupt(
                    blk,
                    "centroid chunks disagree on the list head",
                ));
            }
            if filled + ch.len() > d {
                return Err(Error::corrupt(blk, "centroid longer than the dimensions"));
            }
            ch.copy_to(&mut buf[filled..filled + ch.len()])
                .map_err(|e| Error::corrupt(blk, e.0))?;
            filled += ch.len();
            if filled == d {
                f(list, heads, &buf)?;
                list += 1;
                filled = 0;
            }
        }
        from = blk;
        blk = page.opaque().next;
    }
    if list != meta.nlists {
        return Err(Error::corrupt(
            meta.first_centroid_block,
            format!(
                "centroid chain holds {list} complete centroids, expected {}",
                meta.nlists
            ),
        ));
    }
    Ok(())
}

/// Add `tid` to the NULL chain whose head is `head`: into the head page, or, when it is full,
/// after moving its items to a new page linked right after it (see [`crate::format`]). Readers
/// that copied the head before the move follow its old link and see every item once; readers
/// after it see the emptied head, then the new page. Two write guards at most (the head, then
/// the new page from `extend`), as an insert that extends a chain holds.
pub(crate) fn push_null<R: Relation>(rel: &R, head: BlockNumber, tid: Tid) -> Result<()> {
    check_block(head, rel.nblocks(), META_BLOCK)?;
    let tuple = encode_null_tuple(tid);
    let mut w = rel.write(head);
    let o = w.opaque();
    if o.flags != PAGE_NULLS {
        return Err(Error::corrupt(
            head,
            format!("expected the NULL chain's head, flags are {:#x}", o.flags),
        ));
    }
    if w.add_item(&tuple).is_some() {
        return Ok(());
    }
    let (nb, mut nw) = rel.extend();
    nw.reinit(Opaque {
        next: o.next,
        flags: PAGE_NULLS,
    });
    for off in 1..=w.max_offset() {
        if let Some(b) = w.item(off) {
            nw.add_item(b).ok_or_else(|| {
                Error::corrupt(nb, "a NULL chain page does not fit on a new page")
            })?;
        }
    }
    drop(nw); // WAL record 1: the complete copy
    w.reinit(Opaque {
        next: nb,
        flags: PAGE_NULLS,
    });
    w.add_item(&tuple)
        .ok_or_else(|| Error::corrupt(head, "an empty page refused a NULL tuple"))?;
    drop(w); // WAL record 2: the emptied head with the new tuple, linked to the copy
    Ok(())
}

/// Every heap tid in the NULL chain, in chain order, calling `on_page` for each page.
pub(crate) fn walk_nulls<R: Relation>(
    rel: &R,
    meta: &Meta,
    mut on_page: impl FnMut(BlockNumber),
) -> Result<Vec<Tid>> {
    let mut tids = Vec::new();
    let mut blk = meta.null_head;
    let mut from = META_BLOCK;
    let mut walk = ChainWalk::new(rel, meta.null_head);
    let mut page = PageCopy::default();
    while blk != INVALID_BLOCK {
        walk.step(rel, blk, from)?;
        page.load(rel, blk);
        on_page(blk);
        if page.opaque().flags != PAGE_NULLS {
            return Err(Error::corrupt(
                blk,
                format!(
                    "expected a NULL chain page, flags are {:#x}",
                    page.opaque().flags
                ),
            ));
        }
        for i in 0..page.len() {
            let b = page
                .item(i)
                .ok_or_else(|| Error::corrupt(blk, format!("item {} is unused", i + 1)))?;
            tids.push(null_tuple_tid(b).map_err(|e| Error::corrupt(blk, e.0))?);
        }
        from = blk;
        blk = page.opaque().next;
    }
    Ok(tids)
}

/// Append centroid `c` of list `list` (heads `code_head`, `refine_head`: 0 for a built list) as
/// chunks after the items of the locked centroid page `w` (block `blk`), continuing on new
/// pages linked after it when it is full. Returns the guard and block of the last page written.
pub(crate) fn append_centroid_chunks<'a, R: Relation>(
    rel: &'a R,
    mut w: R::Write<'a>,
    mut blk: BlockNumber,
    list: u32,
    code_head: BlockNumber,
    refine_head: BlockNumber,
    c: &[f32],
) -> Result<(R::Write<'a>, BlockNumber)> {
    let d = c.len();
    let mut start = 0;
    while start < d {
        let n = centroid_chunk_capacity(w.free_space()).min(d - start);
        if n < (d - start).min(64) {
            let (nb, mut nw) = rel.extend();
            nw.reinit(Opaque::new(PAGE_CENTROID));
            let o = w.opaque();
            w.set_opaque(Opaque { next: nb, ..o });
            drop(w);
            w = nw;
            blk = nb;
            continue;
        }
        let item = encode_centroid_chunk(
            list,
            code_head,
            refine_head,
            start as u32,
            &c[start..start + n],
        );
        w.add_item(&item)
            .ok_or_else(|| Error::corrupt(blk, "centroid chunk does not fit"))?;
        start += n;
    }
    Ok((w, blk))
}
