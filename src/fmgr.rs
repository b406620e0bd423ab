//! Plumbing for version-1 C functions whose SQL declarations live in `sql/`.
//!
//! We declare every SQL object by hand (exact volatility, strictness, parallel labels, typmod
//! functions) instead of through `#[pg_extern]`, so the Rust side is just `fn(fcinfo) -> Datum`.
//! `pg_function!` adds the `pg_finfo_*` record Postgres looks up and `#[pg_guard]`, which turns a
//! Rust panic or an `ereport!` into a Postgres ERROR at the boundary.

use pgrx::pg_sys;
use pgrx::pg_sys::elog::PgLogLevel;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgSqlErrorCode;

/// Defines `unsafe extern "C-unwind" fn $name(fcinfo) -> Datum` callable from SQL as
/// `AS 'MODULE_PATHNAME', '$name'`.
macro_rules! pg_function {
    ($(#[$attr:meta])* fn $name:ident($fcinfo:ident) $body:block) => {
        ::paste::paste! {
            #[unsafe(no_mangle)]
            #[doc(hidden)]
            pub extern "C" fn [<pg_finfo_ $name>]() -> &'static ::pgrx::pg_sys::Pg_finfo_record {
                const V1_API: ::pgrx::pg_sys::Pg_finfo_record =
                    ::pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
                &V1_API
            }
        }
        ::paste::paste! {
            $(#[$attr])*
            #[unsafe(no_mangle)]
            pub unsafe extern "C-unwind" fn $name(
                fcinfo: ::pgrx::pg_sys::FunctionCallInfo,
            ) -> ::pgrx::pg_sys::Datum {
                // SAFETY: this is the top frame of a function called by Postgres, holding
                // nothing that needs dropping; the guard turns panics and ERRORs raised inside
                // into a Postgres ERROR after the Rust frames have unwound.
                unsafe { ::pgrx::pg_sys::panic::pgrx_extern_c_guard(move || [<$name _body>](fcinfo)) }
            }

            #[inline(always)]
            fn [<$name _body>]($fcinfo: ::pgrx::pg_sys::FunctionCallInfo) -> ::pgrx::pg_sys::Datum $body
        }
    };
}
pub(crate) use pg_function;

/// Raises a Postgres ERROR with `code` and `message`.
pub fn error(code: PgSqlErrorCode, message: impl Into<String>) -> ! {
    ErrorReport::new(code, message.into(), "rsclip").report(PgLogLevel::ERROR);
    unreachable!("ERROR returned")
}

/// Raises a Postgres ERROR with a DETAIL line.
pub fn error_detail(
    code: PgSqlErrorCode,
    message: impl Into<String>,
    detail: impl Into<String>,
) -> ! {
    ErrorReport::new(code, message.into(), "rsclip")
        .set_detail(detail.into())
        .report(PgLogLevel::ERROR);
    unreachable!("ERROR returned")
}

/// The raw datum of argument `n`.
///
/// # Safety
/// `fcinfo` must be the call's own, with at least `n + 1` arguments.
pub unsafe fn arg(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> pg_sys::Datum {
    // SAFETY: guaranteed by the caller.
    unsafe { pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, n) }
}

/// Argument `n` as an `int4` (a typmod, say).
///
/// # Safety
/// As for [`arg`]; the argument must be an `int4`.
pub unsafe fn arg_i32(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> i32 {
    // SAFETY: guaranteed by the caller; int4 is pass-by-value in the low 32 bits.
    unsafe { arg(fcinfo, n) }.value() as i32
}

pub fn float8_datum(v: f64) -> pg_sys::Datum {
    pg_sys::Datum::from(v.to_bits())
}

pub fn float4_datum(v: f32) -> pg_sys::Datum {
    pg_sys::Datum::from(v.to_bits())
}

pub fn datum_f32(d: pg_sys::Datum) -> f32 {
    f32::from_bits(d.value() as u32)
}

pub fn datum_f64(d: pg_sys::Datum) -> f64 {
    f64::from_bits(d.value() as u64)
}

/// Copies `s` into a palloc'd, NUL-terminated C string in the current memory context.
pub fn cstring_datum(s: &str) -> pg_sys::Datum {
    // SAFETY: palloc either returns len+1 writable bytes or raises an ERROR (never null).
    unsafe {
        let p = pg_sys::palloc(s.len() + 1) as *mut u8;
        std::ptr::copy_nonoverlapping(s.as_ptr(), p, s.len());
        *p.add(s.len()) = 0;
        pg_sys::Datum::from(p)
    }
}

/// Copies `s` into a palloc'd `text` (the same layout as `bytea`).
pub fn text_datum(s: &str) -> pg_sys::Datum {
    bytea_datum(s.as_bytes())
}

/// The bytes of a `bytea` (or `text`) datum, detoasted into the current memory context.
///
/// # Safety
/// `d` must be a valid varlena datum; the slice lives as long as the current memory context.
pub unsafe fn bytea_bytes<'a>(d: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: guaranteed by the caller; pg_detoast_datum_packed keeps short headers in place.
    unsafe {
        let p = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
        std::slice::from_raw_parts(
            pgrx::varlena::vardata_any(p) as *const u8,
            pgrx::varlena::varsize_any_exhdr(p),
        )
    }
}

/// Copies `bytes` into a palloc'd `bytea`.
pub fn bytea_datum(bytes: &[u8]) -> pg_sys::Datum {
    let total = pg_sys::VARHDRSZ + bytes.len();
    // SAFETY: palloc returns `total` writable bytes or raises an ERROR; we write the 4-byte
    // header and exactly `bytes.len()` bytes after it.
    unsafe {
        let p = pg_sys::palloc(total) as *mut pg_sys::varlena;
        pgrx::varlena::set_varsize_4b(p, total as i32);
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (p as *mut u8).add(pg_sys::VARHDRSZ),
            bytes.len(),
        );
        pg_sys::Datum::from(p)
    }
}

/// A one-dimensional array of `elem_type` holding `values` (NULL where None), its first
/// subscript `lbound`; empty input gives the empty array.
///
/// # Safety
/// Every datum is a valid value of `elem_type`.
pub unsafe fn array_datum(
    elem_type: pg_sys::Oid,
    values: &[Option<pg_sys::Datum>],
    lbound: i32,
) -> pg_sys::Datum {
    let mut datums: Vec<pg_sys::Datum> = values
        .iter()
        .map(|v| v.unwrap_or(pg_sys::Datum::from(0usize)))
        .collect();
    let mut nulls: Vec<bool> = values.iter().map(|v| v.is_none()).collect();
    let mut dims = [values.len() as std::ffi::c_int];
    let mut lbs = [lbound as std::ffi::c_int];
    // SAFETY: the element type's storage properties come from the catalog; construct_md_array
    // copies the datums (guaranteed valid by the caller) and honours the NULL flags.
    unsafe {
        let (mut len, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
        pg_sys::get_typlenbyvalalign(elem_type, &mut len, &mut byval, &mut align);
        pg_sys::Datum::from(pg_sys::construct_md_array(
            datums.as_mut_ptr(),
            nulls.as_mut_ptr(),
            if values.is_empty() { 0 } else { 1 },
            dims.as_mut_ptr(),
            lbs.as_mut_ptr(),
            elem_type,
            len as i32,
            byval,
            align,
        ))
    }
}
