//! ONNX Runtime through the `ort` crate, loaded at run time from a `libonnxruntime.so` (no
//! download at build time; `scripts/setup-ort.sh` extracts one from the `onnxruntime` wheel).

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use ort::environment::Environment;
use ort::ep::ExecutionProvider;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use ort::value::{DynValue, TensorRef};
use ort::AsPointer;

use super::{split_rows, Classifier, ClassifyError, Provider, Providers};
use crate::model::ModelSpec;

/// The runtime is loaded once per process; later sessions share it.
static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

fn environment(library: &Path) -> Result<&'static Environment, String> {
    ENVIRONMENT
        .get_or_init(|| {
            let builder = ort::init_from(library)
                .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", library.display()))?;
            builder
                .with_name("imgclf")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A model on ONNX Runtime: the whole batch runs as one tensor.
pub struct OrtClassifier {
    spec: ModelSpec,
    /// On the CPU, shared by the model's instances with the same threads per run (see
    /// [`SHARED`]).
    session: Arc<NamedSession>,
    /// On an accelerator, every batch is padded to one size (see [`Padding`]).
    padding: Option<Padding>,
}

impl OrtClassifier {
    /// `library`: the `libonnxruntime.so` to load; `intra_threads`: threads per inference;
    /// `providers`: where to run, in order of preference. A provider the library lacks, or that
    /// fails to start, is skipped with one warning: the session then runs on the next, finally
    /// on CPU.
    pub fn new(
        spec: ModelSpec,
        library: &Path,
        intra_threads: usize,
        providers: &Providers,
    ) -> Result<Self, ClassifyError> {
        let environment = environment(library).map_err(|e| spec.invalid(e))?;
        let (session, runs_on) = if providers.accelerators().next().is_none() {
            let session = shared_session(&spec, environment, intra_threads)?;
            (session, Provider::Cpu)
        } else {
            let (session, runs_on) = session(&spec, environment, intra_threads, providers, &[])?;
            (Arc::new(NamedSession::new(session, &spec)?), runs_on)
        };
        Ok(Self {
            spec,
            session,
            padding: (runs_on != Provider::Cpu).then(Padding::default),
        })
    }

    /// On the CPU, each run spread over `cores` threads, for an image that has the machine to
    /// itself. Where the process has cores of its own, the session's threads are pinned one
    /// to each core after the first, which the calling thread is to keep to (see
    /// `crate::affinity`). Its session is its own.
    pub(crate) fn over_every_core(
        spec: ModelSpec,
        library: &Path,
        cores: usize,
    ) -> Result<Self, ClassifyError> {
        let environment = environment(library).map_err(|e| spec.invalid(e))?;
        let helpers = crate::affinity::other_cores();
        let pinned = helpers.get(..cores.saturating_sub(1)).unwrap_or_default();
        let (session, _) = session(&spec, environment, cores, &Providers::default(), pinned)?;
        Ok(Self {
            session: Arc::new(NamedSession::new(session, &spec)?),
            spec,
            padding: None,
        })
    }
}

/// A session, and the names of the input and output its runs use.
struct NamedSession {
    session: Session,
    input: CString,
    output: CString,
}

impl NamedSession {
    fn new(session: Session, spec: &ModelSpec) -> Result<Self, ClassifyError> {
        let name = |outlets: &[ort::value::Outlet], what: &str| {
            outlets
                .first()
                .and_then(|o| CString::new(o.name()).ok())
                .ok_or_else(|| spec.invalid(format!("the model has no usable {what}")))
        };
        Ok(Self {
            input: name(session.inputs(), "input")?,
            output: name(session.outputs(), "output")?,
            session,
        })
    }

    /// Runs one input through the session. Several threads may run one session at once: each
    /// run has its own buffers, and ONNX Runtime documents `Run` as safe to call concurrently.
    /// (The `ort` crate asks for `&mut` because some accelerators' providers are not, so only
    /// CPU sessions are shared; see [`SHARED`].)
    #[allow(unsafe_code)] // ONNX Runtime's C API, as the `ort` crate calls it
    fn run(&self, input: &TensorRef<'_, f32>) -> Result<DynValue, ort::Error> {
        let (input_names, inputs) = ([self.input.as_ptr()], [input.ptr()]);
        let output_names = [self.output.as_ptr()];
        let mut output: *mut ort::sys::OrtValue = std::ptr::null_mut();
        // SAFETY: every pointer lives until `Run` returns, the arrays hold one entry each as
        // their lengths say, and the output it allocates is owned by the value made from it,
        // which keeps the session's allocator alive.
        unsafe {
            ort::Error::result_from_status((ort::api().Run)(
                self.session.ptr().cast_mut(),
                std::ptr::null(),
                input_names.as_ptr(),
                inputs.as_ptr(),
                1,
                output_names.as_ptr(),
                1,
                &mut output,
            ))?;
            let output = NonNull::new(output).ok_or_else(|| ort::Error::new("no output"))?;
            Ok(DynValue::from_ptr(output, Some(self.session.allocator())))
        }
    }
}

/// CPU sessions by model file and threads per run, while an instance holds them. The instances
/// of a model share one session, and so its weights and optimised graph (ResNet18: 70 MiB a
/// session), rather than each loading its own.
static SHARED: Mutex<Vec<(PathBuf, usize, Weak<NamedSession>)>> = Mutex::new(Vec::new());

/// The CPU session for `spec` at `intra_threads`: the one its other instances run, else a new
/// one. Held locked while building, so that instances built at once share one too.
fn shared_session(
    spec: &ModelSpec,
    environment: &'static Environment,
    intra_threads: usize,
) -> Result<Arc<NamedSession>, ClassifyError> {
    let mut shared = SHARED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    shared.retain(|(_, _, held)| held.strong_count() > 0);
    let found = shared.iter().find_map(|(path, threads, held)| {
        (*path == spec.onnx_path && *threads == intra_threads)
            .then(|| held.upgrade())
            .flatten()
    });
    if let Some(session) = found {
        return Ok(session);
    }
    let (session, _) = session(spec, environment, intra_threads, &Providers::default(), &[])?;
    let session = Arc::new(NamedSession::new(session, spec)?);
    let held = Arc::downgrade(&session);
    shared.push((spec.onnx_path.clone(), intra_threads, held));
    Ok(session)
}

/// Builds a session of `spec` on the first of `providers` that starts, else on the CPU; and
/// says which. `pinned`: the cores of the session's own threads, one each (none: unpinned).
fn session(
    spec: &ModelSpec,
    environment: &'static Environment,
    intra_threads: usize,
    providers: &Providers,
    pinned: &[usize],
) -> Result<(Session, Provider), ClassifyError> {
    let invalid = |e: String| {
        spec.invalid(format!(
            "ONNX Runtime cannot load {}: {e}",
            spec.onnx_path.display()
        ))
    };
    let mut builder = session_builder(environment, intra_threads, pinned).map_err(invalid)?;
    let requested: Vec<Provider> = providers.accelerators().collect();
    let mut registered = Vec::new();
    for (i, &provider) in requested.iter().enumerate() {
        let next = requested.get(i + 1).copied().unwrap_or(Provider::Cpu);
        match register(provider, &mut builder) {
            Ok(()) => registered.push(provider),
            Err(why) => warn_once(provider, &why, next),
        }
    }
    let session = match builder.commit_from_file(&spec.onnx_path) {
        Ok(session) => session,
        // A GPU library on a machine whose driver or CUDA libraries do not work may accept
        // the provider and fail only here: run on CPU rather than not at all.
        Err(error) if !registered.is_empty() => {
            for provider in registered.drain(..) {
                warn_once(
                    provider,
                    &format!("the session could not start on it: {error}"),
                    Provider::Cpu,
                );
            }
            session_builder(environment, intra_threads, pinned)
                .and_then(|mut b| {
                    b.commit_from_file(&spec.onnx_path)
                        .map_err(|e| e.to_string())
                })
                .map_err(invalid)?
        }
        Err(error) => return Err(invalid(error.to_string()).into()),
    };
    let runs_on = registered.first().copied().unwrap_or(Provider::Cpu);
    let chain: Vec<&str> = registered
        .iter()
        .chain([&Provider::Cpu])
        .map(|p| p.name())
        .collect();
    tracing::info!(
        provider = %runs_on,
        fallbacks = %chain.join(","),
        model = %spec.name,
        "ort: the session runs on {runs_on}"
    );
    Ok((session, runs_on))
}

/// A session builder with the options every session shares; `pinned` as for [`session`].
fn session_builder(
    environment: &'static Environment,
    intra_threads: usize,
    pinned: &[usize],
) -> Result<SessionBuilder, String> {
    let builder = Session::builder(environment)
        .map_err(|e| e.to_string())
        .and_then(|b| {
            b.with_optimization_level(GraphOptimizationLevel::Level3)
                .map_err(|e| e.to_string())
        })
        .and_then(|b| {
            b.with_intra_threads(intra_threads.max(1))
                .map_err(|e| e.to_string())
        })
        // Other instances and preprocessing share the cores: a thread that waits for work
        // sleeps rather than spin on a core another thread needs.
        .and_then(|b| b.with_intra_op_spinning(false).map_err(|e| e.to_string()))?;
    if pinned.is_empty() {
        return Ok(builder);
    }
    // One entry per thread of its own; ONNX Runtime numbers the processors from 1.
    let cores: Vec<String> = pinned.iter().map(|core| (core + 1).to_string()).collect();
    builder
        .with_config_entry("session.intra_op_thread_affinities", cores.join(";"))
        .map_err(|e| e.to_string())
}

/// Adds `provider` to the session's providers; the error says why it cannot be used.
fn register(provider: Provider, builder: &mut SessionBuilder) -> Result<(), String> {
    match provider {
        Provider::Cpu => Ok(()),
        // TF32 would trade the logits' last digits for speed: the GPU must agree with the CPU.
        Provider::Cuda => register_ep(ort::ep::CUDA::default().with_tf32(false), builder),
        // Building a TensorRT engine takes long: keep it for the next start.
        Provider::TensorRt => register_ep(
            ort::ep::TensorRT::default()
                .with_engine_cache(true)
                .with_engine_cache_path(std::env::temp_dir().join("imgclf-tensorrt").display()),
            builder,
        ),
    }
}

fn register_ep<E: ExecutionProvider>(ep: E, builder: &mut SessionBuilder) -> Result<(), String> {
    match E::is_available() {
        Ok(true) => ep
            .register(builder)
            .map_err(|e| format!("registering it failed: {e}")),
        Ok(false) => Err(format!(
            "this ONNX Runtime library was built without {} (the `onnxruntime` wheel is CPU-only; \
             `onnxruntime-gpu` has CUDA and TensorRT)",
            E::NAME
        )),
        Err(e) => Err(format!("ONNX Runtime cannot list its providers: {e}")),
    }
}

/// One warning per provider and process, however many instances of the model start.
fn warn_once(provider: Provider, why: &str, next: Provider) {
    static WARNED: Mutex<Vec<Provider>> = Mutex::new(Vec::new());
    let mut warned = WARNED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !warned.contains(&provider) {
        warned.push(provider);
        tracing::warn!(
            %provider,
            fallback = %next,
            "ort: execution provider {provider} is unavailable: {why}; falling back to {next}"
        );
    }
}

impl Classifier for OrtClassifier {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn backend(&self) -> &'static str {
        "ort"
    }

    fn classify(&mut self, batch: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ClassifyError> {
        let inference = |e: ort::Error| ClassifyError::Inference(e.to_string());
        let side = self.spec.transform.crop as usize;
        let (input, rows) = match &mut self.padding {
            Some(padding) => padding.pad(batch, n),
            None => (batch, n),
        };
        let input =
            TensorRef::from_array_view(([rows, 3, side, side], input)).map_err(inference)?;
        let output = self.session.run(&input).map_err(inference)?;
        let (_, logits) = output.try_extract_tensor::<f32>().map_err(inference)?;
        let mut rows = split_rows(logits, rows)?;
        rows.truncate(n);
        Ok(rows)
    }
}

/// Pads each batch with zero images up to the largest batch so far. ONNX Runtime's CUDA
/// provider slows down badly when the input shape changes from run to run: batches of sizes
/// taken in turn ran 110 to 720 ms each where one size runs in 1 to 2 ms (EfficientNet-Lite0
/// on an H200, ONNX Runtime 1.31), and a padded image costs the GPU next to nothing.
#[derive(Default)]
struct Padding {
    largest: usize,
    /// The padded batch, reused from run to run.
    scratch: Vec<f32>,
}

impl Padding {
    /// The batch to run for `batch` (`n` images), and its number of images.
    fn pad<'a>(&'a mut self, batch: &'a [f32], n: usize) -> (&'a [f32], usize) {
        if n >= self.largest {
            self.largest = n;
            return (batch, n);
        }
        let image = batch.len() / n.max(1);
        self.scratch.clear();
        self.scratch.extend_from_slice(batch);
        self.scratch.resize(image * self.largest, 0.0);
        (&self.scratch, self.largest)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{OrtClassifier, Padding};
    use crate::classifier::{Classifier, Providers};
    use crate::model::ModelSpec;

    /// Instances of a model with the same threads per run share one session while any of them
    /// holds it; another thread count gets its own, and so does an instance built after all
    /// the others were dropped.
    #[test]
    fn instances_of_a_model_share_one_cpu_session() {
        let Some(library) = std::env::var_os("IMGCLF_TEST_ORT_LIB") else {
            return;
        };
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/efficientnet-lite0");
        let spec = ModelSpec::load(model).expect("loads");
        let new = |threads| {
            OrtClassifier::new(
                spec.clone(),
                library.as_ref(),
                threads,
                &Providers::default(),
            )
            .expect("ONNX Runtime loads the model")
        };
        let (a, b, wide) = (new(1), new(1), new(2));
        assert!(Arc::ptr_eq(&a.session, &b.session), "one session");
        assert!(!Arc::ptr_eq(&a.session, &wide.session), "by threads");
        let held = Arc::downgrade(&a.session);
        drop((a, b));
        assert!(held.upgrade().is_none(), "nothing else holds it");
    }

    /// Where the process has cores of its own, a session over every core pins its own
    /// threads, one to each core after the first, and runs like the others.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_session_over_every_core_pins_its_threads_to_the_cores_after_the_first() {
        let (Some(library), Some(own)) = (
            std::env::var_os("IMGCLF_TEST_ORT_LIB"),
            crate::affinity::own_cores(),
        ) else {
            return;
        };
        /// Each thread of this process, and the cores it may run on.
        fn threads() -> Vec<(String, String)> {
            let tasks = std::fs::read_dir("/proc/self/task").expect("a task list");
            tasks
                .filter_map(|task| {
                    let task = task.ok()?;
                    let status = std::fs::read_to_string(task.path().join("status")).ok()?;
                    let cores = status
                        .lines()
                        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
                    Some((
                        task.file_name().to_string_lossy().into(),
                        cores.trim().into(),
                    ))
                })
                .collect()
        }
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/efficientnet-lite0");
        let spec = ModelSpec::load(model).expect("loads");
        let before = threads();
        let mut wide = OrtClassifier::over_every_core(spec.clone(), library.as_ref(), own.len())
            .expect("ONNX Runtime loads the model");
        let new: Vec<String> = (threads().into_iter())
            .filter(|thread| !before.iter().any(|(id, _)| *id == thread.0))
            .map(|(_, cores)| cores)
            .collect();
        for core in &own[1..] {
            assert!(
                new.contains(&core.to_string()),
                "a thread on core {core}: {new:?}"
            );
        }
        // Unpinned, at as many threads (no other test counts the holders of such a session).
        let mut unpinned = OrtClassifier::new(
            spec.clone(),
            library.as_ref(),
            own.len(),
            &Providers::default(),
        )
        .expect("ONNX Runtime loads the model");
        let image = vec![0.5; spec.transform.tensor_len()];
        let logits = wide.classify(&image, 1).unwrap();
        let expected = unpinned.classify(&image, 1).unwrap();
        for (a, b) in logits[0].iter().zip(&expected[0]) {
            assert!((a - b).abs() < 1e-3, "{a} against {b}");
        }
    }

    #[test]
    fn batches_are_padded_with_zero_images_to_the_largest_so_far() {
        let mut padding = Padding::default();
        assert_eq!(padding.pad(&[1.0, 2.0], 1), (&[1.0, 2.0][..], 1));
        assert_eq!(padding.pad(&[1.0; 6], 3), (&[1.0; 6][..], 3));
        assert_eq!(
            padding.pad(&[5.0, 6.0], 1),
            (&[5.0, 6.0, 0.0, 0.0, 0.0, 0.0][..], 3)
        );
        assert_eq!(padding.pad(&[7.0; 8], 4), (&[7.0; 8][..], 4));
        assert_eq!(padding.pad(&[8.0; 6], 3).1, 4);
    }
}
