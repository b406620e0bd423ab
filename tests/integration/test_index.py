"""The rsclip index against a real server: recall at default settings (after build, inserts,
vacuum, with duplicates, 768 and 1024 dimensions), filtered iterative scans, concurrent inserts
and searches, and rsclip_index_check. Ground truth is an exact sequential scan."""
import threading
import time

import numpy as np
import psycopg
import pytest

from conftest import uri_for
from index_data import copy_rows, gaussian_mixture, recall, vec_text

OPS = {"ip": ("embedding_ip_ops", "<#>"), "cosine": ("embedding_cosine_ops", "<=>"), "l2": ("embedding_l2_ops", "<->")}


def top_ids(conn, table, op, query, k=10, index=True, where=""):
    conn.execute(f"SET enable_indexscan = {'on' if index else 'off'}")
    conn.execute(f"SET enable_seqscan = {'off' if index else 'on'}")
    conn.execute("SET enable_bitmapscan = off")
    rows = conn.execute(f"SELECT id FROM {table} {where} ORDER BY emb {op} %s::embedding LIMIT {k}",
                        (vec_text(query),)).fetchall()
    conn.execute("RESET enable_indexscan; RESET enable_seqscan; RESET enable_bitmapscan")
    return [r[0] for r in rows]


def mean_recall(conn, table, op, queries, where=""):
    scores = [recall(top_ids(conn, table, op, q, where=where), top_ids(conn, table, op, q, index=False, where=where))
              for q in queries]
    return float(np.mean(scores))


def uses_index(conn, table, op, query):
    plan = "\n".join(r[0] for r in conn.execute(
        f"EXPLAIN SELECT id FROM {table} ORDER BY emb {op} %s::embedding LIMIT 10", (vec_text(query),)))
    return f"Index Scan using {table}_" in plan


def check(conn, index):
    return conn.execute("SELECT rsclip_index_check(%s)", (index,)).fetchone()[0]


@pytest.mark.parametrize("dims", [768, 1024])
def test_recall_after_build_inserts_vacuum_and_duplicates(conn, dims):
    table = f"rc{dims}"
    n = 20000
    data = gaussian_mixture(n + 5000 + 50, dims, seed=dims)
    base, extra, queries = data[:n], data[n:n + 5000], data[n + 5000:]
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, emb embedding({dims}))")
    copy_rows(conn, table, np.arange(1, n + 1), base)
    conn.execute(f"CREATE INDEX {table}_ip ON {table} USING rsclip (emb embedding_ip_ops)")
    conn.execute(f"ANALYZE {table}")
    assert uses_index(conn, table, "<#>", queries[0]), "planner must choose the index for ORDER BY ... LIMIT"
    r = mean_recall(conn, table, "<#>", queries)
    print(f"{dims}-d recall@10 after build: {r:.3f}")
    assert r >= 0.95

    copy_rows(conn, table, np.arange(n + 1, n + 5001), extra)
    r = mean_recall(conn, table, "<#>", queries)
    print(f"{dims}-d recall@10 after 5000 inserts: {r:.3f}")
    assert r >= 0.95

    conn.execute(f"DELETE FROM {table} WHERE id % 2 = 0")
    conn.execute(f"VACUUM {table}")
    report = check(conn, f"{table}_ip")
    assert report["index_tuples"] == report["heap_rows_checked"] == (n + 5000) // 2
    r = mean_recall(conn, table, "<#>", queries)
    print(f"{dims}-d recall@10 after deleting half + VACUUM: {r:.3f}")
    assert r >= 0.95

    # 30 exact copies of one row: the 10 nearest to it are copies at distance -1.
    dup = base[1]
    copy_rows(conn, table, np.arange(900001, 900031), np.repeat(dup[None, :], 30, axis=0))
    got = top_ids(conn, table, "<#>", dup)
    assert len(got) == 10 and all(i >= 900001 or i == 2 for i in got), got
    r = mean_recall(conn, table, "<#>", queries)
    assert r >= 0.95
    check(conn, f"{table}_ip")


def test_check_reports_refinements_and_list_imbalance(conn):
    """rsclip_index_check counts refinement pages and tuples and reports how balanced the lists
    are. Inserts from a new distribution (here: one far-off cluster) start new lists instead of
    piling into the lists nearest to it: no chain passes the reported bound, the report counts
    the lists added, and search finds the new rows."""
    dims, n = 128, 8000
    rng = np.random.default_rng(77)
    base = gaussian_mixture(n, dims, clusters=40, seed=77)
    conn.execute(f"CREATE TABLE drift (id int PRIMARY KEY, emb embedding({dims}))")
    copy_rows(conn, "drift", np.arange(1, n + 1), base)
    conn.execute("CREATE INDEX drift_ip ON drift USING rsclip (emb embedding_ip_ops)")
    before = check(conn, "drift_ip")
    assert before["index_tuples"] == n
    assert before["refine_pages"] > 0
    assert before["missing_refinements"] == 0 and before["unreferenced_refinements"] == 0
    assert before["mean_list_rows"] == pytest.approx(n / before["lists"], rel=0.01)
    assert 1.0 <= before["list_imbalance"] < 4.0, before
    assert before["built_lists"] == before["lists"] and before["lists_added"] == 0
    assert before["longest_chain"] <= before["list_page_limit"], before
    centre = rng.standard_normal(dims).astype(np.float32)
    shifted = centre + 0.05 * rng.standard_normal((4000, dims)).astype(np.float32)
    shifted /= np.linalg.norm(shifted, axis=1, keepdims=True)
    copy_rows(conn, "drift", np.arange(n + 1, n + 4001), shifted)
    after = check(conn, "drift_ip")
    print("before", before, "after", after)
    assert after["index_tuples"] == n + 4000
    assert after["missing_refinements"] == 0
    assert after["lists_added"] >= 1 and after["lists"] == after["built_lists"] + after["lists_added"]
    assert after["built_lists"] == before["built_lists"]
    # 4000 rows in one list would be a chain of 26 pages; the bound holds them to a few.
    assert after["longest_chain"] <= after["list_page_limit"] < 26, after
    r = mean_recall(conn, "drift", "<#>", shifted[:20])
    assert r >= 0.95, r
    r = mean_recall(conn, "drift", "<#>", base[:20])
    assert r >= 0.95, r


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_recall_other_metrics(conn, metric):
    ops, op = OPS[metric]
    table = f"m_{metric}"
    data = gaussian_mixture(10050, 768, seed=7)
    if metric == "l2":
        data = data * 3 + 0.5  # not unit length, off-centre: L2 differs from inner product
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, emb embedding(768))")
    copy_rows(conn, table, np.arange(1, 10001), data[:10000])
    conn.execute(f"CREATE INDEX {table}_ix ON {table} USING rsclip (emb {ops})")
    r = mean_recall(conn, table, op, data[10000:])
    print(f"{metric} recall@10: {r:.3f}")
    assert r >= 0.95


