//! Callbacks at least once, across crashes: tasks finish while their receiver fails, and the
//! process that owes the callbacks is SIGKILLed, restarted, SIGTERMed and restarted; once the
//! receiver recovers every callback arrives, under its task's delivery id. Once on the embedded
//! default, once with `imgclf-worker` processes over RabbitMQ, PostgreSQL and S3.

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

/// A receiver that fails until told otherwise; returns it and its URL.
async fn failing_receiver() -> (Receiver, String) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (receiver, url)
}

/// The callback settings of every process in these tests.
fn callback_env() -> Vec<(String, String)> {
    [
        ("IMGCLF_WEBHOOK_ALLOW", "127.0.0.1"),
        ("IMGCLF_WEBHOOK_SECRET", "callback-test-secret"),
        ("IMGCLF_WEBHOOK_ATTEMPTS", "40"),
        ("IMGCLF_WEBHOOK_TIMEOUT", "2"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Uploads 8 photos with a callback; returns their task ids once every task is done and every
/// callback has failed at least once.
async fn tasks_with_failing_callbacks(
    client: &reqwest::Client,
    base: &str,
    hook_url: &str,
) -> Vec<String> {
    let mut ids = Vec::new();
    for (name, _, bytes) in reference_images().into_iter().take(8) {
        let form = reqwest::multipart::Form::new()
            .text("callback_url", hook_url.to_string())
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
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &ids {
        loop {
            let status = task_status(client, base, id).await;
            if status["state"] == "SUCCESS" && status["webhook"]["attempts"].as_u64() >= Some(1) {
                assert_eq!(status["webhook"]["state"], "pending", "{status}");
                break;
            }
            assert!(Instant::now() < deadline, "{status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    ids
}

/// Lets the receiver recover and waits for every callback, and for its recorded state.
async fn every_callback_arrives(
    receiver: &Receiver,
    client: &reqwest::Client,
    base: &str,
    ids: &[String],
) {
    assert!(
        *receiver.failed_attempts.lock().unwrap() >= ids.len() as u32,
        "the callbacks were failing"
    );
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
    for id in ids {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = task_status(client, base, id).await;
            if status["webhook"]["state"] == "delivered" {
                break;
            }
            assert!(Instant::now() < deadline, "{status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn start_embedded(client: &reqwest::Client, work: &Path, port: u16) -> Process {
    let mut env = callback_env();
    env.push(("IMGCLF_ADDR".into(), format!("127.0.0.1:{port}")));
    env.push((
        "IMGCLF_DATA_DIR".into(),
        work.join("data").display().to_string(),
    ));
    let server = spawn(&http_binary(), &env, work);
    wait_ready(client, &format!("http://127.0.0.1:{port}")).await;
    server
}

#[tokio::test]
async fn every_callback_arrives_after_kills_and_restarts() {
    let (receiver, hook_url) = failing_receiver().await;
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let server = start_embedded(&client, work.path(), port).await;
    let ids = tasks_with_failing_callbacks(&client, &base, &hook_url).await;

    // A crash, a restart, a clean stop, another restart: all while the receiver fails.
    server.signal("-KILL");
    drop(server);
    let mut server = start_embedded(&client, work.path(), port).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.signal("-TERM");
    assert!(server.exits_cleanly(Duration::from_secs(60)).await);
    drop(server);
    let server = start_embedded(&client, work.path(), port).await;

    every_callback_arrives(&receiver, &client, &base, &ids).await;
    server.signal("-TERM");
}

#[tokio::test]
async fn every_callback_arrives_after_workers_are_killed_and_stopped() {
    let Some(amqp) = service_url("IMGCLF_TEST_AMQP") else {
        return;
    };
    let (receiver, hook_url) = failing_receiver().await;
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let Some((mut env, _)) = distributed_env(amqp, port, work.path()).await else {
        return;
    };
    env.extend(callback_env());
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let http = spawn(&http_binary(), &env, work.path());
    wait_ready(&client, &base).await;
    let worker = spawn(&worker_binary(), &env, work.path());
    let ids = tasks_with_failing_callbacks(&client, &base, &hook_url).await;

    // The worker owing the callbacks is SIGKILLed; the next one SIGTERMed; a third delivers.
    worker.signal("-KILL");
    drop(worker);
    let mut worker = spawn(&worker_binary(), &env, work.path());
    tokio::time::sleep(Duration::from_secs(3)).await;
    worker.signal("-TERM");
    assert!(worker.exits_cleanly(Duration::from_secs(60)).await);
    drop(worker);
    let worker = spawn(&worker_binary(), &env, work.path());

    every_callback_arrives(&receiver, &client, &base, &ids).await;
    for process in [&worker, &http] {
        process.signal("-TERM");
    }
}
