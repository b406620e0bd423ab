//! k-means training of the list centroids.
//!
//! k-means++ initialization (D² sampling with a seeded [`Rng`]) for small problems, or `k`
//! distinct random sample points when `k × n × dims` exceeds [`PLUS_PLUS_LIMIT`] (k-means++
//! needs `k` sequential passes over the sample, which is memory bound: 12 s of 22 s for
//! 1000 centroids on 50k × 768), then Lloyd iterations
//! (stopping early when no assignment changes). Spherical k-means (centroids normalized after
//! every update, assignment by largest inner product) for inner product and cosine; plain
//! k-means (assignment by smallest squared L2) for L2. Empty clusters are re-seeded with the
//! points farthest from their centroids. The assignment step and the k-means++ distance updates
//! run on `threads` threads (`std::thread::scope`); results do not depend on the thread count.
//! Distances are computed in cache-sized blocks of points × centroids with the `rsclip_core`
//! SIMD kernels.

use crate::rng::Rng;
use crate::{Error, Metric, Result};
use rsclip_core::distance::{dot, dot_4x4, l2_squared};

/// Largest `k × n × dims` for which [`Init::Auto`] uses k-means++.
pub const PLUS_PLUS_LIMIT: u64 = 2_000_000_000;

/// How initial centroids are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// k-means++ when `k × n × dims ≤ PLUS_PLUS_LIMIT`, else random.
    Auto,
    /// k-means++ (D² sampling).
    PlusPlus,
    /// `k` distinct random points.
    Random,
}

/// k-means parameters.
#[derive(Clone, Debug)]
pub struct KMeansParams {
    /// Initialization.
    pub init: Init,
    /// Number of centroids wanted (clamped to the number of points).
    pub k: usize,
    /// Maximum Lloyd iterations.
    pub iterations: u32,
    /// PRNG seed.
    pub seed: u64,
    /// Worker threads (1 = no extra thread).
    pub threads: usize,
    /// Spherical k-means (unit centroids, inner-product assignment).
    pub spherical: bool,
}

impl Default for KMeansParams {
    fn default() -> Self {
        KMeansParams {
            init: Init::Auto,
            k: 1,
            iterations: 10,
            seed: 0,
            threads: 1,
            spherical: false,
        }
    }
}

/// Run `f(first_index, chunk)` over `threads` contiguous chunks of `items` in parallel.
fn par_chunks<T: Send>(items: &mut [T], threads: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if threads <= 1 || items.len() < 256 {
        f(0, items);
        return;
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (ci, part) in items.chunks_mut(chunk).enumerate() {
            let f = &f;
            s.spawn(move || f(ci * chunk, part));
        }
    });
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
    if n > 0.0 {
        for a in v {
            *a = (*a as f64 / n) as f32;
        }
    }
}

const POINT_BLOCK: usize = 16;
const CENTROID_BLOCK: usize = 64;

/// Best centroid `(index, score)` of every point; score is `|c|² - 2<x,c>` (L2) or `-<x,c>`.
///
/// Every inner product comes from [`dot_4x4`], four points against four centroids (a short
/// quad repeats its last member), so a point's scores, and so its centroid, do not depend on
/// which other points share its batch: a build assigns a row the same list in any batch.
pub(crate) fn assign(
    data: &[f32],
    dims: usize,
    cents: &[f32],
    spherical: bool,
    threads: usize,
    out: &mut [(u32, f32)],
) {
    let k = cents.len() / dims;
    let cnorm: Vec<f32> = cents.chunks_exact(dims).map(|c| dot(c, c)).collect();
    par_chunks(out, threads, |start, part| {
        for (pb, block) in part.chunks_mut(POINT_BLOCK).enumerate() {
            let first = start + pb * POINT_BLOCK;
            let len = block.len();
            for b in block.iter_mut() {
                *b = (0, f32::INFINITY);
            }
            let row = |i: usize| {
                let i = first + i.min(len - 1);
                &data[i * dims..(i + 1) * dims]
            };
            for c0 in (0..k).step_by(CENTROID_BLOCK) {
                let c1 = (c0 + CENTROID_BLOCK).min(k);
                let mut ips = [[0f32; 4]; 4];
                for p0 in (0..len).step_by(4) {
                    let xs = [row(p0), row(p0 + 1), row(p0 + 2), row(p0 + 3)];
                    for cq in (c0..c1).step_by(4) {
                        let ci = [0, 1, 2, 3].map(|j| (cq + j).min(c1 - 1));
                        let cs = ci.map(|c| &cents[c * dims..(c + 1) * dims]);
                        dot_4x4(&xs, &cs, &mut ips);
                        for (i, ips) in ips.iter().enumerate().take(len - p0) {
                            let best = &mut block[p0 + i];
                            for (&c, &ip) in ci.iter().zip(ips) {
                                let s = if spherical { -ip } else { cnorm[c] - 2.0 * ip };
                                if s < best.1 {
                                    *best = (c as u32, s);
                                }
                            }
                        }
                    }
                }
            }
        }
    });
}

