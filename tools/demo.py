#!/usr/bin/env python3
"""The main job, end to end, against the `make server` cluster: images go into a table, are
encoded inside the database, and text and image queries rank them, with scores and timings.

The bundled model (tests/fixtures/tiny-siglip) has RANDOM weights: every step below runs for real
(decoding, Pillow-exact preprocessing, ONNX Runtime, search), but the rankings are meaningless
until you export the real Git-RSCLIP (see the message at the end).
"""
import struct
import sys
import time
import zlib

import numpy as np
import psycopg

TILES = 48


def png(rgb: np.ndarray) -> bytes:
    """A plain 8-bit RGB PNG (no imaging library needed)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def synthetic_tile(kind: str, rng) -> np.ndarray:
    """Crude aerial-looking tiles: striped fields, water, forest blobs, a grid of streets."""
    size = 96
    y, x = np.mgrid[0:size, 0:size].astype(float)
    noise = rng.normal(0, 12, (size, size, 3))
    if kind == "farmland":
        stripes = (np.sin((x * np.cos(a := rng.uniform(0, 3)) + y * np.sin(a)) / rng.uniform(2, 6)) > 0)[..., None]
        img = np.where(stripes, [120, 160, 60], [170, 150, 90])
    elif kind == "water":
        img = np.broadcast_to([40, 80, 150], (size, size, 3)) + 20 * np.sin(x / 7 + y / 11)[..., None]
    elif kind == "forest":
        img = np.broadcast_to([30, 90, 40], (size, size, 3)) + 30 * (np.sin(x / 3) * np.cos(y / 4))[..., None]
    else:  # residential
        grid = ((x % 24 < 3) | (y % 24 < 3))[..., None]
        img = np.where(grid, [90, 90, 90], [190, 120, 100])
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def main(uri: str):
    rng = np.random.default_rng(42)
    kinds = ["farmland", "water", "forest", "residential"]
    # A fresh database each run, so the demo always uses the extension as just installed.
    with psycopg.connect(uri, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS rsclip_demo WITH (FORCE)")
        admin.execute("CREATE DATABASE rsclip_demo")
    uri = uri.rsplit("/", 1)[0] + "/rsclip_demo"
    with psycopg.connect(uri, autocommit=True) as c:
        c.execute("CREATE EXTENSION rsclip")
        info = c.execute("SELECT rsclip_model_info()").fetchone()[0]
        print(f"rsclip on PostgreSQL {c.execute('SHOW server_version').fetchone()[0]}, model {info['model_id']} "
              f"({info['embedding_dim']}-d, {info['image_size']} px) from {info['model_path']}\n")

        c.execute("DROP TABLE IF EXISTS demo_tiles")
        c.execute(f"CREATE TABLE demo_tiles (id bigint PRIMARY KEY, kind text, img bytea, "
                  f"emb embedding({int(info['embedding_dim'])}))")
        with c.cursor() as cur:
            for i in range(TILES):
                kind = kinds[i % len(kinds)]
                cur.execute("INSERT INTO demo_tiles (id, kind, img) VALUES (%s, %s, %s)", (i, kind, png(synthetic_tile(kind, rng))))
        print(f"Stored {TILES} generated 96x96 PNG tiles (farmland, water, forest, residential) in demo_tiles.img")

        t0 = time.perf_counter()
        c.execute("UPDATE demo_tiles SET emb = rsclip_encode_image(img)")
        per_row = time.perf_counter() - t0
        t0 = time.perf_counter()
        c.execute("""UPDATE demo_tiles d SET emb = e.emb
                       FROM (SELECT unnest(array_agg(id ORDER BY id)) AS id,
                                    unnest(rsclip_encode_images(array_agg(img ORDER BY id))) AS emb
                               FROM demo_tiles) e
                      WHERE d.id = e.id""")
        batched = time.perf_counter() - t0
        c.execute("UPDATE demo_tiles SET emb = NULL")
        notices = []
        handler = lambda d: notices.append(d.message_primary)  # noqa: E731
        c.add_notice_handler(handler)
        t0 = time.perf_counter()
        c.execute("CALL rsclip_backfill('demo_tiles', 'img', 'emb')")  # batched, committed, resumable
        backfill = time.perf_counter() - t0
        c.remove_notice_handler(handler)
        print(f"Encoded them in the database: per-row UPDATE {per_row * 1e3:.0f} ms, "
              f"batched rsclip_encode_images {batched * 1e3:.0f} ms, "
              f"CALL rsclip_backfill {backfill * 1e3:.0f} ms")
        for n in notices:
            if n.startswith("rsclip_backfill:"):
                print(f"  {n}")
        c.execute("CREATE INDEX demo_tiles_emb ON demo_tiles USING rsclip (emb embedding_ip_ops)")
        print("Indexed them: CREATE INDEX demo_tiles_emb ON demo_tiles USING rsclip (emb embedding_ip_ops)")
        # 48 rows fit one page, so the planner rightly prefers a seq scan here; switching it off
        # shows the plan a real table gets.
        c.execute("SET enable_seqscan = off")
        plan = c.execute("""EXPLAIN (COSTS OFF)
                            SELECT id FROM demo_tiles, rsclip_encode_text('flooded farmland') q
                             ORDER BY emb <#> q LIMIT 5""").fetchall()
        c.execute("RESET enable_seqscan")
        print("Plan of the text query below (enable_seqscan = off, since the demo table is tiny):")
        for (line,) in plan:
            print(f"  {line}")
        print()

        for query in ("flooded farmland", "airport with parked planes"):
            t0 = time.perf_counter()
            rows = c.execute("""SELECT id, kind, rsclip_score(emb, q) AS score, rsclip_probability(emb, q) AS p
                                  FROM demo_tiles, rsclip_encode_text(%s) q
                                 ORDER BY emb <#> q LIMIT 5""", (query,)).fetchall()
            ms = (time.perf_counter() - t0) * 1e3
            print(f"Text query {query!r} ({ms:.1f} ms including text encoding):")
            print(f"  {'id':>4}  {'kind':<12} {'score':>8} {'probability':>12}")
            for rid, kind, score, p in rows:
                print(f"  {rid:>4}  {kind:<12} {score:>8.4f} {p:>12.3e}")
            print()

        t0 = time.perf_counter()
        rows = c.execute("""SELECT id, kind, rsclip_score(emb, (SELECT emb FROM demo_tiles WHERE id = 1)) AS score
                              FROM demo_tiles
                             ORDER BY emb <#> (SELECT emb FROM demo_tiles WHERE id = 1) LIMIT 5""").fetchall()
        ms = (time.perf_counter() - t0) * 1e3
        print(f"Tiles most like tile 1 (a water tile), image-to-image ({ms:.1f} ms):")
        for rid, kind, score in rows:
            print(f"  {rid:>4}  {kind:<12} {score:>8.4f}")
        info = c.execute("SELECT rsclip_model_info()").fetchone()[0]
        if info["inference"] == "worker":
            # make server: the model runs once per server, in the shared inference workers
            workers = c.execute("SELECT count(*), sum(requests), sum(batches), sum(rows), max(max_batch_rows) "
                                "FROM rsclip_inference_stats WHERE running").fetchone()
            print(f"\nInference: {workers[0]} shared inference worker(s) hold the model for every "
                  f"connection (rsclip.inference = worker); {workers[1]} requests ran as {workers[2]} "
                  f"batches ({workers[3]} rows, largest {workers[4]}); this backend loaded no session")
        else:
            print(f"\nSessions: provider {info['provider']}, created in {info['session_create_ms']} ms, "
                  f"load counts {info['load_counts']} (reused across calls)")

    print("""
NOTE: the bundled model has random weights, so these rankings are meaningless. For real
retrieval, export Git-RSCLIP where the Hugging Face hub is reachable and point rsclip at it:

    pip install -r tools/requirements-export.txt
    python tools/export_model.py --model lcybuaa/Git-RSCLIP --out /srv/models/git-rsclip
    ALTER SYSTEM SET rsclip.model_path = '/srv/models/git-rsclip'; SELECT pg_reload_conf();""")


if __name__ == "__main__":
    main(sys.argv[1])
