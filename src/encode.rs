//! SQL entry points of the encoders: images and texts to unit-length embeddings.

use crate::cache::{self, Key, Kind};
use crate::datum;
use crate::fmgr::{arg, bytea_bytes, error, float8_datum, pg_function};
use crate::inference;
use crate::model::{self, Loaded};
use crate::settings;
use pgrx::{pg_sys, PgSqlErrorCode};
use rsclip_infer::Kind as Encoder;
use rsclip_model::decode::{DecodeError, DecodeOptions};

fn decode_options() -> DecodeOptions {
    DecodeOptions {
        max_pixels: settings::MAX_IMAGE_PIXELS.get().max(1) as u64,
        bands: settings::tiff_bands(),
        reduce_to: None,
    }
}

/// The decoding options in force for a model whose input is `image_size` pixels square.
pub(crate) fn image_decode_options(image_size: usize) -> DecodeOptions {
    DecodeOptions {
        reduce_to: settings::JPEG_FAST_DOWNSCALE.get().then_some(image_size),
        ..decode_options()
    }
}

fn raise_decode(e: &DecodeError, which: Option<usize>) -> ! {
    let code = match e {
        DecodeError::TooLarge { .. } => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        DecodeError::Unsupported { .. } | DecodeError::UnknownFormat => {
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
        }
        DecodeError::Empty | DecodeError::Corrupt { .. } => {
            PgSqlErrorCode::ERRCODE_INVALID_BINARY_REPRESENTATION
        }
    };
    match which {
        Some(i) => error(code, format!("rsclip: array element {}: {e}", i + 1)),
        None => error(code, format!("rsclip: {e}")),
    }
}

/// An `embedding` datum of an already normalized vector (normalized once, when encoded, so a
/// cached result is bit-identical to a fresh one).
fn embedding_datum(v: &[f32]) -> pg_sys::Datum {
    datum::from_slice(v)
}

/// Decodes and preprocesses `images` into one tensor (interruptibly, see decoding.rs).
fn pixel_batch(
    loaded: &Loaded,
    images: &[&[u8]],
    threads: usize,
    labels: Option<&[usize]>,
) -> Vec<f32> {
    let pre = &loaded.preprocessing;
    let opts = image_decode_options(pre.image_size);
    let per = pre.tensor_len();
    let mut out = Vec::with_capacity(per * images.len());
    for (i, r) in crate::decoding::decode_batch(images, threads, pre, &opts)
        .into_iter()
        .enumerate()
    {
        match r {
            Ok(pixels) => out.extend_from_slice(&pixels),
            Err(e) => raise_decode(&e, labels.map(|l| l[i])),
        }
    }
    out
}

/// Normalized embeddings of `images`, one inference run per rsclip.batch_size. `labels` are the
/// images' positions in the caller's array (for error messages), None for a single image.
fn encode_images(images: &[&[u8]], labels: Option<&[usize]>) -> Vec<Vec<f32>> {
    let batch = settings::BATCH_SIZE.get().max(1) as usize;
    let threads = settings::decode_threads();
    let mut result = Vec::with_capacity(images.len());
    for (c, chunk) in images.chunks(batch).enumerate() {
        pgrx::check_for_interrupts!();
        let chunk_labels = labels.map(|l| &l[c * batch..c * batch + chunk.len()]);
        model::with_model(|loaded, counts| {
            let pixels = pixel_batch(loaded, chunk, threads, chunk_labels);
            let s = loaded.preprocessing.image_size;
            let dim = loaded.model.manifest.embedding_dim;
            let out = if inference::worker_mode() {
                // One copy, the pixels into the request's segment (no byte vector between).
                inference::encode_remote(
                    loaded,
                    Encoder::Vision,
                    chunk.len(),
                    &[3, s, s],
                    &inference::f32_bytes(&pixels),
                    dim,
                )
            } else {
                loaded
                    .vision(counts)
                    .run_f32(&[chunk.len(), 3, s, s], pixels)
                    .unwrap_or_else(|e| model::raise_runtime(e))
            };
            result.extend(out.chunks_exact(dim).map(normalized));
        });
    }
    result
}

fn normalized(v: &[f32]) -> Vec<f32> {
    let mut v = v.to_vec();
    rsclip_core::normalize_in_place(&mut v);
    v
}

/// The rsclip.jpeg_fast_downscale and rsclip.tiff_bands values: they change what an image
/// decodes to, so they are part of the image cache key.
fn decoding_settings() -> String {
    let o = decode_options();
    format!(
        "jpeg_fast_downscale={} bands={:?}",
        settings::JPEG_FAST_DOWNSCALE.get(),
        o.bands
    )
}

