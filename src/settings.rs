//! Every rsclip setting (GUC) in one place, with its default, bounds and who may change it.
//!
//! Paths that make the server load code or read files (`model_path`, `onnxruntime_library`,
//! `optimized_model_cache`) are superuser-only; knobs that only affect speed are per-session.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::PostgresGucEnum;
use std::ffi::CString;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ExecutionProvider {
    #[name = c"auto"]
    Auto,
    #[name = c"cpu"]
    Cpu,
    #[name = c"cuda"]
    Cuda,
}

/// Where encoders run (`rsclip.inference`).
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum InferenceMode {
    /// In the calling backend, with its own ONNX Runtime sessions.
    #[name = c"backend"]
    Backend,
    /// In the shared inference workers (rsclip in shared_preload_libraries).
    #[name = c"worker"]
    Worker,
}

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum OptimizationLevel {
    #[name = c"disable"]
    Disable,
    #[name = c"basic"]
    Basic,
    #[name = c"extended"]
    Extended,
    #[name = c"all"]
    All,
}

pub static MODEL_PATH: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static ONNXRUNTIME_LIBRARY: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static EXECUTION_PROVIDER: GucSetting<ExecutionProvider> =
    GucSetting::<ExecutionProvider>::new(ExecutionProvider::Auto);
pub static CUDA_DEVICE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"auto"));
pub static GPU_MEM_LIMIT_MB: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static INTRA_OP_THREADS: GucSetting<i32> = GucSetting::<i32>::new(1);
pub static DECODE_THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static GRAPH_OPTIMIZATION: GucSetting<OptimizationLevel> =
    GucSetting::<OptimizationLevel>::new(OptimizationLevel::All);
pub static OPTIMIZED_MODEL_CACHE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static MAX_IMAGE_PIXELS: GucSetting<i32> = GucSetting::<i32>::new(100_000_000);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(8);
pub static JPEG_FAST_DOWNSCALE: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static PROBES: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static MAX_PROBES: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static CACHE: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static CACHE_IMAGES: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static CACHE_LRU_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024);
pub static CACHE_MAX_ROWS: GucSetting<i32> = GucSetting::<i32>::new(100_000);
pub static INFERENCE: GucSetting<InferenceMode> =
    GucSetting::<InferenceMode>::new(InferenceMode::Backend);
pub static INFERENCE_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(1);
pub static INFERENCE_QUEUE_SLOTS: GucSetting<i32> = GucSetting::<i32>::new(128);
pub static CUDA_DEVICES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static MAX_BATCH: GucSetting<i32> = GucSetting::<i32>::new(32);
pub static BATCH_WAIT_MS: GucSetting<f64> = GucSetting::<f64>::new(2.0);
pub static TIFF_BANDS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"1,2,3"));

