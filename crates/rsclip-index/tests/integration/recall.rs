//! Recall against brute force on clustered and uniform data.

use super::common::*;
use rsclip_index::page::memory::MemoryRelation;
use rsclip_index::{check, default_probes, Metric};

struct Case {
    metric: Metric,
    n: usize,
    dims: usize,
    clusters: usize,
    lists: Option<u32>,
    seed: u64,
}

fn run(c: Case) {
    let normalize = c.metric != Metric::L2;
    let mean = if normalize { 0.0 } else { 1.0 };
    let spread = 0.5;
    let data = mixture(c.seed, c.n, c.dims, c.clusters, spread, mean, normalize);
    let queries = mixture(c.seed + 1, 100, c.dims, c.clusters, spread, mean, normalize);
    let rel = MemoryRelation::new();
    let stats = match c.lists {
        Some(l) => build(&rel, c.metric, c.dims, &data, l, usize::MAX),
        None => build_default(&rel, c.metric, c.dims, &data),
    };
    assert_eq!(stats.tuples as usize, c.n);
    let probes = default_probes(stats.lists);
    let alive = vec![true; c.n];
    let r = recall(&rel, c.metric, &data, c.dims, &alive, &queries, 10, probes);
    println!(
        "{:?} n={} dims={} lists={} probes={}: recall@10 {:.4}, re-ranked/query {:.1}, inversions {}",
        c.metric, c.n, c.dims, stats.lists, probes, r.recall, r.mean_reranked, r.inversions
    );
    assert!(r.recall >= 0.95, "recall {} too low", r.recall);
    // an inversion needs a failed RaBitQ bound (≈0.2% of candidates): allow ≤ 1% of pairs
    assert!(
        r.inversions <= 9,
        "{} order inversions in the first 10 rows of 100 queries",
        r.inversions
    );
    let report = check(&rel).unwrap();
    assert_eq!(report.tids.len(), c.n);
    assert_eq!(report.duplicate_tids, 0);
    assert_eq!(report.orphan_pages, 0);
}

#[test]
fn clustered_20k_128_inner_product() {
    run(Case {
        metric: Metric::InnerProduct,
        n: 20_000,
        dims: 128,
        clusters: 64,
        lists: None,
        seed: 1,
    });
}

#[test]
fn clustered_20k_128_cosine() {
    run(Case {
        metric: Metric::Cosine,
        n: 20_000,
        dims: 128,
        clusters: 64,
        lists: None,
        seed: 2,
    });
}

#[test]
fn clustered_20k_128_l2() {
    run(Case {
        metric: Metric::L2,
        n: 20_000,
        dims: 128,
        clusters: 64,
        lists: None,
        seed: 3,
    });
}

#[test]
fn clustered_20k_128_l2_100_lists() {
    run(Case {
        metric: Metric::L2,
        n: 20_000,
        dims: 128,
        clusters: 64,
        lists: Some(100),
        seed: 4,
    });
}

#[test]
fn clustered_5k_768_all_metrics() {
    for (i, metric) in [Metric::InnerProduct, Metric::Cosine, Metric::L2]
        .into_iter()
        .enumerate()
    {
        run(Case {
            metric,
            n: 5_000,
            dims: 768,
            clusters: 50,
            lists: None,
            seed: 10 + i as u64,
        });
    }
}

#[test]
fn clustered_5k_1024_all_metrics() {
    for (i, metric) in [Metric::InnerProduct, Metric::Cosine, Metric::L2]
        .into_iter()
        .enumerate()
    {
        run(Case {
            metric,
            n: 5_000,
            dims: 1024,
            clusters: 50,
            lists: None,
            seed: 20 + i as u64,
        });
    }
}

#[test]
fn clustered_5k_768_cosine_50_lists() {
    run(Case {
        metric: Metric::Cosine,
        n: 5_000,
        dims: 768,
        clusters: 50,
        lists: Some(50),
        seed: 30,
    });
}

/// Prints recall at several probe counts for uniform random 768-d data (not asserted).
#[test]
fn uniform_768_recall_table() {
    let dims = 768;
    let n = 20_000;
    let lists = 64;
    for metric in [Metric::L2, Metric::Cosine] {
        let data = gaussian(100, n, dims);
        let queries = gaussian(101, 50, dims);
        let rel = MemoryRelation::new();
        build(&rel, metric, dims, &data, lists, usize::MAX);
        let alive = vec![true; n];
        for probes in [1u32, 2, 4, 8, 16, 32] {
            let r = recall(&rel, metric, &data, dims, &alive, &queries, 10, probes);
            println!(
                "uniform {metric:?} n={n} dims={dims} lists={lists} probes={probes}{}: recall@10 {:.4}, re-ranked/query {:.1}",
                if probes == default_probes(lists) { " (default)" } else { "" },
                r.recall,
                r.mean_reranked
            );
        }
    }
}