/// [`encode_images`] through the result cache.
fn cached_images(
    namespace: pg_sys::Oid,
    images: &[&[u8]],
    labels: Option<&[usize]>,
) -> Vec<Vec<f32>> {
    if images.is_empty() || !cache::enabled(Kind::Image) {
        return encode_images(images, labels);
    }
    let decoding = decoding_settings();
    let model = model::with_model(|l, _| cache::model_key(Kind::Image, &l.fingerprint, &decoding));
    let keys: Vec<Key> = images
        .iter()
        .map(|b| Key {
            model,
            kind: Kind::Image,
            input: cache::sha256(b),
        })
        .collect();
    cache::resolve(namespace, &keys, &mut |positions| {
        let subset: Vec<&[u8]> = positions.iter().map(|&p| images[p]).collect();
        let subset_labels: Option<Vec<usize>> =
            labels.map(|l| positions.iter().map(|&p| l[p]).collect());
        encode_images(&subset, subset_labels.as_deref())
    })
}

/// [`encode_texts`] through the result cache, keyed by the normalized text. A text seen before
/// in this backend is found by its raw form first, without normalizing it again.
fn cached_texts(namespace: pg_sys::Oid, texts: &[String]) -> Vec<Vec<f32>> {
    if texts.is_empty() || !cache::enabled(Kind::Text) {
        return encode_texts(texts);
    }
    let model = model::with_model(|l, _| cache::model_key(Kind::Text, &l.fingerprint, ""));
    let raw_keys: Vec<Key> = texts
        .iter()
        .map(|t| Key {
            model,
            kind: Kind::RawText,
            input: cache::sha256(t.as_bytes()),
        })
        .collect();
    let mut out = cache::lru_lookup(&raw_keys);
    let missing: Vec<usize> = (0..texts.len()).filter(|&i| out[i].is_none()).collect();
    if missing.is_empty() {
        return out.into_iter().map(|v| v.expect("hit")).collect();
    }
    let keys: Vec<Key> = model::with_model(|l, counts| {
        let tokenizer = l.tokenizer(counts);
        missing
            .iter()
            .map(|&i| {
                let normalized = tokenizer.normalize(&texts[i]).unwrap_or_else(|e| {
                    error(
                        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("rsclip: {e}"),
                    )
                });
                Key {
                    model,
                    kind: Kind::Text,
                    input: cache::sha256(normalized.as_bytes()),
                }
            })
            .collect()
    });
    let found = cache::resolve(namespace, &keys, &mut |positions| {
        let subset: Vec<String> = positions
            .iter()
            .map(|&p| texts[missing[p]].clone())
            .collect();
        encode_texts(&subset)
    });
    let missing_raw: Vec<Key> = missing.iter().map(|&i| raw_keys[i]).collect();
    cache::lru_remember(&missing_raw, &found);
    for (&i, v) in missing.iter().zip(found) {
        out[i] = Some(v);
    }
    out.into_iter().map(|v| v.expect("filled")).collect()
}

pub(crate) fn encode_texts(texts: &[String]) -> Vec<Vec<f32>> {
    let batch = settings::BATCH_SIZE.get().max(1) as usize;
    let mut result = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch) {
        pgrx::check_for_interrupts!();
        model::with_model(|loaded, counts| {
            let dim = loaded.model.manifest.embedding_dim;
            let remote = inference::worker_mode();
            let tokenizer = loaded.tokenizer(counts);
            let mut ids = Vec::with_capacity(chunk.len() * tokenizer.max_length);
            for t in chunk {
                ids.extend(tokenizer.encode(t).unwrap_or_else(|e| {
                    error(
                        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("rsclip: {e}"),
                    )
                }));
            }
            let len = tokenizer.max_length;
            let out = if remote {
                let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
                inference::encode_remote(loaded, Encoder::Text, chunk.len(), &[len], &bytes, dim)
            } else {
                loaded
                    .text(counts)
                    .0
                    .run_i64(&[chunk.len(), len], ids)
                    .unwrap_or_else(|e| model::raise_runtime(e))
            };
            result.extend(out.chunks_exact(dim).map(normalized));
        });
    }
    result
}

/// Text of a `text` datum; invalid UTF-8 (a non-UTF8 database) is replaced, not rejected.
///
/// # Safety
/// `d` must be a valid text datum.
unsafe fn text_string(d: pg_sys::Datum) -> String {
    // SAFETY: guaranteed by the caller.
    String::from_utf8_lossy(unsafe { bytea_bytes(d) }).into_owned()
}

pg_function! {
    /// `rsclip_encode_image(bytea) -> embedding`
    fn rsclip_encode_image(fcinfo) {
        // SAFETY: declared STRICT with a bytea argument.
        let bytes = unsafe { bytea_bytes(arg(fcinfo, 0)) };
        // SAFETY: the current call's fcinfo.
        let namespace = unsafe { cache::function_namespace(fcinfo) };
        let v = cached_images(namespace, &[bytes], None);
        embedding_datum(&v[0])
    }
}

