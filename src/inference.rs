//! Shared inference workers (`rsclip.inference = worker`): one model copy per worker instead of
//! one per backend, and batches formed across backends.
//!
//! With rsclip in `shared_preload_libraries`, the postmaster reserves the request queue of
//! `crates/rsclip-infer` in shared memory and registers `rsclip.inference_workers` background
//! workers per device. A backend in worker mode still reads the model's manifest, decodes,
//! preprocesses and tokenizes (bad input fails in the caller as before), then puts the tensor
//! into a queue slot (inline when small, else in a DSM segment it creates), wakes an idle worker
//! and sleeps on its latch until the slot is answered. It never loads an ONNX Runtime session.
//! A worker takes the oldest request and every compatible one, runs them as one batch on its
//! session for that model (loading it, or switching to it, between batches), and answers each
//! slot. Errors, cancellation and worker restarts are the queue's protocol (see the crate).

use crate::fmgr::error;
use crate::model::{self, Loaded};
use crate::settings::{self, InferenceMode};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::{pg_sys, PgSqlErrorCode};
use rsclip_infer::queue::INLINE_BYTES;
use rsclip_infer::{
    worker_devices, Backoff, BatchFormer, BatchPolicy, Decision, Kind, Payload, Poll, Queue,
    Region, Reply, Request, SubmitError, TakenRequest, Wake,
};
use rsclip_model::manifest::ModelDir;
use rsclip_model::runtime::{ensure_environment, Encoder, Provider, RuntimeError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Where the queue is mapped in this process: set by the postmaster's shared memory startup
/// and inherited by every child it forks.
static QUEUE_BASE: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static QUEUE_LEN: AtomicUsize = AtomicUsize::new(0);

static mut PREV_SHMEM_REQUEST: Option<unsafe extern "C-unwind" fn()> = None;
static mut PREV_SHMEM_STARTUP: Option<unsafe extern "C-unwind" fn()> = None;

/// How long a caller waits for a worker to register before its request fails.
const NO_WORKER_TIMEOUT: Duration = Duration::from_secs(10);
/// Back-off of model loads that fail: 1 s, doubling to a minute.
const LOAD_BACKOFF: (u64, u64) = (1_000_000_000, 60_000_000_000);

fn slots() -> u32 {
    settings::INFERENCE_QUEUE_SLOTS.get().max(1) as u32
}

/// The queue, when rsclip was preloaded.
pub fn queue() -> Option<Queue<'static>> {
    let base = QUEUE_BASE.load(Ordering::Acquire);
    if base.is_null() {
        return None;
    }
    // SAFETY: set once the postmaster initialized the region, which stays mapped at this
    // address in the postmaster and every child for the life of the process.
    unsafe { Queue::attach(base, QUEUE_LEN.load(Ordering::Acquire)) }.ok()
}

/// The devices of the workers `rsclip.inference_workers` and `rsclip.cuda_devices` ask for.
fn devices() -> Vec<i32> {
    // The check hook lets only a parsable list (or the empty default) take effect.
    let devices = settings::string(&settings::CUDA_DEVICES)
        .and_then(|s| settings::parse_cuda_devices(&s).ok())
        .unwrap_or_default();
    let mut all = worker_devices(settings::INFERENCE_WORKERS.get().max(0) as u32, &devices);
    all.truncate(rsclip_infer::queue::MAX_WORKERS);
    all
}

