//! End to end: the real `imgclf-http` binary on the embedded default, real photos over real
//! HTTP, a SIGKILL in the middle of a run, and a graceful SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn shared() -> PathBuf {
    std::env::var_os("IMGCLF_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
}

/// Image name -> reference top-1 label.
fn reference_top1() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(shared().join("images/reference-efficientnet-lite0.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    json["top5"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, top)| (name.clone(), top[0]["label"].as_str().unwrap().to_string()))
        .collect()
}

struct Server {
    child: Child,
    base: String,
}

impl Server {
    /// Starts the binary with no configuration but a data directory and a free port.
    async fn start(data: &Path, port: u16) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_imgclf-http"))
            .current_dir(data)
            .env("IMGCLF_ADDR", format!("127.0.0.1:{port}"))
            .env("IMGCLF_DATA_DIR", data.join("data"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("imgclf-http starts");
        let server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(r) = client.get(format!("{}/ready", server.base)).send().await {
                if r.status() == 200 {
                    return server;
                }
            }
            assert!(
                Instant::now() < deadline,
                "imgclf-http did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn upload(client: &reqwest::Client, base: &str, name: &str) -> String {
    let bytes = std::fs::read(shared().join("images").join(name)).unwrap();
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()),
        )
        .text("metadata", r#"{"source": "e2e"}"#);
    let response = client
        .post(format!("{base}/api/upload-image"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["task_id"].as_str().unwrap().to_string()
}

async fn wait_success(client: &reqwest::Client, base: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let body: Value = client
            .get(format!("{base}/api/task-status/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match body["state"].as_str().unwrap() {
            "SUCCESS" => return body,
            "FAILURE" => panic!("task {id} failed: {body}"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "task {id} did not finish: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_embedded_default_classifies_real_photos_and_survives_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let client = reqwest::Client::new();
    let images = reference_top1();

    // A normal run: every shared image, checked against the reference.
    let server = Server::start(dir.path(), port).await;
    let mut tasks = Vec::new();
    for (name, label) in &images {
        tasks.push((upload(&client, &server.base, name).await, name, label));
    }
    for (id, name, label) in &tasks {
        let done = wait_success(&client, &server.base, id).await;
        assert_eq!(
            done["result"]["classification"][0]["label"],
            label.as_str(),
            "{name}"
        );
        assert_eq!(done["result"]["metadata"]["source"], "e2e");
    }

    // Accept a burst, then SIGKILL before the worker can finish it.
    let mut accepted = Vec::new();
    for (name, label) in images.iter().cycle().take(30) {
        accepted.push((upload(&client, &server.base, name).await, label));
    }
    server.signal("-KILL");
    drop(server);

    // The next start picks up whatever was accepted and not finished.
    let server = Server::start(dir.path(), port).await;
    for (id, label) in &accepted {
        let done = wait_success(&client, &server.base, id).await;
        assert_eq!(done["result"]["classification"][0]["label"], label.as_str());
    }
    // Earlier results survived the kill too.
    let (id, _, label) = &tasks[0];
    let done = wait_success(&client, &server.base, id).await;
    assert_eq!(done["result"]["classification"][0]["label"], label.as_str());

    // SIGTERM: a clean exit.
    let mut server = server;
    server.signal("-TERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "graceful shutdown exits 0, got {status}");
            break;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
