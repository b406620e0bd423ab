//! The result cache: a per-backend LRU in front of the shared table `rsclip_cache`.
//!
//! An encoder call computes each input's key (model fingerprint, kind, sha256 of the input) and
//! takes what it can from the LRU, then the rest from the table in one query; only what is still
//! missing is encoded, in one inference run, and the new results go into the LRU and the table.
//!
//! Who may write: ordinary roles have no privileges on the table; the lookups and inserts run as
//! the table's owner (a local user-id switch with `SECURITY_RESTRICTED_OPERATION`, as Postgres
//! does for maintenance commands), with every table, function and operator schema-qualified so
//! the caller's search_path cannot redirect them.
//!
//! The cache never makes a caller fail or wait: a write that could conflict is skipped ("not
//! cached this time"), never an ERROR, a lock wait or a deadlock.
//! - Writes are skipped in read-only transactions, on hot standbys, in parallel mode and in
//!   serializable transactions (shared cache rows would add serialization failures between
//!   unrelated transactions).
//! - The table and its key index are locked conditionally; a maintenance command holding them
//!   (`rsclip_cache_prune`, VACUUM FULL, ...) means a miss or a skipped write.
//! - An insert could wait on another transaction's uncommitted row of the same key, so each key
//!   is first try-locked (an advisory lock of our own class, keys in sorted order, released
//!   after the insert), then probed with a dirty snapshot, which sees uncommitted rows and rows
//!   committed after our snapshot: a key with any such row is skipped. Inserting only keys that
//!   have no row at all is what keeps `ON CONFLICT` from ever waiting, and from raising 40001
//!   under REPEATABLE READ (a conflict with a row the snapshot cannot see).
//! - Table hits bump `hits`/`last_used` only under READ COMMITTED (a row updated after a
//!   REPEATABLE READ snapshot would raise 40001), only on rows nobody else has locked
//!   (`SKIP LOCKED`), and at most once a minute per row (the first hit at once): a backend counts
//!   further hits in memory and adds them with its next write to that row, so a hot entry is not
//!   rewritten on every lookup.

use crate::fmgr::error;
use crate::settings;
use pgrx::{pg_sys, PgSqlErrorCode};
use rsclip_core::lru::Lru;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
    Text,
    Image,
    /// A text before normalization: per-backend LRU only (a repeated query string then skips
    /// the tokenizer's normalization), never stored in the table.
    RawText,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Text | Kind::RawText => "text",
            Kind::Image => "image",
        }
    }
}

/// What a cached embedding is stored under.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Key {
    pub model: [u8; 32],
    pub kind: Kind,
    pub input: [u8; 32],
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The model part of the key: the model files' fingerprint plus, for images, the settings that
/// change what an image decodes to. A different model or setting never meets old entries.
pub fn model_key(kind: Kind, fingerprint: &str, decoding: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"rsclip-cache-v1\0");
    h.update(kind.name().as_bytes());
    h.update(b"\0");
    h.update(fingerprint.as_bytes());
    h.update(b"\0");
    h.update(decoding.as_bytes());
    h.finalize().into()
}

/// Whether encoders of `kind` use the cache now.
pub fn enabled(kind: Kind) -> bool {
    settings::CACHE.get() && (kind == Kind::Text || settings::CACHE_IMAGES.get())
}

#[derive(Default, Clone, Copy)]
struct Counters {
    lru_hits: u64,
    table_hits: u64,
    misses: u64,
    writes_skipped: u64,
}

/// Prepared statements on one cache table, kept for the backend's lifetime.
#[derive(Clone, Copy)]
struct Plans {
    relid: pg_sys::Oid,
    lookup: pg_sys::SPIPlanPtr,
    insert: pg_sys::SPIPlanPtr,
    touch: pg_sys::SPIPlanPtr,
    /// The table's live rows as the statistics see them, plus this transaction's changes.
    count: pg_sys::SPIPlanPtr,
    /// Deletes up to $2 of the least recently used rows of a $1 % sample of the table's pages.
    evict: pg_sys::SPIPlanPtr,
}

