//! The distributed deployment end to end: one `imgclf-http` and two `imgclf-worker` processes
//! sharing an S3 server, PostgreSQL and a broker (RabbitMQ, then Redis). `imgclf-http` holds no
//! model: it is ready with no worker running and stays small. 300 real photos are queued, then
//! workers process them and are killed with SIGKILL three times; every task must reach SUCCESS
//! with the reference label, its result written exactly once; `/api/classify` answers through
//! the workers; then SIGTERM stops every process cleanly.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use sqlx::Connection;

const TASKS: usize = 300;

async fn run(queue_url: String) {
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let Some((env, results_url)) = distributed_env(queue_url, port, work.path()).await else {
        return;
    };
    let base = format!("http://127.0.0.1:{port}");
    let worker = worker_binary();
    let mut http = spawn(&http_binary(), &env, work.path());
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;

    // Every task is queued before the workers start, so the kills below land mid-run however
    // fast the workers are.
    let images = reference_images();
    let mut expected: HashMap<String, String> = HashMap::new();
    for (name, label, bytes) in images.iter().cycle().take(TASKS) {
        let (status, id) = upload(&client, &base, name, bytes).await;
        assert_eq!(status, 202);
        expected.insert(id.unwrap(), label.clone());
    }
    // Ready above with no worker anywhere, and after 300 uploads still far below the size of
    // one model instance: the accepting side loaded none.
    let rss_mib = vm_rss_kib(http.0.id()) / 1024;
    eprintln!("imgclf-http resident memory after {TASKS} uploads: {rss_mib} MiB");
    assert!(rss_mib < 60, "imgclf-http uses {rss_mib} MiB");
    let mut workers = [
        spawn(&worker, &env, work.path()),
        spawn(&worker, &env, work.path()),
    ];

    // Kill a worker mid-run, three times, each time once some work is done (so it holds a
    // batch), and start a fresh one in its place.
    let mut db = sqlx::PgConnection::connect(&results_url).await.unwrap();
    let mut kills = 0;
    let mut last_done = 0;
    while kills < 3 {
        let (done,): (i64,) = sqlx::query_as("SELECT count(*) FROM tasks WHERE state = 'SUCCESS'")
            .fetch_one(&mut db)
            .await
            .unwrap();
        assert!((done as usize) < TASKS, "the run ended before three kills");
        if done as usize >= last_done + TASKS / 6 {
            let victim = kills % workers.len();
            workers[victim].0.kill().unwrap(); // SIGKILL
            workers[victim].0.wait().unwrap();
            workers[victim] = spawn(&worker, &env, work.path());
            kills += 1;
            last_done = done as usize;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_final_count(&results_url, TASKS, Duration::from_secs(600)).await;

    for (id, label) in &expected {
        let status = task_status(&client, &base, id).await;
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

    // The synchronous API works without a model in the HTTP process: the workers answer it.
    let (name, label, bytes) = &images[0];
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.clone()),
    );
    let response = client
        .post(format!("{base}/api/classify?top_k=7"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["classification"][0]["label"], label.as_str(), "{body}");
    assert_eq!(
        body["classification"].as_array().unwrap().len(),
        7,
        "{body}"
    );
    assert_eq!(body["metadata"]["filename"], name.as_str(), "{body}");

    // SIGTERM: every process drains and exits 0.
    for process in workers.iter().chain([&http]) {
        process.signal("-TERM");
    }
    for process in workers.iter_mut().chain([&mut http]) {
        assert!(
            process.exits_cleanly(Duration::from_secs(60)).await,
            "SIGTERM ends with exit 0"
        );
    }
}

#[tokio::test]
async fn http_and_two_workers_over_rabbitmq_postgres_and_s3() {
    let Some(amqp) = service_url("IMGCLF_TEST_AMQP") else {
        return;
    };
    run(amqp).await;
}

#[tokio::test]
async fn http_and_two_workers_over_redis_postgres_and_s3() {
    let Some(redis) = service_url("IMGCLF_TEST_REDIS") else {
        return;
    };
    run(redis).await;
}
