//! `rsclip-index`'s page abstraction over Postgres shared buffers.
//!
//! A read guard is a pinned, share-locked buffer. A write guard is a pinned, exclusively locked
//! buffer registered with GenericXLog: its page pointer is GenericXLog's working copy, and the
//! guard's drop either commits the change as one WAL record (`GenericXLogFinish`, which also
//! marks the buffer dirty, and writes nothing when nothing changed) or, when the thread is
//! unwinding from a panic or an ERROR, discards it (`GenericXLogAbort`): the shared page is then
//! exactly as before the guard was taken. Locks are released in the same drop, before the error
//! reaches Postgres' own cleanup. GenericXLog also covers unlogged and temporary indexes (it then
//! only dirties the buffer) and the init fork of unlogged indexes.
//!
//! Page layout: a standard Postgres page (`PageInit`, line pointers, `PageAddItemExtended`,
//! `PageIndexMultiDelete`) whose 16-byte special area holds the next block of the chain, the
//! page-type flags and a page id that tools like pg_filedump use to recognise rsclip pages.

use pgrx::pg_sys;
use rsclip_index::page::{Opaque, PageRead, PageWrite, Relation, SPECIAL_SIZE};
use rsclip_index::BlockNumber;

/// Identifies rsclip index pages in the last two bytes of the special area.
pub const PAGE_ID: u16 = 0xFF8C;

#[repr(C)]
#[derive(Clone, Copy)]
struct Special {
    next: u32,
    flags: u16,
    page_id: u16,
    reserved: u64,
}

const _: () = assert!(std::mem::size_of::<Special>() == SPECIAL_SIZE);

/// `SizeOfPageHeaderData`: where the line pointer array starts.
const PAGE_HEADER_SIZE: usize = std::mem::offset_of!(pg_sys::PageHeaderData, pd_linp);

/// The header fields a reader needs, read in Rust. The `PageGet*` helpers are static inline
/// functions in C that pgrx reaches through a guarded shim (a `sigsetjmp` per call); called per
/// item they were a fifth of an index scan's time.
///
/// # Safety
/// `page` must point to a whole page that stays valid and locked for the call.
#[inline]
unsafe fn header(page: pg_sys::Page) -> (usize, usize) {
    // SAFETY: (caller) a valid page; PageHeaderData is its first bytes.
    let h = unsafe { &*(page as *const pg_sys::PageHeaderData) };
    (h.pd_lower as usize, h.pd_special as usize)
}

/// Number of line pointers (`PageGetMaxOffsetNumber`), 0 for a page whose `pd_lower` is not past
/// the header (a new, all-zero page).
///
/// # Safety
/// As for [`header`].
#[inline]
unsafe fn max_offset(page: pg_sys::Page) -> u16 {
    // SAFETY: (caller).
    let (lower, _) = unsafe { header(page) };
    (lower
        .min(pg_sys::BLCKSZ as usize)
        .saturating_sub(PAGE_HEADER_SIZE)
        / std::mem::size_of::<pg_sys::ItemIdData>()) as u16
}

/// Reads the special area.
///
/// # Safety
/// As for [`header`].
unsafe fn special(page: pg_sys::Page) -> Special {
    // SAFETY: (caller) a valid page. The special area is read only when it is exactly
    // SPECIAL_SIZE bytes at the end of the page, as PageInit made ours. An uninitialized
    // (all-zero) page has pd_special = 0: report it as flags 0, the trait's "never
    // initialized" value, instead of reading the header as a special area.
    unsafe {
        let (_, sp) = header(page);
        if sp != pg_sys::BLCKSZ as usize - SPECIAL_SIZE {
            return Special {
                next: u32::MAX,
                flags: 0,
                page_id: 0,
                reserved: 0,
            };
        }
        std::ptr::read_unaligned((page as *const u8).add(sp) as *const Special)
    }
}

/// Start and length of item `off` of `page`, if it is a used line pointer inside the page.
///
/// # Safety
/// As for [`header`].
#[inline]
unsafe fn item_range(page: pg_sys::Page, off: u16) -> Option<(usize, usize)> {
    // SAFETY: (caller) a valid locked page. `off` is checked against the line pointer count
    // (itself bounded by the page size) before its pointer is read, and the pointer is checked
    // against the page bounds before anything is sliced, so a corrupt pointer yields None
    // rather than a wild slice.
    unsafe {
        if off == 0 || off > max_offset(page) {
            return None;
        }
        let id = &*((page as *const u8)
            .add(PAGE_HEADER_SIZE + (off as usize - 1) * std::mem::size_of::<pg_sys::ItemIdData>())
            as *const pg_sys::ItemIdData);
        if id.lp_flags() != pg_sys::LP_NORMAL {
            return None;
        }
        let (start, len) = (id.lp_off() as usize, id.lp_len() as usize);
        let (_, special) = header(page);
        if start < PAGE_HEADER_SIZE || start + len > special.min(pg_sys::BLCKSZ as usize) {
            return None;
        }
        Some((start, len))
    }
}

