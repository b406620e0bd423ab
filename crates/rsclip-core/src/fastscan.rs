//! Fast scan: inner products of 32 one-bit codes at once with a 4-bit query, through 16-entry
//! lookup tables and byte shuffles.
//!
//! A code of `D` bits (bit `i` of word `i / 64` is coordinate `i`) is split into `D / 4`
//! *segments* of 4 coordinates. For a query quantized to levels `u_i` (0..=15), the table of
//! segment `s` holds, for each 4-bit pattern `m`, `Σ_{j < 4, bit j of m} u_{4s+j}` (at most 60,
//! one byte). `Σ_i bit_i · u_i` is then the sum over segments of one table entry each.
//!
//! **Block layout** ([`pack_block`]): 32 codes, segment by segment, 16 bytes per segment: byte
//! `t` holds segment `s` of code `t` in its low nibble and of code `t + 16` in its high nibble.
//! Two consecutive segments are 32 contiguous bytes, as are their tables: one 256-bit shuffle
//! looks up 16 codes in both (one per 128-bit lane). Sums are kept in 16-bit lanes: each lane
//! adds one entry (≤ 60) per pair of segments, so `D ≤ 4 * 16 * 1092` never overflows; callers
//! use far fewer ([`MAX_SEGMENTS`]).

use std::sync::OnceLock;

/// Codes per block.
pub const BLOCK: usize = 32;
/// Most segments a block may have (the 16-bit sums cannot overflow below this).
pub const MAX_SEGMENTS: usize = 2 * 1092;

/// Bytes of a packed block of codes with `dims` coordinates (`dims` a multiple of 8).
pub const fn block_bytes(dims: usize) -> usize {
    dims / 4 * 16
}

/// The 4-bit pattern of segment `s` of a code given as little-endian u64 words.
#[inline]
fn nibble(code: &[u64], s: usize) -> u8 {
    ((code[s / 16] >> (4 * (s % 16))) & 0xf) as u8
}

/// Writes code `t` (`t < 32`, `dims / 64` words) into the packed block `out`.
pub fn set_code(out: &mut [u8], dims: usize, t: usize, code: &[u64]) {
    assert!(t < BLOCK && code.len() * 64 >= dims && out.len() == block_bytes(dims));
    let (byte, shift) = (t % 16, if t < 16 { 0 } else { 4 });
    for s in 0..dims / 4 {
        let b = &mut out[16 * s + byte];
        *b = (*b & !(0xf << shift)) | (nibble(code, s) << shift);
    }
}

/// Reads code `t` back from a packed block (the inverse of [`set_code`]).
pub fn get_code(block: &[u8], dims: usize, t: usize) -> Vec<u64> {
    assert!(t < BLOCK && block.len() == block_bytes(dims));
    let (byte, shift) = (t % 16, if t < 16 { 0 } else { 4 });
    let mut code = vec![0u64; dims.div_ceil(64)];
    for s in 0..dims / 4 {
        let n = (block[16 * s + byte] >> shift) & 0xf;
        code[s / 16] |= (n as u64) << (4 * (s % 16));
    }
    code
}

/// Packs up to 32 codes (the missing ones are zero).
pub fn pack_block(codes: &[&[u64]], dims: usize) -> Vec<u8> {
    assert!(codes.len() <= BLOCK);
    let mut out = vec![0u8; block_bytes(dims)];
    for (t, c) in codes.iter().enumerate() {
        set_code(&mut out, dims, t, c);
    }
    out
}

/// The lookup tables of query levels `levels` (each ≤ 15, length a multiple of 8): 16 bytes
/// per segment.
pub fn build_luts(levels: &[u8]) -> Vec<u8> {
    let mut lut = vec![0u8; levels.len() / 4 * 16];
    for (t, u) in lut.chunks_exact_mut(16).zip(levels.chunks_exact(4)) {
        for m in 1..16usize {
            // Each pattern is a smaller pattern plus one coordinate (its lowest set bit).
            let low = m.trailing_zeros() as usize;
            t[m] = t[m & (m - 1)] + u[low];
        }
    }
    lut
}

/// `sums[t] = Σ_i bit_i(code t) · u_i` for the 32 codes of `block` against the tables `luts`
/// (of the same dimensions).
pub fn accumulate(block: &[u8], luts: &[u8], sums: &mut [u32; BLOCK]) {
    assert!(block.len() == luts.len() && block.len().is_multiple_of(32));
    assert!(block.len() / 16 <= MAX_SEGMENTS);
    (kernel())(block, luts, sums)
}

type Kernel = fn(&[u8], &[u8], &mut [u32; BLOCK]);

fn kernel() -> Kernel {
    static BEST: OnceLock<Kernel> = OnceLock::new();
    *BEST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return avx2_entry as Kernel;
        }
        portable as Kernel
    })
}

/// Name of the kernel in use (for benchmarks and logs).
pub fn kernel_name() -> &'static str {
    if kernel() as usize == portable as Kernel as usize {
        "portable"
    } else {
        "avx2"
    }
}

