"""Shared inference workers (rsclip.inference = worker) on a server that preloads rsclip: the
same embeddings as backend mode, batches formed across backends, no model session in the
backends, cancellation while waiting, a worker stopped or killed, a model that fails to load
in the workers, and a model switch.

Each test module runs its own throwaway cluster (tools/cluster.py), never the shared server."""
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import psycopg.sql
import pytest

from clusters import as_pg_user, db_uri, fresh_cluster, server_log, wait_for
from conftest import PG_MAJOR
from test_backfill import make_table

PORT = 25540 + int(PG_MAJOR) % 10 * 2
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REFERENCE = json.loads((FIXTURES / "reference" / "reference.json").read_text())
LOCAL = Path(os.environ["RSCLIP_LOCAL"])
WORKERS = 2


def image_bytes(name):
    return (FIXTURES / "reference" / REFERENCE["images"][name]["file"]).read_bytes()


def vec(text):
    return np.array([float(x) for x in text.strip("[]").split(",")])


@pytest.fixture(scope="module")
def server():
    c = fresh_cluster("infer", PORT, [
        "shared_preload_libraries=rsclip",
        f"rsclip.inference_workers={WORKERS}",
        "rsclip.inference_queue_slots=6",
        "rsclip.inference=worker",
        "rsclip.cache=off",
    ])
    with psycopg.connect(c.uri, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS infer")
        admin.execute("CREATE DATABASE infer")
    with psycopg.connect(db_uri(c, "infer"), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION rsclip")
    assert wait_for(lambda: len(running_workers(c)) == WORKERS, timeout=30), server_log(c)
    yield c
    c.stop("immediate")


def connect(c):
    return psycopg.connect(db_uri(c, "infer"), autocommit=True)


def running_workers(c):
    """Pids of the cluster's inference workers (shared-memory-only background workers are not
    in pg_stat_activity): the postmaster's children named so."""
    pid_file = as_pg_user(["cat", str(c.data / "postmaster.pid")], capture_output=True, text=True).stdout
    if not pid_file:
        return []
    postmaster = pid_file.split()[0]
    ps = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", postmaster],
                        capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if "rsclip inference worker" in line]


def serving(c):
    """Whether the server answers an encode again (after a crash restart)."""
    try:
        with connect(c) as conn:
            conn.execute("SELECT rsclip_encode_text('back again')")
            return True
    except psycopg.Error:
        return False


def stats(conn):
    return {r[0]: r for r in conn.execute(
        "SELECT worker, running, requests, batches, rows, errors, model_loads, queue_wait_p50_us "
        "FROM rsclip_inference_stats ORDER BY worker")}


def totals(conn):
    s = stats(conn).values()
    return {"requests": sum(r[2] for r in s), "batches": sum(r[3] for r in s),
            "rows": sum(r[4] for r in s), "errors": sum(r[5] for r in s)}


def encode_both(conn, sql, params):
    """(worker mode's embedding, backend mode's) of one SELECT."""
    conn.execute("SET rsclip.inference = worker")
    w = conn.execute(sql, params).fetchone()[0]
    conn.execute("SET rsclip.inference = backend")
    b = conn.execute(sql, params).fetchone()[0]
    conn.execute("SET rsclip.inference = worker")
    return w, b


def test_worker_mode_gives_backend_modes_embeddings(server):
    with connect(server) as conn:
        assert conn.execute("SELECT rsclip_model_info()->>'inference'").fetchone()[0] == "worker"
        for entry in REFERENCE["texts"][:4]:
            w, b = encode_both(conn, "SELECT rsclip_encode_text(%s)::text", (entry["text"],))
            assert np.abs(vec(w) - vec(b)).max() < 1e-5, entry["text"]
        names = sorted(REFERENCE["images"])[:3]
        for n in names:
            w, b = encode_both(conn, "SELECT rsclip_encode_image(%s)::text", (image_bytes(n),))
            assert np.abs(vec(w) - vec(b)).max() < 1e-5, n
        # arrays: several images exceed a slot's inline room and travel in a DSM segment
        blobs = [image_bytes(n) for n in names]
        w, b = encode_both(conn, "SELECT rsclip_encode_images(%s)::text[]", (blobs,))
        assert len(w) == len(blobs)
        for x, y in zip(w, b):
            assert np.abs(vec(x) - vec(y)).max() < 1e-5
        texts = [e["text"] for e in REFERENCE["texts"]] * 5
        w, b = encode_both(conn, "SELECT rsclip_encode_texts(%s)::text[]", (texts,))
        for x, y in zip(w, b):
            assert np.abs(vec(x) - vec(y)).max() < 1e-5
        # the probability goes through the same encoders
        conn.execute("SELECT rsclip_probability(rsclip_encode_image(%s), rsclip_encode_text('x'))",
                     (blobs[0],))


def test_backends_load_no_session_and_stats_count_the_requests(server):
    with connect(server) as conn:
        before = totals(conn)
        conn.execute("SELECT rsclip_encode_text('a harbour with boats')")
        conn.execute("SELECT rsclip_encode_image(%s)", (image_bytes(sorted(REFERENCE["images"])[0]),))
        info = conn.execute("SELECT rsclip_model_info()").fetchone()[0]
        assert info["sessions_loaded"] == {"vision": False, "text": False}, info
        assert info["load_counts"]["text"] == 0 and info["load_counts"]["vision"] == 0
        assert info["inference_workers_running"] == WORKERS
        after = totals(conn)
        assert after["requests"] == before["requests"] + 2
        rows = stats(conn)
        assert len(rows) == WORKERS and all(r[1] for r in rows.values())
        assert any(r[7] is not None for r in rows.values())


def test_concurrent_clients_share_batches(server):
    """Eight clients encoding at once: every answer is its own text's, and batches form."""
    texts = [f"tile {i}: a river crossing farmland near a town" for i in range(240)]
    with connect(server) as conn:
        conn.execute("SET rsclip.inference = backend")
        want = {t: vec(conn.execute("SELECT rsclip_encode_text(%s)::text", (t,)).fetchone()[0])
                for t in texts}
        before = totals(conn)
    errors = []

    def client(part):
        try:
            with connect(server) as c:
                for t in part:
                    got = vec(c.execute("SELECT rsclip_encode_text(%s)::text", (t,)).fetchone()[0])
                    if np.abs(got - want[t]).max() >= 1e-5:
                        errors.append(f"wrong answer for {t!r}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(texts[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    with connect(server) as conn:
        after = totals(conn)
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == len(texts)
    # eight clients over a six-slot queue: callers waited for slots, none failed, and
    # requests shared model runs
    assert batches < requests, (requests, batches)
    print(f"{requests} requests in {batches} batches: {requests / batches:.2f} per batch")


def test_cancel_and_timeout_while_the_workers_are_stopped(server):
    pids = running_workers(server)
    for p in pids:
        as_pg_user(["kill", "-STOP", str(p)])
    try:
        with connect(server) as conn:
            conn.execute("SET statement_timeout = '300ms'")
            t0 = time.time()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT rsclip_encode_text('nobody answers')")
            assert time.time() - t0 < 5
            conn.execute("RESET statement_timeout")
            # pg_cancel_backend from another session
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            threading.Timer(0.3, lambda: psycopg.connect(server.uri, autocommit=True).execute(
                "SELECT pg_cancel_backend(%s)", (pid,))).start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT rsclip_encode_images(ARRAY[%s, %s])",
                             (image_bytes(sorted(REFERENCE["images"])[0]),
                              image_bytes(sorted(REFERENCE["images"])[1])))
    finally:
        for p in pids:
            as_pg_user(["kill", "-CONT", str(p)])
    # the cancelled requests' slots came back and the workers answer again
    with connect(server) as conn:
        for i in range(10):
            conn.execute("SELECT rsclip_encode_text(%s)", (f"after the cancel {i}",))


def test_a_model_the_workers_cannot_load_fails_callers_with_its_error(server):
    dst = LOCAL / "models" / "infer-damaged"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(LOCAL / "models" / "tiny-siglip", dst)
    os.chmod(dst, 0o755)
    data = bytearray((dst / "text.onnx").read_bytes())
    data[200] ^= 0xFF
    (dst / "text.onnx").write_bytes(bytes(data))
    try:
        with connect(server) as conn:
            conn.execute("SELECT set_config('rsclip.model_path', %s, false)", (str(dst),))
            for _ in range(2):  # the second answer comes from the back-off, as fast
                t0 = time.time()
                with pytest.raises(psycopg.errors.IoError, match="text.onnx"):
                    conn.execute("SELECT rsclip_encode_text('harbour')")
                assert time.time() - t0 < 5
            conn.execute("RESET rsclip.model_path")
            conn.execute("SELECT rsclip_encode_text('harbour')")
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def test_a_new_model_path_switches_the_workers_model(server):
    fp16 = fp16_model()
    with connect(server) as conn:
        loads = sum(r[6] for r in stats(conn).values())
        base = conn.execute("SELECT rsclip_encode_text('a bridge')::text").fetchone()[0]
        conn.execute("SELECT set_config('rsclip.model_path', %s, false)", (str(fp16),))
        w, b = encode_both(conn, "SELECT rsclip_encode_text('a bridge')::text", ())
        assert np.abs(vec(w) - vec(b)).max() < 1e-5
        assert w != base, "the fp16 model answered like the fp32 one"
        assert conn.execute("SELECT rsclip_model_info()->>'fingerprint'").fetchone()[0]
        assert sum(r[6] for r in stats(conn).values()) > loads
        conn.execute("RESET rsclip.model_path")
        assert conn.execute("SELECT rsclip_encode_text('a bridge')::text").fetchone()[0] == base


def test_worker_mode_without_preloading_says_what_is_missing(server):
    c = fresh_cluster("infer-nopreload", PORT + 1, ["shared_preload_libraries=''"])
    try:
        with psycopg.connect(c.uri, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS rsclip")
            conn.execute("SET rsclip.inference = backend")
            conn.execute("SELECT rsclip_encode_text('x')")  # backend mode needs no workers
            conn.execute("SET rsclip.inference = worker")
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                               match="shared_preload_libraries"):
                conn.execute("SELECT rsclip_encode_text('not in the cache yet')")
            assert conn.execute("SELECT rsclip_inference_stats()").fetchone()[0] == []
        assert running_workers(c) == []
    finally:
        c.stop("immediate")


def test_a_bad_device_list_is_refused_by_name(server):
    """rsclip.cuda_devices is read once, by the postmaster. ALTER SYSTEM refuses a value that is
    not a device list at once (22023, naming the setting), instead of a restart finding out; one
    written into a config file is reported at startup (Postgres keeps the default for a custom
    setting it cannot apply: the workers run on the CPU)."""
    with connect(server) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="rsclip.cuda_devices") as e:
            conn.execute("ALTER SYSTEM SET rsclip.cuda_devices = '0,gpu1'")
        assert "device numbers such as '0,1'" in str(e.value.diag.message_detail)
        conn.execute("ALTER SYSTEM SET rsclip.cuda_devices = '0, 1'")  # a valid list is accepted
        conn.execute("ALTER SYSTEM RESET rsclip.cuda_devices")
    c = fresh_cluster("infer-baddev", PORT + 1, ["rsclip.cuda_devices='0,gpu1'"])
    try:
        log = server_log(c)
        assert 'invalid value for parameter "rsclip.cuda_devices": "0,gpu1"' in log, log[-2000:]
        assert "device numbers such as '0,1'" in log, log[-2000:]
        with psycopg.connect(c.uri, autocommit=True) as cc:
            assert cc.execute("SHOW rsclip.cuda_devices").fetchone()[0] == ""
    finally:
        c.stop("immediate")


