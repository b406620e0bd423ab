//! CREATE INDEX / REINDEX (and the init fork of unlogged indexes).
//!
//! Two passes over the table: (1) a reservoir sample, bounded by `maintenance_work_mem`, on
//! which k-means trains the list centroids; (2) every row is assigned to its nearest centroid and
//! encoded, buffered per list within `maintenance_work_mem` and written list by list. The
//! CPU-bound work of both passes (k-means iterations; assigning and encoding batches of rows)
//! runs on `max_parallel_maintenance_workers + 1` threads that never call Postgres; the heap scan
//! and every page write stay in the backend's own thread. Every page goes through
//! GenericXLog, so the new index is WAL-logged and replicated like any other write. Phases and
//! tuple counts are reported in `pg_stat_progress_create_index`.

use super::buffer::IndexRelation;
use super::{index_metric, indexed_dims, options, raise, scan_heap, RowSink};
use crate::fmgr::error;
use pgrx::{pg_sys, PgSqlErrorCode};
use rsclip_index::rng::Rng;
use rsclip_index::{BuildParams, IndexBuilder, Metric, Tid};

/// Our build phases, after Postgres' own "initializing" (1).
const PHASE_SAMPLE: i64 = 2;
const PHASE_TRAIN: i64 = 3;
const PHASE_LOAD: i64 = 4;

/// The RaBitQ rotation seed and the k-means seed: fixed, so REINDEX of the same data rebuilds
/// the same index.
const ROTATION_SEED: u64 = 0x5253_434c_4950_0001;
const KMEANS_SEED: u64 = 0x5253_434c_4950_0002;

#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn ambuildphasename(phase: i64) -> *mut std::ffi::c_char {
    let name: &std::ffi::CStr = match phase {
        PHASE_SAMPLE => c"sampling rows",
        PHASE_TRAIN => c"training list centroids",
        PHASE_LOAD => c"assigning and writing rows",
        _ => return std::ptr::null_mut(),
    };
    name.as_ptr() as *mut _
}

fn progress(param: u32, value: i64) {
    // SAFETY: plain update of this backend's progress slot.
    unsafe { pg_sys::pgstat_progress_update_param(param as i32, value) }
}

/// Checks a row's vector against the index's dimensions.
fn check_dims(index: pg_sys::Relation, dims: u32, v: &[f32]) {
    if v.len() != dims as usize {
        error(
            PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
            format!(
                "expected {dims} dimensions, not {} (index \"{}\")",
                v.len(),
                super::relation_name(index)
            ),
        );
    }
}

struct SampleState {
    index: pg_sys::Relation,
    dims: u32,
    capacity: usize,
    sample: Vec<f32>,
    seen: u64,
    rng: Rng,
}

impl RowSink for SampleState {
    fn row(&mut self, _tid: Tid, v: &[f32]) {
        check_dims(self.index, self.dims, v);
        self.seen += 1;
        let d = self.dims as usize;
        if self.sample.len() / d < self.capacity {
            self.sample.extend_from_slice(v);
        } else {
            let j = self.rng.below(self.seen) as usize;
            if j < self.capacity {
                self.sample[j * d..(j + 1) * d].copy_from_slice(v);
            }
        }
        pgrx::check_for_interrupts!();
    }
}

/// Rows per batch handed to the builder's threads: large enough to amortize spawning them,
/// small enough (a few MB at 768 dimensions) to keep progress reports and interrupts prompt.
const LOAD_BATCH_ROWS: usize = 2048;

struct LoadState<'a, 'r> {
    index: pg_sys::Relation,
    dims: u32,
    builder: &'a mut IndexBuilder<'r, IndexRelation>,
    threads: usize,
    tids: Vec<Tid>,
    vectors: Vec<f32>,
    done: i64,
}

impl LoadState<'_, '_> {
    fn flush(&mut self) {
        if let Err(e) = self
            .builder
            .add_batch(&self.tids, &self.vectors, self.threads)
        {
            raise(self.index, e);
        }
        self.done += self.tids.len() as i64;
        self.tids.clear();
        self.vectors.clear();
        progress(pg_sys::PROGRESS_CREATEIDX_TUPLES_DONE, self.done);
        pgrx::check_for_interrupts!();
    }
}

impl RowSink for LoadState<'_, '_> {
    fn row(&mut self, tid: Tid, v: &[f32]) {
        check_dims(self.index, self.dims, v);
        self.tids.push(tid);
        self.vectors.extend_from_slice(v);
        if self.tids.len() == LOAD_BATCH_ROWS {
            self.flush();
        }
    }

    fn null_row(&mut self, tid: Tid) {
        if let Err(e) = self.builder.add_null(tid) {
            raise(self.index, e);
        }
    }
}

/// `maintenance_work_mem` in bytes.
fn maintenance_work_mem() -> usize {
    // SAFETY: a plain GUC variable (kB).
    (unsafe { pg_sys::maintenance_work_mem }) as usize * 1024
}

fn build_threads() -> usize {
    // SAFETY: a plain GUC variable.
    let workers = unsafe { pg_sys::max_parallel_maintenance_workers };
    (workers.max(0) as usize + 1).min(64)
}

