#!/usr/bin/env python3
"""Export a Git-RSCLIP (SigLIP) model to rsclip's model directory, or make the test fixture.

A model directory holds:
  vision.onnx     pixel_values (batch, 3, S, S) float32 -> image_embeds (batch, D), not normalized
  text.onnx       input_ids (batch, L) int64 -> text_embeds (batch, D), not normalized
  tokenizer.json  Hugging Face `tokenizers` file equivalent to SiglipTokenizer (pads/truncates to L)
  rsclip.json     manifest: model id and revision, dims, preprocessing, logit scale/bias, sha256s

Usage:
  export_model.py --model lcybuaa/Git-RSCLIP --out DIR           real weights (hub id or local dir)
  export_model.py --random-weights git-rsclip-base --out DIR     real architecture, random weights
  export_model.py --tiny-random --out tests/fixtures/tiny-siglip  the committed test fixture + references

The environment comes from tools/requirements-export.txt (torch, transformers, onnx ...).
"""
import argparse
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import siglip_tokenizer  # noqa: E402  (our SentencePiece -> tokenizer.json converter)

FORMAT_VERSION = 1
OPSET = 18
SEED = 20261125

ARCHITECTURES = {
    # google/siglip-large-patch16-256 shape (Git-RSCLIP)
    "git-rsclip": dict(hidden=1024, layers=24, heads=16, intermediate=4096, image=256, patch=16, vocab=32000),
    # google/siglip-base-patch16-224 shape (Git-RSCLIP-base)
    "git-rsclip-base": dict(hidden=768, layers=12, heads=12, intermediate=3072, image=224, patch=16, vocab=32000),
    # the test fixture: same code paths, tiny compute
    "tiny": dict(hidden=32, layers=2, heads=2, intermediate=64, image=64, patch=16, vocab=512),
}
MAX_TEXT_LENGTH = 64


def siglip_config(arch: dict):
    from transformers import SiglipConfig
    text = dict(vocab_size=arch["vocab"], hidden_size=arch["hidden"], intermediate_size=arch["intermediate"],
                num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
                max_position_embeddings=MAX_TEXT_LENGTH, pad_token_id=1, eos_token_id=1)
    vision = dict(hidden_size=arch["hidden"], intermediate_size=arch["intermediate"],
                  num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
                  image_size=arch["image"], patch_size=arch["patch"])
    return SiglipConfig(text_config=text, vision_config=vision)


def random_model(arch: dict):
    from transformers import SiglipModel
    torch.manual_seed(SEED)
    model = SiglipModel(siglip_config(arch)).eval()
    # post_init() zeroes these; give them SigLIP's initial values so probabilities are meaningful.
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    return model


class VisionEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output


class TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        # input_ids only: an attention mask changes SigLIP's embeddings (it was trained without).
        return self.model.get_text_features(input_ids=input_ids).pooler_output


def strip_metadata(path: Path):
    """Drop the exporter's per-node stack traces (absolute paths) so output is reproducible."""
    m = onnx.load(str(path))
    graphs = [m.graph] + [f for f in m.functions]
    for g in graphs:
        for node in g.node:
            del node.metadata_props[:]
            node.doc_string = ""
    del m.metadata_props[:]
    m.graph.doc_string = ""
    onnx.save(m, str(path))


def export_graph(module, example, input_name, output_name, path: Path, precision: str):
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=OPSET,
                          external_data=False, input_names=[input_name], output_names=[output_name],
                          dynamic_shapes={input_name: {0: batch}}, verbose=False)
    strip_metadata(path)
    if precision == "fp16":
        to_fp16(path)


