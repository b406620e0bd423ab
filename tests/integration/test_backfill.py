"""rsclip_backfill: batched, committed, resumable filling of an embedding column; bad images
logged, several backfills sharing a table, progress visible from another session, and the
server killed mid-run then the backfill resumed: every row embedded exactly once."""
import json
import threading
import time
from pathlib import Path

import psycopg
import pytest

from clusters import db_uri, fresh_cluster, wait_for
from conftest import PG_MAJOR, uri_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REFERENCE = json.loads((FIXTURES / "reference" / "reference.json").read_text())
IMAGES = [(FIXTURES / "reference" / REFERENCE["images"][n]["file"]).read_bytes() for n in sorted(REFERENCE["images"])]
GARBAGE = [b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b""]
CRASH_PORT = 25480 + int(PG_MAJOR) % 10


def make_table(c, name, n, garbage=(), nulls=0, slow_ms=0):
    """`n` image rows cycling through the fixture images, then `garbage` rows, then `nulls` rows
    without an image. `writes` counts the updates that changed `emb` (a trigger)."""
    c.execute(f"DROP TABLE IF EXISTS {name}")
    c.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, img bytea, emb embedding(32), writes int NOT NULL DEFAULT 0)")
    c.execute(f"""CREATE OR REPLACE FUNCTION count_writes_{name}() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     IF NEW.emb IS DISTINCT FROM OLD.emb THEN NEW.writes := OLD.writes + 1; END IF;
                     IF {slow_ms} > 0 THEN PERFORM pg_sleep({slow_ms} / 1000.0); END IF;
                     RETURN NEW;
                 END $$""")
    c.execute(f"CREATE TRIGGER count_writes BEFORE UPDATE ON {name} FOR EACH ROW EXECUTE FUNCTION count_writes_{name}()")
    with c.cursor() as cur:
        cur.executemany(f"INSERT INTO {name} (id, img) VALUES (%s, %s)",
                        [(i, IMAGES[i % len(IMAGES)]) for i in range(n)]
                        + [(n + j, g) for j, g in enumerate(garbage)]
                        + [(n + len(garbage) + j, None) for j in range(nulls)])
    c.execute(f"ANALYZE {name}")


def per_row(c, name):
    """id -> (stored embedding text, per-row encode text) for every filled row."""
    c.execute("SET rsclip.cache = off")
    rows = c.execute(f"SELECT id, emb::text, rsclip_encode_image(img)::text FROM {name} WHERE emb IS NOT NULL").fetchall()
    c.execute("RESET rsclip.cache")
    return {r[0]: (r[1], r[2]) for r in rows}


def call(uri, sql, notices=None):
    with psycopg.connect(uri, autocommit=True) as c:
        if notices is not None:
            c.add_notice_handler(lambda d: notices.append(d.message_primary))
        c.execute(sql)


def test_backfill_fills_every_image_and_logs_bad_ones(dbname):
    notices = []
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        make_table(c, "tiles", 70, garbage=GARBAGE, nulls=2)
        c.add_notice_handler(lambda d: notices.append(d.message_primary))
        c.execute("CALL rsclip_backfill('tiles', 'img', 'emb', 8)")
        assert any("70 rows embedded, 3 failed" in n for n in notices), notices
        filled = per_row(c, "tiles")
        assert len(filled) == 70
        assert all(stored == fresh for stored, fresh in filled.values()), "backfill differs from a per-row encode"
        assert c.execute("SELECT count(*) FROM tiles WHERE emb IS NULL").fetchone()[0] == 5
        assert c.execute("SELECT count(*) FROM tiles WHERE writes <> (emb IS NOT NULL)::int").fetchone()[0] == 0
        errors = c.execute("SELECT row_key->>'id', message FROM rsclip_backfill_errors WHERE tbl = 'tiles'::regclass ORDER BY 1").fetchall()
        assert [int(e[0]) for e in errors] == [70, 71, 72], errors
        assert all(e[1] for e in errors)
        # a second run finds nothing to do and logs nothing new
        notices.clear()
        c.execute("CALL rsclip_backfill('tiles', 'img', 'emb', 8)")
        assert any("0 rows embedded, 0 failed" in n for n in notices), notices
        assert c.execute("SELECT count(*) FROM rsclip_backfill_errors WHERE tbl = 'tiles'::regclass").fetchone()[0] == 3
        # a fixed row (new ctid) is retried
        c.execute("UPDATE tiles SET img = %s WHERE id = 70", (IMAGES[0],))
        c.execute("CALL rsclip_backfill('tiles', 'img', 'emb', 8)")
        assert c.execute("SELECT emb IS NOT NULL FROM tiles WHERE id = 70").fetchone()[0]


