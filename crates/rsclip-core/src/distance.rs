//! Distance kernels with runtime CPU dispatch: AVX-512F, AVX2+FMA, or portable scalar code.
//!
//! The library is built for baseline x86-64 (no `-march=native`); the best kernel the running CPU
//! supports is chosen once, on first use. All kernels accumulate in `f32` lanes (as pgvector does)
//! and finish the horizontal sum in `f64`.

use std::sync::OnceLock;

/// `dot`, `|a|^2` and `|b|^2` in one pass: what cosine distance needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineParts {
    pub dot: f32,
    pub norm_a_sq: f32,
    pub norm_b_sq: f32,
}

/// One implementation of every kernel. Slices must have equal lengths (callers check).
#[derive(Clone, Copy)]
pub struct Kernels {
    pub name: &'static str,
    pub dot: fn(&[f32], &[f32]) -> f32,
    pub l2_squared: fn(&[f32], &[f32]) -> f32,
    pub cosine_parts: fn(&[f32], &[f32]) -> CosineParts,
    /// The 16 dot products of four rows with four others (all of one length): `out[i][j] =
    /// <a[i], b[j]>`. Blocked so that each loaded lane feeds four FMAs (k-means assignment).
    pub dot_4x4: Dot4x4,
}

/// The signature of [`Kernels::dot_4x4`].
pub type Dot4x4 = fn(&[&[f32]; 4], &[&[f32]; 4], &mut [[f32; 4]; 4]);

pub const SCALAR: Kernels = Kernels {
    name: "scalar",
    dot: scalar::dot,
    l2_squared: scalar::l2_squared,
    cosine_parts: scalar::cosine_parts,
    dot_4x4: scalar::dot_4x4,
};

/// Every kernel set the running CPU can execute, best last. Tests compare each with `SCALAR`.
pub fn available() -> Vec<Kernels> {
    #[allow(unused_mut)]
    let mut all = vec![SCALAR];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            all.push(x86::AVX2);
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            all.push(x86::AVX512);
        }
    }
    all
}

/// The kernels in use in this process.
pub fn kernels() -> &'static Kernels {
    static BEST: OnceLock<Kernels> = OnceLock::new();
    BEST.get_or_init(|| *available().last().expect("scalar is always available"))
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    (kernels().dot)(a, b)
}

/// `out[i][j] = <a[i], b[j]>` for four rows against four (every row of the same length).
#[inline]
pub fn dot_4x4(a: &[&[f32]; 4], b: &[&[f32]; 4], out: &mut [[f32; 4]; 4]) {
    let n = a[0].len();
    assert!(a.iter().chain(b.iter()).all(|r| r.len() == n));
    (kernels().dot_4x4)(a, b, out)
}

#[inline]
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    (kernels().l2_squared)(a, b)
}

#[inline]
pub fn cosine_parts(a: &[f32], b: &[f32]) -> CosineParts {
    assert_eq!(a.len(), b.len());
    (kernels().cosine_parts)(a, b)
}

/// Cosine distance `1 - cos(a, b)`, clamped to [0, 2]; NaN when either vector is zero (as
/// pgvector: there is no angle to a zero vector).
pub fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let p = cosine_parts(a, b);
    let denom = (p.norm_a_sq as f64 * p.norm_b_sq as f64).sqrt();
    let similarity = p.dot as f64 / denom;
    if similarity.is_nan() {
        return f64::NAN;
    }
    1.0 - similarity.clamp(-1.0, 1.0)
}

pub mod scalar {
    use super::CosineParts;

    // Eight independent lanes let LLVM use SSE2 (baseline x86-64) and keep the rounding pattern
    // close to the SIMD kernels.
    const LANES: usize = 8;

    /// Sixteen [`dot`]s (the portable kernels gain nothing from blocking).
    pub fn dot_4x4(a: &[&[f32]; 4], b: &[&[f32]; 4], out: &mut [[f32; 4]; 4]) {
        for (row, x) in out.iter_mut().zip(a) {
            for (o, y) in row.iter_mut().zip(b) {
                *o = dot(x, y);
            }
        }
    }

