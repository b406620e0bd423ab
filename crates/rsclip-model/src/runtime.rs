//! ONNX Runtime: the process-wide environment and the vision/text encoder sessions.
//!
//! ONNX Runtime is loaded at run time from an absolute library path (the `load-dynamic` build),
//! once per process: ort allows a single environment per process, ever, so a later request for a
//! different library is refused rather than silently ignored. ORT starts worker threads; they are
//! created with every signal blocked so that they never run the host's (Postgres's) signal handlers.

use crate::manifest::{GraphSpec, ManifestError, ModelDir};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// CUDA when the library has it and a device answers, else CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeOptions {
    pub provider: Provider,
    /// CUDA device ordinal; `None` = caller's choice already applied (0).
    pub cuda_device: i32,
    pub gpu_mem_limit: Option<usize>,
    pub intra_op_threads: usize,
    /// 0 = disable, 1 = basic, 2 = extended, 3 = all.
    pub optimization_level: u8,
    /// Where optimized graphs are cached across sessions (see [`OptimizedCache`]), if anywhere.
    pub optimized_model_dir: Option<PathBuf>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            provider: Provider::Auto,
            cuda_device: 0,
            gpu_mem_limit: None,
            intra_op_threads: 1,
            optimization_level: 3,
            optimized_model_dir: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeError {
    /// The ONNX Runtime library could not be loaded from this path.
    Library {
        path: PathBuf,
        detail: String,
    },
    /// ONNX Runtime was already loaded from another path in this process.
    LibraryMismatch {
        loaded: PathBuf,
        requested: PathBuf,
    },
    Model(ManifestError),
    /// The graph does not have the inputs/outputs/dimensions the manifest promises.
    Graph {
        file: PathBuf,
        detail: String,
    },
    CudaUnavailable(String),
    Inference(String),
    /// `rsclip.optimized_model_cache` names a directory that cannot be used.
    OptimizedCache {
        dir: PathBuf,
        detail: String,
    },
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeError::Library { path, detail } => {
                write!(f, "could not load the ONNX Runtime library \"{}\": {detail}", path.display())
            }
            RuntimeError::LibraryMismatch { loaded, requested } => write!(
                f,
                "ONNX Runtime is already loaded from \"{}\" in this process; cannot switch to \"{}\" (start a new session)",
                loaded.display(),
                requested.display()
            ),
            RuntimeError::Model(e) => write!(f, "{e}"),
            RuntimeError::Graph { file, detail } => write!(f, "model graph \"{}\": {detail}", file.display()),
            RuntimeError::CudaUnavailable(d) => write!(f, "CUDA execution provider is not available: {d}"),
            RuntimeError::Inference(d) => write!(f, "inference failed: {d}"),
            RuntimeError::OptimizedCache { dir, detail } => write!(
                f,
                "optimized model cache directory \"{}\": {detail}",
                dir.display()
            ),
        }
    }
}

impl std::error::Error for RuntimeError {}

impl From<ManifestError> for RuntimeError {
    fn from(e: ManifestError) -> Self {
        RuntimeError::Model(e)
    }
}

fn ort_err(e: ort::Error) -> RuntimeError {
    RuntimeError::Inference(e.to_string())
}

/// Runs `f` with every signal blocked in the calling thread, so threads it starts inherit a
/// fully blocked mask (POSIX threads inherit the creator's mask).
pub fn with_signals_blocked<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: sigfillset/pthread_sigmask only write the sigset_t values we own; the previous mask
    // is restored on the way out (also when `f` unwinds, via the guard).
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        struct Restore(libc::sigset_t);
        impl Drop for Restore {
            fn drop(&mut self) {
                // SAFETY: restores the mask saved above.
                unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
            }
        }
        let _restore = Restore(old);
        f()
    }
}

