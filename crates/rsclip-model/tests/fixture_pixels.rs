//! Preprocessing parity with the PyTorch/transformers reference on the committed fixture
//! (tests/fixtures/reference, made by tools/export_model.py --tiny-random).

use rsclip_model::decode::{decode_rgb8, DecodeOptions};
use rsclip_model::preprocess::Preprocessing;
use serde_json::Value;
use std::path::PathBuf;

fn reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference")
}

fn load_reference() -> Value {
    let path = reference_dir().join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "fixture missing: {} ({e}); it is committed, never skipped",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("reference.json parses")
}

fn f32_file(path: PathBuf) -> Vec<f32> {
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn pixel_values_match_the_reference() {
    let reference = load_reference();
    let size = reference["image_size"].as_u64().unwrap() as usize;
    let pre = Preprocessing {
        image_size: size,
        rescale_factor: 1.0 / 255.0,
        mean: [0.5; 3],
        std: [0.5; 3],
    };
    let images = reference["images"].as_object().unwrap();
    assert!(images.len() >= 10, "fixture has too few images");
    let mut failures = Vec::new();
    eprintln!(
        "{:<26} {:>7} {:>12} {:>12}",
        "image", "kind", "max |diff|", "mean |diff|"
    );
    for (name, entry) in images {
        let bytes = std::fs::read(reference_dir().join(entry["file"].as_str().unwrap())).unwrap();
        let rgb = decode_rgb8(&bytes, &DecodeOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut got = vec![0f32; pre.tensor_len()];
        pre.pixel_values(&rgb, &mut got);
        let want = f32_file(reference_dir().join(entry["pixels"].as_str().unwrap()));
        assert_eq!(want.len(), got.len(), "{name}: tensor size");
        let diffs: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
        let max = diffs.iter().cloned().fold(0f32, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        let kind = entry["kind"].as_str().unwrap();
        eprintln!("{name:<26} {kind:>7} {max:>12.3e} {mean:>12.3e}");
        // Every format matches exactly (to f32 rounding): JPEG goes through libjpeg-turbo's
        // decoder, as in Pillow, and lossy WebP through a spec-exact VP8 decoder.
        let ok = max <= 1e-6;
        if !ok {
            failures.push(format!("{name} ({kind}): max {max:e}, mean {mean:e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "pixel mismatches:\n{}",
        failures.join("\n")
    );
}

#[test]
fn header_claiming_huge_dimensions_is_rejected_before_decoding() {
    // A PNG header claiming 100000 x 100000 pixels and no data.
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&(ihdr.len() as u32).to_be_bytes());
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&ihdr);
    let crc = crc32(&chunk);
    png.extend_from_slice(&chunk);
    png.extend_from_slice(&crc.to_be_bytes());
    let err = decode_rgb8(
        &png,
        &DecodeOptions {
            max_pixels: 50_000_000,
            ..DecodeOptions::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("100000x100000"), "{err}");
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn header_dimensions_agree_with_the_decoders() {
    use rsclip_model::decode::{header_dimensions, sniff};
    let reference = load_reference();
    for (name, entry) in reference["images"].as_object().unwrap() {
        let bytes = std::fs::read(reference_dir().join(entry["file"].as_str().unwrap())).unwrap();
        let format = sniff(&bytes).unwrap();
        if let Some((w, h)) = header_dimensions(&bytes, format) {
            let opts = DecodeOptions {
                max_pixels: w * h,
                ..DecodeOptions::default()
            };
            assert!(
                decode_rgb8(&bytes, &opts).is_ok(),
                "{name}: exactly max_pixels must decode"
            );
            let tight = DecodeOptions {
                max_pixels: w * h - 1,
                ..DecodeOptions::default()
            };
            assert!(
                decode_rgb8(&bytes, &tight).is_err(),
                "{name}: one pixel over must fail"
            );
        } else {
            assert!(
                name.ends_with(".tif") || name.ends_with(".tiff"),
                "{name}: header not parsed"
            );
        }
    }
}

#[test]
fn damaged_inputs_give_errors_not_panics() {
    let dir = reference_dir().join("images");
    for name in [
        "rgb_97x61.png",
        "photo_120x90.jpg",
        "rgb_70x50.tiff",
        "rgb_45x45.webp",
        "multiband16_72x56.tif",
    ] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        for cut in [8, bytes.len() / 3, bytes.len() / 2, bytes.len() * 9 / 10] {
            let r = decode_rgb8(&bytes[..cut], &DecodeOptions::default());
            assert!(r.is_err(), "{name} cut at {cut} decoded");
        }
        // Flipped bytes in the middle.
        let mut bad = bytes.clone();
        for i in (bytes.len() / 4..bytes.len() / 2).step_by(7) {
            bad[i] ^= 0x5a;
        }
        let _ = decode_rgb8(&bad, &DecodeOptions::default());
    }
}

/// Found by the image_decoder fuzzer: a PNG whose PLTE chunk is 49 bytes (not a multiple of 3)
/// makes png 0.18.1 index out of bounds. It must be a decode error, not a panic.
#[test]
fn decoder_panics_become_errors() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/damaged/plte_49_bytes.png");
    let bytes = std::fs::read(path).unwrap();
    let err = decode_rgb8(&bytes, &DecodeOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("corrupt or truncated PNG image"),
        "{err}"
    );
}
