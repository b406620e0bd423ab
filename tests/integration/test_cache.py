"""The shared result cache (rsclip_cache) and the per-backend LRU in front of it: hits across
backends, read-only transactions and a hot standby, roles that cannot touch the table but still
fill it through the encoders, model changes, settings, pruning and pg_dump."""
import json
import os
import subprocess
from pathlib import Path

import psycopg
import pytest

from clusters import db_uri, fresh_cluster, start_standby, wait_for_replay
from conftest import PG_MAJOR, pg_bindir, uri_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REFERENCE = json.loads((FIXTURES / "reference" / "reference.json").read_text())
STANDBY_PORT = 25460 + int(PG_MAJOR) % 10 * 2


def image_bytes(name):
    return (FIXTURES / "reference" / REFERENCE["images"][name]["file"]).read_bytes()


def stats(c):
    cur = c.execute("SELECT * FROM rsclip_cache_stats()")
    return dict(zip([d.name for d in cur.description], cur.fetchone()))


def rows(c):
    return c.execute("SELECT count(*) FROM rsclip_cache").fetchone()[0]


def encode_text(c, text):
    return c.execute("SELECT rsclip_encode_text(%s)::text", (text,)).fetchone()[0]


def test_second_backend_hits_what_the_first_encoded(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as a, \
            psycopg.connect(uri_for(dbname), autocommit=True) as b:
        first = encode_text(a, "airport with parked planes")
        sa = stats(a)
        assert (sa["misses"], sa["table_hits"], sa["lru_hits"]) == (1, 0, 0), sa
        assert encode_text(b, "airport with parked planes") == first
        sb = stats(b)
        assert (sb["misses"], sb["table_hits"]) == (0, 1), sb
        # the second call in the same backend comes from its LRU
        assert encode_text(b, "airport with parked planes") == first
        assert stats(b)["lru_hits"] == 1
        # the table hit was counted on the row
        hits = b.execute("SELECT hits FROM rsclip_cache WHERE kind = 'text'").fetchall()
        assert hits == [(1,)]
        # the text is keyed after the tokenizer's normalization: case and spacing do not matter
        assert encode_text(b, "Airport  WITH parked planes") == first
        assert stats(b)["misses"] == 0
        assert rows(b) == 1


def test_cached_results_equal_fresh_ones_bit_for_bit(dbname):
    texts = [t["text"] for t in REFERENCE["texts"]]
    images = [image_bytes(n) for n in sorted(REFERENCE["images"])]
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute("SET rsclip.cache = off")
        fresh_t = [encode_text(c, t) for t in texts]
        fresh_i = [c.execute("SELECT rsclip_encode_image(%s)::text", (b,)).fetchone()[0] for b in images]
        assert stats(c)["misses"] == 0, "rsclip.cache = off must bypass the cache"
        c.execute("RESET rsclip.cache")
        # filled by the array forms (misses batched into one run), read back by the single forms
        # in another backend (table hits) and again (LRU hits)
        arr_t = [r[0] for r in c.execute("SELECT e::text FROM unnest(rsclip_encode_texts(%s)) e", (texts,))]
        arr_i = [r[0] for r in c.execute("SELECT e::text FROM unnest(rsclip_encode_images(%s)) e", (images,))]
        assert arr_t == fresh_t and arr_i == fresh_i
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        for _ in range(2):
            assert [encode_text(c, t) for t in texts] == fresh_t
            assert [c.execute("SELECT rsclip_encode_image(%s)::text", (b,)).fetchone()[0] for b in images] == fresh_i
        s = stats(c)
        assert s["misses"] == 0 and s["table_hits"] > 0 and s["lru_hits"] > 0, s


def test_array_call_batches_misses_and_handles_duplicates_and_nulls(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        before = rows(c)
        got = c.execute("SELECT rsclip_encode_texts(ARRAY['river delta', 'pier', 'River Delta', NULL, 'pier'])::text[]").fetchone()[0]
        assert got[3] is None
        assert got[0] == got[2] and got[1] == got[4] and got[0] != got[1]
        assert stats(c)["misses"] == 2
        assert rows(c) == before + 2


def test_read_only_transaction_reads_and_skips_writes(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        cached = encode_text(c, "harbour with ships")
    with psycopg.connect(uri_for(dbname)) as c:  # a fresh backend: empty LRU
        c.execute("SET TRANSACTION READ ONLY")
        assert encode_text(c, "harbour with ships") == cached
        n = rows(c)
        fresh = encode_text(c, "a text nobody encoded before")
        assert fresh.startswith("[")
        s = stats(c)
        assert (s["table_hits"], s["misses"], s["writes_skipped"]) == (1, 1, 1), s
        assert rows(c) == n
        c.rollback()
        # serializable transactions do not write either (no serialization failures from the cache)
        c.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        encode_text(c, "another new text")
        assert stats(c)["writes_skipped"] == 2
        c.rollback()


def test_ordinary_role_cannot_write_the_table_but_fills_it(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS rsclip_cache_user")
        admin.execute("CREATE ROLE rsclip_cache_user")
        admin.execute(f'GRANT CREATE ON DATABASE "{dbname}" TO rsclip_cache_user')
        admin.execute("GRANT CREATE ON SCHEMA public TO rsclip_cache_user")
        try:
            with psycopg.connect(uri_for(dbname), autocommit=True) as c:
                c.execute("SET ROLE rsclip_cache_user")
                for sql in ("SELECT count(*) FROM rsclip_cache",
                            "INSERT INTO rsclip_cache (model, kind, input_sha256, embedding) "
                            "VALUES (sha256('m'), 'text', sha256('x'), '[1,0]')",
                            "UPDATE rsclip_cache SET embedding = '[1,0]'",
                            "DELETE FROM rsclip_cache",
                            "TRUNCATE rsclip_cache",
                            "SELECT rsclip_cache_prune(max_rows => 0)"):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        c.execute(sql)
                # A search_path trap: an operator the cache queries would pick up if they were
                # not schema-qualified, running as the table owner. It must never run.
                c.execute("CREATE SCHEMA trap")
                c.execute("CREATE TABLE trap.sprung (who text)")
                c.execute("""CREATE FUNCTION trap.eq(bytea, bytea) RETURNS boolean LANGUAGE plpgsql AS $$
                             BEGIN INSERT INTO trap.sprung VALUES (current_user); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$""")
                c.execute("CREATE OPERATOR trap.= (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = trap.eq)")
                c.execute("SET search_path = trap, pg_catalog, public")
                v = encode_text(c, "solar farm in the desert")
                assert stats(c)["misses"] == 1
                assert c.execute("SELECT count(*) FROM trap.sprung").fetchone()[0] == 0
                c.execute("RESET search_path")
                c.execute("RESET ROLE")
                assert c.execute("SELECT count(*) FROM trap.sprung").fetchone()[0] == 0
                c.execute("DROP SCHEMA trap CASCADE")
            with psycopg.connect(uri_for(dbname), autocommit=True) as other:
                assert encode_text(other, "solar farm in the desert") == v
                assert stats(other)["table_hits"] == 1
        finally:
            admin.execute("DROP SCHEMA IF EXISTS trap CASCADE")
            admin.execute(f'REVOKE CREATE ON DATABASE "{dbname}" FROM rsclip_cache_user')
            admin.execute("REVOKE CREATE ON SCHEMA public FROM rsclip_cache_user")
            admin.execute("DROP ROLE rsclip_cache_user")


def test_changing_the_model_misses(dbname):
    local = Path(os.environ["RSCLIP_LOCAL"])
    blob = image_bytes("exact_64x64.png")
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        fp32 = encode_text(c, "golf course")
        img32 = c.execute("SELECT rsclip_encode_image(%s)::text", (blob,)).fetchone()[0]
        misses = stats(c)["misses"]
        c.execute("SELECT set_config('rsclip.model_path', %s, false)", (str(local / "models" / "tiny-siglip-fp16"),))
        fp16 = encode_text(c, "golf course")
        img16 = c.execute("SELECT rsclip_encode_image(%s)::text", (blob,)).fetchone()[0]
        assert fp16 != fp32 and img16 != img32
        assert stats(c)["misses"] == misses + 2
        c.execute("RESET rsclip.model_path")
        assert encode_text(c, "golf course") == fp32
        # decoding settings are part of an image's key too
        c.execute("SET rsclip.tiff_bands = '3,2,1'")
        c.execute("SELECT rsclip_encode_image(%s)", (blob,))
        assert stats(c)["misses"] == misses + 3
        c.execute("RESET rsclip.tiff_bands")
        assert c.execute("SELECT rsclip_encode_image(%s)::text", (blob,)).fetchone()[0] == img32
        assert stats(c)["misses"] == misses + 3


def test_settings_images_and_lru_size(dbname):
    blob = image_bytes("exact_64x64.png")
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute("SET rsclip.cache_images = off")
        n = rows(c)
        c.execute("SELECT rsclip_encode_image(%s)", (blob,))
        assert rows(c) == n and stats(c)["misses"] == 0
        c.execute("RESET rsclip.cache_images")
        c.execute("SET rsclip.cache_lru_size = 0")
        encode_text(c, "container port")
        encode_text(c, "container port")
        s = stats(c)
        assert (s["misses"], s["table_hits"], s["lru_hits"], s["lru_entries"]) == (1, 1, 0, 0), s
        c.execute("SET rsclip.cache_lru_size = 2")
        for t in ("a", "b", "c"):
            encode_text(c, t)
        assert stats(c)["lru_entries"] == 2


def test_hot_entry_is_not_rewritten_on_every_hit(dbname):
    """A row's hit counter is written at its first hit, then at most once a minute: the hits in
    between are counted in the backend and added with its next write."""
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        encode_text(c, "hot entry")
        sha = c.execute("SELECT input_sha256 FROM rsclip_cache WHERE kind = 'text' ORDER BY created DESC LIMIT 1").fetchone()[0]
        c.execute("SET rsclip.cache_lru_size = 0")  # every call a table hit
        updates_before = c.execute(
            "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'rsclip_cache'::regclass").fetchone()[0]
        for _ in range(200):
            encode_text(c, "hot entry")
        assert stats(c)["table_hits"] == 200
        key = "kind = 'text' AND input_sha256 = %s"
        assert c.execute(f"SELECT hits FROM rsclip_cache WHERE {key}", (sha,)).fetchall() == [(1,)]
        c.execute("SELECT pg_stat_force_next_flush()")  # publish this backend's table counters
        with psycopg.connect(uri_for(dbname), autocommit=True) as other:
            updates = other.execute(
                "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'rsclip_cache'::regclass").fetchone()[0]
        assert updates - updates_before <= 1, (updates_before, updates)
        # a minute later (simulated), the next hit writes the 199 counted meanwhile plus itself
        c.execute(f"UPDATE rsclip_cache SET last_used = now() - interval '2 minutes' WHERE {key}", (sha,))
        encode_text(c, "hot entry")
        assert c.execute(f"SELECT hits, last_used > now() - interval '1 minute' FROM rsclip_cache WHERE {key}",
                         (sha,)).fetchall() == [(201, True)]


def test_prune(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        for t in ("prune one", "prune two", "prune three"):
            encode_text(c, t)
        total = rows(c)
        c.execute("UPDATE rsclip_cache SET last_used = now() - interval '2 days' WHERE kind = 'text'")
        c.execute("UPDATE rsclip_cache SET last_used = now() WHERE kind = 'image'")
        images = c.execute("SELECT count(*) FROM rsclip_cache WHERE kind = 'image'").fetchone()[0]
        assert c.execute("SELECT rsclip_cache_prune(older_than => interval '1 day')").fetchone()[0] == total - images
        assert rows(c) == images
        assert c.execute("SELECT rsclip_cache_prune(max_rows => 1)").fetchone()[0] == images - 1
        assert rows(c) == 1
        assert c.execute("SELECT rsclip_cache_prune()").fetchone()[0] == 0
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="max_rows"):
            c.execute("SELECT rsclip_cache_prune(max_rows => -1)")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="older_than"):
            c.execute("SELECT rsclip_cache_prune(older_than => interval '-1 hour')")


def test_pg_dump_leaves_the_cache_out(dbname, tmp_path):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        encode_text(c, "dumped?")
        assert rows(c) > 0
    out = subprocess.run([str(pg_bindir() / "pg_dump"), "-d", uri_for(dbname)],
                         check=True, capture_output=True, text=True).stdout
    assert "CREATE EXTENSION IF NOT EXISTS rsclip" in out
    assert "rsclip_cache" not in out


def test_hot_standby_reads_the_cache_without_error():
    primary = fresh_cluster("cache-primary", STANDBY_PORT)
    standby = None
    try:
        standby = start_standby(primary, "cache-standby", STANDBY_PORT + 1)
        with psycopg.connect(primary.uri, autocommit=True) as admin:
            admin.execute("CREATE DATABASE cachedb")
        with psycopg.connect(db_uri(primary, "cachedb"), autocommit=True) as p:
            p.execute("CREATE EXTENSION rsclip")
            want = encode_text(p, "terraced rice fields")
            wait_for_replay(p, standby, "cachedb")
        with psycopg.connect(db_uri(standby, "cachedb"), autocommit=True) as s:
            assert s.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            assert encode_text(s, "terraced rice fields") == want
            assert encode_text(s, "something new on the standby").startswith("[")
            st = stats(s)
            assert (st["table_hits"], st["misses"], st["writes_skipped"]) == (1, 1, 1), st
            assert st["table_rows"] == 1
    finally:
        if standby is not None:
            standby.stop("immediate")
        primary.stop("immediate")
