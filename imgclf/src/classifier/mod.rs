//! The `Classifier` port: a synchronous model owned by one thread, and the async handle that
//! feeds it batches.

mod handle;
#[cfg(feature = "ort")]
mod ort;
#[cfg(feature = "tract")]
mod tract;
pub mod tuning;
pub mod under_load;

#[cfg(feature = "ort")]
pub use self::ort::OrtClassifier;
pub use handle::{Classified, ClassifierHandle, ClassifyImageError, Factory, Queued};
#[cfg(feature = "tract")]
pub use tract::TractClassifier;

use crate::model::{ModelError, ModelSpec};

/// Why a model could not be built or could not classify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClassifyError {
    /// The model files are missing or invalid.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The backend failed on a batch.
    #[error("inference failed: {0}")]
    Inference(String),
    /// No backend of that name is compiled in.
    #[error("unknown classifier {0:?}: this build has {AVAILABLE:?}")]
    Unknown(String),
    /// The inference threads are gone (the process is stopping).
    #[error("the classifier thread has stopped")]
    Stopped,
}

impl ClassifyError {
    /// Whether trying again (on another worker, later) may help: only when the model was not
    /// there to ask; an image the model fails on fails again.
    pub fn is_temporary(&self) -> bool {
        matches!(self, Self::Stopped)
    }
}

/// Names of the classifier backends compiled into this build.
pub const AVAILABLE: &[&str] = &[
    #[cfg(feature = "tract")]
    "tract",
    #[cfg(feature = "ort")]
    "ort",
];

/// The backend used when none is named: [`AUTO`].
pub const DEFAULT_BACKEND: &str = AUTO;

/// Chooses the backend: `ort` when an ONNX Runtime library can be found
/// ([`find_ort_library`]), else `tract`.
pub const AUTO: &str = "auto";
/// Threads one inference may use, by default.
pub const DEFAULT_INTRA_THREADS: usize = 1;

/// An ONNX Runtime execution provider the ort backend may run a model on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Provider {
    /// ONNX Runtime's own CPU kernels, in every library.
    Cpu,
    /// NVIDIA GPUs through CUDA and cuDNN (the `onnxruntime-gpu` library).
    Cuda,
    /// NVIDIA TensorRT, which compiles the graph for the GPU (falls back to CUDA node by node).
    TensorRt,
}

impl Provider {
    /// Every provider, as `IMGCLF_ORT_PROVIDERS` spells them.
    pub const ALL: [Provider; 3] = [Provider::Cpu, Provider::Cuda, Provider::TensorRt];

    /// The name `IMGCLF_ORT_PROVIDERS` knows it by.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::TensorRt => "tensorrt",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a list of execution providers was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// A name that is not a provider.
    #[error("unknown execution provider {0:?}: accepted are cpu, cuda and tensorrt")]
    Unknown(String),
    /// `cpu` before another provider: ONNX Runtime would give CPU every node, so the later
    /// ones could never run anything.
    #[error("execution provider {0} comes after cpu, which takes every node: put cpu last")]
    AfterCpu(Provider),
}

impl std::str::FromStr for Provider {
    type Err = ProviderError;

    /// Case and surrounding blanks do not matter.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim();
        Self::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| ProviderError::Unknown(name.to_string()))
    }
}

/// Execution providers in order of preference (`IMGCLF_ORT_PROVIDERS`), always ending with CPU:
/// ONNX Runtime gives each node to the first provider that can run it, so CPU last is the
/// fallback for whatever, or whichever provider, the others cannot take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Providers(Vec<Provider>);

impl Providers {
    /// The providers in order, CPU last.
    pub fn as_slice(&self) -> &[Provider] {
        &self.0
    }

    /// The providers asked for before the CPU fallback.
    pub fn accelerators(&self) -> impl Iterator<Item = Provider> + '_ {
        self.0.iter().copied().filter(|p| *p != Provider::Cpu)
    }
}

impl Default for Providers {
    fn default() -> Self {
        Self(vec![Provider::Cpu])
    }
}

impl std::str::FromStr for Providers {
    type Err = ProviderError;