    fn hsum(acc: [f32; LANES]) -> f32 {
        acc.iter().map(|&x| x as f64).sum::<f64>() as f32
    }

    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let (ta, tb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for i in 0..LANES {
                acc[i] += x[i] * y[i];
            }
        }
        for (i, (x, y)) in ta.iter().zip(tb).enumerate() {
            acc[i] += x * y;
        }
        hsum(acc)
    }

    pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let (ta, tb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for i in 0..LANES {
                let d = x[i] - y[i];
                acc[i] += d * d;
            }
        }
        for (i, (x, y)) in ta.iter().zip(tb).enumerate() {
            let d = x - y;
            acc[i] += d * d;
        }
        hsum(acc)
    }

    pub fn cosine_parts(a: &[f32], b: &[f32]) -> CosineParts {
        let (mut d, mut na, mut nb) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let (ta, tb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for i in 0..LANES {
                d[i] += x[i] * y[i];
                na[i] += x[i] * x[i];
                nb[i] += y[i] * y[i];
            }
        }
        for (i, (x, y)) in ta.iter().zip(tb).enumerate() {
            d[i] += x * y;
            na[i] += x * x;
            nb[i] += y * y;
        }
        CosineParts {
            dot: hsum(d),
            norm_a_sq: hsum(na),
            norm_b_sq: hsum(nb),
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::{CosineParts, Kernels};
    use std::arch::x86_64::*;

    pub const AVX2: Kernels = Kernels {
        name: "avx2+fma",
        dot: avx2_dot,
        l2_squared: avx2_l2_squared,
        cosine_parts: avx2_cosine_parts,
        dot_4x4: avx2_dot_4x4,
    };

    pub const AVX512: Kernels = Kernels {
        name: "avx512f",
        dot: avx512_dot,
        l2_squared: avx512_l2_squared,
        cosine_parts: avx512_cosine_parts,
        dot_4x4: avx512_dot_4x4,
    };

    // The safe entry points are only ever reachable through `AVX2`/`AVX512`, which `available()`
    // hands out after detecting the features at run time; each asserts it again in debug builds.

    fn avx2_dot(a: &[f32], b: &[f32]) -> f32 {
        debug_assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
        // SAFETY: the CPU supports AVX2 and FMA (see above); slices have equal lengths.
        unsafe { avx2::dot(a, b) }
    }
    fn avx2_l2_squared(a: &[f32], b: &[f32]) -> f32 {
        debug_assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
        // SAFETY: as in avx2_dot.
        unsafe { avx2::l2_squared(a, b) }
    }
    fn avx2_cosine_parts(a: &[f32], b: &[f32]) -> CosineParts {
        debug_assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
        // SAFETY: as in avx2_dot.
        unsafe { avx2::cosine_parts(a, b) }
    }
    fn avx2_dot_4x4(a: &[&[f32]; 4], b: &[&[f32]; 4], out: &mut [[f32; 4]; 4]) {
        for (row, x) in out.iter_mut().zip(a) {
            for (o, y) in row.iter_mut().zip(b) {
                *o = avx2_dot(x, y);
            }
        }
    }
    fn avx512_dot_4x4(a: &[&[f32]; 4], b: &[&[f32]; 4], out: &mut [[f32; 4]; 4]) {
        debug_assert!(is_x86_feature_detected!("avx512f"));
        // SAFETY: the CPU supports AVX-512F (see above); rows have equal lengths (dot_4x4).
        unsafe { avx512::dot_4x4(a, b, out) }
    }
    fn avx512_dot(a: &[f32], b: &[f32]) -> f32 {
        debug_assert!(is_x86_feature_detected!("avx512f"));
        // SAFETY: the CPU supports AVX-512F (see above); slices have equal lengths.
        unsafe { avx512::dot(a, b) }
    }
    fn avx512_l2_squared(a: &[f32], b: &[f32]) -> f32 {
        debug_assert!(is_x86_feature_detected!("avx512f"));
        // SAFETY: as in avx512_dot.
        unsafe { avx512::l2_squared(a, b) }
    }
    fn avx512_cosine_parts(a: &[f32], b: &[f32]) -> CosineParts {
        debug_assert!(is_x86_feature_detected!("avx512f"));
        // SAFETY: as in avx512_dot.
        unsafe { avx512::cosine_parts(a, b) }
    }

    mod avx2 {
        use super::*;

        #[target_feature(enable = "avx2,fma")]
        fn hsum256(v: __m256) -> f64 {
            // A shuffle tree: summing the spilled lanes one by one in f64 was half the time of a
            // 384-float dot (a serial chain of 8 conversions and adds).
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s) as f64
        }

        /// # Safety
        /// The CPU must support AVX2 and FMA, and `a.len() == b.len()`.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            // SAFETY (all loads below): every offset i..i+8 read is < n, within both slices.
            unsafe {
                while i + 32 <= n {
                    for (k, acc) in acc.iter_mut().enumerate() {
                        let x = _mm256_loadu_ps(pa.add(i + 8 * k));
                        let y = _mm256_loadu_ps(pb.add(i + 8 * k));
                        *acc = _mm256_fmadd_ps(x, y, *acc);
                    }
                    i += 32;
                }
                while i + 8 <= n {
                    acc[0] = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(i)),
                        _mm256_loadu_ps(pb.add(i)),
                        acc[0],
                    );
                    i += 8;
                }
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut total = hsum256(sum);
            for j in i..n {
                total += (a[j] * b[j]) as f64;
            }
            total as f32
        }

        /// # Safety
        /// The CPU must support AVX2 and FMA, and `a.len() == b.len()`.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            // SAFETY (all loads below): every offset i..i+8 read is < n, within both slices.
            unsafe {
                while i + 32 <= n {
                    for (k, acc) in acc.iter_mut().enumerate() {
                        let d = _mm256_sub_ps(
                            _mm256_loadu_ps(pa.add(i + 8 * k)),
                            _mm256_loadu_ps(pb.add(i + 8 * k)),
                        );
                        *acc = _mm256_fmadd_ps(d, d, *acc);
                    }
                    i += 32;
                }
                while i + 8 <= n {
                    let d = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
                    acc[0] = _mm256_fmadd_ps(d, d, acc[0]);
                    i += 8;
                }
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut total = hsum256(sum);
            for j in i..n {
                let d = a[j] - b[j];
                total += (d * d) as f64;
            }
            total as f32
        }

        /// # Safety
        /// The CPU must support AVX2 and FMA, and `a.len() == b.len()`.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn cosine_parts(a: &[f32], b: &[f32]) -> CosineParts {
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let (mut d, mut na, mut nb) = (
                [_mm256_setzero_ps(); 2],
                [_mm256_setzero_ps(); 2],
                [_mm256_setzero_ps(); 2],
            );
            let mut i = 0;
            // SAFETY (all loads below): every offset i..i+8 read is < n, within both slices.
            unsafe {
                while i + 16 <= n {
                    for k in 0..2 {
                        let x = _mm256_loadu_ps(pa.add(i + 8 * k));
                        let y = _mm256_loadu_ps(pb.add(i + 8 * k));
                        d[k] = _mm256_fmadd_ps(x, y, d[k]);
                        na[k] = _mm256_fmadd_ps(x, x, na[k]);
                        nb[k] = _mm256_fmadd_ps(y, y, nb[k]);
                    }
                    i += 16;
                }
                while i + 8 <= n {
                    let x = _mm256_loadu_ps(pa.add(i));
                    let y = _mm256_loadu_ps(pb.add(i));
                    d[0] = _mm256_fmadd_ps(x, y, d[0]);
                    na[0] = _mm256_fmadd_ps(x, x, na[0]);
                    nb[0] = _mm256_fmadd_ps(y, y, nb[0]);
                    i += 8;
                }
            }
            let (mut td, mut ta, mut tb) = (
                hsum256(_mm256_add_ps(d[0], d[1])),
                hsum256(_mm256_add_ps(na[0], na[1])),
                hsum256(_mm256_add_ps(nb[0], nb[1])),
            );
            for j in i..n {
                td += (a[j] * b[j]) as f64;
                ta += (a[j] * a[j]) as f64;
                tb += (b[j] * b[j]) as f64;
            }
            CosineParts {
                dot: td as f32,
                norm_a_sq: ta as f32,
                norm_b_sq: tb as f32,
            }
        }
    }

    mod avx512 {
        use super::*;

        #[target_feature(enable = "avx512f")]
        fn hsum512(v: __m512) -> f64 {
            // A reduction tree (see hsum256 for why not a serial f64 sum).
            _mm512_reduce_add_ps(v) as f64
        }

        /// Mask selecting the first `rest` (< 16) lanes.
        #[inline(always)]
        fn tail_mask(rest: usize) -> __mmask16 {
            ((1u32 << rest) - 1) as __mmask16
        }

        /// # Safety
        /// The CPU must support AVX-512F, and all eight rows must have the same length.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn dot_4x4(a: &[&[f32]; 4], b: &[&[f32]; 4], out: &mut [[f32; 4]; 4]) {
            let n = a[0].len();
            let pa = a.map(|r| r.as_ptr());
            let pb = b.map(|r| r.as_ptr());
            // Sixteen named accumulators: kept in an array, one of them was spilled to the stack
            // every iteration, a store-to-load chain that halved the throughput.
            let z = _mm512_setzero_ps();
            let (mut a00, mut a01, mut a02, mut a03) = (z, z, z, z);
            let (mut a10, mut a11, mut a12, mut a13) = (z, z, z, z);
            let (mut a20, mut a21, mut a22, mut a23) = (z, z, z, z);
            let (mut a30, mut a31, mut a32, mut a33) = (z, z, z, z);
            let mut i = 0;
            // SAFETY (all loads below): every row has n floats (caller); full loads read
            // i..i+16 <= n, the masked tail reads only lanes below n - i and suppresses faults
            // on the others.
            unsafe {
                while i < n {
                    let m = if i + 16 <= n { !0 } else { tail_mask(n - i) };
                    let y0 = _mm512_maskz_loadu_ps(m, pb[0].add(i));
                    let y1 = _mm512_maskz_loadu_ps(m, pb[1].add(i));
                    let y2 = _mm512_maskz_loadu_ps(m, pb[2].add(i));
                    let y3 = _mm512_maskz_loadu_ps(m, pb[3].add(i));
                    let x = _mm512_maskz_loadu_ps(m, pa[0].add(i));
                    a00 = _mm512_fmadd_ps(x, y0, a00);
                    a01 = _mm512_fmadd_ps(x, y1, a01);
                    a02 = _mm512_fmadd_ps(x, y2, a02);
                    a03 = _mm512_fmadd_ps(x, y3, a03);
                    let x = _mm512_maskz_loadu_ps(m, pa[1].add(i));
                    a10 = _mm512_fmadd_ps(x, y0, a10);
                    a11 = _mm512_fmadd_ps(x, y1, a11);
                    a12 = _mm512_fmadd_ps(x, y2, a12);
                    a13 = _mm512_fmadd_ps(x, y3, a13);
                    let x = _mm512_maskz_loadu_ps(m, pa[2].add(i));
                    a20 = _mm512_fmadd_ps(x, y0, a20);
                    a21 = _mm512_fmadd_ps(x, y1, a21);
                    a22 = _mm512_fmadd_ps(x, y2, a22);
                    a23 = _mm512_fmadd_ps(x, y3, a23);
                    let x = _mm512_maskz_loadu_ps(m, pa[3].add(i));
                    a30 = _mm512_fmadd_ps(x, y0, a30);
                    a31 = _mm512_fmadd_ps(x, y1, a31);
                    a32 = _mm512_fmadd_ps(x, y2, a32);
                    a33 = _mm512_fmadd_ps(x, y3, a33);
                    i += 16;
                }
            }
            let acc = [
                [a00, a01, a02, a03],
                [a10, a11, a12, a13],
                [a20, a21, a22, a23],
                [a30, a31, a32, a33],
            ];
            for (row, acc) in out.iter_mut().zip(&acc) {
                for (o, &v) in row.iter_mut().zip(acc) {
                    *o = hsum512(v) as f32;
                }
            }
        }

        /// # Safety
        /// The CPU must support AVX-512F, and `a.len() == b.len()`.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            // SAFETY (all loads below): full loads read i..i+16 <= n; the masked tail load reads
            // only lanes below n - i and suppresses faults on the others.
            unsafe {
                while i + 64 <= n {
                    for (k, acc) in acc.iter_mut().enumerate() {
                        let x = _mm512_loadu_ps(pa.add(i + 16 * k));
                        let y = _mm512_loadu_ps(pb.add(i + 16 * k));
                        *acc = _mm512_fmadd_ps(x, y, *acc);
                    }
                    i += 64;
                }
                while i + 16 <= n {
                    acc[0] = _mm512_fmadd_ps(
                        _mm512_loadu_ps(pa.add(i)),
                        _mm512_loadu_ps(pb.add(i)),
                        acc[0],
                    );
                    i += 16;
                }
                if i < n {
                    let m = tail_mask(n - i);
                    let x = _mm512_maskz_loadu_ps(m, pa.add(i));
                    let y = _mm512_maskz_loadu_ps(m, pb.add(i));
                    acc[1] = _mm512_fmadd_ps(x, y, acc[1]);
                }
            }
            let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            hsum512(sum) as f32
        }

        /// # Safety
        /// The CPU must support AVX-512F, and `a.len() == b.len()`.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            // SAFETY: as in dot.
            unsafe {
                while i + 64 <= n {
                    for (k, acc) in acc.iter_mut().enumerate() {
                        let d = _mm512_sub_ps(
                            _mm512_loadu_ps(pa.add(i + 16 * k)),
                            _mm512_loadu_ps(pb.add(i + 16 * k)),
                        );
                        *acc = _mm512_fmadd_ps(d, d, *acc);
                    }
                    i += 64;
                }
                while i + 16 <= n {
                    let d = _mm512_sub_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)));
                    acc[0] = _mm512_fmadd_ps(d, d, acc[0]);
                    i += 16;
                }
                if i < n {
                    let m = tail_mask(n - i);
                    let d = _mm512_sub_ps(
                        _mm512_maskz_loadu_ps(m, pa.add(i)),
                        _mm512_maskz_loadu_ps(m, pb.add(i)),
                    );
                    acc[1] = _mm512_fmadd_ps(d, d, acc[1]);
                }
            }
            let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            hsum512(sum) as f32
        }

        /// # Safety
        /// The CPU must support AVX-512F, and `a.len() == b.len()`.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn cosine_parts(a: &[f32], b: &[f32]) -> CosineParts {
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let (mut d, mut na, mut nb) = (
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
            );
            let mut i = 0;
            // SAFETY: as in dot.
            unsafe {
                while i + 16 <= n {
                    let x = _mm512_loadu_ps(pa.add(i));
                    let y = _mm512_loadu_ps(pb.add(i));
                    d = _mm512_fmadd_ps(x, y, d);
                    na = _mm512_fmadd_ps(x, x, na);
                    nb = _mm512_fmadd_ps(y, y, nb);
                    i += 16;
                }
                if i < n {
                    let m = tail_mask(n - i);
                    let x = _mm512_maskz_loadu_ps(m, pa.add(i));
                    let y = _mm512_maskz_loadu_ps(m, pb.add(i));
                    d = _mm512_fmadd_ps(x, y, d);
                    na = _mm512_fmadd_ps(x, x, na);
                    nb = _mm512_fmadd_ps(y, y, nb);
                }
            }
            CosineParts {
                dot: hsum512(d) as f32,
                norm_a_sq: hsum512(na) as f32,
                norm_b_sq: hsum512(nb) as f32,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    fn close(got: f32, want: f64, scale: f64) -> bool {
        ((got as f64) - want).abs() <= 1e-5 * scale.max(1e-30)
    }

    fn lengths() -> Vec<usize> {
        let mut v: Vec<usize> = (0..=130).collect();
        v.extend([255, 256, 257, 511, 767, 768, 769, 1023, 1024, 1025, 16000]);
        v
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Every SIMD kernel the CPU supports agrees with the scalar one (and an f64 reference) at
    /// odd and even lengths. Kernels the CPU cannot run are named on stderr, not silently passed.
    #[test]
    fn blocked_dots_match_the_reference_at_all_lengths() {
        for k in available() {
            for n in lengths() {
                let rows: Vec<Vec<f32>> = (0..8)
                    .map(|s| pseudo_random(n, 31 * n as u64 + s))
                    .collect();
                let a = [&rows[0][..], &rows[1], &rows[2], &rows[3]];
                let b = [&rows[4][..], &rows[5], &rows[6], &rows[7]];
                let mut out = [[f32::NAN; 4]; 4];
                (k.dot_4x4)(&a, &b, &mut out);
                for i in 0..4 {
                    for j in 0..4 {
                        let na: f64 = a[i].iter().map(|x| (*x as f64).powi(2)).sum();
                        let nb: f64 = b[j].iter().map(|x| (*x as f64).powi(2)).sum();
                        let want = reference_dot(a[i], b[j]);
                        assert!(
                            close(out[i][j], want, (na * nb).sqrt() + na + nb),
                            "{} dot_4x4 n={n} [{i}][{j}]: {} vs {want}",
                            k.name,
                            out[i][j]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_kernels_match_scalar_at_all_lengths() {
        let all = available();
        #[cfg(target_arch = "x86_64")]
        for (name, present) in [
            (
                "avx2+fma",
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            ),
            ("avx512f", is_x86_feature_detected!("avx512f")),
        ] {
            if !present {
                eprintln!("NOTE: this CPU cannot run the {name} kernels; they are not exercised on this machine");
            }
        }
        for k in &all {
            for n in lengths() {
                let a = pseudo_random(n, n as u64);
                let b = pseudo_random(n, n as u64 + 7777);
                let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
                let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum();
                let scale = (na * nb).sqrt() + na + nb;
                let want_dot = reference_dot(&a, &b);
                let want_l2: f64 = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| ((*x - *y) as f64).powi(2))
                    .sum();
                let got = (k.dot)(&a, &b);
                assert!(
                    close(got, want_dot, scale),
                    "{} dot n={n}: {got} vs {want_dot}",
                    k.name
                );
                let scalar = (SCALAR.dot)(&a, &b);
                assert!(
                    close(got, scalar as f64, scale),
                    "{} vs scalar dot n={n}",
                    k.name
                );
                let got = (k.l2_squared)(&a, &b);
                assert!(
                    close(got, want_l2, scale),
                    "{} l2 n={n}: {got} vs {want_l2}",
                    k.name
                );
                let p = (k.cosine_parts)(&a, &b);
                assert!(close(p.dot, want_dot, scale), "{} cos.dot n={n}", k.name);
                assert!(close(p.norm_a_sq, na, scale), "{} cos.na n={n}", k.name);
                assert!(close(p.norm_b_sq, nb, scale), "{} cos.nb n={n}", k.name);
            }
        }
    }

    #[test]
    fn dispatch_picks_the_best_available() {
        assert_eq!(kernels().name, available().last().unwrap().name);
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            assert_ne!(kernels().name, "scalar");
        }
    }

    #[test]
    fn cosine_edge_cases() {
        assert!(cosine_distance(&[0.0, 0.0], &[1.0, 0.0]).is_nan());
        assert!((cosine_distance(&[1.0, 0.0], &[1.0, 0.0])).abs() < 1e-12);
        assert!((cosine_distance(&[1.0, 0.0], &[-2.0, 0.0]) - 2.0).abs() < 1e-12);
        assert!((cosine_distance(&[1.0, 0.0], &[0.0, 3.0]) - 1.0).abs() < 1e-12);
    }

    proptest! {
        #[test]
        fn kernels_agree_on_random_vectors(pairs in proptest::collection::vec((-1e3f32..1e3, -1e3f32..1e3), 0..300)) {
            let (a, b): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let want = reference_dot(&a, &b);
            let scale = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() * b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            for k in available() {
                prop_assert!(close((k.dot)(&a, &b), want, scale));
            }
        }
    }
}
