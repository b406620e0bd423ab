"""COPY BINARY round trips, lying binary headers, and text output across client sessions."""
import random
import struct

import psycopg
import pytest

from conftest import uri_for

EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1.1754944e-38, 3.4028235e38, -3.4028235e38,
               0.1, 1 / 3, 1e-5, 123456.7, 2.1989619e08]


def random_embedding(rng, dims):
    return [struct.unpack("f", struct.pack("f", rng.uniform(-1, 1) * 10 ** rng.randint(-20, 20)))[0]
            for _ in range(dims)]


def literal(values):
    return "[" + ",".join(repr(v) for v in values) + "]"


def test_copy_binary_round_trip(conn):
    rng = random.Random(7)
    conn.execute("CREATE TABLE src (id int PRIMARY KEY, e embedding)")
    conn.execute("CREATE TABLE dst (id int PRIMARY KEY, e embedding)")
    rows = [(0, EDGE_FLOATS)] + [(i, random_embedding(rng, rng.choice([1, 3, 768, 1024, 2000])))
                                 for i in range(1, 200)]
    with conn.cursor() as cur:
        for i, v in rows:
            cur.execute("INSERT INTO src VALUES (%s, %s::embedding)", (i, literal(v)))
        buf = bytearray()
        with cur.copy("COPY src TO STDOUT (FORMAT binary)") as copy:
            for chunk in copy:
                buf += chunk
        with cur.copy("COPY dst FROM STDIN (FORMAT binary)") as copy:
            copy.write(bytes(buf))
    mismatched = conn.execute(
        "SELECT count(*) FROM src FULL JOIN dst USING (id) WHERE src.e::text IS DISTINCT FROM dst.e::text"
        " OR embedding_send(src.e) IS DISTINCT FROM embedding_send(dst.e)").fetchone()[0]
    assert mismatched == 0
    assert conn.execute("SELECT count(*) FROM dst").fetchone()[0] == len(rows)
    # Bit-exact, including the sign of zero and subnormals.
    got = conn.execute("SELECT e::real[] FROM dst WHERE id = 0").fetchone()[0]
    assert [struct.pack("f", x) for x in got] == [struct.pack("f", x) for x in EDGE_FLOATS]


def copy_binary_payload(field: bytes) -> bytes:
    header = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
    row = struct.pack("!h", 1) + struct.pack("!i", len(field)) + field
    return header + row + struct.pack("!h", -1)


@pytest.mark.parametrize("field, needle", [
    (struct.pack("!HH", 3, 0) + struct.pack("!f", 1.0), "header says 3 dimensions"),     # claims 3, has 1
    (struct.pack("!HH", 1, 0) + struct.pack("!ff", 1.0, 2.0), "header says 1 dimensions"),  # trailing bytes
    (struct.pack("!HH", 0, 0), "at least 1 dimension"),
    (struct.pack("!HH", 60000, 0), "more than 16000"),
    (struct.pack("!H", 1), "4-byte header"),
    (struct.pack("!HH", 1, 7) + struct.pack("!f", 1.0), "unknown flags"),
    (struct.pack("!HH", 1, 0) + struct.pack("!f", float("nan")), "NaN or infinite"),
])
def test_lying_binary_input_is_rejected(conn, field, needle):
    conn.execute("CREATE TABLE IF NOT EXISTS bin (e embedding)")
    with pytest.raises(psycopg.errors.InvalidBinaryRepresentation) as exc:
        with conn.cursor() as cur:
            with cur.copy("COPY bin FROM STDIN (FORMAT binary)") as copy:
                copy.write(copy_binary_payload(field))
    assert needle in str(exc.value)
    assert exc.value.sqlstate == "22P03"
    # The backend is alive and the table untouched.
    assert conn.execute("SELECT count(*) FROM bin").fetchone()[0] == 0


def test_binary_protocol_parameters_round_trip(conn):
    # psycopg sends/receives with binary format when asked, exercising recv/send directly.
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT '[1,-2.5,3e-20]'::embedding")
        raw = cur.fetchone()[0]
    assert raw == struct.pack("!HH", 3, 0) + struct.pack("!fff", 1, -2.5, 3e-20)


def test_text_typmod_survives_reconnect(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute("CREATE TABLE tm (e embedding(4))")
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        assert c.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                         " WHERE attrelid = 'tm'::regclass AND attname = 'e'").fetchone()[0] == "embedding(4)"
        with pytest.raises(psycopg.errors.DataException, match="expected 4 dimensions, not 3"):
            c.execute("INSERT INTO tm VALUES ('[1,2,3]')")
