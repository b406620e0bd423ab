//! 8-bit scalar quantization and the `u8 · i8` dot product, with runtime CPU dispatch
//! (AVX-512 VNNI, AVX2, or portable code).
//!
//! What it is for: ranking thousands of list centroids per query. In `f32` the centroids of a
//! 1M-row index (3162 × 384) are 4.9 MB, more than a core's L2, and ranking them streams them
//! from L3 on every query; as `i8` they are a quarter of that and the products are integer,
//! 64 per instruction with VNNI. Callers keep the error bounds [`SymmetricCodes`] and
//! [`OffsetQuery`] provide, so the ranking can be made exact where it matters.

use std::sync::OnceLock;

/// A vector quantized as `value ≈ scale · code` with `code` in `-127..=127`.
#[derive(Clone, Debug, PartialEq)]
pub struct SymmetricCodes {
    pub codes: Vec<i8>,
    pub scale: f32,
    /// `Σ code`: the correction for a query stored with an offset ([`OffsetQuery`]).
    pub code_sum: i32,
    /// `|value − scale · code|₂`, the quantization error's length (rounded up).
    pub error_norm: f32,
    /// `|scale · code|₂` (rounded up).
    pub approx_norm: f32,
}

/// Quantizes `v` symmetrically to `i8` (the largest magnitude maps to ±127). A zero or
/// non-finite vector gets scale 0 and an infinite error, so no bound built on it excludes
/// anything.
pub fn quantize_symmetric(v: &[f32]) -> SymmetricCodes {
    // f32::max ignores NaN: check finiteness on its own.
    let finite = v.iter().all(|x| x.is_finite());
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if max == 0.0 || !finite {
        let zero = finite;
        return SymmetricCodes {
            codes: vec![0; v.len()],
            scale: 0.0,
            code_sum: 0,
            error_norm: if zero { 0.0 } else { f32::INFINITY },
            approx_norm: 0.0,
        };
    }
    let scale = max / 127.0;
    let codes: Vec<i8> = v
        .iter()
        .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8)
        .collect();
    let (mut err2, mut approx2) = (0f64, 0f64);
    for (&x, &c) in v.iter().zip(&codes) {
        let a = scale as f64 * c as f64;
        err2 += (x as f64 - a).powi(2);
        approx2 += a * a;
    }
    SymmetricCodes {
        code_sum: codes.iter().map(|&c| c as i32).sum(),
        codes,
        scale,
        error_norm: round_up(err2.sqrt()),
        approx_norm: round_up(approx2.sqrt()),
    }
}

/// A query quantized as `value ≈ scale · (code − 128)` with `code` in `1..=255`: unsigned, as
/// the VNNI instruction wants its first operand.
#[derive(Clone, Debug, PartialEq)]
pub struct OffsetQuery {
    pub codes: Vec<u8>,
    pub scale: f32,
    /// `|value − scale · (code − 128)|₂` (rounded up).
    pub error_norm: f32,
    /// `|value|₂` (rounded up).
    pub norm: f32,
}

/// The offset that makes the query's codes unsigned.
pub const QUERY_OFFSET: i32 = 128;

pub fn quantize_query(v: &[f32]) -> OffsetQuery {
    let s = quantize_symmetric(v);
    let norm2: f64 = v.iter().map(|&x| (x as f64).powi(2)).sum();
    OffsetQuery {
        codes: s
            .codes
            .iter()
            .map(|&c| (c as i32 + QUERY_OFFSET) as u8)
            .collect(),
        scale: s.scale,
        error_norm: s.error_norm,
        norm: round_up(norm2.sqrt()),
    }
}

/// `Σ (q_i − 128) · c_i` for the integer codes: the exact integer product of a query and a
/// vector, from [`dot_u8_i8`] and the vector's code sum.
#[inline]
pub fn offset_dot(query: &[u8], codes: &[i8], code_sum: i32) -> i32 {
    dot_u8_i8(query, codes) - QUERY_OFFSET * code_sum
}