/// Reserves the queue and registers the workers (from `_PG_init` while the postmaster loads
/// `shared_preload_libraries`).
pub fn preload() {
    // SAFETY: _PG_init runs once in the postmaster, before any hook is called; chaining keeps
    // other extensions' hooks.
    unsafe {
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request_shmem);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup_shmem);
    }
    for (i, _) in devices().iter().enumerate() {
        BackgroundWorkerBuilder::new(&format!("rsclip inference worker {i}"))
            .set_type("rsclip inference worker")
            .set_library("rsclip")
            .set_function("rsclip_inference_worker_main")
            .set_argument(Some(pg_sys::Datum::from(i)))
            .enable_shmem_access(None)
            .set_start_time(BgWorkerStartTime::PostmasterStart)
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn request_shmem() {
    // SAFETY: the previous hook, saved in preload, is a valid hook function or None.
    if let Some(prev) = unsafe { PREV_SHMEM_REQUEST } {
        // SAFETY: calling the chained hook as Postgres would.
        unsafe { prev() };
    }
    // SAFETY: called in the shmem request phase, as RequestAddinShmemSpace requires.
    unsafe { pg_sys::RequestAddinShmemSpace(Region::size(slots()) + Region::align()) };
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn startup_shmem() {
    // SAFETY: as in request_shmem.
    if let Some(prev) = unsafe { PREV_SHMEM_STARTUP } {
        // SAFETY: calling the chained hook as Postgres would.
        unsafe { prev() };
    }
    let n = slots();
    let len = Region::size(n);
    let mut found = false;
    // SAFETY: runs in the postmaster (and again after a crash restart) while it builds shared
    // memory, single-threaded and before any child exists, so no other process can race the
    // initialization (AddinShmemInitLock is not needed without EXEC_BACKEND, which Linux
    // builds do not use). ShmemInitStruct returns MAXALIGNed memory of the size reserved.
    unsafe {
        let p = pg_sys::ShmemInitStruct(
            c"rsclip inference queue".as_ptr(),
            len + Region::align(),
            &mut found,
        ) as *mut u8;
        let p = p.add(p.align_offset(Region::align()));
        if !found {
            Region::init(p, n);
        }
        QUEUE_LEN.store(len, Ordering::Release);
        QUEUE_BASE.store(p, Ordering::Release);
    }
}

/// Sets the latch of the process with procno `id`.
struct Latches;

impl Wake for Latches {
    fn wake(&self, id: u32) {
        // SAFETY: ProcGlobal and its PGPROC array live in shared memory for the life of the
        // server; `id` is a procno a process gave as its own wake id (< the array's length).
        // SetLatch on the latch of a process that has exited is harmless.
        unsafe {
            let procs = (*pg_sys::ProcGlobal).allProcs;
            pg_sys::SetLatch(&mut (*procs.add(id as usize)).procLatch);
        }
    }
}

/// This process's procno (its PGPROC's index), its wake id.
fn my_procno() -> u32 {
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    // SAFETY: MyProc is set for every backend and shared-memory background worker.
    let n = unsafe { (*pg_sys::MyProc).pgprocno };
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    // SAFETY: a plain global set at process start.
    let n = unsafe { pg_sys::MyProcNumber };
    n as u32
}

/// Nanoseconds of the server's clock (microsecond resolution), the same in every process.
fn now_ns() -> u64 {
    // SAFETY: reads the clock.
    (unsafe { pg_sys::GetCurrentTimestamp() }).max(0) as u64 * 1_000
}

/// Sleeps on this process's latch for at most `timeout` (also woken by its interrupts).
fn wait_on_latch(timeout: Duration) {
    let ms = timeout.as_millis().clamp(0, i32::MAX as u128) as std::ffi::c_long;
    // SAFETY: MyLatch is this process's latch; WL_EXIT_ON_PM_DEATH ends the process if the
    // postmaster dies.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms.max(if timeout.is_zero() { 0 } else { 1 }),
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}

/// Whether SIGTERM asked this worker to stop (read without consuming it).
fn shutting_down() -> bool {
    // SAFETY: a sig_atomic_t the SIGTERM handler sets; read volatile like ProcessInterrupts.
    unsafe { (&raw const pg_sys::ShutdownRequestPending).read_volatile() != 0 }
}

/// Whether this backend's encoders run in the workers.
pub fn worker_mode() -> bool {
    settings::INFERENCE.get() == InferenceMode::Worker
}

/// The key requests for a model carry: a hash of its directory and fingerprint.
pub fn model_key(dir: &str, fingerprint: &str) -> u64 {
    rsclip_infer::queue::fnv1a([dir.as_bytes(), &[0], fingerprint.as_bytes()])
}

/// The five characters of a SQLSTATE code.
pub fn sqlstate_chars(code: PgSqlErrorCode) -> [u8; 5] {
    let v = code as isize as u32;
    std::array::from_fn(|i| (((v >> (6 * i)) & 0x3F) as u8) + b'0')
}

fn sqlstate_code(chars: [u8; 5]) -> PgSqlErrorCode {
    let v = chars.iter().enumerate().fold(0u32, |v, (i, &c)| {
        v | ((c.wrapping_sub(b'0') as u32 & 0x3F) << (6 * i))
    });
    PgSqlErrorCode::from(v as i32)
}

/// A DSM segment this backend created for one request, detached when dropped.
struct Segment(*mut pg_sys::dsm_segment);

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: a segment this process created or attached and has not detached; detaching
        // during an error's cleanup is allowed (the resource owner would do it otherwise, and
        // dsm_detach forgets it there).
        unsafe { pg_sys::dsm_detach(self.0) };
    }
}