fn portable(block: &[u8], luts: &[u8], sums: &mut [u32; BLOCK]) {
    *sums = [0; BLOCK];
    for (codes, t) in block.chunks_exact(16).zip(luts.chunks_exact(16)) {
        for (j, &b) in codes.iter().enumerate() {
            sums[j] += t[(b & 0xf) as usize] as u32;
            sums[j + 16] += t[(b >> 4) as usize] as u32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_entry(block: &[u8], luts: &[u8], sums: &mut [u32; BLOCK]) {
    // SAFETY: installed by `kernel()` only after AVX2 was detected.
    unsafe { avx2(block, luts, sums) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn avx2(block: &[u8], luts: &[u8], sums: &mut [u32; BLOCK]) {
    use std::arch::x86_64::*;
    let n = block.len().min(luts.len()) / 32 * 32;
    let low4 = _mm256_set1_epi8(0x0f);
    let low8 = _mm256_set1_epi16(0x00ff);
    // 16-bit sums of codes 0..16 (from low nibbles) and 16..32 (high nibbles), even and odd
    // codes apart; lane 0 sums even segments, lane 1 odd ones.
    let (mut lo_even, mut lo_odd) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let (mut hi_even, mut hi_odd) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut i = 0;
    while i < n {
        // SAFETY: i + 32 <= n <= both lengths; unaligned loads.
        let (c, t) = unsafe {
            (
                _mm256_loadu_si256(block.as_ptr().add(i) as *const __m256i),
                _mm256_loadu_si256(luts.as_ptr().add(i) as *const __m256i),
            )
        };
        let lo = _mm256_shuffle_epi8(t, _mm256_and_si256(c, low4));
        let hi = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16::<4>(c), low4));
        lo_even = _mm256_add_epi16(lo_even, _mm256_and_si256(lo, low8));
        lo_odd = _mm256_add_epi16(lo_odd, _mm256_srli_epi16::<8>(lo));
        hi_even = _mm256_add_epi16(hi_even, _mm256_and_si256(hi, low8));
        hi_odd = _mm256_add_epi16(hi_odd, _mm256_srli_epi16::<8>(hi));
        i += 32;
    }
    let mut lanes = [[0u16; 16]; 4];
    for (l, v) in lanes.iter_mut().zip([lo_even, lo_odd, hi_even, hi_odd]) {
        // SAFETY: each `l` is 32 bytes.
        unsafe { _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, v) };
    }
    for k in 0..8 {
        sums[2 * k] = lanes[0][k] as u32 + lanes[0][k + 8] as u32;
        sums[2 * k + 1] = lanes[1][k] as u32 + lanes[1][k + 8] as u32;
        sums[16 + 2 * k] = lanes[2][k] as u32 + lanes[2][k + 8] as u32;
        sums[16 + 2 * k + 1] = lanes[3][k] as u32 + lanes[3][k + 8] as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    #[test]
    fn kernels_equal_direct_sums() {
        let mut next = rng(42);
        for dims in [64usize, 128, 384, 768, 1792] {
            for ncodes in [1usize, 17, 32] {
                let codes: Vec<Vec<u64>> = (0..ncodes)
                    .map(|_| (0..dims / 64).map(|_| next()).collect())
                    .collect();
                let levels: Vec<u8> = (0..dims).map(|_| (next() % 16) as u8).collect();
                let refs: Vec<&[u64]> = codes.iter().map(|c| &c[..]).collect();
                let block = pack_block(&refs, dims);
                let luts = build_luts(&levels);
                let (mut a, mut b) = ([0u32; BLOCK], [0u32; BLOCK]);
                accumulate(&block, &luts, &mut a);
                portable(&block, &luts, &mut b);
                assert_eq!(a, b, "{dims} dims");
                for t in 0..BLOCK {
                    let want: u32 = if t < ncodes {
                        (0..dims)
                            .filter(|&i| codes[t][i / 64] >> (i % 64) & 1 == 1)
                            .map(|i| levels[i] as u32)
                            .sum()
                    } else {
                        0
                    };
                    assert_eq!(a[t], want, "{dims} dims, code {t}");
                }
                for (t, c) in codes.iter().enumerate() {
                    assert_eq!(&get_code(&block, dims, t), c);
                }
            }
        }
    }

    #[test]
    fn largest_sums_do_not_overflow() {
        let dims = MAX_SEGMENTS * 4;
        let code = vec![u64::MAX; dims.div_ceil(64)];
        let block = pack_block(&vec![&code[..]; BLOCK], dims);
        let luts = build_luts(&vec![15u8; dims]);
        let mut s = [0u32; BLOCK];
        accumulate(&block, &luts, &mut s);
        assert_eq!(s, [15 * dims as u32; BLOCK]);
    }

    #[test]
    fn set_code_overwrites() {
        let mut next = rng(7);
        let dims = 256;
        let a: Vec<u64> = (0..4).map(|_| next()).collect();
        let b: Vec<u64> = (0..4).map(|_| next()).collect();
        let mut block = pack_block(&[&a, &a, &a], dims);
        set_code(&mut block, dims, 1, &b);
        assert_eq!(get_code(&block, dims, 0), a);
        assert_eq!(get_code(&block, dims, 1), b);
        assert_eq!(get_code(&block, dims, 2), a);
    }
}