pub fn register() {
    GucRegistry::define_string_guc(
        c"rsclip.model_path",
        c"Directory of the Git-RSCLIP model (rsclip.json, vision.onnx, text.onnx, tokenizer.json).",
        c"Made by tools/export_model.py. Absolute, or relative to the data directory.",
        &MODEL_PATH,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"rsclip.onnxruntime_library",
        c"Absolute path of the ONNX Runtime shared library (libonnxruntime.so.1.31.x).",
        c"Loaded once per backend; changing it needs a new session.",
        &ONNXRUNTIME_LIBRARY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"rsclip.execution_provider",
        c"Where models run: auto (CUDA when available, else CPU), cpu, or cuda (error if unavailable).",
        c"",
        &EXECUTION_PROVIDER,
        GucContext::Userset,
        GucFlags::default(),
    );
    // SAFETY: the hooks are guarded extern functions with the signatures Postgres calls.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"rsclip.cuda_device",
            c"CUDA device ordinal, or auto (backend pid modulo the device count).",
            c"",
            &CUDA_DEVICE,
            GucContext::Userset,
            GucFlags::default(),
            Some(check_cuda_device),
            Some(assign_cuda_device),
            None,
        )
    };
    GucRegistry::define_int_guc(
        c"rsclip.gpu_mem_limit",
        c"Memory limit of the CUDA execution provider's arena per session (0 = no limit).",
        c"",
        &GPU_MEM_LIMIT_MB,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"rsclip.intra_op_threads",
        c"Threads ONNX Runtime uses inside one inference run.",
        c"",
        &INTRA_OP_THREADS,
        1,
        256,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"rsclip.decode_threads",
        c"Threads decoding the images of one batch (array functions, backfill); 0 = one per CPU core.",
        c"",
        &DECODE_THREADS,
        0,
        256,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"rsclip.graph_optimization_level",
        c"ONNX Runtime graph optimization level: disable, basic, extended or all.",
        c"",
        &GRAPH_OPTIMIZATION,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"rsclip.optimized_model_cache",
        c"Directory where ONNX Runtime saves optimized graphs (empty = do not save).",
        c"",
        &OPTIMIZED_MODEL_CACHE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"rsclip.probes",
        c"Lists an rsclip index scan probes first (0 = ceil(1.7 * sqrt(lists)) + 1).",
        c"More probes: higher recall, slower queries.",
        &PROBES,
        0,
        rsclip_index::MAX_LISTS as i32,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"rsclip.max_probes",
        c"Most lists an rsclip index scan probes when a filter keeps rejecting rows (0 = all).",
        c"Bounds the iterative scan of WHERE ... ORDER BY ... LIMIT queries.",
        &MAX_PROBES,
        0,
        rsclip_index::MAX_LISTS as i32,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"rsclip.jpeg_fast_downscale",
        c"Decode large JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg IDCT scaling) while both sides stay at least 4x the model's image size.",
        c"Much less decoding work for big photos; pixels stay within one level of the full decode. Off = decode at full size, exactly as Pillow does.",
        &JPEG_FAST_DOWNSCALE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"rsclip.max_image_pixels",
        c"Largest image (width x height) rsclip decodes; checked from the header before decoding.",
        c"",
        &MAX_IMAGE_PIXELS,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"rsclip.batch_size",
        c"Images or texts per inference run in the array functions.",
        c"",
        &BATCH_SIZE,
        1,
        4096,
        GucContext::Userset,
        GucFlags::default(),
    );
    // SAFETY: as above.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"rsclip.tiff_bands",
            c"1-based bands of multi-band TIFFs used as red, green, blue, e.g. '4,3,2'.",
            c"",
            &TIFF_BANDS,
            GucContext::Userset,
            GucFlags::default(),
            Some(check_tiff_bands),
            Some(assign_tiff_bands),
            None,
        )
    };
    GucRegistry::define_bool_guc(
        c"rsclip.cache",
        c"Encoders reuse results from this backend's LRU and the shared table rsclip_cache, and add new ones.",
        c"Off: every call runs the model.",
        &CACHE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"rsclip.cache_images",
        c"Image encoders use the cache too (keyed by the sha256 of the image bytes).",
        c"Turn off for one-off bulk loads of unique images, where cache rows would never be read.",
        &CACHE_IMAGES,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"rsclip.cache_lru_size",
        c"Embeddings each backend keeps in memory in front of rsclip_cache (0 = none).",
        c"About 3 KB each at 768 dimensions.",
        &CACHE_LRU_SIZE,
        0,
        1_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"rsclip.cache_max_rows",
        c"Rows rsclip_cache holds at most; inserts beyond evict the least recently used of a sample (0 = no new rows).",
        c"Counted from the table statistics, which lag by about a second. About 3 KB per row at 768 dimensions.",
        &CACHE_MAX_ROWS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"rsclip.inference",
        c"Where encoders run: backend (sessions in each backend) or worker (the shared inference workers).",
        c"worker needs rsclip in shared_preload_libraries: one model copy per worker instead of one per backend, and batches formed across backends.",
        &INFERENCE,
        GucContext::Userset,
        GucFlags::default(),
    );
    // Settings read only at server start exist only when rsclip is preloaded (Postgres refuses
    // to create them later); without preloading there are no workers to configure.
    // SAFETY: a plain global the postmaster sets while it loads shared_preload_libraries.
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_int_guc(
            c"rsclip.inference_workers",
            c"Shared inference workers per device (per CUDA device in rsclip.cuda_devices, else on the CPU).",
            c"Started at server start when rsclip is in shared_preload_libraries; 0 starts none.",
            &INFERENCE_WORKERS,
            0,
            rsclip_infer::queue::MAX_WORKERS as i32,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"rsclip.inference_queue_slots",
            c"Requests the shared inference queue holds at once (about 18 KB of shared memory each).",
            c"Callers wait for a free slot when all are in use.",
            &INFERENCE_QUEUE_SLOTS,
            1,
            65_536,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        // ALTER SYSTEM refuses a bad list at once. One in a config file is reported when the
        // library loads, as Postgres' "invalid value" warning, and the default (the CPU) is
        // kept: Postgres only warns about a custom setting it cannot apply there.
        // SAFETY: the hook is a guarded extern function with the signature Postgres calls.
        unsafe {
            GucRegistry::define_string_guc_with_hooks(
                c"rsclip.cuda_devices",
                c"CUDA devices the inference workers run on, e.g. '0,1' (empty: the CPU).",
                c"rsclip.inference_workers workers start per device; requests go to whichever is free.",
                &CUDA_DEVICES,
                GucContext::Postmaster,
                GucFlags::default(),
                Some(check_cuda_devices),
                None,
                None,
            )
        };
    }
    GucRegistry::define_int_guc(
        c"rsclip.max_batch",
        c"Rows (texts or images) an inference worker runs in one batch at most.",
        c"",
        &MAX_BATCH,
        1,
        4096,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"rsclip.batch_wait",
        c"Longest an inference worker under load holds a short batch open for more requests.",
        c"A lone request on a quiet server runs at once.",
        &BATCH_WAIT_MS,
        0.0,
        1000.0,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    // SAFETY: called from _PG_init with a static NUL-terminated prefix.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"rsclip".as_ptr()) };
}

