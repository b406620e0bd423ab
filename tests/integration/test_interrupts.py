"""Cancel, statement_timeout and termination reach a backend while it decodes a large image:
in the single and the array encoders and in rsclip_backfill. Before decoding ran on threads
the backend waits for interruptibly, a 9000 x 9000 PNG was cancelled only when its decode ended."""
import struct
import threading
import time
import zlib

import psycopg
import pytest

from conftest import uri_for

SIDE = 9000
# The bound the tests hold a cancel to: the poll interval is 5 ms, the rest is slack for a
# loaded 2-core machine. The decode itself must take several times longer for the test to mean
# anything: the image fixture grows the picture until it does, and
# test_the_image_is_slow_to_decode checks that it got there.
BOUND = 0.30
SLOW_ENOUGH = 4 * BOUND
LARGEST_SIDE = 16384
MAX_PIXELS = LARGEST_SIDE * LARGEST_SIDE


def big_png(side=SIDE) -> bytes:
    """A side x side grey RGB PNG: small to store (it compresses to ~1 MB), slow to decode.
    Every row uses the Paeth filter, the decoder's costliest: with a flat picture its residuals
    are all zero, so the file stays small while each byte still goes through the predictor."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    z = zlib.compressobj(1)
    pixel = bytes([120, 130, 140])
    first = b"\x04" + pixel + bytes(3 * (side - 1))  # no row above: Paeth predicts from the left
    rest = b"\x04" + bytes(3 * side)  # the row above predicts every byte
    body = z.compress(first) + b"".join(z.compress(rest) for _ in range(side - 1)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def connect(dbname):
    c = psycopg.connect(uri_for(dbname), autocommit=True)
    c.execute("SET rsclip.cache = off")  # every call decodes
    c.execute(f"SET rsclip.max_image_pixels = {MAX_PIXELS}")
    return c


def decode_seconds(dbname, img) -> float:
    with connect(dbname) as c:
        c.execute("SELECT rsclip_encode_image(%s)", (img,))  # loads the model
        t0 = time.perf_counter()
        c.execute("SELECT rsclip_encode_image(%s)", (img,))
        return time.perf_counter() - t0


@pytest.fixture(scope="module")
def image(dbname):
    """Large enough that one decode takes SLOW_ENOUGH seconds on this machine: a fast machine
    decodes the 9000 x 9000 picture in about 0.5 s, too close to the bounds the tests check."""
    side, img = SIDE, big_png(SIDE)
    for _ in range(3):
        took = decode_seconds(dbname, img)
        if took >= SLOW_ENOUGH or side == LARGEST_SIDE:
            break
        side = min(LARGEST_SIDE, int(side * (1.2 * SLOW_ENOUGH / took) ** 0.5))
        img = big_png(side)
    return img


def test_the_image_is_slow_to_decode(dbname, image):
    took = decode_seconds(dbname, image)
    assert took > 2 * BOUND, f"decoding took {took:.2f} s: too fast for the interrupt tests to mean anything"


@pytest.mark.parametrize("sql, args", [
    ("SELECT rsclip_encode_image(%s)", lambda img: (img,)),
    ("SELECT rsclip_encode_images(ARRAY[%s, %s])", lambda img: (img, img)),
])
def test_statement_timeout_interrupts_a_decode(dbname, image, sql, args):
    with connect(dbname) as c:
        c.execute("SELECT rsclip_encode_text('warm up')")
        c.execute("SET statement_timeout = '100ms'")
        t0 = time.perf_counter()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute(sql, args(image))
        took = time.perf_counter() - t0
        assert took < 0.1 + BOUND, f"cancelled after {took:.2f} s"
        # the backend is fine afterwards, and the threads left behind do not disturb it
        c.execute("RESET statement_timeout")
        assert c.execute("SELECT rsclip_encode_text('after the cancel') IS NOT NULL").fetchone()[0]


def cancel_later(dbname, pid, after, how="pg_cancel_backend"):
    def run():
        time.sleep(after)
        with psycopg.connect(uri_for(dbname), autocommit=True) as other:
            other.execute(f"SELECT {how}(%s)", (pid,))
    t = threading.Thread(target=run)
    t.start()
    return t


def test_pg_cancel_backend_interrupts_a_decode(dbname, image):
    with connect(dbname) as c:
        c.execute("SELECT rsclip_encode_text('warm up')")
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        t = cancel_later(dbname, pid, 0.1)
        t0 = time.perf_counter()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("SELECT rsclip_encode_image(%s)", (image,))
        took = time.perf_counter() - t0
        t.join()
        assert took < 0.1 + BOUND, f"cancelled after {took:.2f} s"


def test_pg_terminate_backend_interrupts_a_decode(dbname, image):
    c = connect(dbname)
    c.execute("SELECT rsclip_encode_text('warm up')")
    pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
    t = cancel_later(dbname, pid, 0.1, "pg_terminate_backend")
    t0 = time.perf_counter()
    with pytest.raises(psycopg.OperationalError):
        c.execute("SELECT rsclip_encode_image(%s)", (image,))
    took = time.perf_counter() - t0
    t.join()
    c.close()
    assert took < 0.1 + BOUND, f"terminated after {took:.2f} s"


def test_cancel_interrupts_a_backfill_decode(dbname, image):
    with connect(dbname) as c:
        c.execute("DROP TABLE IF EXISTS big_tiles")
        c.execute("CREATE TABLE big_tiles (id int PRIMARY KEY, img bytea, emb embedding)")
        for i in range(4):
            c.execute("INSERT INTO big_tiles VALUES (%s, %s, NULL)", (i, image))
        c.execute("SELECT rsclip_encode_text('warm up')")
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        t = cancel_later(dbname, pid, 0.3)
        t0 = time.perf_counter()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("CALL rsclip_backfill('big_tiles', 'img', 'emb', batch_size => 2)")
        took = time.perf_counter() - t0
        t.join()
        assert took < 0.3 + BOUND, f"cancelled after {took:.2f} s"
        # nothing half-written: the rows are either embedded or still NULL, and a new run finishes
        c.execute("CALL rsclip_backfill('big_tiles', 'img', 'emb', batch_size => 2)")
        assert c.execute("SELECT count(*) FROM big_tiles WHERE emb IS NULL").fetchone()[0] == 0


def test_pg_terminate_backend_during_a_backfill_leaves_the_server_up(dbname, image):
    """Terminated while it waits for the model job of a batch handed over (a FATAL, which
    exits without unwinding): the backend must still wait for that job before it exits, or
    ONNX Runtime's destructors run under it and the postmaster restarts every backend."""
    with connect(dbname) as admin:
        started = admin.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
        admin.execute("DROP TABLE IF EXISTS big_tiles_term")
        admin.execute("CREATE TABLE big_tiles_term (id int PRIMARY KEY, img bytea, emb embedding)")
        for i in range(6):
            admin.execute("INSERT INTO big_tiles_term VALUES (%s, %s, NULL)", (i, image))
    c = connect(dbname)
    c.execute("SELECT rsclip_encode_text('warm up')")
    pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
    t = cancel_later(dbname, pid, 1.5, "pg_terminate_backend")
    t0 = time.perf_counter()
    with pytest.raises(psycopg.OperationalError):
        c.execute("CALL rsclip_backfill('big_tiles_term', 'img', 'emb', batch_size => 1)")
    took = time.perf_counter() - t0
    t.join()
    c.close()
    assert took < 1.5 + 3.0, f"terminated after {took:.2f} s"
    with connect(dbname) as admin:
        assert admin.execute("SELECT pg_postmaster_start_time()").fetchone()[0] == started, \
            "the server restarted: a backend crashed on its way out"
        gone = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]
        assert gone == 0