#[derive(Default)]
struct State {
    lru: Lru<Key, Box<[f32]>>,
    counters: Counters,
    plans: Option<Plans>,
    /// Table hits not yet added to their rows' `hits` (see the module comment).
    pending_hits: HashMap<Key, i64>,
}

/// Hits a row may have written to it at most this often (besides its first).
const TOUCH_INTERVAL: &str = "1 minute";
/// Bound on the entries with unwritten hits a backend keeps; beyond it new ones are not
/// counted (the counter is a statistic, the cache itself is unaffected).
const MAX_PENDING_HITS: usize = 16384;

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// The cache table of the installed extension, and what is needed to use it.
#[derive(Clone, Copy)]
struct Table {
    relid: pg_sys::Oid,
    /// Its primary key index on (model, kind, input_sha256).
    key_index: pg_sys::Oid,
    owner: pg_sys::Oid,
    embedding_array: pg_sys::Oid,
}

/// The schema of the encoder function being called: the extension's schema, where the cache
/// table lives.
///
/// # Safety
/// `fcinfo` is the current call's.
pub unsafe fn function_namespace(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Oid {
    // SAFETY: (caller) a live call; its flinfo names the function.
    unsafe { pg_sys::get_func_namespace((*(*fcinfo).flinfo).fn_oid) }
}

/// Finds `rsclip_cache` in `namespace`; None when it is not there (the extension is being
/// created or dropped, or the table was removed).
fn find_table(namespace: pg_sys::Oid) -> Option<Table> {
    // SAFETY: catalog lookups by name and OID in a transaction; the syscache tuple is released
    // before returning.
    unsafe {
        let relid = pg_sys::get_relname_relid(c"rsclip_cache".as_ptr(), namespace);
        let key_index = pg_sys::get_relname_relid(c"rsclip_cache_pkey".as_ptr(), namespace);
        if relid == pg_sys::InvalidOid || key_index == pg_sys::InvalidOid {
            return None;
        }
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(relid),
        );
        if tuple.is_null() {
            return None;
        }
        let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tuple)).relowner;
        pg_sys::ReleaseSysCache(tuple);
        let embedding = pg_sys::get_atttype(relid, 4);
        let embedding_array = pg_sys::get_array_type(embedding);
        if embedding_array == pg_sys::InvalidOid {
            return None;
        }
        Some(Table {
            relid,
            key_index,
            owner,
            embedding_array,
        })
    }
}

/// What this transaction may write to the cache (see the module comment).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Writes {
    Nothing,
    /// New entries, but no hit counters (REPEATABLE READ).
    Inserts,
    /// New entries and hit counters (READ COMMITTED).
    All,
}

fn writes_allowed() -> Writes {
    // SAFETY: plain reads of transaction-state globals.
    unsafe {
        if pg_sys::XactReadOnly
            || pg_sys::IsInParallelMode()
            || pg_sys::RecoveryInProgress()
            || pg_sys::XactIsoLevel == pg_sys::XACT_SERIALIZABLE as i32
        {
            Writes::Nothing
        } else if pg_sys::XactIsoLevel == pg_sys::XACT_REPEATABLE_READ as i32 {
            Writes::Inserts
        } else {
            Writes::All
        }
    }
}

/// Locks `relid` in `mode` unless that would wait; the lock is then held to the end of the
/// transaction, as the statements that follow would hold it anyway.
fn try_lock_relation(relid: pg_sys::Oid, mode: u32) -> bool {
    // SAFETY: a conditional heavyweight lock in a transaction, then a syscache probe: the OIDs
    // were looked up by name before any lock, so a DROP EXTENSION or REINDEX CONCURRENTLY that
    // committed in between leaves a dead OID, which the probe (current after the lock's
    // invalidation processing) reports; then the cache is skipped instead of failing.
    unsafe {
        pg_sys::ConditionalLockRelationOid(relid, mode as pg_sys::LOCKMODE)
            && pg_sys::SearchSysCacheExists(
                pg_sys::SysCacheIdentifier::RELOID as i32,
                pg_sys::Datum::from(relid),
                pg_sys::Datum::from(0),
                pg_sys::Datum::from(0),
                pg_sys::Datum::from(0),
            )
    }
}

