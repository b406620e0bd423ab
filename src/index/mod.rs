//! The `rsclip` index access method: thin glue between Postgres' index AM API and the
//! `rsclip-index` crate (IVF + RaBitQ over a page abstraction). One module per phase, as the
//! callbacks group: [`build`] (CREATE INDEX, REINDEX, unlogged init fork), [`insert`], [`scan`],
//! [`vacuum`], [`cost`] (planner estimate), [`options`] (reloptions), [`check`]
//! (`rsclip_index_check`). [`buffer`] implements the crate's page traits over shared buffers with
//! GenericXLog.
//!
//! Every callback is `#[pg_guard]`ed: a Rust panic or an `Error` from the crate becomes a Postgres
//! ERROR after the Rust frames (and the buffer guards they hold) have unwound.

pub mod buffer;
mod build;
mod centroids;
mod check;
mod cost;
mod insert;
pub mod options;
mod scan;
mod vacuum;

use crate::fmgr::{error, pg_function};
use pgrx::{pg_sys, PgSqlErrorCode};
use rsclip_index::{Metric, Tid};

/// Maps an error of the index algorithms to a Postgres ERROR.
pub fn raise(index: pg_sys::Relation, e: rsclip_index::Error) -> ! {
    let name = relation_name(index);
    let code = match &e {
        rsclip_index::Error::Corrupt { .. } => PgSqlErrorCode::ERRCODE_INDEX_CORRUPTED,
        rsclip_index::Error::DimensionMismatch { .. } => PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
        rsclip_index::Error::TooManyDims { .. } => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        rsclip_index::Error::NonFiniteValue => PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
        rsclip_index::Error::InvalidArgument(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        rsclip_index::Error::RelationNotEmpty { .. } => {
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
        }
    };
    error(code, format!("rsclip index \"{name}\": {e}"))
}

pub fn relation_name(rel: pg_sys::Relation) -> String {
    // SAFETY: an open relation has a valid rd_rel whose relname is a NUL-terminated NameData.
    unsafe {
        std::ffi::CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

/// The metric of the index's operator class (support function 1).
pub fn index_metric(index: pg_sys::Relation) -> Metric {
    // SAFETY: index_getprocinfo returns the cached FmgrInfo of support function 1 of column 1
    // (every rsclip opclass defines it, and CREATE OPERATOR CLASS enforces amsupport); the
    // function takes an ignored `internal` argument and returns an int4.
    let code = unsafe {
        let proc = pg_sys::index_getprocinfo(index, 1, 1);
        pg_sys::FunctionCall1Coll(proc, pg_sys::InvalidOid, pg_sys::Datum::from(0usize)).value()
            as i32
    };
    match code {
        1 => Metric::InnerProduct,
        2 => Metric::Cosine,
        3 => Metric::L2,
        other => error(
            PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION,
            format!("rsclip operator class support function 1 returned unknown metric {other}"),
        ),
    }
}

/// The exact distance the operator of `metric` computes (the same kernels as `<#>`, `<=>`,
/// `<->`), as the scan's re-ranking needs it.
pub fn exact_distance(metric: Metric, a: &[f32], b: &[f32]) -> f64 {
    use rsclip_core::distance;
    match metric {
        Metric::InnerProduct => -(distance::dot(a, b) as f64),
        Metric::Cosine => distance::cosine_distance(a, b),
        Metric::L2 => (distance::l2_squared(a, b) as f64).sqrt(),
    }
}

/// Receives the rows of a heap scan made for the index ([`scan_heap`]).
pub trait RowSink {
    fn row(&mut self, tid: Tid, vector: &[f32]);
    /// A row whose indexed value is NULL (the index keeps them in its NULL chain).
    fn null_row(&mut self, _tid: Tid) {}
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn row_callback<S: RowSink>(
    _index: pg_sys::Relation,
    tid: pg_sys::ItemPointer,
    values: *mut pg_sys::Datum,
    isnull: *mut bool,
    _alive: bool,
    state: *mut std::ffi::c_void,
) {
    // SAFETY: `state` is the sink scan_heap passed in; values/isnull hold the one index column.
    unsafe {
        let sink = &mut *(state as *mut S);
        if *isnull {
            sink.null_row(tid_of(tid));
            return;
        }
        crate::datum::with(*values, |v| sink.row(tid_of(tid), v));
    }
}

/// Runs `table_index_build_scan` (with its block progress reporting), handing every indexed
/// value (and every NULL) to `sink`; `scan` null = the build's own scan. Returns the live heap tuples.
///
/// # Safety
/// Open, locked relations and the index's IndexInfo, as `table_index_build_scan` requires.
pub unsafe fn scan_heap<S: RowSink>(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    info: *mut pg_sys::IndexInfo,
    scan: pg_sys::TableScanDesc,
    sink: &mut S,
) -> f64 {
    // SAFETY: (caller); the callback gets `sink` back with its own type.
    unsafe {
        pg_sys::table_index_build_scan(
            heap,
            index,
            info,
            true,
            scan.is_null(),
            Some(row_callback::<S>),
            sink as *mut S as *mut std::ffi::c_void,
            scan,
        )
    }
}

pub fn tid_of(ptr: pg_sys::ItemPointer) -> Tid {
    // SAFETY: a valid ItemPointer from Postgres.
    unsafe {
        let p = &*ptr;
        Tid {
            block: ((p.ip_blkid.bi_hi as u32) << 16) | p.ip_blkid.bi_lo as u32,
            offset: p.ip_posid,
        }
    }
}

pub fn item_pointer(tid: Tid) -> pg_sys::ItemPointerData {
    pg_sys::ItemPointerData {
        ip_blkid: pg_sys::BlockIdData {
            bi_hi: (tid.block >> 16) as u16,
            bi_lo: (tid.block & 0xffff) as u16,
        },
        ip_posid: tid.offset,
    }
}

/// Lists a scan probes first: `rsclip.probes`, or `ceil(1.7 * sqrt(lists)) + 1` when it is 0.
pub fn effective_probes(lists: u32) -> u32 {
    match crate::settings::PROBES.get() {
        0 => rsclip_index::default_probes(lists),
        p => p as u32,
    }
}

/// Heap attribute number of the indexed column; plain columns only.
pub fn indexed_column(index: pg_sys::Relation) -> i16 {
    // SAFETY: rd_index is the pg_index row of an open index; indkey has indnatts entries.
    let (natts, attnum) = unsafe {
        let form = (*index).rd_index;
        ((*form).indnatts, *(*form).indkey.values.as_ptr())
    };
    if natts != 1 {
        error(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "rsclip indexes have exactly one column",
        );
    }
    if attnum == 0 {
        error(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "rsclip indexes on expressions are not supported: index an embedding column",
        );
    }
    attnum
}

/// Dimensions of the indexed column, from its type modifier: `embedding(768)`.
pub fn indexed_dims(index: pg_sys::Relation) -> u32 {
    // SAFETY: an open index has a tuple descriptor (owned by the relcache entry, which outlives
    // this borrow) with one attribute.
    let typmod = unsafe {
        let desc = pgrx::PgTupleDesc::from_pg_unchecked((*index).rd_att);
        desc.get(0).map(|a| a.atttypmod).unwrap_or(-1)
    };
    if typmod < 1 {
        error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "column does not have dimensions: declare it with them, e.g. embedding(768), to index it with rsclip",
        );
    }
    typmod as u32
}

/// The index AM's routine table (called inside `rsclip_amhandler`'s guard).
unsafe fn amhandler_routine() -> *mut pg_sys::IndexAmRoutine {
    // SAFETY: makeNode-equivalent: palloc0 of the node in the current context, tag set.
    let routine = unsafe {
        let r = pg_sys::palloc0(std::mem::size_of::<pg_sys::IndexAmRoutine>())
            as *mut pg_sys::IndexAmRoutine;
        (*r).type_ = pg_sys::NodeTag::T_IndexAmRoutine;
        &mut *r
    };
    routine.amstrategies = 0;
    routine.amsupport = 1;
    routine.amoptsprocnum = 0;
    routine.amcanorder = false;
    routine.amcanorderbyop = true;
    routine.amcanbackward = false;
    routine.amcanunique = false;
    routine.amcanmulticol = false;
    routine.amoptionalkey = true;
    routine.amsearcharray = false;
    routine.amsearchnulls = false;
    routine.amstorage = false;
    routine.amclusterable = false;
    routine.ampredlocks = false;
    routine.amcanparallel = false;
    routine.amcaninclude = false;
    routine.amusemaintenanceworkmem = false;
    routine.amparallelvacuumoptions = pg_sys::VACUUM_OPTION_PARALLEL_BULKDEL as u8;
    routine.amkeytype = pg_sys::InvalidOid;
    #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
    {
        routine.amsummarizing = false;
    }
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    {
        routine.amcanbuildparallel = false;
    }
    routine.ambuild = Some(build::ambuild);
    routine.ambuildempty = Some(build::ambuildempty);
    routine.aminsert = Some(insert::aminsert);
    routine.ambulkdelete = Some(vacuum::ambulkdelete);
    routine.amvacuumcleanup = Some(vacuum::amvacuumcleanup);
    routine.amcanreturn = None;
    routine.amcostestimate = Some(cost::amcostestimate);
    routine.amoptions = Some(options::amoptions);
    routine.amproperty = None;
    routine.ambuildphasename = Some(build::ambuildphasename);
    routine.amvalidate = Some(amvalidate);
    routine.ambeginscan = Some(scan::ambeginscan);
    routine.amrescan = Some(scan::amrescan);
    routine.amgettuple = Some(scan::amgettuple);
    routine.amgetbitmap = None;
    routine.amendscan = Some(scan::amendscan);
    routine.ammarkpos = None;
    routine.amrestrpos = None;
    routine
}

/// Operator classes are created by our own SQL script; nothing more to validate.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn amvalidate(_opclass: pg_sys::Oid) -> bool {
    true
}

pg_function! {
    /// `rsclip_amhandler(internal) -> index_am_handler`
    fn rsclip_amhandler(fcinfo) {
        let _ = fcinfo;
        // SAFETY: builds a palloc'd IndexAmRoutine node.
        pg_sys::Datum::from(unsafe { amhandler_routine() })
    }
}

pg_function! {
    /// Support function 1 of `embedding_ip_ops`.
    fn rsclip_metric_ip(fcinfo) {
        let _ = fcinfo;
        pg_sys::Datum::from(1i32)
    }
}

pg_function! {
    /// Support function 1 of `embedding_cosine_ops`.
    fn rsclip_metric_cosine(fcinfo) {
        let _ = fcinfo;
        pg_sys::Datum::from(2i32)
    }
}

pg_function! {
    /// Support function 1 of `embedding_l2_ops`.
    fn rsclip_metric_l2(fcinfo) {
        let _ = fcinfo;
        pg_sys::Datum::from(3i32)
    }
}
