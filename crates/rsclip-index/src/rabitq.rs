//! RaBitQ: a seeded random orthogonal rotation, 1-bit codes of rotated residuals, and distance
//! estimates with error bounds computed from a 4-bit quantized query by bit-plane popcounts.
//!
//! ## Rotation
//! Vectors are zero-padded to `D` = a multiple of 64 dimensions. Let `B` be the largest power of
//! two ≤ `D`. One round of the rotation is: flip signs by a random ±1 diagonal, apply the
//! normalized fast Walsh–Hadamard transform (FWHT) to coordinates `0..B`, flip signs again, apply
//! the FWHT to coordinates `D-B..D`. Every step is orthogonal, so the composition is; three rounds
//! ([`crate::format::ROTATION_ROUNDS`]) mix well enough for the RaBitQ analysis. Cost `O(D log D)`.
//!
//! ## Codes
//! For a vector `x` in the list with centroid `c` (both rotated), the residual `v = x - c` is
//! stored as its sign bits, `|v|` and `<ō, o> = Σ|v_i| / (sqrt(D) |v|)` where `o = v/|v|` and
//! `ō = sign(v)/sqrt(D)`.
//!
//! ## Estimates
//! For a query residual `w = q - c` (rotated), RaBitQ estimates `<o, w> ≈ <ō, w> / <ō, o>`, with
//! `|error| ≤ ε0 · |w| · sqrt(1 - <ō,o>²) / (<ō,o> · sqrt(D - 1))` with high probability
//! ([`EPSILON0`]). `<ō, w>` is computed from `w` quantized to 4 bits per coordinate
//! (`w_i ≈ lo + Δ·u_i`) as `Σ_j 2^j popcount(code & plane_j)`; the quantization error
//! `<ō, w - w̄>` is a sum of `D` terms with (rotation-)random signs, bounded by
//! [`QUERY_QUANT_SIGMAS`] standard deviations `|w - w̄| / sqrt(D)` and added to the bound.

use crate::rng::Rng;

/// RaBitQ confidence parameter ε0 (≈ standard deviations of the estimator) of the bounds a scan
/// orders rows by. The RaBitQ paper suggests 1.9; with it the two-sided bound held for only
/// ~98% of random pairs in our tests, 2.3 gives ≥ 99.5% (see the
/// `estimator_unbiased_and_bound_valid` test).
pub const EPSILON0: f32 = 2.3;
/// Standard deviations of the query-quantization error added to the bound.
pub const QUERY_QUANT_SIGMAS: f32 = 3.0;
/// ε0 of the tighter bounds a scan uses only to choose which rows to refine (the paper's 1.9):
/// a row it wrongly skips keeps its [`EPSILON0`] bound as its key, so it is still re-ranked in
/// order; only the work changes. On the real sentence-embedding set the scan refined 1.55× as
/// many rows with [`EPSILON0`] for the same results.
pub const PRUNE_EPSILON0: f32 = 1.9;
/// [`QUERY_QUANT_SIGMAS`] of the pruning bounds.
pub const PRUNE_QUANT_SIGMAS: f32 = 2.0;

/// `dims` rounded up to a multiple of 64 (at least 64).
pub fn padded_dims(dims: usize) -> usize {
    dims.div_ceil(64).max(1) * 64
}

/// A seeded random orthogonal transform of `D`-dimensional vectors.
#[derive(Clone, Debug)]
pub struct Rotation {
    dims: usize,
    block: usize,
    rounds: usize,
    /// `2 * rounds` sign masks of `dims / 64` words each.
    signs: Vec<u64>,
}

/// Normalized in-place fast Walsh–Hadamard transform (`v.len()` a power of two).
fn fwht(v: &mut [f32]) {
    let n = v.len();
    let mut h = 1;
    while h < n {
        for chunk in v.chunks_exact_mut(2 * h) {
            let (a, b) = chunk.split_at_mut(h);
            for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                let (s, d) = (*x + *y, *x - *y);
                *x = s;
                *y = d;
            }
        }
        h *= 2;
    }
    let scale = 1.0 / (n as f32).sqrt();
    for x in v {
        *x *= scale;
    }
}

