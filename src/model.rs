//! The per-backend model: which directory and runtime options are in force, and the lazily
//! created vision/text sessions and tokenizer, reused across calls and rebuilt when the settings
//! or the model files change. A text query never loads the vision graph, and vice versa.

use crate::fmgr::error;
use crate::settings::{self, ExecutionProvider, OptimizationLevel};
use pgrx::{pg_sys, PgSqlErrorCode};
use rsclip_model::manifest::{ManifestError, ModelDir};
use rsclip_model::preprocess::Preprocessing;
use rsclip_model::runtime::{ensure_environment, Encoder, Provider, RuntimeError, RuntimeOptions};
use rsclip_model::tokenize::TextTokenizer;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Everything that, when changed, requires new sessions.
#[derive(Debug, Clone, PartialEq)]
struct LoadKey {
    model_dir: PathBuf,
    manifest_stamp: Option<(SystemTime, u64)>,
    library: PathBuf,
    options: RuntimeOptions,
}

pub struct Loaded {
    key: LoadKey,
    pub model: ModelDir,
    pub preprocessing: Preprocessing,
    pub fingerprint: String,
    vision: Option<Encoder>,
    /// The vision session while it works on a background thread (see `spawn_vision`).
    vision_job: Option<VisionJob>,
    text: Option<Encoder>,
    tokenizer: Option<TextTokenizer>,
}

/// The reply of the model thread: the session back with the work's result, or the work's panic
/// (the session is dropped then).
type VisionReply = std::thread::Result<(Encoder, JobResult)>;
/// A job's result, typed by the job's owner (see `join_vision`).
type JobResult = Box<dyn std::any::Any + Send>;

/// Work for the model thread, with the session it runs on.
struct VisionWork {
    encoder: Encoder,
    work: Box<dyn FnOnce(&mut Encoder) -> JobResult + Send>,
    reply: std::sync::mpsc::Sender<VisionReply>,
}

/// A job on the backend's model thread, which owns the vision session until the job is joined.
/// Dropping it waits for the job too: no job outlives its `Loaded` (a model reload), so none can
/// be running when the process exits (see `join_jobs_before_exit`).
struct VisionJob {
    reply: Option<std::sync::mpsc::Receiver<VisionReply>>,
}

impl Drop for VisionJob {
    fn drop(&mut self) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.recv();
        }
    }
}

thread_local! {
    /// The backend's model thread, started on the first job. One long-lived thread rather than
    /// one per job: no thread start per batch, and ONNX Runtime's per-thread state (CUDA
    /// streams and library handles) is made once.
    static MODEL_THREAD: RefCell<Option<std::sync::mpsc::Sender<VisionWork>>> = const { RefCell::new(None) };
}

/// Hands `item` to the model thread, starting it (with all signals blocked) if need be. The
/// thread catches its jobs' panics, so it lives as long as the backend.
fn send_to_model_thread(item: VisionWork) {
    let sender = MODEL_THREAD.with_borrow_mut(|t| {
        t.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::channel::<VisionWork>();
            rsclip_model::runtime::with_signals_blocked(|| {
                std::thread::Builder::new()
                    .name("rsclip vision".into())
                    .spawn(move || {
                        while let Ok(VisionWork {
                            mut encoder,
                            work,
                            reply,
                        }) = rx.recv()
                        {
                            let out =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    work(&mut encoder)
                                }));
                            let _ = reply.send(out.map(|out| (encoder, out)));
                            JOBS_IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::Release);
                        }
                    })
            })
            .unwrap_or_else(|e| {
                error(
                    PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
                    format!("rsclip: cannot start the model thread: {e}"),
                )
            });
            tx
        })
        .clone()
    });
    JOBS_IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::Acquire);
    if sender.send(item).is_err() {
        JOBS_IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::Release);
        error(
            PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
            "rsclip: the model thread has stopped",
        )
    }
}

#[derive(Default, Debug, Clone, Copy)]
pub struct LoadCounts {
    pub model_opens: u64,
    pub vision_loads: u64,
    pub text_loads: u64,
    pub tokenizer_loads: u64,
    pub vision_load_ms: f64,
    pub text_load_ms: f64,
}