/// Parses `rsclip.cuda_devices` ('0,1'; empty: none, the CPU).
pub fn parse_cuda_devices(text: &str) -> Result<Vec<i32>, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(Vec::new());
    }
    t.split(',')
        .map(|d| match d.trim().parse::<i32>() {
            Ok(d) if d >= 0 => Ok(d),
            _ => Err(format!(
                "rsclip.cuda_devices must list device numbers such as '0,1', not \"{text}\"."
            )),
        })
        .collect()
}

/// Where `rsclip.cuda_device` points.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CudaDevice {
    /// The backend's pid modulo the device count.
    Auto,
    Ordinal(i32),
}

/// Parses `rsclip.cuda_device` (NULL or empty: the default, auto).
pub fn parse_cuda_device(text: &str) -> Result<CudaDevice, String> {
    let t = text.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("auto") {
        return Ok(CudaDevice::Auto);
    }
    match t.parse::<i32>() {
        Ok(d) if d >= 0 => Ok(CudaDevice::Ordinal(d)),
        _ => Err(format!(
            "rsclip.cuda_device must be \"auto\" or a device number (0, 1, ...), not \"{text}\"."
        )),
    }
}

/// Parses `rsclip.tiff_bands` into 0-based band indexes (NULL or empty: the default, 1,2,3).
pub fn parse_tiff_bands(text: &str) -> Result<[usize; 3], String> {
    if text.trim().is_empty() {
        return Ok([0, 1, 2]);
    }
    let bad = || {
        format!(
            "rsclip.tiff_bands must be three 1-based band numbers such as '4,3,2', not '{text}'."
        )
    };
    let parsed: Vec<usize> = text
        .split(',')
        .map(|b| {
            b.trim()
                .parse::<usize>()
                .ok()
                .filter(|&b| (1..=65535).contains(&b))
        })
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    match parsed[..] {
        [r, g, b] => Ok([r - 1, g - 1, b - 1]),
        _ => Err(bad()),
    }
}

// The parsed values, set by the assign hooks whenever the settings change. Atomics, not
// thread-locals: decoding threads may read them too.
static CUDA_DEVICE_PARSED: AtomicI64 = AtomicI64::new(-1); // -1: auto
static TIFF_BANDS_PARSED: AtomicU64 = AtomicU64::new(pack_bands([0, 1, 2]));

const fn pack_bands(b: [usize; 3]) -> u64 {
    (b[0] as u64 & 0xFFFF) | (b[1] as u64 & 0xFFFF) << 16 | (b[2] as u64 & 0xFFFF) << 32
}

pub fn cuda_device() -> CudaDevice {
    match CUDA_DEVICE_PARSED.load(Ordering::Relaxed) {
        d if d < 0 => CudaDevice::Auto,
        d => CudaDevice::Ordinal(d as i32),
    }
}

pub fn tiff_bands() -> [usize; 3] {
    let p = TIFF_BANDS_PARSED.load(Ordering::Relaxed);
    [
        (p & 0xFFFF) as usize,
        (p >> 16 & 0xFFFF) as usize,
        (p >> 32 & 0xFFFF) as usize,
    ]
}

/// The text of a GUC string hook's value (NULL: empty).
///
/// # Safety
/// `value` is NULL or a NUL-terminated string that outlives the call.
unsafe fn hook_text<'a>(value: *const std::ffi::c_char) -> std::borrow::Cow<'a, str> {
    if value.is_null() {
        "".into()
    } else {
        // SAFETY: (caller) a NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(value) }.to_string_lossy()
    }
}

