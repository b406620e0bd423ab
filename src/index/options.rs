//! `CREATE INDEX ... USING rsclip (...) WITH (lists = N)`: the index's storage parameters.
//! Query-time settings (`rsclip.probes`, `rsclip.max_probes`) live in `crate::settings`.

use pgrx::pg_sys;
use std::sync::atomic::{AtomicU32, Ordering};

/// Largest `lists` accepted (the on-disk format's limit).
pub const MAX_LISTS: i32 = rsclip_index::MAX_LISTS as i32;

/// The reloptions struct `build_reloptions` fills (a varlena: header first).
#[repr(C)]
pub struct Options {
    vl_len_: i32,
    /// Number of IVF lists; 0 = derived from the row count at build time.
    pub lists: i32,
}

static RELOPT_KIND: AtomicU32 = AtomicU32::new(0);

/// Registers the reloptions (from `_PG_init`).
pub fn register() {
    // SAFETY: called once from _PG_init in the postmaster or a backend, as reloption
    // registration must be; the strings are static.
    unsafe {
        let kind = pg_sys::add_reloption_kind();
        RELOPT_KIND.store(kind as u32, Ordering::Relaxed);
        pg_sys::add_int_reloption(
            kind as _,
            c"lists".as_ptr(),
            c"Number of IVF lists (0 = rows/300 up to 30k rows, rising to 1000 at 100k rows, sqrt(10*rows) beyond)".as_ptr(),
            0,
            0,
            MAX_LISTS,
            pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE,
        );
    }
}

#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn amoptions(
    reloptions: pg_sys::Datum,
    validate: bool,
) -> *mut pg_sys::bytea {
    let table = [pg_sys::relopt_parse_elt {
        optname: c"lists".as_ptr(),
        opttype: pg_sys::relopt_type::RELOPT_TYPE_INT,
        offset: std::mem::offset_of!(Options, lists) as i32,
        #[cfg(feature = "pg18")]
        isset_offset: 0,
    }];
    // SAFETY: build_reloptions parses the text[] datum against our one-entry table into a
    // palloc'd Options (or returns NULL when there are no options).
    unsafe {
        pg_sys::build_reloptions(
            reloptions,
            validate,
            RELOPT_KIND.load(Ordering::Relaxed) as _,
            std::mem::size_of::<Options>(),
            table.as_ptr(),
            table.len() as i32,
        ) as *mut pg_sys::bytea
    }
}

/// `lists` of an index (0 = automatic).
pub fn lists(index: pg_sys::Relation) -> u32 {
    // SAFETY: rd_options is NULL or the Options varlena amoptions built for this index.
    unsafe {
        let opts = (*index).rd_options as *const Options;
        if opts.is_null() {
            0
        } else {
            (*opts).lists.max(0) as u32
        }
    }
}
