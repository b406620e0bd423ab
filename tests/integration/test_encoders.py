"""Encoders through SQL against the committed tiny-random fixture: fidelity to the PyTorch
reference, batching, session reuse, and bad input (each a clear ERROR, backend alive after)."""
import json
import os
from pathlib import Path

import numpy as np
import psycopg
import pytest

from conftest import uri_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REFERENCE = json.loads((FIXTURES / "reference" / "reference.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def uncached(dbname):
    """These tests are about the encoders themselves (fidelity, sessions, errors): every call must
    run the model, so the result cache is off in this module's database (test_cache.py covers it
    and checks cached results equal these bit for bit)."""
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute(f'ALTER DATABASE "{dbname}" SET rsclip.cache = off')


def image_bytes(name):
    return (FIXTURES / "reference" / REFERENCE["images"][name]["file"]).read_bytes()


def cosine(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def emb(conn, sql, params=()):
    text = conn.execute(sql, params).fetchone()[0]
    return [float(x) for x in text.strip("[]").split(",")]


@pytest.mark.parametrize("name", sorted(REFERENCE["images"]))
def test_image_embedding_matches_pytorch(conn, name):
    got = emb(conn, "SELECT rsclip_encode_image(%s)::text", (image_bytes(name),))
    want = REFERENCE["images"][name]["embedding"]
    bound = 0.99999  # JPEG too: libjpeg-turbo's decoder gives Pillow's pixels exactly
    c = cosine(got, want)
    assert c >= bound, f"{name}: cosine {c}"
    assert abs(np.linalg.norm(got) - 1) < 1e-5


@pytest.mark.parametrize("i", range(len(REFERENCE["texts"])))
def test_text_embedding_matches_pytorch(conn, i):
    entry = REFERENCE["texts"][i]
    got = emb(conn, "SELECT rsclip_encode_text(%s)::text", (entry["text"],))
    c = cosine(got, entry["embedding"])
    assert c >= 0.99999, f"text {entry['text'][:40]!r}: cosine {c}"


def test_batch_equals_single(conn):
    names = sorted(REFERENCE["images"])
    blobs = [image_bytes(n) for n in names]
    conn.execute("SET rsclip.batch_size = 4")
    batch = conn.execute("SELECT e::text FROM unnest(rsclip_encode_images(%s)) e", (blobs,)).fetchall()
    for (text,), blob in zip(batch, blobs):
        single = emb(conn, "SELECT rsclip_encode_image(%s)::text", (blob,))
        got = [float(x) for x in text.strip("[]").split(",")]
        assert max(abs(a - b) for a, b in zip(got, single)) <= 1e-6
    texts = [t["text"] for t in REFERENCE["texts"]]
    tb = conn.execute("SELECT e::text FROM unnest(rsclip_encode_texts(%s)) e", (texts,)).fetchall()
    for (text,), t in zip(tb, texts):
        single = emb(conn, "SELECT rsclip_encode_text(%s)::text", (t,))
        got = [float(x) for x in text.strip("[]").split(",")]
        assert max(abs(a - b) for a, b in zip(got, single)) <= 1e-6
    conn.execute("RESET rsclip.batch_size")


def test_nulls(conn):
    assert conn.execute("SELECT rsclip_encode_image(NULL), rsclip_encode_text(NULL)").fetchone() == (None, None)
    row = conn.execute("SELECT array_length(a, 1), a[2] IS NULL, a[1] IS NOT NULL FROM rsclip_encode_texts(ARRAY['a', NULL, 'b']) a").fetchone()
    assert row == (3, True, True)


def vec_literal(v):
    return "[" + ",".join(repr(float(x)) for x in v) + "]"


def test_probability_matches_reference(conn):
    # The formula, on the reference embeddings themselves: equal to PyTorch's sigmoid.
    p = REFERENCE["probabilities"]
    for i, name in enumerate(p["images"]):
        img = REFERENCE["images"][name]["embedding"]
        for j, text in enumerate(REFERENCE["texts"]):
            got = conn.execute("SELECT rsclip_probability(%s::embedding, %s::embedding)",
                               (vec_literal(img), vec_literal(text["embedding"]))).fetchone()[0]
            want = p["values"][i][j]
            assert abs(got - want) <= 1e-6 * want + 1e-12, f"{name} x text {j}: {got} vs {want}"


def test_probability_end_to_end_for_every_image(conn):
    p = REFERENCE["probabilities"]
    for i, name in enumerate(p["images"]):
        for j in range(3):
            got = conn.execute("SELECT rsclip_probability(rsclip_encode_image(%s), rsclip_encode_text(%s))",
                               (image_bytes(name), REFERENCE["texts"][j]["text"])).fetchone()[0]
            want = p["values"][i][j]
            assert abs(got - want) <= 1e-4 * want + 1e-12, f"{name} x text {j}: {got} vs {want}"


def test_sessions_are_reused_and_lazy(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute("SELECT rsclip_encode_text('first')")
        info = c.execute("SELECT rsclip_model_info()").fetchone()[0]
        assert info["sessions_loaded"] == {"vision": False, "text": True}, "a text query must not load the vision graph"
        c.execute("SELECT rsclip_encode_text('second')")
        c.execute("SELECT rsclip_encode_texts(ARRAY['third', 'fourth'])")
        again = c.execute("SELECT rsclip_model_info()").fetchone()[0]
        assert again["load_counts"]["text"] == 1 and again["load_counts"]["tokenizer"] == 1
        assert again["provider"]["text"] == "cpu"
        assert again["embedding_dim"] == 32 and again["onnxruntime_version"]


def test_cpu_fallback_notice_once(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        notices = []
        c.add_notice_handler(lambda d: notices.append(d.message_primary))
        c.execute("SET rsclip.execution_provider = 'auto'")
        c.execute("SELECT rsclip_encode_text('a')")
        c.execute("SELECT rsclip_encode_image(%s)", (image_bytes("exact_64x64.png"),))
        assert sum("CUDA is not available" in n for n in notices) == 1, notices


def test_cuda_requested_without_cuda_is_an_error(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute("SET rsclip.execution_provider = 'cuda'")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="CUDA execution provider is not available"):
            c.execute("SELECT rsclip_encode_text('a')")
        c.execute("RESET rsclip.execution_provider")
        assert c.execute("SELECT embedding_dims(rsclip_encode_text('a'))").fetchone()[0] == 32


def png_header(w, h):
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


BAD_IMAGES = [
    ("empty", b"", "22P03", "empty"),
    ("random bytes", bytes(range(256)) * 4, "22023", "unrecognized image format"),
    ("unsupported format", b"GIF89a" + b"\0" * 100, "22023", "unrecognized image format"),
    ("truncated png", None, "22P03", "PNG"),
    ("truncated jpeg", None, "22P03", "JPEG"),
    ("corrupt tiff", None, "22P03", "TIFF"),
    ("huge png header", png_header(100000, 100000), "22023", "100000x100000"),
]


@pytest.mark.parametrize("label, data, sqlstate, needle", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_images_are_clear_errors(conn, label, data, sqlstate, needle):
    if data is None:
        src = {"truncated png": "rgb_97x61.png", "truncated jpeg": "photo_120x90.jpg", "corrupt tiff": "rgb_70x50.tiff"}[label]
        full = image_bytes(src)
        data = full[: len(full) // 2] if label != "corrupt tiff" else full[:8] + b"\xff" * 64
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT rsclip_encode_image(%s)", (data,))
    assert exc.value.sqlstate == sqlstate, f"{label}: {exc.value.sqlstate} {exc.value}"
    assert needle in str(exc.value)
    assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_one_pixel_image_and_long_text(conn):
    assert conn.execute("SELECT embedding_dims(rsclip_encode_image(%s))", (image_bytes("tiny_1x1.png"),)).fetchone()[0] == 32
    long = "flooded farmland " * 6000  # ~100k characters: truncated to 64 tokens, works
    assert conn.execute("SELECT embedding_dims(rsclip_encode_text(%s))", (long,)).fetchone()[0] == 32


def test_missing_model_and_wrong_library_name_the_path(dbname):
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute("SET rsclip.model_path = '/nonexistent/model'")
        with pytest.raises(psycopg.errors.UndefinedFile, match="/nonexistent/model/rsclip.json"):
            c.execute("SELECT rsclip_encode_text('a')")
    # A fresh backend: the library has not been loaded yet, so the bad path is what fails.
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute("SET rsclip.onnxruntime_library = '/nonexistent/libonnxruntime.so'")
        with pytest.raises(psycopg.errors.UndefinedFile, match="/nonexistent/libonnxruntime.so"):
            c.execute("SELECT rsclip_encode_text('a')")
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_sessions_rebuild_when_the_model_files_change(dbname):
    import shutil
    local = Path(os.environ["RSCLIP_LOCAL"])
    src = local / "models" / "tiny-siglip"
    dst = local / "models" / f"rebuild-{os.getpid()}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    os.chmod(dst, 0o755)
    try:
        with psycopg.connect(uri_for(dbname), autocommit=True) as c:
            c.execute("SELECT set_config('rsclip.model_path', %s, false)", (str(dst),))
            c.execute("SELECT rsclip_encode_text('harbour')")
            before = c.execute("SELECT rsclip_model_info()").fetchone()[0]
            # A new manifest (a re-export would change it): same files, different logit bias.
            manifest = json.loads((dst / "rsclip.json").read_text())
            manifest["logit_bias"] = manifest["logit_bias"] + 1.0
            (dst / "rsclip.json").write_text(json.dumps(manifest, indent=2) + "\n")
            c.execute("SELECT rsclip_encode_text('harbour')")
            after = c.execute("SELECT rsclip_model_info()").fetchone()[0]
            assert after["load_counts"]["model_opens"] == before["load_counts"]["model_opens"] + 1
            assert after["load_counts"]["text"] == before["load_counts"]["text"] + 1
            assert after["logit_bias"] == before["logit_bias"] + 1.0
            # A damaged graph is caught by its checksum, naming the file.
            data = bytearray((dst / "vision.onnx").read_bytes())
            data[200] ^= 0xFF
            (dst / "vision.onnx").write_bytes(bytes(data))
            with pytest.raises(psycopg.errors.IoError, match="vision.onnx"):
                c.execute("SELECT rsclip_encode_image(%s)", (image_bytes("exact_64x64.png"),))
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def test_tiff_band_selection(conn):
    tif = image_bytes("multiband16_72x56.tif")
    default = emb(conn, "SELECT rsclip_encode_image(%s)::text", (tif,))
    conn.execute("SET rsclip.tiff_bands = '4,3,2'")
    swapped = emb(conn, "SELECT rsclip_encode_image(%s)::text", (tif,))
    assert cosine(default, swapped) < 0.99999
    conn.execute("SET rsclip.tiff_bands = '1,2,9'")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="band 9 selected but the image has 4 bands"):
        conn.execute("SELECT rsclip_encode_image(%s)", (tif,))
    conn.execute("RESET rsclip.tiff_bands")
    assert cosine(emb(conn, "SELECT rsclip_encode_image(%s)::text", (tif,)), default) > 0.999999


@pytest.mark.parametrize("setting, value, detail", [
    ("rsclip.tiff_bands", "0,1,2", "three 1-based band numbers"),
    ("rsclip.tiff_bands", "4,3", "three 1-based band numbers"),
    ("rsclip.tiff_bands", "red,green,blue", "three 1-based band numbers"),
    ("rsclip.cuda_device", "-1", "\"auto\" or a device number"),
    ("rsclip.cuda_device", "gpu0", "\"auto\" or a device number"),
])
def test_bad_settings_are_refused_on_set(conn, setting, value, detail):
    """Checked by SET (a GUC check hook), not at the next encode; the old value stays."""
    before = conn.execute(f"SHOW {setting}").fetchone()[0]
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        conn.execute(f"SET {setting} = '{value}'")
    assert f'invalid value for parameter "{setting}"' in str(e.value)
    assert detail in (e.value.diag.message_detail or ""), e.value.diag.message_detail
    assert conn.execute(f"SHOW {setting}").fetchone()[0] == before
    # ALTER SYSTEM checks the value too, so a bad one never reaches postgresql.auto.conf
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute(f"ALTER SYSTEM SET {setting} = '{value}'")
    assert conn.execute("SELECT rsclip_encode_text('still works') IS NOT NULL").fetchone()[0]


def test_max_image_pixels_setting(conn):
    conn.execute("SET rsclip.max_image_pixels = 1000")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="97x61 pixels, more than rsclip.max_image_pixels"):
        conn.execute("SELECT rsclip_encode_image(%s)", (image_bytes("rgb_97x61.png"),))
    conn.execute("RESET rsclip.max_image_pixels")


def test_fp16_model_through_sql(dbname):
    local = Path(os.environ["RSCLIP_LOCAL"])
    with psycopg.connect(uri_for(dbname), autocommit=True) as c:
        c.execute("SELECT set_config('rsclip.model_path', %s, false)", (str(local / "models" / "tiny-siglip-fp16"),))
        worst = 1.0
        for name, entry in REFERENCE["images"].items():
            got = emb(c, "SELECT rsclip_encode_image(%s)::text", (image_bytes(name),))
            assert abs(np.linalg.norm(got) - 1) < 1e-5
            worst = min(worst, cosine(got, entry["embedding"]))
        for entry in REFERENCE["texts"]:
            worst = min(worst, cosine(emb(c, "SELECT rsclip_encode_text(%s)::text", (entry["text"],)), entry["embedding"]))
        assert worst >= 0.999, f"fp16 worst cosine vs PyTorch fp32: {worst}"
        assert c.execute("SELECT rsclip_model_info()->>'precision'").fetchone()[0] == "fp16"


def test_optimized_model_cache(dbname):
    import shutil
    local = Path(os.environ["RSCLIP_LOCAL"])
    cache = local / "data" / f"optcache-{os.getpid()}"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    os.chmod(cache, 0o777)
    try:
        states = []
        for _ in range(2):  # two backends: the first writes the optimized graph, the second loads it
            with psycopg.connect(uri_for(dbname), autocommit=True) as c:
                c.execute("SELECT set_config('rsclip.optimized_model_cache', %s, false)", (str(cache),))
                got = emb(c, "SELECT rsclip_encode_text('harbour with ships')::text")
                states.append(c.execute("SELECT rsclip_model_info()->'optimized_cache'->>'text'").fetchone()[0])
                c.execute("RESET rsclip.optimized_model_cache")
                want = emb(c, "SELECT rsclip_encode_text('harbour with ships')::text")
                assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-6
        assert states == ["written", "hit"]
        names = [p.name for p in cache.iterdir()]
        assert len(names) == 1 and names[0].startswith("text-"), names
        with psycopg.connect(uri_for(dbname), autocommit=True) as c:
            c.execute("SELECT set_config('rsclip.optimized_model_cache', %s, false)", (str(cache / "missing"),))
            with pytest.raises(psycopg.errors.UndefinedFile, match="missing"):
                c.execute("SELECT rsclip_encode_text('harbour')")
            # An ordinary role cannot point the server at a directory to write into.
            c.execute("RESET rsclip.optimized_model_cache")
            c.execute("DROP ROLE IF EXISTS rsclip_plain_user")
            c.execute("CREATE ROLE rsclip_plain_user")
            c.execute("SET ROLE rsclip_plain_user")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SET rsclip.optimized_model_cache = '/tmp'")
            c.execute("RESET ROLE")
            c.execute("DROP ROLE rsclip_plain_user")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
