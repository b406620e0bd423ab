//! Detoast the query vector once per scan, not once per row.
//!
//! In `ORDER BY emb <#> q`, the operator is called once per row with the same `q`. When `q` is a
//! TOAST pointer (a parameter taken from a stored row) or compressed, a plain detoast would fetch
//! or decompress it on every call. We keep the detoasted copy in the call site's `fn_extra` (in
//! `fn_mcxt`, which lives as long as the plan's expression state) keyed by the raw bytes of the
//! toasted datum. An on-disk TOAST pointer names an immutable value (toast relation + value OID),
//! and compressed inline bytes are the value itself, so equal keys mean equal values.
//!
//! Arguments that change on every row (the table column) would only churn the cache: a slot that
//! keeps missing turns itself off.

use crate::datum;
use pgrx::{pg_sys, varlena};

const MAX_MISSES_WITHOUT_HIT: u32 = 16;
/// Keys longer than this (a compressed multi-KB value) are compared by memcmp, still far cheaper
/// than decompressing, but we do not keep more than this many key bytes.
const MAX_KEY_BYTES: usize = 64 * 1024;

#[repr(C)]
struct Slot {
    key: *mut u8,
    key_len: usize,
    value: *mut pg_sys::varlena,
    hits: u32,
    misses_in_a_row: u32,
    disabled: bool,
}

#[repr(C)]
struct Cache {
    slots: [Slot; 2],
}

/// Returns the bytes identifying a toasted datum, if it is of a kind worth caching.
///
/// # Safety
/// `raw` must be a valid varlena.
unsafe fn cache_key<'a>(raw: *const pg_sys::varlena) -> Option<&'a [u8]> {
    // SAFETY: raw is a valid varlena (caller); the sizes read from it bound the slices.
    unsafe {
        if varlena::varatt_is_1b_e(raw) {
            // Only on-disk pointers are stable; expanded/indirect ones point into memory.
            if varlena::vartag_external(raw) as u32 != pg_sys::vartag_external::VARTAG_ONDISK {
                return None;
            }
            let len = varlena::varsize_external(raw);
            Some(std::slice::from_raw_parts(raw as *const u8, len))
        } else if varlena::varatt_is_4b_c(raw) {
            let len = varlena::varsize_4b(raw);
            (len <= MAX_KEY_BYTES).then(|| std::slice::from_raw_parts(raw as *const u8, len))
        } else {
            None
        }
    }
}

/// Runs `f` on the embeddings of arguments `a` and `b`, reusing detoasted copies of repeated
/// toasted arguments across calls from the same expression.
///
/// # Safety
/// `fcinfo` must be the current call's, with non-null `embedding` arguments `a` and `b`.
pub unsafe fn with_args<R>(
    fcinfo: pg_sys::FunctionCallInfo,
    f: impl FnOnce(&[f32], &[f32]) -> R,
) -> R {
    // SAFETY: guaranteed by the caller.
    let (da, db) = unsafe { (crate::fmgr::arg(fcinfo, 0), crate::fmgr::arg(fcinfo, 1)) };
    // SAFETY: both are valid embedding datums (caller).
    if unsafe { datum::is_plain(da) && datum::is_plain(db) } {
        // The common case of a sequential scan over inline values: no copies, no cache.
        // SAFETY: plain datums can be viewed in place for the duration of the call.
        return unsafe {
            f(
                datum::view(da.cast_mut_ptr()),
                datum::view(db.cast_mut_ptr()),
            )
        };
    }
    // SAFETY: fcinfo and its flinfo are valid for the call; the cache lives in fn_mcxt.
    unsafe {
        let a = resolve(fcinfo, 0, da);
        let b = resolve(fcinfo, 1, db);
        let result = f(datum::view(a.ptr), datum::view(b.ptr));
        a.release();
        b.release();
        result
    }
}

struct Resolved {
    ptr: *mut pg_sys::varlena,
    /// A per-call copy to free afterwards (not cached).
    temporary: bool,
}

impl Resolved {
    unsafe fn release(self) {
        if self.temporary {
            // SAFETY: a temporary is a palloc'd detoast copy owned by this call.
            unsafe { pg_sys::pfree(self.ptr.cast()) };
        }
    }
}

unsafe fn resolve(fcinfo: pg_sys::FunctionCallInfo, slot_no: usize, d: pg_sys::Datum) -> Resolved {
    let raw: *mut pg_sys::varlena = d.cast_mut_ptr();
    // SAFETY (whole body): `raw` is a valid varlena; `flinfo`, `fn_extra` and `fn_mcxt` belong to
    // this call site; everything cached is palloc'd in fn_mcxt, which outlives fn_extra.
    unsafe {
        if varlena::varatt_is_4b_u(raw) {
            return Resolved {
                ptr: raw,
                temporary: false,
            };
        }
        let flinfo = (*fcinfo).flinfo;
        let key = if flinfo.is_null() {
            None
        } else {
            cache_key(raw)
        };
        let Some(key) = key else {
            return Resolved {
                ptr: pg_sys::pg_detoast_datum(raw),
                temporary: true,
            };
        };
        if (*flinfo).fn_extra.is_null() {
            (*flinfo).fn_extra =
                pg_sys::MemoryContextAllocZero((*flinfo).fn_mcxt, std::mem::size_of::<Cache>());
        }
        let cache = &mut *((*flinfo).fn_extra as *mut Cache);
        let slot = &mut cache.slots[slot_no];
        if slot.disabled {
            return Resolved {
                ptr: pg_sys::pg_detoast_datum(raw),
                temporary: true,
            };
        }
        if !slot.value.is_null()
            && slot.key_len == key.len()
            && std::slice::from_raw_parts(slot.key, slot.key_len) == key
        {
            slot.hits = slot.hits.saturating_add(1);
            slot.misses_in_a_row = 0;
            return Resolved {
                ptr: slot.value,
                temporary: false,
            };
        }
        slot.misses_in_a_row += 1;
        if slot.hits == 0 && slot.misses_in_a_row > MAX_MISSES_WITHOUT_HIT {
            slot.disabled = true;
        }
        if !slot.value.is_null() {
            pg_sys::pfree(slot.value.cast());
            pg_sys::pfree(slot.key.cast());
            slot.value = std::ptr::null_mut();
        }
        let old = pg_sys::MemoryContextSwitchTo((*flinfo).fn_mcxt);
        let value = pg_sys::pg_detoast_datum(raw);
        let key_copy = pg_sys::palloc(key.len()) as *mut u8;
        pg_sys::MemoryContextSwitchTo(old);
        std::ptr::copy_nonoverlapping(key.as_ptr(), key_copy, key.len());
        slot.key = key_copy;
        slot.key_len = key.len();
        slot.value = value;
        Resolved {
            ptr: value,
            temporary: false,
        }
    }
}
