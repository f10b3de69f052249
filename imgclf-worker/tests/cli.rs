//! Every setting is a flag and an environment variable, and `--help` says which.

use std::process::Command;

#[test]
fn help_names_every_environment_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_imgclf-worker"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for var in [
        "IMGCLF_DATA_DIR",
        "IMGCLF_STORAGE",
        "IMGCLF_QUEUE",
        "IMGCLF_QUEUE_NAME",
        "IMGCLF_QUEUE_LEASE",
        "IMGCLF_RESULTS",
        "IMGCLF_CLASSIFIER",
        "IMGCLF_MODEL",
        "IMGCLF_MAX_BATCH",
        "IMGCLF_MAX_PIXELS",
        "IMGCLF_TOP_K",
        "IMGCLF_MAX_ATTEMPTS",
        "IMGCLF_PREPROCESS_THREADS",
        "IMGCLF_S3_ENDPOINT",
        "IMGCLF_S3_ACCESS_KEY",
        "IMGCLF_S3_SECRET_KEY",
        "IMGCLF_S3_REGION",
        "IMGCLF_S3_PATH_STYLE",
        "IMGCLF_WEBHOOK_TIMEOUT",
        "IMGCLF_WEBHOOK_ATTEMPTS",
        "IMGCLF_WEBHOOK_SECRET",
        "IMGCLF_WEBHOOK_ALLOW",
        "IMGCLF_MAX_QUEUE_DEPTH",
        "IMGCLF_ORT_LIB",
        "IMGCLF_INTRA_THREADS",
    ] {
        assert!(help.contains(var), "--help does not mention {var}");
    }
}

#[test]
fn a_bad_backend_url_is_a_clear_error_not_a_panic() {
    let output = Command::new(env!("CARGO_BIN_EXE_imgclf-worker"))
        .env("IMGCLF_QUEUE", "kafka://localhost:9092")
        .env(
            "IMGCLF_DATA_DIR",
            std::env::temp_dir().join("imgclf-cli-test"),
        )
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unsupported URL"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
