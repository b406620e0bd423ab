#!/usr/bin/env python3
"""Exact top-10 search by sequential scan: rsclip's `embedding` vs pgvector's `vector`.

Both tables hold the same unit vectors (768 dimensions, Gaussian then normalized) in the same
PostgreSQL 18 server; each timed round runs the same query vector against both engines, one
after the other, so machine noise hits both alike. Prints both medians and the throughput ratio.

    bench/exact_search.py --uri postgresql://... --rows 100000 [--queries 30] [--parallel]
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import psycopg

DIMS = 768


def copy_binary_rows(ids: np.ndarray, vecs: np.ndarray) -> bytes:
    """COPY BINARY payload; embedding and vector share the same binary format."""
    n = len(ids)
    row = np.dtype([("nfields", ">i2"), ("id_len", ">i4"), ("id", ">i4"), ("v_len", ">i4"),
                    ("dims", ">u2"), ("unused", ">u2"), ("v", ">f4", (DIMS,))])
    rows = np.zeros(n, dtype=row)
    rows["nfields"], rows["id_len"], rows["id"] = 2, 4, ids
    rows["v_len"], rows["dims"], rows["v"] = 4 + 4 * DIMS, DIMS, vecs
    return b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8 + rows.tobytes() + b"\xff\xff"


def load(conn, rows: int, seed: int):
    have = conn.execute("SELECT to_regclass('bench_rs') IS NOT NULL AND to_regclass('bench_pv') IS NOT NULL").fetchone()[0]
    if have:
        n_rs = conn.execute("SELECT count(*) FROM bench_rs").fetchone()[0]
        n_pv = conn.execute("SELECT count(*) FROM bench_pv").fetchone()[0]
        if n_rs == rows and n_pv == rows:
            print(f"reusing loaded tables ({rows} rows)")
            return
    conn.execute("DROP TABLE IF EXISTS bench_rs, bench_pv")
    conn.execute(f"CREATE TABLE bench_rs (id int, emb embedding({DIMS}))")
    conn.execute(f"CREATE TABLE bench_pv (id int, v vector({DIMS}))")
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    batch = 20000
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        v = rng.standard_normal((n, DIMS)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        payload = copy_binary_rows(np.arange(start, start + n, dtype=np.int32), v)
        for table in ("bench_rs", "bench_pv"):
            with conn.cursor().copy(f"COPY {table} FROM STDIN (FORMAT binary)") as copy:
                copy.write(payload)
    conn.execute("VACUUM ANALYZE bench_rs")
    conn.execute("VACUUM ANALYZE bench_pv")
    print(f"loaded {rows} rows into each table in {time.perf_counter() - t0:.1f}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", required=True)
    ap.add_argument("--rows", type=int, default=100000)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--parallel", action="store_true", help="allow parallel workers (default: one process per query)")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    with psycopg.connect(a.uri, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS rsclip")
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        conn.execute("SELECT rsclip_create_vector_casts()")
        load(conn, a.rows, a.seed)
        for rel in ("bench_rs", "bench_pv"):
            conn.execute("SELECT pg_prewarm(%s)", (rel,))
            conn.execute("SELECT pg_prewarm(reltoastrelid) FROM pg_class WHERE relname = %s AND reltoastrelid <> 0", (rel,))
        sizes = {rel: conn.execute("SELECT pg_total_relation_size(%s)", (rel,)).fetchone()[0] for rel in ("bench_rs", "bench_pv")}
        toast = {rel: conn.execute("SELECT coalesce(pg_relation_size(NULLIF(reltoastrelid, 0)), 0) FROM pg_class WHERE relname = %s", (rel,)).fetchone()[0] for rel in ("bench_rs", "bench_pv")}
        conn.execute("SET jit = off")
        if not a.parallel:
            conn.execute("SET max_parallel_workers_per_gather = 0")
        rng = np.random.default_rng(a.seed + 1000)
        queries = rng.standard_normal((a.queries, DIMS)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        sql = {
            "rsclip": "SELECT id FROM bench_rs ORDER BY emb <#> %s::embedding LIMIT 10",
            "pgvector": "SELECT id FROM bench_pv ORDER BY v <#> %s::vector LIMIT 10",
        }
        for name in sql:  # warm caches and plans
            conn.execute(sql[name], ("[" + ",".join(map(repr, queries[0].tolist())) + "]",)).fetchall()
        times = {name: [] for name in sql}
        mismatches = 0
        for i, q in enumerate(queries):
            text = "[" + ",".join(map(repr, q.tolist())) + "]"
            results = {}
            order = list(sql) if i % 2 == 0 else list(reversed(sql))
            for name in order:
                t0 = time.perf_counter()
                results[name] = [r[0] for r in conn.execute(sql[name], (text,))]
                times[name].append(time.perf_counter() - t0)
            mismatches += results["rsclip"] != results["pgvector"]

    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = med["pgvector"] / med["rsclip"]
    print(f"\nexact top-10, {a.rows} x {DIMS} unit vectors, {a.queries} queries, "
          f"{'parallel workers allowed' if a.parallel else 'no parallel workers'}, jit off")
    print(f"{'engine':<10} {'median ms':>10} {'QPS':>8} {'table+toast MB':>15} {'toast MB':>9}")
    for name, rel in (("rsclip", "bench_rs"), ("pgvector", "bench_pv")):
        print(f"{name:<10} {med[name] * 1e3:>10.1f} {1 / med[name]:>8.2f} {sizes[rel] / 2**20:>15.0f} {toast[rel] / 2**20:>9.0f}")
    print(f"queries whose top-10 ids differ between engines: {mismatches}")
    print(f"throughput ratio rsclip / pgvector: {ratio:.2f}x (target >= 1.5x)")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"exact_search_{a.rows}.json").write_text(json.dumps({
        "rows": a.rows, "dims": DIMS, "queries": a.queries, "parallel": a.parallel,
        "median_s": med, "ratio": ratio, "mismatches": mismatches, "bytes": sizes, "toast_bytes": toast,
    }, indent=2))
    if mismatches:
        raise SystemExit("the two engines disagree on exact top-10 results")


if __name__ == "__main__":
    main()
