//! End-to-end parity of the Rust pipeline (decode, preprocess, tokenize, ONNX Runtime) with the
//! PyTorch reference on the committed tiny-random fixture. Needs the ONNX Runtime library:
//! RSCLIP_ONNXRUNTIME_LIBRARY (set by tools/env.sh, so `make unit` provides it).

use rsclip_model::decode::{decode_rgb8, DecodeOptions};
use rsclip_model::manifest::ModelDir;
use rsclip_model::preprocess::Preprocessing;
use rsclip_model::runtime::{ensure_environment, Encoder, RuntimeOptions};
use rsclip_model::tokenize::TextTokenizer;
use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn library() -> PathBuf {
    PathBuf::from(std::env::var("RSCLIP_ONNXRUNTIME_LIBRARY").expect(
        "RSCLIP_ONNXRUNTIME_LIBRARY must name libonnxruntime.so (source tools/env.sh or run make unit); this test is never skipped",
    ))
}

fn reference() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/reference.json")).unwrap(),
    )
    .unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn model() -> ModelDir {
    ModelDir::open(&fixtures().join("tiny-siglip")).expect("fixture model directory")
}

#[test]
fn image_embeddings_match_pytorch() {
    let env = ensure_environment(&library()).unwrap();
    let model = model();
    let m = &model.manifest;
    let pre = Preprocessing::from_manifest(m);
    let mut vision = Encoder::load(&env, &model, &m.vision, &RuntimeOptions::default()).unwrap();
    let reference = reference();
    let images = reference["images"].as_object().unwrap();
    let mut batch = Vec::new();
    let mut names = Vec::new();
    eprintln!("{:<26} {:>7} {:>14}", "image", "kind", "cosine");
    let mut failures = Vec::new();
    for (name, entry) in images {
        let bytes = std::fs::read(
            fixtures()
                .join("reference")
                .join(entry["file"].as_str().unwrap()),
        )
        .unwrap();
        let rgb = decode_rgb8(&bytes, &DecodeOptions::default()).unwrap();
        let mut px = vec![0f32; pre.tensor_len()];
        pre.pixel_values(&rgb, &mut px);
        let got = vision
            .run_f32(&[1, 3, m.image_size, m.image_size], px.clone())
            .unwrap();
        let want = floats(&entry["embedding"]);
        let cos = cosine(&got, &want);
        let kind = entry["kind"].as_str().unwrap();
        eprintln!("{name:<26} {kind:>7} {cos:>14.9}");
        // The issue asks >= 0.9999 for JPEG; with libjpeg-turbo's decoder every format is exact.
        let bound = 0.99999;
        if cos < bound {
            failures.push(format!("{name}: cosine {cos}"));
        }
        batch.extend(px);
        names.push(got);
    }
    assert!(failures.is_empty(), "{failures:?}");
    // One batched run equals the single runs.
    let n = names.len();
    let all = vision
        .run_f32(&[n, 3, m.image_size, m.image_size], batch)
        .unwrap();
    for (i, single) in names.iter().enumerate() {
        let row = &all[i * m.embedding_dim..(i + 1) * m.embedding_dim];
        let diff = row
            .iter()
            .zip(single)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-6,
            "batch row {i} differs from its single run by {diff}"
        );
    }
}