/// Builds the index into `fork`; returns (heap tuples, index tuples).
unsafe fn build(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    info: *mut pg_sys::IndexInfo,
    fork: pg_sys::ForkNumber::Type,
) -> (f64, f64) {
    super::indexed_column(index);
    let dims = indexed_dims(index);
    if dims > rsclip_index::MAX_DIMS {
        raise(
            index,
            rsclip_index::Error::TooManyDims {
                dims,
                max: rsclip_index::MAX_DIMS,
            },
        );
    }
    let metric = index_metric(index);
    let requested_lists = options::lists(index);
    // SAFETY: (caller) open relations; the fork is empty.
    let rel = unsafe { IndexRelation::new(index, fork) };
    let row_bytes = dims as usize * 4;
    let mwm = maintenance_work_mem();

    let (sample, rows) = if heap.is_null() {
        (Vec::new(), 0)
    } else {
        // Pass 1: sample.
        progress(pg_sys::PROGRESS_CREATEIDX_SUBPHASE, PHASE_SAMPLE);
        // SAFETY: rd_rel of an open heap.
        let reltuples = unsafe { (*(*heap).rd_rel).reltuples }.max(0.0) as u64;
        let planned_lists = if requested_lists > 0 {
            requested_lists
        } else {
            rsclip_index::default_lists(reltuples)
        };
        let wanted = rsclip_index::sample_size(planned_lists);
        let affordable = (mwm / 2 / row_bytes).max(1);
        if affordable < wanted {
            pgrx::debug1!(
                "rsclip: maintenance_work_mem allows a sample of {affordable} rows instead of {wanted}"
            );
        }
        let mut state = SampleState {
            index,
            dims,
            capacity: wanted.min(affordable),
            sample: Vec::new(),
            seen: 0,
            rng: Rng::new(KMEANS_SEED),
        };
        // SAFETY: Postgres passed open, locked relations and the IndexInfo.
        unsafe { scan_heap(heap, index, info, std::ptr::null_mut(), &mut state) };
        (state.sample, state.seen)
    };

    // Train.
    progress(pg_sys::PROGRESS_CREATEIDX_SUBPHASE, PHASE_TRAIN);
    progress(pg_sys::PROGRESS_CREATEIDX_TUPLES_TOTAL, rows as i64);
    let sample_rows = sample.len() / dims as usize;
    let lists = if rows == 0 {
        0
    } else if requested_lists > 0 {
        requested_lists.min(sample_rows as u32)
    } else {
        rsclip_index::default_lists(rows).min(sample_rows as u32)
    };
    let centroids = if lists == 0 {
        Vec::new()
    } else {
        rsclip_index::train_centroids(
            metric,
            &sample,
            dims as usize,
            lists,
            KMEANS_SEED,
            build_threads(),
        )
        .unwrap_or_else(|e| raise(index, e))
    };
    drop(sample);

    // Pass 2: assign, encode, write.
    progress(pg_sys::PROGRESS_CREATEIDX_SUBPHASE, PHASE_LOAD);
    let params = BuildParams {
        dims,
        metric,
        seed: ROTATION_SEED,
        memory_limit_bytes: mwm.max(1 << 20),
    };
    let mut builder =
        IndexBuilder::new(&rel, &params, &centroids).unwrap_or_else(|e| raise(index, e));
    let mut heap_tuples = 0.0;
    if !heap.is_null() {
        let mut state = LoadState {
            index,
            dims,
            builder: &mut builder,
            threads: build_threads(),
            tids: Vec::with_capacity(LOAD_BATCH_ROWS),
            vectors: Vec::with_capacity(LOAD_BATCH_ROWS * dims as usize),
            done: 0,
        };
        // SAFETY: as for pass 1. The return value counts live heap tuples (the callback also
        // sees recently dead ones), which is what pg_class.reltuples should get.
        heap_tuples = unsafe { scan_heap(heap, index, info, std::ptr::null_mut(), &mut state) };
        if !state.tids.is_empty() {
            state.flush();
        }
    }
    let stats = builder.finish().unwrap_or_else(|e| raise(index, e));
    if stats.flushes > 0 {
        pgrx::debug1!(
            "rsclip: the build flushed its buffered rows {} times to stay within maintenance_work_mem",
            stats.flushes
        );
    }
    if metric == Metric::Cosine && stats.skipped_zero > 0 {
        pgrx::debug1!(
            "rsclip: {} zero vectors have no cosine distance and are not indexed",
            stats.skipped_zero
        );
    }
    progress(pg_sys::PROGRESS_CREATEIDX_TUPLES_DONE, stats.tuples as i64);
    (heap_tuples, (stats.tuples + stats.nulls) as f64)
}

#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn ambuild(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    info: *mut pg_sys::IndexInfo,
) -> *mut pg_sys::IndexBuildResult {
    // SAFETY: Postgres passes open, locked relations and an empty index.
    let (heap_tuples, index_tuples) =
        unsafe { build(heap, index, info, pg_sys::ForkNumber::MAIN_FORKNUM) };
    // SAFETY: palloc0 of the result struct Postgres expects.
    unsafe {
        let result = pg_sys::palloc0(std::mem::size_of::<pg_sys::IndexBuildResult>())
            as *mut pg_sys::IndexBuildResult;
        (*result).heap_tuples = heap_tuples;
        (*result).index_tuples = index_tuples;
        result
    }
}

/// The init fork of an unlogged index: an empty index (one list) that inserts fill after a
/// crash reset.
#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn ambuildempty(index: pg_sys::Relation) {
    let fork = pg_sys::ForkNumber::INIT_FORKNUM;
    // SAFETY: an open index with an empty init fork.
    unsafe { build(std::ptr::null_mut(), index, std::ptr::null_mut(), fork) };
    // GenericXLog does not log unlogged relations, but the init fork must survive a crash: it is
    // what the main fork is reset to.
    // SAFETY: logs full images of every page of the fork just written.
    unsafe {
        let blocks = pg_sys::RelationGetNumberOfBlocksInFork(index, fork);
        pg_sys::log_newpage_range(index, fork, 0, blocks, true);
    }
}
