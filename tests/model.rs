//! The real models on the real images, against the reference results of an independent
//! implementation (Pillow + onnxruntime).

use imgclf::classifier::{Classifier, ClassifierHandle, TractClassifier};
use imgclf::ModelSpec;
use imgclf_suite::{default_model_dir, image, reference, resnet18_dir};

/// Preprocesses every reference image and classifies them in batches of `batch`.
fn classify_all(classifier: &mut dyn Classifier, names: &[&String], batch: usize) -> Vec<Vec<f32>> {
    let transform = classifier.spec().transform.clone();
    let mut logits = Vec::new();
    for chunk in names.chunks(batch) {
        let mut tensor = Vec::new();
        for name in chunk {
            tensor.extend(
                transform
                    .tensor_from_bytes(&image(name), 50_000_000)
                    .expect("decodes"),
            );
        }
        logits.extend(
            classifier
                .classify(&tensor, chunk.len())
                .expect("classifies"),
        );
    }
    logits
}

/// The largest difference between two vectors of logits.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

#[test]
fn efficientnet_lite0_agrees_with_the_reference_on_every_image() {
    let spec = ModelSpec::load(default_model_dir()).expect("the shipped model loads");
    let mut classifier = TractClassifier::new(spec.clone()).expect("tract compiles it");
    let expected = reference("efficientnet-lite0");
    assert!(
        expected.len() >= 20,
        "the reference covers the shared images"
    );
    let names: Vec<&String> = expected.keys().collect();
    let logits = classify_all(&mut classifier, &names, 4);
    let mut worst = 0.0f32;
    for (name, logits) in names.iter().zip(&logits) {
        let reference = &expected[*name];
        let top = spec.top_k(logits, 5);
        assert_eq!(
            top[0].class_id, reference[0].class_id,
            "{name}: top-1 is {:?}, the reference says {:?}",
            top[0].label, reference[0].label
        );
        assert_eq!(
            top[0].label, reference[0].label,
            "{name}: labels come from the class list"
        );
        let probabilities = softmax(logits);
        // The contract is 0.01; preprocessing is bit-exact with Pillow, so hold it to far less.
        for r in reference {
            let diff = (probabilities[r.class_id] - r.probability).abs();
            worst = worst.max(diff);
            assert!(
                diff < 1e-3,
                "{name}: {} has {} here, {} in the reference",
                r.label,
                probabilities[r.class_id],
                r.probability
            );
        }
    }
    eprintln!("largest top-5 probability difference from the reference: {worst:.5}");
}

#[test]
fn resnet18_graph_gives_the_reference_top5() {
    let spec = ModelSpec::load(resnet18_dir()).expect("a model directory without manifest loads");
    let mut classifier = TractClassifier::new(spec.clone()).expect("tract compiles ResNet18");
    let expected = reference("resnet18-random-init");
    let names: Vec<&String> = expected.keys().collect();
    let logits = classify_all(&mut classifier, &names, 8);
    for (name, logits) in names.iter().zip(&logits) {
        let ids: Vec<usize> = spec.top_k(logits, 5).iter().map(|p| p.class_id).collect();
        let reference: Vec<usize> = expected[*name].iter().map(|p| p.class_id).collect();
        assert_eq!(ids, reference, "{name}: top-5 classes");
    }
}

/// ONNX Runtime runs a batch as one tensor, so its rows can really differ from single-image
/// runs; tract runs a batch image by image, so there only the order of the rows is at stake.
/// Both must give every image its own logits, in order.
#[test]
fn a_batch_gives_each_image_its_own_logits() {
    let spec = ModelSpec::load(default_model_dir()).expect("loads");
    let expected = reference("efficientnet-lite0");
    let names: Vec<&String> = expected.keys().take(4).collect();
    let mut classifiers: Vec<(&str, Box<dyn Classifier>)> = vec![(
        "tract",
        Box::new(TractClassifier::new(spec.clone()).expect("compiles")),
    )];
    if let Some(ort) = ort(spec) {
        classifiers.push(("ort", ort));
    }
    for (backend, mut classifier) in classifiers {
        let batched = classify_all(classifier.as_mut(), &names, names.len());
        let single = classify_all(classifier.as_mut(), &names, 1);
        for (i, b) in batched.iter().enumerate() {
            let diff = max_diff(b, &single[i]);
            assert!(
                diff < 1e-4,
                "{backend}: row {i} differs by {diff} from its own image"
            );
            for (j, other) in single.iter().enumerate().filter(|(j, _)| *j != i) {
                assert!(
                    max_diff(b, other) > 0.1,
                    "{backend}: row {i} looks like image {j}'s logits"
                );
            }
        }
    }
}