fn flip(v: &mut [f32], mask: &[u64]) {
    for (chunk, &m) in v.chunks_exact_mut(64).zip(mask) {
        for (i, x) in chunk.iter_mut().enumerate() {
            let bit = ((m >> i) & 1) as u32;
            *x = f32::from_bits(x.to_bits() ^ (bit << 31));
        }
    }
}

impl Rotation {
    /// The rotation of `padded_dims` (a positive multiple of 64) dimensions defined by `seed`.
    pub fn new(padded_dims: usize, seed: u64, rounds: u32) -> Rotation {
        assert!(padded_dims > 0 && padded_dims.is_multiple_of(64));
        let block = 1usize << (usize::BITS - 1 - padded_dims.leading_zeros());
        let mut rng = Rng::new(seed ^ 0x5241_4249_5451_5254);
        let words = padded_dims / 64;
        let signs = (0..2 * rounds as usize * words)
            .map(|_| rng.next_u64())
            .collect();
        Rotation {
            dims: padded_dims,
            block,
            rounds: rounds as usize,
            signs,
        }
    }

    /// `D`, the padded dimensions.
    pub fn dims(&self) -> usize {
        self.dims
    }

    fn mask(&self, k: usize) -> &[u64] {
        let words = self.dims / 64;
        &self.signs[k * words..(k + 1) * words]
    }

    /// Rotate `v` (length `D`) in place.
    pub fn rotate_in_place(&self, v: &mut [f32]) {
        assert_eq!(v.len(), self.dims);
        let (d, b) = (self.dims, self.block);
        for r in 0..self.rounds {
            flip(v, self.mask(2 * r));
            fwht(&mut v[..b]);
            flip(v, self.mask(2 * r + 1));
            fwht(&mut v[d - b..]);
        }
    }

    /// Undo [`Rotation::rotate_in_place`].
    pub fn inverse_in_place(&self, v: &mut [f32]) {
        assert_eq!(v.len(), self.dims);
        let (d, b) = (self.dims, self.block);
        for r in (0..self.rounds).rev() {
            fwht(&mut v[d - b..]);
            flip(v, self.mask(2 * r + 1));
            fwht(&mut v[..b]);
            flip(v, self.mask(2 * r));
        }
    }

    /// Zero-pad `x` (at most `D` values) to `D` dimensions and rotate it.
    pub fn rotate(&self, x: &[f32]) -> Vec<f32> {
        assert!(x.len() <= self.dims);
        let mut v = vec![0.0; self.dims];
        v[..x.len()].copy_from_slice(x);
        self.rotate_in_place(&mut v);
        v
    }
}

/// The 1-bit RaBitQ code of a rotated residual.
#[derive(Clone, Debug, PartialEq)]
pub struct Code {
    /// `|v|`.
    pub norm: f32,
    /// `<ō, o>` (1 for a zero residual).
    pub dot_oo: f32,
    /// Sign bits, `D / 64` words: bit set iff the coordinate is ≥ 0.
    pub bits: Vec<u64>,
}

/// Encode a rotated residual `v` (length a multiple of 64).
pub fn encode(v: &[f32]) -> Code {
    let d = v.len();
    let mut bits = vec![0u64; d / 64];
    let mut norm2 = 0f64;
    let mut l1 = 0f64;
    for (w, chunk) in bits.iter_mut().zip(v.chunks_exact(64)) {
        for (i, &x) in chunk.iter().enumerate() {
            if x >= 0.0 {
                *w |= 1 << i;
            }
            norm2 += (x as f64) * (x as f64);
            l1 += x.abs() as f64;
        }
    }
    let norm = norm2.sqrt();
    let dot_oo = if norm > 0.0 {
        (l1 / ((d as f64).sqrt() * norm)).min(1.0)
    } else {
        1.0
    };
    Code {
        norm: norm as f32,
        dot_oo: dot_oo as f32,
        bits,
    }
}

