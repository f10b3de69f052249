//! End to end: the real `imgclf-http` binary on the embedded default, real photos over real
//! HTTP, a SIGKILL in the middle of a run, and a graceful SIGTERM.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Starts the binary with no configuration but a data directory and a port.
async fn start(client: &reqwest::Client, work: &Path, port: u16) -> (Process, String) {
    let env = [
        ("IMGCLF_ADDR".to_string(), format!("127.0.0.1:{port}")),
        (
            "IMGCLF_DATA_DIR".to_string(),
            work.join("data").display().to_string(),
        ),
    ];
    let server = spawn(&http_binary(), &env, work);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(client, &base).await;
    (server, base)
}

async fn wait_success(client: &reqwest::Client, base: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let body = task_status(client, base, id).await;
        match body["state"].as_str().unwrap() {
            "SUCCESS" => return body,
            "FAILURE" => panic!("task {id} failed: {body}"),
            _ => assert!(
                Instant::now() < deadline,
                "task {id} did not finish: {body}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_embedded_default_classifies_real_photos_and_survives_a_kill() {
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let client = reqwest::Client::new();
    let images = reference_images();

    // A normal run: every shared photo, checked against the reference.
    let (server, base) = start(&client, work.path(), port).await;
    let mut tasks = Vec::new();
    for (name, label, bytes) in &images {
        let (status, id) = upload(&client, &base, name, bytes).await;
        assert_eq!(status, 202);
        tasks.push((id.unwrap(), name, label));
    }
    for (id, name, label) in &tasks {
        let done = wait_success(&client, &base, id).await;
        assert_eq!(
            done["result"]["classification"][0]["label"],
            label.as_str(),
            "{name}"
        );
        assert_eq!(done["result"]["metadata"]["filename"], name.as_str());
    }

    // Accept a concurrent burst (faster than the worker can classify it), then SIGKILL.
    let mut burst = tokio::task::JoinSet::new();
    for (name, label, bytes) in images.iter().cycle().take(100).cloned() {
        let (client, base) = (client.clone(), base.clone());
        burst.spawn(async move {
            let (status, id) = upload(&client, &base, &name, &bytes).await;
            assert_eq!(status, 202);
            (id.unwrap(), label)
        });
    }
    let accepted = burst.join_all().await;
    server.signal("-KILL");
    drop(server);

    // The kill must have landed mid-run, or the restart below proves nothing.
    let database = format!("sqlite://{}", work.path().join("data/imgclf.db").display());
    let records = imgclf::results::SqliteResults::connect(&database)
        .await
        .unwrap();
    let unfinished = imgclf::ResultStore::unfinished(&records, usize::MAX)
        .await
        .unwrap();
    assert!(
        !unfinished.is_empty(),
        "every task had finished before the kill: the test needs a larger burst"
    );
    eprintln!(
        "{} of 100 accepted tasks unfinished at the kill",
        unfinished.len()
    );
    drop(records);

    // The next start picks up whatever was accepted and not finished.
    let (mut server, base) = start(&client, work.path(), port).await;
    for (id, label) in &accepted {
        let done = wait_success(&client, &base, id).await;
        assert_eq!(done["result"]["classification"][0]["label"], label.as_str());
    }
    // Earlier results survived the kill too.
    let (id, _, label) = &tasks[0];
    let done = wait_success(&client, &base, id).await;
    assert_eq!(done["result"]["classification"][0]["label"], label.as_str());

    // SIGTERM: a clean exit.
    server.signal("-TERM");
    assert!(
        server.exits_cleanly(Duration::from_secs(60)).await,
        "graceful shutdown exits 0"
    );
}