/// `k` distinct random points.
fn init_random(data: &[f32], dims: usize, k: usize, rng: &mut Rng) -> Vec<f32> {
    let n = data.len() / dims;
    let mut idx: Vec<usize> = (0..n).collect();
    let mut cents = Vec::with_capacity(k * dims);
    for j in 0..k {
        let pick = j + rng.below((n - j) as u64) as usize;
        idx.swap(j, pick);
        let i = idx[j];
        cents.extend_from_slice(&data[i * dims..(i + 1) * dims]);
    }
    cents
}

/// k-means++ initial centroids.
fn init_plus_plus(data: &[f32], dims: usize, k: usize, rng: &mut Rng, threads: usize) -> Vec<f32> {
    let n = data.len() / dims;
    let mut cents = Vec::with_capacity(k * dims);
    let first = rng.below(n as u64) as usize;
    cents.extend_from_slice(&data[first * dims..(first + 1) * dims]);
    let mut mind = vec![f32::INFINITY; n];
    for j in 0..k {
        if j > 0 {
            let total: f64 = mind.iter().map(|&d| d as f64).sum();
            let pick = if total > 0.0 && total.is_finite() {
                let mut r = rng.next_f64() * total;
                let mut pick = n - 1;
                for (i, &d) in mind.iter().enumerate() {
                    r -= d as f64;
                    if r < 0.0 {
                        pick = i;
                        break;
                    }
                }
                pick
            } else {
                rng.below(n as u64) as usize
            };
            cents.extend_from_slice(&data[pick * dims..(pick + 1) * dims]);
        }
        let c = &cents[j * dims..(j + 1) * dims];
        par_chunks(&mut mind, threads, |start, part| {
            for (i, m) in part.iter_mut().enumerate() {
                let p = start + i;
                let d = l2_squared(&data[p * dims..(p + 1) * dims], c);
                if d < *m {
                    *m = d;
                }
            }
        });
    }
    cents
}

/// Train centroids on `data` (row-major, `n × dims`). Returns `min(k, n)` centroids
/// (row-major), or one zero centroid when `data` is empty.
pub fn kmeans(data: &[f32], dims: usize, p: &KMeansParams) -> Vec<f32> {
    assert!(dims > 0 && data.len().is_multiple_of(dims));
    let n = data.len() / dims;
    if n == 0 {
        return vec![0.0; dims];
    }
    let k = p.k.clamp(1, n);
    let threads = p.threads.max(1);
    let mut rng = Rng::new(p.seed);
    let plus_plus = match p.init {
        Init::PlusPlus => true,
        Init::Random => false,
        Init::Auto => (k as u64) * (n as u64) * (dims as u64) <= PLUS_PLUS_LIMIT,
    };
    let mut cents = if plus_plus {
        init_plus_plus(data, dims, k, &mut rng, threads)
    } else {
        init_random(data, dims, k, &mut rng)
    };
    if p.spherical {
        cents.chunks_exact_mut(dims).for_each(normalize);
    }
    lloyd(data, dims, &mut cents, p.spherical, threads, p.iterations);
    cents
}

