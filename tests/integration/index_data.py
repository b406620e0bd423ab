"""Test data for the rsclip index: clustered unit vectors, fast binary COPY, exact top-k."""
import numpy as np


def gaussian_mixture(n, dims, clusters=200, spread=1.5, seed=0):
    """Unit vectors drawn around `clusters` random centres (what CLIP-like embeddings look like)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dims)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, n)
    noise = rng.standard_normal((n, dims)).astype(np.float32) * (spread / np.sqrt(dims))
    x = centres[labels] + noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def copy_rows(conn, table, ids, vectors):
    """COPY (id int, emb embedding) rows in binary (pgvector's wire format)."""
    n, dims = vectors.shape
    row = np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", ">i4"), ("emb_len", ">i4"),
                    ("dims", ">i2"), ("unused", ">i2"), ("values", ">f4", (dims,))])
    data = np.zeros(n, dtype=row)
    data["fields"] = 2
    data["id_len"] = 4
    data["id"] = ids
    data["emb_len"] = 4 + 4 * dims
    data["dims"] = dims
    data["values"] = vectors
    payload = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8 + data.tobytes() + b"\xff\xff"
    with conn.cursor().copy(f"COPY {table} (id, emb) FROM STDIN (FORMAT binary)") as cp:
        cp.write(payload)


def vec_text(v):
    return "[" + ",".join(f"{x:.9g}" for x in v) + "]"


def exact_top(vectors, ids, query, k, metric="ip"):
    if metric == "ip":
        d = -(vectors @ query)
    elif metric == "cosine":
        d = 1 - (vectors @ query) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
    else:
        d = np.linalg.norm(vectors - query, axis=1)
    order = np.argsort(d, kind="stable")[:k]
    return [int(ids[i]) for i in order]


def recall(got, want):
    return len(set(got) & set(want)) / len(want)
