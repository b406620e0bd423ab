//! Index scans: `ORDER BY emb <op> query [LIMIT k]`.
//!
//! The crate's scan estimates distances from the RaBitQ codes of the probed lists and asks us for
//! the exact distance of each candidate it cannot rule out; we read it from the table row visible
//! to the scan's snapshot (rows live inline thanks to STORAGE main, so this is one buffer access)
//! with the operator's own kernel. Rows come back in exact distance order within the probed
//! lists. When they run out (a selective WHERE filter rejected what was found) the scan probes the
//! next `rsclip.probes` lists, up to `rsclip.max_probes`, so `WHERE ... ORDER BY ... LIMIT k`
//! finds k rows whenever they exist; order across such expansions is relaxed (as with pgvector's
//! relaxed iterative scans). With `<#^` (what the planner hook turns `rsclip_score DESC` into
//! on a nullable column) the rows whose value is NULL come first, from the index's NULL chain.

use super::buffer::IndexRelation;
use super::item_pointer;
use super::{exact_distance, index_metric, indexed_column, raise};
use crate::datum;
use crate::fmgr::error;
use crate::settings;
use pgrx::{pg_sys, PgMemoryContexts, PgSqlErrorCode};
use rsclip_index::{Metric, Scan, Tid};

/// The opclass strategy of `<#^` (embedding_ip_ops' operator 2).
const NULLS_FIRST_STRATEGY: u16 = 2;

struct ScanState {
    metric: Metric,
    heap_attnum: i16,
    has_order: bool,
    /// None: a NULL query. Every distance to it is NULL, so every indexed row is returned, in
    /// no particular order, with a NULL distance (as a sequential scan's sort would).
    query: Option<Vec<f32>>,
    /// The ORDER BY operator is `<#^` (strategy 2): the rows whose value is NULL come first,
    /// at -infinity, then the others as for `<#>`.
    nulls_first: bool,
    /// The NULL rows still to return (read from the NULL chain on the first call).
    nulls: Option<std::vec::IntoIter<Tid>>,
    scan: Option<Scan>,
    /// Counted in pg_stat_*_indexes once per rescan, on the first tuple asked for.
    counted: bool,
    /// The scan's own memory context (the one ambeginscan ran in): the heap-fetch state and
    /// slot are created in it whatever context amgettuple is called in.
    context: pg_sys::MemoryContext,
    fetch: *mut pg_sys::IndexFetchTableData,
    slot: *mut pg_sys::TupleTableSlot,
}

#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn ambeginscan(
    index: pg_sys::Relation,
    nkeys: i32,
    norderbys: i32,
) -> pg_sys::IndexScanDesc {
    // SAFETY: RelationGetIndexScan allocates the descriptor (and the orderby value arrays) in
    // the current memory context, which lives as long as the scan.
    let scan = unsafe { pg_sys::RelationGetIndexScan(index, nkeys, norderbys) };
    let state = ScanState {
        metric: index_metric(index),
        heap_attnum: indexed_column(index),
        has_order: false,
        query: None,
        nulls_first: false,
        nulls: None,
        scan: None,
        counted: false,
        // SAFETY: reading the backend's current-context global.
        context: unsafe { pg_sys::CurrentMemoryContext },
        fetch: std::ptr::null_mut(),
        slot: std::ptr::null_mut(),
    };
    // The state owns Rust allocations; tie them to the memory context so an aborted query (which
    // never calls amendscan) frees them too.
    let state = PgMemoryContexts::CurrentMemoryContext.leak_and_drop_on_delete(state);
    // SAFETY: a fresh descriptor; opaque is ours. RelationGetIndexScan leaves the ORDER BY
    // value arrays to the AM (they are uninitialized, not NULL), so allocate them here.
    unsafe {
        (*scan).opaque = state as *mut std::ffi::c_void;
        let n = norderbys.max(1) as usize;
        (*scan).xs_orderbyvals =
            pg_sys::palloc0(n * std::mem::size_of::<pg_sys::Datum>()) as *mut pg_sys::Datum;
        (*scan).xs_orderbynulls = pg_sys::palloc0(n * std::mem::size_of::<bool>()) as *mut bool;
    }
    scan
}

