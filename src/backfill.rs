//! The encoding step of `rsclip_backfill` (the loop itself is PL/pgSQL in sql/backfill.sql, which
//! commits after every batch).
//!
//! `rsclip_backfill_encode(inputs, kind, prefetch)` encodes one batch in one inference run and
//! never fails on a bad input: an input that cannot be decoded gets a NULL embedding and its
//! error message. While the batch runs through the model, the images of the *next* batch
//! (`prefetch`, which the procedure has already claimed) are decoded on other threads and kept
//! for the next call, so decoding overlaps inference.

use crate::datum;
use crate::encode::{embedding_array_of, image_decode_options};
use crate::fmgr::{arg, bytea_bytes, error, pg_function};
use crate::model;
use crate::settings;
use pgrx::{pg_sys, PgSqlErrorCode};
use rsclip_model::decode::decode_rgb8;
use rsclip_model::runtime::with_signals_blocked;
use std::cell::RefCell;

type Decoded = Result<Vec<f32>, String>;

thread_local! {
    /// The images passed as `prefetch` (a copy of their bytes) and their pixel tensors or decode
    /// errors, in order. The next call's inputs are those rows minus any another backfill took
    /// meanwhile, in the same order, so they are matched by a forward walk comparing bytes (no
    /// hashing; a mismatch only means decoding again).
    static PREFETCHED: RefCell<Vec<(Vec<u8>, Decoded)>> = const { RefCell::new(Vec::new()) };
}

/// Takes the prefetched results for `images` (None where there is none).
fn take_prefetched(images: &[&[u8]]) -> Vec<Option<Decoded>> {
    rsclip_core::in_order::take_in_order(PREFETCHED.take(), images)
}

