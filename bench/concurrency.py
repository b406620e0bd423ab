#!/usr/bin/env python3
"""Backend mode against worker mode (rsclip.inference), in one run on one server: memory per
connection, throughput under concurrent clients, and a lone query's latency.

  memory      N connections (1, 8, 32 by default) each encode one uncached text and one image;
              then /proc/PID/smaps_rollup of every backend and inference worker: the private
              memory (Private_Clean + Private_Dirty) a backend adds over a connection that only
              ran SELECT 1, and the total PSS of the backends plus the workers.
  throughput  C clients (1, 2, 8, 32) encode distinct uncached texts (and images with
              --images) for --seconds each; requests per second in both modes, their ratio,
              and in worker mode the mean batch the workers formed (rsclip_inference_stats).
  latency     one client, --calls uncached text encodes timed inside the server (PL/pgSQL
              loop, clock_timestamp around each call): p50 and p99 in both modes and the
              difference.

Targets (issue 13): a backend adds <= 30 MB in worker mode; worker-mode throughput >= 0.9x
backend mode's at equal total threads; the mean batch grows with the clients; a lone text
costs <= 100 us more at p50 in worker mode.

The server must preload rsclip (make bench-concurrency starts one that does). Runs as the
server's OS user or root (it reads /proc of the server's processes).

    bench/concurrency.py --uri postgresql://... [--model-path DIR] [--connections 1,8,32]
                         [--clients 1,2,8,32] [--seconds 10] [--calls 300]
                         [--backend-max-connections N]

--backend-max-connections caps backend mode (each backend loads its own model: with the
git-rsclip-base shape about 940 MB, so 32 of them do not fit a 24 GB machine); the points above
the cap are reported as not run, with the memory they would need.
"""
import argparse
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
IMAGE = ROOT / "tests" / "fixtures" / "reference" / "images"

LOOP = """
CREATE OR REPLACE FUNCTION pg_temp.time_calls(prefix text, n int) RETURNS double precision[]
LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; times double precision[] := '{}'; i int;
BEGIN
    FOR i IN 1..n LOOP
        t0 := clock_timestamp();
        PERFORM rsclip_encode_text(prefix || i);
        times := times || extract(epoch FROM clock_timestamp() - t0) * 1e6;
    END LOOP;
    RETURN times;
END $$;
"""


