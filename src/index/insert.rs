//! aminsert: one row into its nearest list (the crate walks the list chain to the first page with
//! room, or extends it, or starts a new list; see `rsclip_index::insert` for the lock and WAL
//! order), or a NULL into the NULL chain.

use super::buffer::IndexRelation;
use super::tid_of;
use super::{indexed_dims, raise};
use crate::datum;
use pgrx::pg_sys;

#[pgrx::pg_guard]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C-unwind" fn aminsert(
    index: pg_sys::Relation,
    values: *mut pg_sys::Datum,
    isnull: *mut bool,
    heap_tid: pg_sys::ItemPointer,
    _heap: pg_sys::Relation,
    _check_unique: pg_sys::IndexUniqueCheck::Type,
    _index_unchanged: bool,
    _info: *mut pg_sys::IndexInfo,
) -> bool {
    // SAFETY: Postgres passes the one index column's value and null flag and the heap TID.
    unsafe {
        let rel = IndexRelation::new(index, pg_sys::ForkNumber::MAIN_FORKNUM);
        let tid = tid_of(heap_tid);
        if *isnull {
            // Kept for the NULLS FIRST ordering (`ORDER BY rsclip_score(...) DESC`).
            if let Err(e) = rsclip_index::insert_null(&rel, tid) {
                raise(index, e);
            }
            return false;
        }
        let dims = indexed_dims(index);
        datum::with(*values, |v| {
            if v.len() != dims as usize {
                raise(
                    index,
                    rsclip_index::Error::DimensionMismatch {
                        expected: dims,
                        got: v.len() as u32,
                    },
                );
            }
            if let Err(e) = rsclip_index::insert(&rel, tid, v) {
                raise(index, e);
            }
        });
    }
    false
}