/// Decodes `images` on up to `threads` threads (no Postgres calls).
fn decode_all(
    images: &[&[u8]],
    threads: usize,
    pre: &rsclip_model::preprocess::Preprocessing,
    opts: &rsclip_model::decode::DecodeOptions,
) -> Vec<Decoded> {
    let one = |bytes: &[u8]| -> Decoded {
        let rgb = decode_rgb8(bytes, opts).map_err(|e| e.to_string())?;
        let mut out = vec![0f32; pre.tensor_len()];
        pre.pixel_values(&rgb, &mut out);
        Ok(out)
    };
    if images.is_empty() {
        return Vec::new();
    }
    let chunk = images.len().div_ceil(threads.max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = images
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(|b| one(b)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Encodes a batch of images; returns (embedding or None, error message or None) per input.
fn encode_image_batch(
    images: &[&[u8]],
    prefetch: &[&[u8]],
) -> Vec<(Option<Vec<f32>>, Option<String>)> {
    let threads = settings::INTRA_OP_THREADS.get().max(1) as usize;
    let mut decoded = take_prefetched(images);
    let (pre, dim) =
        model::with_model(|l, _| (l.preprocessing.clone(), l.model.manifest.embedding_dim));
    let opts = image_decode_options(pre.image_size);
    let missing: Vec<usize> = (0..images.len())
        .filter(|&i| decoded[i].is_none())
        .collect();
    let missing_bytes: Vec<&[u8]> = missing.iter().map(|&i| images[i]).collect();
    for (i, d) in missing.iter().zip(with_signals_blocked(|| {
        decode_all(&missing_bytes, threads, &pre, &opts)
    })) {
        decoded[*i] = Some(d);
    }
    let good: Vec<usize> = (0..images.len())
        .filter(|&i| matches!(decoded[i], Some(Ok(_))))
        .collect();
    let mut pixels = Vec::with_capacity(good.len() * pre.tensor_len());
    for &i in &good {
        if let Some(Ok(t)) = &decoded[i] {
            pixels.extend_from_slice(t);
        }
    }
    // Inference of this batch on this thread while the next batch decodes on the others.
    let (embeddings, next) = with_signals_blocked(|| {
        std::thread::scope(|s| {
            let next = s.spawn(|| decode_all(prefetch, threads, &pre, &opts));
            let embeddings = if good.is_empty() {
                Ok(Vec::new())
            } else {
                let s = pre.image_size;
                model::with_model(|loaded, counts| {
                    loaded
                        .vision(counts)
                        .run_f32(&[good.len(), 3, s, s], std::mem::take(&mut pixels))
                })
            };
            let next = next.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            (embeddings, next)
        })
    });
    let embeddings = embeddings.unwrap_or_else(|e| model::raise_runtime(e));
    PREFETCHED.set(prefetch.iter().map(|b| b.to_vec()).zip(next).collect());
    let mut out: Vec<(Option<Vec<f32>>, Option<String>)> = decoded
        .into_iter()
        .map(|d| match d {
            Some(Err(e)) => (None, Some(e)),
            _ => (None, None),
        })
        .collect();
    for (&i, v) in good.iter().zip(embeddings.chunks_exact(dim)) {
        let mut v = v.to_vec();
        rsclip_core::normalize_in_place(&mut v);
        out[i].0 = Some(v);
    }
    out
}

/// Builds the `(embeddings embedding[], errors text[])` result row.
///
/// # Safety
/// `fcinfo` is the current call, declared to return that composite type.
unsafe fn result_row(
    fcinfo: pg_sys::FunctionCallInfo,
    results: Vec<(Option<Vec<f32>>, Option<String>)>,
) -> pg_sys::Datum {
    // SAFETY: (caller) the call's result type is a composite of (embedding[], text[]).
    unsafe {
        let mut tupdesc: pg_sys::TupleDesc = std::ptr::null_mut();
        if pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut tupdesc)
            != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE
        {
            error(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "rsclip_backfill_encode must return a record",
            );
        }
        let tupdesc = pg_sys::BlessTupleDesc(tupdesc);
        let emb_array_type = pg_sys::SPI_gettypeid(tupdesc, 1);
        let embeddings: Vec<Option<pg_sys::Datum>> = results
            .iter()
            .map(|(v, _)| v.as_deref().map(datum::from_slice))
            .collect();
        let errors: Vec<Option<String>> = results.into_iter().map(|(_, e)| e).collect();
        let mut values = [
            embedding_array_of(emb_array_type, embeddings),
            text_array(&errors),
        ];
        let mut nulls = [false, false];
        let tuple = pg_sys::heap_form_tuple(tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::Datum::from((*tuple).t_data)
    }
}

fn text_array(items: &[Option<String>]) -> pg_sys::Datum {
    let values: Vec<Option<pg_sys::Datum>> = items
        .iter()
        .map(|s| s.as_deref().map(crate::fmgr::text_datum))
        .collect();
    // SAFETY: text datums.
    unsafe { crate::fmgr::array_datum(pg_sys::TEXTOID, &values, 1) }
}

/// The non-NULL elements of a bytea[] or text[] argument, with their positions.
///
/// # Safety
/// `d` is a valid one-dimensional array of a varlena type.
unsafe fn varlena_elements<'a>(d: pg_sys::Datum) -> Vec<Option<&'a [u8]>> {
    // SAFETY: (caller).
    unsafe {
        let (elems, _) = crate::encode::array_elements(d);
        elems
            .into_iter()
            .map(|e| e.map(|d| bytea_bytes(d)))
            .collect()
    }
}

pg_function! {
    /// `rsclip_backfill_encode(inputs bytea[], kind text, prefetch bytea[])
    ///   -> (embeddings embedding[], errors text[])`: one batch of the backfill (texts are passed
    /// as their UTF-8 bytes). NULL inputs give NULL embeddings and no error.
    fn rsclip_backfill_encode(fcinfo) {
        // SAFETY: declared STRICT (bytea[], text, bytea[]) returning the composite above.
        unsafe {
            let inputs = varlena_elements(arg(fcinfo, 0));
            let kind = String::from_utf8_lossy(bytea_bytes(arg(fcinfo, 1))).into_owned();
            let prefetch: Vec<&[u8]> = varlena_elements(arg(fcinfo, 2)).into_iter().flatten().collect();
            let present: Vec<usize> = (0..inputs.len()).filter(|&i| inputs[i].is_some()).collect();
            let bytes: Vec<&[u8]> = present.iter().map(|&i| inputs[i].expect("present")).collect();
            let encoded: Vec<(Option<Vec<f32>>, Option<String>)> = match kind.as_str() {
                "image" => encode_image_batch(&bytes, &prefetch),
                "text" => {
                    let texts: Vec<String> = bytes.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
                    crate::encode::encode_texts(&texts).into_iter().map(|v| (Some(v), None)).collect()
                }
                other => error(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("rsclip: kind must be 'image' or 'text', not '{other}'"),
                ),
            };
            let mut results: Vec<(Option<Vec<f32>>, Option<String>)> = vec![(None, None); inputs.len()];
            for (&i, r) in present.iter().zip(encoded) {
                results[i] = r;
            }
            result_row(fcinfo, results)
        }
    }
}