impl Segment {
    /// `len` bytes at `offset`.
    fn read(&self, offset: usize, len: usize) -> &[u8] {
        // SAFETY: the segment is mapped while self lives and holds at least offset + len
        // bytes (its creator sized it input + output; the worker checks the length it
        // attached); nothing writes it while this borrow lives (the owner waits, the worker
        // writes only the output, after reading the input).
        unsafe {
            std::slice::from_raw_parts(
                (pg_sys::dsm_segment_address(self.0) as *const u8).add(offset),
                len,
            )
        }
    }

    /// Copies `data` to `offset`.
    fn write(&self, offset: usize, data: &[u8]) {
        // SAFETY: as in read; the range is this side's alone in its phase of the protocol.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (pg_sys::dsm_segment_address(self.0) as *mut u8).add(offset),
                data.len(),
            )
        }
    }
}

/// A request queued for the workers whose answer is not read yet. Dropped unanswered (an ERROR
/// unwinding: a cancel, a statement timeout; or a backfill forgetting a batch), it gives the
/// request up, so the worker drops its late answer and the slot comes back, and detaches the
/// request's DSM segment.
pub struct InFlight {
    queue: Queue<'static>,
    ticket: Option<rsclip_infer::Ticket>,
    segment: Option<Segment>,
    input_len: usize,
    output_len: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.queue.cancel(t);
        }
    }
}

/// The bytes of `v` as the workers read them (little-endian f32), without a copy on
/// little-endian machines.
pub fn f32_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: f32 has no padding and every byte pattern is a valid u8; the slice covers
        // exactly the 4 · len bytes of `v` and borrows it; u8 needs no alignment.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v))
        })
    } else {
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// Runs `rows` rows of `kind` (row shape `row_shape`, tensor bytes `input`) for `loaded`'s model
/// in the workers; returns `rows × dim` floats.
pub fn encode_remote(
    loaded: &Loaded,
    kind: Kind,
    rows: usize,
    row_shape: &[usize],
    input: &[u8],
    dim: usize,
) -> Vec<f32> {
    submit_remote(loaded, kind, rows, row_shape, &[input], dim, false).wait()
}

/// Queues `rows` rows of `kind` for `loaded`'s model (the tensor is the concatenation of
/// `parts`, copied once, into the queue slot or a DSM segment) and returns without waiting.
/// `keep_across_transactions` pins the segment's mapping to the session, for a request whose
/// answer is read after the transaction commits (the backfill).
pub fn submit_remote(
    loaded: &Loaded,
    kind: Kind,
    rows: usize,
    row_shape: &[usize],
    parts: &[&[u8]],
    dim: usize,
    keep_across_transactions: bool,
) -> InFlight {
    let Some(q) = queue() else {
        error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "rsclip: rsclip.inference = worker needs rsclip in shared_preload_libraries (and a server restart); SET rsclip.inference = backend runs the model in this backend",
        )
    };
    let path = loaded.model_dir().display().to_string();
    let input_len: usize = parts.iter().map(|p| p.len()).sum();
    let output_len = rows * dim * 4;
    let inline = input_len <= INLINE_BYTES && output_len <= INLINE_BYTES;
    let segment = (!inline).then(|| {
        // SAFETY: dsm_create raises an ERROR on failure and returns a mapped segment of the
        // size asked; it belongs to the current resource owner until detached (or, pinned, to
        // the session).
        let seg = Segment(unsafe { pg_sys::dsm_create(input_len + output_len, 0) });
        if keep_across_transactions {
            // SAFETY: a segment of ours, attached; pinning only changes who detaches it.
            unsafe { pg_sys::dsm_pin_mapping(seg.0) };
        }
        let mut at = 0;
        for p in parts {
            seg.write(at, p);
            at += p.len();
        }
        seg
    });
    let payload = match &segment {
        None => Payload::Inline {
            input: input_len as u64,
            output: output_len as u64,
        },
        Some(seg) => Payload::External {
            // SAFETY: a live segment of ours.
            handle: unsafe { pg_sys::dsm_segment_handle(seg.0) },
            input: input_len as u64,
            output: output_len as u64,
        },
    };
    let request = Request {
        kind,
        owner: my_procno(),
        model_key: model_key(&path, &loaded.fingerprint),
        model_path: path,
        rows: rows as u32,
        row_shape: row_shape.iter().map(|&d| d as u32).collect(),
        payload,
        enqueued_ns: now_ns(),
    };
    let inline_input: Vec<u8> = if inline { parts.concat() } else { Vec::new() };
    let started = Instant::now();
    let ticket = loop {
        match q.submit(&request, &inline_input, &Latches) {
            Ok(t) => break t,
            Err(SubmitError::Full) => {
                // a slot frees whenever any caller reads its answer; nobody wakes us for it
                wait_on_latch(Duration::from_millis(1));
                pgrx::check_for_interrupts!();
            }
            Err(SubmitError::NoWorkers) if started.elapsed() < NO_WORKER_TIMEOUT => {
                wait_on_latch(Duration::from_millis(100));
                pgrx::check_for_interrupts!();
            }
            Err(SubmitError::NoWorkers) => error(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "rsclip: no inference worker is running (rsclip.inference_workers = {}); see the server log",
                    settings::INFERENCE_WORKERS.get()
                ),
            ),
            Err(SubmitError::Invalid(m)) => error(
                PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!("rsclip: cannot queue this request: {m}"),
            ),
        }
    };
    InFlight {
        queue: q,
        ticket: Some(ticket),
        segment,
        input_len,
        output_len,
    }
}

