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
        let bound = if kind == "jpeg" { 0.9999 } else { 0.99999 };
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
