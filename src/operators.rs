//! Distance operators, scoring and the functions of `embedding`.

use crate::datum;
use crate::detoast_cache::with_args;
use crate::fmgr::{arg, float8_datum, pg_function};
use pgrx::{pg_sys, PgSqlErrorCode};
use rsclip_core::distance;

fn check_same_dims(a: &[f32], b: &[f32]) {
    if a.len() != b.len() {
        crate::fmgr::error(
            PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
            format!("different embedding dimensions {} and {}", a.len(), b.len()),
        );
    }
}

/// Applies a binary function to the two embedding arguments, checking their dimensions.
///
/// # Safety
/// `fcinfo` must be a call with two non-null embedding arguments.
unsafe fn binary<R>(fcinfo: pg_sys::FunctionCallInfo, f: impl FnOnce(&[f32], &[f32]) -> R) -> R {
    // SAFETY: guaranteed by the caller.
    unsafe {
        with_args(fcinfo, |a, b| {
            check_same_dims(a, b);
            f(a, b)
        })
    }
}

/// The inner product of two finite vectors, which can still overflow `f32`: that raises, as
/// Postgres's own `float4` arithmetic does. It also keeps NaN (+inf plus -inf) out of the
/// results, so `rsclip_score DESC` and `<#>` ascending order every row the same way, which the
/// planner's rewrite of one into the other relies on.
fn finite_dot(a: &[f32], b: &[f32]) -> f64 {
    let dot = distance::dot(a, b);
    if !dot.is_finite() {
        crate::fmgr::error(
            PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
            "value out of range: the inner product of the embeddings overflows",
        );
    }
    dot as f64
}

pg_function! {
    /// `a <#> b`: negative inner product, so that `ORDER BY` ascending ranks the best first.
    fn embedding_negative_inner_product(fcinfo) {
        // SAFETY: declared STRICT with two embedding arguments.
        float8_datum(-unsafe { binary(fcinfo, finite_dot) })
    }
}

pg_function! {
    /// `a <#^ b`: `<#>` with NULL arguments ranked first (-infinity), not last. Its ascending
    /// order is exactly `rsclip_score DESC` (NULLS FIRST, the default of `DESC`), so the
    /// planner rewrites that sort key into it on nullable columns and an rsclip index serves
    /// it (see planner.rs). Not STRICT.
    fn embedding_negative_inner_product_nulls_first(fcinfo) {
        // SAFETY: two embedding arguments, either of which may be NULL (checked first).
        unsafe {
            if (*fcinfo).nargs < 2
                || pgrx::fcinfo::pg_arg_is_null(fcinfo, 0)
                || pgrx::fcinfo::pg_arg_is_null(fcinfo, 1)
            {
                return float8_datum(f64::NEG_INFINITY);
            }
            float8_datum(-binary(fcinfo, finite_dot))
        }
    }
}

pg_function! {
    /// `rsclip_score(a, b)`: inner product (cosine similarity for unit vectors). Its descending
    /// order is exactly `<#>`'s ascending one (see planner.rs).
    fn rsclip_score(fcinfo) {
        // SAFETY: declared STRICT with two embedding arguments.
        float8_datum(unsafe { binary(fcinfo, finite_dot) })
    }
}

pg_function! {
    /// `a <=> b`: cosine distance.
    fn embedding_cosine_distance(fcinfo) {
        // SAFETY: declared STRICT with two embedding arguments.
        float8_datum(unsafe { binary(fcinfo, distance::cosine_distance) })
    }
}

pg_function! {
    /// `a <-> b`: Euclidean distance.
    fn embedding_l2_distance(fcinfo) {
        // SAFETY: declared STRICT with two embedding arguments.
        float8_datum((unsafe { binary(fcinfo, distance::l2_squared) } as f64).sqrt())
    }
}

pg_function! {
    /// `embedding_dims(e) -> integer`
    fn embedding_dims(fcinfo) {
        // SAFETY: declared STRICT with an embedding argument.
        pg_sys::Datum::from(unsafe { datum::with(arg(fcinfo, 0), |v| v.len() as i32) })
    }
}

pg_function! {
    /// `embedding_norm(e) -> double precision`: Euclidean length.
    fn embedding_norm(fcinfo) {
        // SAFETY: declared STRICT with an embedding argument.
        float8_datum(unsafe { datum::with(arg(fcinfo, 0), |v| v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt()) })
    }
}

pg_function! {
    /// `rsclip_normalize(e) -> embedding`: unit length (a zero vector stays zero).
    fn rsclip_normalize(fcinfo) {
        // SAFETY: declared STRICT with an embedding argument.
        unsafe {
            datum::with(arg(fcinfo, 0), |v| {
                let (out, values) = datum::alloc(v.len());
                values.copy_from_slice(v);
                rsclip_core::normalize_in_place(values);
                out
            })
        }
    }
}

/// Total order for btree: element by element, then the shorter first.
fn compare(a: &[f32], b: &[f32]) -> std::cmp::Ordering {
    for (x, y) in a.iter().zip(b) {
        // Values are finite, so partial_cmp is total here; -0 equals 0 as in float4.
        match x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal) {
            std::cmp::Ordering::Equal => continue,
            other => return other,
        }
    }
    a.len().cmp(&b.len())
}

/// # Safety
/// As for [`binary`].
unsafe fn compare_args(fcinfo: pg_sys::FunctionCallInfo) -> std::cmp::Ordering {
    // SAFETY: guaranteed by the caller.
    unsafe { with_args(fcinfo, compare) }
}

macro_rules! comparison {
    ($name:ident, $test:expr) => {
        pg_function! {
            fn $name(fcinfo) {
                // SAFETY: declared STRICT with two embedding arguments.
                let ord = unsafe { compare_args(fcinfo) };
                pg_sys::Datum::from(($test)(ord))
            }
        }
    };
}

comparison!(embedding_eq, |o: std::cmp::Ordering| o.is_eq());
comparison!(embedding_ne, |o: std::cmp::Ordering| o.is_ne());
comparison!(embedding_lt, |o: std::cmp::Ordering| o.is_lt());
comparison!(embedding_le, |o: std::cmp::Ordering| o.is_le());
comparison!(embedding_gt, |o: std::cmp::Ordering| o.is_gt());
comparison!(embedding_ge, |o: std::cmp::Ordering| o.is_ge());

pg_function! {
    /// btree support function 1.
    fn embedding_cmp(fcinfo) {
        // SAFETY: declared STRICT with two embedding arguments.
        pg_sys::Datum::from(unsafe { compare_args(fcinfo) } as i32)
    }
}

pg_function! {
    /// hash support function 1; equal values (including 0 and -0) hash equally.
    fn embedding_hash(fcinfo) {
        // SAFETY: declared STRICT with an embedding argument.
        let h = unsafe {
            datum::with(arg(fcinfo, 0), |v| {
                let mut h: u32 = 0x811c_9dc5 ^ v.len() as u32;
                for x in v {
                    let bits = if *x == 0.0 { 0 } else { x.to_bits() };
                    h = (h ^ bits).wrapping_mul(0x0100_0193);
                    h ^= h >> 15;
                }
                h
            })
        };
        pg_sys::Datum::from(h as i32)
    }
}