pg_function! {
    /// `rsclip_encode_text(text) -> embedding`
    fn rsclip_encode_text(fcinfo) {
        // SAFETY: declared STRICT with a text argument.
        let s = unsafe { text_string(arg(fcinfo, 0)) };
        // SAFETY: the current call's fcinfo.
        let namespace = unsafe { cache::function_namespace(fcinfo) };
        let v = cached_texts(namespace, &[s]);
        embedding_datum(&v[0])
    }
}

/// Elements of a one-dimensional varlena array (NULLs as None), and the array's element type.
///
/// # Safety
/// `d` must be a valid array datum of a varlena element type.
pub(crate) unsafe fn array_elements(d: pg_sys::Datum) -> (Vec<Option<pg_sys::Datum>>, i32) {
    // SAFETY: guaranteed by the caller; deconstruct_array yields n datums and null flags.
    unsafe {
        let arr = pg_sys::pg_detoast_datum(d.cast_mut_ptr()) as *mut pg_sys::ArrayType;
        if (*arr).ndim > 1 {
            error(
                PgSqlErrorCode::ERRCODE_ARRAY_ELEMENT_ERROR,
                "rsclip: expected a one-dimensional array",
            );
        }
        // Header, then ndim dimension sizes, then ndim lower bounds (ARR_LBOUND).
        let lbound = if (*arr).ndim == 1 {
            *((arr as *const u8).add(std::mem::size_of::<pg_sys::ArrayType>()) as *const i32).add(1)
        } else {
            1
        };
        let mut elems: *mut pg_sys::Datum = std::ptr::null_mut();
        let mut nulls: *mut bool = std::ptr::null_mut();
        let mut n: std::ffi::c_int = 0;
        pg_sys::deconstruct_array(
            arr,
            (*arr).elemtype,
            -1,
            false,
            pg_sys::TYPALIGN_INT as std::ffi::c_char,
            &mut elems,
            &mut nulls,
            &mut n,
        );
        let n = n.max(0) as usize;
        if n == 0 {
            return (Vec::new(), lbound);
        }
        let elems = std::slice::from_raw_parts(elems, n);
        let nulls = std::slice::from_raw_parts(nulls, n);
        (
            elems
                .iter()
                .zip(nulls)
                .map(|(d, null)| (!null).then_some(*d))
                .collect(),
            lbound,
        )
    }
}

/// Builds an `embedding[]` with NULLs where the input had NULLs.
///
/// # Safety
/// `fcinfo` must be the current call, declared to return `embedding[]`.
unsafe fn embedding_array(
    fcinfo: pg_sys::FunctionCallInfo,
    values: Vec<Option<pg_sys::Datum>>,
    lbound: i32,
) -> pg_sys::Datum {
    // SAFETY: flinfo is valid for the call.
    let array_type = unsafe { pg_sys::get_fn_expr_rettype((*fcinfo).flinfo) };
    // SAFETY: the declared return type is embedding[].
    unsafe { embedding_array_with(array_type, values, lbound) }
}

/// An array of type `array_type` (an `embedding[]`) holding `values` (NULL where None).
///
/// # Safety
/// `array_type` is the embedding array type; the values are embedding datums.
pub(crate) unsafe fn embedding_array_of(
    array_type: pg_sys::Oid,
    values: Vec<Option<pg_sys::Datum>>,
) -> pg_sys::Datum {
    // SAFETY: (caller).
    unsafe { embedding_array_with(array_type, values, 1) }
}

/// # Safety
/// As for [`embedding_array_of`].
unsafe fn embedding_array_with(
    array_type: pg_sys::Oid,
    values: Vec<Option<pg_sys::Datum>>,
    lbound: i32,
) -> pg_sys::Datum {
    // SAFETY: the element type of the embedding array type; (caller) embedding datums.
    unsafe {
        let elem_type = pg_sys::get_element_type(array_type);
        if elem_type == pg_sys::InvalidOid {
            error(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "rsclip: cannot determine the embedding array type",
            );
        }
        crate::fmgr::array_datum(elem_type, &values, lbound)
    }
}

pg_function! {
    /// `rsclip_encode_images(bytea[]) -> embedding[]`, one inference run per rsclip.batch_size.
    fn rsclip_encode_images(fcinfo) {
        // SAFETY: declared STRICT with a bytea[] argument, returning embedding[].
        unsafe {
            let (elems, lbound) = array_elements(arg(fcinfo, 0));
            let positions: Vec<usize> = elems.iter().enumerate().filter(|(_, e)| e.is_some()).map(|(i, _)| i).collect();
            let present: Vec<&[u8]> = elems.iter().flatten().map(|d| bytea_bytes(*d)).collect();
            let encoded = cached_images(cache::function_namespace(fcinfo), &present, Some(&positions));
            let mut it = encoded.iter();
            let out = elems.iter().map(|e| e.map(|_| embedding_datum(it.next().expect("one per image")))).collect();
            embedding_array(fcinfo, out, lbound)
        }
    }
}