/// The library path and the one environment of this process, kept alive forever.
static LOADED: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// Loads ONNX Runtime from `library` (absolute path) once per process and returns the environment.
pub fn ensure_environment(library: &Path) -> Result<Environment, RuntimeError> {
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((path, env)) = loaded.as_ref() {
        if path != library {
            return Err(RuntimeError::LibraryMismatch {
                loaded: path.clone(),
                requested: library.to_path_buf(),
            });
        }
        return Ok(env.clone());
    }
    if !library.is_absolute() {
        return Err(RuntimeError::Library {
            path: library.to_path_buf(),
            detail: "the path must be absolute".into(),
        });
    }
    if !library.exists() {
        return Err(RuntimeError::Library {
            path: library.to_path_buf(),
            detail: "no such file".into(),
        });
    }
    let env = with_signals_blocked(|| -> Result<Environment, RuntimeError> {
        let builder = ort::init_from(library).map_err(|e| RuntimeError::Library {
            path: library.to_path_buf(),
            detail: e.to_string(),
        })?;
        builder
            .with_name("rsclip")
            .with_telemetry(false)
            .build()
            .map_err(|e| RuntimeError::Library {
                path: library.to_path_buf(),
                detail: e.to_string(),
            })
    })?;
    *loaded = Some((library.to_path_buf(), env.clone()));
    Ok(env)
}

/// The ONNX Runtime version string, once loaded.
pub fn ort_version() -> Option<String> {
    LOADED.lock().ok()?.as_ref()?;
    Some(ort::info().to_string())
}

/// One encoder graph (vision or text) ready to run.
pub struct Encoder {
    session: Session,
    input: String,
    output: String,
    pub dim: usize,
    /// "cpu" or "cuda:N": the provider actually in use.
    pub provider: String,
    pub file: PathBuf,
    /// Whether the session came from `rsclip.optimized_model_cache`.
    pub optimized_cache: CacheState,
}

/// What the optimized-graph cache did for one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheState {
    /// No cache directory configured.
    Off,
    /// Loaded the graph ONNX Runtime had optimized earlier: no optimization passes this time.
    Hit,
    /// Optimized the original graph and saved the result for the next session.
    Written,
}

impl CacheState {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheState::Off => "off",
            CacheState::Hit => "hit",
            CacheState::Written => "written",
        }
    }
}

fn optimization_level(level: u8) -> GraphOptimizationLevel {
    match level {
        0 => GraphOptimizationLevel::Disable,
        1 => GraphOptimizationLevel::Level1,
        2 => GraphOptimizationLevel::Level2,
        _ => GraphOptimizationLevel::Level3,
    }
}

/// The instruction sets that change ONNX Runtime's CPU graph rewrites (NCHWc blocking width).
fn cpu_tag() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
    }
    "base"
}

/// One cached optimized graph:
/// `<dir>/<graph>-<sha256 prefix>-o<level>-<provider>-<cpu>-ort<version>.onnx`.
///
/// Everything that changes what ONNX Runtime's optimizer produces is in the name: the source
/// graph (by checksum, so a re-export never loads a stale file), the optimization level, the
/// provider and CPU (level-3 graphs contain hardware-specific rewrites) and the runtime version.
/// ONNX Runtime writes to a temporary name that is renamed into place, so a crash or two backends
/// saving at once never leave a half-written file under the final name.
struct OptimizedCache {
    path: PathBuf,
    temporary: PathBuf,
}