impl InFlight {
    /// Waits for the answer: `rows × dim` floats. Raises the worker's error if the request
    /// failed; interruptible.
    pub fn wait(mut self) -> Vec<f32> {
        let q = self.queue;
        let ticket = self.ticket.expect("a request not waited for yet");
        let mut out = Vec::new();
        let mut no_worker_since: Option<Instant> = None;
        let reply: Reply = loop {
            match q.poll(ticket, &mut out) {
                Poll::Pending => {}
                Poll::Done(r) => break r,
                Poll::Failed(r) => {
                    self.ticket = None;
                    error(
                        sqlstate_code(r.sqlstate.unwrap_or(*b"XX000")),
                        if r.message.starts_with("rsclip") {
                            r.message
                        } else {
                            format!("rsclip: inference worker {}: {}", r.worker, r.message)
                        },
                    )
                }
                Poll::Gone => {
                    self.ticket = None;
                    error(
                        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                        "rsclip: the inference request was lost",
                    )
                }
            }
            if q.any_worker() {
                no_worker_since = None;
            } else if no_worker_since.get_or_insert_with(Instant::now).elapsed() > NO_WORKER_TIMEOUT
            {
                error(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "rsclip: no inference worker is running to answer this request; see the server log",
                )
            }
            wait_on_latch(Duration::from_millis(1000));
            pgrx::check_for_interrupts!();
        };
        self.ticket = None;
        let _ = reply;
        let output_len = self.output_len;
        let bytes: &[u8] = match &self.segment {
            None => &out,
            Some(seg) => seg.read(self.input_len, output_len),
        };
        if bytes.len() != output_len {
            error(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!(
                    "rsclip: an inference worker answered {} bytes, not {output_len}",
                    bytes.len()
                ),
            )
        }
        concat_le(std::iter::once(bytes), f32::from_le_bytes)
    }
}

/// `[{worker, running, device, starts, requests, batches, ...}]` of every worker that started.
pub fn stats_json() -> serde_json::Value {
    let Some(q) = queue() else {
        return serde_json::json!([]);
    };
    q.workers()
        .into_iter()
        .map(|(w, running, device, starts, s)| {
            serde_json::json!({
                "worker": w,
                "running": running,
                "device": if device < 0 { "cpu".to_string() } else { format!("cuda:{device}") },
                "starts": starts,
                "requests": s.requests,
                "batches": s.batches,
                "rows": s.rows,
                "mean_batch_rows": s.mean_batch_rows,
                "max_batch_rows": s.max_batch_rows,
                "errors": s.errors,
                "model_ms": s.model_ms,
                "model_loads": s.model_loads,
                "queue_wait_p50_us": s.queue_wait_p50_us,
                "queue_wait_p99_us": s.queue_wait_p99_us,
            })
        })
        .collect()
}

// ---- the worker ----

/// The model a worker has loaded: its key, directory and sessions (each loaded on first use).
struct WorkerModel {
    key: u64,
    dir: ModelDir,
    text: Option<Encoder>,
    vision: Option<Encoder>,
}