    /// A comma-separated list (`cuda,cpu`); empty means CPU alone, a repeated name counts once,
    /// and CPU is added at the end when not named.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut list = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let provider: Provider = part.parse()?;
            if list.contains(&Provider::Cpu) && provider != Provider::Cpu {
                return Err(ProviderError::AfterCpu(provider));
            }
            if !list.contains(&provider) {
                list.push(provider);
            }
        }
        if !list.contains(&Provider::Cpu) {
            list.push(Provider::Cpu);
        }
        Ok(Self(list))
    }
}

impl std::fmt::Display for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|p| p.name()).collect();
        f.write_str(&names.join(","))
    }
}

/// How to run a backend.
#[derive(Clone, Debug)]
pub struct ClassifierOptions {
    /// Threads one inference may use (ort; tract runs on one).
    pub intra_threads: usize,
    /// `libonnxruntime.so` for the ort backend; `ORT_DYLIB_PATH` when unset.
    pub ort_library: Option<std::path::PathBuf>,
    /// Instances of the model side by side, each on its own thread [default: one per core on
    /// the CPU, each decoding its own images; with an accelerator, measured at start so that
    /// inference and preprocessing share the cores by their costs (see [`tuning`]); 1 for ort
    /// when `intra_threads` is above 1].
    pub instances: Option<usize>,
    /// Execution providers for ort, in order of preference, CPU last.
    pub providers: Providers,
}

impl Default for ClassifierOptions {
    fn default() -> Self {
        Self {
            intra_threads: DEFAULT_INTRA_THREADS,
            ort_library: None,
            instances: None,
            providers: Providers::default(),
        }
    }
}

/// Loads `spec` into the named backend, as many instances as `options` say, each on its own
/// inference thread feeding batches of up to `max_batch`; what they leave open (`None`) is
/// measured here (see [`tuning`]). Blocking: compiles the model.
pub fn spawn(
    name: &str,
    spec: ModelSpec,
    options: &ClassifierOptions,
    max_batch: Option<usize>,
) -> Result<ClassifierHandle, ClassifyError> {
    if name == AUTO {
        return spawn_auto(spec, options, max_batch);
    }
    let instances = match options.instances {
        Some(instances) => Some(instances),
        // Several threads per run asked for: one instance uses them.
        None if options.intra_threads > 1 && name != "tract" => Some(1),
        None => None,
    };
    // On the CPU, an instance per core takes each of its images from bytes to logits (see
    // `ClassifierHandle::spawn_preprocessing`). With an accelerator, or fewer instances than
    // cores, preprocessing runs on the worker's threads beside them.
    let preprocess = options.providers.accelerators().next().is_none()
        && instances.is_none_or(|n| n >= crate::cores());
    // The instances known now are built before the tuning, which times them all at once.
    let instances = tuning::known_instances(instances, preprocess);
    let built = || build(name, spec.clone(), options);
    let mut classifiers = std::iter::repeat_with(built)
        .take(instances.unwrap_or(1))
        .collect::<Result<Vec<_>, _>>()?;
    let mut timed: Vec<&mut dyn Classifier> = classifiers.iter_mut().map(|c| &mut **c).collect();
    let choice = tuning::choose(&mut timed, instances, max_batch, preprocess)?;
    // ONNX Runtime keeps the buffers of the largest batch a session ran: the instances timed
    // on every batch size are built again, so that they hold only what the sizes they will run
    // need (the chosen one, and up to 4 under load; ResNet18 at batch 8 against 1: tens of
    // MiB). Dropped first: instances of a model share a session on the CPU, and theirs must be
    // new.
    let largest_timed = tuning::BATCHES[tuning::BATCHES.len() - 1];
    if name == "ort" && max_batch.is_none() && choice.max_batch < largest_timed {
        let count = classifiers.len();
        classifiers.clear();
        for _ in 0..count {
            classifiers.push(built()?);
        }
    }
    for _ in classifiers.len()..choice.instances {
        classifiers.push(built()?);
    }
    if preprocess {
        let wide = match options.instances {
            None => wide_instance(name, &spec, options)?,
            Some(_) => None,
        };
        // A cap the settings leave open is re-checked under load.
        return Ok(ClassifierHandle::spawn_preprocessing(
            classifiers,
            choice.max_batch,
            wide,
            max_batch.is_none(),
        ));
    }
    if instances.is_some() {
        return Ok(ClassifierHandle::spawn_pool(classifiers, choice.max_batch));
    }
    // The count measured at start is re-checked while running: the pool grows, up to a
    // model per core, while images wait for it.
    let (name, options) = (name.to_owned(), options.clone());
    let factory: Factory = Box::new(move || build(&name, spec.clone(), &options));
    Ok(ClassifierHandle::spawn_growing(
        classifiers,
        choice.max_batch,
        factory,
        crate::cores(),
    ))
}

