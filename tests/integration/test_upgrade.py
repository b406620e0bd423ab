"""ALTER EXTENSION rsclip UPDATE from the 0.1.0 that shipped (sql/versions/rsclip--0.1.0.sql):
data, index and functions survive, and the upgraded catalog equals a fresh install's."""
import uuid

import psycopg
import pytest

from conftest import URI, uri_for

CURRENT = "0.2.0"


@pytest.fixture
def database():
    names = []

    def make():
        name = f"upgrade_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(URI, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        return name
    yield make
    with psycopg.connect(URI, autocommit=True) as admin:
        for name in names:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def extension_catalog(c):
    """Every member object of the extension, described by its definition (not by OID)."""
    rows = c.execute("""
        SELECT pg_describe_object(d.classid, d.objid, d.objsubid),
               CASE d.classid
                   WHEN 'pg_proc'::regclass THEN pg_get_functiondef(d.objid)
                       || coalesce((SELECT array_agg(a::text ORDER BY a::text)::text
                                    FROM pg_proc p, unnest(p.proacl) a WHERE p.oid = d.objid), 'default acl')
                   WHEN 'pg_class'::regclass THEN
                       (SELECT coalesce(relacl::text, 'default acl') || ' ' || relkind::text || ' '
                               || coalesce(pg_get_viewdef(d.objid), '')
                               || coalesce((SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod)
                                                || ' ' || attstorage::text, ', ' ORDER BY attnum)
                                            FROM pg_attribute WHERE attrelid = d.objid AND attnum > 0
                                              AND NOT attisdropped), '')
                        FROM pg_class WHERE oid = d.objid)
                   WHEN 'pg_operator'::regclass THEN
                       (SELECT oprcode::text || ' ' || oprcom::regoperator::text || ' ' || oprnegate::regoperator::text
                        FROM pg_operator WHERE oid = d.objid)
                   WHEN 'pg_type'::regclass THEN
                       (SELECT typinput::text || typoutput::text || typreceive::text || typsend::text
                               || typmodin::text || typmodout::text || typstorage::text || typalign::text
                        FROM pg_type WHERE oid = d.objid)
                   ELSE ''
               END
        FROM pg_depend d JOIN pg_extension e ON d.refobjid = e.oid AND d.refclassid = 'pg_extension'::regclass
        WHERE e.extname = 'rsclip' AND d.deptype = 'e'
        ORDER BY 1""").fetchall()
    return dict(rows)


def test_update_from_0_1_0_keeps_data_index_and_functions(database):
    old = database()
    with psycopg.connect(uri_for(old), autocommit=True) as c:
        c.execute("CREATE EXTENSION rsclip VERSION '0.1.0'")
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'rsclip'").fetchone()[0] == "0.1.0"
        c.execute("CREATE TABLE tiles (id int PRIMARY KEY, emb embedding(16))")
        c.execute("""INSERT INTO tiles SELECT i, rsclip_normalize(array(SELECT sin(i * j + j) FROM generate_series(1, 16) j)::real[]::embedding)
                     FROM generate_series(1, 2000) i""")
        c.execute("CREATE INDEX tiles_ip ON tiles USING rsclip (emb embedding_ip_ops) WITH (lists = 20)")
        c.execute("SELECT rsclip_encode_text('harbour before the upgrade')")
        before = c.execute("SELECT md5(string_agg(id || emb::text, ',' ORDER BY id)) FROM tiles").fetchone()[0]

        c.execute("ALTER EXTENSION rsclip UPDATE")
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'rsclip'").fetchone()[0] == CURRENT

        # data
        assert c.execute("SELECT md5(string_agg(id || emb::text, ',' ORDER BY id)) FROM tiles").fetchone()[0] == before
        # the index, built under 0.1.0: still valid, used, and right
        report = c.execute("SELECT rsclip_index_check('tiles_ip')").fetchone()[0]  # raises if damaged
        assert report["index_tuples"] == 2000, report
        c.execute("SET enable_seqscan = off")
        q = "(SELECT emb FROM tiles WHERE id = 77)"
        plan = "\n".join(r[0] for r in c.execute(f"EXPLAIN (COSTS OFF) SELECT id FROM tiles ORDER BY emb <#> {q} LIMIT 10"))
        assert "Index Scan using tiles_ip" in plan, plan
        c.execute("SET rsclip.probes = 20")
        got = [r[0] for r in c.execute(f"SELECT id FROM tiles ORDER BY emb <#> {q} LIMIT 10")]
        c.execute("RESET enable_seqscan")
        c.execute("SET enable_indexscan = off")
        exact = [r[0] for r in c.execute(f"SELECT id FROM tiles ORDER BY emb <#> {q}, id LIMIT 10")]
        assert set(got) == set(exact)
        c.execute("RESET enable_indexscan")
        # inserts into the old index, and the functions the upgrade replaced
        c.execute("INSERT INTO tiles VALUES (5000, rsclip_normalize('[1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1]'))")
        assert c.execute("SELECT id FROM tiles ORDER BY emb <#> '[1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1]' LIMIT 1").fetchone()[0] == 5000
        assert "LOCK TABLE" in c.execute("SELECT prosrc FROM pg_proc WHERE proname = 'rsclip_cache_prune'").fetchone()[0]
        assert c.execute("SELECT rsclip_cache_prune(max_rows => 0)").fetchone()[0] >= 1
        assert c.execute("SELECT rsclip_encode_text('harbour after the upgrade') IS NOT NULL").fetchone()[0]
        upgraded = extension_catalog(c)

    fresh = database()
    with psycopg.connect(uri_for(fresh), autocommit=True) as c:
        c.execute("CREATE EXTENSION rsclip")
        installed = extension_catalog(c)
    missing = sorted(set(installed) - set(upgraded))
    extra = sorted(set(upgraded) - set(installed))
    differ = sorted(k for k in set(installed) & set(upgraded) if installed[k] != upgraded[k])
    assert not (missing or extra or differ), (
        f"the upgrade script misses what a fresh {CURRENT} has: missing {missing}, extra {extra}, differing {differ}")


def test_every_shipped_version_has_an_update_path_to_the_current_one():
    with psycopg.connect(URI, autocommit=True) as c:
        versions = {r[0] for r in c.execute("SELECT version FROM pg_available_extension_versions WHERE name = 'rsclip'")}
        assert {"0.1.0", CURRENT} <= versions, versions
        for v in versions - {CURRENT}:
            path = c.execute("SELECT path FROM pg_extension_update_paths('rsclip') WHERE source = %s AND target = %s",
                             (v, CURRENT)).fetchone()
            assert path and path[0], f"no update path from {v} to {CURRENT}"