/// Locks the table and its key index in `mode` unless that would wait.
fn try_lock_table(table: &Table, mode: u32) -> bool {
    try_lock_relation(table.relid, mode) && try_lock_relation(table.key_index, mode)
}

/// The advisory lock class of cache keys (`objsubid` in pg_locks; SQL's advisory locks use 1
/// and 2, so ours never meet a user's).
const KEY_LOCK_CLASS: u16 = 0x5243;
/// Keys locked at once: bounds what a large array call takes of the shared lock table.
const KEY_LOCK_BATCH: usize = 64;

/// The lock tag of one key. 64 bits of the key suffice: two keys that share a tag only make
/// one of them skip its write when both are written at the same moment.
fn key_lock_tag(model: &[u8; 32], kind: Kind, input: &[u8; 32]) -> pg_sys::LOCKTAG {
    let mut bits = [0u8; 8];
    for (i, b) in bits.iter_mut().enumerate() {
        *b = input[i] ^ model[i];
    }
    bits[0] ^= kind as u8;
    // SAFETY: reads the backend's database OID, set before any SQL runs.
    let database = unsafe { pg_sys::MyDatabaseId };
    pg_sys::LOCKTAG {
        locktag_field1: database.to_u32(),
        locktag_field2: u32::from_le_bytes(bits[0..4].try_into().expect("4 bytes")),
        locktag_field3: u32::from_le_bytes(bits[4..8].try_into().expect("4 bytes")),
        locktag_field4: KEY_LOCK_CLASS,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

/// Takes the lock `tag` unless that would wait (or the lock table is full).
fn try_lock_key(tag: &pg_sys::LOCKTAG) -> bool {
    let mode = pg_sys::ExclusiveLock as pg_sys::LOCKMODE;
    let no_local = std::ptr::null_mut();
    // Transaction-level, don't wait, and no ERROR when the lock table is full (a skipped write).
    // SAFETY: a lock of the user lock method; on ERROR, abort releases it.
    #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
    let result = unsafe { pg_sys::LockAcquireExtended(tag, mode, false, true, false, no_local) };
    // SAFETY: as above (PostgreSQL 18 adds logLockFailure).
    #[cfg(feature = "pg18")]
    let result =
        unsafe { pg_sys::LockAcquireExtended(tag, mode, false, true, false, no_local, false) };
    result != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

fn unlock_key(tag: &pg_sys::LOCKTAG) {
    // SAFETY: releases a transaction-level lock try_lock_key took.
    unsafe { pg_sys::LockRelease(tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, false) };
}

/// Probes the key index with a dirty snapshot: which of `inputs` have a row of any state other
/// than dead (committed, committed after our snapshot, being inserted or being deleted).
/// The caller holds RowExclusiveLock on both relations.
fn keys_with_rows(table: &Table, model: &[u8; 32], kind: Kind, inputs: &[[u8; 32]]) -> Vec<bool> {
    // SAFETY: the relations are locked by the caller; the scan, slot and relations are released
    // before returning (on ERROR, abort releases them); the scan keys' datums live to the end.
    unsafe {
        let heap = pg_sys::table_open(table.relid, pg_sys::NoLock as pg_sys::LOCKMODE);
        let index = pg_sys::index_open(table.key_index, pg_sys::NoLock as pg_sys::LOCKMODE);
        let mut dirty: pg_sys::SnapshotData = std::mem::zeroed();
        dirty.snapshot_type = pg_sys::SnapshotType::SNAPSHOT_DIRTY;
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        let scan = pg_sys::index_beginscan(heap, index, &mut dirty, 3, 0);
        #[cfg(feature = "pg18")]
        let scan = pg_sys::index_beginscan(heap, index, &mut dirty, std::ptr::null_mut(), 3, 0);
        let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
        let collations = (*index).rd_indcollation;
        let model_datum = crate::fmgr::bytea_datum(model);
        let kind_datum = crate::fmgr::text_datum(kind.name());
        let mut found = Vec::with_capacity(inputs.len());
        for input in inputs {
            let input_datum = crate::fmgr::bytea_datum(input);
            let mut keys: [pg_sys::ScanKeyData; 3] = std::mem::zeroed();
            let columns = [
                (model_datum, pg_sys::F_BYTEAEQ),
                (kind_datum, pg_sys::F_TEXTEQ),
                (input_datum, pg_sys::F_BYTEAEQ),
            ];
            for (i, (datum, proc_)) in columns.into_iter().enumerate() {
                pg_sys::ScanKeyEntryInitialize(
                    &mut keys[i],
                    0,
                    (i + 1) as pg_sys::AttrNumber,
                    pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                    pg_sys::InvalidOid,
                    *collations.add(i),
                    pg_sys::Oid::from(proc_),
                    datum,
                );
            }
            pg_sys::index_rescan(scan, keys.as_mut_ptr(), 3, std::ptr::null_mut(), 0);
            found.push(pg_sys::index_getnext_slot(
                scan,
                pg_sys::ScanDirection::ForwardScanDirection,
                slot,
            ));
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        found
    }
}

/// Runs `f` as `owner` (a local user-id change, restricted like a maintenance command). An ERROR
/// inside unwinds through the guard, which restores the caller's identity; transaction abort
/// would restore it too.
fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    struct Restore(pg_sys::Oid, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores what GetUserIdAndSecContext returned below.
            unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) };
        }
    }
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: reads and sets this backend's current user id and security context.
    let _restore = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        Restore(user, context)
    };
    f()
}