/// One more ort instance whose runs spread over every core, for an image that finds the
/// single-threaded instances idle: under light load each image is classified in the time the
/// cores take together (EfficientNet-Lite0 on two Zen 4 cores: 8.5 ms instead of 11.6;
/// ResNet18: 22 instead of 38), and under load it stays idle. Where the process has cores of
/// its own, its threads are pinned one per core (see [`crate::affinity`]). None for tract (one
/// core per run), on one core, or when the threads per run are set; the instance count
/// (`IMGCLF_INFERENCE_THREADS`) set turns it off too.
fn wide_instance(
    name: &str,
    spec: &ModelSpec,
    options: &ClassifierOptions,
) -> Result<Option<Box<dyn Classifier>>, ClassifyError> {
    let cores = crate::cores();
    if name != "ort" || cores < 2 || options.intra_threads != DEFAULT_INTRA_THREADS {
        return Ok(None);
    }
    #[cfg(feature = "ort")]
    {
        let library = ort_library(spec, options)?;
        let mut wide = OrtClassifier::over_every_core(spec.clone(), &library, cores)?;
        // Its first run allocates: not on a client's image.
        wide.classify(&vec![0.0; spec.transform.tensor_len()], 1)?;
        tracing::info!(
            threads = cores,
            "classifier: one more instance, on all {cores} cores, takes an image that finds the \
             others idle"
        );
        Ok(Some(Box::new(wide)))
    }
    #[cfg(not(feature = "ort"))]
    {
        let _ = spec; // `ort` is not compiled in: it did not start
        Ok(None)
    }
}

/// `auto`: ONNX Runtime when its library is found and loads, tract otherwise; one log line says
/// which, and how to get the faster one.
fn spawn_auto(
    spec: ModelSpec,
    options: &ClassifierOptions,
    max_batch: Option<usize>,
) -> Result<ClassifierHandle, ClassifyError> {
    #[cfg(feature = "ort")]
    if let Some(library) = find_ort_library(options.ort_library.as_deref()) {
        let with_library = ClassifierOptions {
            ort_library: Some(library.clone()),
            ..options.clone()
        };
        match spawn("ort", spec.clone(), &with_library, max_batch) {
            Ok(handle) => {
                tracing::info!(library = %library.display(), "classifier: ort (ONNX Runtime)");
                return Ok(handle);
            }
            Err(error) => tracing::warn!(
                library = %library.display(),
                %error,
                "classifier: ONNX Runtime found but not usable; using tract"
            ),
        }
    }
    if AVAILABLE.contains(&"ort") {
        tracing::info!(
            "classifier: tract (pure Rust). ONNX Runtime runs these models about twice as fast: \
             `pip install onnxruntime`, or set IMGCLF_ORT_LIB to a libonnxruntime.so \
             (scripts/setup-ort.sh fetches one)"
        );
    }
    spawn("tract", spec, options, max_batch)
}

/// Where an ONNX Runtime library is, in the order `auto` looks: `configured`
/// (`IMGCLF_ORT_LIB`), `ORT_DYLIB_PATH`, beside the running binary (or in `../lib` from it),
/// then inside the `onnxruntime` Python package if `python3` has one.
pub fn find_ort_library(configured: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
    use std::path::{Path, PathBuf};
    /// A `libonnxruntime` shared library in `dir`, the highest version first.
    fn in_dir(dir: &Path) -> Option<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("libonnxruntime.so") || n == "libonnxruntime.dylib"
                })
            })
            .collect();
        found.sort();
        found.pop()
    }
    if let Some(path) = configured {
        return Some(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return Some(path.into());
    }
    let exe_dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
    if let Some(found) = in_dir(&exe_dir).or_else(|| in_dir(&exe_dir.join("../lib"))) {
        return Some(found);
    }
    let package = std::process::Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())?;
    let dir = String::from_utf8(package.stdout).ok()?;
    in_dir(&Path::new(dir.trim()).join("capi"))
}

