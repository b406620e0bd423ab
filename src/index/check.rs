//! `rsclip_index_check(regclass) -> jsonb`: verifies an index's structure (every page, chain and
//! item parses; no cycles; no TID twice) and that every row visible to the current snapshot with
//! a non-NULL value is reachable from it, in the spirit of amcheck's `heapallindexed`.

use super::buffer::IndexRelation;
use super::{index_metric, RowSink};
use crate::fmgr::{arg, error, error_detail, pg_function};
use pgrx::{pg_sys, PgSqlErrorCode};
use rsclip_index::{Metric, Tid};

struct HeapState {
    metric: Metric,
    indexed: Vec<Tid>,
    checked: u64,
    missing: Vec<Tid>,
}

impl RowSink for HeapState {
    fn row(&mut self, tid: Tid, v: &[f32]) {
        // Zero vectors have no cosine direction and are deliberately not indexed.
        if self.metric == Metric::Cosine && v.iter().all(|x| *x == 0.0) {
            return;
        }
        self.checked += 1;
        if self.indexed.binary_search(&tid).is_err() {
            self.missing.push(tid);
        }
        if self.checked.is_multiple_of(4096) {
            pgrx::check_for_interrupts!();
        }
    }

    fn null_row(&mut self, tid: Tid) {
        self.checked += 1;
        if self.indexed.binary_search(&tid).is_err() {
            self.missing.push(tid);
        }
    }
}

fn show(t: &Tid) -> String {
    format!("({},{})", t.block, t.offset)
}

pg_function! {
    /// `rsclip_index_check(index regclass) -> jsonb`
    fn rsclip_index_check(fcinfo) {
        // SAFETY: STRICT with a regclass (an Oid) argument.
        let oid = pg_sys::Oid::from(unsafe { arg(fcinfo, 0) }.value() as u32);
        // SAFETY: opening by OID with AccessShareLock raises an ERROR for a missing relation;
        // the checks below reject anything that is not an rsclip index before reading pages.
        let report = unsafe {
            // Table first, then index: the order DROP TABLE and ALTER TABLE lock in, so the
            // check never deadlocks with them (as amcheck does).
            let heap_oid = pg_sys::IndexGetRelation(oid, true);
            if heap_oid == pg_sys::InvalidOid {
                let name = pg_sys::get_rel_name(oid);
                let name = if name.is_null() {
                    format!("relation {}", u32::from(oid))
                } else {
                    std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
                };
                error(
                    PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
                    format!("\"{name}\" is not an index"),
                );
            }
            let heap = pg_sys::table_open(heap_oid, pg_sys::AccessShareLock as i32);
            let index = pg_sys::index_open(oid, pg_sys::AccessShareLock as i32);
            if (*(*index).rd_rel).relkind as u8 != pg_sys::RELKIND_INDEX
                || (*(*index).rd_rel).relam != pg_sys::get_am_oid(c"rsclip".as_ptr(), true)
            {
                error(
                    PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
                    format!("\"{}\" is not an rsclip index", super::relation_name(index)),
                );
            }
            if !(*(*index).rd_index).indisvalid || !(*(*index).rd_index).indisready {
                error(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "rsclip index \"{}\" is not valid (an interrupted CREATE INDEX CONCURRENTLY?): REINDEX it",
                        super::relation_name(index)
                    ),
                );
            }
            // The snapshot is taken before the index is read: a row it sees committed had its
            // index entry written before that, so a missing entry is a real defect.
            let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot());
            let rel = IndexRelation::new(index, pg_sys::ForkNumber::MAIN_FORKNUM);
            let report = rsclip_index::check(&rel).unwrap_or_else(|e| super::raise(index, e));
            if report.duplicate_tids > 0 {
                error(
                    PgSqlErrorCode::ERRCODE_INDEX_CORRUPTED,
                    format!(
                        "rsclip index \"{}\" holds {} duplicate entries",
                        super::relation_name(index),
                        report.duplicate_tids
                    ),
                );
            }
            let mut state = HeapState {
                metric: index_metric(index),
                indexed: report.tids.clone(),
                checked: 0,
                missing: Vec::new(),
            };
            let info = pg_sys::BuildIndexInfo(index);
            // An MVCC scan is passed in: tell the build scan so (it asserts the combination).
            (*info).ii_Concurrent = true;
            let scan = pg_sys::table_beginscan_strat(heap, snapshot, 0, std::ptr::null_mut(), true, false);
            super::scan_heap(heap, index, info, scan, &mut state);
            pg_sys::UnregisterSnapshot(snapshot);
            if !state.missing.is_empty() {
                let examples: Vec<String> = state.missing.iter().take(5).map(show).collect();
                error_detail(
                    PgSqlErrorCode::ERRCODE_INDEX_CORRUPTED,
                    format!(
                        "rsclip index \"{}\" lacks entries for {} of {} visible rows",
                        super::relation_name(index),
                        state.missing.len(),
                        state.checked
                    ),
                    format!("first missing heap TIDs: {}", examples.join(", ")),
                );
            }
            // Imbalance: the largest list against the mean. Inserts from a new distribution go to
            // the lists nearest to it, up to list_page_limit pages, then start new lists
            // (lists_added), which are weaker than trained ones: REINDEX restores both.
            let total: u64 = report.list_sizes.iter().sum();
            let largest = report.list_sizes.iter().copied().max().unwrap_or(0);
            let mean = total as f64 / report.list_sizes.len().max(1) as f64;
            let imbalance = if total == 0 { 1.0 } else { largest as f64 / mean };
            let summary = serde_json::json!({
                "index": super::relation_name(index),
                "dims": report.dims,
                "metric": format!("{:?}", report.metric),
                "lists": report.nlists,
                "built_lists": report.built_lists,
                "lists_added": report.nlists - report.built_lists,
                "list_page_limit": report.list_page_limit,
                "pages": report.nblocks,
                "centroid_pages": report.centroid_pages,
                "list_pages": report.list_pages,
                "refine_pages": report.refine_pages,
                "missing_refinements": report.missing_refine,
                "unreferenced_refinements": report.unreferenced_refine,
                "orphan_pages": report.orphan_pages,
                "empty_lists": report.empty_lists,
                "longest_chain": report.longest_chain,
                "largest_list_rows": largest,
                "mean_list_rows": (mean * 10.0).round() / 10.0,
                "list_imbalance": (imbalance * 100.0).round() / 100.0,
                "index_tuples": report.tids.len(),
                "null_tuples": report.null_tuples,
                "null_pages": report.null_pages,
                "heap_rows_checked": state.checked,
            });
            pg_sys::table_close(heap, pg_sys::AccessShareLock as i32);
            pg_sys::index_close(index, pg_sys::AccessShareLock as i32);
            summary
        };
        crate::encode::jsonb_datum(&report.to_string())
    }
}
