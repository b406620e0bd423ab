"""Throwaway clusters for tests that crash, replicate or restart a server (never the shared
test server): fresh clusters, a streaming hot standby made with pg_basebackup, and small waits."""
import os
import shutil
import sys
import time
from pathlib import Path

import psycopg

from conftest import PG_MAJOR

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from cluster import Cluster, as_pg_user  # noqa: E402,F401


def fresh_cluster(name, port, settings=()):
    c = Cluster(PG_MAJOR, name, port)
    c.stop("immediate")
    c.init(list(settings))
    c.start(list(settings))
    return c


def db_uri(c, db="postgres"):
    return c.uri.rsplit("/", 1)[0] + "/" + db


def server_log(c):
    return as_pg_user(["cat", str(c.log)], capture_output=True, text=True).stdout


def wait_for(predicate, timeout=60, step=0.01):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(step)
    return False


def start_standby(primary, name, port, settings=()):
    """A streaming hot standby of `primary` (pg_basebackup -R), started and returned."""
    standby = Cluster(PG_MAJOR, name, port)
    standby.stop("immediate")
    shutil.rmtree(standby.data, ignore_errors=True)
    standby.data.mkdir(mode=0o700, parents=True)
    if os.geteuid() == 0:
        pg_user = os.environ.get("PG_USER", "postgres")
        shutil.chown(standby.data, pg_user, pg_user)
    r = as_pg_user([str(primary.bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
                    "-U", "postgres", "-D", str(standby.data), "-R", "-X", "stream", "-c", "fast"],
                   capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    standby.start(list(settings) + ["hot_standby=on"])
    return standby


def wait_for_replay(primary_conn, standby, db):
    """Waits until `standby` has replayed everything `primary_conn`'s server has written."""
    lsn = primary_conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]

    def replayed():
        try:
            with psycopg.connect(db_uri(standby, db), autocommit=True) as s:
                return s.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]
        except psycopg.OperationalError:
            return False
    assert wait_for(replayed, timeout=120, step=0.2), "standby did not catch up"