/// Up to `iterations` Lloyd iterations on `cents` (stopping when no assignment changes).
fn lloyd(
    data: &[f32],
    dims: usize,
    cents: &mut [f32],
    spherical: bool,
    threads: usize,
    iterations: u32,
) {
    let n = data.len() / dims;
    let k = cents.len() / dims;
    let mut best = vec![(u32::MAX, 0f32); n];
    let mut prev: Vec<u32> = vec![u32::MAX; n];
    for _ in 0..iterations {
        assign(data, dims, cents, spherical, threads, &mut best);
        let changed = best.iter().zip(&prev).any(|(b, &q)| b.0 != q);
        if !changed {
            break;
        }
        for (q, b) in prev.iter_mut().zip(&best) {
            *q = b.0;
        }
        // update
        let mut sums = vec![0f64; k * dims];
        let mut counts = vec![0usize; k];
        for (i, b) in best.iter().enumerate() {
            let c = b.0 as usize;
            counts[c] += 1;
            let s = &mut sums[c * dims..(c + 1) * dims];
            for (a, &x) in s.iter_mut().zip(&data[i * dims..(i + 1) * dims]) {
                *a += x as f64;
            }
        }
        for c in 0..k {
            if counts[c] > 0 {
                let inv = 1.0 / counts[c] as f64;
                for (dst, &s) in cents[c * dims..(c + 1) * dims]
                    .iter_mut()
                    .zip(&sums[c * dims..(c + 1) * dims])
                {
                    *dst = (s * inv) as f32;
                }
                if spherical {
                    normalize(&mut cents[c * dims..(c + 1) * dims]);
                }
            }
        }
        // re-seed empty clusters with the points farthest from their centroids
        let empty: Vec<usize> = (0..k).filter(|&c| counts[c] == 0).collect();
        if !empty.is_empty() {
            let cost = |i: usize| -> f32 {
                let x = &data[i * dims..(i + 1) * dims];
                if spherical {
                    let nx = dot(x, x).sqrt();
                    if nx > 0.0 {
                        1.0 + best[i].1 / nx
                    } else {
                        0.0
                    }
                } else {
                    dot(x, x) + best[i].1
                }
            };
            let mut order: Vec<(f32, usize)> = (0..n).map(|i| (cost(i), i)).collect();
            order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for (e, &(_, i)) in empty.iter().zip(order.iter()) {
                cents[e * dims..(e + 1) * dims].copy_from_slice(&data[i * dims..(i + 1) * dims]);
                if spherical {
                    normalize(&mut cents[e * dims..(e + 1) * dims]);
                }
            }
        }
    }
}

/// Train `lists` centroids for an index with `metric` from a sample (row-major `n × dims`).
///
/// For cosine the sample rows are normalized and zero rows dropped. Returns `min(lists, n)`
/// centroids, or a single zero centroid when the sample has no usable row (empty table): an
/// index built with it has one list and works, but should be rebuilt once data is loaded.
pub fn train_centroids(
    metric: Metric,
    sample: &[f32],
    dims: usize,
    lists: u32,
    seed: u64,
    threads: usize,
) -> Result<Vec<f32>> {
    if dims == 0 || !sample.len().is_multiple_of(dims) {
        return Err(Error::InvalidArgument(format!(
            "sample of {} floats is not a multiple of {dims} dimensions",
            sample.len()
        )));
    }
    if lists == 0 {
        return Err(Error::InvalidArgument("lists must be at least 1".into()));
    }
    if !sample.iter().all(|v| v.is_finite()) {
        return Err(Error::NonFiniteValue);
    }
    let params = KMeansParams {
        init: Init::Auto,
        k: lists as usize,
        iterations: 10,
        seed,
        threads,
        spherical: metric.spherical(),
    };
    if metric == Metric::Cosine {
        let mut rows = Vec::with_capacity(sample.len());
        for row in sample.chunks_exact(dims) {
            if row.iter().any(|&v| v != 0.0) {
                let start = rows.len();
                rows.extend_from_slice(row);
                normalize(&mut rows[start..]);
            }
        }
        Ok(train(&rows, dims, &params))
    } else {
        Ok(train(sample, dims, &params))
    }
}

/// Lloyd passes over all centroids after the two levels (3 cost a second more at 1000 lists on
/// the real 100k set and moved recall at 40-56 probes by less than its noise).
const GLOBAL_PASSES: u32 = 1;

/// From this many centroids on, [`train_centroids`] trains in two levels.
pub const TWO_LEVEL_MIN: usize = 512;

fn train(data: &[f32], dims: usize, p: &KMeansParams) -> Vec<f32> {
    if p.k >= TWO_LEVEL_MIN {
        kmeans_two_level(data, dims, p)
    } else {
        kmeans(data, dims, p)
    }
}

