//! Shared helpers: data generation, build, search, brute force, recall.

use rsclip_index::page::memory::MemoryRelation;
use rsclip_index::rng::Rng;
use rsclip_index::{
    default_lists, sample_size, train_centroids, BuildParams, BuildStats, IndexBuilder, Metric,
    Scan, Tid,
};

pub const TIDS_PER_BLOCK: usize = 50;

pub fn tid_of(i: usize) -> Tid {
    Tid {
        block: (i / TIDS_PER_BLOCK) as u32,
        offset: (i % TIDS_PER_BLOCK + 1) as u16,
    }
}

pub fn idx_of(t: Tid) -> usize {
    t.block as usize * TIDS_PER_BLOCK + t.offset as usize - 1
}

/// A Gaussian mixture: `clusters` centers ~ N(mean, 1), points = center + spread · N(0, 1);
/// rows normalized when `normalize`. Rows `i` and `j` share a center iff `i % clusters == j % clusters`.
pub fn mixture(
    seed: u64,
    n: usize,
    dims: usize,
    clusters: usize,
    spread: f64,
    mean: f64,
    normalize: bool,
) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut crng = Rng::new(1000 + clusters as u64 + dims as u64);
    let centers: Vec<f64> = (0..clusters * dims)
        .map(|_| mean + crng.gaussian())
        .collect();
    let mut out = Vec::with_capacity(n * dims);
    for _ in 0..n {
        let c = rng.below(clusters as u64) as usize;
        let start = out.len();
        for j in 0..dims {
            out.push((centers[c * dims + j] + spread * rng.gaussian()) as f32);
        }
        if normalize {
            let row = &mut out[start..];
            let norm = row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            row.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
        }
    }
    out
}

/// Uniform-ish random data: i.i.d. N(0, 1) coordinates.
pub fn gaussian(seed: u64, n: usize, dims: usize) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n * dims).map(|_| rng.gaussian() as f32).collect()
}

pub fn build(
    rel: &MemoryRelation,
    metric: Metric,
    dims: usize,
    data: &[f32],
    lists: u32,
    memory_limit: usize,
) -> BuildStats {
    let n = data.len() / dims;
    let sample = &data[..sample_size(lists).min(n) * dims];
    let cents = train_centroids(metric, sample, dims, lists, 42, 2).unwrap();
    let params = BuildParams {
        dims: dims as u32,
        metric,
        seed: 7,
        memory_limit_bytes: memory_limit,
    };
    let mut b = IndexBuilder::new(rel, &params, &cents).unwrap();
    for (i, row) in data.chunks_exact(dims).enumerate() {
        b.add(tid_of(i), row).unwrap();
    }
    b.finish().unwrap()
}

pub fn build_default(
    rel: &MemoryRelation,
    metric: Metric,
    dims: usize,
    data: &[f32],
) -> BuildStats {
    build(
        rel,
        metric,
        dims,
        data,
        default_lists((data.len() / dims) as u64),
        usize::MAX,
    )
}

/// Exact top-k (index, distance) among rows with `alive[i]`.
pub fn brute_force(
    metric: Metric,
    data: &[f32],
    dims: usize,
    alive: &[bool],
    q: &[f32],
    k: usize,
) -> Vec<(usize, f32)> {
    let mut all: Vec<(usize, f32)> = data
        .chunks_exact(dims)
        .enumerate()
        .filter(|(i, _)| alive[*i])
        .map(|(i, row)| (i, metric.distance(row, q)))
        .filter(|(_, d)| !d.is_nan())
        .collect();
    all.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

pub struct SearchOut {
    pub rows: Vec<(Tid, f32)>,
    pub reranked: u64,
    pub stats: rsclip_index::ScanStats,
}

/// First `k` rows of a scan whose re-rank callback accepts rows with `accept[i]`.
#[allow(clippy::too_many_arguments)]
pub fn search(
    rel: &MemoryRelation,
    metric: Metric,
    data: &[f32],
    dims: usize,
    accept: &dyn Fn(usize) -> bool,
    q: &[f32],
    k: usize,
    probes: u32,
    max_probes: u32,
) -> SearchOut {
    let mut scan = Scan::new(rel, q, probes, max_probes).unwrap();
    let mut rerank = |t: Tid| {
        let i = idx_of(t);
        if i * dims >= data.len() || !accept(i) {
            return None;
        }
        Some(metric.distance(&data[i * dims..(i + 1) * dims], q))
    };
    let mut rows = Vec::new();
    while rows.len() < k {
        match scan.next(rel, &mut rerank).unwrap() {
            Some(r) => rows.push(r),
            None => break,
        }
    }
    SearchOut {
        rows,
        reranked: scan.stats().reranked,
        stats: scan.stats(),
    }
}

/// Distance-based recall@k (robust to ties): returned rows whose distance is within the k-th
/// true distance count as hits.
pub fn recall_one(truth: &[(usize, f32)], got: &[(Tid, f32)], k: usize) -> f64 {
    if truth.is_empty() {
        return 1.0;
    }
    let kth = truth[truth.len().min(k) - 1].1;
    let tol = 1e-4 * (kth.abs() + 1.0);
    let hits = got.iter().take(k).filter(|(_, d)| *d <= kth + tol).count();
    hits.min(truth.len().min(k)) as f64 / truth.len().min(k) as f64
}

pub struct RecallOut {
    pub recall: f64,
    pub mean_reranked: f64,
    pub inversions: usize,
}

/// Mean recall@k over queries; also counts order inversions among the first k results.
#[allow(clippy::too_many_arguments)]
pub fn recall(
    rel: &MemoryRelation,
    metric: Metric,
    data: &[f32],
    dims: usize,
    alive: &[bool],
    queries: &[f32],
    k: usize,
    probes: u32,
) -> RecallOut {
    let (mut total, mut reranked, mut inversions) = (0.0, 0u64, 0usize);
    let nq = queries.len() / dims;
    for q in queries.chunks_exact(dims) {
        let truth = brute_force(metric, data, dims, alive, q, k);
        let out = search(rel, metric, data, dims, &|i| alive[i], q, k, probes, probes);
        let mut tids: Vec<Tid> = out.rows.iter().map(|r| r.0).collect();
        tids.sort();
        tids.dedup();
        assert_eq!(tids.len(), out.rows.len(), "duplicate tid returned");
        inversions += out.rows.windows(2).filter(|w| w[1].1 < w[0].1).count();
        total += recall_one(&truth, &out.rows, k);
        reranked += out.reranked;
    }
    RecallOut {
        recall: total / nq as f64,
        mean_reranked: reranked as f64 / nq as f64,
        inversions,
    }
}
