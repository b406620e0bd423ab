//! Input/output functions of `embedding`: text, binary, and the `embedding(n)` type modifier.

use crate::datum;
use crate::fmgr::{arg, arg_i32, bytea_datum, cstring_datum, pg_function};
use pgrx::{pg_sys, PgSqlErrorCode};
use rsclip_core::{binary, text, MAX_DIMS};
use std::ffi::CStr;

/// Raises the error for a value whose dimension count differs from the column's `embedding(n)`.
pub fn check_typmod(dims: usize, typmod: i32) {
    if typmod >= 0 && dims != typmod as usize {
        crate::fmgr::error(
            PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
            format!("expected {typmod} dimensions, not {dims}"),
        );
    }
}

/// Shortens long input in messages so a 16000-element literal does not flood the log.
fn excerpt(input: &[u8]) -> String {
    const LIMIT: usize = 80;
    let s = String::from_utf8_lossy(input);
    if s.chars().count() <= LIMIT {
        s.into_owned()
    } else {
        format!("{}...", s.chars().take(LIMIT).collect::<String>())
    }
}

pg_function! {
    /// `embedding_in(cstring, oid, integer)`
    fn embedding_in(fcinfo) {
        // SAFETY: declared STRICT with a cstring first argument and an int4 third.
        let (input, typmod) = unsafe { (CStr::from_ptr(arg(fcinfo, 0).cast_mut_ptr()), arg_i32(fcinfo, 2)) };
        let bytes = input.to_bytes();
        match text::parse(bytes) {
            Ok(values) => {
                check_typmod(values.len(), typmod);
                datum::from_slice(&values)
            }
            Err(e) => {
                crate::fmgr::error_detail(PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
                    format!("invalid input syntax for type embedding: \"{}\"", excerpt(bytes)),
                    e.to_string()
                )
            }
        }
    }
}

pg_function! {
    /// `embedding_out(embedding) -> cstring`
    fn embedding_out(fcinfo) {
        // SAFETY: declared STRICT with an embedding argument.
        unsafe { datum::with(arg(fcinfo, 0), |v| cstring_datum(&text::format(v))) }
    }
}

pg_function! {
    /// `embedding_recv(internal, oid, integer)`: the argument is a StringInfo positioned at
    /// this value's bytes, all of which belong to it.
    fn embedding_recv(fcinfo) {
        // SAFETY: declared STRICT; Postgres passes a valid StringInfo and an int4 typmod.
        let (buf, typmod) = unsafe { (arg(fcinfo, 0).cast_mut_ptr::<pg_sys::StringInfoData>(), arg_i32(fcinfo, 2)) };
        // SAFETY: data[cursor..len] is the readable, unconsumed part of the buffer.
        let bytes = unsafe {
            let b = &mut *buf;
            let start = b.cursor.max(0) as usize;
            let end = (b.len.max(0) as usize).max(start);
            let slice = std::slice::from_raw_parts((b.data as *const u8).add(start), end - start);
            b.cursor = b.len;
            slice
        };
        match binary::decode(bytes) {
            Ok(values) => {
                check_typmod(values.len(), typmod);
                datum::from_slice(&values)
            }
            Err(e) => {
                crate::fmgr::error(PgSqlErrorCode::ERRCODE_INVALID_BINARY_REPRESENTATION,
                    format!("invalid binary embedding: {e}")
                )
            }
        }
    }
}

pg_function! {
    /// `embedding_send(embedding) -> bytea`
    fn embedding_send(fcinfo) {
        // SAFETY: declared STRICT with an embedding argument.
        unsafe {
            datum::with(arg(fcinfo, 0), |v| {
                let mut out = Vec::new();
                binary::encode(v, &mut out);
                bytea_datum(&out)
            })
        }
    }
}

pg_function! {
    /// `embedding_typmod_in(cstring[]) -> integer`: `embedding(768)` → 768.
    fn embedding_typmod_in(fcinfo) {
        let mut n: std::ffi::c_int = 0;
        // SAFETY: declared STRICT with a cstring[] argument; ArrayGetIntegerTypmods reports bad
        // elements as ERRORs and returns `n` integers.
        let mods = unsafe {
            let arr = pg_sys::pg_detoast_datum(arg(fcinfo, 0).cast_mut_ptr()) as *mut pg_sys::ArrayType;
            let p = pg_sys::ArrayGetIntegerTypmods(arr, &mut n);
            std::slice::from_raw_parts(p, n.max(0) as usize)
        };
        if mods.len() != 1 {
            crate::fmgr::error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "invalid type modifier: embedding takes one dimension count, as in embedding(768)");
        }
        let dims = mods[0];
        if dims < 1 {
            crate::fmgr::error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "dimensions for type embedding must be at least 1");
        }
        if dims as usize > MAX_DIMS {
            crate::fmgr::error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("dimensions for type embedding cannot exceed {MAX_DIMS}"));
        }
        pg_sys::Datum::from(dims)
    }
}

pg_function! {
    /// `embedding_typmod_out(integer) -> cstring`
    fn embedding_typmod_out(fcinfo) {
        // SAFETY: declared STRICT with an int4 argument.
        let typmod = unsafe { arg_i32(fcinfo, 0) };
        cstring_datum(&if typmod >= 0 { format!("({typmod})") } else { String::new() })
    }
}

pg_function! {
    /// `embedding(embedding, integer, boolean)`: the length-coercion cast that enforces the
    /// typmod when an existing value is stored into or cast to `embedding(n)`.
    fn embedding_enforce_typmod(fcinfo) {
        // SAFETY: declared STRICT with (embedding, int4, bool).
        unsafe {
            let d = arg(fcinfo, 0);
            let typmod = arg_i32(fcinfo, 1);
            datum::with(d, |v| check_typmod(v.len(), typmod));
            d
        }
    }
}
