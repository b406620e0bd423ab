//! Popcount kernels for 1-bit codes (RaBitQ) against a 4-bit-plane query.
//!
//! The library is built for baseline x86-64, where `u64::count_ones` compiles to a ~15-instruction
//! bit trick. CPUs since 2008 have a `popcnt` instruction; the same loop compiled with that target
//! feature is chosen at run time, which makes scanning codes several times faster.

use std::sync::OnceLock;

/// `(popcount(code), [popcount(code & plane_j) for j in 0..4])` where `code` is `8 * w` bytes
/// (little-endian u64 words) and `planes` holds 4 words per code word (`planes[4 * i + j]`).
pub type PlaneCounts = (u32, [u32; 4]);

#[inline(always)]
fn counts(code: &[u8], planes: &[u64]) -> PlaneCounts {
    let (mut pc, mut s) = (0u32, [0u32; 4]);
    for (c, p) in code.chunks_exact(8).zip(planes.chunks_exact(4)) {
        let x = u64::from_le_bytes(c.try_into().expect("8-byte chunk"));
        pc += x.count_ones();
        s[0] += (x & p[0]).count_ones();
        s[1] += (x & p[1]).count_ones();
        s[2] += (x & p[2]).count_ones();
        s[3] += (x & p[3]).count_ones();
    }
    (pc, s)
}

fn portable(code: &[u8], planes: &[u64]) -> PlaneCounts {
    counts(code, planes)
}

/// The same loop inlined into a function compiled with `popcnt`: one instruction per count.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
fn with_popcnt(code: &[u8], planes: &[u64]) -> PlaneCounts {
    counts(code, planes)
}

#[cfg(target_arch = "x86_64")]
fn popcnt_entry(code: &[u8], planes: &[u64]) -> PlaneCounts {
    // SAFETY: only installed by `kernel()` after `is_x86_feature_detected!("popcnt")` said yes.
    unsafe { with_popcnt(code, planes) }
}

type Kernel = fn(&[u8], &[u64]) -> PlaneCounts;

fn kernel() -> Kernel {
    static BEST: OnceLock<Kernel> = OnceLock::new();
    *BEST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("popcnt") {
            return popcnt_entry as Kernel;
        }
        portable as Kernel
    })
}

/// A plane-count kernel: `plane_counts` without the length check and the dispatch. It is safe
/// with any lengths (words past the shorter input are ignored), so a caller that has checked
/// the lengths once may call it per code.
pub type PlaneCountsKernel = fn(&[u8], &[u64]) -> PlaneCounts;

/// The fastest [`PlaneCountsKernel`] this CPU runs.
pub fn plane_counts_kernel() -> PlaneCountsKernel {
    kernel()
}

/// Ask the CPU to start loading the cache lines that hold the first `len` bytes of `bytes`
/// (all of them when shorter), without waiting for them. A scan calls it for every item of a
/// page before it reads any: the items of one page are then fetched in parallel instead of one
/// cache miss at a time (the hardware prefetcher does not learn a stride within 17 items).
#[inline]
pub fn prefetch(bytes: &[u8], len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let end = len.min(bytes.len());
        let mut off = 0;
        while off < end {
            // SAFETY: a prefetch is only a hint: it never faults and has no visible effect, and
            // the address is inside `bytes` anyway. SSE, which it needs, is part of x86-64.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().add(off) as *const i8) };
            off += 64;
        }
        // The last line, when `end` is not line-aligned with the start.
        if end > 0 {
            // SAFETY: as above; `end - 1` is inside `bytes`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().add(end - 1) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, len);
}

/// See [`PlaneCounts`]. `code.len()` must be a multiple of 8 and `planes.len() == code.len() / 2`.
#[inline]
pub fn plane_counts(code: &[u8], planes: &[u64]) -> PlaneCounts {
    assert!(code.len().is_multiple_of(8) && planes.len() == code.len() / 2);
    (kernel())(code, planes)
}

/// Name of the kernel in use (for benchmarks and logs).
pub fn kernel_name() -> &'static str {
    if kernel() as usize == portable as Kernel as usize {
        "portable"
    } else {
        "popcnt"
    }
}

/// `sum(u[i] as f32 * w[i])`: the 8-bit refinement code against a float query. Equal lengths.
#[inline]
pub fn dot_u8_f32(u: &[u8], w: &[f32]) -> f32 {
    assert_eq!(u.len(), w.len());
    type DotU8 = fn(&[u8], &[f32]) -> f32;
    static BEST: OnceLock<DotU8> = OnceLock::new();
    (BEST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return dot_u8_f32_avx2_entry;
        }
        dot_u8_f32_portable
    }))(u, w)
}

fn dot_u8_f32_portable(u: &[u8], w: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut cu = u.chunks_exact(8);
    let mut cw = w.chunks_exact(8);
    for (a, b) in (&mut cu).zip(&mut cw) {
        for j in 0..8 {
            acc[j] += a[j] as f32 * b[j];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (a, b) in cu.remainder().iter().zip(cw.remainder()) {
        sum += *a as f32 * b;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
fn dot_u8_f32_avx2_entry(u: &[u8], w: &[f32]) -> f32 {
    // SAFETY: installed only after AVX2 and FMA were detected.
    unsafe { dot_u8_f32_avx2(u, w) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_u8_f32_avx2(u: &[u8], w: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = u.len().min(w.len());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n bounds both 8-byte loads of `u` and both 8-float loads of `w`;
        // unaligned loads are used throughout.
        unsafe {
            let a = _mm_loadl_epi64(u.as_ptr().add(i) as *const __m128i);
            let b = _mm_loadl_epi64(u.as_ptr().add(i + 8) as *const __m128i);
            let fa = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a));
            let fb = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
            acc0 = _mm256_fmadd_ps(fa, _mm256_loadu_ps(w.as_ptr().add(i)), acc0);
            acc1 = _mm256_fmadd_ps(fb, _mm256_loadu_ps(w.as_ptr().add(i + 8)), acc1);
        }
        i += 16;
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` has room for 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc0, acc1)) };
    let mut sum: f32 = lanes.iter().sum();
    for j in i..n {
        sum += u[j] as f32 * w[j];
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatched_kernel_equals_portable() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for words in [0usize, 1, 2, 12, 16, 250] {
            let code: Vec<u8> = (0..words * 8).map(|_| next() as u8).collect();
            let planes: Vec<u64> = (0..words * 4).map(|_| next()).collect();
            assert_eq!(
                plane_counts(&code, &planes),
                portable(&code, &planes),
                "{words} words"
            );
        }
        eprintln!("popcount kernel: {}", kernel_name());
    }

    #[test]
    fn dot_u8_f32_matches_portable() {
        let mut state = 99u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        for n in [0usize, 1, 7, 15, 16, 17, 64, 768, 1000, 4096] {
            let u: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            let w: Vec<f32> = (0..n)
                .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
                .collect();
            let want: f64 = u.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
            let got = dot_u8_f32(&u, &w) as f64;
            let scale: f64 = u
                .iter()
                .zip(&w)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum::<f64>()
                + 1.0;
            assert!((got - want).abs() <= 1e-5 * scale, "{n}: {got} vs {want}");
            assert!(((dot_u8_f32_portable(&u, &w) as f64) - want).abs() <= 1e-5 * scale);
        }
    }
}