/// 8-bit scalar quantization of a rotated residual: `v_i ≈ lo + delta * u_i`, rounding to nearest.
pub fn quantize_u8(v: &[f32]) -> (f32, f32, Vec<u8>) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &x in v {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if v.is_empty() || hi <= lo {
        let lo = if v.is_empty() { 0.0 } else { lo };
        return (lo, 0.0, vec![0; v.len()]);
    }
    let delta = (hi - lo) / 255.0;
    let inv = 1.0 / delta;
    let u = v
        .iter()
        .map(|&x| ((x - lo) * inv).round().clamp(0.0, 255.0) as u8)
        .collect();
    (lo, delta, u)
}

/// Standard deviations of the 8-bit rounding error covered by [`refine_estimate`]'s bound.
pub const REFINE_SIGMAS: f32 = 5.0;

/// `<r, w>` from the 8-bit code of `r` (see [`quantize_u8`]): `lo * sum(w) + delta * <u, w>`.
/// The rounding errors are uniform in `±delta / 2` and independent of the query, so their
/// contribution has standard deviation `delta / sqrt(12) * |w|`; the bound covers
/// [`REFINE_SIGMAS`] of them plus float rounding.
pub fn refine_estimate(
    lo: f32,
    delta: f32,
    u: &[u8],
    w: &[f32],
    w_sum: f32,
    w_norm: f32,
) -> Estimate {
    let dot = rsclip_core::bits::dot_u8_f32(u, w);
    let value = lo * w_sum + delta * dot;
    let scale = (lo.abs() + 255.0 * delta) * w_norm * (u.len() as f32).sqrt();
    let error = REFINE_SIGMAS * delta * 0.288_675_13 * w_norm + 1e-6 * scale;
    Estimate { value, error }
}

/// An estimate of `<r, w>` and a bound on its error.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Estimated `<r, w>`.
    pub value: f32,
    /// `|<r, w> - value| <= error` with high probability.
    pub error: f32,
}

/// A rotated vector `w` (the query), quantized to 4 bits per coordinate as bit planes and as
/// fast-scan lookup tables.
#[derive(Clone, Debug)]
pub struct QueryQuant {
    /// 4 plane words per code word, interleaved.
    planes: Vec<u64>,
    /// Fast-scan lookup tables of the levels (empty past [`rsclip_core::fastscan::MAX_SEGMENTS`]).
    luts: Vec<u8>,
    /// The popcount kernel for this CPU, looked up once instead of once per code.
    kernel: rsclip_core::bits::PlaneCountsKernel,
    lo: f32,
    delta: f32,
    sum_u: f32,
    norm: f32,
    dims: f32,
    inv_sqrt_d: f32,
    /// `QUERY_QUANT_SIGMAS · |w - w̄| / sqrt(D)`.
    quant_err: f32,
}