/// Item `off` of `page`, read-only.
///
/// # Safety
/// As for [`special`]; the slice borrows the page for `'a`, which the caller bounds by the
/// guard's lifetime.
unsafe fn item<'a>(page: pg_sys::Page, off: u16) -> Option<&'a [u8]> {
    // SAFETY: item_range checked the bounds.
    unsafe {
        item_range(page, off)
            .map(|(start, len)| std::slice::from_raw_parts((page as *const u8).add(start), len))
    }
}

/// Item `off` of a page we may modify (GenericXLog's working copy).
///
/// # Safety
/// As for [`item`], and the page must be exclusively ours.
unsafe fn item_mut<'a>(page: pg_sys::Page, off: u16) -> Option<&'a mut [u8]> {
    // SAFETY: item_range checked the bounds; the caller owns the page.
    unsafe {
        item_range(page, off)
            .map(|(start, len)| std::slice::from_raw_parts_mut((page as *mut u8).add(start), len))
    }
}

/// A share-locked buffer.
pub struct ReadGuard {
    buffer: pg_sys::Buffer,
    page: pg_sys::Page,
}

/// When a Postgres ERROR unwinds through a guard, `errfinish` has already reset the interrupt
/// holdoff count that releasing an LWLock decrements; hold interrupts again first, as
/// `LWLockReleaseAll` does (an assert-enabled server aborts otherwise). Postgres' error cleanup
/// resets the count afterwards.
fn hold_interrupts_if_unwinding() {
    if std::thread::panicking() {
        // SAFETY: a plain process-global counter, only touched by this backend's thread.
        unsafe {
            if pg_sys::InterruptHoldoffCount == 0 {
                pg_sys::InterruptHoldoffCount = 1;
            }
        }
    }
}

impl ReadGuard {
    /// The page's LSN: it changes whenever the page is rewritten through WAL.
    pub fn lsn(&self) -> u64 {
        // SAFETY: the page is pinned and share-locked for the guard's lifetime; pd_lsn is only
        // written under an exclusive lock.
        unsafe {
            let header = self.page as *const pg_sys::PageHeaderData;
            ((*header).pd_lsn.xlogid as u64) << 32 | (*header).pd_lsn.xrecoff as u64
        }
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        hold_interrupts_if_unwinding();
        // SAFETY: we hold a pin and a share lock on this buffer, taken in `read`.
        unsafe { pg_sys::UnlockReleaseBuffer(self.buffer) }
    }
}

/// Both guards expose a locked page (shared, or GenericXLog's working copy); reading it is the
/// same for both.
macro_rules! impl_page_read {
    ($guard:ty) => {
        impl PageRead for $guard {
            fn opaque(&self) -> Opaque {
                // SAFETY: the page is pinned and locked while the guard lives.
                let s = unsafe { special(self.page) };
                Opaque {
                    next: s.next,
                    flags: s.flags,
                }
            }
            fn max_offset(&self) -> u16 {
                // SAFETY: as above.
                unsafe { max_offset(self.page) }
            }
            fn item(&self, off: u16) -> Option<&[u8]> {
                // SAFETY: as above; the slice borrows `self`.
                unsafe { item(self.page, off) }
            }
            fn free_space(&self) -> usize {
                // SAFETY: as above.
                unsafe { pg_sys::PageGetFreeSpace(self.page) }
            }
        }
    };
}

impl_page_read!(ReadGuard);

/// An exclusively locked buffer with its GenericXLog record in progress.
pub struct WriteGuard {
    buffer: pg_sys::Buffer,
    state: *mut pg_sys::GenericXLogState,
    page: pg_sys::Page,
    changed: bool,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        // SAFETY: `state` was started for this buffer in `write`/`extend` and not yet finished;
        // we hold the pin and the exclusive lock. Abort only frees the working copy; Finish
        // copies it to the shared page and logs it inside a critical section.
        unsafe {
            if self.changed && !std::thread::panicking() {
                pg_sys::GenericXLogFinish(self.state);
            } else {
                pg_sys::GenericXLogAbort(self.state);
            }
            hold_interrupts_if_unwinding();
            pg_sys::UnlockReleaseBuffer(self.buffer);
        }
    }
}

