//! The encoding step of `rsclip_backfill` (the loop itself is PL/pgSQL in sql/backfill.sql, which
//! commits after every batch).
//!
//! `rsclip_backfill_encode(inputs, kind, prefetch)` encodes one batch and never fails on a bad
//! input: an input that cannot be decoded gets a NULL embedding and its error message. The
//! procedure hands every batch over early, as `prefetch`, two calls before it asks for its
//! embeddings, so three batches are in flight at once: while the backend writes one batch,
//! commits and claims more, the next batch runs through the model on a background thread (which
//! owns the vision session meanwhile) and the one after it decodes on other threads. The model
//! then never waits for SQL or decoding unless those take longer than inference.
//!
//! In worker mode (`rsclip.inference = worker`) the same three stages run with the inference
//! workers in place of the background model thread: a batch whose decoding is done is queued
//! for the workers at once (its pixels copied straight into the request's DSM segment, whose
//! mapping outlives the commits in between) and its answer is read when the procedure asks
//! for that batch, so the workers run the next batch while this backend writes and commits.
//! Several backfills share the workers (and their batches) through the one queue.
//!
//! Protocol: `prefetch` is queued; non-empty `inputs` take the oldest batch handed over (rows of
//! it another backfill took meanwhile are left out, so the two are matched by comparing bytes;
//! inputs without a match are encoded on the spot). A call with neither inputs nor prefetch
//! forgets everything handed over (the procedure makes one at the start of each pass).

use crate::datum;
use crate::encode::{embedding_array_of, image_decode_options};
use crate::fmgr::{arg, bytea_bytes, error, pg_function};
use crate::inference::{self, InFlight};
use crate::model;
use crate::settings;
use pgrx::{pg_sys, PgSqlErrorCode};
use rsclip_infer::Kind;
use rsclip_model::decode::{decode_rgb8, DecodeOptions};
use rsclip_model::preprocess::Preprocessing;
use rsclip_model::runtime::{with_signals_blocked, Encoder, RuntimeError};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A decoded image's pixel tensor, or why it could not be decoded.
type Decoded = Result<Vec<f32>, String>;
/// An input's normalized embedding, or why it has none.
type Outcome = Result<Vec<f32>, String>;

/// The model and settings a batch was handed over under: a batch handed over under others is
/// not used.
#[derive(Clone, PartialEq)]
struct Decoding {
    fingerprint: String,
    options: DecodeOptions,
    preprocessing: Preprocessing,
}

/// A batch handed over and decoding (or decoded) on its own thread, with copies of its inputs.
struct Queued {
    settings: Decoding,
    inputs: Arc<Vec<Vec<u8>>>,
    decoded: JoinHandle<Vec<Decoded>>,
    /// Set when the batch is forgotten (an abort): its decoding stops before the next image and
    /// its model job skips inference.
    cancel: Arc<AtomicBool>,
}

/// What the model job of a batch produced: its inputs and their outcomes, None if the model run
/// failed (then the inputs are encoded again on the spot, which raises the error itself).
struct Ahead {
    settings: Decoding,
    inputs: Arc<Vec<Vec<u8>>>,
    outcomes: Option<Vec<Outcome>>,
}

thread_local! {
    /// Batches handed over and not yet given to the model, oldest first. The batch before them
    /// runs as the model's vision job and returns an `Ahead`.
    static QUEUE: RefCell<VecDeque<Queued>> = const { RefCell::new(VecDeque::new()) };
    /// The cancel flag of the batch the model job works on.
    static JOB_CANCEL: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
    /// Worker mode: batches queued for the inference workers, oldest first, answers not read.
    static SUBMITTED: RefCell<VecDeque<Submitted>> = const { RefCell::new(VecDeque::new()) };
}

