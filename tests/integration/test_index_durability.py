"""What a transaction cannot show: the rsclip index survives the server being killed (immediate
shutdown, i.e. crash recovery from WAL) during a build, during inserts and during VACUUM, and a
streaming hot standby replays it exactly, with wal_consistency_checking verifying every generic
WAL record against the primary's page image.

Each test runs its own throwaway clusters (tools/cluster.py), never the shared test server."""
import threading
import time

import numpy as np
import psycopg
import pytest

from clusters import db_uri, fresh_cluster, server_log, start_standby, wait_for, wait_for_replay
from conftest import PG_MAJOR
from index_data import copy_rows, gaussian_mixture, recall, vec_text

BASE_PORT = 25430 + int(PG_MAJOR) % 10 * 3


def setup_db(c):
    with psycopg.connect(c.uri, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS dur")
        admin.execute("CREATE DATABASE dur")
    with psycopg.connect(db_uri(c, "dur"), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION rsclip")


def crash_and_restart(c):
    c.stop("immediate")  # SIGQUIT to every process: no shutdown checkpoint, recovery replays WAL
    c.start([])
    assert "database system was interrupted" in server_log(c) or "crash" in server_log(c).lower()


def top_ids(conn, table, query, k=10, index=True):
    conn.execute(f"SET enable_seqscan = {'off' if index else 'on'}")
    conn.execute(f"SET enable_indexscan = {'on' if index else 'off'}")
    rows = conn.execute(f"SELECT id FROM {table} ORDER BY emb <#> %s::embedding LIMIT {k}",
                        (vec_text(query),)).fetchall()
    conn.execute("RESET enable_seqscan; RESET enable_indexscan")
    return [r[0] for r in rows]


def mean_recall(conn, table, queries):
    return float(np.mean([recall(top_ids(conn, table, q), top_ids(conn, table, q, index=False)) for q in queries]))


@pytest.fixture(scope="module")
def crash_cluster():
    c = fresh_cluster("crash", BASE_PORT)
    setup_db(c)
    yield c
    c.stop("immediate")


def test_kill_during_build(crash_cluster):
    c = crash_cluster
    data = gaussian_mixture(60050, 256, seed=21)
    with psycopg.connect(db_uri(c, "dur"), autocommit=True) as conn:
        conn.execute("CREATE TABLE b (id int PRIMARY KEY, emb embedding(256))")
        copy_rows(conn, "b", np.arange(1, 60001), data[:60000])
        conn.execute("CHECKPOINT")
    errors = []

    def build():
        try:
            with psycopg.connect(db_uri(c, "dur"), autocommit=True) as conn:
                conn.execute("CREATE INDEX b_ix ON b USING rsclip (emb embedding_ip_ops)")
        except psycopg.Error as e:
            errors.append(e)

    t = threading.Thread(target=build)
    t.start()
    with psycopg.connect(db_uri(c, "dur"), autocommit=True) as watch:
        def writing():
            row = watch.execute("SELECT phase FROM pg_stat_progress_create_index").fetchone()
            return row is not None and row[0] == "building index: assigning and writing rows"
        assert wait_for(writing), "the build never reached its writing phase"
    crash_and_restart(c)
    t.join()
    assert errors, "the build was interrupted"
    with psycopg.connect(db_uri(c, "dur"), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM b").fetchone()[0] == 60000
        # The interrupted CREATE INDEX left nothing behind; a new one is complete and correct.
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'b_ix'").fetchone()[0] == 0
        conn.execute("CREATE INDEX b_ix ON b USING rsclip (emb embedding_ip_ops)")
        report = conn.execute("SELECT rsclip_index_check('b_ix')").fetchone()[0]
        assert report["index_tuples"] == 60000
        assert mean_recall(conn, "b", data[60000:]) >= 0.95


def test_kill_during_inserts(crash_cluster):
    c = crash_cluster
    data = gaussian_mixture(40050, 128, seed=22)
    with psycopg.connect(db_uri(c, "dur"), autocommit=True) as conn:
        conn.execute("CREATE TABLE ins (id int PRIMARY KEY, emb embedding(128))")
        copy_rows(conn, "ins", np.arange(1, 5001), data[:5000])
        conn.execute("CREATE INDEX ins_ix ON ins USING rsclip (emb embedding_ip_ops)")
    committed = []

    def inserter(offset):
        try:
            with psycopg.connect(db_uri(c, "dur"), autocommit=True) as conn:
                for i in range(5001 + offset, 40001, 2):
                    conn.execute("INSERT INTO ins VALUES (%s, %s::embedding)", (i, vec_text(data[i - 1])))
                    committed.append(i)
        except psycopg.Error:
            pass  # the server went away

    threads = [threading.Thread(target=inserter, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    assert wait_for(lambda: len(committed) > 1500, timeout=120)
    crash_and_restart(c)
    for t in threads:
        t.join()
    with psycopg.connect(db_uri(c, "dur"), autocommit=True) as conn:
        present = {r[0] for r in conn.execute("SELECT id FROM ins")}
        assert set(committed) <= present, "a committed row was lost"
        report = conn.execute("SELECT rsclip_index_check('ins_ix')").fetchone()[0]
        assert report["index_tuples"] >= len(present)  # entries of rows whose transaction died stay until VACUUM
        assert report["heap_rows_checked"] == len(present)
        assert mean_recall(conn, "ins", data[40000:]) >= 0.95
        conn.execute("VACUUM ins")
        assert conn.execute("SELECT rsclip_index_check('ins_ix')").fetchone()[0]["index_tuples"] == len(present)


def test_kill_during_vacuum(crash_cluster):
    c = crash_cluster
    data = gaussian_mixture(60050, 128, seed=23)
    with psycopg.connect(db_uri(c, "dur"), autocommit=True) as conn:
        conn.execute("CREATE TABLE vac (id int PRIMARY KEY, emb embedding(128))")
        copy_rows(conn, "vac", np.arange(1, 60001), data[:60000])
        conn.execute("CREATE INDEX vac_ix ON vac USING rsclip (emb embedding_ip_ops)")
        conn.execute("DELETE FROM vac WHERE id % 3 <> 0")

    def vacuum():
        try:
            with psycopg.connect(db_uri(c, "dur"), autocommit=True) as conn:
                conn.execute("SET vacuum_cost_delay = '2ms'")
                conn.execute("SET vacuum_cost_limit = 20")
                conn.execute("VACUUM vac")
        except psycopg.Error:
            pass

    t = threading.Thread(target=vacuum)
    t.start()
    with psycopg.connect(db_uri(c, "dur"), autocommit=True) as watch:
        def in_index_phase():
            row = watch.execute("SELECT phase FROM pg_stat_progress_vacuum").fetchone()
            return row is not None and row[0] == "vacuuming indexes"
        assert wait_for(in_index_phase, timeout=120), "VACUUM never reached its index phase"
    time.sleep(0.3)
    crash_and_restart(c)
    t.join()
    with psycopg.connect(db_uri(c, "dur"), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM vac").fetchone()[0] == 20000
        report = conn.execute("SELECT rsclip_index_check('vac_ix')").fetchone()[0]
        assert report["heap_rows_checked"] == 20000
        assert mean_recall(conn, "vac", data[60000:]) >= 0.95
        conn.execute("VACUUM vac")
        assert conn.execute("SELECT rsclip_index_check('vac_ix')").fetchone()[0]["index_tuples"] == 20000


def test_streaming_replica_returns_the_primarys_results():
    consistency = ["wal_consistency_checking='generic'"]
    primary = fresh_cluster("primary", BASE_PORT + 1, consistency)
    standby = None
    try:
        standby = start_standby(primary, "standby", BASE_PORT + 2, consistency)
        setup_db(primary)
        data = gaussian_mixture(12050, 128, seed=31)
        with psycopg.connect(db_uri(primary, "dur"), autocommit=True) as p:
            p.execute("CREATE TABLE r (id int PRIMARY KEY, emb embedding(128))")
            copy_rows(p, "r", np.arange(1, 10001), data[:10000])
            p.execute("CREATE INDEX r_ix ON r USING rsclip (emb embedding_ip_ops)")
            for i in range(10001, 12001):
                p.execute("INSERT INTO r VALUES (%s, %s::embedding)", (i, vec_text(data[i - 1])))
            p.execute("DELETE FROM r WHERE id % 4 = 0")
            p.execute("VACUUM r")
            wait_for_replay(p, standby, "dur")
            with psycopg.connect(db_uri(standby, "dur"), autocommit=True) as s:
                assert s.execute("SELECT pg_is_in_recovery()").fetchone()[0]
                for q in data[12000:]:
                    sql = "SELECT id, emb <#> %s::embedding FROM r ORDER BY emb <#> %s::embedding LIMIT 10"
                    for conn in (p, s):
                        conn.execute("SET enable_seqscan = off")
                    want = p.execute(sql, (vec_text(q), vec_text(q))).fetchall()
                    got = s.execute(sql, (vec_text(q), vec_text(q))).fetchall()
                    assert got == want
                    assert "Index Scan using r_ix" in "\n".join(
                        x[0] for x in s.execute("EXPLAIN " + sql, (vec_text(q), vec_text(q))))
                report = s.execute("SELECT rsclip_index_check('r_ix')").fetchone()[0]
                on_primary = p.execute("SELECT rsclip_index_check('r_ix')").fetchone()[0]
                assert report == on_primary
                assert report["heap_rows_checked"] == 9000, report
        assert standby.running(), "standby stopped (a WAL consistency check failed?)"
        assert "inconsistent page" not in server_log(standby)
    finally:
        if standby is not None:
            standby.stop("immediate")
        primary.stop("immediate")