def test_text_kind_and_probed_batch_size(dbname):
    texts = [t["text"] for t in REFERENCE["texts"]] * 5
    notices = []
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute("CREATE TABLE captions (id int PRIMARY KEY, caption text, emb embedding(32))")
        with c.cursor() as cur:
            cur.executemany("INSERT INTO captions (id, caption) VALUES (%s, %s)", list(enumerate(texts)))
        c.add_notice_handler(lambda d: notices.append(d.message_primary))
        c.execute("CALL rsclip_backfill('captions', 'caption', 'emb', kind => 'text')")
        probed = [n for n in notices if "(probed;" in n]
        assert probed and 1 <= int(probed[0].split()[3]) <= 256, notices
        c.execute("SET rsclip.cache = off")
        bad = c.execute("SELECT count(*) FROM captions WHERE emb IS NULL OR emb::text <> rsclip_encode_text(caption)::text").fetchone()[0]
        assert bad == 0


def test_probed_batch_size_is_bounded_by_maintenance_work_mem(dbname):
    notices = []
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        make_table(c, "probe_tiles", 40)
        size = c.execute("SELECT (rsclip_model_info()->>'image_size')::int").fetchone()[0]
        stored = c.execute("SELECT avg(pg_column_size(img)) FROM (SELECT img FROM probe_tiles LIMIT 32) q").fetchone()[0]
        c.add_notice_handler(lambda d: notices.append(d.message_primary))
        c.execute("SET maintenance_work_mem = '1MB'")
        c.execute("CALL rsclip_backfill('probe_tiles', 'img', 'emb')")
        probed = [n for n in notices if "(probed;" in n]
        assert probed, notices
        words = probed[0].split()
        batch, bound = int(words[3]), int(words[7])
        assert bound == max(1, min(256, int(1024 * 1024 // (3 * (float(stored) + 12 * size * size))))), (bound, stored, size)
        assert 1 <= batch <= bound < 32, probed
        assert c.execute("SELECT count(*) FROM probe_tiles WHERE emb IS NULL").fetchone()[0] == 0


def test_batches_handed_over_ahead_are_matched_to_their_inputs(dbname):
    """The procedure hands batches over as prefetch two calls before it asks for them; inputs take
    the oldest handed-over batch that holds them (a batch whose rows another backfill took is
    skipped, dropped rows are left out), and a call with neither inputs nor prefetch forgets an
    interrupted run's batches. Every answer equals a per-row encode."""
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute("SET rsclip.cache = off")
        want = [c.execute("SELECT rsclip_encode_image(%s)::text", (b,)).fetchone()[0] for b in IMAGES]

        def encode(inputs, prefetch):
            return c.execute("SELECT (r).embeddings::text[], (r).errors FROM "
                             "(SELECT rsclip_backfill_encode(%s::bytea[], 'image', %s::bytea[]) r) q",
                             (inputs, prefetch)).fetchone()

        assert encode([], []) == ([], [])
        assert encode([], [IMAGES[0], IMAGES[1]]) == ([], [])
        assert encode([], [IMAGES[2], IMAGES[3]]) == ([], [])
        # the first batch was taken whole by someone else, the second lost a row
        assert encode([IMAGES[3]], [IMAGES[1], GARBAGE[0], IMAGES[0]])[0] == [want[3]]
        emb, err = encode([IMAGES[1], GARBAGE[0], IMAGES[0]], [])
        assert emb == [want[1], None, want[0]] and err[0] is None and err[1] and err[2] is None
        # an interrupted run's batches are forgotten; inputs never handed over are encoded anyway
        encode([], [IMAGES[2]])
        encode([], [])
        assert encode([IMAGES[0], IMAGES[2]], [])[0] == [want[0], want[2]]
        # the session is still usable for plain calls afterwards
        assert c.execute("SELECT rsclip_encode_image(%s)::text", (IMAGES[1],)).fetchone()[0] == want[1]


def test_rows_a_relock_dropped_leave_the_batch_in_order(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        got = c.execute("""SELECT kept_ctids::text[], kept_xmins::text[], kept_inputs, kept_keys::text[]
                           FROM rsclip_backfill_keep('{"(0,1)","(0,2)","(0,3)"}', '{5,6,7}',
                                                     ARRAY['\\x01', '\\x02', '\\x03']::bytea[],
                                                     ARRAY['{"id": 1}', NULL, '{"id": 3}']::jsonb[],
                                                     '{"(0,3)","(0,1)","(9,9)"}')""").fetchone()
        assert got == (["(0,1)", "(0,3)"], ["5", "7"], [b"\x01", b"\x03"], ['{"id": 1}', '{"id": 3}'])


def test_backend_exit_waits_for_a_batch_in_the_model(dbname):
    """A batch handed over keeps the model busy after the call returns; a backend that exits (or
    is terminated) meanwhile must wait for it rather than crash on its way out, which would make
    the postmaster restart every session."""
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        started = c.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
    for terminate in (False, True):
        c = psycopg.connect(uri_for(dbname), autocommit=True)
        c.execute("SET rsclip.cache = off")
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        c.execute("SELECT rsclip_backfill_encode('{}', 'image', %s::bytea[])", (IMAGES * 100,))
        c.execute("SELECT rsclip_backfill_encode('{}', 'image', %s::bytea[])", (IMAGES * 100,))
        if terminate:
            with psycopg.connect(uri_for(dbname), autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        c.close()
        assert wait_for(lambda: _backend_gone(dbname, pid), timeout=30)
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        assert c.execute("SELECT pg_postmaster_start_time()").fetchone()[0] == started, "the server restarted"


def _backend_gone(dbname, pid):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        return c.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == 0


def test_bad_arguments_are_clear_errors(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute("CREATE TABLE args (id int, img bytea, note text, v real[], emb embedding(32))")
        cases = [
            ("CALL rsclip_backfill('args', 'img', 'emb', kind => 'video')", psycopg.errors.InvalidParameterValue, "kind"),
            ("CALL rsclip_backfill('args', 'img', 'emb', 0)", psycopg.errors.InvalidParameterValue, "batch_size"),
            ("CALL rsclip_backfill('args', 'nope', 'emb')", psycopg.errors.UndefinedColumn, "nope"),
            ("CALL rsclip_backfill('args', 'img', 'v')", psycopg.errors.DatatypeMismatch, "not embedding"),
            ("CALL rsclip_backfill('args', 'note', 'emb')", psycopg.errors.DatatypeMismatch, "not bytea"),
            ("CALL rsclip_backfill('args', 'img', 'emb', kind => 'text')", psycopg.errors.DatatypeMismatch, "not text"),
            ("CALL rsclip_backfill('no_such_table', 'img', 'emb')", psycopg.errors.UndefinedTable, "no_such_table"),
        ]
        for sql, exc, needle in cases:
            with pytest.raises(exc, match=needle):
                c.execute(sql)
        c.execute("INSERT INTO args (id, img) VALUES (1, %s)", (IMAGES[0],))
    with psycopg.connect(uri_for(dbname)) as c:  # inside a transaction block it cannot commit
        with pytest.raises(psycopg.errors.InvalidTransactionTermination):
            c.execute("CALL rsclip_backfill('args', 'img', 'emb', 4)")


def test_error_log_is_written_as_the_current_role(dbname):
    """The procedure runs with the caller's rights: a role that may update the table logs its bad
    rows; a role that may only read it cannot write log rows for it, even directly, and even when
    its session user could (SET ROLE)."""
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        make_table(c, "owned_tiles", 4, garbage=GARBAGE[:1])
        for role in ("rsclip_filler", "rsclip_reader"):
            if c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                c.execute(f"DROP OWNED BY {role}")  # left by an interrupted earlier run
                c.execute(f"DROP ROLE {role}")
            c.execute(f"CREATE ROLE {role}")
        c.execute("GRANT SELECT, UPDATE ON owned_tiles TO rsclip_filler")
        c.execute("GRANT SELECT ON owned_tiles TO rsclip_reader")
        try:
            c.execute("SET ROLE rsclip_reader")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("CALL rsclip_backfill('owned_tiles', 'img', 'emb', 2)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("INSERT INTO rsclip_backfill_error_log (tbl, row_ctid, message) "
                          "VALUES ('owned_tiles'::regclass, '(0,1)', 'forged')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT * FROM rsclip_backfill_error_log")
            c.execute("RESET ROLE")
            c.execute("SET ROLE rsclip_filler")
            c.execute("CALL rsclip_backfill('owned_tiles', 'img', 'emb', 2)")
            c.execute("RESET ROLE")
            assert c.execute("SELECT count(emb) FROM owned_tiles").fetchone()[0] == 4
            c.execute("SET ROLE rsclip_reader")
            logged = c.execute("SELECT row_key->>'id', message FROM rsclip_backfill_errors "
                               "WHERE tbl = 'owned_tiles'::regclass").fetchall()
            assert [r[0] for r in logged] == ["4"] and "forged" not in logged[0][1], logged
            c.execute("RESET ROLE")
        finally:
            c.execute("RESET ROLE")
            c.execute("DROP TABLE owned_tiles")
            for role in ("rsclip_filler", "rsclip_reader"):
                c.execute(f"DROP OWNED BY {role}")
                c.execute(f"DROP ROLE {role}")


def test_concurrent_backfills_share_the_rows(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        make_table(c, "shared", 400, slow_ms=1)
    notices = [[], []]
    threads = [threading.Thread(target=call, args=(uri_for(dbname), "CALL rsclip_backfill('shared', 'img', 'emb', 4)", notices[i]))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [int(n.split()[1]) for ns in notices for n in ns if "rows embedded" in n]
    assert sum(done) == 400 and len(done) == 2, notices
    assert min(done) > 0, f"one backfill did all the work: {done}"
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        assert c.execute("SELECT count(*), min(writes), max(writes) FROM shared").fetchone() == (400, 1, 1)


def test_progress_view_from_another_session(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        make_table(c, "watched", 120, slow_ms=20)
    t = threading.Thread(target=call, args=(uri_for(dbname), "CALL rsclip_backfill('watched', 'img', 'emb', 4)"))
    t.start()
    seen = []
    try:
        with psycopg.connect(uri_for(dbname), autocommit=True) as c:
            def running():
                row = c.execute("SELECT rows_total, rows_done, rows_per_second, eta FROM rsclip_backfill_progress "
                                "WHERE tbl = 'watched'::regclass").fetchone()
                if row and row[1] > 0:
                    seen.append(row)
                    return True
                return False
            assert wait_for(running, timeout=60, step=0.05), "no progress row while the backfill ran"
    finally:
        t.join()
    total, done, rate, eta = seen[0]
    assert total == 120 and 0 < done <= 120 and rate > 0 and eta is not None
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM rsclip_backfill_progress").fetchone()[0] == 0


def test_server_killed_during_backfill_then_resumed():
    server = fresh_cluster("backfill-crash", CRASH_PORT)
    try:
        with psycopg.connect(server.uri, autocommit=True) as admin:
            admin.execute("CREATE DATABASE bf")
        uri = db_uri(server, "bf")
        with psycopg.connect(uri, autocommit=True) as c:
            c.execute("CREATE EXTENSION rsclip")
            make_table(c, "tiles", 600, slow_ms=2)
        errors = []

        def run():
            try:
                call(uri, "CALL rsclip_backfill('tiles', 'img', 'emb', 4)")
            except psycopg.Error as e:  # the server goes away under it
                errors.append(e)
        t = threading.Thread(target=run)
        t.start()
        with psycopg.connect(uri, autocommit=True) as c:
            assert wait_for(lambda: c.execute("SELECT count(emb) FROM tiles").fetchone()[0] >= 100, timeout=120, step=0.02)
        server.stop("immediate")
        t.join()
        assert errors, "the backfill finished before the crash: make it slower"
        server.start([])
        with psycopg.connect(uri, autocommit=True) as c:
            survived = c.execute("SELECT count(emb) FROM tiles").fetchone()[0]
            assert 100 <= survived < 600
            c.execute("CALL rsclip_backfill('tiles', 'img', 'emb', 4)")
            assert c.execute("SELECT count(*), count(emb), min(writes), max(writes) FROM tiles").fetchone() == (600, 600, 1, 1)
            filled = per_row(c, "tiles")
            assert all(stored == fresh for stored, fresh in filled.values())
    finally:
        server.stop("immediate")