/// Connects to SPI for `f`.
fn with_spi<R>(f: impl FnOnce() -> R) -> R {
    struct Finish;
    impl Drop for Finish {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                // SAFETY: pairs with the SPI_connect below (on an ERROR, abort cleans up SPI).
                unsafe { pg_sys::SPI_finish() };
            }
        }
    }
    // SAFETY: SPI_connect in a transaction; Finish disconnects.
    let status = unsafe { pg_sys::SPI_connect() };
    if status < 0 {
        error(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("rsclip: SPI_connect failed ({status})"),
        );
    }
    let _finish = Finish;
    f()
}

fn prepare(sql: &str, types: &[pg_sys::Oid]) -> pg_sys::SPIPlanPtr {
    let sql = CString::new(sql).expect("no NUL in our SQL");
    // SAFETY: inside with_spi; the argument type array lives for the call.
    unsafe {
        let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_ptr() as *mut _);
        if plan.is_null() {
            let code = pg_sys::SPI_result;
            error(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!("rsclip: could not prepare a cache query ({code})"),
            );
        }
        pg_sys::SPI_keepplan(plan);
        plan
    }
}

/// The kept plans for `table`, prepared on first use (inside with_spi).
fn plans(state: &mut State, table: &Table) -> Plans {
    if let Some(p) = &state.plans {
        if p.relid == table.relid {
            return *p;
        }
    }
    if let Some(old) = state.plans.take() {
        // SAFETY: plans we kept; nothing else refers to them.
        unsafe {
            for plan in [old.lookup, old.insert, old.touch, old.count, old.evict] {
                pg_sys::SPI_freeplan(plan);
            }
        }
    }
    // SAFETY: catalog lookups of an existing relation; the names are quoted by Postgres.
    let name = unsafe {
        let namespace = pg_sys::get_rel_namespace(table.relid);
        let nsp = pg_sys::get_namespace_name(namespace);
        let quoted = CStr::from_ptr(pg_sys::quote_identifier(nsp)).to_string_lossy();
        format!("{quoted}.rsclip_cache")
    };
    let eq = "OPERATOR(pg_catalog.=)";
    let bytea = pg_sys::BYTEAOID;
    let text = pg_sys::TEXTOID;
    let bytea_array = pg_sys::BYTEAARRAYOID;
    let int8_array = pg_sys::INT8ARRAYOID;
    // The third column says whether the row's hit counter is due for a write.
    let lookup = prepare(
        &format!(
            "SELECT input_sha256, embedding, \
                    (hits {eq} 0 OR last_used OPERATOR(pg_catalog.<) \
                     (pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.interval '{TOUCH_INTERVAL}')) \
             FROM {name} \
             WHERE model {eq} $1 AND kind {eq} $2 AND input_sha256 {eq} ANY ($3)"
        ),
        &[bytea, text, bytea_array],
    );
    let insert = prepare(
        &format!(
            "INSERT INTO {name} (model, kind, input_sha256, embedding) \
             SELECT $1, $2, u.h, u.e \
             FROM ROWS FROM (pg_catalog.unnest($3), pg_catalog.unnest($4)) AS u(h, e) \
             ON CONFLICT ON CONSTRAINT rsclip_cache_pkey DO NOTHING"
        ),
        &[bytea, text, bytea_array, table.embedding_array],
    );
    let touch = prepare(
        &format!(
            "UPDATE {name} AS c SET hits = c.hits OPERATOR(pg_catalog.+) d.n, \
                 last_used = pg_catalog.now() \
             FROM (SELECT l.ctid AS t, u.n FROM {name} AS l \
                   JOIN ROWS FROM (pg_catalog.unnest($3), pg_catalog.unnest($4)) AS u(h, n) \
                     ON l.input_sha256 {eq} u.h \
                   WHERE l.model {eq} $1 AND l.kind {eq} $2 \
                   FOR UPDATE OF l SKIP LOCKED) AS d \
             WHERE c.ctid {eq} d.t"
        ),
        &[bytea, text, bytea_array, int8_array],
    );
    // With track_counts off the statistics stay at zero: count the rows then (slower, but
    // the bound holds).
    let count = prepare(
        &format!(
            "SELECT CASE WHEN pg_catalog.current_setting('track_counts')::pg_catalog.bool \
                THEN pg_catalog.pg_stat_get_live_tuples($1) \
                     OPERATOR(pg_catalog.+) pg_catalog.pg_stat_get_xact_tuples_inserted($1) \
                     OPERATOR(pg_catalog.-) pg_catalog.pg_stat_get_xact_tuples_deleted($1) \
                ELSE (SELECT pg_catalog.count(*) FROM {name}) END"
        ),
        &[pg_sys::OIDOID],
    );
    // Sampled LRU (as Redis approximates it): no index on last_used, which would make every
    // hit-counter update a non-HOT one. SKIP LOCKED: never waits on a row someone holds.
    let evict = prepare(
        &format!(
            "DELETE FROM {name} WHERE ctid {eq} ANY (ARRAY( \
                 SELECT s.ctid FROM {name} AS s TABLESAMPLE SYSTEM ($1) \
                 ORDER BY s.last_used LIMIT $2 FOR UPDATE OF s SKIP LOCKED))"
        ),
        &[pg_sys::FLOAT4OID, pg_sys::INT8OID],
    );
    let plans = Plans {
        relid: table.relid,
        lookup,
        insert,
        touch,
        count,
        evict,
    };
    state.plans = Some(plans);
    plans
}