/// The ort backend on ONNX Runtime's library from `IMGCLF_TEST_ORT_LIB`.
fn ort(spec: ModelSpec) -> Option<Box<dyn Classifier>> {
    let library = imgclf_suite::service_url("IMGCLF_TEST_ORT_LIB")?;
    let options = imgclf::classifier::ClassifierOptions {
        intra_threads: 1,
        ort_library: Some(library.into()),
        ..imgclf::classifier::ClassifierOptions::default()
    };
    Some(imgclf::classifier::build("ort", spec, &options).expect("ONNX Runtime loads the model"))
}

/// Instances of a model on the CPU share one ONNX Runtime session. Three of them, each on its
/// own thread with its own batch size, running at once, give every batch the logits it gets
/// when run alone.
#[test]
fn instances_sharing_a_session_run_at_once_and_agree_with_one_alone() {
    let spec = ModelSpec::load(default_model_dir()).expect("loads");
    let Some(mut alone) = ort(spec.clone()) else {
        return;
    };
    let expected = reference("efficientnet-lite0");
    let names: Vec<&String> = expected.keys().collect();
    let batches = [1, 2, 3];
    let serial: Vec<Vec<Vec<f32>>> = batches
        .iter()
        .map(|&batch| classify_all(alone.as_mut(), &names, batch))
        .collect();
    std::thread::scope(|threads| {
        for (batch, serial) in batches.iter().zip(&serial) {
            let (spec, names) = (spec.clone(), &names);
            threads.spawn(move || {
                let mut instance = ort(spec).expect("loads");
                for round in 0..3 {
                    let logits = classify_all(instance.as_mut(), names, *batch);
                    for ((name, at_once), alone) in names.iter().zip(&logits).zip(serial) {
                        let diff = max_diff(at_once, alone);
                        assert!(diff < 1e-5, "{name}, batch {batch}, round {round}: {diff}");
                    }
                }
            });
        }
    });
}

#[test]
fn ort_agrees_with_the_reference_on_every_image() {
    let spec = ModelSpec::load(default_model_dir()).expect("loads");
    let Some(mut classifier) = ort(spec.clone()) else {
        return;
    };
    let expected = reference("efficientnet-lite0");
    let names: Vec<&String> = expected.keys().collect();
    let logits = classify_all(classifier.as_mut(), &names, 4);
    for (name, logits) in names.iter().zip(&logits) {
        let reference = &expected[*name];
        assert_eq!(
            spec.top_k(logits, 1)[0].class_id,
            reference[0].class_id,
            "{name}: top-1"
        );
        let probabilities = softmax(logits);
        for r in reference {
            let diff = (probabilities[r.class_id] - r.probability).abs();
            assert!(diff < 1e-3, "{name}: {} differs by {diff}", r.label);
        }
    }
}

#[test]
fn ort_and_tract_give_the_same_logits_on_both_models() {
    let expected = reference("efficientnet-lite0");
    let names: Vec<&String> = expected.keys().collect();
    for dir in [default_model_dir(), resnet18_dir()] {
        let spec = ModelSpec::load(&dir).expect("loads");
        let Some(mut ort) = ort(spec.clone()) else {
            return;
        };
        let mut tract = TractClassifier::new(spec).expect("compiles");
        let a = classify_all(ort.as_mut(), &names, 8);
        let b = classify_all(&mut tract, &names, 8);
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| max_diff(x, y))
            .fold(0.0, f32::max);
        eprintln!(
            "{}: largest logit difference ort vs tract {worst:e}",
            dir.display()
        );
        assert!(worst < 1e-4, "{}: logits differ by {worst}", dir.display());
    }
}