/// A failure a worker reports for a whole batch.
type Failure = ([u8; 5], String);

fn runtime_failure(e: &RuntimeError) -> Failure {
    (
        sqlstate_chars(model::runtime_error_code(e)),
        format!("rsclip: {e}"),
    )
}

struct Worker {
    index: usize,
    device: i32,
    queue: Queue<'static>,
    former: BatchFormer,
    model: Option<WorkerModel>,
    /// Sessions (model key, kind) that failed to load: when to try again, and the error.
    failed_loads: HashMap<(u64, Kind), (Backoff, Failure)>,
}

/// The batch policy of a worker on `device` (-1: the CPU). A CPU worker with one intra-op
/// thread runs a batch row by row, at about the cost of separate runs, so holding a batch open
/// for more requests only adds latency: with two clients on two such workers it cost each
/// request up to one model run of idle waiting (0.59x backend mode's throughput with the
/// fixture). Such a worker batches what is queued and never waits; a device, or a CPU worker
/// with several threads (which a batch keeps busy), waits up to `rsclip.batch_wait`.
fn policy(device: i32) -> BatchPolicy {
    let batching_pays = device >= 0 || settings::INTRA_OP_THREADS.get() > 1;
    BatchPolicy {
        max_rows: settings::MAX_BATCH.get().max(1) as u32,
        wait_ns: if batching_pays {
            (settings::BATCH_WAIT_MS.get().max(0.0) * 1e6) as u64
        } else {
            0
        },
    }
}

/// `rsclip inference worker N`: serves the queue until SIGTERM or the postmaster's death.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn rsclip_inference_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let index = arg.value();
    let Some(queue) = queue() else {
        pgrx::log!("rsclip inference worker {index}: no queue in shared memory; exiting");
        return;
    };
    let device = devices().get(index).copied().unwrap_or(-1);
    let failed = queue.register_worker(index, my_procno(), device, &Latches);
    if failed > 0 {
        pgrx::log!(
            "rsclip inference worker {index}: restarted; {failed} requests it was running failed"
        );
    }
    let mut worker = Worker {
        index,
        device,
        queue,
        former: BatchFormer::new(policy(device)),
        model: None,
        failed_loads: HashMap::new(),
    };
    while !shutting_down() {
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloads the configuration file as a SIGHUP'd process does.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            worker.former.policy = policy(worker.device);
        }
        worker.serve_once();
    }
    worker.queue.unregister_worker(index);
}

impl Worker {
    /// Takes and runs one batch, or sleeps until there is one.
    fn serve_once(&mut self) {
        let max = self.former.policy.max_rows;
        let mut batch = self.queue.take_batch(self.index, max, now_ns());
        if batch.is_empty() {
            if self.queue.go_idle(self.index) {
                wait_on_latch(Duration::from_secs(1));
            }
            self.queue.go_busy(self.index);
            return;
        }
        // What this batch left queued goes to another idle worker now, not at the next submit.
        self.queue.wake_idle(&Latches);
        let first = now_ns();
        loop {
            let rows: u32 = batch.iter().map(|t| t.request.rows).sum();
            match self.former.decide(batch.len(), rows, first, now_ns()) {
                Decision::Run => break,
                Decision::Wait(ns) => {
                    self.wait_for_more(Duration::from_nanos(ns));
                    let like = batch[0].request.clone();
                    let more =
                        self.queue
                            .take_like(self.index, &like, max.saturating_sub(rows), now_ns());
                    if more.is_empty() && shutting_down() {
                        break;
                    }
                    batch.extend(more);
                }
            }
        }
        let started = Instant::now();
        self.run(&batch);
        self.former
            .after_run(self.queue.queued(), started.elapsed().as_nanos() as u64);
    }

