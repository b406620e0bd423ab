"""What an ordinary role can do with rsclip's internals: the functions PUBLIC may execute are
harmless by construction, and the shared cache has a bound no ordinary role can lift or exceed."""
import time
import uuid

import psycopg
import pytest

from conftest import uri_for

ROLE = "rsclip_plain_role"


@pytest.fixture
def plain(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as admin:
        admin.execute(f"DROP ROLE IF EXISTS {ROLE}")
        admin.execute(f"CREATE ROLE {ROLE} LOGIN")
        try:
            with psycopg.connect(uri_for(dbname), autocommit=True) as c:
                c.execute(f"SET SESSION AUTHORIZATION {ROLE}")
                yield c, admin
        finally:
            admin.execute(f"ALTER DATABASE \"{dbname}\" RESET rsclip.cache_max_rows")
            admin.execute(f"DROP OWNED BY {ROLE}")
            admin.execute(f"DROP ROLE {ROLE}")


def public_functions(admin):
    """rsclip's functions that PUBLIC may execute, by name."""
    return {r[0] for r in admin.execute(
        "SELECT p.proname FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass "
        "JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'rsclip' "
        "WHERE has_function_privilege('public', p.oid, 'EXECUTE')")}


def test_internal_functions_executable_by_public_are_the_harmless_ones(plain):
    c, admin = plain
    public = public_functions(admin)
    # the owner's maintenance function is not PUBLIC's
    assert "rsclip_cache_prune" not in public
    # the internals PUBLIC may call (rsclip_backfill runs with its caller's rights) and why each
    # is harmless is written beside it in sql/; the test pins the list so a new one is looked at
    internal = {p for p in public if p.startswith("rsclip_backfill_") or p.endswith("_backend_stats")}
    assert internal == {"rsclip_backfill_encode", "rsclip_backfill_keep", "rsclip_backfill_report",
                        "rsclip_cache_backend_stats"}, internal
    # rsclip_backfill_report: at most one state row per backend, however often it is called
    for i in range(50):
        c.execute("SELECT rsclip_backfill_report(%s::oid, 'img', 'emb', 'image', 8, 100, 1, 0, false)", (100000 + i,))
    pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert admin.execute("SELECT count(*) FROM rsclip_backfill_state WHERE pid = %s", (pid,)).fetchone()[0] == 1
    c.execute("SELECT rsclip_backfill_report(100049::oid, 'img', 'emb', 'image', 8, 100, 1, 0, true)")
    assert admin.execute("SELECT count(*) FROM rsclip_backfill_state WHERE pid = %s", (pid,)).fetchone()[0] == 0
    # rsclip_cache_backend_stats: this backend's counters only, no table
    assert set(c.execute("SELECT rsclip_cache_backend_stats()").fetchone()[0]) >= {"misses", "lru_hits"}


def test_cache_bound_holds_for_an_ordinary_role(plain, dbname):
    c, admin = plain
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute("SET rsclip.cache_max_rows = 1000000")
    admin.execute(f"ALTER DATABASE \"{dbname}\" SET rsclip.cache_max_rows = 40")
    admin.execute("SELECT rsclip_cache_prune(max_rows => 0)")
    with psycopg.connect(uri_for(dbname), autocommit=True) as c2:
        c2.execute(f"SET SESSION AUTHORIZATION {ROLE}")
        assert c2.execute("SHOW rsclip.cache_max_rows").fetchone()[0] == "40"
        for round_ in range(6):
            texts = [f"bound {round_} {i} {uuid.uuid4().hex}" for i in range(20)]
            c2.execute("SELECT rsclip_encode_texts(%s)", (texts,))
            time.sleep(1.1)  # the row count comes from the statistics, flushed about once a second
            n = admin.execute("SELECT count(*) FROM rsclip_cache").fetchone()[0]
            assert n <= 40, f"round {round_}: {n} rows with rsclip.cache_max_rows = 40"
        # the newest entries stay: the last round's texts are all there
        hits_before = c2.execute("SELECT (rsclip_cache_backend_stats()->>'table_hits')::int").fetchone()[0]
        c2.execute("SET rsclip.cache_lru_size = 0")
        c2.execute("SELECT rsclip_encode_texts(%s)", (texts,))
        hits = c2.execute("SELECT (rsclip_cache_backend_stats()->>'table_hits')::int").fetchone()[0]
        assert hits - hits_before == len(texts)
        # 0 keeps the table out: nothing new goes in
        admin.execute(f"ALTER DATABASE \"{dbname}\" SET rsclip.cache_max_rows = 0")
    with psycopg.connect(uri_for(dbname), autocommit=True) as c3:
        before = admin.execute("SELECT count(*) FROM rsclip_cache").fetchone()[0]
        c3.execute("SELECT rsclip_encode_text(%s)", (f"not stored {uuid.uuid4().hex}",))
        assert admin.execute("SELECT count(*) FROM rsclip_cache").fetchone()[0] == before
