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
            assert c.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'tiles'").fetchone()[0] == 2
            assert c.execute("SELECT string_agg(v::text, ' ' ORDER BY v) FROM small").fetchone()[0] == "[-0,1e-45,3.4028235e+38] [1,2,3]"
            assert c.execute("SELECT count(*) FROM tiles WHERE emb = (SELECT emb FROM tiles WHERE id = 7)").fetchone()[0] == 1
            top = c.execute("SELECT id FROM tiles WHERE emb IS NOT NULL ORDER BY emb <#> (SELECT emb FROM tiles WHERE id = 42) LIMIT 1").fetchone()[0]
            assert top == 42
    finally:
        with psycopg.connect(URI, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
