"""Exact (sequential-scan) search: correct top-k, parallel-safe, query detoasted once, memory flat."""
import threading
import time

import numpy as np
import psycopg
import pytest

from conftest import uri_for

ROWS, DIMS = 20000, 768


@pytest.fixture(scope="module")
def tiles(dbname):
    rng = np.random.default_rng(5)
    data = rng.standard_normal((ROWS, DIMS)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute(f"CREATE TABLE tiles (id int PRIMARY KEY, emb embedding({DIMS}))")
        with c.cursor() as cur, cur.copy("COPY tiles FROM STDIN") as copy:
            for i, row in enumerate(data):
                copy.write_row((i, "[" + ",".join(map(repr, row.tolist())) + "]"))
        c.execute("VACUUM ANALYZE tiles")
    return data


def vec_text(v):
    return "[" + ",".join(map(repr, np.asarray(v, dtype=np.float32).tolist())) + "]"


@pytest.mark.parametrize("op, score", [
    ("<#>", lambda d, q: -(d @ q)),
    ("<->", lambda d, q: np.linalg.norm(d - q, axis=1)),
    ("<=>", lambda d, q: 1 - (d @ q) / (np.linalg.norm(d, axis=1) * np.linalg.norm(q))),
])
def test_top_k_matches_numpy(conn, tiles, op, score):
    rng = np.random.default_rng(9)
    for _ in range(5):
        q = rng.standard_normal(DIMS).astype(np.float32)
        want = np.argsort(score(tiles.astype(np.float64), q.astype(np.float64)), kind="stable")[:10]
        got = [r[0] for r in conn.execute(f"SELECT id FROM tiles ORDER BY emb {op} %s::embedding LIMIT 10", (vec_text(q),))]
        assert got == want.tolist()


def test_parallel_scan_gives_the_same_answer(conn, tiles):
    q = vec_text(tiles[123] + 0.01)
    serial = [r[0] for r in conn.execute("SELECT id FROM tiles ORDER BY emb <#> %s::embedding LIMIT 20", (q,))]
    conn.execute("SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0; SET max_parallel_workers_per_gather = 2")
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT id FROM tiles ORDER BY emb <#> %s::embedding LIMIT 20", (q,)))
    assert "Parallel Seq Scan" in plan
    parallel = [r[0] for r in conn.execute("SELECT id FROM tiles ORDER BY emb <#> %s::embedding LIMIT 20", (q,))]
    conn.execute("RESET ALL")
    assert parallel == serial and serial[0] == 123


def test_rows_are_inline_not_toasted(conn, tiles):
    assert conn.execute("SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'tiles'").fetchone()[0] == 0


def rss_anon_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon")


@pytest.mark.parametrize("storage", ["main", "external"])
def test_backend_memory_stays_flat_over_a_scan(conn, tiles, storage):
    # With `external` storage every row is detoasted into a copy; those copies must be freed
    # row by row, not accumulate over the scan.
    table = f"flat_{storage}"
    conn.execute(f"CREATE TABLE {table} (id int, emb embedding({DIMS}))")
    conn.execute(f"ALTER TABLE {table} ALTER emb SET STORAGE {storage}")
    conn.execute(f"INSERT INTO {table} SELECT id, emb FROM tiles")
    conn.execute(f"INSERT INTO {table} SELECT id, emb FROM {table}")
    conn.execute(f"INSERT INTO {table} SELECT id, emb FROM {table}")  # 80k rows, ~250 MB of vectors
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    base = rss_anon_kb(pid)
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_kb(pid))
            time.sleep(0.005)

    t = threading.Thread(target=sample)
    t.start()
    try:
        for query in (f"SELECT max(emb <#> (SELECT emb FROM tiles WHERE id = 1)) FROM {table}",
                      f"SELECT id FROM {table} ORDER BY emb <=> (SELECT emb FROM tiles WHERE id = 2) LIMIT 10",
                      f"SELECT sum(rsclip_score(emb, emb)) FROM {table}"):
            conn.execute("SET max_parallel_workers_per_gather = 0")
            conn.execute(query).fetchall()
    finally:
        done.set()
        t.join()
    growth_mb = (peak[0] - base) / 1024
    assert growth_mb < 40, f"backend private memory grew by {growth_mb:.0f} MB while scanning 80k rows ({storage})"