#[derive(Default)]
struct State {
    loaded: Option<Loaded>,
    counts: LoadCounts,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
    static CPU_FALLBACK_NOTICED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The SQLSTATE of a model or runtime failure: missing files 58P01, unreadable or damaged
/// files 58030, bad settings 22023, CUDA requested but absent 55000.
pub fn runtime_error_code(e: &RuntimeError) -> PgSqlErrorCode {
    match e {
        RuntimeError::Library { path, .. } if !path.exists() => {
            PgSqlErrorCode::ERRCODE_UNDEFINED_FILE
        }
        RuntimeError::Library { .. } => PgSqlErrorCode::ERRCODE_IO_ERROR,
        RuntimeError::LibraryMismatch { .. } => {
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
        }
        RuntimeError::Model(m) => manifest_error_code(m),
        RuntimeError::Graph { .. } => PgSqlErrorCode::ERRCODE_IO_ERROR,
        RuntimeError::CudaUnavailable(_) => {
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
        }
        RuntimeError::Inference(_) => PgSqlErrorCode::ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
        RuntimeError::OptimizedCache { dir, .. } if !dir.exists() => {
            PgSqlErrorCode::ERRCODE_UNDEFINED_FILE
        }
        RuntimeError::OptimizedCache { .. } => PgSqlErrorCode::ERRCODE_IO_ERROR,
    }
}

/// The SQLSTATE of a manifest failure: a missing file 58P01, anything else 58030.
pub fn manifest_error_code(e: &ManifestError) -> PgSqlErrorCode {
    match e {
        ManifestError::Missing(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
        _ => PgSqlErrorCode::ERRCODE_IO_ERROR,
    }
}

/// Raises a model or runtime failure with its SQLSTATE ([`runtime_error_code`]).
pub fn raise_runtime(e: RuntimeError) -> ! {
    if let RuntimeError::Model(m) = e {
        raise_manifest(m)
    }
    error(runtime_error_code(&e), format!("rsclip: {e}"))
}

pub fn raise_manifest(e: ManifestError) -> ! {
    error(manifest_error_code(&e), format!("rsclip: {e}"))
}

fn data_dir() -> PathBuf {
    // SAFETY: DataDir is set by the postmaster before any backend runs SQL.
    let p = unsafe { pg_sys::DataDir };
    if p.is_null() {
        return PathBuf::from(".");
    }
    // SAFETY: non-null, NUL-terminated C string owned by Postgres for the process lifetime.
    PathBuf::from(
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// GPUs do not come and go under a running backend: count them once (listing /dev on every
/// encoder call cost more than a cache hit).
fn cuda_device_count() -> i32 {
    thread_local! {
        static COUNT: std::cell::OnceCell<i32> = const { std::cell::OnceCell::new() };
    }
    COUNT.with(|c| *c.get_or_init(count_cuda_devices))
}

fn count_cuda_devices() -> i32 {
    // Without a CUDA runtime call, count the device nodes the driver creates.
    std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("nvidia").is_some_and(|rest| {
                        !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit())
                    })
                })
                .count() as i32
        })
        .unwrap_or(0)
}

pub(crate) fn runtime_options() -> RuntimeOptions {
    let provider = match settings::EXECUTION_PROVIDER.get() {
        ExecutionProvider::Auto => Provider::Auto,
        ExecutionProvider::Cpu => Provider::Cpu,
        ExecutionProvider::Cuda => Provider::Cuda,
    };
    let cuda_device = match settings::cuda_device() {
        settings::CudaDevice::Auto => {
            let n = cuda_device_count().max(1);
            // SAFETY: MyProcPid is a plain global set at backend start.
            (unsafe { pg_sys::MyProcPid }).rem_euclid(n)
        }
        settings::CudaDevice::Ordinal(d) => d,
    };
    let limit = settings::GPU_MEM_LIMIT_MB.get();
    RuntimeOptions {
        provider,
        cuda_device,
        gpu_mem_limit: (limit > 0).then(|| limit as usize * 1024 * 1024),
        intra_op_threads: settings::INTRA_OP_THREADS.get().max(1) as usize,
        optimization_level: match settings::GRAPH_OPTIMIZATION.get() {
            OptimizationLevel::Disable => 0,
            OptimizationLevel::Basic => 1,
            OptimizationLevel::Extended => 2,
            OptimizationLevel::All => 3,
        },
        optimized_model_dir: settings::string(&settings::OPTIMIZED_MODEL_CACHE).map(PathBuf::from),
    }
}

fn current_key() -> LoadKey {
    let Some(path) = settings::string(&settings::MODEL_PATH) else {
        error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "rsclip.model_path is not set: a superuser must point it at a model directory made by tools/export_model.py",
        )
    };
    let Some(library) = settings::string(&settings::ONNXRUNTIME_LIBRARY) else {
        error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "rsclip.onnxruntime_library is not set: a superuser must point it at libonnxruntime.so (ONNX Runtime 1.31)",
        )
    };
    let mut model_dir = PathBuf::from(&path);
    if model_dir.is_relative() {
        model_dir = data_dir().join(model_dir);
    }
    let manifest_stamp = std::fs::metadata(model_dir.join(rsclip_model::manifest::MANIFEST_FILE))
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())));
    LoadKey {
        model_dir,
        manifest_stamp,
        library: PathBuf::from(library),
        options: runtime_options(),
    }
}