pg_function! {
    /// `rsclip_encode_texts(text[]) -> embedding[]`
    fn rsclip_encode_texts(fcinfo) {
        // SAFETY: declared STRICT with a text[] argument, returning embedding[].
        unsafe {
            let (elems, lbound) = array_elements(arg(fcinfo, 0));
            let present: Vec<String> = elems.iter().flatten().map(|d| text_string(*d)).collect();
            let encoded = cached_texts(cache::function_namespace(fcinfo), &present);
            let mut it = encoded.iter();
            let out = elems.iter().map(|e| e.map(|_| embedding_datum(it.next().expect("one per text")))).collect();
            embedding_array(fcinfo, out, lbound)
        }
    }
}

pg_function! {
    /// `rsclip_probability(image embedding, text embedding) -> double precision`:
    /// SigLIP's `sigmoid(cos * exp(logit_scale) + logit_bias)` with the model's own scale and bias.
    fn rsclip_probability(fcinfo) {
        // SAFETY: declared STRICT with two embedding arguments.
        let cos = unsafe {
            crate::detoast_cache::with_args(fcinfo, |a, b| {
                if a.len() != b.len() {
                    error(PgSqlErrorCode::ERRCODE_DATA_EXCEPTION, format!("different embedding dimensions {} and {}", a.len(), b.len()));
                }
                1.0 - rsclip_core::distance::cosine_distance(a, b)
            })
        };
        let (scale, bias) = model::logit_params();
        float8_datum(rsclip_model::probability(cos, scale, bias))
    }
}

pg_function! {
    /// `rsclip_model_info() -> jsonb`
    fn rsclip_model_info(fcinfo) {
        let _ = fcinfo;
        let info = model::with_model(|l, counts| {
            let (vision, text) = l.providers();
            let cache = l.optimized_cache();
            let m = &l.model.manifest;
            let opts = l.options();
            serde_json::json!({
                "model_id": m.model_id,
                "revision": m.revision,
                "model_path": l.model_dir().display().to_string(),
                "fingerprint": l.fingerprint,
                "embedding_dim": m.embedding_dim,
                "image_size": m.image_size,
                "max_text_length": m.max_text_length,
                "logit_scale": m.logit_scale,
                "logit_bias": m.logit_bias,
                "precision": m.precision,
                "execution_provider_setting": format!("{:?}", opts.provider).to_lowercase(),
                "provider": {"vision": vision, "text": text},
                "cuda_device": opts.cuda_device,
                "intra_op_threads": opts.intra_op_threads,
                "onnxruntime_version": rsclip_model::runtime::ort_version(),
                "sessions_loaded": {"vision": vision.is_some(), "text": text.is_some()},
                "optimized_cache": {"vision": cache.0, "text": cache.1},
                "load_counts": {
                    "model_opens": counts.model_opens,
                    "vision": counts.vision_loads,
                    "text": counts.text_loads,
                    "tokenizer": counts.tokenizer_loads,
                },
                "session_create_ms": {"vision": counts.vision_load_ms, "text": counts.text_load_ms},
                "inference": if inference::worker_mode() { "worker" } else { "backend" },
                "inference_workers_running": inference::queue()
                    .map(|q| q.workers().iter().filter(|w| w.1).count()),
            })
        });
        jsonb_datum(&info.to_string())
    }
}

pg_function! {
    /// `rsclip_inference_stats() -> jsonb`: per shared inference worker, its counters.
    fn rsclip_inference_stats(_fcinfo) {
        jsonb_datum(&inference::stats_json().to_string())
    }
}

pg_function! {
    /// `rsclip_cache_backend_stats() -> jsonb`: this backend's cache counters.
    fn rsclip_cache_backend_stats(_fcinfo) {
        jsonb_datum(&cache::backend_stats_json())
    }
}

/// A `jsonb` datum parsed from JSON text.
pub fn jsonb_datum(json: &str) -> pg_sys::Datum {
    let text = std::ffi::CString::new(json).expect("JSON has no NUL");
    // SAFETY: jsonb_in parses a NUL-terminated C string into a palloc'd jsonb.
    unsafe {
        pgrx::fcinfo::direct_function_call_as_datum(
            pg_sys::jsonb_in,
            &[Some(pg_sys::Datum::from(text.as_ptr()))],
        )
        .expect("jsonb_in returns a value")
    }
}
