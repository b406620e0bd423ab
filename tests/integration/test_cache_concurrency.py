"""The result cache never makes a caller fail or wait: REPEATABLE READ, another transaction's
uncommitted cache rows, opposite-order arrays, a running prune, and 16 clients encoding
overlapping new texts in all isolation levels with transactions held open.

Each reproduction below failed before the cache locked keys conditionally: 40001 under
REPEATABLE READ, and a wait until statement_timeout on an open transaction's new row."""
import random
import threading
import time
import uuid

import psycopg
import pytest

from conftest import uri_for

# Far above what an encode of the fixture model takes, far below what any lock wait in these
# tests would last (the transactions they could wait on stay open for seconds).
FAST = 1.0


def connect(dbname, **kw):
    c = psycopg.connect(uri_for(dbname), autocommit=True, **kw)
    c.execute("SET statement_timeout = '5s'")
    return c


def stats(c):
    cur = c.execute("SELECT * FROM rsclip_cache_stats()")
    return dict(zip([d.name for d in cur.description], cur.fetchone()))


def timed(c, sql, params=()):
    t0 = time.perf_counter()
    rows = c.execute(sql, params).fetchall()
    return rows, time.perf_counter() - t0


def new_text(tag):
    return f"{tag} {uuid.uuid4().hex}"


def test_repeatable_read_meets_a_row_committed_after_its_snapshot(dbname):
    text = new_text("flooded farmland")
    with connect(dbname) as a, connect(dbname) as b:
        a.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        a.execute("SELECT 1")  # takes the snapshot
        expected = b.execute("SELECT rsclip_encode_text(%s)::text", (text,)).fetchone()[0]
        # A's snapshot cannot see B's row: A encodes again and must not raise 40001
        got = a.execute("SELECT rsclip_encode_text(%s)::text", (text,)).fetchone()[0]
        assert got == expected
        assert stats(a)["writes_skipped"] == 1
        # the array form, mixed with a key that is new for everyone: that one is written
        other = new_text("harbour")
        got = a.execute("SELECT rsclip_encode_texts(ARRAY[%s, %s])::text[]", (text, other)).fetchone()[0]
        assert got[0] == expected
        a.execute("COMMIT")
        assert b.execute("SELECT rsclip_encode_text(%s)::text", (other,)).fetchone()[0] == got[1]
        assert stats(b)["table_hits"] == 1, "A's REPEATABLE READ insert of a new key was kept"


def test_repeatable_read_hits_do_not_update_rows_updated_after_the_snapshot(dbname):
    text = new_text("airport")
    with connect(dbname) as a, connect(dbname) as b, connect(dbname) as owner:
        owner.execute("SELECT rsclip_encode_text(%s)", (text,))
        a.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        a.execute("SELECT 1")
        b.execute("SELECT rsclip_encode_text(%s)", (text,))  # a table hit: bumps the row's hits
        a.execute("SELECT rsclip_encode_text(%s)", (text,))  # same row, updated after A's snapshot
        a.execute("COMMIT")
        assert stats(a)["table_hits"] == 1


def test_open_transaction_never_blocks_others_on_its_new_rows(dbname):
    text = new_text("new text")
    with connect(dbname) as a, connect(dbname) as b:
        a.execute("BEGIN")
        a.execute("SELECT rsclip_encode_text(%s)", (text,))  # an uncommitted cache row
        b.execute("SET statement_timeout = '3s'")
        for sql in ("SELECT rsclip_encode_text(%s)::text", "SELECT rsclip_encode_texts(ARRAY[%s])::text"):
            _, elapsed = timed(b, sql, (text,))
            assert elapsed < FAST, f"{sql} waited {elapsed:.2f} s on the open transaction's row"
        assert stats(b)["writes_skipped"] >= 1
        a.execute("COMMIT")
        # the row A committed serves everyone now
        with connect(dbname) as c:
            c.execute("SELECT rsclip_encode_text(%s)", (text,))
            assert stats(c)["table_hits"] == 1


def test_arrays_with_the_same_new_keys_in_opposite_orders_neither_wait_nor_deadlock(dbname):
    x, y, z = new_text("x"), new_text("y"), new_text("z")
    with connect(dbname) as a, connect(dbname) as b:
        a.execute("BEGIN")
        b.execute("BEGIN")
        _, t1 = timed(a, "SELECT rsclip_encode_texts(ARRAY[%s, %s])", (x, y))
        _, t2 = timed(b, "SELECT rsclip_encode_texts(ARRAY[%s, %s, %s])", (y, x, z))
        _, t3 = timed(a, "SELECT rsclip_encode_texts(ARRAY[%s, %s])", (z, x))
        assert max(t1, t2, t3) < FAST, (t1, t2, t3)
        a.execute("COMMIT")
        b.execute("COMMIT")
        n = a.execute("SELECT count(*) FROM rsclip_cache c WHERE c.embedding IS NOT NULL").fetchone()[0]
        assert n >= 3  # x and y from A, z from B; nothing twice (the primary key)


def test_prune_running_makes_writes_skip_not_wait(dbname):
    with connect(dbname) as a, connect(dbname) as pruner:
        a.execute("SELECT rsclip_encode_text(%s)", (new_text("kept"),))
        pruner.execute("BEGIN")
        pruner.execute("SELECT rsclip_cache_prune(older_than => interval '1 year')")
        cached = new_text("during prune")
        _, elapsed = timed(a, "SELECT rsclip_encode_text(%s)", (cached,))
        assert elapsed < FAST, f"the encode waited {elapsed:.2f} s on the running prune"
        assert stats(a)["writes_skipped"] >= 1
        pruner.execute("COMMIT")


