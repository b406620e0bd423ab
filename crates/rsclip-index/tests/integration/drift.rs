//! Inserts from a distribution the build never saw: lists stay bounded (inserts add lists),
//! recall holds, crashes and concurrency leave a valid index.

use super::common::*;
use rsclip_index::page::memory::MemoryRelation;
use rsclip_index::{check, default_probes, insert, BuildParams, IndexBuilder, Metric, Scan, Tid};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Probe {
    recall: f64,
    pages: f64,
}

fn probe(
    rel: &MemoryRelation,
    metric: Metric,
    data: &[f32],
    dims: usize,
    queries: &[f32],
) -> Probe {
    let lists = check(rel).unwrap().nlists;
    let probes = default_probes(lists);
    let alive = vec![true; data.len() / dims];
    let r = recall(rel, metric, data, dims, &alive, queries, 10, probes);
    let mut pages = 0u64;
    for q in queries.chunks_exact(dims) {
        let out = search(rel, metric, data, dims, &|_| true, q, 10, probes, probes);
        pages += out.stats.pages_read;
    }
    Probe {
        recall: r.recall,
        pages: pages as f64 / (queries.len() / dims) as f64,
    }
}

/// A build on one mixture, then as many rows again from another one (other centres, shifted
/// mean). Without new lists they all went to the few old lists nearest to them (the check
/// showed a 107-page chain in such a case); with them no chain passes the bound, and recall at
/// the default probes stays at a fresh build's.
#[test]
fn shifted_inserts_add_lists_and_keep_recall() {
    let dims = 64;
    let (n, m) = (16_000, 5_000);
    for metric in [Metric::Cosine, Metric::L2] {
        let normalize = metric == Metric::Cosine;
        let old = mixture(400, n, dims, 50, 0.5, 0.0, normalize);
        let new = mixture(401, m, dims, 37, 0.5, 1.5, normalize);
        let rel = MemoryRelation::new();
        let stats = build_default(&rel, metric, dims, &old);
        let before = check(&rel).unwrap();
        for (i, row) in new.chunks_exact(dims).enumerate() {
            insert(&rel, tid_of(n + i), row).unwrap();
        }
        let after = check(&rel).unwrap();
        assert_eq!(after.tids.len(), n + m);
        assert_eq!(after.duplicate_tids, 0);
        assert_eq!((after.missing_refine, after.unreferenced_refine), (0, 0));
        assert_eq!(after.built_lists, stats.lists);
        assert!(
            after.nlists > before.nlists,
            "{metric:?}: no list was added"
        );
        assert!(
            after.longest_chain <= after.list_page_limit,
            "{metric:?}: a chain of {} pages passed the bound of {}",
            after.longest_chain,
            after.list_page_limit
        );
        let largest = *after.list_sizes.iter().max().unwrap() as f64;
        let mean = (n + m) as f64 / after.nlists as f64;
        println!(
            "{metric:?}: lists {} -> {}, longest chain {} -> {} (bound {}), imbalance {:.2}",
            before.nlists,
            after.nlists,
            before.longest_chain,
            after.longest_chain,
            after.list_page_limit,
            largest / mean
        );

        let all: Vec<f32> = old.iter().chain(&new).copied().collect();
        let q_new = mixture(402, 100, dims, 37, 0.5, 1.5, normalize);
        let q_old = mixture(403, 100, dims, 50, 0.5, 0.0, normalize);
        let fresh = MemoryRelation::new();
        build_default(&fresh, metric, dims, &all);
        for (name, q) in [("new", &q_new), ("old", &q_old)] {
            let grown = probe(&rel, metric, &all, dims, q);
            let rebuilt = probe(&fresh, metric, &all, dims, q);
            println!(
                "  {name} queries: recall@10 {:.3} ({:.1} code pages per query); after a rebuild {:.3} ({:.1})",
                grown.recall, grown.pages, rebuilt.recall, rebuilt.pages
            );
            assert!(
                grown.recall >= 0.95,
                "{metric:?} {name}: recall {}",
                grown.recall
            );
            assert!(
                grown.recall >= rebuilt.recall - 0.03,
                "{metric:?} {name}: {} vs {} after a rebuild",
                grown.recall,
                rebuilt.recall
            );
            assert!(
                grown.pages <= 2.0 * rebuilt.pages + 4.0,
                "{metric:?} {name}: {} pages per query vs {} after a rebuild",
                grown.pages,
                rebuilt.pages
            );
        }
    }
}

/// Rows equal to a full list's centroid cannot be separated by more lists: they extend the
/// chain instead of adding one list per page.
#[test]
fn duplicates_of_a_centroid_extend_the_chain() {
    let dims = 32;
    let rel = MemoryRelation::new();
    let params = BuildParams {
        dims: dims as u32,
        metric: Metric::L2,
        seed: 5,
        memory_limit_bytes: usize::MAX,
    };
    IndexBuilder::new(&rel, &params, &[])
        .unwrap()
        .finish()
        .unwrap();
    let row: Vec<f32> = (0..dims).map(|i| i as f32 * 0.25 - 3.0).collect();
    for i in 0..6_000 {
        insert(&rel, tid_of(i), &row).unwrap();
    }
    let rep = check(&rel).unwrap();
    assert_eq!(rep.tids.len(), 6_000);
    // The first copy that found the empty build's list full started a list at the row; every
    // later copy is at distance 0 from it.
    assert!(rep.nlists <= 2, "{} lists for one repeated row", rep.nlists);
}