/// Worker mode: a decoded batch queued for the inference workers.
struct Submitted {
    settings: Decoding,
    inputs: Arc<Vec<Vec<u8>>>,
    /// Per input: its row in the request, or why it did not decode.
    rows: Vec<Result<usize, String>>,
    /// None when no input decoded (nothing to run).
    request: Option<InFlight>,
}

/// Batches queued for the workers at most, per backend: the one the procedure asks for next
/// and the one after it, so that a worker never waits for this backend's SQL.
const SUBMITTED_AHEAD: usize = 2;

/// Decodes `images` on up to `threads` threads (no Postgres calls).
fn decode_all<B: AsRef<[u8]> + Sync>(
    images: &[B],
    threads: usize,
    pre: &Preprocessing,
    opts: &DecodeOptions,
    cancel: &AtomicBool,
) -> Vec<Decoded> {
    let one = |bytes: &B| -> Decoded {
        if cancel.load(Ordering::Relaxed) {
            return Err("cancelled".into());
        }
        let rgb = decode_rgb8(bytes.as_ref(), opts).map_err(|e| e.to_string())?;
        let mut out = vec![0f32; pre.tensor_len()];
        pre.pixel_values(&rgb, &mut out);
        Ok(out)
    };
    let chunk = images.len().div_ceil(threads.max(1)).max(1);
    if images.len() <= chunk {
        return images.iter().map(one).collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = images
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(one).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Runs the model once on the decodable ones of `decoded`; the outcome of each.
fn run_decoded(
    encoder: &mut Encoder,
    decoded: Vec<Decoded>,
    image_size: usize,
) -> Result<Vec<Outcome>, RuntimeError> {
    let dim = encoder.dim;
    let good = decoded.iter().filter(|d| d.is_ok()).count();
    if good == 0 {
        return Ok(decoded);
    }
    let mut pixels = Vec::with_capacity(good * 3 * image_size * image_size);
    for t in decoded.iter().flatten() {
        pixels.extend_from_slice(t);
    }
    let embeddings = encoder.run_f32(&[good, 3, image_size, image_size], pixels)?;
    let mut rows = embeddings.chunks_exact(dim);
    Ok(decoded
        .into_iter()
        .map(|d| {
            d.map(|_| {
                let mut v = rows.next().expect("one row per decoded image").to_vec();
                rsclip_core::normalize_in_place(&mut v);
                v
            })
        })
        .collect())
}

/// Forgets the batches handed over when a transaction aborts (an interrupted backfill), so that
/// their pixel tensors do not stay in a backend that may never run another backfill.
/// Registered once per backend, on the first batch handed over.
fn forget_on_abort() {
    thread_local! {
        static REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if !REGISTERED.replace(true) {
        // SAFETY: registers a plain callback; it only touches this thread's state.
        unsafe { pg_sys::RegisterXactCallback(Some(forget_at_abort), std::ptr::null_mut()) };
    }
}

/// Transaction callback: on abort, forgets the queue and waits for the model job (never raises).
unsafe extern "C-unwind" fn forget_at_abort(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::XactEvent::XACT_EVENT_ABORT {
        // Not waiting for the model job here: an abort that a cancel caused must not wait for
        // a large image to finish decoding. Cancelled, the job drops its batch at once and
        // stays to be collected by the next use of the model (or at exit).
        let _ = std::panic::catch_unwind(|| {
            QUEUE.with(|q| {
                if let Ok(mut q) = q.try_borrow_mut() {
                    for b in q.iter() {
                        b.cancel.store(true, Ordering::Relaxed);
                    }
                    q.clear();
                }
            });
            JOB_CANCEL.with(|c| {
                if let Some(c) = c.try_borrow_mut().ok().and_then(|mut c| c.take()) {
                    c.store(true, Ordering::Relaxed);
                }
            });
            // Gives the requests up (a worker drops their answers) and detaches their segments.
            SUBMITTED.with(|s| {
                if let Ok(mut s) = s.try_borrow_mut() {
                    s.clear();
                }
            });
        });
    }
}

/// Starts decoding `images` on a thread of its own (which spreads them over `threads`).
fn spawn_decoding(images: &[&[u8]], threads: usize, settings: &Decoding) -> Queued {
    forget_on_abort();
    let inputs: Arc<Vec<Vec<u8>>> = Arc::new(images.iter().map(|b| b.to_vec()).collect());
    let cancel = Arc::new(AtomicBool::new(false));
    let (bytes, options, preprocessing, stop) = (
        Arc::clone(&inputs),
        settings.options,
        settings.preprocessing.clone(),
        Arc::clone(&cancel),
    );
    let decoded = with_signals_blocked(|| {
        std::thread::Builder::new()
            .name("rsclip decode".into())
            .spawn(move || decode_all(&bytes, threads, &preprocessing, &options, &stop))
    })
    .unwrap_or_else(|e| {
        error(
            PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
            format!("rsclip: cannot start a decoding thread: {e}"),
        )
    });
    Queued {
        settings: settings.clone(),
        inputs,
        decoded,
        cancel,
    }
}

/// Gives the oldest queued batch to the model, unless the model is busy: a job on the model
/// thread that waits for the batch's decoding, then runs the model on it.
fn start_next_model_job() {
    if model::with_model(|l, _| l.vision_busy()) {
        return;
    }
    let Some(Queued {
        settings,
        inputs,
        decoded,
        cancel,
    }) = QUEUE.with_borrow_mut(|q| q.pop_front())
    else {
        return;
    };
    JOB_CANCEL.with_borrow_mut(|c| *c = Some(Arc::clone(&cancel)));
    model::with_model(|l, counts| {
        l.spawn_vision(counts, move |encoder| {
            let decoded = decoded
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            if cancel.load(Ordering::Relaxed) {
                return Ahead {
                    settings,
                    inputs: Arc::new(Vec::new()),
                    outcomes: None,
                };
            }
            let image_size = settings.preprocessing.image_size;
            Ahead {
                settings,
                inputs,
                outcomes: run_decoded(encoder, decoded, image_size).ok(),
            }
        })
    });
}

/// Forgets every batch handed over (their threads finish on their own; requests queued for the
/// workers are given up).
fn forget_handed_over() {
    QUEUE.with_borrow_mut(|q| q.clear());
    SUBMITTED.with_borrow_mut(|s| s.clear());
    model::with_model(|l, _| drop(l.join_vision::<Ahead>()));
}

/// Worker mode: waits for `queued`'s decoding and queues its decodable images for the workers,
/// without waiting for the answer.
fn submit_decoded(queued: Queued) -> Submitted {
    let Queued {
        settings,
        inputs,
        decoded,
        cancel,
    } = queued;
    let decoded = crate::decoding::join_interruptibly(decoded, &cancel);
    submit_pixels(settings, inputs, decoded)
}

/// Worker mode: queues the decodable ones of `decoded` (the tensors of `inputs`) for the workers.
fn submit_pixels(
    settings: Decoding,
    inputs: Arc<Vec<Vec<u8>>>,
    decoded: Vec<Decoded>,
) -> Submitted {
    let mut good = 0;
    let rows: Vec<Result<usize, String>> = decoded
        .iter()
        .map(|d| match d {
            Ok(_) => {
                good += 1;
                Ok(good - 1)
            }
            Err(e) => Err(e.clone()),
        })
        .collect();
    let request = (good > 0).then(|| {
        let parts: Vec<std::borrow::Cow<[u8]>> = decoded
            .iter()
            .flatten()
            .map(|t| inference::f32_bytes(t))
            .collect();
        let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_ref()).collect();
        let s = settings.preprocessing.image_size;
        model::with_model(|l, _| {
            let dim = l.model.manifest.embedding_dim;
            inference::submit_remote(l, Kind::Vision, good, &[3, s, s], &parts, dim, true)
        })
    });
    Submitted {
        settings,
        inputs,
        rows,
        request,
    }
}

/// Worker mode: queues handed-over batches for the workers, oldest first, while fewer than
/// [`SUBMITTED_AHEAD`] are queued and (unless `block`) the oldest has finished decoding.
/// Batches handed over under other settings than `settings` are dropped (never used).
fn submit_ahead(settings: &Decoding, block: bool) {
    while SUBMITTED.with_borrow(|s| s.len()) < SUBMITTED_AHEAD {
        let next = QUEUE.with_borrow_mut(|q| {
            while q.front().is_some_and(|b| b.settings != *settings) {
                q.pop_front();
            }
            match q.front() {
                Some(b) if block || b.decoded.is_finished() => q.pop_front(),
                _ => None,
            }
        });
        let Some(queued) = next else { return };
        let submitted = submit_decoded(queued);
        SUBMITTED.with_borrow_mut(|s| s.push_back(submitted));
    }
}

/// Worker mode: reads the answer of a queued batch; its outcomes in input order.
fn answers(b: Submitted) -> (Arc<Vec<Vec<u8>>>, Vec<Outcome>) {
    let embeddings = b.request.map(InFlight::wait).unwrap_or_default();
    let good = b.rows.iter().filter(|r| r.is_ok()).count();
    let dim = embeddings.len() / good.max(1);
    let outcomes = b
        .rows
        .into_iter()
        .map(|r| {
            r.map(|i| {
                let mut v = embeddings[i * dim..(i + 1) * dim].to_vec();
                rsclip_core::normalize_in_place(&mut v);
                v
            })
        })
        .collect();
    (b.inputs, outcomes)
}

/// Removes and returns the oldest batch of `batches` that `wanted` accepts, dropping the older
/// ones (the procedure skips a batch when another backfill took all its rows); leaves the
/// deque as it is when none does.
fn take_first<T>(batches: &mut VecDeque<T>, wanted: impl Fn(&T) -> bool) -> Option<T> {
    let at = batches.iter().position(wanted)?;
    batches.drain(..at);
    batches.pop_front()
}

/// Worker mode's [`take_handed_over`]: the batch queued for the workers that holds `images[0]`
/// (older ones are given up), else the handed-over batch that does, queued now; None where
/// nothing matched.
fn take_submitted(images: &[&[u8]], settings: &Decoding) -> Vec<Option<Outcome>> {
    let holds_first = |inputs: &[Vec<u8>]| inputs.iter().any(|b| b.as_slice() == images[0]);
    let matched = |(inputs, done): (Arc<Vec<Vec<u8>>>, Vec<Outcome>)| {
        rsclip_core::in_order::take_in_order(
            inputs.iter().map(Vec::as_slice).zip(done).collect(),
            images,
        )
    };
    let found = SUBMITTED
        .with_borrow_mut(|s| take_first(s, |b| b.settings == *settings && holds_first(&b.inputs)));
    if let Some(b) = found {
        // The next batch goes to the workers before this backend sleeps on this one's answer.
        submit_ahead(settings, false);
        return matched(answers(b));
    }
    let found = QUEUE
        .with_borrow_mut(|q| take_first(q, |b| b.settings == *settings && holds_first(&b.inputs)));
    if let Some(queued) = found {
        // Everything queued for the workers is older than this batch: given up.
        SUBMITTED.with_borrow_mut(|s| s.clear());
        let b = submit_decoded(queued);
        submit_ahead(settings, false);
        return matched(answers(b));
    }
    vec![None; images.len()]
}

/// The outcomes of `images` from the batches handed over: the model job's batch if it holds
/// `images[0]`, else the oldest queued batch that does (those before it are dropped: the
/// procedure skips a batch when another backfill took all its rows; when none does, the queue
/// stays as it is). None where nothing matched.
fn take_handed_over(images: &[&[u8]], settings: &Decoding) -> Vec<Option<Outcome>> {
    let holds_first = |inputs: &[Vec<u8>]| inputs.iter().any(|b| b.as_slice() == images[0]);
    let matched = |inputs: &[Vec<u8>], done: Vec<Outcome>| {
        rsclip_core::in_order::take_in_order(
            inputs.iter().map(Vec::as_slice).zip(done).collect(),
            images,
        )
    };
    if let Some(Ahead {
        settings: s,
        inputs,
        outcomes: Some(done),
    }) = model::with_model(|l, _| l.join_vision::<Ahead>())
    {
        if s == *settings && holds_first(&inputs) {
            return matched(&inputs, done);
        }
    }
    let found = QUEUE
        .with_borrow_mut(|q| take_first(q, |b| b.settings == *settings && holds_first(&b.inputs)));
    if let Some(Queued {
        inputs,
        decoded,
        cancel,
        ..
    }) = found
    {
        let decoded = crate::decoding::join_interruptibly(decoded, &cancel);
        let image_size = settings.preprocessing.image_size;
        // on failure, encoded again on the spot, which raises the error
        if let Ok(done) =
            model::with_model(|l, counts| run_decoded(l.vision(counts), decoded, image_size))
        {
            return matched(&inputs, done);
        }
    }
    vec![None; images.len()]
}

/// Queues `prefetch`, encodes `images` (from what was handed over, or on the spot) and keeps the
/// model busy with the next batch; returns (embedding or None, error message or None) per input.
fn encode_image_batch(
    images: &[&[u8]],
    prefetch: &[&[u8]],
) -> Vec<(Option<Vec<f32>>, Option<String>)> {
    if images.is_empty() && prefetch.is_empty() {
        forget_handed_over();
        return Vec::new();
    }
    let threads = settings::decode_threads();
    let (preprocessing, fingerprint) =
        model::with_model(|l, _| (l.preprocessing.clone(), l.fingerprint.clone()));
    let settings = Decoding {
        fingerprint,
        options: image_decode_options(preprocessing.image_size),
        preprocessing,
    };
    if !prefetch.is_empty() {
        let queued = spawn_decoding(prefetch, threads, &settings);
        QUEUE.with_borrow_mut(|q| q.push_back(queued));
    }
    let remote = inference::worker_mode();
    if images.is_empty() {
        if remote {
            submit_ahead(&settings, false);
        } else {
            start_next_model_job();
        }
        return Vec::new();
    }

    let mut outcomes = if remote {
        take_submitted(images, &settings)
    } else {
        take_handed_over(images, &settings)
    };

    // What was not handed over (or came out under other settings): decode and encode it here,
    // before the model goes on with the next batch.
    let missing: Vec<usize> = (0..images.len())
        .filter(|&i| outcomes[i].is_none())
        .collect();
    if !missing.is_empty() {
        let bytes: Vec<&[u8]> = missing.iter().map(|&i| images[i]).collect();
        let pre = &settings.preprocessing;
        let decoded: Vec<Decoded> =
            crate::decoding::decode_batch(&bytes, threads, pre, &settings.options)
                .into_iter()
                .map(|r| r.map_err(|e| e.to_string()))
                .collect();
        let done = if remote {
            answers(submit_pixels(
                settings.clone(),
                Arc::new(Vec::new()),
                decoded,
            ))
            .1
        } else {
            model::with_model(|l, counts| run_decoded(l.vision(counts), decoded, pre.image_size))
                .unwrap_or_else(|e| model::raise_runtime(e))
        };
        for (&i, o) in missing.iter().zip(done) {
            outcomes[i] = Some(o);
        }
    }
    if remote {
        submit_ahead(&settings, false);
    } else {
        start_next_model_job();
    }

    outcomes
        .into_iter()
        .map(|o| match o.expect("every input has an outcome") {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        })
        .collect()
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
                "text" if bytes.is_empty() => Vec::new(),
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