fn bytea_array(items: &[[u8; 32]]) -> pg_sys::Datum {
    let values: Vec<Option<pg_sys::Datum>> = items
        .iter()
        .map(|h| Some(crate::fmgr::bytea_datum(h)))
        .collect();
    // SAFETY: bytea datums.
    unsafe { crate::fmgr::array_datum(pg_sys::BYTEAOID, &values, 1) }
}

fn int8_array(items: &[i64]) -> pg_sys::Datum {
    let values: Vec<Option<pg_sys::Datum>> = items
        .iter()
        .map(|&n| Some(pg_sys::Datum::from(n)))
        .collect();
    // SAFETY: int8 datums (by value).
    unsafe { crate::fmgr::array_datum(pg_sys::INT8OID, &values, 1) }
}

fn embedding_array(type_oid: pg_sys::Oid, vectors: &[&[f32]]) -> pg_sys::Datum {
    let values: Vec<Option<pg_sys::Datum>> = vectors
        .iter()
        .map(|v| Some(crate::datum::from_slice(v)))
        .collect();
    // SAFETY: embedding datums of the element type of the table's own embedding[] type.
    unsafe { crate::fmgr::array_datum(pg_sys::get_element_type(type_oid), &values, 1) }
}

/// Runs a kept plan; returns the SPI status.
fn execute(plan: pg_sys::SPIPlanPtr, args: &mut [pg_sys::Datum], read_only: bool) -> i32 {
    let nulls = vec![b' ' as std::ffi::c_char; args.len()];
    // SAFETY: inside with_spi; the plan takes exactly these arguments.
    let status =
        unsafe { pg_sys::SPI_execute_plan(plan, args.as_mut_ptr(), nulls.as_ptr(), read_only, 0) };
    if status < 0 {
        error(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("rsclip: a cache query failed ({status})"),
        );
    }
    status
}