/// Runs `f` with the backend's current model, opening it (manifest only) if needed.
pub fn with_model<R>(f: impl FnOnce(&mut Loaded, &mut LoadCounts) -> R) -> R {
    let key = current_key();
    STATE.with(|cell| {
        let mut state = cell.borrow_mut();
        let state = &mut *state;
        if state.loaded.as_ref().map(|l| &l.key) != Some(&key) {
            if let Some(old) = state.loaded.as_mut() {
                // a job still running on the old session: wait for it interruptibly (dropping
                // it would wait without checking for interrupts)
                old.finish_vision_job();
            }
            state.loaded = None; // drop old sessions first
            let model = ModelDir::open(&key.model_dir).unwrap_or_else(|e| raise_manifest(e));
            let m = &model.manifest;
            let preprocessing = Preprocessing::from_manifest(m);
            let fingerprint = model.fingerprint();
            state.counts.model_opens += 1;
            state.loaded = Some(Loaded {
                key,
                model,
                preprocessing,
                fingerprint,
                vision: None,
                vision_job: None,
                text: None,
                tokenizer: None,
            });
        }
        let loaded = state.loaded.as_mut().expect("just loaded");
        f(loaded, &mut state.counts)
    })
}

/// The manifest's `(logit_scale, logit_bias)`, looked up once per statement and model path.
///
/// `rsclip_probability` runs once per row; `with_model` would read every setting and stat the
/// manifest on each call. Settings cannot change in the middle of a statement, so the statement
/// start time together with the model path identifies the answer.
pub fn logit_params() -> (f64, f64) {
    /// (statement start, model path, (scale, bias))
    type Cached = (pg_sys::TimestampTz, Option<String>, (f64, f64));
    thread_local! {
        static CACHED: RefCell<Option<Cached>> = const { RefCell::new(None) };
    }
    // SAFETY: plain read of the current transaction state's statement start time.
    let statement = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
    let path = settings::string(&settings::MODEL_PATH);
    if let Some((ts, p, params)) = CACHED.with(|c| c.borrow().clone()) {
        if ts == statement && p == path {
            return params;
        }
    }
    let params = with_model(|l, _| (l.model.manifest.logit_scale, l.model.manifest.logit_bias));
    CACHED.with(|c| *c.borrow_mut() = Some((statement, path, params)));
    params
}