impl_page_read!(WriteGuard);

impl PageWrite for WriteGuard {
    fn set_opaque(&mut self, o: Opaque) {
        self.changed = true;
        // SAFETY: the working copy is ours to modify; a page with the wrong special size (never
        // initialized) is initialized first so the special area exists.
        unsafe {
            if pgrx::pg_sys::PageGetSpecialSize(self.page) as usize != SPECIAL_SIZE {
                pg_sys::PageInit(self.page, pg_sys::BLCKSZ as usize, SPECIAL_SIZE);
            }
            let s = Special {
                next: o.next,
                flags: o.flags,
                page_id: PAGE_ID,
                reserved: 0,
            };
            std::ptr::write_unaligned(
                pgrx::pg_sys::PageGetSpecialPointer(self.page) as *mut Special,
                s,
            );
        }
    }
    fn add_item(&mut self, data: &[u8]) -> Option<u16> {
        if !rsclip_index::page::fits(self, data.len()) {
            return None;
        }
        self.changed = true;
        // SAFETY: PageAddItemExtended copies `data.len()` bytes from `data` onto the working
        // copy after checking the space itself; InvalidOffsetNumber means "append".
        let off = unsafe {
            pg_sys::PageAddItemExtended(
                self.page,
                data.as_ptr() as pg_sys::Item,
                data.len(),
                pg_sys::InvalidOffsetNumber,
                0,
            )
        };
        (off != pg_sys::InvalidOffsetNumber).then_some(off)
    }
    fn item_mut(&mut self, off: u16) -> Option<&mut [u8]> {
        self.changed = true;
        // SAFETY: the working copy is ours; the slice borrows `self` mutably.
        unsafe { item_mut(self.page, off) }
    }
    fn delete_items(&mut self, offs: &[u16]) {
        if offs.is_empty() {
            return;
        }
        self.changed = true;
        let mut sorted = offs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        // SAFETY: PageIndexMultiDelete wants valid offsets in ascending order, which the trait's
        // contract and the sort above provide; it compacts the working copy in place.
        unsafe { pg_sys::PageIndexMultiDelete(self.page, sorted.as_mut_ptr(), sorted.len() as i32) }
    }
    fn reinit(&mut self, o: Opaque) {
        // SAFETY: re-initializes the working copy.
        unsafe { pg_sys::PageInit(self.page, pg_sys::BLCKSZ as usize, SPECIAL_SIZE) };
        self.set_opaque(o);
    }
}

/// One fork of an open index relation.
pub struct IndexRelation {
    rel: pg_sys::Relation,
    fork: pg_sys::ForkNumber::Type,
    /// A buffer access strategy (VACUUM's ring) for reading existing pages, or null.
    strategy: pg_sys::BufferAccessStrategy,
    /// Share-locked reads try the buffer this backend last found the page in first
    /// ([`RecentBuffers`]).
    recent: bool,
}

/// The buffer each index page was last found in by this backend, per relation file and fork.
///
/// A scan reads one to three hundred pages, and `ReadBufferExtended` finds each through the
/// shared buffer-mapping hash table: on the real 100k set that lookup (its cache misses in a
/// table of every shared buffer) was about a sixth of a query's server time. `ReadRecentBuffer`
/// pins a remembered buffer after checking, under the buffer header lock, that it still holds
/// the same page, with no lookup; when the page was evicted or the relation rewritten it says
/// no and the normal read follows. A stale entry can never be used, so entries are only hints:
/// they are never invalidated, just replaced.
struct RecentBuffers {
    files: Vec<(FileKey, Vec<pg_sys::Buffer>)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct FileKey {
    spc: u32,
    db: u32,
    rel: u32,
    fork: pg_sys::ForkNumber::Type,
}

/// Relation files remembered (a backend scanning more indexes starts over), and pages per file.
const RECENT_FILES: usize = 16;
const RECENT_BLOCKS: u32 = 1 << 20;

thread_local! {
    static RECENT: std::cell::RefCell<RecentBuffers> =
        const { std::cell::RefCell::new(RecentBuffers { files: Vec::new() }) };
}

impl RecentBuffers {
    fn get(&self, key: FileKey, blk: BlockNumber) -> pg_sys::Buffer {
        self.files
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.get(blk as usize).copied())
            .unwrap_or(pg_sys::InvalidBuffer as pg_sys::Buffer)
    }