/// Looks `inputs` up in the table: (input hash, embedding) of those present.
fn table_lookup(
    state: &mut State,
    table: &Table,
    model: &[u8; 32],
    kind: Kind,
    inputs: &[[u8; 32]],
    touch_hits: bool,
) -> HashMap<[u8; 32], Box<[f32]>> {
    if !try_lock_table(table, pg_sys::AccessShareLock) {
        return HashMap::new();
    }
    as_owner(table.owner, || {
        with_spi(|| {
            let Plans { lookup, touch, .. } = plans(state, table);
            let mut args = [
                crate::fmgr::bytea_datum(model),
                crate::fmgr::text_datum(kind.name()),
                bytea_array(inputs),
            ];
            execute(lookup, &mut args, true);
            let mut found = HashMap::new();
            let mut due = Vec::new();
            // SAFETY: SPI_tuptable holds SPI_processed rows of (bytea, embedding, bool); the
            // values are copied out before SPI_finish frees them.
            unsafe {
                let table = pg_sys::SPI_tuptable;
                let n = pg_sys::SPI_processed as usize;
                if !table.is_null() {
                    for i in 0..n {
                        let row = *(*table).vals.add(i);
                        let mut null = false;
                        let h = pg_sys::SPI_getbinval(row, (*table).tupdesc, 1, &mut null);
                        if null {
                            continue;
                        }
                        let h = crate::fmgr::bytea_bytes(h);
                        let e = pg_sys::SPI_getbinval(row, (*table).tupdesc, 2, &mut null);
                        if null || h.len() != 32 {
                            continue;
                        }
                        let v: Box<[f32]> = crate::datum::with(e, |v| v.into());
                        let h: [u8; 32] = h.try_into().expect("32 bytes");
                        let d = pg_sys::SPI_getbinval(row, (*table).tupdesc, 3, &mut null);
                        if !null && d.value() != 0 {
                            due.push(h);
                        }
                        found.insert(h, v);
                    }
                }
            }
            let key_of = |input: &[u8; 32]| Key {
                model: *model,
                kind,
                input: *input,
            };
            for input in found.keys() {
                let key = key_of(input);
                if let Some(n) = state.pending_hits.get_mut(&key) {
                    *n += 1;
                } else if state.pending_hits.len() < MAX_PENDING_HITS {
                    state.pending_hits.insert(key, 1);
                }
            }
            if touch_hits && !due.is_empty() && try_lock_table(table, pg_sys::RowExclusiveLock) {
                let counts: Vec<i64> = due
                    .iter()
                    .map(|input| state.pending_hits.remove(&key_of(input)).unwrap_or(1))
                    .collect();
                let mut args = [
                    crate::fmgr::bytea_datum(model),
                    crate::fmgr::text_datum(kind.name()),
                    bytea_array(&due),
                    int8_array(&counts),
                ];
                execute(touch, &mut args, false);
            }
            found
        })
    })
}

