//! An in-memory, thread-safe [`Relation`] for tests, emulating Postgres page free-space
//! accounting (8192-byte pages, 24-byte header, 4-byte line pointers, MAXALIGN 8 item sizes,
//! 16-byte special area).
//!
//! Each page sits behind its own `RwLock`. A write guard works on a copy of the page and
//! publishes it when dropped (like a GenericXLog record); if the thread is panicking the copy is
//! discarded (the record is aborted). Page reads, writes and extensions are counted
//! ([`MemoryRelation::io_stats`]), and every committed write can be journaled
//! ([`MemoryRelation::start_journal`]) so tests can rebuild the relation as it would be after a
//! crash between any two WAL records.

use super::{maxalign, Opaque, PageRead, PageWrite, Relation, BLCKSZ, ITEM_ID_SIZE};
use super::{PAGE_HEADER_SIZE, SPECIAL_SIZE};
use crate::BlockNumber;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The contents of one in-memory page.
#[derive(Clone, Debug, PartialEq)]
pub struct MemPage {
    opaque: Opaque,
    data: Vec<u8>,
    /// (start, len) of each item in `data`, in offset order.
    items: Vec<(u32, u32)>,
    /// Sum of the MAXALIGNed item sizes.
    used: usize,
}

impl Default for MemPage {
    fn default() -> Self {
        MemPage {
            opaque: Opaque::new(0),
            data: Vec::new(),
            items: Vec::new(),
            used: 0,
        }
    }
}

impl PageRead for MemPage {
    fn opaque(&self) -> Opaque {
        self.opaque
    }

    fn max_offset(&self) -> u16 {
        self.items.len() as u16
    }

    fn item(&self, off: u16) -> Option<&[u8]> {
        let idx = (off as usize).checked_sub(1)?;
        let &(start, len) = self.items.get(idx)?;
        Some(&self.data[start as usize..(start + len) as usize])
    }

    fn free_space(&self) -> usize {
        let lower = PAGE_HEADER_SIZE + ITEM_ID_SIZE * self.items.len();
        let upper = BLCKSZ - SPECIAL_SIZE - self.used;
        upper.saturating_sub(lower).saturating_sub(ITEM_ID_SIZE)
    }
}

impl PageWrite for MemPage {
    fn set_opaque(&mut self, o: Opaque) {
        self.opaque = o;
    }

    fn add_item(&mut self, data: &[u8]) -> Option<u16> {
        if data.is_empty() || maxalign(data.len()) > self.free_space() {
            return None;
        }
        let start = self.data.len() as u32;
        self.data.extend_from_slice(data);
        self.items.push((start, data.len() as u32));
        self.used += maxalign(data.len());
        Some(self.items.len() as u16)
    }

    fn item_mut(&mut self, off: u16) -> Option<&mut [u8]> {
        let idx = (off as usize).checked_sub(1)?;
        let &(start, len) = self.items.get(idx)?;
        Some(&mut self.data[start as usize..(start + len) as usize])
    }

    fn delete_items(&mut self, offs: &[u16]) {
        let mut dead = vec![false; self.items.len()];
        for &off in offs {
            assert!(
                off >= 1 && (off as usize) <= self.items.len(),
                "delete_items: offset {off} out of range"
            );
            dead[off as usize - 1] = true;
        }
        let mut data = Vec::with_capacity(self.data.len());
        let mut items = Vec::with_capacity(self.items.len());
        let mut used = 0;
        for (i, &(start, len)) in self.items.iter().enumerate() {
            if dead[i] {
                continue;
            }
            items.push((data.len() as u32, len));
            data.extend_from_slice(&self.data[start as usize..(start + len) as usize]);
            used += maxalign(len as usize);
        }
        self.data = data;
        self.items = items;
        self.used = used;
    }

    fn reinit(&mut self, o: Opaque) {
        *self = MemPage {
            opaque: o,
            ..MemPage::default()
        };
    }
}

/// Counters of page accesses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    /// `read()` calls.
    pub reads: u64,
    /// `write()` calls.
    pub writes: u64,
    /// `extend()` calls.
    pub extends: u64,
    /// `nblocks()` calls (a system call in Postgres).
    pub size_queries: u64,
}

const SEG0: u64 = 64;
const NSEGS: usize = 27;

