#!/usr/bin/env python3
"""Encoding throughput: rsclip in SQL vs a Python pipeline vs bare ONNX Runtime, same ONNX files.

  (a) rsclip:  SELECT rsclip_encode_images($1) / rsclip_encode_texts($1) at rsclip.batch_size b
               (the image array is sent in binary format, as a backfill reading a table never parses hex)
  (b) python:  Pillow decode + transformers SiglipImageProcessorPil (or SiglipTokenizer-equivalent
               tokenizer.json) + onnxruntime InferenceSession.run, as the usual Python recipe does
  (c) bare:    InferenceSession.run on tensors made beforehand: the limit

All use the same intra-op thread count. Runs with the exporter's environment
(tools/requirements-export.txt), against a server that has rsclip installed:

    bench/encode.py --uri postgresql://... --model-dir DIR [--threads 2] [--images 32] [--rounds 3]
"""
import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psycopg
from PIL import Image
from tokenizers import Tokenizer
from transformers import SiglipImageProcessorPil

CAPTIONS = ["an airport with parked planes", "flooded farmland next to a river", "a dense residential area",
            "ships moored in a harbour", "storage tanks near a refinery", "a forest with a winding road",
            "a baseball field surrounded by trees", "center pivot irrigation circles"]


def make_images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = np.mgrid[0:size, 0:size]
        img = np.stack([127 + 100 * np.sin(x / rng.uniform(3, 30) + c) * np.cos(y / rng.uniform(3, 30))
                        for c in range(3)], axis=2) + rng.normal(0, 20, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    t0 = time.perf_counter()
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s, (time.perf_counter() - t0) * 1e3


def rates(n, fns, rounds):
    """Median throughput of each pipeline, rounds interleaved so machine noise hits all alike."""
    times = {name: [] for name, _ in fns}
    for r in range(rounds):
        order = fns if r % 2 == 0 else list(reversed(fns))
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: n / statistics.median(t) for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", required=True)
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32")
    a = ap.parse_args()
    manifest = json.loads((a.model_dir / "rsclip.json").read_text())
    size = manifest["image_size"]
    batches = [int(b) for b in a.batches.split(",")]
    images = make_images(a.images, 256)
    texts = [CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(a.texts)]

    vision, vision_ms = session(a.model_dir / "vision.onnx", a.threads)
    text, text_ms = session(a.model_dir / "text.onnx", a.threads)
    proc = SiglipImageProcessorPil(size={"height": size, "width": size})
    tok = Tokenizer.from_file(str(a.model_dir / "tokenizer.json"))
    pixels = np.concatenate([proc(images=Image.open(io.BytesIO(b)).convert("RGB"), return_tensors="np")["pixel_values"]
                             for b in images]).astype(np.float32)
    ids = np.array([e.ids for e in tok.encode_batch(texts)], dtype=np.int64)

    results = {"model": manifest["model_id"], "threads": a.threads, "image_size": size,
               "session_create_ms": {"python_vision": vision_ms, "python_text": text_ms}, "images": {}, "texts": {}}
    with psycopg.connect(a.uri, autocommit=True) as admin:  # a fresh database: the extension as installed now
        admin.execute("DROP DATABASE IF EXISTS rsclip_bench_encode WITH (FORCE)")
        admin.execute("CREATE DATABASE rsclip_bench_encode")
    with psycopg.connect(a.uri.rsplit("/", 1)[0] + "/rsclip_bench_encode", autocommit=True) as c:
        c.execute("CREATE EXTENSION rsclip")
        c.execute("SELECT set_config('rsclip.model_path', %s, false)", (str(a.model_dir.resolve()),))
        c.execute("SELECT set_config('rsclip.intra_op_threads', %s, false)", (str(a.threads),))
        c.execute("SET rsclip.execution_provider = 'cpu'")
        t0 = time.perf_counter()
        c.execute("SELECT rsclip_encode_images(%b)", (images[:1],))
        c.execute("SELECT rsclip_encode_texts(%s)", (texts[:1],))
        results["session_create_ms"]["rsclip_first_calls"] = (time.perf_counter() - t0) * 1e3
        results["session_create_ms"]["rsclip"] = c.execute("SELECT rsclip_model_info()->'session_create_ms'").fetchone()[0]
        for b in batches:
            c.execute("SELECT set_config('rsclip.batch_size', %s, false)", (str(b),))

            def bare_v():
                for i in range(0, len(pixels), b):
                    vision.run(None, {"pixel_values": pixels[i:i + b]})

            def python_v():
                for i in range(0, len(images), b):
                    px = np.concatenate([proc(images=Image.open(io.BytesIO(x)).convert("RGB"), return_tensors="np")["pixel_values"]
                                         for x in images[i:i + b]]).astype(np.float32)
                    vision.run(None, {"pixel_values": px})

            def rsclip_v():
                c.execute("SELECT rsclip_encode_images(%b)", (images,)).fetchone()

            def bare_t():
                for i in range(0, len(ids), b):
                    text.run(None, {"input_ids": ids[i:i + b]})

            def python_t():
                for i in range(0, len(texts), b):
                    enc = np.array([e.ids for e in tok.encode_batch(texts[i:i + b])], dtype=np.int64)
                    text.run(None, {"input_ids": enc})

            def rsclip_t():
                c.execute("SELECT rsclip_encode_texts(%s)", (texts,)).fetchone()

            results["images"][b] = rates(len(images), [("bare", bare_v), ("python", python_v), ("rsclip", rsclip_v)], a.rounds)
            results["texts"][b] = rates(len(texts), [("bare", bare_t), ("python", python_t), ("rsclip", rsclip_t)], a.rounds)

    print(f"\nencoding throughput, model {manifest['model_id']} ({size} px, {manifest['embedding_dim']}-d), "
          f"{a.threads} intra-op threads, CPU, median of {a.rounds}")
    print(f"{'batch':>5} | {'bare img/s':>10} {'python':>8} {'rsclip':>8} {'rs/bare':>8} {'rs/py':>7} | "
          f"{'bare txt/s':>10} {'python':>8} {'rsclip':>8} {'rs/bare':>8} {'rs/py':>7}")
    for b in batches:
        i, t = results["images"][b], results["texts"][b]
        print(f"{b:>5} | {i['bare']:>10.1f} {i['python']:>8.1f} {i['rsclip']:>8.1f} {i['rsclip'] / i['bare']:>8.2f} "
              f"{i['rsclip'] / i['python']:>7.2f} | {t['bare']:>10.1f} {t['python']:>8.1f} {t['rsclip']:>8.1f} "
              f"{t['rsclip'] / t['bare']:>8.2f} {t['rsclip'] / t['python']:>7.2f}")
    print(f"session creation (ms): {json.dumps(results['session_create_ms'])}")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"encode_{manifest['model_id']}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
