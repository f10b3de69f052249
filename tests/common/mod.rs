//! The harness of the in-process API tests: the router over in-memory backends (or a given
//! result store) and the real model, and helpers to call it.
#![allow(dead_code)] // Each test file uses part of it.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use imgclf::classifier::{self, ClassifierHandle};
use imgclf::notify::NoopNotifier;
use imgclf::queue::MemoryQueue;
use imgclf::results::MemoryResults;
use imgclf::storage::MemoryStorage;
use imgclf::{ModelSpec, Pipeline, PipelineConfig, Ports, ResultStore};
use imgclf_http::{router, AppState};
use imgclf_suite::{default_model_dir, reference};
use serde_json::Value;
use tower::ServiceExt;

pub const MAX_UPLOAD: usize = 2 * 1024 * 1024;
pub const MAX_PIXELS: u64 = 4_200_000;

/// One model for every test in this file: loading and compiling it is the slow part.
pub fn classifier() -> ClassifierHandle {
    static HANDLE: OnceLock<ClassifierHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let spec = ModelSpec::load(default_model_dir()).expect("model");
            ClassifierHandle::spawn(
                classifier::build("tract", spec, &Default::default()).expect("tract"),
                4,
            )
        })
        .clone()
}

pub struct Service {
    pub app: Router,
    pub storage: Arc<MemoryStorage>,
    pub results: Arc<dyn ResultStore>,
    pub queue: Arc<MemoryQueue>,
    pub pipeline: Arc<Pipeline>,
    pub _stop: tokio::sync::watch::Sender<bool>,
}

pub fn service_with(notifier: Arc<dyn imgclf::Notifier>) -> Service {
    service_custom(notifier, PipelineConfig::default(), true)
}

/// In-memory backends, the shared model, and the worker running unless `worker` is false.
pub fn service_custom(
    notifier: Arc<dyn imgclf::Notifier>,
    base: PipelineConfig,
    worker: bool,
) -> Service {
    service_on(Arc::new(MemoryResults::new()), notifier, base, worker)
}

/// The same over `results`.
pub fn service_on(
    results: Arc<dyn ResultStore>,
    notifier: Arc<dyn imgclf::Notifier>,
    base: PipelineConfig,
    worker: bool,
) -> Service {
    let storage = Arc::new(MemoryStorage::new());
    let queue = Arc::new(MemoryQueue::default());
    let ports = Ports {
        storage: storage.clone(),
        queue: queue.clone(),
        results: results.clone(),
        notifier,
    };
    let config = PipelineConfig {
        max_pixels: MAX_PIXELS,
        retry_backoff: Duration::from_millis(50),
        ..base
    };
    let pipeline = Arc::new(Pipeline::new(ports, classifier(), config));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    if worker {
        tokio::spawn(pipeline.clone().run_worker(stopped));
    }
    let app = router(
        AppState::embedded(&pipeline, MAX_UPLOAD),
        Duration::from_secs(30),
    );
    Service {
        app,
        storage,
        results,
        queue,
        pipeline,
        _stop: stop,
    }
}

pub fn service() -> Service {
    service_with(Arc::new(NoopNotifier))
}

pub enum Part<'a> {
    File(&'a str, &'a [u8]),
    Text(&'a str, &'a str),
}

pub fn multipart(uri: &str, parts: &[Part]) -> Request<Body> {
    let boundary = "imgclf-test-boundary-7d1f";
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match part {
            Part::File(filename, bytes) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
                );
                body.extend_from_slice(bytes);
            }
            Part::Text(name, value) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}")
                        .as_bytes(),
                );
            }
        }
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    // With its length, as clients send it (the in-flight budget reads it).
    Request::post(uri)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .header("content-length", body.len())
        .body(Body::from(body))
        .unwrap()
}

pub async fn call(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

pub async fn get(app: &Router, uri: &str) -> (StatusCode, Value) {
    call(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

/// Polls a task until it is final.
pub async fn wait_final(app: &Router, task_id: &str) -> Value {
    for _ in 0..600 {
        let (status, body) = get(app, &format!("/api/task-status/{task_id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["state"] == "SUCCESS" || body["state"] == "FAILURE" {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("task {task_id} did not finish");
}

pub fn top1(name: &str) -> String {
    reference("efficientnet-lite0")[name][0].label.clone()
}

/// Serves `app` on a free port of 127.0.0.1 for the rest of the test; returns its base URL.
pub async fn serve_locally(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}
