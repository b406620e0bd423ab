#!/usr/bin/env python3
"""The main job, end to end, against the `make server` cluster: create the extension, fill a
table of tile embeddings, and run exact top-k searches, printing what a user wants to see.

For now the embeddings are random unit vectors (the encoder issue adds images and text).
"""
import sys
import time

import psycopg

ROWS, DIMS = 20000, 768


def main(uri: str):
    with psycopg.connect(uri, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS rsclip")
        version = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'rsclip'").fetchone()[0]
        server = c.execute("SHOW server_version").fetchone()[0]
        print(f"rsclip {version} on PostgreSQL {server}\n")

        print("SELECT '[3,4]'::embedding <#> '[1,0]';")
        print("  ->", c.execute("SELECT '[3,4]'::embedding <#> '[1,0]'").fetchone()[0], "\n")

        c.execute("DROP TABLE IF EXISTS demo_tiles")
        c.execute(f"CREATE TABLE demo_tiles (id bigint PRIMARY KEY, emb embedding({DIMS}))")
        t0 = time.perf_counter()
        c.execute(f"""INSERT INTO demo_tiles
                      SELECT i, rsclip_normalize((SELECT array_agg(random() - 0.5)::real[]
                                                  FROM generate_series(1, {DIMS}) WHERE i > 0)::embedding)
                        FROM generate_series(1, {ROWS}) i""")
        c.execute("VACUUM ANALYZE demo_tiles")
        heap = c.execute("SELECT pg_size_pretty(pg_relation_size('demo_tiles'))").fetchone()[0]
        toast = c.execute("SELECT pg_size_pretty(pg_relation_size(reltoastrelid)) FROM pg_class"
                          " WHERE relname = 'demo_tiles'").fetchone()[0]
        print(f"Filled demo_tiles with {ROWS} random unit embeddings of {DIMS} dimensions in "
              f"{time.perf_counter() - t0:.1f}s (heap {heap}, TOAST {toast}: vectors are stored inline)\n")

        query = "SELECT id, rsclip_score(emb, q) AS score FROM demo_tiles, (SELECT emb AS q FROM demo_tiles WHERE id = 42) q ORDER BY emb <#> q LIMIT 5"
        print("Tiles most like tile 42 (exact search, inner product):")
        print(f"  {query}")
        t0 = time.perf_counter()
        rows = c.execute(query).fetchall()
        ms = (time.perf_counter() - t0) * 1e3
        print(f"  {'id':>8}  {'score':>8}")
        for rid, score in rows:
            print(f"  {rid:>8}  {score:>8.4f}")
        print(f"  ({ms:.1f} ms over {ROWS} rows)\n")

        print("Distances to a literal query, three ways:")
        q = "(SELECT rsclip_normalize(array_agg(sin(i))::real[]::embedding) FROM generate_series(1, 768) i)"
        for op, name in (("<#>", "negative inner product"), ("<=>", "cosine distance"), ("<->", "Euclidean distance")):
            rid, d = c.execute(f"SELECT id, emb {op} {q} FROM demo_tiles ORDER BY emb {op} {q} LIMIT 1").fetchone()
            print(f"  {op} {name:<24} best tile {rid:>6}  distance {d:.4f}")
        print()
        plan = [r[0] for r in c.execute(f"EXPLAIN SELECT id FROM demo_tiles ORDER BY emb <#> {q} LIMIT 10")]
        print("Plan (exact search: top-N heapsort over a sequential scan):")
        for line in plan:
            print("  " + line)
        print("\nNext: the encoder issue adds rsclip_encode_text()/rsclip_encode_image(); the index issue adds USING rsclip.")


if __name__ == "__main__":
    main(sys.argv[1])
