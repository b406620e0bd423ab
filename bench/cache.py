#!/usr/bin/env python3
"""Text-query latency through the result cache: uncached, LRU hit, table hit.

Times `rsclip_encode_text` inside the server (a PL/pgSQL loop around each call, clock_timestamp()
before and after), so client round trips are not counted; the same loop around `length(text)`
is the baseline overhead, measured again right before each case, printed and subtracted (net
figures below zero, i.e. within the loop's noise, print as 0). For each case it prints p50 and
p99 over `--calls` calls, raw and net:
  uncached   rsclip.cache = off: tokenize + inference every call
  lru hit    the same text again in the same backend
  table hit  rsclip.cache_lru_size = 0: every call reads rsclip_cache (one indexed lookup as the
             table owner; the hit counter is written at most once a minute per row)
Targets: LRU hit < 50 us, table hit < 1 ms.

    bench/cache.py --uri postgresql://... [--model-path DIR] [--calls 2000]
"""
import argparse
import json

import psycopg

LOOP = """
CREATE OR REPLACE FUNCTION pg_temp.time_calls(expr text, arg text, n int) RETURNS double precision[]
LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; times double precision[] := '{}'; i int;
BEGIN
    FOR i IN 1..n LOOP
        t0 := clock_timestamp();
        EXECUTE 'SELECT ' || expr USING arg;
        times := times || extract(epoch FROM clock_timestamp() - t0) * 1e6;
    END LOOP;
    RETURN times;
END $$;
"""


def percentiles(conn, expr, arg, n):
    times = conn.execute("SELECT pg_temp.time_calls(%s, %s, %s)", (expr, arg, n)).fetchone()[0]
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.99))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", required=True)
    ap.add_argument("--model-path", help="model directory (default: the server's rsclip.model_path)")
    ap.add_argument("--calls", type=int, default=2000)
    a = ap.parse_args()
    text = "a satellite image of an airport with parked planes"
    results = {}
    with psycopg.connect(a.uri, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS rsclip")
        if a.model_path:
            conn.execute("SELECT set_config('rsclip.model_path', %s, false)", (a.model_path,))
        conn.execute(LOOP)
        conn.execute("SELECT rsclip_encode_text('warm up the session')")
        cases = [
            ("uncached", "SET rsclip.cache = off", max(50, a.calls // 20)),
            ("lru hit", "RESET rsclip.cache", a.calls),
            ("table hit", "SET rsclip.cache_lru_size = 0", a.calls),
        ]
        conn.execute("SELECT rsclip_encode_text(%s)", (text,))  # in the table and the LRU now
        for name, setup, n in cases:
            conn.execute(setup)
            base = percentiles(conn, "length($1)", text, n)
            p50, p99 = percentiles(conn, "rsclip_encode_text($1)", text, n)
            net50, net99 = max(p50 - base[0], 0.0), max(p99 - base[1], 0.0)
            results[name] = {"p50_us": net50, "p99_us": net99, "raw_p50_us": p50, "raw_p99_us": p99,
                             "loop_p50_us": base[0], "loop_p99_us": base[1], "calls": n}
            print(f"{name:10s} ({n:5d} calls)  raw p50 {p50:9.1f} us  p99 {p99:9.1f} us   "
                  f"loop p50 {base[0]:6.1f} p99 {base[1]:6.1f}   net p50 {net50:9.1f} us  p99 {net99:9.1f} us")
        stats = conn.execute("SELECT row_to_json(s) FROM rsclip_cache_stats() s").fetchone()[0]
        print("rsclip_cache_stats():", json.dumps(stats))
    lru, table = results["lru hit"]["p50_us"], results["table hit"]["p50_us"]
    print(f"\nLRU hit p50 {lru:.1f} us (target < 50), table hit p50 {table:.1f} us (target < 1000); "
          f"uncached / LRU hit = {results['uncached']['p50_us'] / max(lru, 1e-3):.0f}x")


if __name__ == "__main__":
    main()