/// Every prefix of the page writes of inserts that add lists (a crash between any two WAL
/// records) is a valid index, and inserting on from it works: a later addition removes what an
/// interrupted one left in the centroid chain.
#[test]
fn crash_during_list_additions_leaves_a_valid_index() {
    let dims = 64;
    let metric = Metric::L2;
    // The build's rows, then rows of other clusters far from them (each starts a list).
    let mut data = mixture(410, 800, dims, 4, 0.5, 0.0, false);
    data.extend(mixture(411, 2_200, dims, 40, 0.5, 3.0, false));
    let rel = MemoryRelation::new();
    build(&rel, metric, dims, &data[..800 * dims], 2, usize::MAX);
    let base = rel.deep_clone();
    let lists_before = check(&rel).unwrap().nlists;
    rel.start_journal();
    for i in 800..2_000 {
        insert(&rel, tid_of(i), &data[i * dims..(i + 1) * dims]).unwrap();
    }
    let journal = rel.take_journal();
    let lists_after = check(&rel).unwrap().nlists;
    assert!(
        lists_after >= lists_before + 8,
        "{lists_before} -> {lists_after}"
    );
    let mut resumed = 0;
    for cut in 0..=journal.len() {
        let image = base.deep_clone();
        for (blk, page) in &journal[..cut] {
            image.set_page(*blk, page.clone());
        }
        let rep = check(&image).unwrap_or_else(|e| panic!("crash image after {cut} records: {e}"));
        assert!(rep.tids.len() >= 800 && rep.duplicate_tids == 0);
        // A crash inside an addition: the journal's next record is not the meta page's yet.
        let inside = cut < journal.len() && journal[cut..].iter().take(4).any(|(b, _)| *b == 0);
        if inside {
            resumed += 1;
            for i in 2_000..3_000 {
                insert(&image, tid_of(i), &data[i * dims..(i + 1) * dims]).unwrap();
            }
            let rep = check(&image).unwrap_or_else(|e| panic!("resumed after {cut} records: {e}"));
            let tids: HashSet<Tid> = rep.tids.iter().copied().collect();
            assert!((2_000..3_000).all(|i| tids.contains(&tid_of(i))));
            assert!(rep.nlists > lists_before, "after {cut}: no list was added");
            assert!(rep.longest_chain <= rep.list_page_limit);
        }
    }
    assert!(
        resumed >= 4,
        "only {resumed} crash images fell inside a list addition"
    );
}

/// Two inserters that keep adding lists, two scanners: every scan is a valid ordered answer,
/// and the final index holds every row once.
#[test]
fn concurrent_list_additions() {
    let dims = 64;
    let metric = Metric::L2;
    let per_thread = 3_000;
    let total = 2 * per_thread;
    let data = mixture(420, total, dims, 12, 0.5, 1.0, false);
    let rel = MemoryRelation::new();
    let params = BuildParams {
        dims: dims as u32,
        metric,
        seed: 11,
        memory_limit_bytes: usize::MAX,
    };
    IndexBuilder::new(&rel, &params, &[])
        .unwrap()
        .finish()
        .unwrap();
    let done = AtomicUsize::new(0);
    let inserted = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let scans = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..2 {
            let (rel, data, done, inserted) = (&rel, &data, &done, &inserted);
            s.spawn(move || {
                for i in (t..total).step_by(2) {
                    insert(rel, tid_of(i), &data[i * dims..(i + 1) * dims]).unwrap();
                    inserted.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        for t in 0..2usize {
            let (rel, data, done, failed, scans) = (&rel, &data, &done, &failed, &scans);
            s.spawn(move || {
                let mut qi = t;
                while done.load(Ordering::SeqCst) < 2 {
                    qi = (qi * 7 + 13) % total;
                    let q = &data[qi * dims..(qi + 1) * dims];
                    let mut scan = Scan::new(rel, q, 4, 0).unwrap();
                    let mut rerank = |tid: Tid| {
                        let i = idx_of(tid);
                        Some(metric.distance(&data[i * dims..(i + 1) * dims], q))
                    };
                    let mut seen = HashSet::new();
                    for _ in 0..10 {
                        match scan.next(rel, &mut rerank).unwrap() {
                            Some((tid, _)) if !seen.insert(tid) => {
                                failed.store(true, Ordering::SeqCst)
                            }
                            Some(_) => {}
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
    let rep = check(&rel).unwrap();
    assert_eq!(rep.tids.len(), total);
    assert_eq!(rep.duplicate_tids, 0);
    assert!(rep.nlists > 4, "{} lists", rep.nlists);
    assert!(rep.longest_chain <= rep.list_page_limit + 1, "{rep:?}");
    println!(
        "{} scans beside the inserts; {} lists added",
        scans.load(Ordering::Relaxed),
        rep.nlists - rep.built_lists
    );
}