def test_filtered_query_finds_k_rows(conn):
    table = "filt"
    data = gaussian_mixture(20010, 256, seed=3)
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, emb embedding(256))")
    copy_rows(conn, table, np.arange(1, 20001), data[:20000])
    conn.execute(f"CREATE INDEX {table}_ix ON {table} USING rsclip (emb embedding_ip_ops)")
    for q in data[20000:]:
        got = top_ids(conn, table, "<#>", q, where="WHERE id %% 200 = 0")  # 100 qualifying rows
        assert len(got) == 10 and all(i % 200 == 0 for i in got), got
    # Bounded by rsclip.max_probes: one list cannot hold 10 of those 100 rows.
    conn.execute("SET rsclip.probes = 1")
    conn.execute("SET rsclip.max_probes = 1")
    fewer = top_ids(conn, table, "<#>", data[20000], where="WHERE id %% 200 = 0")
    assert len(fewer) < 10
    conn.execute("RESET rsclip.probes; RESET rsclip.max_probes")


def test_more_probes_raise_recall_and_settings_are_bounded(conn):
    table = "probes"
    data = gaussian_mixture(20020, 128, clusters=200, spread=0.9, seed=11)
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, emb embedding(128))")
    copy_rows(conn, table, np.arange(1, 20001), data[:20000])
    conn.execute(f"CREATE INDEX {table}_ix ON {table} USING rsclip (emb embedding_ip_ops) WITH (lists = 40)")
    scores = []
    for p in (1, 4, 40):
        conn.execute(f"SET rsclip.probes = {p}")
        scores.append(mean_recall(conn, table, "<#>", data[20000:]))
    conn.execute("RESET rsclip.probes")
    assert scores[0] <= scores[1] <= scores[2] and scores[2] == 1.0, scores
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SET rsclip.probes = -1")
    assert check(conn, f"{table}_ix")["lists"] == 40


def test_concurrent_inserts_and_searches(dbname, conn):
    table = "conc"
    data = gaussian_mixture(12000, 128, seed=5)
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, emb embedding(128))")
    copy_rows(conn, table, np.arange(1, 2001), data[:2000])
    conn.execute(f"CREATE INDEX {table}_ix ON {table} USING rsclip (emb embedding_ip_ops)")
    errors = []
    stop = time.time() + 8

    def inserter(k):
        try:
            with psycopg.connect(uri_for(dbname), autocommit=True) as c:
                i = 2001 + k
                while time.time() < stop and i <= 12000:
                    c.execute(f"INSERT INTO {table} VALUES (%s, %s::embedding)", (i, vec_text(data[i - 1])))
                    i += 2
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    def searcher(k):
        try:
            with psycopg.connect(uri_for(dbname), autocommit=True) as c:
                c.execute("SET enable_seqscan = off")
                j = k
                while time.time() < stop:
                    got = c.execute(f"SELECT id FROM {table} ORDER BY emb <#> %s::embedding LIMIT 10",
                                    (vec_text(data[j % 2000]),)).fetchall()
                    assert len(got) == 10
                    j += 7
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=inserter, args=(k,)) for k in range(2)] + \
              [threading.Thread(target=searcher, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    rows = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    assert rows > 2100, "inserters made progress"
    report = check(conn, f"{table}_ix")
    assert report["index_tuples"] == rows == report["heap_rows_checked"]


def test_create_index_concurrently_and_reindex_concurrently(conn):
    table = "cic"
    data = gaussian_mixture(8050, 128, seed=9)
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, emb embedding(128))")
    copy_rows(conn, table, np.arange(1, 8001), data[:8000])
    conn.execute(f"CREATE INDEX CONCURRENTLY {table}_ix ON {table} USING rsclip (emb embedding_ip_ops)")
    assert conn.execute(f"SELECT indisvalid FROM pg_index WHERE indexrelid = '{table}_ix'::regclass").fetchone()[0]
    assert check(conn, f"{table}_ix")["index_tuples"] == 8000
    assert mean_recall(conn, table, "<#>", data[8000:]) >= 0.95
    conn.execute(f"REINDEX INDEX CONCURRENTLY {table}_ix")
    assert check(conn, f"{table}_ix")["index_tuples"] == 8000
    assert mean_recall(conn, table, "<#>", data[8000:]) >= 0.95