/// Rejects the value with `detail` (a GUC check hook's way of raising a clear error).
fn reject(detail: &str) -> bool {
    let detail = CString::new(detail).unwrap_or_default();
    // SAFETY: GUC reports these after the hook returns false; pstrdup copies into the current
    // memory context, which lives until then.
    unsafe {
        pgrx::pg_sys::GUC_check_errcode(
            pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32,
        );
        pgrx::pg_sys::GUC_check_errdetail_string = pgrx::pg_sys::pstrdup(detail.as_ptr());
    }
    false
}

/// A GUC check hook that accepts what `$parse` parses and rejects the rest with its message.
macro_rules! check_hook {
    ($name:ident, $parse:path) => {
        #[pgrx::pg_guard]
        unsafe extern "C-unwind" fn $name(
            newval: *mut *mut std::ffi::c_char,
            _extra: *mut *mut std::ffi::c_void,
            _source: pgrx::pg_sys::GucSource::Type,
        ) -> bool {
            // SAFETY: Postgres passes a pointer to the candidate value.
            match $parse(&unsafe { hook_text(*newval) }) {
                Ok(_) => true,
                Err(e) => reject(&e),
            }
        }
    };
}

check_hook!(check_cuda_device, parse_cuda_device);
check_hook!(check_tiff_bands, parse_tiff_bands);
check_hook!(check_cuda_devices, parse_cuda_devices);

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn assign_cuda_device(
    newval: *const std::ffi::c_char,
    _extra: *mut std::ffi::c_void,
) {
    // SAFETY: the value the check hook accepted.
    let parsed = match parse_cuda_device(&unsafe { hook_text(newval) }) {
        Ok(CudaDevice::Ordinal(d)) => d as i64,
        _ => -1,
    };
    CUDA_DEVICE_PARSED.store(parsed, Ordering::Relaxed);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn assign_tiff_bands(
    newval: *const std::ffi::c_char,
    _extra: *mut std::ffi::c_void,
) {
    // SAFETY: the value the check hook accepted.
    let parsed = parse_tiff_bands(&unsafe { hook_text(newval) }).unwrap_or([0, 1, 2]);
    TIFF_BANDS_PARSED.store(pack_bands(parsed), Ordering::Relaxed);
}

pub fn string(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .map(|s: CString| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

/// Threads for decoding a batch of images: `rsclip.decode_threads`, or one per CPU core this
/// process may use when it is 0 (decoding runs beside inference, which has its own threads).
pub fn decode_threads() -> usize {
    match DECODE_THREADS.get() {
        n if n > 0 => n as usize,
        _ => {
            // std reads the cgroup's CPU quota from /proc and /sys on every call: once is enough
            thread_local! {
                static CORES: std::cell::OnceCell<usize> = const { std::cell::OnceCell::new() };
            }
            CORES.with(|c| {
                *c.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            })
        }
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn tiff_bands() {
        assert_eq!(parse_tiff_bands("4,3,2"), Ok([3, 2, 1]));
        assert_eq!(parse_tiff_bands(" 1 , 2,3 "), Ok([0, 1, 2]));
        assert_eq!(parse_tiff_bands(""), Ok([0, 1, 2]));
        assert_eq!(tiff_bands_roundtrip([3, 65534, 7]), [3, 65534, 7]);
        for bad in [
            "0,1,2",
            "1,2",
            "1,2,3,4",
            "a,b,c",
            "1,,2",
            "-1,2,3",
            "1,2,65536",
        ] {
            let e = parse_tiff_bands(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    fn tiff_bands_roundtrip(b: [usize; 3]) -> [usize; 3] {
        TIFF_BANDS_PARSED.store(pack_bands(b), Ordering::Relaxed);
        let got = super::tiff_bands();
        TIFF_BANDS_PARSED.store(pack_bands([0, 1, 2]), Ordering::Relaxed);
        got
    }

    #[test]
    fn cuda_device() {
        assert_eq!(parse_cuda_device("AUTO"), Ok(CudaDevice::Auto));
        assert_eq!(parse_cuda_device(""), Ok(CudaDevice::Auto));
        assert_eq!(parse_cuda_device(" 3 "), Ok(CudaDevice::Ordinal(3)));
        for bad in ["-1", "gpu0", "1.5"] {
            assert!(parse_cuda_device(bad).unwrap_err().contains(bad));
        }
    }
}
