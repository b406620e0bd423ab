//! Image decoding that a cancel can interrupt.
//!
//! Decoding a large image takes as long as it takes (the codecs have no cancellation points), so
//! it runs on threads of its own, which never call into Postgres and run with all signals
//! blocked, while the backend thread waits for them and checks for interrupts every few
//! milliseconds: `pg_cancel_backend`, `statement_timeout` and termination take effect at once,
//! as in any Postgres scan, instead of when the decode ends. The threads own copies of their
//! inputs, so an ERROR may leave them behind: they see the cancel flag and stop before their
//! next image or before preprocessing, and their results are dropped.

use crate::fmgr::error;
use pgrx::PgSqlErrorCode;
use rsclip_model::decode::{decode_rgb8, DecodeError, DecodeOptions};
use rsclip_model::preprocess::Preprocessing;
use rsclip_model::runtime::with_signals_blocked;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the waiting backend checks for interrupts.
const INTERRUPT_POLL: Duration = Duration::from_millis(5);

/// One image's pixel tensor, or why it could not be decoded.
pub type Pixels = Result<Vec<f32>, DecodeError>;

/// Sets the flag when dropped: on the way out of a wait, whether it ended or unwound.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Decodes and preprocesses `images` on up to `threads` threads; the results in order.
pub fn decode_batch(
    images: &[&[u8]],
    threads: usize,
    pre: &Preprocessing,
    opts: &DecodeOptions,
) -> Vec<Pixels> {
    if images.is_empty() {
        return Vec::new();
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let _cancel_on_exit = CancelOnDrop(Arc::clone(&cancel));
    let (tx, rx) = mpsc::channel::<(usize, Pixels)>();
    let per_thread = images.len().div_ceil(threads.max(1));
    let mut workers = Vec::new();
    for (c, chunk) in images.chunks(per_thread).enumerate() {
        let owned: Vec<Vec<u8>> = chunk.iter().map(|b| b.to_vec()).collect();
        let (tx, cancel, pre, opts) = (tx.clone(), Arc::clone(&cancel), pre.clone(), *opts);
        let first = c * per_thread;
        let spawned = with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("rsclip decode".into())
                .spawn(move || {
                    for (i, bytes) in owned.iter().enumerate() {
                        if cancel.load(Ordering::Relaxed) {
                            return;
                        }
                        let decoded = decode_rgb8(bytes, &opts);
                        if cancel.load(Ordering::Relaxed) {
                            return;
                        }
                        let result = decoded.map(|rgb| {
                            let mut out = vec![0f32; pre.tensor_len()];
                            pre.pixel_values(&rgb, &mut out);
                            out
                        });
                        if tx.send((first + i, result)).is_err() {
                            return; // the backend stopped waiting
                        }
                    }
                })
        });
        match spawned {
            Ok(handle) => workers.push(handle),
            Err(e) => error(
                PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
                format!("rsclip: cannot start a decoding thread: {e}"),
            ),
        }
    }
    drop(tx);
    let mut results: Vec<Option<Pixels>> = (0..images.len()).map(|_| None).collect();
    let mut pending = images.len();
    while pending > 0 {
        // every round, not only on a timeout: results arriving faster than the poll interval
        // must not hold a cancel back until the whole batch is done
        pgrx::check_for_interrupts!();
        match rx.recv_timeout(INTERRUPT_POLL) {
            Ok((i, r)) => {
                results[i] = Some(r);
                pending -= 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // every sender is gone with results missing: a thread panicked
                for w in workers {
                    if let Err(p) = w.join() {
                        std::panic::resume_unwind(p);
                    }
                }
                error(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    "rsclip: a decoding thread stopped without a result",
                );
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every image has a result"))
        .collect()
}

/// Waits for `handle` (a thread that never calls into Postgres), checking for interrupts
/// meanwhile. On an interrupt `cancel` is set and the thread left to stop on its own.
pub fn join_interruptibly<T>(handle: JoinHandle<T>, cancel: &AtomicBool) -> T {
    struct CancelOnUnwind<'a>(&'a AtomicBool);
    impl Drop for CancelOnUnwind<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.store(true, Ordering::Relaxed);
            }
        }
    }
    let _cancel_on_unwind = CancelOnUnwind(cancel);
    while !handle.is_finished() {
        pgrx::check_for_interrupts!();
        std::thread::sleep(INTERRUPT_POLL);
    }
    handle
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}