/// k-means in two levels: `√k` coarse centroids, then each coarse cluster split into a share
/// of the `k` centroids proportional to its size, then one Lloyd pass over all of them.
///
/// Flat k-means costs `iterations × n × k` distances; this costs about
/// `iterations × n × 2√k + n × k`: for 1000 lists on a 50k sample about 7× less (the build of a
/// 1000-list index was mostly k-means). On the real sentence-embedding set (bench/index.py,
/// 100k rows, 1000 lists) recall at the same probes is within noise of flat k-means.
pub fn kmeans_two_level(data: &[f32], dims: usize, p: &KMeansParams) -> Vec<f32> {
    assert!(dims > 0 && data.len().is_multiple_of(dims));
    let n = data.len() / dims;
    let k = p.k.clamp(1, n.max(1));
    let coarse_k = ((k as f64).sqrt().round() as usize).clamp(1, k);
    if n == 0 || coarse_k < 2 || n <= k {
        return kmeans(data, dims, p);
    }
    let coarse = kmeans(
        data,
        dims,
        &KMeansParams {
            k: coarse_k,
            ..p.clone()
        },
    );
    let coarse_k = coarse.len() / dims;
    let mut best = vec![(0u32, 0f32); n];
    assign(data, dims, &coarse, p.spherical, p.threads, &mut best);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); coarse_k];
    for (i, b) in best.iter().enumerate() {
        members[b.0 as usize].push(i);
    }
    // Shares of k by size, largest remainders first; at most one centroid per member.
    let mut share: Vec<usize> = members
        .iter()
        .map(|m| (k * m.len() / n).min(m.len()))
        .collect();
    let mut order: Vec<usize> = (0..coarse_k).collect();
    order.sort_by_key(|&t| {
        let exact = k as f64 * members[t].len() as f64 / n as f64;
        (std::cmp::Reverse(((exact - exact.floor()) * 1e9) as u64), t)
    });
    let mut left = k - share.iter().sum::<usize>();
    while left > 0 {
        let before = left;
        for &t in &order {
            if left > 0 && share[t] < members[t].len() {
                share[t] += 1;
                left -= 1;
            }
        }
        if left == before {
            break; // every cluster has a centroid per member: fewer than k centroids
        }
    }
    let mut cents = Vec::with_capacity(k * dims);
    let mut part = Vec::new();
    for (t, m) in members.iter().enumerate() {
        if share[t] == 0 {
            continue;
        }
        part.clear();
        for &i in m {
            part.extend_from_slice(&data[i * dims..(i + 1) * dims]);
        }
        cents.extend(kmeans(
            &part,
            dims,
            &KMeansParams {
                k: share[t],
                seed: p.seed.wrapping_add(1 + t as u64),
                threads: p.threads,
                ..p.clone()
            },
        ));
    }
    // One Lloyd pass over the whole sample lets the centroids of neighbouring coarse clusters
    // settle their shared border.
    lloyd(
        data,
        dims,
        &mut cents,
        p.spherical,
        p.threads,
        GLOBAL_PASSES,
    );
    cents
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mixture(
        seed: u64,
        clusters: usize,
        per: usize,
        dims: usize,
        spread: f64,
    ) -> (Vec<f32>, Vec<usize>) {
        let mut rng = Rng::new(seed);
        let centers: Vec<f64> = (0..clusters * dims)
            .map(|_| rng.gaussian() * 10.0)
            .collect();
        let mut data = Vec::new();
        let mut labels = Vec::new();
        for i in 0..clusters * per {
            let c = i % clusters;
            labels.push(c);
            for j in 0..dims {
                data.push((centers[c * dims + j] + spread * rng.gaussian()) as f32);
            }
        }
        (data, labels)
    }

    fn purity(data: &[f32], dims: usize, cents: &[f32], labels: &[usize], spherical: bool) -> bool {
        let n = labels.len();
        let mut best = vec![(0u32, 0f32); n];
        assign(data, dims, cents, spherical, 1, &mut best);
        let clusters = labels.iter().max().unwrap() + 1;
        let mut map = vec![u32::MAX; clusters];
        let mut used = std::collections::HashSet::new();
        for (l, b) in labels.iter().zip(&best) {
            if map[*l] == u32::MAX {
                if !used.insert(b.0) {
                    return false;
                }
                map[*l] = b.0;
            } else if map[*l] != b.0 {
                return false;
            }
        }
        true
    }

    fn cost(data: &[f32], dims: usize, cents: &[f32]) -> f64 {
        let mut best = vec![(0u32, 0f32); data.len() / dims];
        assign(data, dims, cents, false, 1, &mut best);
        best.iter()
            .zip(data.chunks_exact(dims))
            .map(|(b, x)| (b.1 + dot(x, x)) as f64)
            .sum()
    }

    /// Two levels give exactly k centroids, deterministically on any thread count, and a
    /// clustering about as tight as flat k-means'.
    #[test]
    fn two_level_matches_flat_kmeans() {
        let dims = 16;
        let (data, _) = mixture(8, 700, 20, dims, 1.0);
        let p = KMeansParams {
            init: Init::Random,
            k: 600,
            iterations: 10,
            seed: 3,
            threads: 1,
            spherical: false,
        };
        let two = kmeans_two_level(&data, dims, &p);
        assert_eq!(two.len(), 600 * dims);
        assert!(two.iter().all(|v| v.is_finite()));
        let again = kmeans_two_level(
            &data,
            dims,
            &KMeansParams {
                threads: 2,
                ..p.clone()
            },
        );
        assert_eq!(two, again);
        let flat = kmeans(&data, dims, &p);
        let (c2, c1) = (cost(&data, dims, &two), cost(&data, dims, &flat));
        println!("two-level cost {c2:.1}, flat {c1:.1}");
        assert!(c2 <= 1.2 * c1, "two-level {c2} vs flat {c1}");
        // fewer points than centroids: every point is a centroid
        let small = kmeans_two_level(&data[..100 * dims], dims, &p);
        assert_eq!(small.len(), 100 * dims);
    }

    #[test]
    fn separable_mixture_is_recovered() {
        let dims = 32;
        let (data, labels) = mixture(5, 10, 200, dims, 1.0);
        for spherical in [false, true] {
            let p = KMeansParams {
                init: Init::PlusPlus,
                k: 10,
                iterations: 20,
                seed: 1,
                threads: 2,
                spherical,
            };
            let cents = kmeans(&data, dims, &p);
            assert_eq!(cents.len(), 10 * dims);
            assert!(
                purity(&data, dims, &cents, &labels, spherical),
                "spherical={spherical}"
            );
        }
    }

    #[test]
    fn deterministic_and_thread_independent() {
        let dims = 16;
        let (data, _) = mixture(6, 8, 100, dims, 3.0);
        for init in [Init::PlusPlus, Init::Random] {
            let p = KMeansParams {
                init,
                k: 12,
                iterations: 10,
                seed: 9,
                threads: 1,
                spherical: false,
            };
            let a = kmeans(&data, dims, &p);
            let b = kmeans(&data, dims, &p);
            let c = kmeans(
                &data,
                dims,
                &KMeansParams {
                    threads: 2,
                    ..p.clone()
                },
            );
            assert_eq!(a.len(), 12 * dims);
            assert_eq!(a, b);
            assert_eq!(a, c);
        }
    }

    #[test]
    fn degenerate_inputs() {
        assert_eq!(
            kmeans(
                &[],
                4,
                &KMeansParams {
                    k: 3,
                    ..Default::default()
                }
            ),
            vec![0.0; 4]
        );
        // fewer points than k; all identical points
        let data = vec![1.0f32; 4 * 5];
        let c = kmeans(
            &data,
            4,
            &KMeansParams {
                init: Init::PlusPlus,
                k: 10,
                ..Default::default()
            },
        );
        assert_eq!(c.len(), 5 * 4);
        assert!(c.iter().all(|&v| v == 1.0));
        // cosine drops zero rows
        let mut s = vec![0f32; 8];
        s.extend_from_slice(&[3.0, 4.0, 0.0, 0.0]);
        let c = train_centroids(Metric::Cosine, &s, 4, 5, 1, 1).unwrap();
        assert_eq!(c, vec![0.6, 0.8, 0.0, 0.0]);
        assert!(train_centroids(Metric::L2, &[1.0; 5], 4, 5, 1, 1).is_err());
        assert!(train_centroids(Metric::L2, &[f32::NAN; 4], 4, 5, 1, 1).is_err());
    }

    /// Timing of the size the Postgres side trains (not run by default).
    #[test]
    #[ignore]
    fn timing_1000_lists_50k_768() {
        let dims = 768;
        let (data, _) = mixture(7, 500, 100, dims, 5.0);
        let t = std::time::Instant::now();
        let c = train_centroids(Metric::L2, &data, dims, 1000, 1, 2).unwrap();
        println!(
            "trained {} centroids on 50k x 768 in {:?}",
            c.len() / dims,
            t.elapsed()
        );
    }
}