/// Makes the backend wait for a running vision job before it exits. A job can outlive the call
/// that started it (the backfill keeps the model busy between calls); if the process exited
/// under it, ONNX Runtime's static destructors would run while the job still uses them, and the
/// backend would crash on its way out (a postmaster-wide crash restart). The wait is at most one
/// batch. Registered once per backend, on the first job.
fn join_jobs_before_exit() {
    thread_local! {
        static REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if REGISTERED.replace(true) {
        return;
    }
    // SAFETY: registers a plain callback for proc_exit; it only touches this thread's state.
    unsafe { pg_sys::on_proc_exit(Some(join_vision_job_at_exit), pg_sys::Datum::from(0)) };
}

/// Jobs handed to the model thread and not finished. The exit wait counts on this, not on the
/// model state: a FATAL (termination, a lost client) raised while that state is borrowed, e.g.
/// in `join_vision`'s interrupt check, exits without unwinding, so the state stays borrowed.
static JOBS_IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// on_proc_exit callback: waits for a running vision job (and drops its result).
unsafe extern "C-unwind" fn join_vision_job_at_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    drop_vision_job_quietly();
    // Whatever the state's borrow allowed above, no job may outlive the process.
    while JOBS_IN_FLIGHT.load(std::sync::atomic::Ordering::Acquire) > 0 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Waits for a running vision job and drops its result, for callbacks (exit, abort) that must
/// not raise: skipped if the model state is in use.
pub fn drop_vision_job_quietly() {
    let _ = std::panic::catch_unwind(|| {
        STATE.with(|cell| {
            if let Ok(mut state) = cell.try_borrow_mut() {
                // dropping the job waits for it
                drop(state.loaded.as_mut().and_then(|l| l.vision_job.take()));
            }
        })
    });
}

/// Creates one encoder session; returns it with its creation time in milliseconds.
fn load_encoder(loaded: &Loaded, vision: bool) -> (Encoder, f64) {
    let started = std::time::Instant::now();
    let env = ensure_environment(&loaded.key.library).unwrap_or_else(|e| raise_runtime(e));
    let spec = if vision {
        &loaded.model.manifest.vision
    } else {
        &loaded.model.manifest.text
    };
    let encoder = Encoder::load(&env, &loaded.model, spec, &loaded.key.options)
        .unwrap_or_else(|e| raise_runtime(e));
    notice_cpu_fallback(&encoder, &loaded.key.options);
    (encoder, started.elapsed().as_secs_f64() * 1e3)
}

fn notice_cpu_fallback(encoder: &Encoder, options: &RuntimeOptions) {
    if options.provider == Provider::Auto
        && encoder.provider == "cpu"
        && !CPU_FALLBACK_NOTICED.with(|c| c.replace(true))
    {
        pgrx::notice!("rsclip: CUDA is not available, running models on the CPU");
    }
}

impl Loaded {
    pub fn vision(&mut self, counts: &mut LoadCounts) -> &mut Encoder {
        self.finish_vision_job();
        if self.vision.is_none() {
            let (encoder, ms) = load_encoder(self, true);
            counts.vision_loads += 1;
            counts.vision_load_ms = ms;
            self.vision = Some(encoder);
        }
        self.vision.as_mut().expect("loaded")
    }

    /// The tokenizer alone (the result cache normalizes texts before deciding to encode them).
    pub fn tokenizer(&mut self, counts: &mut LoadCounts) -> &TextTokenizer {
        if self.tokenizer.is_none() {
            self.tokenizer =
                Some(TextTokenizer::load(&self.model).unwrap_or_else(|e| raise_manifest(e)));
            counts.tokenizer_loads += 1;
        }
        self.tokenizer.as_ref().expect("loaded")
    }

    pub fn text(&mut self, counts: &mut LoadCounts) -> (&mut Encoder, &TextTokenizer) {
        self.tokenizer(counts);
        if self.text.is_none() {
            let (encoder, ms) = load_encoder(self, false);
            counts.text_loads += 1;
            counts.text_load_ms = ms;
            self.text = Some(encoder);
        }
        (
            self.text.as_mut().expect("loaded"),
            self.tokenizer.as_ref().expect("loaded"),
        )
    }

    /// Runs `work` with the vision session (loaded first if need be) on the backend's model
    /// thread, so that the backend can go on with SQL meanwhile; `join_vision` waits for it and
    /// returns its result. Until then the session belongs to that thread: every other use of it
    /// joins first. The thread never calls Postgres and runs with all signals blocked. An earlier
    /// job is joined (and its result dropped) first.
    pub fn spawn_vision<T: Send + 'static>(
        &mut self,
        counts: &mut LoadCounts,
        work: impl FnOnce(&mut Encoder) -> T + Send + 'static,
    ) {
        self.vision(counts);
        join_jobs_before_exit();
        let encoder = self.vision.take().expect("loaded");
        let (reply, receive) = std::sync::mpsc::channel();
        send_to_model_thread(VisionWork {
            encoder,
            work: Box::new(move |e: &mut Encoder| Box::new(work(e)) as JobResult),
            reply,
        });
        self.vision_job = Some(VisionJob {
            reply: Some(receive),
        });
    }

    /// Waits for a background job to give the session back; its result, which only the caller
    /// of `join_vision` can use, is dropped.
    fn finish_vision_job(&mut self) {
        let _ = self.join_vision::<()>();
    }

    /// Whether a job started by `spawn_vision` holds the vision session.
    pub fn vision_busy(&self) -> bool {
        self.vision_job.is_some()
    }

    /// Waits for the job `spawn_vision` started, takes the session back and returns the job's
    /// result (None when there is no job, or it returned another type). A job that panicked
    /// took the session with it (the next use loads a new one); the panic goes on here.
    ///
    /// The wait checks for interrupts: on one, the job stays where it is (and the session with
    /// it) for the next call to collect.
    pub fn join_vision<T: 'static>(&mut self) -> Option<T> {
        let reply = self.vision_job.as_ref()?.reply.as_ref()?;
        let outcome = loop {
            match reply.recv_timeout(std::time::Duration::from_millis(5)) {
                Ok(outcome) => break Some(outcome),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    pgrx::check_for_interrupts!();
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break None,
            }
        };
        let mut job = self.vision_job.take().expect("checked above");
        job.reply = None; // answered: nothing left for its drop to wait for
        let (encoder, out) = outcome?.unwrap_or_else(|p| std::panic::resume_unwind(p));
        self.vision = Some(encoder);
        out.downcast::<T>().ok().map(|b| *b)
    }

    pub fn optimized_cache(&mut self) -> (Option<&'static str>, Option<&'static str>) {
        self.finish_vision_job();
        (
            self.vision.as_ref().map(|e| e.optimized_cache.as_str()),
            self.text.as_ref().map(|e| e.optimized_cache.as_str()),
        )
    }

    pub fn providers(&mut self) -> (Option<String>, Option<String>) {
        self.finish_vision_job();
        (
            self.vision.as_ref().map(|e| e.provider.clone()),
            self.text.as_ref().map(|e| e.provider.clone()),
        )
    }

    pub fn model_dir(&self) -> &Path {
        &self.key.model_dir
    }

    pub fn options(&self) -> &RuntimeOptions {
        &self.key.options
    }
}
