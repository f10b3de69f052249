//! Helpers for the tests that run the real binaries against the real services.
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use imgclf_test_support::{
    fresh_postgres_database, reference_images, service_url, unique_name,
};
use serde_json::Value;
use sqlx::Connection;

/// A child process, killed when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    pub fn signal(&self, signal: &str) {
        let pid = self.0.id().to_string();
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Waits for the process to exit by itself and returns whether it exited 0.
    pub async fn exits_cleanly(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "no exit within {within:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn http_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_imgclf-http"))
}

/// Built by `cargo test --workspace` for imgclf-worker's own tests, beside imgclf-http.
pub fn worker_binary() -> PathBuf {
    let path = http_binary().with_file_name("imgclf-worker");
    assert!(
        path.exists(),
        "{} is built by cargo test --workspace",
        path.display()
    );
    path
}

pub fn spawn(binary: &Path, env: &[(String, String)], work: &Path) -> Process {
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

/// Settings for a distributed run on `queue`, PostgreSQL and S3 from the test environment,
/// with names of its own; `None` when a service is not configured.
pub async fn distributed_env(
    queue: String,
    port: u16,
    work: &Path,
) -> Option<(Vec<(String, String)>, String)> {
    let (pg, s3) = (
        service_url("IMGCLF_TEST_POSTGRES")?,
        service_url("IMGCLF_TEST_S3")?,
    );
    let results = fresh_postgres_database(&pg).await;
    let key = |var: &str, default: &str| std::env::var(var).unwrap_or_else(|_| default.into());
    let env = [
        ("IMGCLF_ADDR", format!("127.0.0.1:{port}")),
        ("IMGCLF_QUEUE", queue),
        ("IMGCLF_QUEUE_NAME", unique_name("imgclf-e2e")),
        ("IMGCLF_RESULTS", results.clone()),
        (
            "IMGCLF_STORAGE",
            format!("s3://{}", unique_name("imgclf-e2e")),
        ),
        ("IMGCLF_S3_ENDPOINT", s3),
        (
            "IMGCLF_S3_ACCESS_KEY",
            key("IMGCLF_TEST_S3_ACCESS_KEY", "test"),
        ),
        (
            "IMGCLF_S3_SECRET_KEY",
            key("IMGCLF_TEST_S3_SECRET_KEY", "testtest"),
        ),
        ("IMGCLF_DATA_DIR", work.join("data").display().to_string()),
        ("IMGCLF_MAX_BATCH", "4".into()),
        ("IMGCLF_PREPROCESS_THREADS", "1".into()),
        // A killed Redis consumer's jobs return after the lease; keep the tests short.
        ("IMGCLF_QUEUE_LEASE", "5".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Some((env, results))
}

/// A port free now and not yet handed to another test of this process: tests run at once, and
/// the kernel may give two of them the port it has just released, so that one's server cannot
/// bind and its requests reach the other's.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    wait_ready_within(client, base, Duration::from_secs(180)).await;
}

/// Waits for `/ready` to answer 200, failing the test after `limit`.
pub async fn wait_ready_within(client: &reqwest::Client, base: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !client
        .get(format!("{base}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            Instant::now() < deadline,
            "imgclf-http did not become ready within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Uploads one image; returns the HTTP status and, on 202, the task id.
pub async fn upload(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    bytes: &[u8],
) -> (u16, Option<String>) {
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(bytes.to_vec()).file_name(name.to_string()),
    );
    let request = client
        .post(format!("{base}/api/upload-image"))
        .multipart(form);
    let response = request
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("an answer, not a hang");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or_default();
    (status, body["task_id"].as_str().map(String::from))
}

/// The task-status document of one task.
pub async fn task_status(client: &reqwest::Client, base: &str, id: &str) -> Value {
    let response = client
        .get(format!("{base}/api/task-status/{id}"))
        .send()
        .await
        .unwrap();
    response.json().await.unwrap()
}

/// Waits until `count` tasks of the database at `results` are final.
pub async fn wait_final_count(results: &str, count: usize, within: Duration) {
    let mut db = sqlx::PgConnection::connect(results).await.unwrap();
    let deadline = Instant::now() + within;
    loop {
        let done: Result<(i64,), _> =
            sqlx::query_as("SELECT count(*) FROM tasks WHERE state IN ('SUCCESS', 'FAILURE')")
                .fetch_one(&mut db)
                .await;
        match done {
            Ok((done,)) if done as usize == count => return,
            Ok((done,)) => assert!(
                Instant::now() < deadline,
                "only {done} of {count} tasks finished"
            ),
            Err(_) => db = sqlx::PgConnection::connect(results).await.unwrap(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Resident memory of a process, in KiB.
pub fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