/// An upper bound of `|⟨v, q⟩ − scale_v · scale_q · offset_dot|` for a vector `v` and a query
/// `q` quantized as above: `|e_v|·|q| + |v̂|·|e_q|` (Cauchy–Schwarz on both errors), with a
/// margin for the rounding of an `f32` dot product of `dims` terms.
/// `v_error_norm` and `v_approx_norm` are the vector's [`SymmetricCodes::error_norm`] and
/// [`SymmetricCodes::approx_norm`].
pub fn product_error(v_error_norm: f32, v_approx_norm: f32, q: &OffsetQuery, dims: usize) -> f32 {
    let v_norm = v_approx_norm + v_error_norm;
    let rounding = 4.0 * (dims as f32 + 8.0) * f32::EPSILON * v_norm * q.norm;
    (v_error_norm * q.norm + v_approx_norm * q.error_norm + rounding) * (1.0 + 1e-5)
}

fn round_up(x: f64) -> f32 {
    let f = x as f32;
    if (f as f64) < x {
        f.next_up()
    } else {
        f
    }
}

/// One implementation of the integer kernel.
#[derive(Clone, Copy)]
pub struct Kernel {
    pub name: &'static str,
    /// `Σ a_i · b_i` (equal lengths; callers check).
    pub dot_u8_i8: fn(&[u8], &[i8]) -> i32,
}

pub const SCALAR: Kernel = Kernel {
    name: "scalar",
    dot_u8_i8: scalar_dot,
};

fn scalar_dot(a: &[u8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// Every implementation the running CPU can execute, best last (tests compare each with
/// [`SCALAR`]).
pub fn available() -> Vec<Kernel> {
    #[allow(unused_mut)]
    let mut all = vec![SCALAR];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            all.push(x86::AVX2);
        }
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
        {
            all.push(x86::VNNI);
        }
    }
    all
}

/// The kernel in use in this process.
pub fn kernel() -> &'static Kernel {
    static BEST: OnceLock<Kernel> = OnceLock::new();
    BEST.get_or_init(|| *available().last().expect("scalar is always available"))
}

