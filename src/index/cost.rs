//! The planner's estimate: cheap for `ORDER BY <op> LIMIT k` (only the probed lists are read,
//! plus a few re-ranked rows), unusable without exactly one ORDER BY distance key.

use super::buffer::IndexRelation;
use pgrx::pg_sys;

/// Rows the scan typically re-ranks for one LIMIT query beyond the rows it returns.
const RERANKED_ROWS: f64 = 100.0;

#[pgrx::pg_guard]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C-unwind" fn amcostestimate(
    _root: *mut pg_sys::PlannerInfo,
    path: *mut pg_sys::IndexPath,
    _loop_count: f64,
    startup: *mut pg_sys::Cost,
    total: *mut pg_sys::Cost,
    selectivity: *mut pg_sys::Selectivity,
    correlation: *mut f64,
    pages: *mut f64,
) {
    // SAFETY: the planner passes a valid path and output pointers.
    unsafe {
        *selectivity = 1.0;
        *correlation = 0.0;
        let info = (*path).indexinfo;
        // The index answers exactly one `ORDER BY col <op> query`; anything else (no ORDER BY,
        // e.g. a partial index whose predicate matches the WHERE clause, or a second distance
        // key) must never be chosen, even when other paths are disabled.
        let orderbys = (*path).indexorderbys;
        if orderbys.is_null() || (*orderbys).length != 1 {
            *startup = f64::INFINITY;
            *total = f64::INFINITY;
            *pages = 1.0;
            #[cfg(feature = "pg18")]
            {
                // PostgreSQL 18 compares disabled nodes before costs.
                (*path).path.disabled_nodes = 2;
            }
            return;
        }
        let index_pages = ((*info).pages as f64).max(1.0);
        let tuples = (*info).tuples.max(1.0);
        // The number of lists is in the meta page.
        let index = pg_sys::index_open((*info).indexoid, pg_sys::NoLock as i32);
        let rel = IndexRelation::new(index, pg_sys::ForkNumber::MAIN_FORKNUM);
        let lists = rsclip_index::read_meta(&rel)
            .map(|m| m.nlists)
            .unwrap_or(1)
            .max(1);
        pg_sys::index_close(index, pg_sys::NoLock as i32);
        let probes = super::effective_probes(lists).min(lists);
        let fraction = probes as f64 / lists as f64;
        let cpu_operator = pg_sys::cpu_operator_cost;
        let cpu_index_tuple = pg_sys::cpu_index_tuple_cost;
        let page_cost = pg_sys::seq_page_cost;
        // Reading the probed lists and estimating every code in them, then re-ranking a
        // handful of rows with a heap access each: all before the first row comes back.
        let first = fraction * index_pages * page_cost
            + fraction * tuples * (cpu_index_tuple + cpu_operator)
            + RERANKED_ROWS * (pg_sys::random_page_cost + cpu_operator);
        // Returning everything means expanding to every list and re-ranking every row.
        let all = index_pages * pg_sys::random_page_cost
            + tuples * (cpu_index_tuple + cpu_operator + pg_sys::random_page_cost);
        *startup = first;
        *total = first + all;
        *pages = fraction * index_pages;
    }
}