def some_image():
    files = sorted(p for p in IMAGE.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return files[0].read_bytes()


def smaps(pid):
    """(private, pss) bytes of process `pid`."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":", 1)
        fields[k.strip()] = int(v.split()[0]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Pss"]


def worker_pids(conn):
    data = conn.execute("SHOW data_directory").fetchone()[0]
    postmaster = (Path(data) / "postmaster.pid").read_text().split()[0]
    ps = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", postmaster],
                        capture_output=True, text=True).stdout
    return [int(l.split()[0]) for l in ps.splitlines() if "rsclip inference worker" in l]


def connect(uri, mode, model_path):
    c = psycopg.connect(uri, autocommit=True)
    c.execute("SET rsclip.cache = off")
    c.execute("SELECT set_config('rsclip.inference', %s, false)", (mode,))
    if model_path:
        c.execute("SELECT set_config('rsclip.model_path', %s, false)", (model_path,))
    return c


def memory(uri, mode, n, model_path, image):
    baseline = connect(uri, mode, model_path)
    baseline.execute("SELECT 1")
    base_private, _ = smaps(baseline.execute("SELECT pg_backend_pid()").fetchone()[0])
    conns = [connect(uri, mode, model_path) for _ in range(n)]
    for i, c in enumerate(conns):
        c.execute("SELECT rsclip_encode_text(%s)", (f"memory probe {mode} {n} {i}",))
        c.execute("SELECT rsclip_encode_image(%s)", (image,))
    pids = [c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in conns]
    per = [smaps(p) for p in pids]
    workers = [smaps(p) for p in worker_pids(baseline)] if mode == "worker" else []
    added = [max(0, p - base_private) for p, _ in per]
    out = {
        "connections": n,
        "backend_added_private_mb_mean": sum(added) / len(added) / 2**20,
        "backend_added_private_mb_max": max(added) / 2**20,
        "backends_pss_mb": sum(s for _, s in per) / 2**20,
        "workers_pss_mb": sum(s for _, s in workers) / 2**20,
        "workers": len(workers),
    }
    out["total_pss_mb"] = out["backends_pss_mb"] + out["workers_pss_mb"]
    for c in conns + [baseline]:
        c.close()
    return out


def batch_totals(conn):
    rows = conn.execute("SELECT coalesce(sum(requests), 0), coalesce(sum(batches), 0), "
                        "coalesce(sum(rows), 0) FROM rsclip_inference_stats").fetchone()
    return [int(x) for x in rows]


def throughput(uri, mode, clients, seconds, model_path, image):
    conns = [connect(uri, mode, model_path) for _ in range(clients)]
    for i, c in enumerate(conns):  # sessions loaded (backend mode) before timing
        c.execute("SELECT rsclip_encode_text(%s)", (f"warm {mode} {clients} {i}",))
        if image:
            c.execute("SELECT rsclip_encode_image(%s)", (image,))
    done = [0] * clients
    stop = time.monotonic() + seconds
    start_gate = threading.Barrier(clients + 1)

    def run(i):
        c = conns[i]
        start_gate.wait()
        k = 0
        while time.monotonic() < stop:
            c.execute("SELECT rsclip_encode_text(%s)", (f"{mode} client {i} text {k} {time.time_ns()}",))
            if image:
                c.execute("SELECT rsclip_encode_image(%s)", (image,))
            k += 1
        done[i] = k

    with psycopg.connect(uri, autocommit=True) as s:
        before = batch_totals(s)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        start_gate.wait()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        after = batch_totals(s)
    for c in conns:
        c.close()
    requests = sum(done) * (2 if image else 1)
    out = {"clients": clients, "requests_per_s": requests / elapsed}
    if mode == "worker":
        d = [a - b for a, b in zip(after, before)]
        out["mean_batch_rows"] = d[2] / d[1] if d[1] else None
    return out


def latency(uri, mode, calls, model_path):
    with connect(uri, mode, model_path) as c:
        c.execute(LOOP)
        c.execute("SELECT pg_temp.time_calls(%s, 20)", (f"warm {mode} ",))
        times = sorted(c.execute("SELECT pg_temp.time_calls(%s, %s)",
                                 (f"lone {mode} {time.time_ns()} ", calls)).fetchone()[0])
    return {"p50_us": times[len(times) // 2], "p99_us": times[min(len(times) - 1, int(len(times) * 0.99))]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", required=True)
    ap.add_argument("--model-path", help="model directory (default: the server's rsclip.model_path)")
    ap.add_argument("--connections", default="1,8,32")
    ap.add_argument("--clients", default="1,2,8,32")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--images", action="store_true", help="clients encode an image after each text")
    ap.add_argument("--backend-max-connections", type=int, default=0,
                    help="run backend mode at most at this many connections/clients (0: no cap)")
    a = ap.parse_args()
    cap = a.backend_max_connections or 1 << 30
    image = some_image()
    with psycopg.connect(a.uri, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS rsclip")
        if not worker_pids(conn):
            raise SystemExit("no rsclip inference worker runs: preload rsclip "
                             "(shared_preload_libraries) with rsclip.inference_workers >= 1")
        model = conn.execute("SELECT rsclip_model_info()->>'model_path'").fetchone()[0]
        threads = conn.execute("SHOW rsclip.intra_op_threads").fetchone()[0]
        nworkers = len(worker_pids(conn))
    # Recorded relative to the checkout (results are committed; absolute paths are this machine's).
    shown = os.path.relpath(a.model_path or model, ROOT)
    print(f"model {shown}; {nworkers} inference workers; intra_op_threads {threads}; "
          f"{os.cpu_count()} CPUs")
    results = {"model": shown, "workers": nworkers, "memory": {}, "throughput": {},
               "latency": {}}
    print("\nmemory (each connection has encoded one text and one image)")
    print(f"{'mode':8} {'conns':>5} {'added/backend MB':>17} {'max':>7} {'backends PSS MB':>16} "
          f"{'workers PSS MB':>15} {'total PSS MB':>13}")
    for mode in ("backend", "worker"):
        results["memory"][mode] = []
        for n in [int(x) for x in a.connections.split(",")]:
            if mode == "backend" and n > cap:
                per = results["memory"]["backend"][-1]["backend_added_private_mb_mean"] \
                    if results["memory"]["backend"] else float("nan")
                results["memory"][mode].append({"connections": n, "skipped": True,
                                                "would_need_mb": per * n})
                print(f"{mode:8} {n:5}   not run (above --backend-max-connections {cap}): "
                      f"about {per * n:.0f} MB of backend memory")
                continue
            m = memory(a.uri, mode, n, a.model_path, image)
            results["memory"][mode].append(m)
            print(f"{mode:8} {n:5} {m['backend_added_private_mb_mean']:17.1f} "
                  f"{m['backend_added_private_mb_max']:7.1f} {m['backends_pss_mb']:16.1f} "
                  f"{m['workers_pss_mb']:15.1f} {m['total_pss_mb']:13.1f}")
    print(f"\nthroughput ({a.seconds:g} s per point, uncached {'texts and images' if a.images else 'texts'})")
    print(f"{'clients':>7} {'backend req/s':>14} {'worker req/s':>13} {'ratio':>6} {'mean batch':>11}")
    for c in [int(x) for x in a.clients.split(",")]:
        b = throughput(a.uri, "backend", c, a.seconds, a.model_path, a.images and image) \
            if c <= cap else None
        w = throughput(a.uri, "worker", c, a.seconds, a.model_path, a.images and image)
        ratio = w["requests_per_s"] / b["requests_per_s"] if b else None
        results["throughput"][c] = {"backend": b, "worker": w, "ratio": ratio}
        mb = w.get("mean_batch_rows")
        print(f"{c:7} {b['requests_per_s'] if b else float('nan'):14.1f} {w['requests_per_s']:13.1f} "
              f"{ratio if ratio else float('nan'):6.2f} {mb if mb is None else round(mb, 2):>11}"
              + ("" if b else f"   (backend mode not run above {cap} clients)"))
    print(f"\nlone text latency ({a.calls} uncached calls, timed in the server)")
    for mode in ("backend", "worker"):
        results["latency"][mode] = latency(a.uri, mode, a.calls, a.model_path)
        r = results["latency"][mode]
        print(f"{mode:8} p50 {r['p50_us']:8.1f} us   p99 {r['p99_us']:8.1f} us")
    extra = results["latency"]["worker"]["p50_us"] - results["latency"]["backend"]["p50_us"]
    results["latency"]["worker_minus_backend_p50_us"] = extra
    print(f"worker - backend at p50: {extra:+.1f} us (target <= 100)")
    RESULTS.mkdir(exist_ok=True)
    name = Path(results["model"]).name
    out = RESULTS / f"concurrency-{name}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