/// `Σ a_i · b_i`; at most 2¹⁶ terms, so the sum cannot overflow (255 · 128 · 2¹⁶ < 2³¹).
#[inline]
pub fn dot_u8_i8(a: &[u8], b: &[i8]) -> i32 {
    assert!(a.len() == b.len() && a.len() <= 1 << 16);
    (kernel().dot_u8_i8)(a, b)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{scalar_dot, Kernel};
    use std::arch::x86_64::*;

    pub const AVX2: Kernel = Kernel {
        name: "avx2",
        dot_u8_i8: avx2_dot,
    };
    pub const VNNI: Kernel = Kernel {
        name: "avx512vnni",
        dot_u8_i8: vnni_dot,
    };

    fn avx2_dot(a: &[u8], b: &[i8]) -> i32 {
        debug_assert!(is_x86_feature_detected!("avx2"));
        // SAFETY: this kernel is only chosen (by `available`) when the CPU has AVX2.
        unsafe { avx2_dot_impl(a, b) }
    }

    fn vnni_dot(a: &[u8], b: &[i8]) -> i32 {
        debug_assert!(is_x86_feature_detected!("avx512vnni"));
        // SAFETY: this kernel is only chosen (by `available`) when the CPU has AVX-512 F, BW
        // and VNNI.
        unsafe { vnni_dot_impl(a, b) }
    }

    /// Widens both to 16 bits and multiplies pairs into 32-bit lanes (`maddubs` would
    /// saturate: 255 · 127 · 2 exceeds `i16`).
    #[target_feature(enable = "avx2")]
    unsafe fn avx2_dot_impl(a: &[u8], b: &[i8]) -> i32 {
        let n = a.len().min(b.len());
        let mut acc = _mm256_setzero_si256();
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n, so both 16-byte loads are inside the slices; unaligned loads.
            let (x, y) = unsafe {
                (
                    _mm_loadu_si128(a.as_ptr().add(i) as *const __m128i),
                    _mm_loadu_si128(b.as_ptr().add(i) as *const __m128i),
                )
            };
            let prod = _mm256_madd_epi16(_mm256_cvtepu8_epi16(x), _mm256_cvtepi8_epi16(y));
            acc = _mm256_add_epi32(acc, prod);
            i += 16;
        }
        let mut lanes = [0i32; 8];
        // SAFETY: `lanes` is 32 writable bytes; unaligned store.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc) };
        lanes.iter().sum::<i32>() + scalar_dot(&a[i..n], &b[i..n])
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn vnni_dot_impl(a: &[u8], b: &[i8]) -> i32 {
        let n = a.len().min(b.len());
        let mut acc = _mm512_setzero_si512();
        let mut i = 0;
        while i + 64 <= n {
            // SAFETY: i + 64 <= n, so both 64-byte loads are inside the slices; unaligned loads.
            let (x, y) = unsafe {
                (
                    _mm512_loadu_si512(a.as_ptr().add(i) as *const __m512i),
                    _mm512_loadu_si512(b.as_ptr().add(i) as *const __m512i),
                )
            };
            // Four u8·i8 products per 32-bit lane, summed without intermediate saturation.
            acc = _mm512_dpbusd_epi32(acc, x, y);
            i += 64;
        }
        _mm512_reduce_add_epi32(acc) + scalar_dot(&a[i..n], &b[i..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_kernel_matches_the_scalar_sum() {
        let a: Vec<u8> = (0..1000).map(|i| (i * 37 % 256) as u8).collect();
        let b: Vec<i8> = (0..1000).map(|i| (i * 91 % 255) as i16 as i8).collect();
        for len in [0, 1, 15, 16, 17, 63, 64, 65, 384, 1000] {
            let want = scalar_dot(&a[..len], &b[..len]);
            for k in available() {
                assert_eq!(
                    (k.dot_u8_i8)(&a[..len], &b[..len]),
                    want,
                    "{} at {len}",
                    k.name
                );
            }
        }
        // The extremes: no saturation anywhere.
        let a = vec![255u8; 4096];
        let b = vec![-128i8; 4096];
        for k in available() {
            assert_eq!((k.dot_u8_i8)(&a, &b), -255 * 128 * 4096, "{}", k.name);
        }
    }

    #[test]
    fn a_zero_vector_has_no_error_and_a_nan_one_an_unbounded_one() {
        let z = quantize_symmetric(&[0.0; 8]);
        assert_eq!((z.scale, z.error_norm, z.approx_norm), (0.0, 0.0, 0.0));
        let n = quantize_symmetric(&[1.0, f32::NAN]);
        assert!(n.error_norm.is_infinite());
        assert!(
            product_error(n.error_norm, n.approx_norm, &quantize_query(&[1.0, 1.0]), 2)
                .is_infinite()
        );
    }

    proptest! {
        /// The bound holds against the product computed in f64.
        #[test]
        fn the_product_error_bounds_the_quantized_product(
            v in prop::collection::vec(-3.0f32..3.0, 1..200),
            seed in any::<u64>(),
        ) {
            let mut s = seed | 1;
            let q: Vec<f32> = v.iter().map(|_| {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                (s % 20001) as f32 / 10000.0 - 1.0
            }).collect();
            let vc = quantize_symmetric(&v);
            let qc = quantize_query(&q);
            let exact: f64 = v.iter().zip(&q).map(|(&a, &b)| a as f64 * b as f64).sum();
            let approx = vc.scale as f64 * qc.scale as f64
                * offset_dot(&qc.codes, &vc.codes, vc.code_sum) as f64;
            let err = product_error(vc.error_norm, vc.approx_norm, &qc, v.len()) as f64;
            prop_assert!((exact - approx).abs() <= err, "exact {exact} approx {approx} err {err}");
            // And it is useful: a small fraction of |v||q|.
            let scale: f64 = (v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>()
                * q.iter().map(|&x| (x as f64).powi(2)).sum::<f64>()).sqrt();
            prop_assert!(err <= 0.05 * scale + 1e-6, "err {err} vs |v||q| {scale}");
        }
    }
}
