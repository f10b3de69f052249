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
        "IMGCLF_METRICS_ADDR",
        "IMGCLF_INFERENCE_THREADS",
        "IMGCLF_REQUEUE_AFTER",
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

#[test]
fn without_a_shared_queue_the_worker_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_imgclf-worker"))
        .env("IMGCLF_DATA_DIR", dir.path().join("data"))
        .env_remove("IMGCLF_QUEUE")
        .output()
        .unwrap();
    assert!(!output.status.success(), "it would wait forever");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("a worker needs a shared queue"), "{stderr}");
}

#[test]
fn metrics_are_served_on_the_address_given() {
    let dir = std::env::temp_dir().join(format!("imgclf-worker-metrics-{}", std::process::id()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Some(queue) = imgclf_test_support::service_url("IMGCLF_TEST_REDIS") else {
        return;
    };
    let mut worker = Command::new(env!("CARGO_BIN_EXE_imgclf-worker"))
        .env("IMGCLF_DATA_DIR", &dir)
        .env("IMGCLF_QUEUE", queue)
        .env(
            "IMGCLF_QUEUE_NAME",
            imgclf_test_support::unique_name("imgclf-metrics"),
        )
        .env("IMGCLF_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let page = loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .unwrap();
            let mut page = String::new();
            stream.read_to_string(&mut page).unwrap();
            break page;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no metrics on port {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    worker.kill().unwrap();
    worker.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(page.starts_with("HTTP/1.0 200"), "{page}");
    for metric in [
        "image_batch_size",
        "image_queue_depth 0",
        "image_task_success_total 0",
    ] {
        assert!(page.contains(metric), "{metric} missing from:\n{page}");
    }
}

/// Every setting that can hold a credential, with a value that must never be shown.
const SECRETS: &[(&str, &str)] = &[
    ("IMGCLF_QUEUE", "amqp://guest:s3cret-1@rabbit:5672/"),
    ("IMGCLF_RESULTS", "postgres://app:s3cret-2@db/imgclf"),
    ("IMGCLF_S3_ACCESS_KEY", "s3cret-3"),
    ("IMGCLF_S3_SECRET_KEY", "s3cret-4"),
    ("IMGCLF_WEBHOOK_SECRET", "s3cret-5"),
];

#[test]
fn help_never_shows_a_secret_value() {
    let output = Command::new(env!("CARGO_BIN_EXE_imgclf-worker"))
        .arg("--help")
        .envs(SECRETS.iter().copied())
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    assert!(!help.contains("s3cret"), "{help}");
    assert!(
        help.contains("IMGCLF_QUEUE_FILE"),
        "--help names the _FILE form"
    );
}

#[test]
fn secrets_come_from_files_and_errors_hide_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("queue-url");
    std::fs::write(&file, "kafka://user:s3cret@localhost:9092\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_imgclf-worker"))
        .env("IMGCLF_QUEUE_FILE", &file)
        .env("IMGCLF_DATA_DIR", dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unsupported URL") && stderr.contains("kafka://user:***@localhost"),
        "the URL was read from the file, its password hidden: {stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_imgclf-worker"))
        .env("IMGCLF_WEBHOOK_SECRET_FILE", dir.path().join("missing"))
        .env("IMGCLF_DATA_DIR", dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("IMGCLF_WEBHOOK_SECRET_FILE"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Answers one `GET /health` with `status`, on a port of its own; returns the address.
fn health_server(status: &'static str) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let mut request = [0u8; 512];
            let _ = stream.read(&mut request);
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    addr
}

#[test]
fn healthcheck_exits_0_for_a_live_worker_and_1_otherwise() {
    let run = |metrics_addr: Option<String>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_imgclf-worker"));
        command.arg("healthcheck").env_remove("IMGCLF_METRICS_ADDR");
        if let Some(addr) = metrics_addr {
            command.env("IMGCLF_METRICS_ADDR", addr);
        }
        command.output().unwrap()
    };
    let live = run(Some(health_server("200 OK").to_string()));
    assert_eq!(live.status.code(), Some(0), "{live:?}");
    let failing = run(Some(health_server("503 Service Unavailable").to_string()));
    assert_eq!(failing.status.code(), Some(1), "{failing:?}");
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dead = run(Some(dead_port.to_string()));
    assert_eq!(dead.status.code(), Some(1), "{dead:?}");
    let unset = run(None);
    assert_eq!(unset.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unset.stderr).contains("IMGCLF_METRICS_ADDR"));
}
