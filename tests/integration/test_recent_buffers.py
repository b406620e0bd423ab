"""Index scans pin the buffer a page was last found in (ReadRecentBuffer) instead of looking it
up in the buffer-mapping table. The hint is checked against the buffer's tag: after the index's
buffers are evicted and reused for other pages, or the index is rebuilt, scans must still read
the right pages; and the per-index statistics must still count every page read."""
import random

import pytest

from conftest import PG_MAJOR

DIMS = 32
ROWS = 3000
QUERY = "SELECT id FROM rb_tiles ORDER BY emb <#> %s::embedding LIMIT 10"


def vec(rng):
    v = [rng.gauss(0, 1) for _ in range(DIMS)]
    return "[" + ",".join(f"{x:.6f}" for x in v) + "]"


@pytest.fixture(scope="module")
def queries():
    rng = random.Random(7)
    return [vec(rng) for _ in range(5)]


@pytest.fixture
def table(conn):
    rng = random.Random(3)
    conn.execute("DROP TABLE IF EXISTS rb_tiles, rb_other")
    conn.execute(f"CREATE TABLE rb_tiles (id int PRIMARY KEY, emb embedding({DIMS}))")
    with conn.cursor().copy("COPY rb_tiles FROM STDIN") as cp:
        for i in range(ROWS):
            cp.write_row((i, vec(rng)))
    conn.execute("CREATE INDEX rb_idx ON rb_tiles USING rsclip (emb embedding_ip_ops) WITH (lists = 10)")
    conn.execute("SET rsclip.probes = 10")  # every list: results are exact
    conn.execute("SET enable_seqscan = off")
    return conn


def answers(conn, queries):
    return [[r[0] for r in conn.execute(QUERY, (q,)).fetchall()] for q in queries]


def exact(conn, queries):
    conn.execute("SET enable_indexscan = off")
    conn.execute("SET enable_seqscan = on")
    try:
        return answers(conn, queries)
    finally:
        conn.execute("RESET enable_indexscan")
        conn.execute("SET enable_seqscan = off")


def index_buffers(conn):
    return [r[0] for r in conn.execute(
        "SELECT bufferid FROM pg_buffercache WHERE relfilenode = pg_relation_filenode('rb_idx') "
        "AND reldatabase = (SELECT oid FROM pg_database WHERE datname = current_database())").fetchall()]


@pytest.mark.skipif(PG_MAJOR != "18", reason="pg_buffercache_evict needs PostgreSQL 17 or later")
def test_scans_stay_right_when_the_index_buffers_are_reused(table, queries):
    conn = table
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_buffercache")
    want = exact(conn, queries)
    assert answers(conn, queries) == want  # remembers the buffers
    used = index_buffers(conn)
    assert used
    evicted = conn.execute(
        "SELECT count(*) FILTER (WHERE e.buffer_evicted) FROM pg_buffercache b, "
        "LATERAL pg_buffercache_evict(b.bufferid) e "
        "WHERE b.relfilenode = pg_relation_filenode('rb_idx')").fetchone()[0]
    assert evicted == len(used)
    # Other pages take the freed buffers (a table larger than the index's page count).
    conn.execute("CREATE TABLE rb_other AS SELECT g AS id, repeat('x', 500) AS pad FROM generate_series(1, 20000) g")
    conn.execute("SELECT count(*) FROM rb_other")
    reused = conn.execute(
        "SELECT count(*) FROM pg_buffercache WHERE bufferid = ANY(%s) "
        "AND relfilenode IS DISTINCT FROM pg_relation_filenode('rb_idx')", (used,)).fetchone()[0]
    assert reused > 0, "no remembered buffer was reused: the test would not exercise a stale hint"
    assert answers(conn, queries) == want
    # Rebuilt under a new file: the old hints name another file.
    conn.execute("REINDEX INDEX rb_idx")
    assert answers(conn, queries) == want


def test_statistics_count_remembered_pages(table, queries, dbname):
    """A fresh backend reads the pages of new queries through the buffer table (Postgres counts
    them); the same queries again find them through the remembered buffers: the counts must
    agree. One query first, so that both rounds find the centroids in the backend's cache."""
    import psycopg
    from conftest import uri_for

    with psycopg.connect(uri_for(dbname), autocommit=True) as fresh:
        fresh.execute("SET rsclip.probes = 10")
        fresh.execute("SET enable_seqscan = off")

        def index_pages():
            fresh.execute("SELECT pg_stat_force_next_flush()")
            fresh.execute("SELECT 1")  # the pending counts are flushed as this one ends
            return fresh.execute(
                "SELECT idx_blks_hit + idx_blks_read FROM pg_statio_user_indexes WHERE indexrelname = 'rb_idx'"
            ).fetchone()[0]

        answers(fresh, queries[:1])
        start = index_pages()
        first = answers(fresh, queries[1:])
        looked_up = index_pages() - start
        again = answers(fresh, queries[1:])
        remembered = index_pages() - start - looked_up
        assert first == again
        assert looked_up > len(queries), looked_up
        assert remembered == looked_up, (looked_up, remembered)
