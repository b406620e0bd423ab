#!/usr/bin/env python3
"""Approximate search: the rsclip index vs pgvector's HNSW and IVFFlat, same server, same data.

For each data set it loads identical rows into an `embedding` table and a `vector` table, builds
  rsclip (defaults), HNSW (m = 16, ef_construction = 64), IVFFlat (lists = rows / 1000)
with the same maintenance_work_mem and max_parallel_maintenance_workers, one engine at a time
(build, sweep, drop), sweeping each engine's search knob (rsclip.probes, hnsw.ef_search, ivfflat.probes), timing `ORDER BY <#>
LIMIT 10` over held-out queries from one connection and measuring recall@10 against the exact
top 10 (numpy, float64). All engines run in the same server and session, one after the other,
on a warm buffer cache (at 100k rows shared_buffers holds every table and index; at 1M, give
it 8GB: `make bench-index ROWS=1000000 BENCH_SHARED_BUFFERS=8GB BENCH_MWM=5GB`). Prints a table, the
QPS each engine reaches at recall 0.95 (interpolated along its curve) and the ratios; writes
results JSON and a PNG plot under bench/results/.

Data sets (all unit vectors):
- real: all-MiniLM-L6-v2 sentence embeddings of Debian's documentation (384 dimensions; made by
  bench/real_embeddings.py, `make real-embeddings`), with held-out sentences as queries;
- clustered: a Gaussian mixture (768 dimensions, rows / 1000 clusters): easy for IVF;
- uniform: the uniform sphere (768 dimensions): no structure at all.

    bench/index.py --uri postgresql://... --rows 100000 [--queries 200] [--data real,clustered,uniform]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import psycopg

import real_embeddings

SYNTHETIC_DIMS = 768
RESULTS = Path(__file__).resolve().parent / "results"
RSCLIP_WITH = ""
ENGINES = ["rsclip", "hnsw", "ivfflat"]

SWEEPS = {
    "rsclip": ("rsclip.probes", [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024]),
    "hnsw": ("hnsw.ef_search", [10, 16, 24, 40, 64, 100, 160, 256, 400, 640, 1000]),
    "ivfflat": ("ivfflat.probes", [1, 2, 4, 8, 16, 32, 64, 128]),
}


def make_data(kind, n, nq, seed):
    """(base, queries) of one data set: n rows and nq held-out queries, unit vectors."""
    if kind == "real":
        return real_embeddings.load(n, nq)
    rng = np.random.default_rng(seed)
    d = SYNTHETIC_DIMS
    if kind == "uniform":
        x = rng.standard_normal((n + nq, d)).astype(np.float32)
    elif kind == "clustered":
        clusters = max(10, n // 1000)
        centres = rng.standard_normal((clusters, d)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x = centres[rng.integers(0, clusters, n + nq)]
        x += rng.standard_normal((n + nq, d)).astype(np.float32) * (1.0 / np.sqrt(d))
    else:
        raise SystemExit(f"unknown data set {kind!r} (real, clustered, uniform)")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:n], x[n:].copy()


def copy_rows(conn, table, ids, vecs):
    dims = vecs.shape[1]
    row = np.dtype([("nfields", ">i2"), ("id_len", ">i4"), ("id", ">i4"), ("v_len", ">i4"),
                    ("dims", ">u2"), ("unused", ">u2"), ("v", ">f4", (dims,))])
    rows = np.zeros(len(ids), dtype=row)
    rows["nfields"], rows["id_len"], rows["id"] = 2, 4, ids
    rows["v_len"], rows["dims"], rows["v"] = 4 + 4 * dims, dims, vecs
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
    """(QPS from one client, recall@k, mean server-side execution time in ms). The server time
    comes from EXPLAIN (ANALYZE, TIMING OFF) of the same statements, run after the timed pass,
    so the client's round trip does not hide the engine."""
    sql = f"SELECT id FROM {table} ORDER BY emb <#> %s::{cast} LIMIT {k}"
    for q in qtexts[:5]:  # warm the plan cache and buffers
        conn.execute(sql, (q,), prepare=True).fetchall()
    hits = 0
    t = time.perf_counter()
    results = [conn.execute(sql, (q,), prepare=True).fetchall() for q in qtexts]
    elapsed = time.perf_counter() - t
    for got, want in zip(results, truth):
        hits += len({r[0] for r in got} & want)
    explain = f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {sql}"
    server_ms = [conn.execute(explain, (q,)).fetchone()[0][0]["Execution Time"] for q in qtexts]
    return len(qtexts) / elapsed, hits / (k * len(qtexts)), float(np.mean(server_ms))