/// Segment and index of a block: segment `s` holds `64 << s` pages.
fn locate(blk: BlockNumber) -> (usize, usize) {
    let b = blk as u64 + SEG0;
    let seg = (63 - b.leading_zeros()) as usize - 6;
    (seg, (b - (SEG0 << seg)) as usize)
}

/// An in-memory index relation (thread safe).
pub struct MemoryRelation {
    segments: Vec<OnceLock<Box<[RwLock<MemPage>]>>>,
    nblocks: AtomicU32,
    extend_lock: Mutex<()>,
    reads: AtomicU64,
    writes: AtomicU64,
    extends: AtomicU64,
    size_queries: AtomicU64,
    journal: Mutex<Option<Vec<(BlockNumber, MemPage)>>>,
}

impl Default for MemoryRelation {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryRelation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRelation")
            .field("nblocks", &self.nblocks.load(Ordering::Acquire))
            .finish()
    }
}

/// A share-locked in-memory page.
pub struct MemRead<'a> {
    page: RwLockReadGuard<'a, MemPage>,
}

/// An exclusively locked in-memory page; changes are published when dropped.
pub struct MemWrite<'a> {
    rel: &'a MemoryRelation,
    blk: BlockNumber,
    lock: RwLockWriteGuard<'a, MemPage>,
    work: MemPage,
}

impl PageRead for MemRead<'_> {
    fn opaque(&self) -> Opaque {
        self.page.opaque()
    }
    fn max_offset(&self) -> u16 {
        self.page.max_offset()
    }
    fn item(&self, off: u16) -> Option<&[u8]> {
        self.page.item(off)
    }
    fn free_space(&self) -> usize {
        self.page.free_space()
    }
}

impl PageRead for MemWrite<'_> {
    fn opaque(&self) -> Opaque {
        self.work.opaque()
    }
    fn max_offset(&self) -> u16 {
        self.work.max_offset()
    }
    fn item(&self, off: u16) -> Option<&[u8]> {
        self.work.item(off)
    }
    fn free_space(&self) -> usize {
        self.work.free_space()
    }
}

impl PageWrite for MemWrite<'_> {
    fn set_opaque(&mut self, o: Opaque) {
        self.work.set_opaque(o)
    }
    fn add_item(&mut self, data: &[u8]) -> Option<u16> {
        self.work.add_item(data)
    }
    fn item_mut(&mut self, off: u16) -> Option<&mut [u8]> {
        self.work.item_mut(off)
    }
    fn delete_items(&mut self, offs: &[u16]) {
        self.work.delete_items(offs)
    }
    fn reinit(&mut self, o: Opaque) {
        self.work.reinit(o)
    }
}

impl Drop for MemWrite<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return; // abort the "WAL record": the page keeps its old contents
        }
        let page = std::mem::take(&mut self.work);
        if let Some(journal) = self
            .rel
            .journal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            journal.push((self.blk, page.clone()));
        }
        *self.lock = page;
    }
}

impl MemoryRelation {
    /// An empty relation (0 blocks).
    pub fn new() -> MemoryRelation {
        MemoryRelation {
            segments: (0..NSEGS).map(|_| OnceLock::new()).collect(),
            nblocks: AtomicU32::new(0),
            extend_lock: Mutex::new(()),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            extends: AtomicU64::new(0),
            size_queries: AtomicU64::new(0),
            journal: Mutex::new(None),
        }
    }

    fn slot(&self, blk: BlockNumber) -> &RwLock<MemPage> {
        assert!(
            blk < self.nblocks.load(Ordering::Acquire),
            "block {blk} is beyond the end of the relation ({} blocks)",
            self.nblocks.load(Ordering::Acquire)
        );
        let (s, i) = locate(blk);
        &self.segments[s]
            .get()
            .expect("segment of an existing block")[i]
    }

    /// Page access counters since creation or the last [`MemoryRelation::reset_io_stats`].
    pub fn io_stats(&self) -> IoStats {
        IoStats {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            extends: self.extends.load(Ordering::Relaxed),
            size_queries: self.size_queries.load(Ordering::Relaxed),
        }
    }

    /// Zero the access counters.
    pub fn reset_io_stats(&self) {
        self.reads.store(0, Ordering::Relaxed);
        self.writes.store(0, Ordering::Relaxed);
        self.extends.store(0, Ordering::Relaxed);
        self.size_queries.store(0, Ordering::Relaxed);
    }

