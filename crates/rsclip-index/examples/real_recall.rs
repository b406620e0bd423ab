//! Offline profiling harness: builds an in-memory index over the real-embedding set that
//! `bench/real_embeddings.py` writes (chunk-NNNN.npy files of float32 rows; the first 1000
//! rows are held-out queries), then sweeps probes and prints recall@10, the time per query and
//! the scan's counters. No Postgres involved, so a profiler sees only the index code.
//!
//!     cargo run --release -p rsclip-index --example real_recall -- \
//!         local/real-embeddings 100000 300 lists=1000 probes=16,32,64
//!
//! `insert=F` builds over the first (1 − F) of the rows and inserts the rest one by one (the
//! same distribution); `shift=F` instead inserts the fraction F of rows farthest along a fixed
//! random direction, a topic the build never saw (drift). Both print the lists inserts added
//! and the longest chain; probes=0 means the default for the final list count.
use rsclip_index::page::memory::MemoryRelation;
use rsclip_index::page::Relation;
use rsclip_index::*;
use std::time::Instant;

fn read_npy(path: &std::path::Path) -> (Vec<f32>, usize) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &b[..6],
        b"\x93NUMPY",
        "{} is not a .npy file",
        path.display()
    );
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(header.contains("'<f4'"), "float32 expected: {header}");
    let shape = header.split("'shape': (").nth(1).unwrap();
    let cols: usize = shape
        .split(',')
        .nth(1)
        .unwrap()
        .trim()
        .trim_end_matches(')')
        .parse()
        .unwrap();
    let data = b[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (data, cols)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let rows: usize = args[2].parse().unwrap();
    let nq: usize = args[3].parse().unwrap();
    let mut lists = 0u32;
    let mut probes_list = vec![8u32, 16, 32, 64];
    let mut threads = 2usize;
    // repeat=N runs each sweep point N times over the queries, so that a profile is the scan's
    let mut repeat = 1usize;
    // (shifted, fraction) of the rows inserted after the build
    let mut late = (false, 0f64);
    for a in &args[4..] {
        if let Some(v) = a.strip_prefix("lists=") {
            lists = v.parse().unwrap();
        } else if let Some(v) = a.strip_prefix("probes=") {
            probes_list = v.split(',').map(|p| p.parse().unwrap()).collect();
        } else if let Some(v) = a.strip_prefix("threads=") {
            threads = v.parse().unwrap();
        } else if let Some(v) = a.strip_prefix("repeat=") {
            repeat = v.parse().unwrap();
        } else if let Some(v) = a.strip_prefix("insert=") {
            late = (false, v.parse().unwrap());
        } else if let Some(v) = a.strip_prefix("shift=") {
            late = (true, v.parse().unwrap());
        }
    }
    let mut all = Vec::new();
    let mut dims = 0;
    let mut i = 0;
    while all.len() < (1000 + rows) * dims.max(1) {
        let (d, c) = read_npy(&dir.join(format!("chunk-{i:04}.npy")));
        dims = c;
        all.extend_from_slice(&d);
        i += 1;
    }
    let queries: Vec<f32> = all[..nq * dims].to_vec();
    let base: Vec<f32> = all[1000 * dims..(1000 + rows) * dims].to_vec();
    drop(all);
    let metric = Metric::InnerProduct;
    // Exact top 10, cached beside the chunks (it costs seconds, and a profile of the scan
    // should not see it).
    let t = Instant::now();
    let cache = dir.join(format!("truth-{rows}-{nq}.bin"));
    let truth: Vec<Vec<usize>> = match std::fs::read(&cache) {
        Ok(b) if b.len() == nq * 10 * 4 => b
            .chunks_exact(40)
            .map(|q| {
                q.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
                    .collect()
            })
            .collect(),
        _ => {
            let truth: Vec<Vec<usize>> = queries
                .chunks_exact(dims)
                .map(|q| {
                    let mut s: Vec<(f32, usize)> = base
                        .chunks_exact(dims)
                        .enumerate()
                        .map(|(i, x)| (metric.distance(x, q), i))
                        .collect();
                    s.select_nth_unstable_by(10, |a, b| a.0.total_cmp(&b.0));
                    s[..10].iter().map(|p| p.1).collect()
                })
                .collect();
            let bytes: Vec<u8> = truth
                .iter()
                .flatten()
                .flat_map(|&i| (i as u32).to_le_bytes())
                .collect();
            let _ = std::fs::write(&cache, bytes);
            truth
        }
    };
    eprintln!("ground truth in {:.1?}", t.elapsed());
    // Row order: the build's rows, then the inserted ones.
    let mut order: Vec<usize> = (0..rows).collect();
    if late.0 {
        let mut rng = rsclip_index::rng::Rng::new(99);
        let u: Vec<f32> = (0..dims).map(|_| rng.gaussian() as f32).collect();
        let along: Vec<f32> = base
            .chunks_exact(dims)
            .map(|x| x.iter().zip(&u).map(|(a, b)| a * b).sum())
            .collect();
        order.sort_by(|&a, &b| along[a].total_cmp(&along[b]));
    }
    let n_late = (rows as f64 * late.1) as usize;
    let n_build = rows - n_late;
    let lists = if lists == 0 {
        default_lists(n_build as u64)
    } else {
        lists
    };
    let t = Instant::now();
    let ssize = sample_size(lists).min(n_build);
    let step = n_build / ssize;
    let sample: Vec<f32> = (0..ssize)
        .flat_map(|i| {
            let r = order[i * step];
            base[r * dims..(r + 1) * dims].iter().copied()
        })
        .collect();
    let cents = train_centroids(metric, &sample, dims, lists, 42, threads).unwrap();
    let train = t.elapsed();
    let rel = MemoryRelation::new();
    let params = BuildParams {
        dims: dims as u32,
        metric,
        seed: 7,
        memory_limit_bytes: 1 << 30,
    };
    let mut b = IndexBuilder::new(&rel, &params, &cents).unwrap();
    let tids: Vec<Tid> = (0..rows)
        .map(|i| Tid {
            block: (i / 100) as u32,
            offset: (i % 100) as u16 + 1,
        })
        .collect();
    for ids in order[..n_build].chunks(2048) {
        let ct: Vec<Tid> = ids.iter().map(|&i| tids[i]).collect();
        let cv: Vec<f32> = ids
            .iter()
            .flat_map(|&i| base[i * dims..(i + 1) * dims].iter().copied())
            .collect();
        b.add_batch(&ct, &cv, threads).unwrap();
    }
    b.finish().unwrap();
    eprintln!(
        "lists {lists}: trained in {train:.1?}, built in {:.1?}, {} pages",
        t.elapsed(),
        rel.nblocks()
    );
    if n_late > 0 {
        let t = Instant::now();
        for &i in &order[n_build..] {
            insert(&rel, tids[i], &base[i * dims..(i + 1) * dims]).unwrap();
        }
        let rep = check(&rel).unwrap();
        let largest = *rep.list_sizes.iter().max().unwrap() as f64;
        eprintln!(
            "inserted {n_late} rows ({}) in {:.1?}: lists {} -> {}, longest chain {} pages \
             (bound {}), largest list {:.1}x the mean",
            if late.0 {
                "shifted"
            } else {
                "same distribution"
            },
            t.elapsed(),
            rep.built_lists,
            rep.nlists,
            rep.longest_chain,
            rep.list_page_limit,
            largest * rep.nlists as f64 / rows as f64
        );
    }
    let lists = rsclip_index::read_meta(&rel).unwrap().nlists;
    for p in probes_list.iter_mut() {
        if *p == 0 {
            *p = default_probes(lists);
        }
    }
    let cent = std::sync::Arc::new(Centroids::read(&rel).unwrap());
    for &probes in &probes_list {
        let (mut hits, mut st) = (0usize, ScanStats::default());
        let mut start_time = 0f64;
        let t = Instant::now();
        // The fastest pass over the queries: on a shared machine the mean drifts with the
        // neighbours' load, the best pass much less.
        let (mut pass, mut best_pass) = (Instant::now(), f64::INFINITY);
        for (qi, q) in queries
            .chunks_exact(dims)
            .enumerate()
            .cycle()
            .take(nq * repeat)
        {
            let t0 = Instant::now();
            let mut scan = Scan::with_centroids(cent.clone(), q, probes, probes).unwrap();
            start_time += t0.elapsed().as_secs_f64();
            let mut rerank = |tid: Tid| {
                let i = tid.block as usize * 100 + tid.offset as usize - 1;
                Some(metric.distance(&base[i * dims..(i + 1) * dims], q))
            };
            for _ in 0..10 {
                let Some((tid, _)) = scan.next(&rel, &mut rerank).unwrap() else {
                    break;
                };
                let i = tid.block as usize * 100 + tid.offset as usize - 1;
                hits += truth[qi].contains(&i) as usize;
            }
            let s = scan.stats();
            st.tuples_estimated += s.tuples_estimated;
            st.tuples_refined += s.tuples_refined;
            st.reranked += s.reranked;
            st.pages_read += s.pages_read;
            st.refine_pages_read += s.refine_pages_read;
            if qi + 1 == nq {
                best_pass = best_pass.min(pass.elapsed().as_secs_f64());
                pass = Instant::now();
            }
        }
        let best_q = best_pass * 1e6 / nq as f64;
        let nq = nq * repeat;
        let per_q = t.elapsed().as_secs_f64() * 1e6 / nq as f64;
        let n = nq as u64;
        println!(
            "lists {lists} probes {probes:4}: recall@10 {:.4}  {per_q:8.1} us/query (best pass {best_q:.1}; {:.1} starting)  estimated {} refined {} reranked {} pages {} + {}",
            hits as f64 / (10 * nq) as f64,
            start_time * 1e6 / nq as f64,
            st.tuples_estimated / n,
            st.tuples_refined / n,
            st.reranked / n,
            st.pages_read / n,
            st.refine_pages_read / n
        );
    }
}
