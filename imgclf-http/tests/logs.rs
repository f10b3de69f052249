//! JSON logs: with `IMGCLF_LOG_FORMAT=json` every line the binaries write is one JSON object,
//! and the `x-request-id` of an upload is on the access-log line of the upload and on the
//! worker's lines for its task: in the embedded process, and across `imgclf-http` and an
//! `imgclf-worker` over RabbitMQ, PostgreSQL and S3.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Starts `binary` with JSON logs written to `log`.
fn spawn_logging(binary: &Path, env: &[(String, String)], work: &Path, log: &Path) -> Child {
    let mut command = Command::new(binary);
    command
        .current_dir(work)
        .env("RUST_LOG", "info")
        .env("IMGCLF_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (key, value) in env {
        command.env(key, value);
    }
    command.spawn().unwrap()
}

/// Every line of `log`, each parsed as JSON (a line that is not JSON fails the test).
fn json_lines(log: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "{} is empty", log.display());
    lines
}

/// Whether `value` holds `"request_id": id` anywhere (in the event or one of its spans).
fn carries(value: &Value, id: &str) -> bool {
    match value {
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| (k == "request_id" && v == id) || carries(v, id)),
        Value::Array(items) => items.iter().any(|v| carries(v, id)),
        _ => false,
    }
}

/// Uploads a photo under request id `id`, checks the id comes back, waits for the result.
async fn upload_traced(base: &str, id: &str) {
    let client = reqwest::Client::new();
    wait_ready(&client, base).await;
    let (name, _, bytes) = &reference_images()[0];
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.clone()),
    );
    let response = client
        .post(format!("{base}/api/upload-image"))
        .header("x-request-id", id)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["x-request-id"], id, "the id comes back");
    let task: Value = response.json().await.unwrap();
    let task_id = task["task_id"].as_str().unwrap();
    let status: Value = client
        .get(format!("{base}/api/task-status/{task_id}?wait=30"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["state"], "SUCCESS", "{status}");

    // A request without an id (or with one that is not a plain token) is given a fresh one.
    for given in [None, Some("two words")] {
        let mut request = client.get(format!("{base}/health"));
        if let Some(given) = given {
            request = request.header("x-request-id", given);
        }
        let response = request.send().await.unwrap();
        let made = response.headers()["x-request-id"].to_str().unwrap();
        assert!(made.parse::<uuid::Uuid>().is_ok(), "{made}");
    }
}

/// The access-log line of the upload and the worker's line for its task.
fn assert_traced(http: &[Value], worker: &[Value], id: &str) {
    let access = http
        .iter()
        .find(|l| carries(l, id) && l["status"] == 202)
        .unwrap_or_else(|| panic!("no access-log line with status 202 carries {id}"));
    assert_eq!(
        access["level"], "INFO",
        "the access log is at INFO: {access}"
    );
    assert!(
        worker
            .iter()
            .any(|l| carries(l, id) && l["message"] == "task finished"),
        "no worker line for the task carries {id}"
    );
}

#[tokio::test]
async fn the_embedded_process_logs_json_with_the_request_id_from_upload_to_result() {
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = work.path().join("http.log");
    let env = vec![
        ("IMGCLF_ADDR".to_string(), format!("127.0.0.1:{port}")),
        (
            "IMGCLF_DATA_DIR".to_string(),
            work.path().join("data").display().to_string(),
        ),
    ];
    let mut http = Process(spawn_logging(&http_binary(), &env, work.path(), &log));
    upload_traced(&format!("http://127.0.0.1:{port}"), "embedded-req-42").await;
    http.signal("-TERM");
    assert!(http.exits_cleanly(Duration::from_secs(20)).await);
    let lines = json_lines(&log);
    assert_traced(&lines, &lines, "embedded-req-42");
}

#[tokio::test]
async fn the_request_id_travels_with_the_job_to_a_worker_process() {
    let Some(amqp) = imgclf_test_support::service_url("IMGCLF_TEST_AMQP") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let Some((env, _)) = distributed_env(amqp, port, work.path()).await else {
        return;
    };
    let (http_log, worker_log) = (work.path().join("http.log"), work.path().join("worker.log"));
    let mut http = Process(spawn_logging(&http_binary(), &env, work.path(), &http_log));
    let mut worker = Process(spawn_logging(
        &worker_binary(),
        &env,
        work.path(),
        &worker_log,
    ));
    upload_traced(&format!("http://127.0.0.1:{port}"), "distributed-req-7").await;
    for process in [&mut http, &mut worker] {
        process.signal("-TERM");
        assert!(process.exits_cleanly(Duration::from_secs(20)).await);
    }
    assert_traced(
        &json_lines(&http_log),
        &json_lines(&worker_log),
        "distributed-req-7",
    );
}
