//! In-memory layout of an `embedding` value and safe access to it.
//!
//! Layout (the same bytes as pgvector's `vector`, so casts are copies):
//! 4-byte varlena header, `u16` dimension count, `u16` reserved (0), then `dims` native `f32`s.
//! The type is declared `STORAGE = main` and `ALIGNMENT = int4`: values up to ~2000 dimensions stay
//! inline in the heap tuple, so a sequential scan reads them in place without TOAST fetches or
//! copies (pgvector's `external` storage costs a TOAST lookup per row).

use pgrx::{pg_sys, varlena};
use rsclip_core::MAX_DIMS;

pub const HEADER_BYTES: usize = 8;
const DIMS_OFFSET: usize = 4;

/// Allocates an embedding of `dims` zeroed elements in the current memory context and returns it
/// with its element slice to fill in.
pub fn alloc(dims: usize) -> (pg_sys::Datum, &'static mut [f32]) {
    debug_assert!((1..=MAX_DIMS).contains(&dims));
    let total = HEADER_BYTES + 4 * dims;
    // SAFETY: palloc0 returns `total` zeroed bytes, MAXALIGNed, or raises an ERROR. The slice
    // covers exactly the element area after the header. 'static is a lie bounded by the memory
    // context; callers only use the slice before returning the datum.
    unsafe {
        let p = pg_sys::palloc0(total) as *mut u8;
        varlena::set_varsize_4b(p as *mut pg_sys::varlena, total as i32);
        (p.add(DIMS_OFFSET) as *mut u16).write(dims as u16);
        let values = std::slice::from_raw_parts_mut(p.add(HEADER_BYTES) as *mut f32, dims);
        (pg_sys::Datum::from(p), values)
    }
}

/// A new embedding holding a copy of `values`.
pub fn from_slice(values: &[f32]) -> pg_sys::Datum {
    let (datum, dst) = alloc(values.len());
    dst.copy_from_slice(values);
    datum
}

/// Views a plain (4-byte header, uncompressed, in-memory) embedding.
///
/// # Safety
/// `ptr` must point to such a varlena that outlives `'a`.
pub unsafe fn view<'a>(ptr: *const pg_sys::varlena) -> &'a [f32] {
    // SAFETY: the caller guarantees a readable 4-byte-header varlena.
    let total = unsafe { varlena::varsize_4b(ptr) };
    let base = ptr as *const u8;
    let dims = if total >= HEADER_BYTES {
        // SAFETY: at least HEADER_BYTES are readable; the u16 is 2-aligned within the 4-aligned value.
        unsafe { (base.add(DIMS_OFFSET) as *const u16).read_unaligned() as usize }
    } else {
        0
    };
    if total < HEADER_BYTES || total != HEADER_BYTES + 4 * dims || dims == 0 || dims > MAX_DIMS {
        crate::fmgr::error(
            pgrx::PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            format!("corrupt embedding value: {total} bytes with a header of {dims} dimensions"),
        );
    }
    // SAFETY: bounds checked above; alignment checked here (a 4-byte-header value is stored
    // int4-aligned, and palloc is MAXALIGNed).
    unsafe {
        let data = base.add(HEADER_BYTES);
        assert!(
            (data as usize).is_multiple_of(std::mem::align_of::<f32>()),
            "misaligned embedding value"
        );
        std::slice::from_raw_parts(data as *const f32, dims)
    }
}

/// Whether a datum can be viewed in place (no TOAST pointer, compression or short header).
///
/// # Safety
/// `datum` must be a valid varlena datum.
pub unsafe fn is_plain(datum: pg_sys::Datum) -> bool {
    // SAFETY: guaranteed by the caller.
    unsafe { varlena::varatt_is_4b_u(datum.cast_mut_ptr()) }
}

/// Runs `f` on the embedding in `datum`, detoasting into a temporary copy only when needed and
/// freeing that copy afterwards, so loops over many rows keep memory flat in any context.
///
/// # Safety
/// `datum` must be a valid, non-null `embedding` datum.
pub unsafe fn with<R>(datum: pg_sys::Datum, f: impl FnOnce(&[f32]) -> R) -> R {
    let raw: *mut pg_sys::varlena = datum.cast_mut_ptr();
    // SAFETY: the caller guarantees a valid varlena; pg_detoast_datum returns it unchanged when
    // it is already plain, else a palloc'd plain copy.
    unsafe {
        let plain = if varlena::varatt_is_4b_u(raw) {
            raw
        } else {
            pg_sys::pg_detoast_datum(raw)
        };
        let result = f(view(plain));
        if plain != raw {
            pg_sys::pfree(plain.cast());
        }
        result
    }
}
