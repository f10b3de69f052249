//! The data lifecycle, in process on the real model: finished tasks expire with their images
//! after IMGCLF_RESULT_TTL, images alone after IMGCLF_IMAGE_TTL, unfinished tasks never.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use common::*;
use imgclf::notify::NoopNotifier;
use imgclf::task::{now_ms, TaskId, TaskRecord};
use imgclf::{PipelineConfig, Queue, Storage, StorageError};
use imgclf_suite::image;

const TTL: Duration = Duration::from_secs(1);
/// How long past its TTL anything may take to go: the sweeper runs every half TTL.
const GRACE: Duration = Duration::from_secs(4);

/// Uploads an image, waits for its result; returns the task id, its object key and when it
/// ended (ms since the epoch).
async fn classified(s: &Service) -> (String, String, i64) {
    let bytes = image("opencv_apple.jpg");
    let request = multipart(
        "/api/upload-image",
        &[Part::File("opencv_apple.jpg", &bytes)],
    );
    let (status, body) = call(&s.app, request).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["task_id"].as_str().expect("task_id").to_string();
    let done = wait_final(&s.app, &id).await;
    assert_eq!(done["state"], "SUCCESS", "{done}");
    let record = s
        .results
        .get(id.parse().unwrap())
        .await
        .unwrap()
        .expect("recorded");
    (id, record.object_key, record.updated_at_ms)
}

/// When `gone` first holds, polled every 20 ms; panics after the TTL and its grace.
async fn first_time(mut gone: impl AsyncFnMut() -> bool, ended_ms: i64, what: &str) -> i64 {
    let deadline = tokio::time::Instant::now() + TTL + GRACE;
    while tokio::time::Instant::now() < deadline {
        if gone().await {
            return now_ms();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} still there {GRACE:?} past its TTL (ended at {ended_ms})");
}

async fn image_gone(s: &Service, key: &str) -> bool {
    matches!(s.storage.get(key).await, Err(StorageError::NotFound(_)))
}

#[tokio::test]
async fn finished_tasks_expire_with_their_images_and_unfinished_ones_stay() {
    let config = PipelineConfig {
        result_ttl: Some(TTL),
        ..PipelineConfig::default()
    };
    let s = service_custom(Arc::new(NoopNotifier), config, true);
    // A task accepted long before the TTL and still waiting (its job is elsewhere): it must
    // survive every sweep.
    let waiting = {
        let id = TaskId::new();
        let key = format!("images/{id}.jpg");
        let mut record = TaskRecord::pending(id, key.clone(), Default::default(), None);
        record.created_at_ms -= 60_000;
        record.updated_at_ms -= 60_000;
        s.storage
            .put(&key, Bytes::from_static(b"jpeg"))
            .await
            .unwrap();
        s.results.create(&record).await.unwrap();
        record
    };

    let (id, key, ended) = classified(&s).await;
    let status_url = format!("/api/task-status/{id}");
    let gone_at = first_time(
        async || get(&s.app, &status_url).await.0 == StatusCode::NOT_FOUND,
        ended,
        "the finished task",
    )
    .await;
    assert!(
        gone_at - ended >= TTL.as_millis() as i64,
        "deleted {} ms after it ended, before its TTL",
        gone_at - ended
    );
    let (status, body) = get(&s.app, &status_url).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "an expired task is unknown: {body}"
    );
    first_time(async || image_gone(&s, &key).await, ended, "its image").await;
    assert!(s.pipeline.worker().metrics().expired_tasks.get() >= 1);

    let (status, body) = get(&s.app, &format!("/api/task-status/{}", waiting.task_id)).await;
    assert_eq!(status, StatusCode::OK, "an unfinished task never expires");
    assert_eq!(body["state"], "PENDING");
    assert!(
        s.storage.get(&waiting.object_key).await.is_ok(),
        "nor does its image"
    );
}

#[tokio::test]
async fn image_ttl_deletes_the_image_and_keeps_the_result() {
    let config = PipelineConfig {
        image_ttl: Some(TTL),
        ..PipelineConfig::default()
    };
    let s = service_custom(Arc::new(NoopNotifier), config, true);
    let (id, key, ended) = classified(&s).await;
    assert!(!image_gone(&s, &key).await, "kept while the TTL runs");
    let gone_at = first_time(async || image_gone(&s, &key).await, ended, "the image").await;
    assert!(
        gone_at - ended >= TTL.as_millis() as i64,
        "deleted {} ms after the task ended, before its TTL",
        gone_at - ended
    );
    let status_url = format!("/api/task-status/{id}");
    let (status, body) = get(&s.app, &status_url).await;
    assert_eq!(status, StatusCode::OK, "the record stays: {body}");
    assert_eq!(body["state"], "SUCCESS");
    assert_eq!(
        body["result"]["classification"][0]["label"],
        top1("opencv_apple.jpg")
    );

    // A late redelivery of its job finds the task final and leaves it, image or no image.
    let record = s.results.get(id.parse().unwrap()).await.unwrap().unwrap();
    s.queue.enqueue(&record.job()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.queue.depth().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the job is taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let now = s.results.get(record.task_id).await.unwrap().unwrap();
        assert_eq!(now, record, "the final task is unchanged");
        assert!(s.queue.dead_letter_jobs().is_empty(), "nothing failed");
    }
}