#[test]
fn token_ids_and_text_embeddings_match_pytorch() {
    let env = ensure_environment(&library()).unwrap();
    let model = model();
    let m = &model.manifest;
    let tok = TextTokenizer::load(&model).unwrap();
    let mut text = Encoder::load(&env, &model, &m.text, &RuntimeOptions::default()).unwrap();
    let reference = reference();
    for entry in reference["texts"].as_array().unwrap() {
        let s = entry["text"].as_str().unwrap();
        let want_ids: Vec<i64> = entry["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let ids = tok.encode(s).unwrap();
        let shown: String = s.chars().take(40).collect();
        assert_eq!(ids, want_ids, "token ids for {shown:?}");
        let got = text.run_i64(&[1, m.max_text_length], ids).unwrap();
        let cos = cosine(&got, &floats(&entry["embedding"]));
        assert!(cos >= 0.99999, "text {shown:?}: cosine {cos}");
    }
}

#[test]
fn probabilities_follow_the_manifest_scale_and_bias() {
    let model = model();
    let m = &model.manifest;
    let reference = reference();
    let p = &reference["probabilities"];
    let images = reference["images"].as_object().unwrap();
    let texts = reference["texts"].as_array().unwrap();
    for (i, name) in p["images"].as_array().unwrap().iter().enumerate() {
        let ie = floats(&images[name.as_str().unwrap()]["embedding"]);
        for (j, te) in texts.iter().enumerate() {
            let cos = cosine(&ie, &floats(&te["embedding"]));
            let prob = rsclip_model::probability(cos, m.logit_scale, m.logit_bias);
            let want = p["values"][i][j].as_f64().unwrap();
            assert!(
                (prob - want).abs() <= 1e-6 * want.max(1e-12) + 1e-12,
                "p[{i}][{j}] {prob} vs {want}"
            );
        }
    }
}

#[test]
fn bad_model_directories_name_the_file() {
    let tmp = std::env::temp_dir().join(format!("rsclip-bad-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let err = ModelDir::open(&tmp).unwrap_err().to_string();
    assert!(
        err.contains("rsclip.json") && err.contains("does not exist"),
        "{err}"
    );
    std::fs::create_dir_all(&tmp).unwrap();
    for f in ["rsclip.json", "vision.onnx", "text.onnx", "tokenizer.json"] {
        std::fs::copy(fixtures().join("tiny-siglip").join(f), tmp.join(f)).unwrap();
    }
    // Corrupt the text graph: checksum mismatch names it.
    let mut bytes = std::fs::read(tmp.join("text.onnx")).unwrap();
    bytes[100] ^= 1;
    std::fs::write(tmp.join("text.onnx"), bytes).unwrap();
    std::fs::remove_file(tmp.join("vision.onnx")).unwrap();
    let model = ModelDir::open(&tmp).unwrap();
    let env = ensure_environment(&library()).unwrap();
    let err = Encoder::load(
        &env,
        &model,
        &model.manifest.text,
        &RuntimeOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("text.onnx") && err.contains("sha256"), "{err}");
    let err = Encoder::load(
        &env,
        &model,
        &model.manifest.vision,
        &RuntimeOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("vision.onnx") && err.contains("does not exist"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// The fp16 export (float16 weights and compute, float32 inputs and outputs) stays close to the
/// float32 PyTorch reference.
#[test]
fn fp16_model_stays_close_to_the_fp32_reference() {
    let env = ensure_environment(&library()).unwrap();
    let model = ModelDir::open(&fixtures().join("tiny-siglip-fp16")).expect("fp16 fixture");
    let m = &model.manifest;
    assert_eq!(m.precision, "fp16");
    let pre = Preprocessing::from_manifest(m);
    let mut vision = Encoder::load(&env, &model, &m.vision, &RuntimeOptions::default()).unwrap();
    let reference = reference();
    let mut worst = 1f64;
    for entry in reference["images"].as_object().unwrap().values() {
        let file = fixtures()
            .join("reference")
            .join(entry["file"].as_str().unwrap());
        let rgb = decode_rgb8(&std::fs::read(file).unwrap(), &DecodeOptions::default()).unwrap();
        let mut px = vec![0f32; pre.tensor_len()];
        pre.pixel_values(&rgb, &mut px);
        let got = vision
            .run_f32(&[1, 3, m.image_size, m.image_size], px)
            .unwrap();
        worst = worst.min(cosine(&got, &floats(&entry["embedding"])));
    }
    let tok = TextTokenizer::load(&model).unwrap();
    let mut text = Encoder::load(&env, &model, &m.text, &RuntimeOptions::default()).unwrap();
    for entry in reference["texts"].as_array().unwrap() {
        let ids = tok.encode(entry["text"].as_str().unwrap()).unwrap();
        let got = text.run_i64(&[1, m.max_text_length], ids).unwrap();
        worst = worst.min(cosine(&got, &floats(&entry["embedding"])));
    }
    eprintln!("fp16 vs PyTorch fp32: worst cosine {worst:.7}");
    assert!(worst >= 0.999, "fp16 worst cosine {worst}");
}

/// `optimized_model_dir`: the first session optimizes and saves, the next one loads the saved
/// graph without re-optimizing, and both compute the same embeddings.
#[test]
fn optimized_graph_cache_is_written_then_hit() {
    use rsclip_model::runtime::{CacheState, RuntimeError};
    let env = ensure_environment(&library()).unwrap();
    let model = model();
    let m = &model.manifest;
    let dir = std::env::temp_dir().join(format!("rsclip-optcache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let opts = RuntimeOptions {
        optimized_model_dir: Some(dir.clone()),
        ..RuntimeOptions::default()
    };
    let ids = TextTokenizer::load(&model)
        .unwrap()
        .encode("an airport with parked planes")
        .unwrap();
    let mut plain = Encoder::load(&env, &model, &m.text, &RuntimeOptions::default()).unwrap();
    assert_eq!(plain.optimized_cache, CacheState::Off);
    let want = plain.run_i64(&[1, m.max_text_length], ids.clone()).unwrap();
    let mut first = Encoder::load(&env, &model, &m.text, &opts).unwrap();
    assert_eq!(first.optimized_cache, CacheState::Written);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files.len(),
        1,
        "one cached graph, no temporaries: {files:?}"
    );
    assert!(files[0].starts_with("text-") && files[0].ends_with(".onnx"));
    let mut second = Encoder::load(&env, &model, &m.text, &opts).unwrap();
    assert_eq!(second.optimized_cache, CacheState::Hit);
    for enc in [&mut first, &mut second] {
        let got = enc.run_i64(&[1, m.max_text_length], ids.clone()).unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-6, "cached graph differs by {diff}");
    }
    // A damaged cached file is replaced, not trusted.
    let cached = dir.join(&files[0]);
    std::fs::write(&cached, b"not a graph").unwrap();
    let third = Encoder::load(&env, &model, &m.text, &opts).unwrap();
    assert_eq!(third.optimized_cache, CacheState::Written);
    assert!(std::fs::metadata(&cached).unwrap().len() > 1000);
    // A directory that does not exist is an error naming it.
    let missing = dir.join("missing");
    let err = Encoder::load(
        &env,
        &model,
        &m.text,
        &RuntimeOptions {
            optimized_model_dir: Some(missing.clone()),
            ..RuntimeOptions::default()
        },
    )
    .err()
    .expect("missing cache directory");
    assert!(matches!(err, RuntimeError::OptimizedCache { .. }), "{err}");
    assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A large, detailed JPEG (a smooth field plus fine texture, like an aerial tile) made with
/// libjpeg's encoder at quality 90, 4:2:0.
fn large_textured_jpeg(w: usize, h: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut rgb = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let field =
                    128.0 + 60.0 * ((x as f64 / 97.0 + c as f64).sin() * (y as f64 / 61.0).cos());
                let texture = (next() % 64) as f64 - 32.0;
                let stripes = if (x / 3 + y / 5 + c) % 2 == 0 {
                    20.0
                } else {
                    -20.0
                };
                rgb[(y * w + x) * 3 + c] = (field + texture + stripes).clamp(0.0, 255.0) as u8;
            }
        }
    }
    let mut comp = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    comp.set_size(w, h);
    comp.set_quality(90.0);
    let mut started = comp.start_compress(Vec::new()).unwrap();
    started.write_scanlines(&rgb).unwrap();
    started.finish().unwrap()
}

/// Decoder-side JPEG reduction (IDCT scaling while both sides stay >= 4x the model size) keeps
/// pixels and embeddings within the JPEG tolerance of the full decode, which equals Pillow's.
#[test]
fn jpeg_reduction_keeps_parity_within_tolerance() {
    use rsclip_model::decode::jpeg_scale_numerator;
    let env = ensure_environment(&library()).unwrap();
    let model = model();
    let m = &model.manifest;
    let mut vision = Encoder::load(&env, &model, &m.vision, &RuntimeOptions::default()).unwrap();
    for (w, h, target) in [
        (1024, 768, 64),
        (2000, 1500, 64),
        (3000, 2400, 64),
        (3600, 2000, 224),
    ] {
        let jpeg = large_textured_jpeg(w, h, w as u64 * 31 + h as u64);
        let full = decode_rgb8(&jpeg, &DecodeOptions::default()).unwrap();
        let reduced = decode_rgb8(
            &jpeg,
            &DecodeOptions {
                reduce_to: Some(target),
                ..DecodeOptions::default()
            },
        )
        .unwrap();
        let num = jpeg_scale_numerator(w, h, Some(target));
        assert_eq!(
            (reduced.width, reduced.height),
            (
                (w * num as usize).div_ceil(8),
                (h * num as usize).div_ceil(8)
            )
        );
        let pre = Preprocessing {
            image_size: target,
            ..Preprocessing::from_manifest(m)
        };
        let mut a = vec![0f32; pre.tensor_len()];
        let mut b = vec![0f32; pre.tensor_len()];
        pre.pixel_values(&full, &mut a);
        pre.pixel_values(&reduced, &mut b);
        let diffs: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).collect();
        let max = diffs.iter().cloned().fold(0f32, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        let mut line = format!(
            "{w}x{h} -> {target}: decoded at {num}/8 ({}x{}), pixel diff max {max:.3e} mean {mean:.3e}",
            reduced.width, reduced.height
        );
        assert!(mean < 0.02 && max < 0.25, "{line}");
        if target == m.image_size {
            let ea = vision.run_f32(&[1, 3, target, target], a).unwrap();
            let eb = vision.run_f32(&[1, 3, target, target], b).unwrap();
            let cos = cosine(&ea, &eb);
            line += &format!(", embedding cosine {cos:.7}");
            assert!(cos >= 0.9999, "{line}");
        }
        eprintln!("{line}");
    }
    // Small images and no target: never reduced.
    assert_eq!(jpeg_scale_numerator(512, 512, Some(64)), 4);
    assert_eq!(jpeg_scale_numerator(510, 4000, Some(64)), 8);
    assert_eq!(jpeg_scale_numerator(4000, 3000, None), 8);
}

/// The result cache keys texts by their normalized form: texts that normalize alike must get the
/// same token ids, and texts that normalize differently are different keys.
#[test]
fn normalized_text_determines_the_token_ids() {
    let model = model();
    let tok = TextTokenizer::load(&model).unwrap();
    let same = [
        ("Airport with parked planes", "airport  with parked PLANES"),
        ("flooded farmland.", "Flooded Farmland!"),
        ("  river\tdelta ", "river delta"),
    ];
    for (a, b) in same {
        let (na, nb) = (tok.normalize(a).unwrap(), tok.normalize(b).unwrap());
        assert_eq!(na, nb, "{a:?} vs {b:?}");
        assert_eq!(tok.encode(a).unwrap(), tok.encode(b).unwrap());
    }
    let (na, nb) = (
        tok.normalize("harbor").unwrap(),
        tok.normalize("harbour").unwrap(),
    );
    assert_ne!(na, nb);
}
