//! The page abstraction the algorithms run over.
//!
//! A page is `BLCKSZ` (8192) bytes in Postgres with a slotted layout; the traits hide the layout:
//! a page holds *items* (byte strings addressed by 1-based `u16` offsets) and a small fixed
//! [`Opaque`] struct (the special area). Free-space accounting follows Postgres exactly (see
//! [`PageRead::free_space`] and [`fits`]) so page capacities are the same in tests and in Postgres.
//!
//! Guards: [`Relation::read`] returns a share-locked page, [`Relation::write`] an exclusively
//! locked page whose changes form one atomic WAL record committed when the guard is dropped (and
//! aborted if the thread panics). See the crate documentation for the lock-order and WAL rules
//! the algorithms follow.

use crate::{BlockNumber, INVALID_BLOCK};

pub mod memory;

/// Page size.
pub const BLCKSZ: usize = 8192;
/// `SizeOfPageHeaderData`.
pub const PAGE_HEADER_SIZE: usize = 24;
/// `sizeof(ItemIdData)`: the line pointer cost of one item.
pub const ITEM_ID_SIZE: usize = 4;
/// `MAXIMUM_ALIGNOF`: item sizes are rounded up to a multiple of this.
pub const MAXIMUM_ALIGNOF: usize = 8;
/// Size of the special area holding the [`Opaque`] struct (MAXALIGNed).
pub const SPECIAL_SIZE: usize = 16;
/// [`PageRead::free_space`] of an empty page.
pub const EMPTY_PAGE_FREE_SPACE: usize = BLCKSZ - PAGE_HEADER_SIZE - SPECIAL_SIZE - ITEM_ID_SIZE;
/// The largest item that fits on an empty page.
pub const MAX_ITEM_SIZE: usize = EMPTY_PAGE_FREE_SPACE & !(MAXIMUM_ALIGNOF - 1);

/// `MAXALIGN(len)`.
pub const fn maxalign(len: usize) -> usize {
    (len + MAXIMUM_ALIGNOF - 1) & !(MAXIMUM_ALIGNOF - 1)
}

/// The page's special area: the next page of the chain and page-type flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opaque {
    /// Next page of the chain, [`INVALID_BLOCK`] when none.
    pub next: BlockNumber,
    /// Page type flags ([`crate::format::PAGE_META`], ...); 0 for a page never initialized.
    pub flags: u16,
}

impl Opaque {
    /// An opaque with the given flags and no next page.
    pub const fn new(flags: u16) -> Opaque {
        Opaque {
            next: INVALID_BLOCK,
            flags,
        }
    }
}

/// Read access to a locked page.
pub trait PageRead {
    /// The special area.
    fn opaque(&self) -> Opaque;
    /// Number of line pointers (the largest valid offset; 0 for an empty page).
    fn max_offset(&self) -> u16;
    /// The item at 1-based offset `off`; `None` if out of range or unused.
    fn item(&self, off: u16) -> Option<&[u8]>;
    /// Bytes available for one more item, its line pointer cost already subtracted (Postgres'
    /// `PageGetFreeSpace`): an item of `len` bytes fits iff `maxalign(len) <= free_space()`.
    fn free_space(&self) -> usize;
}

/// Write access to an exclusively locked page (one WAL record per guard).
pub trait PageWrite: PageRead {
    /// Replace the special area.
    fn set_opaque(&mut self, o: Opaque);
    /// Append an item; returns its offset, or `None` when it does not fit.
    fn add_item(&mut self, data: &[u8]) -> Option<u16>;
    /// Mutable access to an item's bytes (same length).
    fn item_mut(&mut self, off: u16) -> Option<&mut [u8]>;
    /// Delete the items at the given (valid, distinct) offsets and compact: later items move to
    /// lower offsets, keeping their order (like `PageIndexMultiDelete`).
    fn delete_items(&mut self, offs: &[u16]);
    /// Make the page empty with the given special area.
    fn reinit(&mut self, o: Opaque);
}

/// An index relation: a growable array of pages.
pub trait Relation {
    /// A share-locked page.
    type Read<'a>: PageRead
    where
        Self: 'a;
    /// An exclusively locked page; its changes are committed as one WAL record on drop.
    type Write<'a>: PageWrite
    where
        Self: 'a;
    /// Share-lock block `blk` (which must be `< nblocks()`).
    fn read(&self, blk: BlockNumber) -> Self::Read<'_>;
    /// Exclusively lock block `blk` (which must be `< nblocks()`).
    fn write(&self, blk: BlockNumber) -> Self::Write<'_>;
    /// Add a new empty page (opaque `{ next: INVALID_BLOCK, flags: 0 }`) at the end of the
    /// relation and return it exclusively locked.
    fn extend(&self) -> (BlockNumber, Self::Write<'_>);
    /// Number of pages.
    fn nblocks(&self) -> BlockNumber;
}

/// Whether an item of `len` bytes fits on `page`.
pub fn fits<P: PageRead + ?Sized>(page: &P, len: usize) -> bool {
    maxalign(len) <= page.free_space()
}