impl QueryQuant {
    /// Quantize `w` (length a multiple of 64).
    ///
    /// Called once per probed list, so it is written to vectorize: no libm rounding call, f32
    /// accumulators in 8 lanes, and bit planes gathered 8 coordinates at a time with a multiply
    /// (it was a fifth of a scan's time with per-coordinate bit scatter and f64 sums).
    pub fn new(w: &[f32]) -> QueryQuant {
        let d = w.len();
        // Lane-wise comparisons (the inputs are finite) vectorize; f32::min's NaN rules did not.
        let (mut lo8, mut hi8) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8]);
        for c in w.chunks_exact(8) {
            for j in 0..8 {
                lo8[j] = lo8[j].min(c[j]);
                hi8[j] = hi8[j].max(c[j]);
            }
        }
        let lo = lo8.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        let hi = hi8.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let delta = (hi - lo) / 15.0;
        let inv = if delta > 0.0 { 1.0 / delta } else { 0.0 };
        let mut levels = vec![0u8; d];
        for (lv, wc) in levels.chunks_exact_mut(8).zip(w.chunks_exact(8)) {
            for j in 0..8 {
                // (x - lo) * inv is ≥ 0, so adding one half and truncating rounds to nearest;
                // through i32 because SSE2 converts floats to i32 four at a time, not to u32.
                lv[j] = (((wc[j] - lo) * inv + 0.5) as i32).clamp(0, 15) as u8;
            }
        }
        let (mut norm2, mut err2) = ([0f32; 8], [0f32; 8]);
        for (lv, wc) in levels.chunks_exact(8).zip(w.chunks_exact(8)) {
            for j in 0..8 {
                let e = wc[j] - (lo + delta * lv[j] as f32);
                err2[j] += e * e;
                norm2[j] += wc[j] * wc[j];
            }
        }
        let sum_u: u32 = levels.iter().map(|&u| u as u32).sum();
        let mut planes = vec![0u64; 4 * (d / 64)];
        for (pw, lv) in planes.chunks_exact_mut(4).zip(levels.chunks_exact(64)) {
            for (byte, l8) in lv.chunks_exact(8).enumerate() {
                let x =
                    u64::from_le_bytes([l8[0], l8[1], l8[2], l8[3], l8[4], l8[5], l8[6], l8[7]]);
                for (j, p) in pw.iter_mut().enumerate() {
                    // Bit j of each of the 8 levels, one per byte, gathered into 8 bits in
                    // coordinate order.
                    let bits = ((x >> j) & 0x0101_0101_0101_0101)
                        .wrapping_mul(0x0102_0408_1020_4080)
                        >> 56;
                    *p |= bits << (8 * byte);
                }
            }
        }
        let norm = norm2.iter().sum::<f32>().sqrt();
        let err = err2.iter().sum::<f32>().sqrt();
        let df = d as f32;
        let luts = if d / 4 <= rsclip_core::fastscan::MAX_SEGMENTS {
            rsclip_core::fastscan::build_luts(&levels)
        } else {
            Vec::new()
        };
        QueryQuant {
            planes,
            luts,
            kernel: rsclip_core::bits::plane_counts_kernel(),
            lo,
            delta,
            sum_u: sum_u as f32,
            norm,
            dims: df,
            inv_sqrt_d: 1.0 / df.sqrt(),
            quant_err: QUERY_QUANT_SIGMAS * err / df.sqrt(),
        }
    }

    /// `|w|`.
    pub fn norm(&self) -> f32 {
        self.norm
    }

    /// `<ō, w̄>` for the code bits `code` (`D / 8` bytes, little-endian words).
    pub fn inner(&self, code: &[u8]) -> f32 {
        // Hardware popcount when the CPU has it (rsclip-core dispatches at run time).
        let (pc, [s0, s1, s2, s3]) = (self.kernel)(code, &self.planes);
        let sum_bu = (s0 + 2 * s1 + 4 * s2 + 8 * s3) as f32;
        self.inv_sqrt_d
            * ((2.0 * pc as f32 - self.dims) * self.lo + self.delta * (2.0 * sum_bu - self.sum_u))
    }

    /// The quantization offset `lo` (`w_i ≈ lo + Δ·u_i`).
    pub fn lo(&self) -> f32 {
        self.lo
    }

    /// Bound on `<ō, w - w̄>` for any code ([`QUERY_QUANT_SIGMAS`] standard deviations).
    pub fn quant_err(&self) -> f32 {
        self.quant_err
    }

    /// `Σ_i bit_i · u_i` of one code given as `D / 8` bytes (little-endian words).
    pub fn level_sum(&self, code: &[u8]) -> u32 {
        let (_, [s0, s1, s2, s3]) = (self.kernel)(code, &self.planes);
        s0 + 2 * s1 + 4 * s2 + 8 * s3
    }

    /// [`QueryQuant::level_sum`] of the 32 codes of a block in the fast-scan layout.
    pub fn level_sums_packed(&self, codes: &[u8], sums: &mut [u32; rsclip_core::fastscan::BLOCK]) {
        rsclip_core::fastscan::accumulate(codes, &self.luts, sums)
    }

    /// The part of `<ō, w̄>` that depends on the code beyond its popcount, scaled:
    /// `Δ · (2 · level_sum − Σu) / sqrt(D)`. With a row's constants ([`RowFactors`]),
    /// `|r|/<ō,o> · <ō, w̄> = f1 · level_term + lo · h`.
    ///
    /// [`RowFactors`]: crate::format::RowFactors
    #[inline]
    pub fn level_term(&self, level_sum: u32) -> f32 {
        self.delta * (2.0 * level_sum as f32 - self.sum_u) * self.inv_sqrt_d
    }

    /// [`QueryQuant::level_term`] of a block's 32 sums at once (the same arithmetic, lane by
    /// lane: the sums are far below 2³¹, so converting through i32 is exact and vectorizes,
    /// where u32 → f32 does not before AVX-512).
    #[inline]
    pub fn level_terms(
        &self,
        sums: &[u32; rsclip_core::fastscan::BLOCK],
        out: &mut [f32; rsclip_core::fastscan::BLOCK],
    ) {
        for (o, &s) in out.iter_mut().zip(sums) {
            *o = self.delta * (2.0 * (s as i32) as f32 - self.sum_u) * self.inv_sqrt_d;
        }
    }

    /// The RaBitQ error scale for a query offset of norm `w_norm` from the centroid:
    /// `ε0 · |w| / sqrt(D - 1)` (multiplied by a row's `e1`).
    pub fn eps_for(&self, w_norm: f32) -> f32 {
        EPSILON0 * w_norm / (self.dims - 1.0).max(1.0).sqrt()
    }

    /// [`QueryQuant::eps_for`] at [`PRUNE_EPSILON0`].
    pub fn prune_eps_for(&self, w_norm: f32) -> f32 {
        PRUNE_EPSILON0 * w_norm / (self.dims - 1.0).max(1.0).sqrt()
    }

    /// [`QueryQuant::quant_err`] at [`PRUNE_QUANT_SIGMAS`].
    pub fn prune_quant_err(&self) -> f32 {
        self.quant_err * (PRUNE_QUANT_SIGMAS / QUERY_QUANT_SIGMAS)
    }
}