    /// Waits up to `d` (`rsclip.batch_wait`, a few milliseconds) for another submission while
    /// holding a batch open, looking every 20 us. The worker stays busy meanwhile: marked idle,
    /// it would take the wake-up of a request it cannot batch (another kind or model) from a
    /// worker that is truly idle, and that request would wait for a latch timeout.
    fn wait_for_more(&self, d: Duration) {
        let end = Instant::now() + d;
        let seen = self.queue.submissions();
        while Instant::now() < end && self.queue.submissions() == seen && !shutting_down() {
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    fn fail_all(&self, batch: &[TakenRequest], f: &Failure) {
        for t in batch {
            self.queue.fail(self.index, t, f.0, &f.1, &Latches);
        }
        self.queue
            .stats(self.index)
            .record_errors(batch.len() as u64);
    }

    /// The session for `kind` of the batch's model, loading (or switching to) it.
    fn session(&mut self, like: &Request) -> Result<&mut Encoder, Failure> {
        let now = now_ns();
        let key = (like.model_key, like.kind);
        if let Some((backoff, f)) = self.failed_loads.get(&key) {
            if !backoff.may_try(now) {
                return Err(f.clone());
            }
        }
        match self.load(like) {
            Ok(()) => {
                self.failed_loads.remove(&key);
                let m = self.model.as_mut().expect("loaded");
                Ok(match like.kind {
                    Kind::Text => m.text.as_mut().expect("loaded"),
                    Kind::Vision => m.vision.as_mut().expect("loaded"),
                })
            }
            Err(f) => {
                let entry = self
                    .failed_loads
                    .entry(key)
                    .or_insert_with(|| (Backoff::new(LOAD_BACKOFF.0, LOAD_BACKOFF.1), f.clone()));
                let retry_at = entry.0.failed(now);
                entry.1 = f.clone();
                pgrx::log!(
                    "rsclip inference worker {}: {} (next try in {:.1} s)",
                    self.index,
                    f.1,
                    retry_at.saturating_sub(now) as f64 / 1e9
                );
                // everyone waiting for this model gets the error now, not after a batch each
                let n = self
                    .queue
                    .fail_queued_like(self.index, like, f.0, &f.1, now, &Latches);
                self.queue.stats(self.index).record_errors(n as u64);
                Err(f)
            }
        }
    }

    fn load(&mut self, like: &Request) -> Result<(), Failure> {
        if self.model.as_ref().map(|m| m.key) != Some(like.model_key) {
            // a new model: the old sessions go first (between batches, never within one)
            self.model = None;
            let dir = ModelDir::open(std::path::Path::new(&like.model_path)).map_err(|e| {
                (
                    sqlstate_chars(model::manifest_error_code(&e)),
                    format!("rsclip: {e}"),
                )
            })?;
            if model_key(&like.model_path, &dir.fingerprint()) != like.model_key {
                return Err((
                    sqlstate_chars(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                    format!(
                        "rsclip: the model files in {} changed after this backend read them; run the statement again",
                        like.model_path
                    ),
                ));
            }
            self.model = Some(WorkerModel {
                key: like.model_key,
                dir,
                text: None,
                vision: None,
            });
        }
        let m = self.model.as_mut().expect("set above");
        let missing = match like.kind {
            Kind::Text => m.text.is_none(),
            Kind::Vision => m.vision.is_none(),
        };
        if missing {
            let Some(library) = settings::string(&settings::ONNXRUNTIME_LIBRARY) else {
                return Err((
                    sqlstate_chars(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                    "rsclip: rsclip.onnxruntime_library is not set for the inference workers (set it in postgresql.conf)".into(),
                ));
            };
            let env = ensure_environment(std::path::Path::new(&library))
                .map_err(|e| runtime_failure(&e))?;
            let mut opts = model::runtime_options();
            if self.device >= 0 {
                opts.provider = Provider::Cuda;
                opts.cuda_device = self.device;
            } else if opts.provider == Provider::Auto {
                opts.provider = Provider::Cpu;
            }
            let spec = match like.kind {
                Kind::Text => &m.dir.manifest.text,
                Kind::Vision => &m.dir.manifest.vision,
            };
            let encoder =
                Encoder::load(&env, &m.dir, spec, &opts).map_err(|e| runtime_failure(&e))?;
            self.queue.stats(self.index).record_model_load();
            match like.kind {
                Kind::Text => m.text = Some(encoder),
                Kind::Vision => m.vision = Some(encoder),
            }
        }
        Ok(())
    }

    /// Runs one batch of compatible requests and answers each.
    fn run(&mut self, batch: &[TakenRequest]) {
        let like = batch[0].request.clone();
        // Inputs: inline copies, or the owners' segments (a request whose owner has gone and
        // taken its segment with it is dropped; its slot is freed by the answer below).
        let mut inputs: Vec<(&TakenRequest, Option<Segment>)> = Vec::with_capacity(batch.len());
        for t in batch {
            match t.request.payload {
                Payload::Inline { .. } => inputs.push((t, None)),
                Payload::External {
                    handle,
                    input,
                    output,
                } => {
                    // SAFETY: attaches the owner's segment by handle; NULL if it is gone.
                    let seg = unsafe { pg_sys::dsm_attach(handle) };
                    // SAFETY: a segment we just attached.
                    if seg.is_null()
                        || (unsafe { pg_sys::dsm_segment_map_length(seg) } as u64) < input + output
                    {
                        if !seg.is_null() {
                            drop(Segment(seg));
                        }
                        // an owner that gave up took its segment with it: fail() then only
                        // frees the slot; one still waiting learns why
                        self.queue.fail(
                            self.index,
                            t,
                            sqlstate_chars(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR),
                            "rsclip: the inference worker could not map the request's shared memory",
                            &Latches,
                        );
                        continue;
                    }
                    inputs.push((t, Some(Segment(seg))));
                }
            }
        }
        if inputs.is_empty() {
            return;
        }
        let rows: usize = inputs.iter().map(|(t, _)| t.request.rows as usize).sum();
        let encoder = match self.session(&like) {
            Ok(e) => e,
            Err(f) => {
                let taken: Vec<TakenRequest> = inputs.iter().map(|(t, _)| (*t).clone()).collect();
                self.fail_all(&taken, &f);
                return;
            }
        };
        let dim = encoder.dim;
        let mut shape = vec![rows];
        shape.extend(like.row_shape.iter().map(|&d| d as usize));
        let started = Instant::now();
        let tensors = || inputs.iter().map(|(t, seg)| input_bytes(t, seg.as_ref()));
        let result = match like.kind {
            Kind::Text => encoder.run_i64(&shape, concat_le(tensors(), i64::from_le_bytes)),
            Kind::Vision => encoder.run_f32(&shape, concat_le(tensors(), f32::from_le_bytes)),
        };
        let model_ns = started.elapsed().as_nanos() as u64;
        let stats = self.queue.stats(self.index);
        let out = match result {
            Ok(out) if out.len() == rows * dim => out,
            Ok(out) => {
                let f = (
                    sqlstate_chars(PgSqlErrorCode::ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
                    format!(
                        "rsclip: the model answered {} values for {rows} rows of {dim}",
                        out.len()
                    ),
                );
                stats.record_batch(inputs.len() as u64, rows as u64, model_ns, true);
                for (t, _) in &inputs {
                    self.queue.fail(self.index, t, f.0, &f.1, &Latches);
                }
                return;
            }
            Err(e) => {
                let f = runtime_failure(&e);
                stats.record_batch(inputs.len() as u64, rows as u64, model_ns, true);
                for (t, _) in &inputs {
                    self.queue.fail(self.index, t, f.0, &f.1, &Latches);
                }
                return;
            }
        };
        stats.record_batch(inputs.len() as u64, rows as u64, model_ns, false);
        let mut at = 0usize;
        for (t, seg) in &inputs {
            let n = t.request.rows as usize * dim;
            let bytes: Vec<u8> = out[at..at + n]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            at += n;
            if bytes.len() as u64 != t.request.payload.output_bytes() {
                let f = format!(
                    "rsclip: the model gives {dim} dimensions, the request expected {}",
                    t.request.payload.output_bytes() / 4 / t.request.rows.max(1) as u64
                );
                self.queue.fail(
                    self.index,
                    t,
                    sqlstate_chars(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                    &f,
                    &Latches,
                );
                continue;
            }
            match seg {
                None => {
                    self.queue
                        .complete(self.index, t, &bytes, rows as u32, model_ns, &Latches);
                }
                Some(seg) => {
                    let input = t.request.payload.input_bytes() as usize;
                    seg.write(input, &bytes);
                    self.queue
                        .complete(self.index, t, &[], rows as u32, model_ns, &Latches);
                }
            }
        }
    }
}

/// The little-endian values of `N` bytes each in `parts`, one after the other.
fn concat_le<'a, T, const N: usize>(
    parts: impl Iterator<Item = &'a [u8]>,
    from: fn([u8; N]) -> T,
) -> Vec<T> {
    parts
        .flat_map(|p| p.chunks_exact(N))
        .map(|b| from(b.try_into().expect("chunks of N bytes")))
        .collect()
}

fn input_bytes<'a>(t: &'a TakenRequest, seg: Option<&'a Segment>) -> &'a [u8] {
    match seg {
        None => &t.input,
        Some(s) => s.read(0, t.request.payload.input_bytes() as usize),
    }
}
