//! The whole pipeline in one process, no services: submit images, let the worker classify them,
//! print each result.
//!
//! cargo run --release --example embedded -- path/to/image.jpg [more images…]

use std::sync::Arc;
use std::time::Duration;

use imgclf::{Settings, TaskState, Upload};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(!paths.is_empty(), "usage: embedded IMAGE...");

    let settings = Settings {
        storage: Some("memory://".into()),
        results: Some("memory://".into()),
        ..Settings::default()
    };
    let pipeline = Arc::new(settings.build_pipeline().await?);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(pipeline.clone().run_worker(stopped));

    let mut tasks = Vec::new();
    for path in &paths {
        let upload = Upload {
            bytes: std::fs::read(path)?.into(),
            filename: Some(path.clone()),
            ..Upload::default()
        };
        tasks.push((path, pipeline.submit(upload).await?));
    }
    for (path, id) in tasks {
        let record = loop {
            let record = pipeline
                .status(id)
                .await?
                .expect("accepted tasks are recorded");
            if record.state.is_final() {
                break record;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        match (record.state, record.result, record.error) {
            (TaskState::Success, Some(result), _) => {
                println!("{path}:");
                for p in result.classification {
                    println!(
                        "  {:>6.2}%  {} ({})",
                        p.probability * 100.0,
                        p.label,
                        p.class_id
                    );
                }
            }
            (_, _, error) => println!("{path}: failed: {}", error.unwrap_or_default()),
        }
    }
    stop.send(true)?;
    worker.await?;
    Ok(())
}
