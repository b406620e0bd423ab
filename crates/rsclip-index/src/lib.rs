//! # rsclip-index: IVF + RaBitQ approximate nearest-neighbour search over a page abstraction
//!
//! This crate is the Postgres-independent half of the `rsclip` index access method. Vectors are
//! partitioned into *lists* by k-means centroids (IVF); inside a list every vector is stored as a
//! RaBitQ 1-bit code of its rotated residual against the list centroid plus an 8-bit scalar code
//! of the same residual (`dims / 8 + dims + 28` bytes, 892 for 768 dims). Full vectors are **not**
//! stored: a scan estimates every distance from the 1-bit code, tightens the bounds of the
//! promising ones with the 8-bit code (about 50x tighter), keeps a lower bound for each candidate
//! and asks the caller for the exact distance (the Postgres side reads the heap row) until the
//! next result is provably (with the codes' probabilistic bounds) the nearest remaining one.
//!
//! All algorithms run over the [`page::Relation`] trait, so they can be unit tested over the
//! in-memory [`page::memory::MemoryRelation`] and run in Postgres over shared buffers.
//!
//! ## Modules
//! - [`page`]: the page/relation traits and the in-memory implementation.
//! - [`mod@format`]: the on-disk byte layout (meta page, centroid pages, list pages).
//! - [`kmeans`]: centroid training.
//! - [`rabitq`]: random rotation, 1-bit codes, query quantization, distance estimates and bounds.
//! - [`build`], [`mod@insert`], [`scan`], [`vacuum`], [`mod@check`]: the index operations.
//! - [`rng`]: the small deterministic PRNG used everywhere (and by tests).
//!
//! ## Typical use
//! ```
//! use rsclip_index::page::memory::MemoryRelation;
//! use rsclip_index::*;
//! let rel = MemoryRelation::new();
//! let rows: Vec<Vec<f32>> = (0..100).map(|i| vec![i as f32, 1.0, (i % 7) as f32]).collect();
//! let sample: Vec<f32> = rows.concat();
//! let lists = default_lists(rows.len() as u64);
//! let centroids = train_centroids(Metric::L2, &sample, 3, lists, 42, 2).unwrap();
//! let params = BuildParams { dims: 3, metric: Metric::L2, seed: 7, memory_limit_bytes: 64 << 20 };
//! let mut builder = IndexBuilder::new(&rel, &params, &centroids).unwrap();
//! for (i, r) in rows.iter().enumerate() {
//!     builder.add(Tid { block: 0, offset: i as u16 + 1 }, r).unwrap();
//! }
//! builder.finish().unwrap();
//! insert(&rel, Tid { block: 1, offset: 1 }, &[5.0, 5.0, 5.0]).unwrap();
//! let q = [3.0, 1.0, 3.0];
//! let mut scan = Scan::new(&rel, &q, default_probes(lists), 0).unwrap();
//! let mut rerank = |t: Tid| {
//!     let v = if t.block == 1 { vec![5.0, 5.0, 5.0] } else { rows[t.offset as usize - 1].clone() };
//!     Some(Metric::L2.distance(&v, &q))
//! };
//! let (tid, dist) = scan.next(&rel, &mut rerank).unwrap().unwrap();
//! assert_eq!((tid, dist), (Tid { block: 0, offset: 4 }, 0.0));
//! assert_eq!(check(&rel).unwrap().tids.len(), 101);
//! ```
//!
//! Defaults: [`default_lists`]`(rows)` = rows/300 up to 30k rows, rising linearly to 1000 at
//! 100k rows, sqrt(10·rows) beyond (≥ 1);
//! [`sample_size`]`(lists)` = max(50 × lists, 10 000); [`default_probes`]`(lists)` =
//! ceil(1.7 · sqrt(lists)) + 1.
//!
//! ## Rules every operation follows (the Postgres glue relies on them)
//!
//! **Locks.** An operation holds at most one page guard at a time, with a single exception: an
//! inserter that holds the write guard of the *tail* page of a list may call
//! [`page::Relation::extend`] and then holds two write guards (tail, new page). The new page
//! always has the highest block number in the relation, so every lock is taken in ascending
//! block order and no deadlock is possible. Scans, vacuum and check hold one read guard at a time
//! and copy what they need out of the page before releasing it; no callback (re-rank, is-dead)
//! is ever called while a guard is held.
//!
//! **WAL.** Every write guard is an independent atomic WAL record. Operations order their guards
//! so that a crash between any two of them leaves a valid index:
//! - *insert* into a page with room: one guard, one record.
//! - *insert with extension*: (1) the new page is fully initialized and filled and its guard is
//!   released (record 1), then (2) the predecessor's `next` pointer is set and its guard released
//!   (record 2). The predecessor stays locked from before the extension until the link is set,
//!   so two inserters can never both link a page after the same tail. A crash between (1) and
//!   (2) leaves an unreachable (orphan) page whose tuples belong to a transaction that never
//!   committed; [`check()`] reports orphans but does not treat them as corruption.
//! - *bulk delete*: one record per page that had dead tuples (compaction within the page).
//! - *build*: not crash safe by itself (like every Postgres index build): the index is invisible
//!   until the build transaction commits, and the glue WAL-logs the pages (per guard or with
//!   `log_newpage_range` at the end).
//!
//! **No remembered item positions.** Vacuum compacts pages (items move to lower offsets), so no
//! operation remembers `(block, offset)` of a list item across a lock release. Centroid pages are
//! immutable after build.
//!
//! **No panics on page contents.** Every byte read from a page is validated; corrupt contents
//! give [`Error::Corrupt`] (the glue maps it to SQLSTATE XX002 `index_corrupted`). Block numbers
//! read from pages are checked against [`page::Relation::nblocks`] before they are followed, and
//! chain walks are bounded by `nblocks` (a cycle is reported as corruption).
#![forbid(unsafe_code)]

