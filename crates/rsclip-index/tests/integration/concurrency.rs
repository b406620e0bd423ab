//! Concurrent inserts and scans over the thread-safe MemoryRelation.

use super::common::*;
use rsclip_index::page::memory::MemoryRelation;
use rsclip_index::rng::Rng;
use rsclip_index::{check, insert, Metric, Scan, Tid};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[test]
fn two_inserters_two_scanners() {
    let dims = 64;
    let metric = Metric::L2;
    let n0 = 2_000;
    let per_thread = 2_000;
    let total = n0 + 2 * per_thread;
    let data = mixture(200, total, dims, 16, 0.5, 1.0, false);
    let rel = MemoryRelation::new();
    build(&rel, metric, dims, &data[..n0 * dims], 8, usize::MAX);
    let done = AtomicUsize::new(0);
    let scans = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let (pairs, inversions) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        for t in 0..2 {
            let (rel, data, done) = (&rel, &data, &done);
            s.spawn(move || {
                let start = n0 + t * per_thread;
                for i in start..start + per_thread {
                    insert(rel, tid_of(i), &data[i * dims..(i + 1) * dims]).unwrap();
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        for t in 0..2u64 {
            let (rel, data, done, scans, failed) = (&rel, &data, &done, &scans, &failed);
            let (pairs, inversions) = (&pairs, &inversions);
            s.spawn(move || {
                let mut rng = Rng::new(300 + t);
                while done.load(Ordering::SeqCst) < 2 {
                    let qi = rng.below(total as u64) as usize;
                    let q = &data[qi * dims..(qi + 1) * dims];
                    let mut scan = Scan::new(rel, q, 2, 0).unwrap();
                    let mut rerank = |tid: Tid| {
                        let i = idx_of(tid);
                        Some(metric.distance(&data[i * dims..(i + 1) * dims], q))
                    };
                    let mut seen = HashSet::new();
                    let mut last = f32::NEG_INFINITY;
                    for _ in 0..10 {
                        match scan.next(rel, &mut rerank).unwrap() {
                            Some((tid, d)) => {
                                if !seen.insert(tid) {
                                    failed.store(true, Ordering::SeqCst);
                                }
                                // A failed RaBitQ bound (rare, data-dependent, also without
                                // concurrency) brings a row a little late: counted, bounded below.
                                if last.is_finite() {
                                    pairs.fetch_add(1, Ordering::Relaxed);
                                    if d < last - 1e-3 {
                                        inversions.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                last = d;
                            }
                            None => break,
                        }
                    }
                    scans.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    assert!(
        !failed.load(Ordering::SeqCst),
        "a scan returned a row twice"
    );
    let (pairs, inversions) = (pairs.into_inner(), inversions.into_inner());
    assert!(
        inversions * 100 <= pairs,
        "{inversions} of {pairs} consecutive pairs out of order"
    );
    let report = check(&rel).unwrap();
    assert_eq!(report.duplicate_tids, 0);
    assert_eq!(report.tids, (0..total).map(tid_of).collect::<Vec<_>>());
    assert_eq!(report.orphan_pages, 0);
    println!(
        "{} concurrent scans completed",
        scans.load(Ordering::Relaxed)
    );
}
