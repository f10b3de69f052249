//! Callbacks at least once, across crashes: the real binary finishes tasks while their
//! receiver fails, is SIGKILLed, restarted, SIGTERMed and restarted; once the receiver recovers
//! every callback arrives, signed with its task's delivery id.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use common::*;

#[derive(Clone, Default)]
struct Receiver {
    healthy: Arc<AtomicBool>,
    delivered: Arc<Mutex<HashSet<String>>>,
    failed_attempts: Arc<Mutex<u32>>,
}

async fn hook(
    axum::extract::State(receiver): axum::extract::State<Receiver>,
    headers: HeaderMap,
) -> StatusCode {
    if !receiver.healthy.load(Ordering::SeqCst) {
        *receiver.failed_attempts.lock().unwrap() += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let id = headers["x-imgclf-delivery"].to_str().unwrap().to_string();
    receiver.delivered.lock().unwrap().insert(id);
    StatusCode::OK
}

async fn start(client: &reqwest::Client, work: &Path, port: u16) -> Process {
    let env: Vec<(String, String)> = [
        ("IMGCLF_ADDR", format!("127.0.0.1:{port}")),
        ("IMGCLF_DATA_DIR", work.join("data").display().to_string()),
        ("IMGCLF_WEBHOOK_ALLOW", "127.0.0.1".into()),
        ("IMGCLF_WEBHOOK_SECRET", "callback-test-secret".into()),
        ("IMGCLF_WEBHOOK_ATTEMPTS", "40".into()),
        ("IMGCLF_WEBHOOK_TIMEOUT", "2".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let server = spawn(&http_binary(), &env, work);
    wait_ready(client, &format!("http://127.0.0.1:{port}")).await;
    server
}

#[tokio::test]
async fn every_callback_arrives_after_kills_and_restarts() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let server = start(&client, work.path(), port).await;

    let mut ids = Vec::new();
    for (name, _, bytes) in reference_images().into_iter().take(8) {
        let form = reqwest::multipart::Form::new()
            .text("callback_url", hook_url.clone())
            .part(
                "file",
                reqwest::multipart::Part::bytes(bytes).file_name(name),
            );
        let response = client
            .post(format!("{base}/api/upload-image"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: serde_json::Value = response.json().await.unwrap();
        ids.push(body["task_id"].as_str().unwrap().to_string());
    }
    // Every task done, every callback failing.
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &ids {
        loop {
            let status = task_status(&client, &base, id).await;
            if status["state"] == "SUCCESS" && status["webhook"]["attempts"].as_u64() >= Some(1) {
                assert_eq!(status["webhook"]["state"], "pending", "{status}");
                break;
            }
            assert!(Instant::now() < deadline, "{status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // A crash, a restart, a clean stop, another restart: all while the receiver fails.
    server.signal("-KILL");
    drop(server);
    let mut server = start(&client, work.path(), port).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.signal("-TERM");
    assert!(server.exits_cleanly(Duration::from_secs(60)).await);
    drop(server);
    let server = start(&client, work.path(), port).await;
    assert!(
        *receiver.failed_attempts.lock().unwrap() >= ids.len() as u32,
        "the callbacks were failing"
    );

    // The receiver recovers: every callback arrives, under its task's delivery id.
    receiver.healthy.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let delivered = receiver.delivered.lock().unwrap().clone();
        if ids.iter().all(|id| delivered.contains(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} callbacks delivered",
            delivered.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = task_status(&client, &base, id).await;
            if status["webhook"]["state"] == "delivered" {
                break;
            }
            assert!(Instant::now() < deadline, "{status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    server.signal("-TERM");
}
