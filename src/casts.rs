//! Casts between `embedding` and arrays, and (when pgvector is installed) `vector`.

use crate::datum;
use crate::fmgr::{arg, arg_i32, datum_f32, datum_f64, float4_datum, pg_function};
use crate::io::check_typmod;
use pgrx::{pg_sys, varlena, PgSqlErrorCode};
use rsclip_core::{check_dims, MAX_DIMS};

fn out_of_range(index: usize, what: &str) -> ! {
    crate::fmgr::error(PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
        format!("array element {} ({what}) is not a finite real number; embeddings hold finite float4 values", index + 1)
    );
}

fn shape_error(dims: usize) -> ! {
    let msg = match check_dims(dims) {
        Err(e) => e.to_string(),
        Ok(()) => unreachable!(),
    };
    crate::fmgr::error(PgSqlErrorCode::ERRCODE_DATA_EXCEPTION, msg);
}

pg_function! {
    /// `array_to_embedding(real[] | double precision[] | integer[] | numeric[], integer, boolean)`
    fn array_to_embedding(fcinfo) {
        // SAFETY: declared STRICT with an array first argument and int4 typmod second. The array
        // is detoasted and deconstructed by Postgres, which yields `nelems` datums and null flags.
        unsafe {
            let arr = pg_sys::pg_detoast_datum(arg(fcinfo, 0).cast_mut_ptr()) as *mut pg_sys::ArrayType;
            let typmod = arg_i32(fcinfo, 1);
            if (*arr).ndim > 1 {
                crate::fmgr::error(PgSqlErrorCode::ERRCODE_DATA_EXCEPTION, "array must be one-dimensional to become an embedding");
            }
            let elemtype = (*arr).elemtype;
            let (mut typlen, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
            pg_sys::get_typlenbyvalalign(elemtype, &mut typlen, &mut byval, &mut align);
            let mut elems: *mut pg_sys::Datum = std::ptr::null_mut();
            let mut nulls: *mut bool = std::ptr::null_mut();
            let mut n: std::ffi::c_int = 0;
            pg_sys::deconstruct_array(arr, elemtype, typlen as _, byval, align, &mut elems, &mut nulls, &mut n);
            let n = n.max(0) as usize;
            if n == 0 || n > MAX_DIMS {
                shape_error(n);
            }
            let elems = std::slice::from_raw_parts(elems, n);
            let nulls = std::slice::from_raw_parts(nulls, n);
            if let Some(i) = nulls.iter().position(|&b| b) {
                crate::fmgr::error(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, format!("array element {} is NULL; embeddings cannot contain NULLs", i + 1));
            }
            check_typmod(n, typmod);
            let (result, values) = datum::alloc(n);
            for (i, (d, out)) in elems.iter().zip(values.iter_mut()).enumerate() {
                let v: f32 = if elemtype == pg_sys::FLOAT4OID {
                    datum_f32(*d)
                } else if elemtype == pg_sys::FLOAT8OID {
                    let x = datum_f64(*d);
                    if x.is_finite() && x.abs() > f32::MAX as f64 {
                        out_of_range(i, &x.to_string());
                    }
                    x as f32
                } else if elemtype == pg_sys::INT4OID {
                    d.value() as i32 as f32
                } else if elemtype == pg_sys::NUMERICOID {
                    pgrx::fcinfo::direct_function_call::<f32>(pg_sys::numeric_float4, &[Some(*d)]).unwrap_or(f32::NAN)
                } else {
                    crate::fmgr::error(PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH, "unsupported array element type for embedding");
                };
                if !v.is_finite() {
                    out_of_range(i, &v.to_string());
                }
                *out = v;
            }
            result
        }
    }
}

pg_function! {
    /// `embedding_to_real_array(embedding, integer, boolean) -> real[]`
    fn embedding_to_real_array(fcinfo) {
        // SAFETY: declared STRICT with an embedding argument; construct_array copies the datums.
        unsafe {
            datum::with(arg(fcinfo, 0), |v| {
                let mut elems: Vec<pg_sys::Datum> = v.iter().map(|x| float4_datum(*x)).collect();
                let arr = pg_sys::construct_array(
                    elems.as_mut_ptr(),
                    elems.len() as _,
                    pg_sys::FLOAT4OID,
                    4,
                    true,
                    pg_sys::TYPALIGN_INT as std::ffi::c_char,
                );
                pg_sys::Datum::from(arr)
            })
        }
    }
}

/// Reads a pgvector `vector` (4-byte header, int16 dims, int16 unused, float4s), validating
/// its size so a foreign or damaged value cannot make us read out of bounds.
///
/// # Safety
/// `d` must be a valid varlena datum.
unsafe fn with_vector<R>(d: pg_sys::Datum, f: impl FnOnce(&[f32]) -> R) -> R {
    // SAFETY: detoast gives a plain 4-byte-header copy (or the value itself); sizes are checked
    // before the element slice is formed.
    unsafe {
        let p = pg_sys::pg_detoast_datum(d.cast_mut_ptr());
        let total = varlena::varsize_4b(p);
        let dims = if total >= datum::HEADER_BYTES {
            ((p as *const u8).add(4) as *const i16).read_unaligned()
        } else {
            -1
        };
        if dims < 1 || total != datum::HEADER_BYTES + 4 * dims as usize {
            crate::fmgr::error(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!("not a valid pgvector vector: {total} bytes, {dims} dimensions"),
            );
        }
        f(std::slice::from_raw_parts(
            (p as *const u8).add(datum::HEADER_BYTES) as *const f32,
            dims as usize,
        ))
    }
}

pg_function! {
    /// `embedding_from_vector(vector, integer, boolean) -> embedding`
    fn embedding_from_vector(fcinfo) {
        // SAFETY: declared STRICT with (vector, int4, bool).
        unsafe {
            let typmod = arg_i32(fcinfo, 1);
            with_vector(arg(fcinfo, 0), |v| {
                if v.len() > MAX_DIMS {
                    shape_error(v.len());
                }
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    out_of_range(i, "NaN or infinity");
                }
                check_typmod(v.len(), typmod);
                datum::from_slice(v)
            })
        }
    }
}

pg_function! {
    /// `embedding_to_vector(embedding) -> vector`; pgvector's own length coercion then checks
    /// a target `vector(n)`.
    fn embedding_to_vector(fcinfo) {
        // SAFETY: declared STRICT with an embedding argument. The layouts are identical (header,
        // int16 dims, int16 zero, float4s), so the new value is a copy of ours.
        unsafe { datum::with(arg(fcinfo, 0), datum::from_slice) }
    }
}
