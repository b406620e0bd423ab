"""Test images and reference outputs for the tiny-random fixture (used by tools/export_model.py).

References come from the pipeline a transformers user runs: `load_image(path)` (EXIF transpose,
PIL `convert("RGB")`), `SiglipImageProcessorPil` (Pillow bicubic resize, rescale, normalize),
`SiglipTokenizer` (padding="max_length", truncation), and PyTorch `SiglipModel.get_*_features`.

The 16-bit multi-band TIFF has no Pillow reference (Pillow cannot open it); its reference is our
documented remote-sensing rule, computed here in numpy: bands 1-3, each stretched from its 2nd
to its 98th percentile (numpy's linear interpolation) to 0..255, rounded half up.
"""
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TEXTS = [
    "an airport with parked planes",
    "A FLOODED farmland next to a river.",
    "residential   area,\twith\nroads!!",
    "  ships in a harbour  ",
    "",
    " ",
    "storage tanks; (oil) & gas - #42",
    "森林と川の航空写真",
    "a forest 🌲🌲 near a lake 🏞️",
    "café crème über ñandú",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３",
    "ﬁelds of wheat",
    "dense\u00a0urban\u2003area\u3000with\x1cparks\x85",
    "<unk> and </s> inside ▁ text",
    "bare soil " * 40,
    "a very long caption " + "x" * 100000,
]


def smooth_rgb(rng, w, h, channels=3):
    y, x = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w, channels), dtype=np.float64)
    for c in range(channels):
        fx, fy, ph = rng.uniform(0.02, 0.3), rng.uniform(0.02, 0.3), rng.uniform(0, 6.28)
        out[..., c] = 127.5 + 80 * np.sin(fx * x + ph) * np.cos(fy * y) + rng.normal(0, 25, (h, w))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def png_16bit_rgb(path: Path, arr: np.ndarray):
    """Minimal 16-bit RGB PNG writer (Pillow cannot write 16-bit RGB)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def make_images(d: Path) -> dict:
    """Writes the test images; returns name -> kind ("png", "jpeg", "tiff", "webp", "lossy-webp",
    "stretch")."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    kinds = {}

    Image.fromarray(smooth_rgb(rng, 97, 61)).save(d / "rgb_97x61.png"); kinds["rgb_97x61.png"] = "png"
    rgba = np.concatenate([smooth_rgb(rng, 64, 48), smooth_rgb(rng, 64, 48, 1)], axis=2)
    Image.fromarray(rgba, "RGBA").save(d / "rgba_64x48.png"); kinds["rgba_64x48.png"] = "png"
    Image.fromarray(smooth_rgb(rng, 50, 70, 1)[..., 0], "L").save(d / "gray_50x70.png"); kinds["gray_50x70.png"] = "png"
    la = np.concatenate([smooth_rgb(rng, 33, 33, 1), smooth_rgb(rng, 33, 33, 1)], axis=2)
    Image.fromarray(la, "LA").save(d / "gray_alpha_33x33.png"); kinds["gray_alpha_33x33.png"] = "png"
    g16 = (smooth_rgb(rng, 40, 30, 1)[..., 0].astype(np.uint16) * 3)  # values up to 765: Pillow clips at 255
    Image.fromarray(g16).save(d / "gray16_40x30.png"); kinds["gray16_40x30.png"] = "png"
    png_16bit_rgb(d / "rgb16_30x20.png", smooth_rgb(rng, 30, 20).astype(np.uint16) * 257 + 3); kinds["rgb16_30x20.png"] = "png"
    pal = Image.fromarray(smooth_rgb(rng, 45, 35)).quantize(colors=16, dither=Image.Dither.NONE)
    pal.save(d / "palette_45x35.png"); kinds["palette_45x35.png"] = "png"
    Image.fromarray(smooth_rgb(rng, 1, 1)).save(d / "tiny_1x1.png"); kinds["tiny_1x1.png"] = "png"
    Image.fromarray(smooth_rgb(rng, 300, 200)).save(d / "large_300x200.png"); kinds["large_300x200.png"] = "png"
    Image.fromarray(smooth_rgb(rng, 64, 64)).save(d / "exact_64x64.png"); kinds["exact_64x64.png"] = "png"
    # Taller than wide and shrinking vertically: Pillow then resamples vertically first.
    Image.fromarray(smooth_rgb(rng, 65, 90)).save(d / "tall_65x90.png"); kinds["tall_65x90.png"] = "png"
    Image.fromarray(smooth_rgb(rng, 40, 130)).save(d / "tall_40x130.png"); kinds["tall_40x130.png"] = "png"

    Image.fromarray(smooth_rgb(rng, 120, 90)).save(d / "photo_120x90.jpg", quality=90); kinds["photo_120x90.jpg"] = "jpeg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(smooth_rgb(rng, 80, 60)).save(d / "exif6_80x60.jpg", quality=90, exif=exif); kinds["exif6_80x60.jpg"] = "jpeg"
    Image.fromarray(smooth_rgb(rng, 50, 50, 1)[..., 0], "L").save(d / "gray_50x50.jpg", quality=85); kinds["gray_50x50.jpg"] = "jpeg"

    Image.fromarray(smooth_rgb(rng, 70, 50)).save(d / "rgb_70x50.tiff"); kinds["rgb_70x50.tiff"] = "tiff"
    Image.fromarray(smooth_rgb(rng, 45, 45)).save(d / "rgb_45x45.webp", lossless=True); kinds["rgb_45x45.webp"] = "webp"

    import tifffile
    bands = np.stack([smooth_rgb(rng, 72, 56, 1)[..., 0].astype(np.uint16) * 40 + 300 * b for b in range(4)], axis=2)
    tifffile.imwrite(d / "multiband16_72x56.tif", bands, photometric="minisblack", planarconfig="contig")
    kinds["multiband16_72x56.tif"] = "stretch"

    # Every EXIF orientation on a non-square lossless image (exact comparison), and one more on a
    # JPEG; then lossy WebP, whose decoders may differ slightly (compared with JPEG's tolerance).
    for code in (2, 3, 4, 5, 7, 8):
        exif = Image.Exif()
        exif[0x0112] = code
        name = f"exif{code}_37x23.png"
        Image.fromarray(smooth_rgb(rng, 37, 23)).save(d / name, exif=exif); kinds[name] = "png"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(smooth_rgb(rng, 90, 70)).save(d / "exif8_90x70.jpg", quality=92, exif=exif); kinds["exif8_90x70.jpg"] = "jpeg"
    Image.fromarray(smooth_rgb(rng, 81, 57)).save(d / "lossy_81x57.webp", quality=85); kinds["lossy_81x57.webp"] = "lossy-webp"
    return kinds