#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn amrescan(
    scan: pg_sys::IndexScanDesc,
    _keys: pg_sys::ScanKey,
    _nkeys: i32,
    orderbys: pg_sys::ScanKey,
    norderbys: i32,
) {
    // SAFETY: opaque was set in ambeginscan; orderbys has norderbys entries.
    unsafe {
        let state = &mut *((*scan).opaque as *mut ScanState);
        state.scan = None;
        state.counted = false;
        state.has_order = norderbys > 0 && !orderbys.is_null();
        state.query = None;
        state.nulls = None;
        state.nulls_first = false;
        if state.has_order {
            let key = &*orderbys;
            state.nulls_first = key.sk_strategy == NULLS_FIRST_STRATEGY;
            if key.sk_flags & pg_sys::SK_ISNULL as i32 == 0 {
                state.query = Some(datum::with(key.sk_argument, |v| v.to_vec()));
            }
        }
    }
}

/// Starts the crate's scan. A NULL query walks every list (any query vector does: all rows are
/// wanted and their order does not matter).
fn start(index: pg_sys::Relation, rel: &IndexRelation, query: Option<&[f32]>) -> Scan {
    let centroids = super::centroids::get(index, rel);
    let meta = *centroids.meta();
    let Some(query) = query else {
        let mut axis = vec![0f32; meta.dims as usize];
        axis[0] = 1.0;
        return Scan::with_centroids(centroids, &axis, meta.nlists, meta.nlists)
            .unwrap_or_else(|e| raise(index, e));
    };
    if query.len() != meta.dims as usize {
        error(
            PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
            format!(
                "expected {} dimensions, not {} (query vector for index \"{}\")",
                meta.dims,
                query.len(),
                super::relation_name(index)
            ),
        );
    }
    let probes = super::effective_probes(meta.nlists);
    let max_probes = settings::MAX_PROBES.get().max(0) as u32;
    Scan::with_centroids(centroids, query, probes, max_probes).unwrap_or_else(|e| raise(index, e))
}

/// What `pgstat_count_index_scan` (a macro) does: one more scan of this index in
/// pg_stat_*_indexes.idx_scan. On PG18 also one more "Index Searches" in EXPLAIN ANALYZE.
///
/// # Safety
/// `scan` is a live index scan descriptor.
unsafe fn count_index_scan(scan: pg_sys::IndexScanDesc) {
    // SAFETY: (caller) the descriptor and its index relation are live; pgstat_assoc_relation
    // is what pgstat_should_count_relation calls when the relation is not yet associated.
    unsafe {
        let index = (*scan).indexRelation;
        if (*index).pgstat_info.is_null() && (*index).pgstat_enabled {
            pg_sys::pgstat_assoc_relation(index);
        }
        let info = (*index).pgstat_info;
        if !info.is_null() {
            #[cfg(feature = "pg15")]
            {
                (*info).t_counts.t_numscans += 1;
            }
            #[cfg(not(feature = "pg15"))]
            {
                (*info).counts.numscans += 1;
            }
        }
        #[cfg(feature = "pg18")]
        if !(*scan).instrument.is_null() {
            (*(*scan).instrument).nsearches += 1;
        }
    }
}

