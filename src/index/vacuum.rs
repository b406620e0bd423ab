//! VACUUM: bulk delete removes the index entries of dead rows (compacting each page it changes,
//! one WAL record per page, so inserts reuse the space); cleanup reports the index's size.

use super::buffer::IndexRelation;
use super::item_pointer;
use super::raise;
use pgrx::pg_sys;
use rsclip_index::page::Relation;

/// Lets VACUUM's cost-based delay and cancellation act during long index passes.
fn delay_point() {
    // SAFETY: callable from any VACUUM code path outside critical sections.
    #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
    unsafe {
        pg_sys::vacuum_delay_point()
    };
    // SAFETY: as above (PostgreSQL 18 added the is_analyze flag).
    #[cfg(feature = "pg18")]
    unsafe {
        pg_sys::vacuum_delay_point(false)
    };
}

fn result_or_new(stats: *mut pg_sys::IndexBulkDeleteResult) -> *mut pg_sys::IndexBulkDeleteResult {
    if stats.is_null() {
        // SAFETY: palloc0 of the struct Postgres expects back.
        unsafe {
            pg_sys::palloc0(std::mem::size_of::<pg_sys::IndexBulkDeleteResult>())
                as *mut pg_sys::IndexBulkDeleteResult
        }
    } else {
        stats
    }
}

#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn ambulkdelete(
    info: *mut pg_sys::IndexVacuumInfo,
    stats: *mut pg_sys::IndexBulkDeleteResult,
    callback: pg_sys::IndexBulkDeleteCallback,
    callback_state: *mut std::ffi::c_void,
) -> *mut pg_sys::IndexBulkDeleteResult {
    let stats = result_or_new(stats);
    // SAFETY: VACUUM passes an open index and a callback that answers "is this TID dead?".
    unsafe {
        let index = (*info).index;
        let rel =
            IndexRelation::with_strategy(index, pg_sys::ForkNumber::MAIN_FORKNUM, (*info).strategy);
        let callback = callback.expect("VACUUM passes a callback");
        let mut calls = 0u64;
        let mut is_dead = |tid: rsclip_index::Tid| {
            calls += 1;
            if calls.is_multiple_of(4096) {
                delay_point();
            }
            let mut ptr = item_pointer(tid);
            callback(&mut ptr, callback_state)
        };
        let result =
            rsclip_index::bulk_delete(&rel, &mut is_dead).unwrap_or_else(|e| raise(index, e));
        (*stats).tuples_removed += result.tuples_removed as f64;
        (*stats).num_index_tuples = result.tuples_remaining as f64;
        (*stats).num_pages = rel.nblocks();
    }
    stats
}

#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn amvacuumcleanup(
    info: *mut pg_sys::IndexVacuumInfo,
    stats: *mut pg_sys::IndexBulkDeleteResult,
) -> *mut pg_sys::IndexBulkDeleteResult {
    // SAFETY: as above.
    unsafe {
        if (*info).analyze_only {
            return stats;
        }
        if !stats.is_null() {
            return stats;
        }
        // No bulk delete ran (nothing to remove): count the entries without writing anything.
        let stats = result_or_new(stats);
        let index = (*info).index;
        let rel =
            IndexRelation::with_strategy(index, pg_sys::ForkNumber::MAIN_FORKNUM, (*info).strategy);
        let result =
            rsclip_index::bulk_delete(&rel, &mut |_| false).unwrap_or_else(|e| raise(index, e));
        (*stats).num_index_tuples = result.tuples_remaining as f64;
        (*stats).num_pages = rel.nblocks();
        stats
    }
}
