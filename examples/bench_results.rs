//! Throughput of a result store on its own: `IN_FLIGHT` tasks at a time each go through the
//! three writes every image costs it (create, start, complete, as an upload and a worker make
//! them), `TASKS` in all. Prints one JSON object: tasks per second and this process's CPU per
//! task (the store's own threads included; a server's, such as PostgreSQL's, not).
//!
//! cargo run --release --example bench_results -- URL TASKS IN_FLIGHT
//!
//! For the embedded default, `sqlite:///var/tmp/bench/imgclf.db` (use a fresh file each run).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context};
use imgclf::{Prediction, ResultStore, TaskId, TaskRecord, TaskResult};
use serde_json::{json, Map};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    ensure!(args.len() == 3, "usage: bench_results URL TASKS IN_FLIGHT");
    let (url, tasks, in_flight) = (
        args[0].as_str(),
        args[1].parse::<usize>().context("TASKS")?,
        args[2].parse::<usize>().context("IN_FLIGHT")?.max(1),
    );
    let store = imgclf::results::from_url(url).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let (started, cpu) = (Instant::now(), cpu_time::ProcessTime::now());
    let mut lanes = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (store, next) = (store.clone(), next.clone());
        lanes.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < tasks {
                one_task(store.as_ref()).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(lane) = lanes.join_next().await {
        lane??;
    }
    let (seconds, cpu_s) = (started.elapsed().as_secs_f64(), cpu.elapsed().as_secs_f64());
    println!(
        "{}",
        json!({
            "tasks": tasks,
            "in_flight": in_flight,
            "tasks_per_s": tasks as f64 / seconds,
            "cpu_ms_per_task": cpu_s * 1e3 / tasks as f64,
        })
    );
    Ok(())
}

/// The writes of one image's life, as the service makes them.
async fn one_task(store: &dyn ResultStore) -> anyhow::Result<()> {
    let id = TaskId::new();
    let mut metadata = Map::new();
    metadata.insert("filename".into(), json!("cat.jpg"));
    let record = TaskRecord::pending(id, format!("images/{id}.jpg"), metadata.clone(), None);
    store.create(&record).await?;
    ensure!(store.start(id).await?.is_some(), "{id} was not started");
    let result = TaskResult {
        task_id: id,
        metadata,
        classification: (0..5)
            .map(|class_id| Prediction {
                label: format!("class {class_id}"),
                class_id,
                probability: 0.2,
            })
            .collect(),
        model: "efficientnet-lite4".into(),
        timings: Default::default(),
    };
    ensure!(store.complete(id, &result).await?, "{id} was not completed");
    Ok(())
}