def at_recall(curve, field, target=0.95):
    """`field` at recall `target`, interpolated between the two settings that straddle it."""
    pts = sorted(curve, key=lambda p: p["recall"])
    for a, b in zip(pts, pts[1:]):
        if a["recall"] < target <= b["recall"]:
            f = (target - a["recall"]) / (b["recall"] - a["recall"])
            return a[field] + f * (b[field] - a[field])
    return None


def qps_at(curve, target=0.95):
    """QPS at recall `target` (interpolated); where the first point is already past it, the best
    QPS of the points that reach it."""
    v = at_recall(curve, "qps", target)
    if v is not None:
        return v
    best = [p for p in curve if p["recall"] >= target]
    return max(p["qps"] for p in best) if best else None


def server_ms_at(curve, target=0.95):
    v = at_recall(curve, "server_ms", target)
    if v is not None:
        return v
    best = [p for p in curve if p["recall"] >= target]
    return min(p["server_ms"] for p in best) if best else None


def bench_dataset(conn, kind, rows, nq, seed):
    base, queries = make_data(kind, rows, nq, seed)
    dims = base.shape[1]
    print(f"\n== {kind}: {rows} x {dims} unit vectors, {nq} queries ==")
    truth = ground_truth(base, queries)
    qtexts = [vec_text(q) for q in queries]
    conn.execute("DROP TABLE IF EXISTS ix_rs, ix_pv")
    conn.execute(f"CREATE TABLE ix_rs (id int, emb embedding({dims}))")
    conn.execute(f"CREATE TABLE ix_pv (id int, emb vector({dims}))")
    for start in range(0, rows, 20000):
        ids = np.arange(start, min(rows, start + 20000), dtype=np.int32)
        copy_rows(conn, "ix_rs", ids, base[ids])
        copy_rows(conn, "ix_pv", ids, base[ids])
    conn.execute("VACUUM ANALYZE ix_rs")
    conn.execute("VACUUM ANALYZE ix_pv")
    del base  # the server holds the rows now; keep the client small at 1M rows
    builds = {
        "rsclip": "CREATE INDEX ix_rs_idx ON ix_rs USING rsclip (emb embedding_ip_ops)"
        + (f" WITH ({RSCLIP_WITH})" if RSCLIP_WITH else ""),
        "hnsw": "CREATE INDEX ix_pv_hnsw ON ix_pv USING hnsw (emb vector_ip_ops) WITH (m = 16, ef_construction = 64)",
        "ivfflat": f"CREATE INDEX ix_pv_ivf ON ix_pv USING ivfflat (emb vector_ip_ops) WITH (lists = {max(1, rows // 1000)})",
    }
    index_of = {"rsclip": "ix_rs_idx", "hnsw": "ix_pv_hnsw", "ivfflat": "ix_pv_ivf"}
    out = {"rows": rows, "dims": dims, "queries": nq, "engines": {}}
    # One engine at a time: build, sweep, drop. Each sweep runs with only its own index on the
    # table, and at 1M rows the buffer cache never has to hold all three indexes.
    for engine, sql in builds.items():
        if engine not in ENGINES:
            continue
        secs = timed(conn, sql)
        nbytes = size(conn, index_of[engine])
        out["engines"][engine] = {"build_s": secs, "size_bytes": nbytes, "curve": []}
        print(f"build {engine:8s} {secs:8.1f} s   size {nbytes / 2**20:8.1f} MiB", flush=True)
        knob, values = SWEEPS[engine]
        table, cast = ("ix_rs", "embedding") if engine == "rsclip" else ("ix_pv", "vector")
        # What a user gets with no WITH (...) and no SET.
        qps, rec, server_ms = run_queries(conn, table, cast, qtexts, truth)
        out["engines"][engine]["defaults"] = {"qps": qps, "recall": rec, "server_ms": server_ms}
        print(f"{engine:8s} defaults   recall@10 {rec:.3f}  QPS {qps:8.1f}  server {server_ms:7.3f} ms", flush=True)
        for v in values:
            conn.execute(f"SET {knob} = {v}")
            qps, rec, server_ms = run_queries(conn, table, cast, qtexts, truth)
            out["engines"][engine]["curve"].append({"setting": v, "qps": qps, "recall": rec, "server_ms": server_ms})
            print(f"{engine:8s} {knob}={v:<4d} recall@10 {rec:.3f}  QPS {qps:8.1f}  server {server_ms:7.3f} ms",
                  flush=True)
            if rec >= 0.999:
                break
        conn.execute(f"RESET {knob}")
        conn.execute(f"DROP INDEX {index_of[engine]}")
    e = out["engines"]
    for name in e:
        e[name]["qps_at_095"] = qps_at(e[name]["curve"])
        e[name]["server_ms_at_095"] = server_ms_at(e[name]["curve"])
    if "rsclip" not in e or "hnsw" not in e:
        return out
    rs, hn = e["rsclip"], e["hnsw"]
    out["ratios"] = {
        "qps_at_095_vs_hnsw": (rs["qps_at_095"] / hn["qps_at_095"]) if rs["qps_at_095"] and hn["qps_at_095"] else None,
        "server_speed_at_095_vs_hnsw": (hn["server_ms_at_095"] / rs["server_ms_at_095"])
        if rs["server_ms_at_095"] and hn["server_ms_at_095"] else None,
        "build_time_vs_hnsw": rs["build_s"] / hn["build_s"],
        "size_vs_hnsw": rs["size_bytes"] / hn["size_bytes"],
    }
    print(f"\n{kind}: QPS at recall@10 = 0.95: " + ", ".join(
        f"{n} {e[n]['qps_at_095']:.1f}" if e[n]["qps_at_095"] else f"{n} (not reached)" for n in e))
    r = out["ratios"]
    qr = f"{r['qps_at_095_vs_hnsw']:.2f}x" if r["qps_at_095_vs_hnsw"] else "n/a"
    sr = f"{r['server_speed_at_095_vs_hnsw']:.2f}x" if r["server_speed_at_095_vs_hnsw"] else "n/a"
    print(f"{kind}: rsclip vs HNSW: QPS@0.95 {qr}, server-side speed@0.95 {sr}, build time {r['build_time_vs_hnsw']:.3f}x "
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
    ap.add_argument("--data", default="real,clustered,uniform")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rsclip-with", default="",
                    help="reloptions for the rsclip index, e.g. 'lists = 1000' (default: none, "
                         "which is what the targets are measured with)")
    ap.add_argument("--engines", default="rsclip,hnsw,ivfflat",
                    help="engines to run (rsclip and hnsw are needed for the ratios)")
    ap.add_argument("--maintenance-work-mem", default="2GB",
                    help="for every build (HNSW needs about 4 GB to build 1M x 768 in memory)")
    a = ap.parse_args()
    global RSCLIP_WITH, ENGINES
    RSCLIP_WITH, ENGINES = a.rsclip_with, a.engines.split(",")
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
    stem = RESULTS / (f"index-{a.rows}" + ("-custom" if a.rsclip_with or a.engines != "rsclip,hnsw,ivfflat" else ""))
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, stem.with_suffix(".png"))
    print(f"\nwrote {stem.relative_to(RESULTS.parent.parent)}.json and .png")


if __name__ == "__main__":
    main()
