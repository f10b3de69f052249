//! A bounded load test on loopback: the embedded service first shows its capacity in a burst,
//! then takes a steady 75% of it for three minutes (`IMGCLF_LOAD_SECONDS`). Every upload must be
//! accepted, every task must finish, the backlog must stay bounded and memory flat. Three minutes
//! is too long for a plain `cargo test`: it runs when `IMGCLF_TEST_LOAD=1` (`.ci/run` sets it).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

async fn wait_all(client: &reqwest::Client, base: &str, ids: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(600);
    for id in ids {
        loop {
            let status = task_status(client, base, id).await;
            match status["state"].as_str().unwrap() {
                "SUCCESS" => break,
                "FAILURE" => panic!("{status}"),
                _ => assert!(Instant::now() < deadline, "{id} did not finish"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn a_steady_rate_near_capacity_holds_with_flat_memory() {
    if std::env::var("IMGCLF_TEST_LOAD").as_deref() != Ok("1") {
        eprintln!("skipped: the three-minute load test runs with IMGCLF_TEST_LOAD=1");
        return;
    }
    let seconds: u64 = std::env::var("IMGCLF_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let env = [
        ("IMGCLF_ADDR".to_string(), format!("127.0.0.1:{port}")),
        (
            "IMGCLF_DATA_DIR".to_string(),
            work.path().join("data").display().to_string(),
        ),
    ];
    let server = spawn(&http_binary(), &env, work.path());
    let base = format!("http://127.0.0.1:{port}");
    // Idle connections go back before the server closes them (IMGCLF_HEADER_TIMEOUT, 10 s):
    // one taken from the pool as the server closes it fails its request (IncompleteMessage).
    let client = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    wait_ready(&client, &base).await;
    let images = Arc::new(reference_images());

    // Capacity: a burst of 60 images, from the first upload to the last result.
    let started = Instant::now();
    let mut burst = Vec::new();
    for (name, _, bytes) in images.iter().cycle().take(60) {
        burst.push(upload(&client, &base, name, bytes).await.1.unwrap());
    }
    wait_all(&client, &base, &burst).await;
    let capacity = burst.len() as f64 / started.elapsed().as_secs_f64();
    let rate = 0.75 * capacity;
    eprintln!("capacity {capacity:.1} images/s; holding {rate:.1} images/s for {seconds} s");

    // The steady run: one upload every 1/rate seconds, never waiting on the previous one.
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut uploads = tokio::task::JoinSet::new();
    let mut rss_samples = Vec::new();
    let mut max_backlog = 0;
    let run = Instant::now();
    let mut sent = 0usize;
    while run.elapsed() < Duration::from_secs(seconds) {
        ticker.tick().await;
        let (each_client, each_base, images) = (client.clone(), base.clone(), images.clone());
        uploads.spawn(async move {
            let (name, _, bytes) = &images[sent % images.len()];
            upload(&each_client, &each_base, name, bytes).await
        });
        sent += 1;
        if sent.is_multiple_of(rate.ceil() as usize * 10) {
            rss_samples.push(vm_rss_kib(server.0.id()));
            let metrics = client
                .get(format!("{base}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let depth: u64 = metrics
                .lines()
                .find_map(|l| l.strip_prefix("image_queue_depth "))
                .unwrap()
                .parse()
                .unwrap();
            max_backlog = max_backlog.max(depth);
        }
    }
    let mut ids = Vec::new();
    while let Some(result) = uploads.join_next().await {
        let (status, id) = result.unwrap();
        assert_eq!(status, 202, "every upload at this rate is accepted");
        ids.push(id.unwrap());
    }
    wait_all(&client, &base, &ids).await;
    eprintln!(
        "{} uploads; largest backlog {max_backlog}; RSS samples (KiB) {rss_samples:?}",
        ids.len()
    );

    assert!(
        ids.len() as f64 >= 0.8 * rate * seconds as f64,
        "the rate was held"
    );
    assert!(
        (max_backlog as f64) < rate * 20.0,
        "the backlog stays bounded: {max_backlog}"
    );
    // Memory is flat: after the first third (allocators and caches warm), it grows no more
    // than a quarter.
    let warm = rss_samples[rss_samples.len() / 3];
    let last = *rss_samples.last().unwrap();
    assert!(
        (last as f64) < warm as f64 * 1.25,
        "RSS grew from {warm} to {last} KiB"
    );
    server.signal("-TERM");
}