#[test]
fn ort_without_a_library_is_a_clear_error() {
    if std::env::var_os("ORT_DYLIB_PATH").is_some() {
        return; // the fallback would find a library
    }
    let spec = ModelSpec::load(default_model_dir()).expect("loads");
    let options = imgclf::classifier::ClassifierOptions {
        intra_threads: 1,
        ort_library: None,
        ..imgclf::classifier::ClassifierOptions::default()
    };
    let error = imgclf::classifier::build("ort", spec, &options)
        .err()
        .expect("no library, no classifier");
    assert!(error.to_string().contains("IMGCLF_ORT_LIB"), "{error}");
    let spec = ModelSpec::load(default_model_dir()).expect("loads");
    let unknown = imgclf::classifier::build("tensorflow", spec, &options)
        .err()
        .expect("unknown backend");
    assert!(
        unknown.to_string().contains("tract"),
        "names what this build has: {unknown}"
    );
}

/// Two instances of the model on two threads (what IMGCLF_INFERENCE_THREADS gives tract): every
/// image gets the logits one model gives it, whichever thread ran it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_models_answers_as_one_model_does() {
    let spec = ModelSpec::load(default_model_dir()).expect("the shipped model loads");
    let mut single = TractClassifier::new(spec.clone()).expect("tract compiles it");
    let expected = reference("efficientnet-lite0");
    let names: Vec<&String> = expected.keys().collect();
    let alone = classify_all(&mut single, &names, 1);

    let instances: Vec<Box<dyn Classifier>> = (0..2)
        .map(|_| {
            Box::new(TractClassifier::new(spec.clone()).expect("tract")) as Box<dyn Classifier>
        })
        .collect();
    let pool = ClassifierHandle::spawn_pool(instances, 4);
    let answers: Vec<_> = names
        .iter()
        .map(|name| {
            let tensor = spec
                .transform
                .tensor_from_bytes(&image(name), 50_000_000)
                .expect("decodes");
            let pool = pool.clone();
            tokio::spawn(async move { pool.logits(tensor).await })
        })
        .collect();
    for ((name, answer), alone) in names.iter().zip(answers).zip(&alone) {
        let logits = answer.await.unwrap().expect("classified");
        let diff = max_diff(&logits, alone);
        assert!(diff < 1e-5, "{name}: logits differ by {diff}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !pool.is_ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "ready once both instances warmed up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Tuned ort on several cores keeps one more instance, on all of them, for an image that finds
/// the others idle: images sent one at a time get the logits a single-threaded instance gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_images_on_the_instance_over_every_core_get_the_same_logits() {
    let Some(library) = imgclf_suite::service_url("IMGCLF_TEST_ORT_LIB") else {
        return;
    };
    let spec = ModelSpec::load(default_model_dir()).expect("loads");
    let mut single = ort(spec.clone()).expect("the library is there");
    let expected = reference("efficientnet-lite0");
    let names: Vec<&String> = expected.keys().collect();
    let alone = classify_all(single.as_mut(), &names, 1);
    let options = imgclf::classifier::ClassifierOptions {
        ort_library: Some(library.into()),
        ..Default::default()
    };
    let handle = imgclf::classifier::spawn("ort", spec, &options, None).expect("spawns");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(handle.spreads_lone_images(), cores > 1, "on {cores} cores");
    for (name, alone) in names.iter().zip(&alone) {
        let classified = handle
            .classify_image(image(name).into(), 50_000_000)
            .await
            .expect("classified");
        let diff = max_diff(&classified.logits, alone);
        assert!(diff < 1e-4, "{name}: logits differ by {diff}");
    }
    let fixed = imgclf::classifier::ClassifierOptions {
        instances: Some(cores),
        ..options
    };
    let spec = ModelSpec::load(default_model_dir()).expect("loads");
    let handle = imgclf::classifier::spawn("ort", spec, &fixed, Some(1)).expect("spawns");
    assert!(
        !handle.spreads_lone_images(),
        "a set instance count is all there is"
    );
}

/// `auto` picks ONNX Runtime when its library is there (here the one `IMGCLF_TEST_ORT_LIB`
/// names, as `IMGCLF_ORT_LIB` would), and the model it runs answers like the reference.
#[test]
fn auto_runs_onnx_runtime_when_its_library_is_found() {
    let Some(library) = imgclf_suite::service_url("IMGCLF_TEST_ORT_LIB") else {
        return;
    };
    let found = imgclf::classifier::find_ort_library(Some(library.as_ref()));
    assert_eq!(found.as_deref(), Some(std::path::Path::new(&library)));
    let spec = ModelSpec::load(default_model_dir()).expect("loads");
    let options = imgclf::classifier::ClassifierOptions {
        ort_library: found,
        ..Default::default()
    };
    let handle = imgclf::classifier::spawn("auto", spec, &options, Some(2)).expect("spawns");
    assert_eq!(handle.backend(), "ort");
}

/// GPU providers asked of the CPU-only library (`IMGCLF_TEST_ORT_LIB`, the `onnxruntime`
/// wheel's): the classifier still builds, runs on CPU, and answers as the reference does, with
/// the very logits of a CPU-only session.
#[test]
fn ort_falls_back_to_cpu_when_gpu_providers_are_missing() {
    let Some(library) = imgclf_suite::service_url("IMGCLF_TEST_ORT_LIB") else {
        return;
    };
    let spec = ModelSpec::load(default_model_dir()).expect("loads");
    let build = |providers: &str| {
        let options = imgclf::classifier::ClassifierOptions {
            intra_threads: 1,
            ort_library: Some(library.clone().into()),
            providers: providers.parse().expect("valid providers"),
            ..imgclf::classifier::ClassifierOptions::default()
        };
        imgclf::classifier::build("ort", spec.clone(), &options)
    };
    let mut gpu = build("tensorrt,cuda").expect("falls back to CPU instead of failing");
    let mut cpu = build("cpu").expect("builds");
    let expected = reference("efficientnet-lite0");
    let names: Vec<&String> = expected.keys().take(3).collect();
    let fallback = classify_all(gpu.as_mut(), &names, 3);
    let plain = classify_all(cpu.as_mut(), &names, 3);
    for ((name, logits), cpu_logits) in names.iter().zip(&fallback).zip(&plain) {
        assert_eq!(
            spec.top_k(logits, 1)[0].class_id,
            expected[*name][0].class_id,
            "{name}: top-1 on the fallback"
        );
        let diff = max_diff(logits, cpu_logits);
        assert!(
            diff < 1e-5,
            "{name}: the fallback differs from CPU by {diff}"
        );
    }
}

/// With `IMGCLF_INFERENCE_THREADS` unset, the instances come from timing this machine: both
/// timings work on the real model, and the count stays between 1 and the cores.
#[test]
fn instances_are_measured_when_unset() {
    use imgclf::classifier::tuning;
    use std::time::Duration;
    let spec = ModelSpec::load(resnet18_dir()).expect("loads");
    let preprocess = tuning::time_preprocessing(&spec).expect("the sample photo preprocesses");
    assert!(
        preprocess > Duration::from_micros(100) && preprocess < Duration::from_secs(5),
        "a 2 MP photo in {preprocess:?}"
    );
    let mut tract = TractClassifier::new(spec.clone()).expect("compiles");
    let inference = tuning::time_inference(&mut tract, 2).expect("runs");
    assert!(inference > Duration::ZERO);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let options = imgclf::classifier::ClassifierOptions::default();
    let handle =
        imgclf::classifier::spawn("tract", spec.clone(), &options, Some(2)).expect("spawns");
    assert!(
        (1..=cores).contains(&handle.instances()),
        "{} instances on {cores} cores",
        handle.instances()
    );
    let fixed = imgclf::classifier::ClassifierOptions {
        instances: Some(3),
        ..Default::default()
    };
    let handle = imgclf::classifier::spawn("tract", spec, &fixed, Some(2)).expect("spawns");
    assert_eq!(handle.instances(), 3, "the setting wins");
}
