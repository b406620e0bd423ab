"""pg_dump / pg_restore of a table with embeddings, typmods and embedding indexes."""
import subprocess
import uuid

import psycopg

from conftest import URI, pg_bindir, uri_for


def test_dump_and_restore_preserves_everything(dbname, tmp_path):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute("CREATE TABLE tiles (id bigint PRIMARY KEY, emb embedding(768), note text)")
        c.execute("""INSERT INTO tiles SELECT i, rsclip_normalize((SELECT array_agg(random() - 0.5)::real[]
                     FROM generate_series(1, 768) WHERE i > 0)::embedding), 'tile ' || i FROM generate_series(1, 500) i""")
        c.execute("INSERT INTO tiles VALUES (0, NULL, 'no embedding yet')")
        c.execute("CREATE INDEX ON tiles USING hash (emb)")
        c.execute("CREATE INDEX tiles_ip ON tiles USING rsclip (emb embedding_ip_ops) WITH (lists = 10)")
        c.execute("CREATE INDEX tiles_cos ON tiles USING rsclip (emb embedding_cosine_ops)")
        c.execute("CREATE TABLE small (v embedding(3) UNIQUE)")
        c.execute("INSERT INTO small VALUES ('[1,2,3]'), ('[-0,1e-45,3.4028235e38]')")
        before = c.execute("SELECT md5(string_agg(id || ':' || coalesce(emb::text, 'null'), ',' ORDER BY id)) FROM tiles").fetchone()[0]

    dump = tmp_path / "tiles.dump"
    bindir = pg_bindir()
    subprocess.run([str(bindir / "pg_dump"), "-Fc", "-f", str(dump), "-d", uri_for(dbname)], check=True)
    target = f"restore_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(URI, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{target}"')
    try:
        subprocess.run([str(bindir / "pg_restore"), "--exit-on-error", "-d", uri_for(target), str(dump)], check=True)
        with psycopg.connect(uri_for(target), autocommit=True) as c:
            after = c.execute("SELECT md5(string_agg(id || ':' || coalesce(emb::text, 'null'), ',' ORDER BY id)) FROM tiles").fetchone()[0]
            assert after == before
            assert c.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'tiles'::regclass AND attname = 'emb'").fetchone()[0] == "embedding(768)"
            assert c.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'tiles'").fetchone()[0] == 4
            # the rsclip indexes come back rebuilt, with their options, and serve searches
            assert c.execute("SELECT reloptions FROM pg_class WHERE relname = 'tiles_ip'").fetchone()[0] == ["lists=10"]
            for index in ("tiles_ip", "tiles_cos"):
                report = c.execute("SELECT rsclip_index_check(%s)", (index,)).fetchone()[0]
                # 500 rows and the one without an embedding (kept for NULLS FIRST)
                assert report["index_tuples"] == 501 and report["null_tuples"] == 1, report
            c.execute("SET enable_seqscan = off")
            c.execute("SET rsclip.probes = 10")
            q = "(SELECT emb FROM tiles WHERE id = 42)"
            plan = "\n".join(r[0] for r in c.execute(f"EXPLAIN (COSTS OFF) SELECT id FROM tiles ORDER BY emb <#> {q} LIMIT 5"))
            assert "Index Scan using tiles_ip" in plan, plan
            assert c.execute(f"SELECT id FROM tiles ORDER BY emb <#> {q} LIMIT 1").fetchone()[0] == 42
            assert c.execute(f"SELECT id FROM tiles ORDER BY emb <=> {q} LIMIT 1").fetchone()[0] == 42
            c.execute("RESET enable_seqscan")
            assert c.execute("SELECT string_agg(v::text, ' ' ORDER BY v) FROM small").fetchone()[0] == "[-0,1e-45,3.4028235e+38] [1,2,3]"
            assert c.execute("SELECT count(*) FROM tiles WHERE emb = (SELECT emb FROM tiles WHERE id = 7)").fetchone()[0] == 1
            top = c.execute("SELECT id FROM tiles WHERE emb IS NOT NULL ORDER BY emb <#> (SELECT emb FROM tiles WHERE id = 42) LIMIT 1").fetchone()[0]
            assert top == 42
    finally:
        with psycopg.connect(URI, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
