#!/usr/bin/env python3
"""Approximate search: the rsclip index vs pgvector's HNSW and IVFFlat, same server, same data.

For each data set (unit vectors, 768 dimensions: a Gaussian mixture and a uniform sphere) it
loads identical rows into an `embedding` table and a `vector` table, builds
  rsclip (defaults), HNSW (m = 16, ef_construction = 64), IVFFlat (lists = rows / 1000)
with the same maintenance_work_mem and max_parallel_maintenance_workers, one engine at a time
(build, sweep, drop), sweeping each engine's search knob (rsclip.probes, hnsw.ef_search, ivfflat.probes), timing `ORDER BY <#>
LIMIT 10` over held-out queries from one connection and measuring recall@10 against the exact
top 10 (numpy, float64). All engines run in the same server and session, one after the other,
on a warm buffer cache (at 100k rows shared_buffers holds every table and index; at 1M, give
it 8GB: `make bench-index ROWS=1000000 BENCH_SHARED_BUFFERS=8GB BENCH_MWM=5GB`). Prints a table, the
QPS each engine reaches at recall 0.95 (interpolated along its curve) and the ratios; writes
results JSON and a PNG plot under bench/results/.

    bench/index.py --uri postgresql://... --rows 100000 [--queries 200] [--data clustered,uniform]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import psycopg

DIMS = 768
RESULTS = Path(__file__).resolve().parent / "results"
SWEEPS = {
    "rsclip": ("rsclip.probes", [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]),
    "hnsw": ("hnsw.ef_search", [10, 16, 24, 40, 64, 100, 160, 256, 400, 640, 1000]),
    "ivfflat": ("ivfflat.probes", [1, 2, 4, 8, 16, 32, 64, 128]),
}


def make_data(kind, n, seed):
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        x = rng.standard_normal((n, DIMS)).astype(np.float32)
    else:
        clusters = max(10, n // 1000)
        centres = rng.standard_normal((clusters, DIMS)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x = centres[rng.integers(0, clusters, n)]
        x += rng.standard_normal((n, DIMS)).astype(np.float32) * (1.0 / np.sqrt(DIMS))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def copy_rows(conn, table, ids, vecs):
    row = np.dtype([("nfields", ">i2"), ("id_len", ">i4"), ("id", ">i4"), ("v_len", ">i4"),
                    ("dims", ">u2"), ("unused", ">u2"), ("v", ">f4", (DIMS,))])
    rows = np.zeros(len(ids), dtype=row)
    rows["nfields"], rows["id_len"], rows["id"] = 2, 4, ids
    rows["v_len"], rows["dims"], rows["v"] = 4 + 4 * DIMS, DIMS, vecs
    with conn.cursor().copy(f"COPY {table} FROM STDIN (FORMAT binary)") as cp:
        cp.write(b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8 + rows.tobytes() + b"\xff\xff")


def vec_text(v):
    return "[" + ",".join(f"{x:.8g}" for x in v) + "]"


def ground_truth(base, queries, k=10, chunk=50000):
    """Exact top k by inner product, in float64, over row chunks (1M x 768 fits in memory once)."""
    q64 = queries.astype(np.float64).T
    best_s = np.full((len(queries), 0), -np.inf)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(base), chunk):
        s = (base[start:start + chunk].astype(np.float64) @ q64).T
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + s.shape[1]), s.shape)], axis=1)
        keep = np.argpartition(-cand_s, min(k, cand_s.shape[1] - 1), axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, keep, axis=1)
        best_i = np.take_along_axis(cand_i, keep, axis=1)
    return [set(int(i) for i in row) for row in best_i]


def timed(conn, sql):
    t = time.perf_counter()
    conn.execute(sql)
    return time.perf_counter() - t


def size(conn, rel):
    return conn.execute("SELECT pg_relation_size(%s)", (rel,)).fetchone()[0]


def run_queries(conn, table, cast, qtexts, truth, k=10):
    sql = f"SELECT id FROM {table} ORDER BY emb <#> %s::{cast} LIMIT {k}"
    for q in qtexts[:5]:  # warm the plan cache and buffers
        conn.execute(sql, (q,), prepare=True).fetchall()
    hits = 0
    t = time.perf_counter()
    results = [conn.execute(sql, (q,), prepare=True).fetchall() for q in qtexts]
    elapsed = time.perf_counter() - t
    for got, want in zip(results, truth):
        hits += len({r[0] for r in got} & want)
    return len(qtexts) / elapsed, hits / (k * len(qtexts))


def qps_at(curve, target=0.95):
    """QPS at recall `target`, interpolated between the two settings that straddle it."""
    pts = sorted(curve, key=lambda p: p["recall"])
    for a, b in zip(pts, pts[1:]):
        if a["recall"] < target <= b["recall"]:
            f = (target - a["recall"]) / (b["recall"] - a["recall"])
            return a["qps"] + f * (b["qps"] - a["qps"])
    best = [p for p in pts if p["recall"] >= target]
    return max(p["qps"] for p in best) if best else None


def bench_dataset(conn, kind, rows, nq, seed):
    print(f"\n== {kind}: {rows} x {DIMS} unit vectors, {nq} queries ==")
    data = make_data(kind, rows + nq, seed)
    base, queries = data[:rows], data[rows:].copy()
    truth = ground_truth(base, queries)
    qtexts = [vec_text(q) for q in queries]
    conn.execute("DROP TABLE IF EXISTS ix_rs, ix_pv")
    conn.execute(f"CREATE TABLE ix_rs (id int, emb embedding({DIMS}))")
    conn.execute(f"CREATE TABLE ix_pv (id int, emb vector({DIMS}))")
    for start in range(0, rows, 20000):
        ids = np.arange(start, min(rows, start + 20000), dtype=np.int32)
        copy_rows(conn, "ix_rs", ids, base[ids])
        copy_rows(conn, "ix_pv", ids, base[ids])
    conn.execute("VACUUM ANALYZE ix_rs")
    conn.execute("VACUUM ANALYZE ix_pv")
    del data, base  # the server holds the rows now; keep the client small at 1M rows
    builds = {
        "rsclip": "CREATE INDEX ix_rs_idx ON ix_rs USING rsclip (emb embedding_ip_ops)",
        "hnsw": "CREATE INDEX ix_pv_hnsw ON ix_pv USING hnsw (emb vector_ip_ops) WITH (m = 16, ef_construction = 64)",
        "ivfflat": f"CREATE INDEX ix_pv_ivf ON ix_pv USING ivfflat (emb vector_ip_ops) WITH (lists = {max(1, rows // 1000)})",
    }
    index_of = {"rsclip": "ix_rs_idx", "hnsw": "ix_pv_hnsw", "ivfflat": "ix_pv_ivf"}
    out = {"rows": rows, "dims": DIMS, "queries": nq, "engines": {}}
    # One engine at a time: build, sweep, drop. Each sweep runs with only its own index on the
    # table, and at 1M rows the buffer cache never has to hold all three indexes.
    for engine, sql in builds.items():
        secs = timed(conn, sql)
        nbytes = size(conn, index_of[engine])
        out["engines"][engine] = {"build_s": secs, "size_bytes": nbytes, "curve": []}
        print(f"build {engine:8s} {secs:8.1f} s   size {nbytes / 2**20:8.1f} MiB", flush=True)
        knob, values = SWEEPS[engine]
        table, cast = ("ix_rs", "embedding") if engine == "rsclip" else ("ix_pv", "vector")
        for v in values:
            conn.execute(f"SET {knob} = {v}")
            qps, rec = run_queries(conn, table, cast, qtexts, truth)
            out["engines"][engine]["curve"].append({"setting": v, "qps": qps, "recall": rec})
            print(f"{engine:8s} {knob}={v:<4d} recall@10 {rec:.3f}  QPS {qps:8.1f}", flush=True)
            if rec >= 0.999:
                break
        conn.execute(f"RESET {knob}")
        conn.execute(f"DROP INDEX {index_of[engine]}")
    e = out["engines"]
    for name in e:
        e[name]["qps_at_095"] = qps_at(e[name]["curve"])
    rs, hn = e["rsclip"], e["hnsw"]
    out["ratios"] = {
        "qps_at_095_vs_hnsw": (rs["qps_at_095"] / hn["qps_at_095"]) if rs["qps_at_095"] and hn["qps_at_095"] else None,
        "build_time_vs_hnsw": rs["build_s"] / hn["build_s"],
        "size_vs_hnsw": rs["size_bytes"] / hn["size_bytes"],
    }
    print(f"\n{kind}: QPS at recall@10 = 0.95: " + ", ".join(
        f"{n} {e[n]['qps_at_095']:.1f}" if e[n]["qps_at_095"] else f"{n} (not reached)" for n in e))
    r = out["ratios"]
    qr = f"{r['qps_at_095_vs_hnsw']:.2f}x" if r["qps_at_095_vs_hnsw"] else "n/a"
    print(f"{kind}: rsclip vs HNSW: QPS@0.95 {qr} (target >= 2), build time {r['build_time_vs_hnsw']:.3f}x "
          f"(target <= 0.2), index size {r['size_vs_hnsw']:.3f}x (target <= 0.5)")
    return out


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (kind, res) in zip(axes[0], results.items()):
        for engine, e in res["engines"].items():
            c = e["curve"]
            ax.plot([p["recall"] for p in c], [p["qps"] for p in c], marker="o", label=engine)
        ax.axvline(0.95, color="grey", linestyle=":")
        ax.set_yscale("log")
        ax.set_xlabel("recall@10")
        ax.set_ylabel("queries per second (1 client)")
        ax.set_title(f"{kind}: {res['rows']} x {res['dims']}")
        ax.legend()
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", required=True)
    ap.add_argument("--rows", type=int, default=100000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--data", default="clustered,uniform")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--maintenance-work-mem", default="2GB",
                    help="for every build (HNSW needs about 4 GB to build 1M x 768 in memory)")
    a = ap.parse_args()
    with psycopg.connect(a.uri, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS rsclip_index_bench")
        admin.execute("CREATE DATABASE rsclip_index_bench")
    uri = a.uri.rsplit("/", 1)[0] + "/rsclip_index_bench"
    results = {}
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION rsclip")
        conn.execute("CREATE EXTENSION vector")
        for setting in (f"maintenance_work_mem = '{a.maintenance_work_mem}'", "max_parallel_maintenance_workers = 1",
                        "max_parallel_workers_per_gather = 0", "jit = off"):
            conn.execute(f"SET {setting}")
        for kind in a.data.split(","):
            results[kind] = bench_dataset(conn, kind, a.rows, a.queries, a.seed)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"index-{a.rows}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, stem.with_suffix(".png"))
    print(f"\nwrote {stem.relative_to(RESULTS.parent.parent)}.json and .png")


if __name__ == "__main__":
    main()