def test_a_killed_worker_makes_the_server_recover_and_serve_again(server):
    victim = running_workers(server)[0]
    as_pg_user(["kill", "-9", str(victim)])
    # the postmaster treats it as a crash: every backend restarts, then the workers come back
    assert wait_for(lambda: serving(server), timeout=60, step=0.5), server_log(server)[-3000:]
    assert wait_for(lambda: len(running_workers(server)) == WORKERS, timeout=30)
    assert victim not in running_workers(server)
    assert "rsclip inference worker" in server_log(server)


def fp16_model():
    fp16 = LOCAL / "models" / "tiny-siglip-fp16"
    if not fp16.exists():
        shutil.copytree(FIXTURES / "tiny-siglip-fp16", fp16)
        os.chmod(fp16, 0o755)
    return fp16


def test_two_models_at_once_never_share_a_batch(server):
    """Clients on two model paths at the same time: every answer is its own model's (a batch
    mixing models would give one of them the other's embedding)."""
    paths = [str(LOCAL / "models" / "tiny-siglip"), str(fp16_model())]
    texts = [f"field {i} beside a canal" for i in range(40)]
    want = {}
    with connect(server) as conn:
        conn.execute("SET rsclip.inference = backend")
        for p in paths:
            conn.execute("SELECT set_config('rsclip.model_path', %s, false)", (p,))
            for t in texts:
                want[p, t] = vec(conn.execute("SELECT rsclip_encode_text(%s)::text", (t,)).fetchone()[0])
    assert any(np.abs(want[paths[0], t] - want[paths[1], t]).max() > 1e-4 for t in texts)
    errors = []

    def client(path, part):
        try:
            with connect(server) as c:
                c.execute("SELECT set_config('rsclip.model_path', %s, false)", (path,))
                for t in part:
                    got = vec(c.execute("SELECT rsclip_encode_text(%s)::text", (t,)).fetchone()[0])
                    if np.abs(got - want[path, t]).max() >= 1e-5:
                        errors.append(f"{path}: {t!r} answered by another model")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(paths[i % 2], texts[i // 2::3]))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_a_reloaded_model_path_reaches_new_sessions_and_the_workers(server):
    fp16 = str(fp16_model())
    with connect(server) as conn:
        conn.execute("SET rsclip.inference = backend")
        conn.execute("SELECT set_config('rsclip.model_path', %s, false)", (fp16,))
        want = conn.execute("SELECT rsclip_encode_text('a reloaded model')::text").fetchone()[0]
        fingerprint = conn.execute("SELECT rsclip_model_info()->>'fingerprint'").fetchone()[0]
    with psycopg.connect(server.uri, autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET rsclip.model_path = %s" % psycopg.sql.quote(fp16))
        admin.execute("SELECT pg_reload_conf()")
    try:
        def reloaded():
            with connect(server) as c:
                return c.execute("SHOW rsclip.model_path").fetchone()[0] == fp16
        assert wait_for(reloaded, timeout=10, step=0.1)
        with connect(server) as conn:
            got = conn.execute("SELECT rsclip_encode_text('a reloaded model')::text").fetchone()[0]
            assert conn.execute("SELECT rsclip_model_info()->>'fingerprint'").fetchone()[0] == fingerprint
        assert np.abs(vec(got) - vec(want)).max() < 1e-5
    finally:
        with psycopg.connect(server.uri, autocommit=True) as admin:
            admin.execute("ALTER SYSTEM RESET rsclip.model_path")
            admin.execute("SELECT pg_reload_conf()")


# ---- rsclip_backfill in worker mode ------------------------------------------------------

# make_table(conn, name, n, garbage=(), nulls=0, slow_ms=0): n rows cycling through the fixture
# images (sorted by name), then the garbage rows; `writes` counts the updates that changed emb
BACKFILL_IMAGES = [image_bytes(n) for n in sorted(REFERENCE["images"])]
GARBAGE = [b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40]


def backend_mode_embeddings(c):
    """Each fixture image's embedding in backend mode."""
    with connect(c) as conn:
        conn.execute("SET rsclip.inference = backend")
        return [vec(conn.execute("SELECT rsclip_encode_image(%s)::text", (b,)).fetchone()[0])
                for b in BACKFILL_IMAGES]


def assert_filled_like_backend_mode(conn, name, n, want):
    rows = conn.execute(f"SELECT id, emb::text, writes FROM {name} WHERE id < %s ORDER BY id", (n,)).fetchall()
    assert len(rows) == n
    for rid, emb, writes in rows:
        assert emb is not None, f"row {rid} was not filled"
        assert writes == 1, f"row {rid} was written {writes} times"
        assert np.abs(vec(emb) - want[rid % len(want)]).max() < 1e-5, f"row {rid}"


def test_backfill_in_worker_mode_runs_in_the_workers(server):
    want = backend_mode_embeddings(server)
    with connect(server) as conn:
        make_table(conn, "bf_worker", 45, garbage=GARBAGE)
        before = totals(conn)
        notices = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        conn.execute("CALL rsclip_backfill('bf_worker', 'img', 'emb', 4)")
        assert any("45 rows embedded" in n for n in notices), notices
        assert_filled_like_backend_mode(conn, "bf_worker", 45, want)
        logged = conn.execute("SELECT count(*) FROM rsclip_backfill_errors "
                              "WHERE tbl = 'bf_worker'::regclass").fetchone()[0]
        assert logged == len(GARBAGE)
        # the backend never loaded a session: the rows went through the workers
        info = conn.execute("SELECT rsclip_model_info()").fetchone()[0]
        assert info["load_counts"]["vision"] == 0, info
        after = totals(conn)
        assert after["rows"] - before["rows"] >= 45
        # batches of 4 queued two ahead: fewer requests than rows
        assert after["requests"] - before["requests"] < 45


def test_batches_handed_over_to_the_workers_are_matched_to_their_inputs(server):
    """The handed-over protocol of the backfill's encoding step in worker mode: inputs take the
    oldest queued batch that holds them (a batch whose rows another backfill took is given up,
    dropped rows are left out), a call with neither inputs nor prefetch forgets everything, and
    a request given up leaves no slot taken."""
    want = backend_mode_embeddings(server)
    imgs = BACKFILL_IMAGES
    with connect(server) as conn:
        def encode(inputs, prefetch):
            emb, err = conn.execute(
                "SELECT (r).embeddings::text[], (r).errors FROM "
                "(SELECT rsclip_backfill_encode(%s::bytea[], 'image', %s::bytea[]) r) q",
                (inputs, prefetch)).fetchone()
            return [None if e is None else vec(e) for e in emb], err

        def same(got, idx):
            return len(got) == len(idx) and all(
                (g is None and i is None) or (g is not None and i is not None
                                              and np.abs(g - want[i]).max() < 1e-5)
                for g, i in zip(got, idx))

        assert encode([], []) == ([], [])
        assert encode([], [imgs[0], imgs[1]]) == ([], [])
        time.sleep(0.5)  # decoded by now: the next call queues it for the workers
        assert encode([], [imgs[2], imgs[3]]) == ([], [])
        # the first batch was taken whole by someone else, the second lost a row
        got, _ = encode([imgs[3]], [imgs[1], GARBAGE[0], imgs[0]])
        assert same(got, [3])
        got, err = encode([imgs[1], GARBAGE[0], imgs[0]], [])
        assert same(got, [1, None, 0]) and err[0] is None and err[1] and err[2] is None
        # an interrupted run's batches are forgotten; inputs never handed over are encoded anyway
        encode([], [imgs[2]])
        time.sleep(0.5)
        encode([], [imgs[3]])
        encode([], [])
        got, _ = encode([imgs[0], imgs[2]], [])
        assert same(got, [0, 2])
        # nothing this session gave up still holds a queue slot (6 slots: more requests than
        # that still go through)
        for _ in range(8):
            assert same(encode([imgs[1]], [])[0], [1])


def test_two_backfills_share_the_workers_and_the_rows(server):
    want = backend_mode_embeddings(server)
    with connect(server) as conn:
        make_table(conn, "bf_shared", 120, slow_ms=1)
    notices = [[], []]

    def run(i):
        with connect(server) as c:
            c.add_notice_handler(lambda d: notices[i].append(d.message_primary))
            c.execute("CALL rsclip_backfill('bf_shared', 'img', 'emb', 4)")
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [int(n.split()[1]) for ns in notices for n in ns if "rows embedded" in n]
    assert sum(done) == 120 and len(done) == 2, notices
    with connect(server) as conn:
        assert_filled_like_backend_mode(conn, "bf_shared", 120, want)


def test_a_worker_killed_mid_backfill_loses_no_row(server):
    """SIGKILL of an inference worker while a backfill runs in worker mode: the server recovers
    as from any crash, the batches committed stay, and a second CALL fills the rest, each row
    written once and equal to backend mode's embedding."""
    want = backend_mode_embeddings(server)
    n = 400
    with connect(server) as conn:
        make_table(conn, "bf_kill", n, slow_ms=2)
    errors = []

    def run():
        try:
            with connect(server) as c:
                c.execute("CALL rsclip_backfill('bf_kill', 'img', 'emb', 4)")
        except psycopg.Error as e:  # the crash restart ends this session
            errors.append(e)
    t = threading.Thread(target=run)
    t.start()
    with connect(server) as conn:
        assert wait_for(lambda: conn.execute("SELECT count(emb) FROM bf_kill").fetchone()[0] >= 40,
                        timeout=120, step=0.02)
        as_pg_user(["kill", "-9", str(running_workers(server)[0])])
    t.join()
    assert errors, "the backfill finished before the worker was killed: make it slower"
    assert wait_for(lambda: serving(server), timeout=60, step=0.5), server_log(server)[-3000:]
    with connect(server) as conn:
        survived = conn.execute("SELECT count(emb) FROM bf_kill").fetchone()[0]
        assert 40 <= survived < n
        conn.execute("CALL rsclip_backfill('bf_kill', 'img', 'emb', 4)")
        assert_filled_like_backend_mode(conn, "bf_kill", n, want)
    assert wait_for(lambda: len(running_workers(server)) == WORKERS, timeout=30)