    fn set(&mut self, key: FileKey, blk: BlockNumber, buffer: pg_sys::Buffer) {
        if blk >= RECENT_BLOCKS {
            return;
        }
        let at = match self.files.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                if self.files.len() >= RECENT_FILES {
                    self.files.clear();
                }
                self.files.push((key, Vec::new()));
                self.files.len() - 1
            }
        };
        let v = &mut self.files[at].1;
        if v.len() <= blk as usize {
            v.resize(blk as usize + 1, pg_sys::InvalidBuffer as pg_sys::Buffer);
        }
        v[blk as usize] = buffer;
    }
}

impl IndexRelation {
    /// # Safety
    /// `rel` must be an open index relation, locked appropriately by the caller, for as long as
    /// this value and its guards live.
    pub unsafe fn new(rel: pg_sys::Relation, fork: pg_sys::ForkNumber::Type) -> Self {
        IndexRelation {
            rel,
            fork,
            strategy: std::ptr::null_mut(),
            recent: false,
        }
    }

    /// [`IndexRelation::new`] for a scan: share-locked reads try the buffer the page was last
    /// found in first ([`RecentBuffers`]).
    ///
    /// # Safety
    /// As for [`IndexRelation::new`].
    pub unsafe fn for_scan(rel: pg_sys::Relation, fork: pg_sys::ForkNumber::Type) -> Self {
        IndexRelation {
            recent: true,
            // SAFETY: (caller) as for `new`.
            ..unsafe { IndexRelation::new(rel, fork) }
        }
    }

    /// The relation's physical file, as ReadRecentBuffer takes it.
    #[cfg(feature = "pg15")]
    fn locator(&self) -> pg_sys::RelFileNode {
        // SAFETY: (new) an open relation's cached physical locator.
        unsafe { (*self.rel).rd_node }
    }
    #[cfg(not(feature = "pg15"))]
    fn locator(&self) -> pg_sys::RelFileLocator {
        // SAFETY: (new) an open relation's cached physical locator.
        unsafe { (*self.rel).rd_locator }
    }

    fn file_key(&self) -> FileKey {
        let l = self.locator();
        #[cfg(feature = "pg15")]
        let (spc, db, rel) = (l.spcNode.to_u32(), l.dbNode.to_u32(), l.relNode.to_u32());
        #[cfg(not(feature = "pg15"))]
        let (spc, db, rel) = (l.spcOid.to_u32(), l.dbOid.to_u32(), l.relNumber.to_u32());
        FileKey {
            spc,
            db,
            rel,
            fork: self.fork,
        }
    }

    /// A pinned buffer of `blk`: the remembered one when it still holds the page, else read.
    fn recent_buffer(&self, blk: BlockNumber) -> pg_sys::Buffer {
        let key = self.file_key();
        let hint = RECENT.with_borrow(|r| r.get(key, blk));
        if hint != pg_sys::InvalidBuffer as pg_sys::Buffer {
            // SAFETY: an open relation; `hint` is a buffer number this backend got from
            // ReadBufferExtended (valid for the life of the process: the buffer pools never
            // shrink). ReadRecentBuffer pins it only if its tag is still this page, checked
            // under the buffer header lock, and otherwise leaves it alone.
            let hit = unsafe { pg_sys::ReadRecentBuffer(self.locator(), self.fork, blk, hint) };
            if hit {
                self.count_hit();
                return hint;
            }
        }
        let buffer = self.buffer(blk);
        RECENT.with_borrow_mut(|r| r.set(key, blk, buffer));
        buffer
    }

    /// What ReadBufferExtended counts for `pg_statio_*_indexes` on a hit (ReadRecentBuffer,
    /// which has no relation, counts only the backend's buffer usage).
    fn count_hit(&self) {
        // SAFETY: an open relation; `pgstat_info` is null or its live stats entry (set when
        // the relation is first read with statistics on, as the meta page read did).
        unsafe {
            let info = (*self.rel).pgstat_info;
            if !info.is_null() {
                #[cfg(feature = "pg15")]
                {
                    (*info).t_counts.t_blocks_fetched += 1;
                    (*info).t_counts.t_blocks_hit += 1;
                }
                #[cfg(not(feature = "pg15"))]
                {
                    (*info).counts.blocks_fetched += 1;
                    (*info).counts.blocks_hit += 1;
                }
            }
        }
    }