    /// A copy of block `blk` (must exist); takes a share lock and counts nothing.
    pub fn page_image(&self, blk: BlockNumber) -> MemPage {
        self.slot(blk)
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A deep copy of the whole relation (counters and journal are not copied).
    pub fn deep_clone(&self) -> MemoryRelation {
        let copy = MemoryRelation::new();
        for blk in 0..self.nblocks() {
            copy.set_page(blk, self.page_image(blk));
        }
        copy
    }

    /// Overwrite block `blk` with `page`, first adding empty (flags 0) pages up to it if the
    /// relation is shorter. Used to replay a journal and to inject corruption in tests.
    pub fn set_page(&self, blk: BlockNumber, page: MemPage) {
        while self.nblocks() <= blk {
            let (_, mut w) = self.extend();
            w.reinit(Opaque::new(0));
        }
        *self
            .slot(blk)
            .write()
            .unwrap_or_else(PoisonError::into_inner) = page;
    }

    /// Start recording every committed write guard (block and resulting page image).
    pub fn start_journal(&self) {
        *self.journal.lock().unwrap_or_else(PoisonError::into_inner) = Some(Vec::new());
    }

    /// Stop recording and return the journal (empty if none was started).
    pub fn take_journal(&self) -> Vec<(BlockNumber, MemPage)> {
        self.journal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_default()
    }
}

impl Relation for MemoryRelation {
    type Read<'a> = MemRead<'a>;
    type Write<'a> = MemWrite<'a>;

