//! The `imgclf` binary against a real server started in this process (the embedded pipeline
//! on local storage and SQLite in a temporary folder, so the tests can read its result store)
//! and with the library in-process, on the shared photos and the real model.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use imgclf::{Pipeline, Settings, TaskId, TaskState};
use imgclf_test_support::reference_images;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BINARY: &str = env!("CARGO_BIN_EXE_imgclf");

/// An imgclf server in this process.
struct Server {
    url: String,
    pipeline: Arc<Pipeline>,
    data: tempfile::TempDir,
}

/// Answers a request itself instead of the API (`None` passes it on): for faults.
type Intercept = Arc<dyn Fn(&Request) -> Option<Response> + Send + Sync>;

async fn start_server(api_keys: &[&str], intercept: Option<Intercept>) -> Server {
    let data = tempfile::tempdir().unwrap();
    let settings = Settings {
        data_dir: data.path().to_path_buf(),
        queue: Some("memory://".into()),
        webhook_attempts: 0,
        ..Settings::default()
    };
    let pipeline = Arc::new(settings.build_pipeline().await.expect("pipeline"));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(pipeline.worker().clone().run(stopped));
    // The worker runs for the rest of the test process.
    std::mem::forget(stop);
    let keys: Vec<String> = api_keys.iter().map(|k| k.to_string()).collect();
    let state = imgclf_http::AppState::embedded(&pipeline, 20 << 20).with_api_keys(&keys);
    let mut app = imgclf_http::router(state, Duration::from_secs(60));
    if let Some(intercept) = intercept {
        app = app.layer(middleware::from_fn(move |request: Request, next: Next| {
            let answer = intercept(&request);
            async move {
                match answer {
                    Some(response) => response,
                    None => next.run(request).await,
                }
            }
        }));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(imgclf_http::serve(
        listener,
        app,
        Duration::from_secs(10),
        std::future::pending(),
    ));
    Server {
        url: format!("http://{addr}"),
        pipeline,
        data,
    }
}

fn cli() -> Command {
    let mut command = Command::new(BINARY);
    for var in [
        "IMGCLF_SERVER",
        "IMGCLF_API_KEY",
        "IMGCLF_LOCAL",
        "IMGCLF_MODEL",
    ] {
        command.env_remove(var);
    }
    command.env("RUST_LOG", "warn").kill_on_drop(true);
    command
}

async fn run(command: &mut Command) -> Output {
    let output = tokio::time::timeout(Duration::from_secs(600), command.output())
        .await
        .expect("the CLI finishes")
        .expect("the CLI starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    output
}

fn records(output: &Output) -> Vec<Value> {
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Writes the shared photos into `dir`; returns file name -> reference top-1 label.
fn write_photos(dir: &Path, count: usize) -> BTreeMap<String, String> {
    std::fs::create_dir_all(dir).unwrap();
    reference_images()
        .into_iter()
        .take(count)
        .map(|(name, label, bytes)| {
            std::fs::write(dir.join(&name), bytes).unwrap();
            (name, label)
        })
        .collect()
}

fn file_name(record: &Value) -> String {
    let path = PathBuf::from(record["path"].as_str().unwrap());
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// Every record is a success whose top-1 label is the reference's.
fn assert_reference_labels(records: &[Value], expected: &BTreeMap<String, String>) {
    for record in records {
        let name = file_name(record);
        assert_eq!(record["state"], "SUCCESS", "{record}");
        assert_eq!(
            record["classification"][0]["label"].as_str(),
            Some(expected[&name].as_str()),
            "{record}"
        );
    }
}

fn content_key(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classifies_a_folder_on_a_server() {
    let server = start_server(&["test-key"], None).await;
    let work = tempfile::tempdir().unwrap();
    let photos = work.path().join("photos");
    let expected = write_photos(&photos, usize::MAX);
    // Not an image by its name, and hidden: a folder walk leaves both alone.
    std::fs::write(photos.join("notes.txt"), "not a photo").unwrap();
    std::fs::write(photos.join(".hidden.jpg"), "not a photo").unwrap();

    let output = run(cli()
        .args(["classify", "--format", "jsonl", "--server", &server.url])
        .arg(&photos)
        .env("IMGCLF_API_KEY", "test-key"))
    .await;
    assert!(output.status.success(), "{output:?}");
    let records = records(&output);
    assert_eq!(records.len(), expected.len(), "one record per photo");
    let names: Vec<_> = records.iter().map(file_name).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "records in a deterministic (name) order");
    assert_reference_labels(&records, &expected);
    for record in &records {
        assert_eq!(record["classification"].as_array().unwrap().len(), 5);
        assert!(record["error"].is_null(), "{record}");
    }

    // `status` prints the server's document for a task.
    let task_id = records[0]["task_id"].as_str().unwrap();
    let status = run(cli().args([
        "status",
        task_id,
        "--server",
        &server.url,
        "--api-key",
        "test-key",
    ]))
    .await;
    assert!(status.status.success(), "{status:?}");
    let document: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(document["task_id"], task_id);
    assert_eq!(document["state"], "SUCCESS");
    let unknown = run(cli().args([
        "status",
        &TaskId::new().to_string(),
        "--server",
        &server.url,
        "--api-key",
        "test-key",
    ]))
    .await;
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");

    // Again as CSV: the same tasks, answered from the server's records.
    let csv = run(cli()
        .args(["classify", "--format", "csv", "--top-k", "2"])
        .arg(&photos)
        .env("IMGCLF_SERVER", &server.url)
        .env("IMGCLF_API_KEY", "test-key"))
    .await;
    assert!(csv.status.success(), "{csv:?}");
    let text = String::from_utf8(csv.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("path,task_id,state,label,class_id,probability,top_k,error")
    );
    let rows: Vec<_> = lines.collect();
    assert_eq!(rows.len(), records.len());
    for (row, record) in rows.iter().zip(&records) {
        let task_id = record["task_id"].as_str().unwrap();
        assert!(row.contains(&format!(",{task_id},SUCCESS,")), "{row}");
    }

    // Without the key the run stops at once, saying why.
    let refused = run(cli()
        .args(["classify", "--server", &server.url])
        .arg(&photos))
    .await;
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("API key"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classifies_a_folder_in_process() {
    let work = tempfile::tempdir().unwrap();
    let photos = work.path().join("photos");
    let expected = write_photos(&photos, usize::MAX);
    let output = run(cli()
        .args(["classify", "--local", "--format", "jsonl"])
        .arg(&photos))
    .await;
    assert!(output.status.success(), "{output:?}");
    let records = records(&output);
    assert_eq!(records.len(), expected.len());
    assert_reference_labels(&records, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_half_way_resumes_without_classifying_twice() {
    let server = start_server(&[], None).await;
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("photos");
    // The same photos under four folders: the same content under other names.
    let mut expected = BTreeMap::new();
    for copy in ["a", "b", "c", "d"] {
        expected = write_photos(&root.join(copy), 8);
    }
    let files = 4 * expected.len();
    let command = || {
        let mut command = cli();
        command
            .args(["classify", "--format", "jsonl", "--concurrency", "2"])
            .args(["--server", &server.url])
            .arg(&root);
        command
    };

    let mut first = command().stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let mut printed = 0;
    while printed < 3 {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("records before the end");
        printed += 1;
        let record: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(record["state"], "SUCCESS", "{record}");
    }
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();
    while lines.next_line().await.unwrap().is_some() {
        printed += 1;
    }
    assert!(printed < files, "killed before the end ({printed} records)");

    let second = run(&mut command()).await;
    assert!(second.status.success(), "{second:?}");
    let records = records(&second);
    assert_eq!(records.len(), files, "every file is covered");
    assert_reference_labels(&records, &expected);

    // One task per distinct content, named by its key, classified once.
    let mut task_ids = BTreeSet::new();
    for name in expected.keys() {
        let bytes = std::fs::read(root.join("a").join(name)).unwrap();
        let id = TaskId::derived(&content_key(&bytes), &bytes);
        let record = server.pipeline.status(id).await.unwrap().expect("recorded");
        assert_eq!(record.state, TaskState::Success);
        assert_eq!(record.attempts, 1, "classified once: {name}");
        task_ids.insert(id.to_string());
    }
    let printed_ids: BTreeSet<_> = records
        .iter()
        .map(|r| r["task_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(printed_ids, task_ids);
    let stored = walk_files(&server.data.path().join("images"));
    assert_eq!(
        stored,
        expected.len(),
        "one stored image per distinct content"
    );
    let metrics = server.pipeline.submitter().render_metrics().await;
    let classified = metrics
        .lines()
        .find_map(|l| l.strip_prefix("image_task_success_total "))
        .expect("the success counter");
    assert_eq!(classified.trim(), expected.len().to_string());
}

fn walk_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk_files(&path)
            } else {
                1
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_files_are_reported_and_the_rest_classified() {
    let server = start_server(&[], None).await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("mixed");
    let expected = write_photos(&dir, 2);
    let jpeg = reference_images()
        .into_iter()
        .find(|(name, _, _)| name.ends_with(".jpg"))
        .unwrap()
        .2;
    std::fs::write(dir.join("notes.jpg"), "plain text, not a photo").unwrap();
    std::fs::write(dir.join("truncated.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    std::fs::write(dir.join("empty.png"), b"").unwrap();
    std::os::unix::fs::symlink(work.path().join("nowhere.jpg"), dir.join("dangling.jpg")).unwrap();
    let missing = work.path().join("missing.jpg");

    let problems = [
        ("notes.jpg", "415"),
        ("truncated.jpg", "422"),
        ("empty.png", "empty"),
        ("dangling.jpg", "symbolic link"),
        ("missing.jpg", "No such file"),
    ];
    for local in [false, true] {
        let mut command = cli();
        command
            .args(["classify", "--format", "jsonl", "--server", &server.url])
            .arg(&dir)
            .arg(&missing);
        if local {
            command.arg("--local");
        }
        let output = run(&mut command).await;
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let records = records(&output);
        assert_eq!(
            records.len(),
            expected.len() + problems.len(),
            "{records:?}"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        for (name, says) in problems {
            let record = records.iter().find(|r| file_name(r) == name).unwrap();
            assert_eq!(record["state"], "ERROR", "{record}");
            let error = record["error"].as_str().unwrap();
            // In-process there is no HTTP status, only the reason.
            let says = match (local, says) {
                (true, "415") => "unsupported image format",
                (true, "422") => "cannot be decoded",
                _ => says,
            };
            assert!(error.contains(says), "{name}: {error}");
            assert!(
                stderr
                    .lines()
                    .any(|l| l.contains(name) && l.contains(error)),
                "{name} is reported on stderr: {stderr}"
            );
        }
        let good: Vec<_> = records
            .iter()
            .filter(|r| expected.contains_key(&file_name(r)))
            .cloned()
            .collect();
        assert_eq!(good.len(), expected.len());
        assert_reference_labels(&good, &expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_answers_are_retried_after_the_advised_seconds() {
    // The first upload gets 429 and the first status request 503, each with Retry-After: 1.
    let seen: Arc<Mutex<Vec<(String, Instant, bool)>>> = Arc::default();
    let log = seen.clone();
    let intercept: Intercept = Arc::new(move |request: &Request| {
        let path = request.uri().path().to_string();
        let mut log = log.lock().unwrap();
        let first = !log.iter().any(|(p, _, _)| p == &path);
        let busy = first && (path.starts_with("/api/upload") || path.starts_with("/api/task"));
        log.push((path.clone(), Instant::now(), busy));
        busy.then(|| {
            let status = if path.starts_with("/api/upload") {
                axum::http::StatusCode::TOO_MANY_REQUESTS
            } else {
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            };
            let body = axum::Json(serde_json::json!({"detail": "busy, come back later"}));
            (status, [("retry-after", "1")], body).into_response()
        })
    });
    let server = start_server(&[], Some(intercept)).await;
    let work = tempfile::tempdir().unwrap();
    let expected = write_photos(work.path(), 1);
    let (name, _) = expected.iter().next().unwrap();
    let output = run(cli()
        .args(["classify", "--format", "jsonl", "--server", &server.url])
        .arg(work.path().join(name)))
    .await;
    assert!(output.status.success(), "{output:?}");
    assert_reference_labels(&records(&output), &expected);
    let seen = seen.lock().unwrap().clone();
    for prefix in ["/api/upload", "/api/task"] {
        let tries: Vec<_> = seen
            .iter()
            .filter(|(p, _, _)| p.starts_with(prefix))
            .collect();
        assert!(tries.len() >= 2 && tries[0].2, "{prefix}: {seen:?}");
        let waited = tries[1].1 - tries[0].1;
        assert!(
            waited >= Duration::from_secs(1),
            "{prefix}: retried after {waited:?}"
        );
        assert!(
            waited < Duration::from_secs(5),
            "{prefix}: retried after {waited:?}"
        );
    }

    // A server that stays busy is tried --attempts times, then the image is reported.
    let always: Intercept = Arc::new(|request: &Request| {
        request.uri().path().starts_with("/api/upload").then(|| {
            let body = axum::Json(serde_json::json!({"detail": "still busy"}));
            let status = axum::http::StatusCode::TOO_MANY_REQUESTS;
            (status, [("retry-after", "1")], body).into_response()
        })
    });
    let busy = start_server(&[], Some(always)).await;
    let started = Instant::now();
    let output = run(cli()
        .args(["classify", "--format", "jsonl", "--attempts", "2"])
        .args(["--server", &busy.url])
        .arg(work.path().join(name)))
    .await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let records = records(&output);
    let error = records[0]["error"].as_str().unwrap();
    assert!(error.contains("gave up after 2 attempts"), "{error}");
    assert!(error.contains("still busy"), "{error}");
}

/// A server that times out receiving an upload is tried once more, not --attempts times: a
/// link too slow for its request timeout would send the whole file again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_times_out_twice_is_not_sent_again() {
    let uploads = Arc::new(Mutex::new(0_u32));
    let counted = uploads.clone();
    let timeout: Intercept = Arc::new(move |request: &Request| {
        request.uri().path().starts_with("/api/upload").then(|| {
            *counted.lock().unwrap() += 1;
            let body = axum::Json(serde_json::json!({"detail": "request timed out"}));
            (axum::http::StatusCode::REQUEST_TIMEOUT, body).into_response()
        })
    });
    let server = start_server(&[], Some(timeout)).await;
    let work = tempfile::tempdir().unwrap();
    let expected = write_photos(work.path(), 1);
    let (name, _) = expected.iter().next().unwrap();
    let output = run(cli()
        .args(["classify", "--format", "jsonl", "--attempts", "5"])
        .args(["--server", &server.url])
        .arg(work.path().join(name)))
    .await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(*uploads.lock().unwrap(), 2);
    let records = records(&output);
    let error = records[0]["error"].as_str().unwrap();
    assert!(error.contains("timed out twice"), "{error}");
    assert!(error.contains("IMGCLF_REQUEST_TIMEOUT"), "{error}");
}

/// Yes/no settings take the usual words in the environment, and waits beyond their range are
/// refused by name instead of overflowing a clock.
#[tokio::test]
async fn settings_take_the_usual_boolean_words_and_refuse_waits_out_of_range() {
    let empty = tempfile::tempdir().unwrap();
    let output = run(cli()
        .arg("classify")
        .arg(empty.path())
        .env("IMGCLF_NO_PROGRESS", "1")
        .env("IMGCLF_ALL_FILES", "yes")
        .env("IMGCLF_RETRY_FAILED", "on")
        .env("IMGCLF_LOCAL", "0"))
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no images in the given paths"), "{stderr}");

    let task = TaskId::new().to_string();
    for (flag, value) in [
        ("--wait", "inf"),
        ("--wait", "31"),
        ("--wait", "-1"),
        ("--timeout", "18446744073709551615"),
        ("--timeout", "0"),
    ] {
        let mut command = cli();
        match flag {
            "--wait" => command.args(["status", &task, "--server", "http://127.0.0.1:9"]),
            _ => command.arg("classify").arg(empty.path()),
        };
        let output = run(command.arg(format!("{flag}={value}"))).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}

/// A file name with control characters is sent with them replaced (the server refuses them in
/// a name); a server address without imgclf's routes stops the run at its first upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_file_names_are_classified_and_a_wrong_prefix_stops_the_run() {
    let server = start_server(&[], None).await;
    let work = tempfile::tempdir().unwrap();
    let (_, label, bytes) = reference_images().into_iter().next().unwrap();
    let odd = work.path().join("a\tb\nc.jpg");
    std::fs::write(&odd, &bytes).unwrap();
    let output = run(cli()
        .args(["classify", "--format", "jsonl", "--server", &server.url])
        .arg(&odd))
    .await;
    assert!(output.status.success(), "{output:?}");
    let record = &records(&output)[0];
    assert_eq!(
        record["classification"][0]["label"].as_str(),
        Some(label.as_str()),
        "{record}"
    );
    let task_id = record["task_id"]
        .as_str()
        .unwrap()
        .parse::<TaskId>()
        .unwrap();
    let stored = server
        .pipeline
        .submitter()
        .status(task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.metadata["filename"], "a_b_c.jpg", "{stored:?}");

    let output = run(cli()
        .args(["classify", "--format", "jsonl"])
        .args(["--server", &format!("{}/not-imgclf/", server.url)])
        .arg(&odd))
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is --server right?"), "{stderr}");
}

/// `--retry-failed` submits an image whose task failed once more, as a new task, and a rerun
/// follows the same chain of tasks instead of making new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_images_are_retried_on_request_and_only_once() {
    // The first task asked about has failed, as far as the client can tell.
    let failed: Arc<Mutex<Option<String>>> = Arc::default();
    let first = failed.clone();
    let intercept: Intercept = Arc::new(move |request: &Request| {
        let id = request
            .uri()
            .path()
            .strip_prefix("/api/task-status/")?
            .to_string();
        let mut first = first.lock().unwrap();
        if first.get_or_insert_with(|| id.clone()) != &id {
            return None;
        }
        let body = serde_json::json!({"task_id": id, "state": "FAILURE", "error": "gave up after 3 attempts"});
        Some(axum::Json(body).into_response())
    });
    let server = start_server(&[], Some(intercept)).await;
    let work = tempfile::tempdir().unwrap();
    let expected = write_photos(work.path(), 1);
    let classify = |retry: bool| {
        let mut command = cli();
        command
            .args(["classify", "--format", "jsonl", "--server", &server.url])
            .arg(work.path());
        if retry {
            command.arg("--retry-failed");
        }
        command
    };
    let output = run(&mut classify(false)).await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let record = &records(&output)[0];
    assert_eq!(record["state"], "FAILURE", "{record}");
    let failed_id = failed.lock().unwrap().clone().unwrap();
    assert_eq!(record["task_id"].as_str(), Some(failed_id.as_str()));

    for rerun in 0..2 {
        let output = run(&mut classify(true)).await;
        assert!(output.status.success(), "rerun {rerun}: {output:?}");
        let records = records(&output);
        assert_reference_labels(&records, &expected);
        assert_ne!(records[0]["task_id"].as_str(), Some(failed_id.as_str()));
        let stored = walk_files(&server.data.path().join("images"));
        assert_eq!(
            stored, 2,
            "rerun {rerun}: the failed task's image and its retry's"
        );
    }
}

/// A file over the server's upload limit (but under the client's) is that file's error, the
/// server's 413, over a real socket: not a connection error retried until the run gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_over_the_server_s_limit_is_reported_and_the_run_goes_on() {
    let server = start_server(&[], None).await;
    let work = tempfile::tempdir().unwrap();
    let expected = write_photos(work.path(), 1);
    // A JPEG's first bytes, then 24 MiB: over the server's 20 MiB.
    let mut big = vec![0xFF, 0xD8, 0xFF, 0xE0];
    big.resize(24 << 20, 0);
    std::fs::write(work.path().join("huge.jpg"), &big).unwrap();
    let started = Instant::now();
    let output = run(cli()
        .args(["classify", "--format", "jsonl", "--server", &server.url])
        .arg(work.path()))
    .await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let records = records(&output);
    let huge = records.iter().find(|r| file_name(r) == "huge.jpg").unwrap();
    let error = huge["error"].as_str().unwrap();
    assert!(error.contains("413"), "{error}");
    let good: Vec<_> = records
        .iter()
        .filter(|r| file_name(r) != "huge.jpg")
        .cloned()
        .collect();
    assert_reference_labels(&good, &expected);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "not retried for minutes"
    );
}