use std::fmt;

pub mod build;
pub mod check;
mod common;
pub mod format;
pub mod insert;
pub mod kmeans;
pub mod page;
pub mod rabitq;
pub mod rng;
pub mod scan;
pub mod vacuum;

pub use build::{default_lists, sample_size, AddOutcome, BuildParams, BuildStats, IndexBuilder};
pub use check::{check, CheckReport};
pub use common::read_meta;
pub use insert::{insert, insert_null, InsertOutcome};
pub use kmeans::train_centroids;
pub use scan::{default_probes, null_tids, Centroids, Scan, ScanStats};
pub use vacuum::{bulk_delete, DeleteStats};

/// A block (page) number inside the index relation.
pub type BlockNumber = u32;

/// "No block": the end of a chain.
pub const INVALID_BLOCK: BlockNumber = u32::MAX;

/// Largest number of dimensions that can be indexed (the `vector` type's own limit).
pub const MAX_DIMS: u32 = 16_000;

/// Largest number of lists an index may have.
pub const MAX_LISTS: u32 = 65_536;

/// A heap tuple id (`ItemPointerData`): 6 bytes on disk (block u32 LE, offset u16 LE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tid {
    /// Heap block number.
    pub block: u32,
    /// 1-based line pointer offset within the heap block (0 is invalid).
    pub offset: u16,
}

/// The distance an index orders by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Negative inner product: distance = `-<x, q>`.
    InnerProduct,
    /// Cosine distance `1 - cos(x, q)`. Vectors (indexed and query) are normalized on the way
    /// in; zero vectors have no direction and are not indexed (a zero query returns nothing).
    Cosine,
    /// Euclidean distance `sqrt(sum (x_i - q_i)^2)` (not squared).
    L2,
}

impl Metric {
    /// The on-disk code of the metric (meta page): 0 = inner product, 1 = cosine, 2 = L2.
    pub fn code(self) -> u32 {
        match self {
            Metric::InnerProduct => 0,
            Metric::Cosine => 1,
            Metric::L2 => 2,
        }
    }

    /// Inverse of [`Metric::code`]; `None` for an unknown code.
    pub fn from_code(code: u32) -> Option<Metric> {
        match code {
            0 => Some(Metric::InnerProduct),
            1 => Some(Metric::Cosine),
            2 => Some(Metric::L2),
            _ => None,
        }
    }

    /// Whether k-means uses spherical (normalized) centroids for this metric.
    pub fn spherical(self) -> bool {
        !matches!(self, Metric::L2)
    }

    /// The exact distance between two vectors of equal length, as the scan expects the re-rank
    /// callback to compute it (cosine of a zero vector is NaN).
    pub fn distance(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            Metric::InnerProduct => -rsclip_core::distance::dot(a, b),
            Metric::Cosine => rsclip_core::distance::cosine_distance(a, b) as f32,
            Metric::L2 => rsclip_core::distance::l2_squared(a, b).sqrt(),
        }
    }
}

/// Every error an index operation can return.
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// A page has contents that cannot be valid (SQLSTATE XX002 `index_corrupted`).
    Corrupt {
        /// The block where the problem was found.
        block: BlockNumber,
        /// What is wrong.
        reason: String,
    },
    /// A vector has a different number of dimensions than the index.
    DimensionMismatch {
        /// Dimensions of the index.
        expected: u32,
        /// Dimensions of the vector.
        got: u32,
    },
    /// More dimensions than [`MAX_DIMS`].
    TooManyDims {
        /// Requested dimensions.
        dims: u32,
        /// The limit.
        max: u32,
    },
    /// A vector contains NaN or infinity.
    NonFiniteValue,
    /// An invalid argument (zero dimensions, a centroid array of the wrong length, ...).
    InvalidArgument(String),
    /// `IndexBuilder::new` was given a relation that already has pages.
    RelationNotEmpty {
        /// Pages found.
        nblocks: BlockNumber,
    },
}

impl Error {
    pub(crate) fn corrupt(block: BlockNumber, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            block,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Corrupt { block, reason } => {
                write!(f, "index is corrupted: block {block}: {reason}")
            }
            Error::DimensionMismatch { expected, got } => {
                write!(f, "expected {expected} dimensions, not {got}")
            }
            Error::TooManyDims { dims, max } => {
                write!(
                    f,
                    "cannot index {dims} dimensions: at most {max} are supported"
                )
            }
            Error::NonFiniteValue => write!(f, "vector contains NaN or infinity"),
            Error::InvalidArgument(msg) => write!(f, "invalid argument: {msg}"),
            Error::RelationNotEmpty { nblocks } => {
                write!(
                    f,
                    "index relation must be empty to build, it has {nblocks} blocks"
                )
            }
        }
    }
}

impl std::error::Error for Error {}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