impl OptimizedCache {
    fn new(
        dir: &Path,
        model: &ModelDir,
        spec: &GraphSpec,
        provider: &str,
        opts: &RuntimeOptions,
    ) -> Result<Self, RuntimeError> {
        let problem = |detail: &str| RuntimeError::OptimizedCache {
            dir: dir.to_path_buf(),
            detail: detail.to_string(),
        };
        if !dir.is_absolute() {
            return Err(problem("the path must be absolute"));
        }
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(problem("not a directory")),
            Err(e) => return Err(problem(&e.to_string())),
        }
        let stem = spec.file.trim_end_matches(".onnx");
        let sha256 = model
            .manifest
            .files
            .get(&spec.file)
            .map(|f| f.sha256.as_str())
            .unwrap_or("unlisted");
        let checksum: String = sha256
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(16)
            .collect();
        let version: String = ort::info()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let provider = provider.replace(':', "");
        let name = format!(
            "{stem}-{checksum}-o{}-{provider}-{}-ort{version}.onnx",
            opts.optimization_level,
            cpu_tag()
        );
        Ok(OptimizedCache {
            temporary: dir.join(format!(".{name}.{}.tmp", std::process::id())),
            path: dir.join(name),
        })
    }

    fn publish(&self) -> Result<(), RuntimeError> {
        std::fs::rename(&self.temporary, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&self.temporary);
            RuntimeError::OptimizedCache {
                dir: self.path.parent().unwrap_or(Path::new("")).to_path_buf(),
                detail: format!("could not save the optimized graph: {e}"),
            }
        })
    }
}

impl Encoder {
    /// Loads `spec` from the model directory (verifying its checksum) with the given options.
    /// `env` comes from [`ensure_environment`].
    pub fn load(
        env: &Environment,
        model: &ModelDir,
        spec: &GraphSpec,
        opts: &RuntimeOptions,
    ) -> Result<Encoder, RuntimeError> {
        let file = model.dir.join(&spec.file);
        let graph_err = |detail: String| RuntimeError::Graph {
            file: file.clone(),
            detail,
        };
        let level = optimization_level(opts.optimization_level);
        let use_cuda = if opts.provider == Provider::Cpu {
            false
        } else {
            let available =
                <ort::ep::CUDA as ort::ep::ExecutionProvider>::is_available().unwrap_or(false);
            if !available && opts.provider == Provider::Cuda {
                return Err(RuntimeError::CudaUnavailable(
                    "this ONNX Runtime library has no CUDA execution provider (install onnxruntime-gpu and point rsclip.onnxruntime_library at it)".into(),
                ));
            }
            available
        };
        let provider = if use_cuda {
            format!("cuda:{}", opts.cuda_device)
        } else {
            "cpu".to_string()
        };
        let build = |level: GraphOptimizationLevel,
                     save_to: Option<&Path>,
                     graph: &[u8]|
         -> Result<Session, RuntimeError> {
            with_signals_blocked(|| {
                let mut builder = Session::builder(env)
                    .map_err(ort_err)?
                    .with_optimization_level(level)
                    .map_err(|e| ort_err(e.into()))?
                    .with_intra_threads(opts.intra_op_threads.max(1))
                    .map_err(|e| ort_err(e.into()))?
                    .with_inter_threads(1)
                    .map_err(|e| ort_err(e.into()))?;
                if let Some(path) = save_to {
                    builder = builder
                        .with_optimized_model_path(path)
                        .map_err(|e| ort_err(e.into()))?;
                }
                if use_cuda {
                    let mut cuda = ort::ep::CUDA::default().with_device_id(opts.cuda_device);
                    if let Some(limit) = opts.gpu_mem_limit {
                        cuda = cuda.with_memory_limit(limit);
                    }
                    builder = builder
                        .with_execution_providers([cuda.build().error_on_failure()])
                        .map_err(|e| ort_err(e.into()))?;
                }
                builder
                    .commit_from_memory(graph)
                    .map_err(|e| graph_err(e.to_string()))
            })
        };
        let cache = match &opts.optimized_model_dir {
            Some(dir) => Some(OptimizedCache::new(dir, model, spec, &provider, opts)?),
            None => None,
        };
        let mut cache_state = CacheState::Off;
        let mut session = None;
        if let Some(cache) = &cache {
            // A graph ONNX Runtime already optimized for this provider and version loads with
            // optimizations off; a damaged or stale file is simply replaced below.
            if let Ok(graph) = std::fs::read(&cache.path) {
                if let Ok(s) = build(GraphOptimizationLevel::Disable, None, &graph) {
                    session = Some(s);
                    cache_state = CacheState::Hit;
                }
            }
        }
        let session = match session {
            Some(s) => s,
            None => {
                let bytes = model.read_verified(&spec.file)?;
                match &cache {
                    Some(cache) => {
                        let s = build(level, Some(&cache.temporary), &bytes)?;
                        cache.publish()?;
                        cache_state = CacheState::Written;
                        s
                    }
                    None => build(level, None, &bytes)?,
                }
            }
        };
        let input = session
            .inputs()
            .iter()
            .find(|o| o.name() == spec.input)
            .map(|o| o.name().to_string());
        let output = session
            .outputs()
            .iter()
            .find(|o| o.name() == spec.output)
            .map(|o| o.name().to_string());
        let (Some(input), Some(output)) = (input, output) else {
            return Err(graph_err(format!(
                "expected input \"{}\" and output \"{}\"",
                spec.input, spec.output
            )));
        };
        // rsclip feeds float32 pixels or int64 ids and reads float32 embeddings; fp16 models keep
        // float32 inputs and outputs (the exporter converts with keep_io_types).
        let element_type = |values: &[ort::value::Outlet], name: &str| {
            values
                .iter()
                .find(|o| o.name() == name)
                .and_then(|o| match o.dtype() {
                    ort::value::ValueType::Tensor { ty, .. } => Some(*ty),
                    _ => None,
                })
        };
        use ort::value::TensorElementType as T;
        let input_type = element_type(session.inputs(), &input);
        if !matches!(input_type, Some(T::Float32 | T::Int64)) {
            return Err(graph_err(format!(
                "input \"{input}\" has element type {input_type:?}; rsclip feeds float32 pixels or int64 token ids (export fp16 models with tools/export_model.py, which keeps float32 inputs and outputs)"
            )));
        }
        let output_type = element_type(session.outputs(), &output);
        if output_type != Some(T::Float32) {
            return Err(graph_err(format!(
                "output \"{output}\" has element type {output_type:?}; rsclip reads float32 embeddings"
            )));
        }
        let dim = match session
            .outputs()
            .iter()
            .find(|o| o.name() == output)
            .map(|o| o.dtype())
        {
            Some(ort::value::ValueType::Tensor { shape, .. }) => {
                shape.last().copied().unwrap_or(-1)
            }
            _ => -1,
        };
        if dim != model.manifest.embedding_dim as i64 {
            return Err(graph_err(format!(
                "output \"{output}\" has {dim} dimensions, but the manifest says {}",
                model.manifest.embedding_dim
            )));
        }
        Ok(Encoder {
            session,
            input,
            output,
            dim: dim as usize,
            provider,
            file,
            optimized_cache: cache_state,
        })
    }