    fn read(&self, blk: BlockNumber) -> MemRead<'_> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        MemRead {
            page: self
                .slot(blk)
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        }
    }

    fn write(&self, blk: BlockNumber) -> MemWrite<'_> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let lock = self
            .slot(blk)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let work = lock.clone();
        MemWrite {
            rel: self,
            blk,
            lock,
            work,
        }
    }

    fn extend(&self) -> (BlockNumber, MemWrite<'_>) {
        self.extends.fetch_add(1, Ordering::Relaxed);
        let _extension = self
            .extend_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let blk = self.nblocks.load(Ordering::Acquire);
        assert!(blk < crate::INVALID_BLOCK - 1, "relation is full");
        let (s, i) = locate(blk);
        let seg = self.segments[s].get_or_init(|| {
            (0..(SEG0 << s))
                .map(|_| RwLock::new(MemPage::default()))
                .collect()
        });
        let mut lock = seg[i].write().unwrap_or_else(PoisonError::into_inner);
        *lock = MemPage::default();
        self.nblocks.store(blk + 1, Ordering::Release);
        let work = lock.clone();
        (
            blk,
            MemWrite {
                rel: self,
                blk,
                lock,
                work,
            },
        )
    }

    fn nblocks(&self) -> BlockNumber {
        self.size_queries.fetch_add(1, Ordering::Relaxed);
        self.nblocks.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::{fits, EMPTY_PAGE_FREE_SPACE, MAX_ITEM_SIZE};
    use proptest::prelude::*;

    #[test]
    fn locate_segments() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(63), (0, 63));
        assert_eq!(locate(64), (1, 0));
        assert_eq!(locate(191), (1, 127));
        assert_eq!(locate(192), (2, 0));
    }

    #[test]
    fn free_space_matches_postgres() {
        let rel = MemoryRelation::new();
        let (blk, mut w) = rel.extend();
        assert_eq!(blk, 0);
        assert_eq!(w.free_space(), EMPTY_PAGE_FREE_SPACE);
        assert_eq!(w.free_space(), 8148);
        // A 116-byte item costs 120 + 4 bytes.
        w.add_item(&[1u8; 116]).unwrap();
        assert_eq!(w.free_space(), 8148 - 124);
        let mut n = 1;
        while fits(&w, 116) {
            w.add_item(&[2u8; 116]).unwrap();
            n += 1;
        }
        // (8192 - 24 - 16) / 124 = 65 items
        assert_eq!(n, 65);
        assert!(w.add_item(&[3u8; 116]).is_none());
        drop(w);
        let (_, mut w) = rel.extend();
        assert!(w.add_item(&vec![0u8; MAX_ITEM_SIZE]).is_some());
        assert_eq!(w.free_space(), 0);
        let (_, mut w2) = rel.extend();
        assert!(w2.add_item(&vec![0u8; MAX_ITEM_SIZE + 1]).is_none());
        drop(w2);
        drop(w);
        assert_eq!(rel.nblocks(), 3);
        assert_eq!(rel.io_stats().extends, 3);
    }

    #[test]
    fn delete_compacts() {
        let rel = MemoryRelation::new();
        let (_, mut w) = rel.extend();
        for i in 0..10u8 {
            assert_eq!(w.add_item(&[i; 10]), Some(i as u16 + 1));
        }
        let before = w.free_space();
        w.delete_items(&[2, 5, 10]);
        assert_eq!(w.max_offset(), 7);
        let rest: Vec<u8> = (1..=7).map(|o| w.item(o).unwrap()[0]).collect();
        assert_eq!(rest, vec![0, 2, 3, 5, 6, 7, 8]);
        assert_eq!(w.free_space(), before + 3 * (16 + 4));
        assert!(w.item(8).is_none());
        assert!(w.item(0).is_none());
    }

    #[test]
    fn write_guard_commits_on_drop_and_aborts_on_panic() {
        let rel = MemoryRelation::new();
        drop(rel.extend());
        {
            let mut w = rel.write(0);
            w.add_item(b"hello").unwrap();
            // not visible to others until dropped: the page image is unchanged
        }
        assert_eq!(rel.page_image(0).item(1), Some(&b"hello"[..]));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut w = rel.write(0);
            w.add_item(b"lost").unwrap();
            panic!("boom");
        }));
        assert!(r.is_err());
        assert_eq!(rel.page_image(0).max_offset(), 1);
        assert_eq!(rel.read(0).item(1), Some(&b"hello"[..]));
    }

    #[test]
    fn journal_records_commits() {
        let rel = MemoryRelation::new();
        rel.start_journal();
        let (_, mut w) = rel.extend();
        w.add_item(b"a").unwrap();
        drop(w);
        rel.write(0).add_item(b"b").unwrap();
        let j = rel.take_journal();
        assert_eq!(j.len(), 2);
        assert_eq!(j[0].1.max_offset(), 1);
        assert_eq!(j[1].1.max_offset(), 2);
        let replay = MemoryRelation::new();
        replay.set_page(j[0].0, j[0].1.clone());
        assert_eq!(replay.nblocks(), 1);
        assert_eq!(replay.read(0).item(1), Some(&b"a"[..]));
    }

    proptest! {
        #[test]
        fn random_add_delete_keeps_items(ops in proptest::collection::vec((any::<bool>(), 1usize..600, any::<u16>()), 1..200)) {
            let rel = MemoryRelation::new();
            let (_, mut w) = rel.extend();
            let mut model: Vec<Vec<u8>> = Vec::new();
            let mut counter = 0u8;
            for (add, len, pick) in ops {
                if add || model.is_empty() {
                    counter = counter.wrapping_add(1);
                    let data: Vec<u8> = (0..len).map(|i| counter.wrapping_add(i as u8)).collect();
                    let fits_before = fits(&w, len);
                    match w.add_item(&data) {
                        Some(off) => {
                            prop_assert!(fits_before);
                            model.push(data);
                            prop_assert_eq!(off as usize, model.len());
                        }
                        None => prop_assert!(!fits_before),
                    }
                } else {
                    let n = 1 + (pick as usize % 3).min(model.len() - 1);
                    let mut offs: Vec<u16> = (0..n).map(|k| ((pick as usize + k * 7) % model.len()) as u16 + 1).collect();
                    offs.sort_unstable();
                    offs.dedup();
                    for &o in offs.iter().rev() {
                        model.remove(o as usize - 1);
                    }
                    w.delete_items(&offs);
                }
                prop_assert_eq!(w.max_offset() as usize, model.len());
                for (i, d) in model.iter().enumerate() {
                    prop_assert_eq!(w.item(i as u16 + 1), Some(&d[..]));
                }
                let used: usize = model.iter().map(|d| maxalign(d.len()) + ITEM_ID_SIZE).sum();
                prop_assert_eq!(w.free_space(), EMPTY_PAGE_FREE_SPACE.saturating_sub(used));
            }
        }
    }
}