/// Inserts the rows whose keys have no row yet and are not being written by anyone else right
/// now (see the module comment); returns how many were skipped.
fn table_insert(
    state: &mut State,
    table: &Table,
    model: &[u8; 32],
    kind: Kind,
    rows: &[([u8; 32], &[f32])],
    writes: Writes,
) -> usize {
    if !try_lock_table(table, pg_sys::RowExclusiveLock)
        || !make_room(state, table, rows.len(), writes)
    {
        return rows.len();
    }
    let mut sorted: Vec<&([u8; 32], &[f32])> = rows.iter().collect();
    sorted.sort_by_key(|r| r.0);
    let mut skipped = 0;
    for batch in sorted.chunks(KEY_LOCK_BATCH) {
        let mut locked = Vec::with_capacity(batch.len());
        let mut candidates = Vec::with_capacity(batch.len());
        for row in batch {
            let tag = key_lock_tag(model, kind, &row.0);
            if try_lock_key(&tag) {
                locked.push(tag);
                candidates.push(*row);
            }
        }
        let inputs: Vec<[u8; 32]> = candidates.iter().map(|r| r.0).collect();
        let present = keys_with_rows(table, model, kind, &inputs);
        let new: Vec<&([u8; 32], &[f32])> = candidates
            .iter()
            .zip(&present)
            .filter(|(_, present)| !**present)
            .map(|(row, _)| *row)
            .collect();
        skipped += batch.len() - new.len();
        if !new.is_empty() {
            as_owner(table.owner, || {
                with_spi(|| {
                    let insert = plans(state, table).insert;
                    let hashes: Vec<[u8; 32]> = new.iter().map(|r| r.0).collect();
                    let vectors: Vec<&[f32]> = new.iter().map(|r| r.1).collect();
                    let mut args = [
                        crate::fmgr::bytea_datum(model),
                        crate::fmgr::text_datum(kind.name()),
                        bytea_array(&hashes),
                        embedding_array(table.embedding_array, &vectors),
                    ];
                    execute(insert, &mut args, false);
                })
            });
        }
        // Our new rows are in the index now: whoever locks these keys next sees them.
        for tag in &locked {
            unlock_key(tag);
        }
    }
    skipped
}

/// Keeps the table within `rsclip.cache_max_rows` before `adding` rows go in: under READ
/// COMMITTED by evicting the least recently used of a sample, elsewhere (where locking rows
/// updated after the snapshot would raise 40001) by refusing the insert. False: skip it.
fn make_room(state: &mut State, table: &Table, adding: usize, writes: Writes) -> bool {
    let max = settings::CACHE_MAX_ROWS.get().max(0) as i64;
    if max == 0 {
        return false;
    }
    as_owner(table.owner, || {
        with_spi(|| {
            let plans = plans(state, table);
            let mut args = [pg_sys::Datum::from(table.relid)];
            execute(plans.count, &mut args, true);
            // SAFETY: one row of one int8 column (NULL never: the functions return 0).
            let live = unsafe {
                let tuptable = pg_sys::SPI_tuptable;
                let mut null = false;
                let d = pg_sys::SPI_getbinval(*(*tuptable).vals, (*tuptable).tupdesc, 1, &mut null);
                if null {
                    0
                } else {
                    d.value() as i64
                }
            };
            let excess = live + adding as i64 - max;
            if excess <= 0 {
                return true;
            }
            if writes != Writes::All {
                return false;
            }
            // A little more than needed, so that a full table does not evict on every insert.
            let evict = (excess + (max / 100).max(1)).min(EVICT_AT_ONCE);
            let percent =
                (100.0 * (EVICT_SAMPLE * evict) as f64 / live.max(1) as f64).clamp(0.01, 100.0);
            let mut args = [
                crate::fmgr::float4_datum(percent as f32),
                pg_sys::Datum::from(evict),
            ];
            execute(plans.evict, &mut args, false);
            true
        })
    })
}

/// Rows one insert evicts at most, and how many rows per evicted one the sample holds.
const EVICT_AT_ONCE: i64 = 1000;
const EVICT_SAMPLE: i64 = 8;