#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn amgettuple(
    scan: pg_sys::IndexScanDesc,
    _direction: pg_sys::ScanDirection::Type,
) -> bool {
    // SAFETY: a descriptor from ambeginscan, with heapRelation and xs_snapshot set by
    // index_beginscan; every pointer below belongs to it.
    unsafe {
        let index = (*scan).indexRelation;
        let state = &mut *((*scan).opaque as *mut ScanState);
        if !state.has_order {
            error(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!(
                    "rsclip index \"{}\" can only be scanned with ORDER BY <#>, <=> or <->",
                    super::relation_name(index)
                ),
            );
        }
        if !state.counted {
            count_index_scan(scan);
            state.counted = true;
        }
        let query = state.query.as_deref();
        let rel = IndexRelation::for_scan(index, pg_sys::ForkNumber::MAIN_FORKNUM);
        if state.scan.is_none() {
            // Candidate TIDs outlive the index page pins, which is only safe for MVCC snapshots
            // (a TID vacuum recycled meanwhile cannot be visible to one).
            let snapshot = (*scan).xs_snapshot;
            if snapshot.is_null()
                || !matches!(
                    (*snapshot).snapshot_type,
                    pg_sys::SnapshotType::SNAPSHOT_MVCC
                        | pg_sys::SnapshotType::SNAPSHOT_HISTORIC_MVCC
                )
            {
                error(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "rsclip index scans require an MVCC snapshot",
                );
            }
            state.scan = Some(start(index, &rel, query));
            if state.nulls_first {
                let tids = rsclip_index::null_tids(&rel).unwrap_or_else(|e| raise(index, e));
                state.nulls = Some(tids.into_iter());
            }
        }
        if let Some(tid) = state.nulls.as_mut().and_then(|n| n.next()) {
            return return_row(scan, tid, Some(f32::NEG_INFINITY));
        }
        let Some(query) = query else {
            // NULL query: no distances to compute, no heap rows to read. Every distance is
            // NULL (`<#^`: -infinity).
            let next = state
                .scan
                .as_mut()
                .expect("started above")
                .next(&rel, &mut |_| Some(0.0));
            let distance = state.nulls_first.then_some(f32::NEG_INFINITY);
            return match next {
                Ok(Some((tid, _))) => return_row(scan, tid, distance),
                Ok(None) => false,
                Err(e) => raise(index, e),
            };
        };
        if state.fetch.is_null() {
            let heap = (*scan).heapRelation;
            let old = pg_sys::MemoryContextSwitchTo(state.context);
            state.fetch = pg_sys::table_index_fetch_begin(heap);
            state.slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
            pg_sys::MemoryContextSwitchTo(old);
        }
        let (metric, attnum, fetch, slot) =
            (state.metric, state.heap_attnum, state.fetch, state.slot);
        let snapshot = (*scan).xs_snapshot;
        let mut rerank = |tid: Tid| -> Option<f32> {
            let mut tid = item_pointer(tid);
            let mut call_again = false;
            let mut all_dead = false;
            if !pg_sys::table_index_fetch_tuple(
                fetch,
                &mut tid,
                snapshot,
                slot,
                &mut call_again,
                &mut all_dead,
            ) {
                return None;
            }
            let mut isnull = false;
            let value = pg_sys::slot_getattr(slot, attnum as i32, &mut isnull);
            if isnull {
                return None;
            }
            datum::with(value, |v| {
                (v.len() == query.len()).then(|| exact_distance(metric, v, query) as f32)
            })
        };
        let next = state
            .scan
            .as_mut()
            .expect("started above")
            .next(&rel, &mut rerank);
        match next {
            Ok(Some((tid, distance))) => return_row(scan, tid, Some(distance)),
            Ok(None) => false,
            Err(e) => raise(index, e),
        }
    }
}

/// Hands `tid` to the executor with its exact distance (None: NULL, for a NULL query); the
/// order needs no recheck. Returns true, as amgettuple does when it has a row.
///
/// # Safety
/// `scan` is a live descriptor whose ORDER BY arrays ambeginscan allocated.
unsafe fn return_row(scan: pg_sys::IndexScanDesc, tid: Tid, distance: Option<f32>) -> bool {
    // SAFETY: (caller) the descriptor and its one-element ORDER BY arrays are ours to fill.
    unsafe {
        (*scan).xs_heaptid = item_pointer(tid);
        (*scan).xs_recheck = false;
        (*scan).xs_recheckorderby = false;
        *(*scan).xs_orderbyvals =
            pg_sys::Datum::from(distance.map_or(0u64, |d| (d as f64).to_bits()));
        *(*scan).xs_orderbynulls = distance.is_none();
    }
    true
}

#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn amendscan(scan: pg_sys::IndexScanDesc) {
    // SAFETY: releases what amgettuple created; the state itself is freed with its context.
    unsafe {
        let state = &mut *((*scan).opaque as *mut ScanState);
        if !state.fetch.is_null() {
            pg_sys::table_index_fetch_end(state.fetch);
            state.fetch = std::ptr::null_mut();
        }
        if !state.slot.is_null() {
            pg_sys::ExecDropSingleTupleTableSlot(state.slot);
            state.slot = std::ptr::null_mut();
        }
        state.scan = None;
        state.query = None;
        state.nulls = None;
    }
}