    /// Reads existing pages through `strategy` (e.g. VACUUM's ring buffer, so a vacuum of a big
    /// index does not evict everything else from shared buffers).
    ///
    /// # Safety
    /// As for [`IndexRelation::new`]; `strategy` is null or lives as long as this value.
    pub unsafe fn with_strategy(
        rel: pg_sys::Relation,
        fork: pg_sys::ForkNumber::Type,
        strategy: pg_sys::BufferAccessStrategy,
    ) -> Self {
        IndexRelation {
            rel,
            fork,
            strategy,
            recent: false,
        }
    }

    fn buffer(&self, blk: BlockNumber) -> pg_sys::Buffer {
        // SAFETY: (new) an open relation; reading a block past the end raises an ERROR.
        unsafe {
            pg_sys::ReadBufferExtended(
                self.rel,
                self.fork,
                blk,
                pg_sys::ReadBufferMode::RBM_NORMAL,
                self.strategy,
            )
        }
    }

    fn start_record(&self, buffer: pg_sys::Buffer, full_image: bool) -> WriteGuard {
        // SAFETY: the buffer is pinned and exclusively locked by the caller.
        unsafe {
            let state = pg_sys::GenericXLogStart(self.rel);
            let flags = if full_image {
                pg_sys::GENERIC_XLOG_FULL_IMAGE as i32
            } else {
                0
            };
            let page = pg_sys::GenericXLogRegisterBuffer(state, buffer, flags);
            WriteGuard {
                buffer,
                state,
                page,
                changed: false,
            }
        }
    }
}

impl Relation for IndexRelation {
    type Read<'a> = ReadGuard;
    type Write<'a> = WriteGuard;

    fn read(&self, blk: BlockNumber) -> ReadGuard {
        let buffer = if self.recent {
            self.recent_buffer(blk)
        } else {
            self.buffer(blk)
        };
        // SAFETY: a pinned buffer of this relation.
        unsafe {
            pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_SHARE as i32);
            ReadGuard {
                buffer,
                page: pg_sys::BufferGetPage(buffer),
            }
        }
    }

    fn write(&self, blk: BlockNumber) -> WriteGuard {
        let buffer = self.buffer(blk);
        // SAFETY: a pinned buffer of this relation.
        unsafe { pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_EXCLUSIVE as i32) };
        self.start_record(buffer, false)
    }

    fn extend(&self) -> (BlockNumber, WriteGuard) {
        let buffer = extend_locked(self.rel, self.fork);
        let mut guard = self.start_record(buffer, true);
        guard.reinit(Opaque::new(0));
        // SAFETY: a valid buffer.
        let blk = unsafe { pg_sys::BufferGetBlockNumber(buffer) };
        (blk, guard)
    }

    fn nblocks(&self) -> BlockNumber {
        // SAFETY: an open relation.
        unsafe { pg_sys::RelationGetNumberOfBlocksInFork(self.rel, self.fork) }
    }
}

/// A new, exclusively locked buffer at the end of the fork.
#[cfg(not(feature = "pg15"))]
fn extend_locked(rel: pg_sys::Relation, fork: pg_sys::ForkNumber::Type) -> pg_sys::Buffer {
    // SAFETY: ExtendBufferedRel takes the relation extension lock itself and returns the new
    // buffer pinned and (EB_LOCK_FIRST) exclusively locked.
    unsafe {
        pg_sys::ExtendBufferedRel(
            pg_sys::BufferManagerRelation {
                rel,
                smgr: std::ptr::null_mut(),
                relpersistence: 0,
            },
            fork,
            std::ptr::null_mut(),
            pg_sys::ExtendBufferedFlags::EB_LOCK_FIRST,
        )
    }
}

/// A new, exclusively locked buffer at the end of the fork (PostgreSQL 15: P_NEW under the
/// relation extension lock, so two backends never get the same block).
#[cfg(feature = "pg15")]
fn extend_locked(rel: pg_sys::Relation, fork: pg_sys::ForkNumber::Type) -> pg_sys::Buffer {
    // SAFETY: the documented PostgreSQL 15 idiom: extension lock, ReadBuffer(P_NEW), lock the
    // buffer before releasing the extension lock.
    unsafe {
        pg_sys::LockRelationForExtension(rel, pg_sys::ExclusiveLock as i32);
        let buffer = pg_sys::ReadBufferExtended(
            rel,
            fork,
            pg_sys::InvalidBlockNumber,
            pg_sys::ReadBufferMode::RBM_NORMAL,
            std::ptr::null_mut(),
        );
        pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_EXCLUSIVE as i32);
        pg_sys::UnlockRelationForExtension(rel, pg_sys::ExclusiveLock as i32);
        buffer
    }
}
