//! The NULL chain: rows whose indexed value is NULL, kept for the `NULLS FIRST` ordering.

use super::common::*;
use rsclip_index::page::memory::MemoryRelation;
use rsclip_index::{
    bulk_delete, check, insert, insert_null, null_tids, BuildParams, IndexBuilder, Metric, Tid,
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

fn build_with_nulls(rel: &MemoryRelation, rows: usize, nulls: usize) -> Vec<f32> {
    let dims = 32;
    let data = mixture(500, rows, dims, 4, 0.5, 1.0, false);
    let cents = rsclip_index::train_centroids(Metric::L2, &data, dims, 4, 1, 1).unwrap();
    let params = BuildParams {
        dims: dims as u32,
        metric: Metric::L2,
        seed: 3,
        memory_limit_bytes: usize::MAX,
    };
    let mut b = IndexBuilder::new(rel, &params, &cents).unwrap();
    for (i, row) in data.chunks_exact(dims).enumerate() {
        b.add(tid_of(i), row).unwrap();
        if i < nulls {
            b.add_null(tid_of(100_000 + i)).unwrap();
        }
    }
    for i in rows..nulls {
        b.add_null(tid_of(100_000 + i)).unwrap();
    }
    let stats = b.finish().unwrap();
    assert_eq!(stats.nulls, nulls as u64);
    data
}

#[test]
fn nulls_are_kept_found_checked_and_vacuumed() {
    let rel = MemoryRelation::new();
    let data = build_with_nulls(&rel, 500, 1_500);
    for i in 1_500..2_500 {
        insert_null(&rel, tid_of(100_000 + i)).unwrap();
    }
    insert(&rel, tid_of(600), &data[..32]).unwrap();
    let want: HashSet<Tid> = (0..2_500).map(|i| tid_of(100_000 + i)).collect();
    let got = null_tids(&rel).unwrap();
    assert_eq!(got.len(), 2_500, "every NULL row once");
    assert_eq!(got.iter().copied().collect::<HashSet<_>>(), want);
    let rep = check(&rel).unwrap();
    assert_eq!(rep.null_tuples, 2_500);
    assert!(
        rep.null_pages >= 4,
        "{} pages for 2500 tids",
        rep.null_pages
    );
    assert_eq!(rep.tids.len(), 501 + 2_500);
    assert_eq!(rep.duplicate_tids, 0);
    // VACUUM removes the dead NULL rows too.
    let ds = bulk_delete(&rel, &mut |t| {
        idx_of(t) >= 100_000 && idx_of(t).is_multiple_of(3)
    })
    .unwrap();
    let dead = (0..2_500)
        .filter(|i: &usize| (100_000 + i).is_multiple_of(3))
        .count();
    assert_eq!(ds.tuples_removed as usize, dead);
    assert_eq!(null_tids(&rel).unwrap().len(), 2_500 - dead);
    assert_eq!(check(&rel).unwrap().null_tuples as usize, 2_500 - dead);
    // Inserts reuse the head page; the chain does not grow while it has room.
    let pages = check(&rel).unwrap().null_pages;
    for i in 0..100 {
        insert_null(&rel, tid_of(200_000 + i)).unwrap();
    }
    assert!(check(&rel).unwrap().null_pages <= pages + 1);
}

/// Each prefix of the page writes of NULL inserts (a crash between two WAL records) holds
/// every NULL row that was complete once, none twice.
#[test]
fn crash_while_the_null_head_moves() {
    let rel = MemoryRelation::new();
    build_with_nulls(&rel, 200, 0);
    let base = rel.deep_clone();
    rel.start_journal();
    for i in 0..2_000 {
        insert_null(&rel, tid_of(100_000 + i)).unwrap();
    }
    let journal = rel.take_journal();
    assert!(journal.len() > 2_000, "the head moved at least once");
    let mut last = 0;
    for cut in 0..=journal.len() {
        let image = base.deep_clone();
        for (blk, page) in &journal[..cut] {
            image.set_page(*blk, page.clone());
        }
        let rep = check(&image).unwrap_or_else(|e| panic!("after {cut} records: {e}"));
        assert_eq!(rep.duplicate_tids, 0, "after {cut} records");
        assert!(
            rep.null_tuples >= last,
            "after {cut} records a NULL row was lost"
        );
        last = rep.null_tuples;
    }
    assert_eq!(last, 2_000);
}

/// Readers beside inserters that move the head: no tid twice, never fewer than a read before.
#[test]
fn concurrent_null_inserts_and_reads() {
    let rel = MemoryRelation::new();
    build_with_nulls(&rel, 200, 0);
    let done = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..2 {
            let (rel, done) = (&rel, &done);
            s.spawn(move || {
                for i in 0..4_000 {
                    insert_null(rel, tid_of(100_000 + 2 * i + t)).unwrap();
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        let (rel, done) = (&rel, &done);
        s.spawn(move || {
            let mut seen = 0;
            while done.load(Ordering::SeqCst) < 2 {
                let tids = null_tids(rel).unwrap();
                let set: HashSet<Tid> = tids.iter().copied().collect();
                assert_eq!(set.len(), tids.len(), "a NULL row read twice");
                assert!(tids.len() >= seen, "{} rows after {seen}", tids.len());
                seen = tids.len();
            }
        });
    });
    assert_eq!(null_tids(&rel).unwrap().len(), 8_000);
    assert_eq!(check(&rel).unwrap().duplicate_tids, 0);
}
