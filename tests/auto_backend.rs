//! `IMGCLF_CLASSIFIER=auto` without a usable ONNX Runtime runs tract. In a test binary of its
//! own: a failed load of ONNX Runtime stays failed for the whole process.

use imgclf::classifier::{spawn, ClassifierOptions};
use imgclf::ModelSpec;
use imgclf_suite::default_model_dir;

#[test]
fn auto_falls_back_to_tract_when_onnx_runtime_does_not_load() {
    let spec = ModelSpec::load(default_model_dir()).expect("loads");
    let dir = tempfile::tempdir().unwrap();
    // A file by the right name that is no library.
    let fake = dir.path().join("libonnxruntime.so.1.32.0");
    std::fs::write(&fake, b"not an ELF file").unwrap();
    let options = ClassifierOptions {
        ort_library: Some(fake),
        instances: Some(1),
        ..ClassifierOptions::default()
    };
    let handle = spawn("auto", spec.clone(), &options, Some(2)).expect("falls back");
    assert_eq!(handle.backend(), "tract");
    // Asked for by name, the broken library is an error, not a silent fallback.
    assert!(spawn("ort", spec, &options, Some(2)).is_err());
}