/// A model that classifies a batch of preprocessed images.
///
/// Synchronous on purpose: inference is CPU-bound, so the backend lives on its own OS thread
/// (see [`ClassifierHandle`]) and never blocks the async runtime.
pub trait Classifier: Send + 'static {
    /// The model it runs.
    fn spec(&self) -> &ModelSpec;

    /// `batch` holds `n` CHW tensors back to back; the answer holds `n` rows of logits.
    fn classify(&mut self, batch: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError>;

    /// The backend's name, as `IMGCLF_CLASSIFIER` spells it (for logs and `imgclf_build_info`).
    fn backend(&self) -> &'static str {
        "custom"
    }
}

/// Splits a batch's output into one row of logits per image.
#[cfg(any(feature = "tract", feature = "ort"))]
fn split_rows(logits: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError> {
    if n == 0 || !logits.len().is_multiple_of(n) {
        let message = format!("{} logits for {n} images", logits.len());
        return Err(ClassifyError::Inference(message));
    }
    Ok(logits
        .chunks(logits.len() / n)
        .map(<[f32]>::to_vec)
        .collect())
}

/// Builds the named backend for a model.
pub fn build(
    name: &str,
    spec: ModelSpec,
    options: &ClassifierOptions,
) -> Result<Box<dyn Classifier>, ClassifyError> {
    match name {
        #[cfg(feature = "tract")]
        "tract" => Ok(Box::new(TractClassifier::new(spec)?)),
        #[cfg(feature = "ort")]
        "ort" => {
            let library = ort_library(&spec, options)?;
            Ok(Box::new(OrtClassifier::new(
                spec,
                &library,
                options.intra_threads,
                &options.providers,
            )?))
        }
        other => {
            let _ = (spec, options);
            Err(ClassifyError::Unknown(other.to_string()))
        }
    }
}

/// The `libonnxruntime.so` the ort backend loads: `IMGCLF_ORT_LIB`, else `ORT_DYLIB_PATH`.
#[cfg(feature = "ort")]
fn ort_library(
    spec: &ModelSpec,
    options: &ClassifierOptions,
) -> Result<std::path::PathBuf, ClassifyError> {
    options
        .ort_library
        .clone()
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(Into::into))
        .ok_or_else(|| {
            spec.invalid(
                "the ort classifier needs ONNX Runtime: set IMGCLF_ORT_LIB (or ORT_DYLIB_PATH) \
                 to a libonnxruntime.so; scripts/setup-ort.sh extracts one from the onnxruntime \
                 wheel on PyPI",
            )
            .into()
        })
}

#[cfg(test)]
mod tests {
    use super::{Provider, ProviderError, Providers};

    fn parse(s: &str) -> Result<Vec<Provider>, ProviderError> {
        s.parse::<Providers>().map(|p| p.as_slice().to_vec())
    }

    #[test]
    fn providers_parse_in_order_with_cpu_last() {
        use Provider::{Cpu, Cuda, TensorRt};
        assert_eq!(parse("cuda,cpu"), Ok(vec![Cuda, Cpu]));
        assert_eq!(parse(" TensorRT , Cuda "), Ok(vec![TensorRt, Cuda, Cpu]));
        assert_eq!(
            parse("cuda"),
            Ok(vec![Cuda, Cpu]),
            "CPU is always the fallback"
        );
        assert_eq!(parse("cuda,cuda,cpu"), Ok(vec![Cuda, Cpu]));
        assert_eq!(parse(""), Ok(vec![Cpu]));
        assert_eq!(parse(" , "), Ok(vec![Cpu]));
        assert_eq!(parse("cpu"), Ok(vec![Cpu]));
        assert_eq!(Providers::default().as_slice(), [Cpu]);
        let providers: Providers = "tensorrt,cuda".parse().unwrap();
        assert_eq!(providers.to_string(), "tensorrt,cuda,cpu");
        assert_eq!(
            providers.accelerators().collect::<Vec<_>>(),
            [TensorRt, Cuda]
        );
    }

    #[test]
    fn unknown_or_unreachable_providers_are_errors() {
        let error = parse("cuda,rocm").unwrap_err();
        assert_eq!(error, ProviderError::Unknown("rocm".into()));
        let message = error.to_string();
        assert!(
            message.contains("\"rocm\"") && message.contains("tensorrt"),
            "{message}"
        );
        assert_eq!(
            parse("cpu,cuda").unwrap_err(),
            ProviderError::AfterCpu(Provider::Cuda)
        );
    }
}