def stretch_to_rgb8(bands: np.ndarray) -> np.ndarray:
    out = np.empty(bands.shape[:2] + (3,), dtype=np.uint8)
    for c in range(3):
        v = bands[..., c].astype(np.float64)
        lo, hi = np.percentile(v, 2), np.percentile(v, 98)
        scaled = (v - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(v)
        out[..., c] = np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)
    return out


def write(model, spm_path: Path, model_dir: Path, image_size: int, max_len: int):
    from transformers import SiglipImageProcessorPil, SiglipTokenizer
    from transformers.image_utils import load_image

    ref = model_dir.parent / "reference"
    images_dir = ref / "images"
    pixels_dir = ref / "pixels"
    pixels_dir.mkdir(parents=True, exist_ok=True)
    kinds = make_images(images_dir)
    proc = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})

    images = {}
    batch = []
    for name, kind in sorted(kinds.items()):
        if kind == "stretch":
            import tifffile
            rgb8 = stretch_to_rgb8(tifffile.imread(images_dir / name))
            pil = Image.fromarray(rgb8, "RGB")
        else:
            pil = load_image(str(images_dir / name))
        px = proc(images=pil, return_tensors="np")["pixel_values"][0].astype("<f4")
        (pixels_dir / f"{name}.f32").write_bytes(px.tobytes())
        images[name] = {"file": f"images/{name}", "kind": kind, "pixels": f"pixels/{name}.f32",
                        "shape": list(px.shape)}
        batch.append(px)
    with torch.no_grad():
        img_emb = model.get_image_features(pixel_values=torch.from_numpy(np.stack(batch))).pooler_output.numpy()
    for (name, entry), e in zip(sorted(images.items()), img_emb):
        entry["embedding"] = [float(x) for x in e]

    tok = SiglipTokenizer(vocab_file=str(spm_path))
    texts = []
    ids = []
    for t in TEXTS:
        i = tok(t, padding="max_length", truncation=True, max_length=max_len)["input_ids"]
        ids.append(i)
    with torch.no_grad():
        txt_emb = model.get_text_features(input_ids=torch.tensor(ids)).pooler_output.numpy()
    for t, i, e in zip(TEXTS, ids, txt_emb):
        texts.append({"text": t, "ids": i, "embedding": [float(x) for x in e]})

    ie = img_emb / np.linalg.norm(img_emb, axis=1, keepdims=True)
    te = txt_emb / np.linalg.norm(txt_emb, axis=1, keepdims=True)
    scale, bias = float(model.logit_scale.exp()), float(model.logit_bias)
    prob = 1 / (1 + np.exp(-(ie.astype(np.float64) @ te.T.astype(np.float64) * scale + bias)))

    reference = {
        "generated_by": "tools/export_model.py --tiny-random",
        "image_size": image_size,
        "images": images,
        "texts": texts,
        "probabilities": {"images": sorted(images), "texts": list(range(len(TEXTS))),
                          "values": prob.tolist()},
    }
    (ref / "reference.json").write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
