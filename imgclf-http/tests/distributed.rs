//! The distributed deployment end to end: one `imgclf-http` and two `imgclf-worker` processes
//! sharing an S3 server, PostgreSQL and a broker (RabbitMQ, then Redis). 300 real photos go in
//! while workers are killed with SIGKILL three times; every task must reach SUCCESS with the
//! reference label, its result written exactly once; then SIGTERM stops every process cleanly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::Connection;

const TASKS: usize = 300;

fn shared() -> PathBuf {
    std::env::var_os("IMGCLF_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
}

fn service(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => panic!("CI must test every backend: set {var}"),
        _ => {
            eprintln!("skipped: set {var} to run this test against a real service");
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(binary: &Path, env: &[(String, String)], work: &Path) -> Process {
    let mut command = Command::new(binary);
    command
        .current_dir(work)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    Process(
        command
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", binary.display())),
    )
}

async fn fresh_database(base: &str) -> String {
    let name = unique("imgclf_e2e").replace('-', "_");
    let mut conn = sqlx::PgConnection::connect(base).await.expect("PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    format!("{}/{name}", base.rsplit_once('/').unwrap().0)
}

async fn run(queue_url: String) {
    let (Some(pg), Some(s3)) = (service("IMGCLF_TEST_POSTGRES"), service("IMGCLF_TEST_S3")) else {
        return;
    };
    let results_url = fresh_database(&pg).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let work = tempfile::tempdir().unwrap();
    let env: Vec<(String, String)> = [
        ("IMGCLF_ADDR", format!("127.0.0.1:{port}")),
        ("IMGCLF_QUEUE", queue_url),
        ("IMGCLF_QUEUE_NAME", unique("imgclf-e2e")),
        ("IMGCLF_RESULTS", results_url.clone()),
        ("IMGCLF_STORAGE", format!("s3://{}", unique("imgclf-e2e"))),
        ("IMGCLF_S3_ENDPOINT", s3),
        (
            "IMGCLF_S3_ACCESS_KEY",
            std::env::var("IMGCLF_TEST_S3_ACCESS_KEY").unwrap_or_else(|_| "test".into()),
        ),
        (
            "IMGCLF_S3_SECRET_KEY",
            std::env::var("IMGCLF_TEST_S3_SECRET_KEY").unwrap_or_else(|_| "testtest".into()),
        ),
        (
            "IMGCLF_DATA_DIR",
            work.path().join("data").display().to_string(),
        ),
        ("IMGCLF_MAX_BATCH", "4".into()),
        // A killed Redis consumer's jobs return after the lease; keep the test short.
        ("IMGCLF_QUEUE_LEASE", "5".into()),
        ("IMGCLF_PREPROCESS_THREADS", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let http_binary = PathBuf::from(env!("CARGO_BIN_EXE_imgclf-http"));
    // Built by `cargo test --workspace` for imgclf-worker's own tests, beside this one.
    let worker_binary = http_binary.with_file_name("imgclf-worker");
    assert!(
        worker_binary.exists(),
        "{} is built by cargo test --workspace",
        worker_binary.display()
    );
    let mut http = spawn(&http_binary, &env, work.path());
    let mut workers = vec![
        spawn(&worker_binary, &env, work.path()),
        spawn(&worker_binary, &env, work.path()),
    ];

    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !client
        .get(format!("{base}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            Instant::now() < deadline,
            "imgclf-http did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let text =
        std::fs::read_to_string(shared().join("images/reference-efficientnet-lite0.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let images: Vec<(String, String, Vec<u8>)> = reference["top5"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, top)| {
            let bytes = std::fs::read(shared().join("images").join(name)).unwrap();
            (
                name.clone(),
                top[0]["label"].as_str().unwrap().to_string(),
                bytes,
            )
        })
        .collect();

    let mut expected: HashMap<String, String> = HashMap::new();
    for (name, label, bytes) in images.iter().cycle().take(TASKS) {
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.clone()),
        );
        let response = client
            .post(format!("{base}/api/upload-image"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        expected.insert(body["task_id"].as_str().unwrap().to_string(), label.clone());
    }

    let mut db = sqlx::PgConnection::connect(&results_url).await.unwrap();
    // Kill a worker mid-run, three times, each time once it has finished some work (so it
    // holds a batch), and start a fresh one in its place.
    let mut kills = 0;
    let mut last_done = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (done,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM tasks WHERE state IN ('SUCCESS', 'FAILURE')")
                .fetch_one(&mut db)
                .await
                .unwrap();
        if done as usize == TASKS {
            break;
        }
        if kills < 3 && done as usize >= last_done + TASKS / 6 {
            let victim = kills % workers.len();
            workers[victim].0.kill().unwrap(); // SIGKILL
            workers[victim].0.wait().unwrap();
            workers[victim] = spawn(&worker_binary, &env, work.path());
            kills += 1;
            last_done = done as usize;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {TASKS} tasks finished"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (id, label) in &expected {
        let status: Value = client
            .get(format!("{base}/api/task-status/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(status["state"], "SUCCESS", "{status}");
        assert_eq!(
            status["result"]["classification"][0]["label"],
            label.as_str()
        );
    }
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT task_id) FROM results")
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(
        (rows, distinct),
        (TASKS as i64, TASKS as i64),
        "each result written exactly once"
    );
}

#[tokio::test]
async fn http_and_two_workers_over_rabbitmq_postgres_and_s3() {
    let Some(amqp) = service("IMGCLF_TEST_AMQP") else {
        return;
    };
    run(amqp).await;
}

#[tokio::test]
async fn http_and_two_workers_over_redis_postgres_and_s3() {
    let Some(redis) = service("IMGCLF_TEST_REDIS") else {
        return;
    };
    run(redis).await;
}