def to_fp16(path: Path):
    """Weights and compute in float16, inputs and outputs kept float32 (rsclip feeds float32).

    The graph is exported in float32 and converted, rather than exporting a .half() module: the
    float32 export is the one checked against PyTorch, and keeping float32 I/O means rsclip needs no
    second code path. On GPUs this halves memory and uses tensor cores; ONNX Runtime's CPU provider
    runs float16 nodes through inserted casts, so fp16 brings no CPU speed-up.
    """
    import warnings
    from onnxconverter_common import float16
    with warnings.catch_warnings():
        # It warns for every weight below float16's range that it clamps; the check below measures
        # the effect on the embeddings instead.
        warnings.simplefilter("ignore")
        model = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    onnx.save(model, str(path))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_model_dir(model, out: Path, *, model_id: str, revision: str, image_size: int, spm_path: Path,
                    precision: str):
    out.mkdir(parents=True, exist_ok=True)
    pixels = torch.zeros(2, 3, image_size, image_size, dtype=torch.float32)
    ids = torch.ones(2, MAX_TEXT_LENGTH, dtype=torch.int64)
    export_graph(VisionEncoder(model), pixels, "pixel_values", "image_embeds", out / "vision.onnx", precision)
    export_graph(TextEncoder(model), ids, "input_ids", "text_embeds", out / "text.onnx", precision)
    (out / "tokenizer.json").write_text(siglip_tokenizer.tokenizer_json_from_spm(str(spm_path), MAX_TEXT_LENGTH))
    dim = model.config.vision_config.hidden_size
    manifest = {
        "format": FORMAT_VERSION,
        "model_id": model_id,
        "revision": revision,
        "architecture": "siglip",
        "embedding_dim": dim,
        "image_size": image_size,
        "resample": "bicubic",
        "rescale_factor": 1 / 255,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "max_text_length": MAX_TEXT_LENGTH,
        "pad_token_id": 1,
        "logit_scale": float(model.logit_scale.detach().float()),
        "logit_bias": float(model.logit_bias.detach().float()),
        "opset": OPSET,
        "precision": precision,
        "vision": {"file": "vision.onnx", "input": "pixel_values", "output": "image_embeds"},
        "text": {"file": "text.onnx", "input": "input_ids", "output": "text_embeds"},
        "files": {name: {"sha256": sha256(out / name), "bytes": (out / name).stat().st_size}
                  for name in ("vision.onnx", "text.onnx", "tokenizer.json")},
    }
    (out / "rsclip.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_onnx_matches_torch(model, out: Path, image_size: int, precision: str):
    import onnxruntime as ort
    rng = np.random.default_rng(1)
    px = rng.uniform(-1, 1, (3, 3, image_size, image_size)).astype(np.float32)
    ids = rng.integers(3, 500, (3, MAX_TEXT_LENGTH)).astype(np.int64)
    with torch.no_grad():
        want_v = VisionEncoder(model)(torch.from_numpy(px)).numpy()
        want_t = TextEncoder(model)(torch.from_numpy(ids)).numpy()
    got_v = ort.InferenceSession(str(out / "vision.onnx")).run(None, {"pixel_values": px})[0]
    got_t = ort.InferenceSession(str(out / "text.onnx")).run(None, {"input_ids": ids})[0]
    dv, dt = float(np.abs(got_v - want_v).max()), float(np.abs(got_t - want_t).max())
    cv, ct = min_cosine(got_v, want_v), min_cosine(got_t, want_t)
    print(f"ONNX Runtime ({precision}) vs PyTorch (fp32): max abs diff vision {dv:.2e}, text {dt:.2e}; "
          f"min cosine vision {cv:.7f}, text {ct:.7f}")
    if precision == "fp32" and (dv > 1e-4 or dt > 1e-4):
        raise SystemExit("exported graphs do not match PyTorch")
    if precision == "fp16" and (cv < 0.999 or ct < 0.999):
        raise SystemExit("float16 graphs drift too far from PyTorch's float32 embeddings")


def min_cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="Hugging Face model id or local directory (SiglipModel + SiglipTokenizer)")
    what.add_argument("--random-weights", choices=["git-rsclip", "git-rsclip-base"])
    what.add_argument("--tiny-random", action="store_true", help="make the committed test fixture")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--revision", default="main")
    ap.add_argument("--image-size", type=int, help="override the preprocessor's image size")
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    a = ap.parse_args()

    if a.model:
        from transformers import SiglipImageProcessor, SiglipModel, SiglipTokenizer
        model = SiglipModel.from_pretrained(a.model, revision=a.revision).eval()
        tok = SiglipTokenizer.from_pretrained(a.model, revision=a.revision)
        proc = SiglipImageProcessor.from_pretrained(a.model, revision=a.revision)
        size = a.image_size or proc.size["height"]
        write_model_dir(model, a.out, model_id=a.model, revision=a.revision, image_size=size,
                        spm_path=Path(tok.vocab_file), precision=a.precision)
        check_onnx_matches_torch(model, a.out, size, a.precision)
        return

    arch = ARCHITECTURES["tiny" if a.tiny_random else a.random_weights]
    model = random_model(arch)
    with tempfile.TemporaryDirectory() as tmp:
        spm = Path(tmp) / "spiece.model"
        siglip_tokenizer.train_tiny_spm(str(spm), vocab_size=512)
        name = "tiny-random-siglip" if a.tiny_random else f"{a.random_weights}-random-weights"
        write_model_dir(model, a.out, model_id=name, revision=f"seed-{SEED}", image_size=arch["image"],
                        spm_path=spm, precision=a.precision)
        check_onnx_matches_torch(model, a.out, arch["image"], a.precision)
        if a.tiny_random and a.precision == "fp32":
            import fixture_references
            fixture_references.write(model, spm, a.out, arch["image"], MAX_TEXT_LENGTH)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
