//! Load for a running `imgclf-http`: `CLIENTS` clients upload `TASKS` photos (cycling through
//! `PHOTO...`), then it waits for every result. Prints one JSON object: throughput from the
//! first upload to the last result, and each task's latency from its record's timestamps
//! (accepted → final). `scripts/bench.py` runs it; compiled, so the load costs the machine
//! little beside the service it measures.
//!
//! cargo run --release --example bench_load -- URL TASKS CLIENTS PHOTO...
//!
//! With one client each upload waits for its result before the next (`?wait=`): the latency
//! of a photo alone, also as the client sees it (`seen_p50_ms`: from sending the upload to
//! having the result). With more, clients upload back to back, then each waits for its own
//! results, oldest first, all clients at once: one loop fetching every result in turn finished
//! hundreds of fetches after the last result (48–174 ms of a 3.5 s run on EfficientNet-Lite0).
//! `records_images_per_s` is the throughput that the records' own timestamps give, from the
//! first acceptance to the last result: the service's, without this program's polling.
//! `IMGCLF_BENCH_LOAD_THREADS` (2) sets this program's threads, for machines of many cores.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    ensure!(
        args.len() >= 4,
        "usage: bench_load URL TASKS CLIENTS PHOTO..."
    );
    let (url, tasks, clients) = (
        args[0].trim_end_matches('/').to_owned(),
        args[1].parse::<usize>()?,
        args[2].parse::<usize>()?.max(1),
    );
    let photos: Vec<(String, bytes::Bytes)> = args[3..]
        .iter()
        .map(|path| {
            let name = std::path::Path::new(path)
                .file_name()
                .map_or_else(|| path.clone(), |n| n.to_string_lossy().into_owned());
            Ok((name, std::fs::read(path).context(path.clone())?.into()))
        })
        .collect::<anyhow::Result<_>>()?;
    // Two threads: enough to keep 16 uploads going, little CPU taken from the service.
    let threads = match std::env::var("IMGCLF_BENCH_LOAD_THREADS") {
        Ok(n) => n.parse().context("IMGCLF_BENCH_LOAD_THREADS")?,
        Err(_) => 2,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?
        .block_on(run(url, tasks, clients, Arc::new(photos)))
}

async fn run(
    url: String,
    tasks: usize,
    clients: usize,
    photos: Arc<Vec<(String, bytes::Bytes)>>,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut uploaders = tokio::task::JoinSet::new();
    // One client's latency as it sees it: from sending the upload to having the result.
    let seen_ms = Arc::new(std::sync::Mutex::new(Vec::new()));
    for _ in 0..clients {
        let (http, url, next, photos) = (http.clone(), url.clone(), next.clone(), photos.clone());
        let seen_ms = seen_ms.clone();
        uploaders.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= tasks {
                    return anyhow::Ok(mine);
                }
                let (name, bytes) = &photos[i % photos.len()];
                let sent = Instant::now();
                let id = upload(&http, &url, name, bytes.clone()).await?;
                if clients == 1 {
                    wait_final(&http, &url, &id).await?;
                    seen_ms
                        .lock()
                        .unwrap()
                        .push(sent.elapsed().as_secs_f64() * 1e3);
                }
                mine.push((name.clone(), id));
            }
        });
    }
    let mut ids = Vec::with_capacity(clients);
    while let Some(done) = uploaders.join_next().await {
        ids.push(done??);
    }
    let uploaded = started.elapsed();
    // Each client's results, oldest first: each wait returns as soon as that task is final.
    let mut waiters = tokio::task::JoinSet::new();
    for mine in ids {
        let (http, url) = (http.clone(), url.clone());
        waiters.spawn(async move {
            let mut records = Vec::with_capacity(mine.len());
            for (name, id) in mine {
                records.push((name, wait_final(&http, &url, &id).await?));
            }
            anyhow::Ok(records)
        });
    }
    let mut records = Vec::with_capacity(tasks);
    while let Some(done) = waiters.join_next().await {
        records.extend(done??);
    }
    let mut latencies: Vec<(String, f64)> = Vec::with_capacity(tasks);
    let (mut first_accepted, mut last_final) = (f64::INFINITY, f64::NEG_INFINITY);
    for (name, record) in records {
        let ms = |field: &str| record[field].as_f64().unwrap_or(f64::NAN);
        latencies.push((name, ms("updated_at_ms") - ms("created_at_ms")));
        first_accepted = first_accepted.min(ms("created_at_ms"));
        last_final = last_final.max(ms("updated_at_ms"));
    }
    let total = started.elapsed().as_secs_f64();
    let pct = |values: &[f64], p: f64| {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted
            .get(((sorted.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
    };
    let recorded: Vec<f64> = latencies.iter().map(|(_, ms)| *ms).collect();
    let seen_ms = seen_ms.lock().unwrap().clone();
    let mut per_photo = serde_json::Map::new();
    for (name, ms) in latencies {
        per_photo
            .entry(name)
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .expect("an array")
            .push(json!(ms));
    }
    println!(
        "{}",
        json!({
            "tasks": tasks,
            "clients": clients,
            "images_per_s": tasks as f64 / total,
            "records_images_per_s": tasks as f64 * 1e3 / (last_final - first_accepted),
            "upload_s": uploaded.as_secs_f64(),
            "p50_ms": pct(&recorded, 0.5),
            "p95_ms": pct(&recorded, 0.95),
            "seen_p50_ms": pct(&seen_ms, 0.5),
            "seen_p95_ms": pct(&seen_ms, 0.95),
            "latency_ms_by_photo": per_photo,
        })
    );
    Ok(())
}

async fn upload(
    http: &reqwest::Client,
    url: &str,
    name: &str,
    bytes: bytes::Bytes,
) -> anyhow::Result<String> {
    loop {
        let length = bytes.len() as u64;
        let part = reqwest::multipart::Part::stream_with_length(bytes.clone(), length)
            .file_name(name.to_owned());
        let response = http
            .post(format!("{url}/api/upload-image"))
            .multipart(reqwest::multipart::Form::new().part("file", part))
            .send()
            .await?;
        match response.status().as_u16() {
            202 => {
                let body: Value = response.json().await?;
                return Ok(body["task_id"].as_str().context("no task_id")?.to_owned());
            }
            // The service's own back-pressure: wait as told, then go on.
            429 | 503 => tokio::time::sleep(Duration::from_millis(100)).await,
            status => bail!("upload of {name}: {status}: {}", response.text().await?),
        }
    }
}

async fn wait_final(http: &reqwest::Client, url: &str, id: &str) -> anyhow::Result<Value> {
    loop {
        let record: Value = http
            .get(format!("{url}/api/task-status/{id}?wait=30"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        match record["state"].as_str() {
            Some("SUCCESS") => return Ok(record),
            Some("FAILURE") => bail!("task {id} failed: {record}"),
            _ => {}
        }
    }
}