/// The embeddings of the inputs whose keys are `keys` (all of one model and kind): from the
/// LRU, the table, or `encode`, which is called at most once with the positions (into `keys`)
/// of the distinct inputs found nowhere, and returns their normalized embeddings in order.
/// `namespace` is the extension's schema (where the table is).
pub fn resolve(
    namespace: pg_sys::Oid,
    keys: &[Key],
    encode: &mut dyn FnMut(&[usize]) -> Vec<Vec<f32>>,
) -> Vec<Vec<f32>> {
    let Some(first) = keys.first() else {
        return Vec::new();
    };
    let (model, kind) = (first.model, first.kind);
    debug_assert!(keys.iter().all(|k| k.model == model && k.kind == kind));
    let capacity = settings::CACHE_LRU_SIZE.get().max(0) as usize;
    let mut out: Vec<Option<Vec<f32>>> = vec![None; keys.len()];
    // Positions of each distinct input not in the LRU.
    let mut missing: HashMap<[u8; 32], Vec<usize>> = HashMap::new();
    let mut order: Vec<[u8; 32]> = Vec::new();
    STATE.with_borrow_mut(|state| {
        state.lru.shrink_to(capacity); // the setting may have been lowered
        for (i, key) in keys.iter().enumerate() {
            if let Some(v) = state.lru.get(key) {
                out[i] = Some(v.to_vec());
                state.counters.lru_hits += 1;
            } else {
                let positions = missing.entry(key.input).or_default();
                if positions.is_empty() {
                    order.push(key.input);
                }
                positions.push(i);
            }
        }
    });
    if missing.is_empty() {
        return out.into_iter().map(|v| v.expect("filled")).collect();
    }
    let table = find_table(namespace);
    let writes = writes_allowed();
    if let Some(table) = &table {
        let touch = writes == Writes::All;
        let found =
            STATE.with_borrow_mut(|state| table_lookup(state, table, &model, kind, &order, touch));
        STATE.with_borrow_mut(|state| {
            for (input, v) in found {
                if let Some(positions) = missing.remove(&input) {
                    for &p in &positions {
                        out[p] = Some(v.to_vec());
                    }
                    state.counters.table_hits += 1;
                    state.lru.put(Key { model, kind, input }, v, capacity);
                }
            }
        });
        order.retain(|h| missing.contains_key(h));
    }
    if order.is_empty() {
        return out.into_iter().map(|v| v.expect("filled")).collect();
    }
    let firsts: Vec<usize> = order.iter().map(|h| missing[h][0]).collect();
    let encoded = encode(&firsts);
    assert_eq!(encoded.len(), firsts.len(), "one embedding per input");
    let rows: Vec<([u8; 32], &[f32])> = order
        .iter()
        .zip(&encoded)
        .map(|(h, v)| (*h, &v[..]))
        .collect();
    let skipped = match (&table, writes) {
        (Some(table), Writes::Inserts | Writes::All) => {
            STATE.with_borrow_mut(|state| table_insert(state, table, &model, kind, &rows, writes))
        }
        _ => rows.len(),
    };
    STATE.with_borrow_mut(|state| state.counters.writes_skipped += skipped as u64);
    STATE.with_borrow_mut(|state| {
        state.counters.misses += order.len() as u64;
        for (input, v) in order.iter().zip(&encoded) {
            for &p in &missing[input] {
                out[p] = Some(v.clone());
            }
            state.lru.put(
                Key {
                    model,
                    kind,
                    input: *input,
                },
                v.clone().into(),
                capacity,
            );
        }
    });
    out.into_iter().map(|v| v.expect("filled")).collect()
}

/// The LRU's values for `keys` (hits are counted), without touching the table.
pub fn lru_lookup(keys: &[Key]) -> Vec<Option<Vec<f32>>> {
    let capacity = settings::CACHE_LRU_SIZE.get().max(0) as usize;
    STATE.with_borrow_mut(|state| {
        state.lru.shrink_to(capacity);
        keys.iter()
            .map(|k| {
                let v = state.lru.get(k).map(|v| v.to_vec());
                if v.is_some() {
                    state.counters.lru_hits += 1;
                }
                v
            })
            .collect()
    })
}

/// Adds `values` to the LRU under `keys`.
pub fn lru_remember(keys: &[Key], values: &[Vec<f32>]) {
    let capacity = settings::CACHE_LRU_SIZE.get().max(0) as usize;
    STATE.with_borrow_mut(|state| {
        for (k, v) in keys.iter().zip(values) {
            state.lru.put(*k, v.clone().into(), capacity);
        }
    })
}

/// This backend's counters as JSON (for rsclip_cache_stats()).
pub fn backend_stats_json() -> String {
    STATE.with_borrow(|state| {
        let c = state.counters;
        serde_json::json!({
            "lru_hits": c.lru_hits,
            "table_hits": c.table_hits,
            "misses": c.misses,
            "writes_skipped": c.writes_skipped,
            "lru_entries": state.lru.len(),
        })
        .to_string()
    })
}