/// The per-row constants of the 1-bit estimator for residual `r = x - c` with code `code`
/// (all rotated), for `metric`: see [`crate::format::RowFactors`]. With them and a query `q`
/// quantized once per scan ([`QueryQuant`]), the estimate of `<x, q>` (inner product and
/// cosine) is `<c, q> + k0 + f1 · level_term + lo · h`, and of `|x - q|²` (L2)
/// `k0 + |q - c|² - 2 (f1 · level_term + lo · h)`, each within
/// `e1 · eps_for(|q - c|) + f1 · (quant_err + 1e-5 |q - c|)` (twice that for L2).
///
/// Why these: `<r, q - c> = <r, q> - <r, c>` and RaBitQ estimates `<r, v> ≈ |r| <ō, v> / <ō, o>`
/// for any `v`; `<ō, q - c>` splits into `<ō, q̄>` (the query's tables, shared by every list)
/// and `<ō, c>`, a per-row constant folded into `k0`. The query is quantized once per scan,
/// not once per probed list.
pub fn row_factors(
    metric: crate::Metric,
    r: &[f32],
    c: &[f32],
    code: &Code,
) -> crate::format::RowFactors {
    let d = r.len() as f64;
    let rc: f64 = r.iter().zip(c).map(|(a, b)| *a as f64 * *b as f64).sum();
    if code.norm == 0.0 {
        let k0 = match metric {
            crate::Metric::L2 => 0.0,
            _ => rc as f32,
        };
        return crate::format::RowFactors {
            k0,
            ..Default::default()
        };
    }
    let a = code.dot_oo as f64;
    let norm = code.norm as f64;
    let f1 = norm / a;
    let pc: u32 = code.bits.iter().map(|w| w.count_ones()).sum();
    let h = f1 * (2.0 * pc as f64 - d) / d.sqrt();
    let oc: f64 = c
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if code.bits[i / 64] >> (i % 64) & 1 == 1 {
                x as f64
            } else {
                -(x as f64)
            }
        })
        .sum::<f64>()
        / d.sqrt();
    let g = f1 * oc;
    let e1 = norm * (1.0 - a * a).max(0.0).sqrt() / a;
    let k0 = match metric {
        crate::Metric::L2 => norm * norm + 2.0 * g,
        _ => rc - g,
    };
    crate::format::RowFactors {
        k0: k0 as f32,
        f1: f1 as f32,
        h: h as f32,
        e1: e1 as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauss(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gaussian() as f32).collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn rotation_is_orthogonal() {
        let mut rng = Rng::new(1);
        for dims in [64usize, 128, 192, 768, 960, 1024, 1536, 16000] {
            let d = padded_dims(dims);
            let rot = Rotation::new(d, 99, 3);
            let x = gauss(&mut rng, dims);
            let y = gauss(&mut rng, dims);
            let px = rot.rotate(&x);
            let py = rot.rotate(&y);
            let nx = dot(&x, &x);
            assert!(((dot(&px, &px) - nx) / nx).abs() < 1e-5, "norm {dims}");
            let xy = dot(&x, &y);
            assert!((dot(&px, &py) - xy).abs() < 1e-4 * nx.sqrt() * dot(&y, &y).sqrt());
            let mut back = px.clone();
            rot.inverse_in_place(&mut back);
            for i in 0..d {
                let want = if i < dims { x[i] } else { 0.0 };
                assert!((back[i] - want).abs() < 1e-4, "inverse {dims} {i}");
            }
            // deterministic in the seed, different for another seed
            assert_eq!(Rotation::new(d, 99, 3).rotate(&x), px);
            assert_ne!(Rotation::new(d, 100, 3).rotate(&x), px);
        }
    }

    #[test]
    fn rotation_spreads_a_basis_vector() {
        let rot = Rotation::new(768, 5, 3);
        let mut e = vec![0f32; 768];
        e[3] = 1.0;
        let pe = rot.rotate(&e);
        let max = pe.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max < 0.25, "max coordinate {max}");
    }

    #[test]
    fn code_factors() {
        let c = encode(&[0.0; 64]);
        assert_eq!((c.norm, c.dot_oo), (0.0, 1.0));
        let mut v = vec![1.0f32; 64];
        v[0] = -1.0;
        let c = encode(&v);
        assert!((c.dot_oo - 1.0).abs() < 1e-6);
        assert_eq!(c.bits[0], !1u64);
        assert!((c.norm - 8.0).abs() < 1e-6);
    }

    fn code_bytes(c: &Code) -> Vec<u8> {
        c.bits.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn quantized_inner_product_is_close_to_exact() {
        let mut rng = Rng::new(3);
        let d = 256;
        let w = gauss(&mut rng, d);
        let qq = QueryQuant::new(&w);
        let v = gauss(&mut rng, d);
        let c = encode(&v);
        let exact: f64 = (0..d)
            .map(|i| {
                if v[i] >= 0.0 {
                    w[i] as f64
                } else {
                    -w[i] as f64
                }
            })
            .sum::<f64>()
            / (d as f64).sqrt();
        let got = qq.inner(&code_bytes(&c)) as f64;
        assert!((got - exact).abs() < 0.2, "{got} vs {exact}");
    }

    /// Estimator error vs exact on random data: nearly unbiased, bound holds ≥ 99%, through
    /// both code layouts (fast-scan tables and bit planes).
    #[test]
    fn estimator_unbiased_and_bound_valid() {
        let mut results = Vec::new();
        for (dims, seed) in [(128usize, 11u64), (768, 12), (1024, 13)] {
            let mut rng = Rng::new(seed);
            let d = padded_dims(dims);
            let rot = Rotation::new(d, seed, 3);
            let (mut n, mut ok, mut sum_err, mut sum_abs) = (0usize, 0usize, 0f64, 0f64);
            let (mut prune_ok, mut prune_over, mut prune_under) = (0usize, 0usize, 0usize);
            for _ in 0..20 {
                // a centroid, a query and 32 data vectors around the centroid
                let c: Vec<f32> = gauss(&mut rng, dims);
                let q: Vec<f32> = c.iter().map(|x| x + 0.7 * rng.gaussian() as f32).collect();
                let pc = rot.rotate(&c);
                let pq = rot.rotate(&q);
                let w: Vec<f32> = pq.iter().zip(&pc).map(|(a, b)| a - b).collect();
                let w_norm = dot(&w, &w).sqrt() as f32;
                let cq = dot(&pc, &pq) as f32;
                let qq = QueryQuant::new(&pq);
                let mut rows = Vec::new();
                for _ in 0..32 {
                    let x: Vec<f32> = c.iter().map(|x| x + 0.5 * rng.gaussian() as f32).collect();
                    let px = rot.rotate(&x);
                    let v: Vec<f32> = px.iter().zip(&pc).map(|(a, b)| a - b).collect();
                    let code = encode(&v);
                    let f = row_factors(crate::Metric::InnerProduct, &v, &pc, &code);
                    rows.push((dot(&px, &pq), f, code));
                }
                let refs: Vec<&[u64]> = rows.iter().map(|r| &r.2.bits[..]).collect();
                let packed = rsclip_core::fastscan::pack_block(&refs, d);
                let mut sums = [0u32; 32];
                qq.level_sums_packed(&packed, &mut sums);
                for (i, (exact, f, code)) in rows.iter().enumerate() {
                    assert_eq!(sums[i], qq.level_sum(&code_bytes(code)));
                    let est = cq + f.k0 + f.f1 * qq.level_term(sums[i]) + qq.lo() * f.h;
                    let bound = f.e1 * qq.eps_for(w_norm) + f.f1 * (qq.quant_err() + 1e-5 * w_norm);
                    let e = est as f64 - exact;
                    sum_err += e;
                    sum_abs += e.abs();
                    n += 1;
                    if e.abs() <= bound as f64 {
                        ok += 1;
                    }
                    let prune_bound = f.e1 * qq.prune_eps_for(w_norm)
                        + f.f1 * (qq.prune_quant_err() + 1e-5 * w_norm);
                    assert!(prune_bound <= bound);
                    if e.abs() <= prune_bound as f64 {
                        prune_ok += 1;
                    } else if e > 0.0 {
                        prune_over += 1;
                    } else {
                        prune_under += 1;
                    }
                }
            }
            let mean_err = sum_err / n as f64;
            let mean_abs = sum_abs / n as f64;
            let frac = ok as f64 / n as f64;
            let prune_frac = prune_ok as f64 / n as f64;
            let prune_side = prune_over.max(prune_under) as f64 / n as f64;
            println!(
                "dims {dims}: bound holds {frac:.4}, pruning bound {prune_frac:.4} (fails above \
                 {prune_over}, below {prune_under} of {n}), mean error {mean_err:.4}, \
                 mean |error| {mean_abs:.4}"
            );
            results.push((dims, frac, prune_side, mean_err, mean_abs));
        }
        for (dims, frac, prune_side, mean_err, mean_abs) in results {
            assert!(frac >= 0.99, "bound valid for only {frac} at {dims} dims");
            // Tighter, but still a bound: each side fails for about 1% of pairs.
            assert!(
                prune_side <= 0.015,
                "a side of the pruning bound fails for {prune_side} at {dims} dims"
            );
            assert!(
                mean_err.abs() < 0.2 * mean_abs,
                "biased: {mean_err} vs {mean_abs}"
            );
        }
    }

    /// The vectorized quantizer agrees with a coordinate-by-coordinate construction.
    #[test]
    fn query_planes_match_naive_construction() {
        let mut rng = Rng::new(21);
        for d in [64usize, 384, 1024] {
            let w = gauss(&mut rng, d);
            let qq = QueryQuant::new(&w);
            let (lo, delta) = (qq.lo, qq.delta);
            let mut planes = vec![0u64; 4 * (d / 64)];
            let mut sum_u = 0u32;
            for (i, &x) in w.iter().enumerate() {
                let u = ((x - lo) / delta).round().clamp(0.0, 15.0) as u32;
                sum_u += u;
                for j in 0..4 {
                    planes[4 * (i / 64) + j] |= (((u >> j) & 1) as u64) << (i % 64);
                }
            }
            // Rounding x.5 cases may differ by one level between the two roundings; with
            // Gaussian floats they do not occur.
            assert_eq!(qq.planes, planes, "d = {d}");
            assert_eq!(qq.sum_u as u32, sum_u);
            let n = dot(&w, &w).sqrt() as f32;
            assert!((qq.norm - n).abs() < 1e-4 * n);
        }
    }
}