/// Size of the index per vector at 768 dimensions.
#[test]
fn bytes_per_vector_768() {
    let dims = 768;
    let n = 5_000;
    let data = mixture(40, n, dims, 50, 0.5, 0.0, true);
    let rel = MemoryRelation::new();
    build_default(&rel, Metric::Cosine, dims, &data);
    let report = check(&rel).unwrap();
    let list_bytes = report.list_pages as f64 * 8192.0 / n as f64;
    let total_bytes = rel_bytes(&rel) / n as f64;
    println!(
        "768-d: {} list pages for {n} vectors: {list_bytes:.1} bytes/vector in list pages, {total_bytes:.1} bytes/vector in total ({} centroid pages)",
        report.list_pages, report.centroid_pages
    );
    // 116 bytes of 1-bit code and factors + 776 of 8-bit refinement code, 9 tuples per page.
    assert!(list_bytes < 960.0);
}

fn rel_bytes(rel: &MemoryRelation) -> f64 {
    use rsclip_index::page::Relation;
    rel.nblocks() as f64 * 8192.0
}

/// Reads a little-endian float16 `.npy` matrix (the committed real-embedding sample).
fn read_npy_f16(path: &std::path::Path) -> (Vec<f32>, usize) {
    let b = std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (made by bench/real_embeddings.py sample)",
            path.display()
        )
    });
    assert_eq!(&b[..6], b"\x93NUMPY", "{} is not .npy", path.display());
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(header.contains("'<f2'"), "float16 expected: {header}");
    let cols: usize = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(',').nth(1))
        .and_then(|s| s.trim().trim_end_matches(')').parse().ok())
        .expect("a 2-d shape");
    let data: Vec<f32> = b[10 + hlen..]
        .chunks_exact(2)
        .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    assert!(!data.is_empty() && data.len().is_multiple_of(cols));
    (data, cols)
}

/// IEEE binary16 to f32 (normal, subnormal, zero, infinity, NaN).
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f32;
    sign * match exp {
        0 => frac * (-24f32).exp2(),
        31 if frac == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + frac / 1024.0) * ((e - 15) as f32).exp2(),
    }
}

#[test]
fn f16_decoding() {
    assert_eq!(f16_to_f32(0x3c00), 1.0);
    assert_eq!(f16_to_f32(0xc000), -2.0);
    assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
    assert_eq!(f16_to_f32(0x0001), (-24f32).exp2());
    assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    assert!(f16_to_f32(0x7e00).is_nan());
}

/// Real sentence embeddings (all-MiniLM-L6-v2 on Debian documentation, 4000 rows and 100
/// held-out queries committed under tests/fixtures/real-minilm): the default lists and probes
/// must reach recall@10 0.95, on data that is not a Gaussian mixture.
#[test]
fn real_minilm_4000_defaults() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/real-minilm");
    let (data, dims) = read_npy_f16(&dir.join("base.npy"));
    let (queries, qdims) = read_npy_f16(&dir.join("queries.npy"));
    assert_eq!(
        (dims, qdims, data.len() / dims, queries.len() / dims),
        (384, 384, 4000, 100)
    );
    for metric in [Metric::InnerProduct, Metric::Cosine, Metric::L2] {
        let rel = MemoryRelation::new();
        let stats = build_default(&rel, metric, dims, &data);
        let probes = default_probes(stats.lists);
        let alive = vec![true; data.len() / dims];
        let r = recall(&rel, metric, &data, dims, &alive, &queries, 10, probes);
        println!(
            "real MiniLM {metric:?}: lists={} probes={probes}: recall@10 {:.4}, re-ranked/query {:.1}",
            stats.lists, r.recall, r.mean_reranked
        );
        assert!(
            r.recall >= 0.95,
            "{metric:?}: recall {} with the defaults",
            r.recall
        );
        // The bounds must be tight enough that a LIMIT 10 re-ranks few heap rows.
        assert!(
            r.mean_reranked < 40.0,
            "{metric:?}: {} re-ranks per query",
            r.mean_reranked
        );
    }
}