def test_prune_does_not_queue_behind_an_open_transaction(dbname):
    """A prune that waited in the lock queue behind a transaction holding the table (one idle
    after an encode) would make every encoder skip its writes meanwhile. It retries NOWAIT,
    writes go on, and after 5 s it gives up with a clear 55P03."""
    with connect(dbname) as a, connect(dbname) as b, connect(dbname) as pruner:
        a.execute("BEGIN")
        a.execute("SELECT rsclip_encode_text(%s)", (new_text("held open"),))
        outcome = {}

        def prune():
            try:
                pruner.execute("SELECT rsclip_cache_prune(older_than => interval '1 year')")
                outcome["result"] = "pruned"
            except psycopg.errors.LockNotAvailable as e:
                outcome["result"] = str(e)
        t = threading.Thread(target=prune)
        t0 = time.perf_counter()
        t.start()
        time.sleep(0.5)
        text = new_text("written while the prune retries")
        _, elapsed = timed(b, "SELECT rsclip_encode_text(%s)", (text,))
        assert elapsed < FAST
        assert stats(b)["writes_skipped"] == 0, "the encoder skipped its write behind a queued prune"
        t.join()
        assert "stayed in use" in outcome["result"], outcome
        assert 4.0 < time.perf_counter() - t0 < 15
        a.execute("COMMIT")
        assert pruner.execute("SELECT rsclip_cache_prune(older_than => interval '1 year')").fetchone()[0] >= 0


ISOLATION_LEVELS = ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]


def test_sixteen_clients_encoding_overlapping_new_texts(dbname):
    """A pgbench-style run: 16 clients, every isolation level, transactions left open for a
    while after their encodes, texts drawn from a small pool so that clients meet each other's
    uncommitted rows all the time. No errors, no waits, and every result is right."""
    clients, seconds = 16, 8.0
    pool = [new_text(f"overlap {i}") for i in range(24)]
    with connect(dbname) as c:
        c.execute("SET rsclip.cache = off")
        truth = {t: c.execute("SELECT rsclip_encode_text(%s)::text", (t,)).fetchone()[0] for t in pool}
    errors, latencies, wrong = [], [], []
    ready = threading.Barrier(clients + 1)
    stop = float("inf")

    def client(n):
        rng = random.Random(n)
        try:
            with connect(dbname) as c:
                c.execute("SET rsclip.cache_lru_size = 0")  # every call goes to the table
                c.execute("SELECT rsclip_encode_text('warm up')")  # the model loads before the run
                ready.wait()
                while time.monotonic() < stop:
                    level = rng.choice(ISOLATION_LEVELS)
                    c.execute(f"BEGIN ISOLATION LEVEL {level}")
                    for _ in range(rng.randint(1, 3)):
                        texts = rng.sample(pool, rng.randint(1, 5))
                        if len(texts) == 1:
                            (got,), dt = timed(c, "SELECT rsclip_encode_text(%s)::text", (texts[0],))
                            got = [got[0]]
                        else:
                            ((got,),), dt = timed(c, "SELECT rsclip_encode_texts(%s)::text[]", (texts,))
                        latencies.append(dt)
                        wrong.extend(t for t, g in zip(texts, got) if g != truth[t])
                    time.sleep(rng.uniform(0.0, 0.3))  # hold the transaction (and its new rows) open
                    c.execute(rng.choice(["COMMIT", "COMMIT", "ROLLBACK"]))
        except Exception as e:  # noqa: BLE001 - any error at all fails the test
            errors.append(f"client {n}: {type(e).__name__}: {e}")

    waits, extends = [], []

    def monitor():
        with connect(dbname) as m:
            while time.monotonic() < stop:
                waits.extend(m.execute(
                    "SELECT pid, wait_event, left(query, 60) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock' "
                    # the relation extension lock is held only while a page is added to the
                    # table, never across a transaction: any concurrent insert meets it, and the
                    # latency bound below is what shows it costs nothing
                    "AND wait_event <> 'extend'").fetchall())
                extends.extend(m.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND wait_event = 'extend'").fetchall())
                time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    threads.append(threading.Thread(target=monitor))
    for t in threads[:-1]:
        t.start()
    ready.wait()
    stop = time.monotonic() + seconds
    threads[-1].start()
    for t in threads:
        t.join(timeout=seconds + 60)
    assert not errors, errors[:5]
    assert not wrong, wrong[:5]
    assert not waits, f"lock waits seen: {waits[:5]}"
    assert len(latencies) > 100, len(latencies)
    latencies.sort()
    p50, p99, worst = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)], latencies[-1]
    print(f"{len(latencies)} encodes by {clients} clients: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
          f"max {worst * 1e3:.1f} ms; {len(extends)} samples saw a relation-extension wait")
    # 16 clients on a 2-core machine queue for the CPU, not for locks: the bound is loose on
    # purpose, and far below the 0.3 s the transactions they could wait on stay open
    assert worst < 0.25, f"slowest encode {worst:.3f} s (p50 {p50:.4f} s, p99 {p99:.4f} s)"
    with connect(dbname) as c:
        dupes = c.execute("SELECT count(*) - count(DISTINCT (model, kind, input_sha256)) FROM rsclip_cache").fetchone()[0]
        assert dupes == 0


@pytest.mark.parametrize("level", ISOLATION_LEVELS)
def test_every_isolation_level_reads_what_others_cached(dbname, level):
    text = new_text(f"beach {level}")
    with connect(dbname) as a, connect(dbname) as b:
        expected = a.execute("SELECT rsclip_encode_text(%s)::text", (text,)).fetchone()[0]
        b.execute(f"BEGIN ISOLATION LEVEL {level}")
        assert b.execute("SELECT rsclip_encode_text(%s)::text", (text,)).fetchone()[0] == expected
        assert stats(b)["table_hits"] == 1
        b.execute("COMMIT")