    /// Runs a float32 batch of shape `shape`; returns `batch x dim` embeddings (not normalized).
    pub fn run_f32(&mut self, shape: &[usize], data: Vec<f32>) -> Result<Vec<f32>, RuntimeError> {
        let tensor = Tensor::from_array((shape.to_vec(), data)).map_err(ort_err)?;
        self.run(tensor.into(), shape[0])
    }

    /// Runs an int64 batch of token ids of shape `shape`.
    pub fn run_i64(&mut self, shape: &[usize], data: Vec<i64>) -> Result<Vec<f32>, RuntimeError> {
        let tensor = Tensor::from_array((shape.to_vec(), data)).map_err(ort_err)?;
        self.run(tensor.into(), shape[0])
    }

    fn run(
        &mut self,
        value: ort::session::SessionInputValue<'_>,
        batch: usize,
    ) -> Result<Vec<f32>, RuntimeError> {
        let input = self.input.clone();
        let outputs = with_signals_blocked(|| {
            self.session
                .run(vec![(std::borrow::Cow::from(input), value)])
        })
        .map_err(ort_err)?;
        let (shape, data) = outputs[self.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(ort_err)?;
        if shape.len() != 2 || shape[0] as usize != batch || shape[1] as usize != self.dim {
            return Err(RuntimeError::Inference(format!(
                "unexpected output shape {shape:?}"
            )));
        }
        Ok(data.to_vec())
    }
}
