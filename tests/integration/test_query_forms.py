"""The query forms users write reach the rsclip index (planner.rs), and answer as an exact scan.

Each form is planned in a new connection (its first statement is the EXPLAIN), so the rewrite is
shown to be in place from a backend's first query; the cluster preloads the library, as `make
server` does. Without preloading, test_without_preloading shows what the README says.
"""
import re

import numpy as np
import psycopg
import pytest

from clusters import db_uri, fresh_cluster
from conftest import PG_MAJOR, uri_for
from test_encoders import image_bytes

ROWS = 20000
NULL_ROWS = 200
NOLOAD_PORT = 25490 + int(PG_MAJOR) % 10


def vec_text(v):
    return "[" + ",".join(repr(float(x)) for x in v) + "]"


@pytest.fixture(scope="module")
def data(dbname):
    """Two tables of the fixture model's width: `tiles` (emb NOT NULL, with an index per operator
    class) and `loose` (nullable emb, some rows NULL, an inner-product index)."""
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        dims = c.execute("SELECT embedding_dims(rsclip_encode_text('x'))").fetchone()[0]
        rng = np.random.default_rng(12)
        vecs = rng.standard_normal((ROWS, dims)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        c.execute(f"CREATE TABLE tiles (id int PRIMARY KEY, emb embedding({dims}) NOT NULL)")
        c.execute(f"CREATE TABLE loose (id int PRIMARY KEY, emb embedding({dims}))")
        with c.cursor().copy("COPY tiles (id, emb) FROM STDIN") as cp:
            for i, v in enumerate(vecs):
                cp.write_row((i + 1, vec_text(v)))
        c.execute("INSERT INTO loose SELECT id, CASE WHEN id %% %s = 0 THEN NULL ELSE emb END FROM tiles",
                  (ROWS // NULL_ROWS,))
        c.execute("CREATE INDEX tiles_ip ON tiles USING rsclip (emb embedding_ip_ops)")
        c.execute("CREATE INDEX tiles_cos ON tiles USING rsclip (emb embedding_cosine_ops)")
        c.execute("CREATE INDEX tiles_l2 ON tiles USING rsclip (emb embedding_l2_ops)")
        c.execute("CREATE INDEX loose_ip ON loose USING rsclip (emb embedding_ip_ops)")
        c.execute("CREATE TABLE queries (name text PRIMARY KEY, emb embedding)")
        c.execute("INSERT INTO queries VALUES ('airport', rsclip_encode_text('airport')), "
                  "('forest', rsclip_encode_text('forest')), ('tile 7', (SELECT emb FROM tiles WHERE id = 7))")
        c.execute("CREATE VIEW tile_view AS SELECT id, emb FROM tiles")
        c.execute("ANALYZE")
        yield {"dims": dims, "literal": vec_text(vecs[42] * 0.7 + vecs[43] * 0.3)}


def plan_of(conn, sql, params=None):
    return "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + sql, params).fetchall())


def ids(conn, sql, params=None):
    return [r[0] for r in conn.execute(sql, params).fetchall()]


def index_ids(conn, sql, index, params=None):
    """The index's answer with every list probed (then it is the exact one), checking that it
    still comes from the index (probing all lists makes a sequential scan cheaper here)."""
    conn.execute("SET rsclip.probes = 400; SET enable_seqscan = off")
    try:
        assert f"Index Scan using {index}" in plan_of(conn, sql, params)
        return ids(conn, sql, params)
    finally:
        conn.execute("RESET rsclip.probes; RESET enable_seqscan")


def exact_ids(conn, sql, params=None):
    """The same query answered without any index scan (a sequential scan and a sort)."""
    conn.execute("SET enable_indexscan = off; SET enable_bitmapscan = off")
    try:
        return ids(conn, sql, params)
    finally:
        conn.execute("RESET enable_indexscan; RESET enable_bitmapscan")


def assert_uses_index(plan, index):
    assert f"Index Scan using {index}" in plan, plan
    assert not re.search(r"\bSort\b", plan), plan


# (name, query, index it must use). `tiles.emb` is NOT NULL; on the nullable `loose.emb` a score
# key with NULLS LAST or a WHERE that excludes NULLs is `<#>`, one with DESC alone `<#^` (below).
FORMS = [
    ("operator, text", "SELECT id FROM tiles ORDER BY emb <#> rsclip_encode_text('airport') LIMIT 10", "tiles_ip"),
    ("operator, scalar subquery",
     "SELECT id FROM tiles ORDER BY emb <#> (SELECT emb FROM tiles WHERE id = 1) LIMIT 10", "tiles_ip"),
    ("operator, function in FROM (README headline)",
     "SELECT id, rsclip_score(emb, q) FROM tiles, rsclip_encode_text('airport') q ORDER BY emb <#> q LIMIT 10",
     "tiles_ip"),
    ("operator, function in FROM with a column alias",
     "SELECT t.id FROM tiles t CROSS JOIN rsclip_encode_text('airport') AS q(e) ORDER BY t.emb <#> q.e LIMIT 10",
     "tiles_ip"),
    ("operator, CTE",
     "WITH q AS (SELECT rsclip_encode_text('airport') AS e) SELECT id FROM tiles, q ORDER BY emb <#> q.e LIMIT 10",
     "tiles_ip"),
    ("operator, literal (pgvector style)", "SELECT id FROM tiles ORDER BY emb <#> '{literal}' LIMIT 10", "tiles_ip"),
    ("score, text", "SELECT id FROM tiles ORDER BY rsclip_score(emb, rsclip_encode_text('airport')) DESC LIMIT 10",
     "tiles_ip"),
    ("score, arguments swapped",
     "SELECT id FROM tiles ORDER BY rsclip_score(rsclip_encode_text('airport'), emb) DESC LIMIT 10", "tiles_ip"),
    ("score, scalar subquery",
     "SELECT id FROM tiles ORDER BY rsclip_score(emb, (SELECT emb FROM tiles WHERE id = 1)) DESC LIMIT 10",
     "tiles_ip"),
    ("score, output column alias",
     "SELECT id, rsclip_score(emb, rsclip_encode_text('airport')) AS score FROM tiles ORDER BY score DESC LIMIT 10",
     "tiles_ip"),
    ("score, function in FROM",
     "SELECT id, rsclip_score(emb, q) AS score FROM tiles, rsclip_encode_text('airport') q "
     "ORDER BY score DESC LIMIT 10", "tiles_ip"),
    ("score, literal", "SELECT id FROM tiles ORDER BY rsclip_score(emb, '{literal}') DESC LIMIT 10", "tiles_ip"),
    ("score, through a view",
     "SELECT id FROM tile_view ORDER BY rsclip_score(emb, rsclip_encode_text('airport')) DESC LIMIT 10",
     "tiles_ip"),
    ("score, nullable column, NULLS LAST",
     "SELECT id FROM loose ORDER BY rsclip_score(emb, rsclip_encode_text('airport')) DESC NULLS LAST LIMIT 10",
     "loose_ip"),
    ("score, nullable column, WHERE emb IS NOT NULL",
     "SELECT id FROM loose WHERE emb IS NOT NULL ORDER BY rsclip_score(emb, rsclip_encode_text('airport')) DESC "
     "LIMIT 10", "loose_ip"),
    ("cosine operator", "SELECT id FROM tiles ORDER BY emb <=> rsclip_encode_text('airport') LIMIT 10", "tiles_cos"),
    ("cosine distance function",
     "SELECT id FROM tiles ORDER BY embedding_cosine_distance(emb, rsclip_encode_text('airport')) LIMIT 10",
     "tiles_cos"),
    ("l2 operator", "SELECT id FROM tiles ORDER BY emb <-> rsclip_encode_text('airport') LIMIT 10", "tiles_l2"),
    ("l2 distance function",
     "SELECT id, embedding_l2_distance(emb, q) FROM tiles, rsclip_encode_text('airport') q "
     "ORDER BY embedding_l2_distance(emb, q) LIMIT 10", "tiles_l2"),
    ("negative inner product function",
     "SELECT id FROM tiles ORDER BY embedding_negative_inner_product(emb, '{literal}') LIMIT 10", "tiles_ip"),
]


@pytest.mark.parametrize("name,sql,index", FORMS, ids=[f[0] for f in FORMS])
def test_form_uses_the_index_and_answers_exactly(conn, data, name, sql, index):
    sql = sql.replace("{literal}", data["literal"])
    assert_uses_index(plan_of(conn, sql), index)
    got = index_ids(conn, sql, index)
    assert len(got) == 10
    assert got == exact_ids(conn, sql)


def test_image_query_in_from_uses_the_index(conn, data):
    png = image_bytes("exact_64x64.png")
    conn.execute(f"CREATE TEMP TABLE img_tiles (id int, emb embedding({data['dims']}) NOT NULL)")
    conn.execute("INSERT INTO img_tiles SELECT id, emb FROM tiles")
    conn.execute("CREATE INDEX img_ip ON img_tiles USING rsclip (emb embedding_ip_ops)")
    conn.execute("ANALYZE img_tiles")
    for sql in ["SELECT id FROM img_tiles, rsclip_encode_image(%s) q ORDER BY emb <#> q LIMIT 10",
                "SELECT id, rsclip_score(emb, q) s FROM img_tiles, rsclip_encode_image(%s) q ORDER BY s DESC LIMIT 10"]:
        assert_uses_index(plan_of(conn, sql, (png,)), "img_ip")
        assert index_ids(conn, sql, "img_ip", (png,)) == exact_ids(conn, sql, (png,))


@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
def test_prepared_statements_use_the_index(conn, data, mode):
    conn.execute(f"SET plan_cache_mode = {mode}")
    statements = {
        "op": ("embedding", "SELECT id FROM tiles ORDER BY emb <#> $1 LIMIT 10", data["literal"]),
        "score": ("embedding", "SELECT id FROM tiles ORDER BY rsclip_score(emb, $1) DESC LIMIT 10", data["literal"]),
        "by_text": ("text", "SELECT id FROM tiles, rsclip_encode_text($1) q ORDER BY rsclip_score(emb, q) DESC LIMIT 10",
                 "airport"),
    }
    for name, (typ, sql, arg) in statements.items():
        conn.execute(f"PREPARE {name}({typ}) AS {sql}")
        plan = plan_of(conn, f"EXECUTE {name}('{arg}')")
        assert_uses_index(plan, "tiles_ip")
        got = index_ids(conn, f"EXECUTE {name}('{arg}')", "tiles_ip")
        assert got == exact_ids(conn, sql.replace("$1", f"'{arg}'::{typ}"))
        conn.execute(f"DEALLOCATE {name}")
    # The driver's own server-side prepared statement (extended protocol, $1 bound as text).
    sql = "SELECT id FROM tiles ORDER BY rsclip_score(emb, %s::embedding) DESC LIMIT 10"
    conn.execute("SET rsclip.probes = 400")
    for _ in range(6):  # psycopg prepares from the fifth execution on
        got = ids(conn, sql, (data["literal"],))
    assert got == exact_ids(conn, sql, (data["literal"],))


BATCHES = [
    ("stored query vectors",
     "SELECT qs.name, r.id FROM queries qs CROSS JOIN LATERAL "
     "(SELECT id FROM tiles ORDER BY emb <#> qs.emb LIMIT 10) r ORDER BY qs.name"),
    ("texts, score",
     "SELECT t.txt, r.id FROM unnest(ARRAY['airport', 'forest', 'harbor']) t(txt) CROSS JOIN LATERAL "
     "(SELECT id, rsclip_score(emb, rsclip_encode_text(t.txt)) AS s FROM tiles ORDER BY s DESC LIMIT 10) r "
     "ORDER BY t.txt"),
    ("texts, function in FROM inside LATERAL",
     "SELECT t.txt, r.id FROM unnest(ARRAY['airport', 'forest', 'harbor']) t(txt) CROSS JOIN LATERAL "
     "(SELECT id FROM tiles, rsclip_encode_text(t.txt) q ORDER BY rsclip_score(emb, q) DESC LIMIT 10) r "
     "ORDER BY t.txt"),
    # The README's two batch examples, as written there.
    ("README: stored query vectors with their scores",
     "SELECT q.name, t.id, t.score FROM queries q CROSS JOIN LATERAL "
     "(SELECT id, rsclip_score(emb, q.emb) AS score FROM tiles ORDER BY emb <#> q.emb LIMIT 10) t "
     "ORDER BY q.name"),
    ("README: texts, encoder in ORDER BY",
     "SELECT q.txt, t.id FROM unnest(ARRAY['airport', 'forest', 'harbor']) q(txt) CROSS JOIN LATERAL "
     "(SELECT id FROM tiles ORDER BY emb <#> rsclip_encode_text(q.txt) LIMIT 10) t ORDER BY q.txt"),
]


@pytest.mark.parametrize("name,sql", BATCHES, ids=[b[0] for b in BATCHES])
def test_batch_of_queries_uses_the_index_per_query(conn, data, name, sql):
    plan = plan_of(conn, sql)
    assert "Nested Loop" in plan and "Index Scan using tiles_ip" in plan, plan
    assert not re.search(r"Sort\n.*Seq Scan on tiles", plan), plan
    conn.execute("SET rsclip.probes = 400; SET enable_seqscan = off")
    got = conn.execute(sql).fetchall()
    conn.execute("RESET rsclip.probes; RESET enable_seqscan")
    assert len(got) == 30
    # The outer sort groups by query; the rows of each query are compared as a set here (their
    # order is the single-query forms' test).
    assert sorted(got) == sorted(exact_rows(conn, sql))


def exact_rows(conn, sql):
    conn.execute("SET enable_indexscan = off; SET enable_bitmapscan = off")
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.execute("RESET enable_indexscan; RESET enable_bitmapscan")


NULLS_FIRST_FORMS = [
    ("score, output column", "SELECT id, rsclip_score(emb, rsclip_encode_text('airport')) FROM loose "
     "ORDER BY 2 DESC LIMIT {k}"),
    ("score", "SELECT id FROM loose ORDER BY rsclip_score(emb, rsclip_encode_text('airport')) DESC LIMIT {k}"),
    ("score, function in FROM",
     "SELECT id FROM loose, rsclip_encode_text('airport') q ORDER BY rsclip_score(emb, q) DESC LIMIT {k}"),
    ("score, NULLS FIRST spelled out",
     "SELECT id FROM loose ORDER BY rsclip_score(emb, rsclip_encode_text('airport')) DESC NULLS FIRST LIMIT {k}"),
]


@pytest.mark.parametrize("name,sql", NULLS_FIRST_FORMS, ids=[f[0] for f in NULLS_FIRST_FORMS])
def test_nulls_first_on_a_nullable_column_uses_the_index(conn, data, name, sql):
    """DESC puts NULL scores first: the key becomes `<#^` (NULLs at -infinity), which the index
    serves from its chain of NULL rows, then the others in score order, as the sort would."""
    nulls = set(ids(conn, "SELECT id FROM loose WHERE emb IS NULL"))
    assert len(nulls) == NULL_ROWS
    for k in [10, NULL_ROWS + 10]:
        q = sql.format(k=k)
        plan = plan_of(conn, q)
        assert_uses_index(plan, "loose_ip")
        assert "<#^" in plan, plan
        got, exact = index_ids(conn, q, "loose_ip"), exact_ids(conn, q)
        assert len(got) == k
        head = min(k, NULL_ROWS)
        # NULL scores tie: the rows among them may come in any order, in the sort too.
        assert set(got[:head]) <= nulls and set(exact[:head]) <= nulls
        assert got[head:] == exact[head:]


def test_nulls_first_follows_inserts_updates_and_vacuum(conn, data):
    """The backfill case: rows inserted with no embedding yet, then filled in. The index holds
    the NULL rows until they are updated and VACUUM removes their old versions."""
    dims = data["dims"]
    conn.execute(f"CREATE TEMP TABLE fill (id int PRIMARY KEY, emb embedding({dims}))")
    conn.execute("INSERT INTO fill SELECT g, NULL FROM generate_series(1, 3000) g")
    conn.execute("CREATE INDEX fill_ip ON fill USING rsclip (emb embedding_ip_ops)")
    conn.execute("UPDATE fill f SET emb = t.emb FROM tiles t WHERE t.id = f.id AND f.id % 3 <> 0")
    conn.execute("INSERT INTO fill SELECT g, NULL FROM generate_series(3001, 3100) g")
    conn.execute("VACUUM fill")
    conn.execute("ANALYZE fill")
    report = conn.execute("SELECT rsclip_index_check('fill_ip')").fetchone()[0]
    assert report["null_tuples"] == 1000 + 100, report
    assert report["index_tuples"] == report["heap_rows_checked"] == 3100, report
    sql = "SELECT id FROM fill ORDER BY rsclip_score(emb, '{literal}') DESC LIMIT 1110".replace(
        "{literal}", data["literal"])
    # (A third of the table: the planner prefers a sequential scan; index_ids makes it use and
    # checks the index.)
    got, exact = index_ids(conn, sql, "fill_ip"), exact_ids(conn, sql)
    nulls = set(ids(conn, "SELECT id FROM fill WHERE emb IS NULL"))
    assert set(got[:1100]) == nulls == set(exact[:1100])
    assert got[1100:] == exact[1100:]
    # The strict operator leaves NULL rows out, as pgvector's indexes do.
    strict = f"SELECT id FROM fill ORDER BY emb <#> '{data['literal']}' LIMIT 5000"
    assert not nulls & set(index_ids(conn, strict, "fill_ip"))


def test_other_sort_keys_are_left_alone(conn, data):
    # Ascending score (worst first) and a score under GROUP BY have no index order.
    for sql in ["SELECT id FROM tiles ORDER BY rsclip_score(emb, '{literal}') LIMIT 10",
                "SELECT id % 3, max(rsclip_score(emb, '{literal}')) m FROM tiles GROUP BY 1 ORDER BY m DESC"]:
        sql = sql.replace("{literal}", data["literal"])
        assert "tiles_ip" not in plan_of(conn, sql)
        assert ids(conn, sql) == exact_ids(conn, sql)


def test_overflowing_inner_product_raises(conn, data):
    big = "[3e38,3e38]"
    for sql in [f"SELECT rsclip_score('{big}', '{big}')", f"SELECT '{big}'::embedding <#> '{big}'"]:
        with pytest.raises(psycopg.Error) as e:
            conn.execute(sql)
        assert e.value.sqlstate == "22003", e.value


def test_without_preloading(dbname):
    """Without preloading, a backend rewrites once the library is loaded: not its first query
    (unless that one loads it at parse time), every one after; `session_preload_libraries` or
    `LOAD 'rsclip'` put it in place from the first query."""
    c = fresh_cluster("noload", NOLOAD_PORT, ["shared_preload_libraries=''"])
    try:
        with psycopg.connect(db_uri(c), autocommit=True) as s:
            s.execute("CREATE EXTENSION rsclip")
            dims = s.execute("SELECT embedding_dims(rsclip_encode_text('x'))").fetchone()[0]
            s.execute(f"CREATE TABLE t (id int, emb embedding({dims}) NOT NULL)")
            s.execute("INSERT INTO t SELECT g, array_fill(sin(g)::real, ARRAY[%s])::embedding "
                      "FROM generate_series(1, 2000) g", (dims,))
            s.execute("CREATE INDEX t_ip ON t USING rsclip (emb embedding_ip_ops)")
            s.execute("ANALYZE t")
        sql = "SELECT id FROM t ORDER BY rsclip_score(emb, rsclip_encode_text('airport')) DESC LIMIT 10"
        with psycopg.connect(db_uri(c), autocommit=True) as s:
            assert "t_ip" not in plan_of(s, sql)
            assert "Index Scan using t_ip" in plan_of(s, sql)
        with psycopg.connect(db_uri(c), autocommit=True) as s:
            s.execute("LOAD 'rsclip'")
            assert "Index Scan using t_ip" in plan_of(s, sql)
        with psycopg.connect(db_uri(c), autocommit=True) as s:
            s.execute("ALTER DATABASE postgres SET session_preload_libraries = 'rsclip'")
        with psycopg.connect(db_uri(c), autocommit=True) as s:
            assert "Index Scan using t_ip" in plan_of(s, sql)
    finally:
        c.stop("immediate")
