#!/usr/bin/env python3
"""Backfill throughput: rsclip_backfill vs bare batched `session.run` vs per-row UPDATE.

Generates `--rows` PNG images at exactly the model's input size (so preprocessing is only
rescale/normalize and both pipelines feed the model identical tensors), loads them into a table,
and measures rows/s of:
  bare       onnxruntime's Python `session.run` on ready batches (stacked, contiguous tensors)
             of `--batch`, `--threads` intra-op threads: the limit (no decoding, no database)
  backfill   CALL rsclip_backfill(..., batch_size => --batch) with rsclip.intra_op_threads =
             --threads (decoding PNGs inside the server, writing and committing every batch)
  worker     the same CALL with rsclip.inference = worker: the model runs in the server's shared
             inference workers (the server must preload rsclip with rsclip.intra_op_threads =
             --threads for equal threads; skipped when no worker runs)
  per-row    UPDATE t SET emb = rsclip_encode_image(img) on a tenth of the rows (same session and
             rsclip.intra_op_threads, result cache off)
Target: backfill >= 0.9x bare, in both modes. Runs on the server's rsclip.model_path unless --model-path is given
(e.g. the git-rsclip-base random-weight export of `make bench-encode`).

    bench/backfill.py --uri postgresql://... [--rows 10000] [--batch 32] [--threads 1] [--repeat 3]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from demo import png  # noqa: E402  (the same plain RGB PNG writer)


def images(n, size, seed):
    """Smooth random images (cheap to compress, like aerial tiles more than noise is)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        f = rng.uniform(1, 6, (3, 2))
        p = rng.uniform(0, 2 * np.pi, 3)
        img = np.stack([127.5 + 127.5 * np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy) + p[c]) for c in range(3)], -1)
        out.append(np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", required=True)
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-path")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=3, help="runs of bare and backfill, alternating (medians reported)")
    a = ap.parse_args()
    with psycopg.connect(a.uri, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS rsclip")
        if a.model_path:
            c.execute("SELECT set_config('rsclip.model_path', %s, false)", (a.model_path,))
        model_dir = Path(c.execute("SHOW rsclip.model_path").fetchone()[0])
        manifest = json.loads((model_dir / "rsclip.json").read_text())
        size, dim = manifest["image_size"], manifest["embedding_dim"]
        print(f"model {manifest['model_id']} ({size} px, {dim} dims), {a.rows} rows, batch {a.batch}, {a.threads} thread(s)")
        pixels = images(a.rows, size, a.seed)

        # bare: the same tensors straight into onnxruntime
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = a.threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(model_dir / manifest["vision"]["file"]), opts, providers=["CPUExecutionProvider"])
        mean, std = np.array(manifest["image_mean"]), np.array(manifest["image_std"])
        # Ready batches: C-contiguous and stacked before the clock starts, so that the bare loop
        # times session.run alone (gathering transposed per-image arrays in the loop cost ~25%).
        tensors = [np.ascontiguousarray(((p.astype(np.float32) * manifest["rescale_factor"] - mean) / std)
                                        .transpose(2, 0, 1), dtype=np.float32)
                   for p in pixels]
        batches = [np.stack(tensors[i:i + a.batch]) for i in range(0, a.rows, a.batch)]
        inp = manifest["vision"]["input"]
        sess.run(None, {inp: batches[0]})

        def run_bare():
            t = time.perf_counter()
            for b in batches:
                sess.run(None, {inp: b})
            return a.rows / (time.perf_counter() - t)

        c.execute("DROP TABLE IF EXISTS bench_backfill")
        c.execute(f"CREATE TABLE bench_backfill (id int PRIMARY KEY, img bytea, emb embedding({dim}), emb2 embedding({dim}))")
        with c.cursor().copy("COPY bench_backfill (id, img) FROM STDIN") as cp:
            for i, p in enumerate(pixels):
                cp.write_row((i, png(p)))
        c.execute("VACUUM ANALYZE bench_backfill")
        c.execute(f"SET rsclip.intra_op_threads = {a.threads}")
        c.execute("SET rsclip.cache = off")  # the per-row pipeline must encode, not hit earlier runs' rows
        c.execute("SELECT rsclip_encode_image(img) FROM bench_backfill LIMIT 1")  # load the session

        workers = c.execute("SELECT count(*) FROM rsclip_inference_stats WHERE running").fetchone()[0]
        if workers:
            # the workers load their session before the clock starts, as the backend's did
            c.execute("SET rsclip.inference = worker")
            c.execute("SELECT rsclip_encode_image(img) FROM bench_backfill LIMIT 1")
            c.execute("SET rsclip.inference = backend")

        def run_backfill(mode="backend"):
            c.execute("SELECT set_config('rsclip.inference', %s, false)", (mode,))
            c.execute("UPDATE bench_backfill SET emb = NULL WHERE emb IS NOT NULL")
            c.execute("VACUUM bench_backfill")
            t = time.perf_counter()
            c.execute("CALL rsclip_backfill('bench_backfill', 'img', 'emb', %s)", (a.batch,))
            rate = a.rows / (time.perf_counter() - t)
            filled = c.execute("SELECT count(emb) FROM bench_backfill").fetchone()[0]
            assert filled == a.rows, f"backfill filled {filled} of {a.rows}"
            c.execute("SET rsclip.inference = backend")
            return rate

        # alternate the two, so that both see the same spells of noise on a shared machine
        bares, backfills, worker_runs = [], [], []
        for _ in range(a.repeat):
            bares.append(run_bare())
            backfills.append(run_backfill())
            if workers:
                worker_runs.append(run_backfill("worker"))
        bare, backfill = statistics.median(bares), statistics.median(backfills)
        del tensors, batches

        subset = max(1, a.rows // 10)
        t = time.perf_counter()
        c.execute("UPDATE bench_backfill SET emb2 = rsclip_encode_image(img) WHERE id < %s", (subset,))
        per_row = subset / (time.perf_counter() - t)
        same = c.execute("SELECT count(*) FROM bench_backfill WHERE id < %s AND emb::text = emb2::text", (subset,)).fetchone()[0]

    runs = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    print(f"bare session.run   {bare:10.1f} rows/s   (median of {runs(bares)})")
    print(f"rsclip_backfill    {backfill:10.1f} rows/s   {backfill / bare:.2f}x bare (target >= 0.9)   (median of {runs(backfills)})")
    if worker_runs:
        w = statistics.median(worker_runs)
        print(f"  in worker mode   {w:10.1f} rows/s   {w / bare:.2f}x bare, {w / backfill:.2f}x backend mode   "
              f"(median of {runs(worker_runs)}; {workers} inference worker(s))")
    else:
        print("  in worker mode   not run: no inference worker runs on this server")
    print(f"per-row UPDATE     {per_row:10.1f} rows/s   backfill is {backfill / per_row:.2f}x per-row")
    print(f"per-row and backfill embeddings identical for {same} of {subset} rows")


if __name__ == "__main__":
    main()
