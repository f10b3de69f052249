//! The HTTP contract, driven through the router without a socket, on the real model with
//! in-memory backends.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use common::*;
use imgclf::notify::NoopNotifier;
use imgclf::queue::MemoryQueue;
use imgclf::results::MemoryResults;
use imgclf::storage::MemoryStorage;
use imgclf::{PipelineConfig, Ports, ResultStore};
use imgclf_http::{router, AppState};
use imgclf_suite::{encode_cmyk_jpeg, image, with_exif_orientation};
use serde_json::Value;
use tower::ServiceExt;

#[tokio::test]
async fn upload_then_poll_returns_the_reference_classification() {
    let s = service();
    let names = [
        "opencv_apple.jpg",
        "skimage_chelsea.png",
        "darknet_eagle.jpg",
        "skimage_coffee.png",
    ];
    let mut ids = Vec::new();
    for name in names {
        let bytes = image(name);
        let request = multipart(
            "/api/upload-image",
            &[
                Part::File(name, &bytes),
                Part::Text("metadata", r#"{"user": "ada", "n": 1}"#),
            ],
        );
        let (status, body) = call(&s.app, request).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let id = body["task_id"].as_str().expect("task_id").to_string();
        assert_eq!(body["status_url"], format!("/api/task-status/{id}"));
        ids.push(id);
    }
    for (name, id) in names.iter().zip(&ids) {
        let done = wait_final(&s.app, id).await;
        assert_eq!(done["state"], "SUCCESS", "{done}");
        assert_eq!(done["task_id"], id.as_str());
        let result = &done["result"];
        assert_eq!(result["task_id"], id.as_str());
        let classification = result["classification"].as_array().expect("classification");
        assert_eq!(classification.len(), 5, "top 5 by default");
        assert_eq!(classification[0]["label"], top1(name), "{name}");
        let p: Vec<f64> = classification
            .iter()
            .map(|c| c["probability"].as_f64().unwrap())
            .collect();
        assert!(p.windows(2).all(|w| w[0] >= w[1]), "sorted by probability");
        assert!(classification[0]["class_id"].is_u64());
        let timings = &result["timings"];
        assert!(
            timings["infer_ms"].as_f64().unwrap() > 0.0,
            "stage timings are stored: {timings}"
        );
        assert!(timings["preprocess_ms"].as_f64().unwrap() > 0.0);
        let metadata = &result["metadata"];
        assert_eq!(metadata["user"], "ada");
        assert_eq!(metadata["n"], 1);
        assert_eq!(metadata["filename"], *name);
        let object = metadata["object_name"].as_str().expect("object_name");
        assert!(
            object.contains(id.as_str()),
            "the object is named after the task"
        );
        assert!(s.storage.len() >= names.len(), "images are kept in storage");
    }
}

#[tokio::test]
async fn query_parameters_are_accepted_like_form_fields() {
    let s = service();
    let bytes = image("opencv_fruits.jpg");
    let uri = "/api/upload-image?metadata=%7B%22batch%22%3A%227%22%7D";
    let (status, body) = call(&s.app, multipart(uri, &[Part::File("f.jpg", &bytes)])).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let done = wait_final(&s.app, body["task_id"].as_str().unwrap()).await;
    assert_eq!(done["result"]["metadata"]["batch"], "7");
}

/// What the test receiver saw of one callback request.
struct Received {
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
}

fn signed_webhooks(secret: &str, allow: &str) -> Arc<dyn imgclf::Notifier> {
    let config = imgclf::notify::WebhookConfig {
        timeout: Duration::from_secs(5),
        secret: Some(secret.into()),
        policy: imgclf::notify::CallbackPolicy::new(
            allow
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|n| n.parse().unwrap())
                .collect(),
        ),
        ..imgclf::notify::WebhookConfig::default()
    };
    Arc::new(imgclf::notify::WebhookNotifier::new(config).unwrap())
}

#[tokio::test]
async fn the_webhook_receives_the_final_status_signed_and_retried() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Received>();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hook = Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
            let (tx, calls) = (tx.clone(), calls.clone());
            async move {
                tx.send(Received { headers, body }).unwrap();
                // The first attempt fails: the notifier must retry the same delivery.
                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let url = format!("{}/hook", serve_locally(hook).await);

    let secret = "test-signing-secret";
    let s = service_with(signed_webhooks(secret, "127.0.0.0/8"));
    let bytes = image("skimage_chelsea.png");
    let request = multipart(
        "/api/upload-image",
        &[
            Part::File("cat.png", &bytes),
            Part::Text("callback_url", &url),
        ],
    );
    let (status, body) = call(&s.app, request).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let first = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("a callback")
        .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a retry")
        .unwrap();
    let id = |r: &Received| r.headers["x-imgclf-delivery"].to_str().unwrap().to_string();
    assert_eq!(
        id(&first),
        id(&second),
        "a retry carries the same delivery id"
    );
    for received in [&first, &second] {
        // What a receiver does: HMAC-SHA256 over "<delivery id>.<timestamp>.<body>" with the
        // shared secret.
        use hmac::Mac;
        let delivery = received.headers["x-imgclf-delivery"].to_str().unwrap();
        let timestamp = received.headers["x-imgclf-timestamp"].to_str().unwrap();
        let signature = received.headers["x-imgclf-signature"].to_str().unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{delivery}.{timestamp}.").as_bytes());
        mac.update(&received.body);
        assert_eq!(
            signature,
            format!("v2={}", hex::encode(mac.finalize().into_bytes()))
        );
    }
    let delivered: Value = serde_json::from_slice(&second.body).unwrap();
    assert_eq!(delivered["task_id"], body["task_id"]);
    assert_eq!(delivered["state"], "SUCCESS");
    assert_eq!(
        delivered["result"]["classification"][0]["label"],
        top1("skimage_chelsea.png")
    );
    // The delivery's state is stored with the task once the receiver has answered.
    let webhook = delivered_webhook(&s.app, body["task_id"].as_str().unwrap()).await;
    assert_eq!(
        webhook["attempts"], 2,
        "one failed attempt, one delivered: {webhook}"
    );
    assert_eq!(delivered["state"], "SUCCESS");
    // The counter moves once the receiver has answered, just after it saw the payload.
    let mut counted = false;
    for _ in 0..100 {
        let (_, metrics) = get(&s.app, "/metrics").await;
        counted = metrics
            .as_str()
            .unwrap()
            .contains("webhook_success_total 1");
        if counted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(counted, "webhook_success_total counts the delivery");
}

/// The task's `webhook` once it says delivered (within two seconds).
async fn delivered_webhook(app: &Router, task_id: &str) -> Value {
    let mut webhook = Value::Null;
    for _ in 0..100 {
        let (_, status) = get(app, &format!("/api/task-status/{task_id}")).await;
        webhook = status["webhook"].clone();
        if webhook["state"] == "delivered" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(webhook["state"], "delivered", "{webhook}");
    webhook
}

/// A dispatcher whose attempt outlives its lease (a stalled process, a receiver that answers
/// late) is taken over; what it learns afterwards must not overwrite the newer attempt's
/// record: here a late "gone for good" over a delivery.
#[tokio::test]
async fn an_attempt_that_outlives_its_lease_records_nothing() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (late_tx, late_rx) = tokio::sync::oneshot::channel::<()>();
    let late_tx = Arc::new(std::sync::Mutex::new(Some(late_tx)));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hook = Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let (tx, calls, late_tx) = (tx.clone(), calls.clone(), late_tx.clone());
            async move {
                tx.send(()).unwrap();
                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    // Well past the lease, then an answer that would end the callback as
                    // failed.
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    let _ = late_tx.lock().unwrap().take().unwrap().send(());
                    StatusCode::GONE
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let url = format!("{}/hook", serve_locally(hook).await);

    let config = PipelineConfig {
        callback_lease: Duration::from_secs(1),
        ..PipelineConfig::default()
    };
    let s = service_custom(signed_webhooks("secret", "127.0.0.0/8"), config, true);
    let bytes = image("opencv_apple.jpg");
    let request = multipart(
        "/api/upload-image",
        &[
            Part::File("apple.jpg", &bytes),
            Part::Text("callback_url", &url),
        ],
    );
    let (status, body) = call(&s.app, request).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    for attempt in ["the first attempt", "the attempt after its lease"] {
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect(attempt)
            .unwrap();
    }
    let task_id = body["task_id"].as_str().unwrap();
    delivered_webhook(&s.app, task_id).await;
    // The first attempt's late answer comes and goes: the delivery stands.
    tokio::time::timeout(Duration::from_secs(30), late_rx)
        .await
        .expect("the late answer")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, status) = get(&s.app, &format!("/api/task-status/{task_id}")).await;
    assert_eq!(status["webhook"]["state"], "delivered", "{status}");
    assert_eq!(status["webhook"]["attempts"], 1, "{status}");
    assert!(rx.try_recv().is_err(), "delivered: no attempt after it");
}

#[tokio::test]
async fn callbacks_to_internal_addresses_are_refused_at_upload() {
    let s = service_with(signed_webhooks("secret", ""));
    let jpeg = image("opencv_apple.jpg");
    for url in [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.5/hook",
        "http://192.168.1.1/hook",
        "http://[::1]:8080/hook",
        "http://[fd00:ec2::254]/",
        "http://0.0.0.0/",
        "http://[::ffff:127.0.0.1]/",
    ] {
        let request = multipart(
            "/api/upload-image",
            &[Part::File("a.jpg", &jpeg), Part::Text("callback_url", url)],
        );
        let (status, body) = call(&s.app, request).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("callback URL refused"), "{url}: {detail}");
    }
    assert!(s.storage.is_empty(), "refused uploads store nothing");
}

#[tokio::test]
async fn an_image_lost_from_storage_fails_cleanly_and_is_dead_lettered() {
    // No worker yet: the task waits in the queue while its image disappears. The worker that
    // takes it then is one of its own (as in another process, or after a restart): the
    // embedded pipeline's own worker would classify the copy its upload held in memory.
    let s = service_custom(Arc::new(NoopNotifier), PipelineConfig::default(), false);
    let jpeg = image("opencv_apple.jpg");
    let (status, body) = call(
        &s.app,
        multipart("/api/upload-image", &[Part::File("a.jpg", &jpeg)]),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["task_id"].as_str().unwrap();
    let key = format!("images/{id}.jpg");
    imgclf::Storage::delete(s.storage.as_ref(), &key)
        .await
        .unwrap();
    let worker = s.pipeline.worker();
    let worker = imgclf::Worker::new(
        worker.ports().clone(),
        worker.classifier().clone(),
        worker.config().clone(),
    );
    let worker = Arc::new(worker);
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(worker.clone().run(stopped));
    let done = wait_final(&s.app, id).await;
    assert_eq!(done["state"], "FAILURE");
    // The client reads a generic message and an error id; the backend's words (here the object
    // key) stay in the log under that id.
    let error = done["error"].as_str().unwrap();
    assert!(
        error.starts_with("the image could not be read from storage (error id "),
        "{done}"
    );
    assert!(!error.contains(&key), "{done}");
    assert!(done.get("result").is_none());
    assert_eq!(
        s.queue.dead_letter_jobs().len(),
        1,
        "a permanent failure is dead-lettered at once"
    );
    let metrics = worker.render_metrics().await;
    assert!(metrics.contains("image_task_failure_total 1"), "{metrics}");
}

#[tokio::test]
async fn a_job_that_keeps_killing_workers_is_given_up_after_max_attempts() {
    let config = PipelineConfig {
        max_attempts: 3,
        ..PipelineConfig::default()
    };
    let s = service_custom(Arc::new(NoopNotifier), config, false);
    let id = &upload_apple(&s).await;
    // Three workers take the job, start it, and die before settling it.
    for attempt in 1..=3 {
        let held = imgclf::Queue::receive(s.queue.as_ref(), 1, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(held[0].attempt(), attempt);
        s.results.start(held[0].job().task_id).await.unwrap();
        drop(held);
    }
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(s.pipeline.clone().run_worker(stopped));
    let done = wait_final(&s.app, id).await;
    assert_eq!(
        done["state"], "FAILURE",
        "the fourth delivery is not run again"
    );
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{done}"
    );
    let dead = s.queue.dead_letter_jobs();
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].0.task_id.to_string(), id);
}

/// Storage that fails its first `outage` reads with a temporary error, as S3 does while it
/// restarts.
struct Unreachable {
    inner: MemoryStorage,
    outage: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl imgclf::Storage for Unreachable {
    async fn put(&self, key: &str, bytes: bytes::Bytes) -> Result<(), imgclf::StorageError> {
        self.inner.put(key, bytes).await
    }
    async fn get(&self, key: &str) -> Result<bytes::Bytes, imgclf::StorageError> {
        let down = (self.outage)
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if down {
            return Err(imgclf::StorageError::temporary("connection refused"));
        }
        self.inner.get(key).await
    }
    async fn delete(&self, key: &str) -> Result<(), imgclf::StorageError> {
        self.inner.delete(key).await
    }
    async fn check(&self) -> Result<(), imgclf::StorageError> {
        Ok(())
    }
}

#[tokio::test]
async fn an_outage_longer_than_every_attempt_fails_nothing() {
    // Eight reads refused, against three attempts allowed: only an attempt that ended without
    // an answer counts, and an outage is waited out.
    let storage = Arc::new(Unreachable {
        inner: MemoryStorage::new(),
        outage: 8.into(),
    });
    let (results, queue) = (
        Arc::new(MemoryResults::new()),
        Arc::new(MemoryQueue::default()),
    );
    let ports = Ports {
        storage: storage.clone(),
        queue: queue.clone(),
        results: results.clone(),
        notifier: Arc::new(NoopNotifier),
    };
    let config = PipelineConfig {
        max_attempts: 3,
        retry_backoff: Duration::from_millis(1),
        ..PipelineConfig::default()
    };
    let pipeline = Arc::new(imgclf::Pipeline::new(ports, classifier(), config));
    // Accepted as an upload is, without the upload's own start on the model.
    let id = imgclf::TaskId::new();
    let record =
        imgclf::TaskRecord::pending(id, format!("images/{id}.jpg"), Default::default(), None);
    imgclf::Storage::put(
        storage.as_ref(),
        &record.object_key,
        image("opencv_apple.jpg").into(),
    )
    .await
    .unwrap();
    results.create(&record).await.unwrap();
    imgclf::Queue::enqueue(queue.as_ref(), &record.job())
        .await
        .unwrap();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(pipeline.run_worker(stopped));
    let done = loop {
        let now = results.get(id).await.unwrap().unwrap();
        if now.state.is_final() {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(done.state, imgclf::TaskState::Success, "{:?}", done.error);
    assert_eq!(
        done.attempts, 1,
        "the attempts that met the outage are not counted"
    );
    assert_eq!(
        storage.outage.load(Ordering::SeqCst),
        0,
        "every refused read was retried"
    );
}

/// Encodes an image with the image crate.
fn encode(image: impl Into<image::DynamicImage>, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .into()
        .write_to(&mut std::io::Cursor::new(&mut out), format)
        .unwrap();
    out
}

/// A PNG whose header claims `width` x `height` but which holds (almost) no pixel data.
fn png_with_header(width: u32, height: u32) -> Vec<u8> {
    let mut png = encode(image::GrayImage::new(1, 1), image::ImageFormat::Png);
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    // Fix the IHDR CRC so only the dimensions are wrong.
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn bad_uploads_get_a_clear_4xx_and_leave_nothing_behind() {
    let s = service();
    let jpeg = image("opencv_apple.jpg");
    let png = image("skimage_coffee.png");
    let gif = encode(image::RgbImage::new(8, 8), image::ImageFormat::Gif);
    let mut corrupt_png = png.clone();
    let middle = corrupt_png.len() / 2;
    corrupt_png[middle..middle + 64]
        .iter_mut()
        .for_each(|b| *b ^= 0x5A);
    let mut corrupt_jpeg = jpeg.clone();
    // Wreck the quantisation and Huffman tables, keep the markers' places.
    for b in corrupt_jpeg[20..600].iter_mut() {
        if *b != 0xFF {
            *b = 0xFF;
        }
    }
    let bomb = png_with_header(4000, 4000);
    let enormous = png_with_header(100_000, 100_000);
    let zero = png_with_header(0, 10);
    let oversize = vec![0xFFu8; MAX_UPLOAD + 1];
    let big_metadata = format!(r#"{{"x": "{}"}}"#, "a".repeat(20_000));
    let long_url = format!("https://example.com/{}", "a".repeat(3000));
    let long_key = "k".repeat(300);
    let upload = |parts: &[Part]| multipart("/api/upload-image", parts);
    use StatusCode as S;
    let cases: Vec<(&str, Request<Body>, StatusCode, &str)> = vec![
        (
            "no file field",
            upload(&[Part::Text("metadata", "{}")]),
            S::UNPROCESSABLE_ENTITY,
            "missing multipart field 'file'",
        ),
        (
            "empty file",
            upload(&[Part::File("a.jpg", b"")]),
            S::UNPROCESSABLE_ENTITY,
            "empty",
        ),
        (
            "text named .jpg",
            upload(&[Part::File("a.jpg", b"just some text, honest")]),
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported image format",
        ),
        (
            "HTML",
            upload(&[Part::File("a.png", b"<!doctype html><html></html>")]),
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported image format",
        ),
        (
            "PDF",
            upload(&[Part::File("a.jpg", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj")]),
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported image format",
        ),
        (
            "SVG",
            upload(&[Part::File(
                "a.svg",
                b"<svg xmlns='http://www.w3.org/2000/svg'/>",
            )]),
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported image format",
        ),
        (
            "ZIP",
            upload(&[Part::File("a.jpg", b"PK\x03\x04\x14\x00\x00\x00")]),
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported image format",
        ),
        (
            "PNG magic only",
            upload(&[Part::File("a.png", b"\x89PNG\r\n\x1a\n")]),
            S::UNPROCESSABLE_ENTITY,
            "cannot be decoded",
        ),
        (
            "JPEG magic only",
            upload(&[Part::File("a.jpg", &jpeg[..4])]),
            S::UNPROCESSABLE_ENTITY,
            "cannot be decoded",
        ),
        (
            "GIF magic only",
            upload(&[Part::File("a.gif", b"GIF89a")]),
            S::UNPROCESSABLE_ENTITY,
            "cannot be decoded",
        ),
        (
            "WebP header only",
            upload(&[Part::File("a.webp", b"RIFF\x24\x00\x00\x00WEBPVP8 ")]),
            S::UNPROCESSABLE_ENTITY,
            "cannot be decoded",
        ),
        (
            "BMP header only",
            upload(&[Part::File("a.bmp", b"BM\x36\x00\x00\x00\x00\x00\x00\x00")]),
            S::UNPROCESSABLE_ENTITY,
            "cannot be decoded",
        ),
        (
            "TIFF header only",
            upload(&[Part::File("a.tif", b"II*\x00\x08\x00\x00\x00")]),
            S::UNPROCESSABLE_ENTITY,
            "cannot be decoded",
        ),
        (
            "truncated JPEG",
            upload(&[Part::File("a.jpg", &jpeg[..jpeg.len() / 2])]),
            S::UNPROCESSABLE_ENTITY,
            "truncated JPEG",
        ),
        (
            "truncated PNG",
            upload(&[Part::File("a.png", &png[..png.len() / 3])]),
            S::UNPROCESSABLE_ENTITY,
            "cannot be decoded",
        ),
        (
            "truncated GIF",
            upload(&[Part::File("a.gif", &gif[..gif.len() - 12])]),
            S::UNPROCESSABLE_ENTITY,
            "cannot be decoded",
        ),
        (
            "corrupt PNG data",
            upload(&[Part::File("a.png", &corrupt_png)]),
            S::UNPROCESSABLE_ENTITY,
            "cannot be decoded",
        ),
        (
            "corrupt JPEG tables",
            upload(&[Part::File("a.jpg", &corrupt_jpeg)]),
            S::UNPROCESSABLE_ENTITY,
            "cannot be decoded",
        ),
        (
            "zero width",
            upload(&[Part::File("z.png", &zero)]),
            S::UNPROCESSABLE_ENTITY,
            "cannot be decoded",
        ),
        (
            "decompression bomb",
            upload(&[Part::File("bomb.png", &bomb)]),
            S::UNPROCESSABLE_ENTITY,
            "more than the limit",
        ),
        (
            "enormous dimensions, tiny file",
            upload(&[Part::File("huge.png", &enormous)]),
            S::UNPROCESSABLE_ENTITY,
            "more than the limit",
        ),
        (
            "oversize body",
            upload(&[Part::File("big.jpg", &oversize)]),
            S::PAYLOAD_TOO_LARGE,
            "limit",
        ),
        (
            "metadata not JSON",
            upload(&[Part::File("a.jpg", &jpeg), Part::Text("metadata", "{nope")]),
            S::UNPROCESSABLE_ENTITY,
            "not valid JSON",
        ),
        (
            "metadata an array",
            upload(&[Part::File("a.jpg", &jpeg), Part::Text("metadata", "[1, 2]")]),
            S::UNPROCESSABLE_ENTITY,
            "JSON object",
        ),
        (
            "metadata null",
            upload(&[Part::File("a.jpg", &jpeg), Part::Text("metadata", "null")]),
            S::UNPROCESSABLE_ENTITY,
            "JSON object",
        ),
        (
            "metadata a string",
            upload(&[Part::File("a.jpg", &jpeg), Part::Text("metadata", "\"hi\"")]),
            S::UNPROCESSABLE_ENTITY,
            "JSON object",
        ),
        (
            "huge metadata",
            upload(&[
                Part::File("a.jpg", &jpeg),
                Part::Text("metadata", &big_metadata),
            ]),
            S::PAYLOAD_TOO_LARGE,
            "metadata",
        ),
        (
            "ftp callback",
            upload(&[
                Part::File("a.jpg", &jpeg),
                Part::Text("callback_url", "ftp://example.com/x"),
            ]),
            S::UNPROCESSABLE_ENTITY,
            "only http and https",
        ),
        (
            "javascript callback",
            upload(&[
                Part::File("a.jpg", &jpeg),
                Part::Text("callback_url", "javascript:alert(1)"),
            ]),
            S::UNPROCESSABLE_ENTITY,
            "callback URL refused",
        ),
        (
            "relative callback",
            multipart(
                "/api/upload-image?callback_url=/hook",
                &[Part::File("a.jpg", &jpeg)],
            ),
            S::UNPROCESSABLE_ENTITY,
            "callback URL refused",
        ),
        (
            "callback with credentials",
            upload(&[
                Part::File("a.jpg", &jpeg),
                Part::Text("callback_url", "http://user:pw@example.com/"),
            ]),
            S::UNPROCESSABLE_ENTITY,
            "credentials",
        ),
        (
            "callback without host",
            upload(&[
                Part::File("a.jpg", &jpeg),
                Part::Text("callback_url", "http:///hook"),
            ]),
            S::UNPROCESSABLE_ENTITY,
            "callback URL refused",
        ),
        (
            "callback too long",
            upload(&[
                Part::File("a.jpg", &jpeg),
                Part::Text("callback_url", &long_url),
            ]),
            S::UNPROCESSABLE_ENTITY,
            "longer than",
        ),
        (
            "two files",
            upload(&[Part::File("a.jpg", &jpeg), Part::File("b.jpg", &jpeg)]),
            S::UNPROCESSABLE_ENTITY,
            "exactly one",
        ),
        (
            "top_k on upload",
            upload(&[Part::File("a.jpg", &jpeg), Part::Text("top_k", "3")]),
            S::UNPROCESSABLE_ENTITY,
            "top_k",
        ),
        (
            "not multipart",
            Request::post("/api/upload-image")
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .unwrap(),
            S::BAD_REQUEST,
            "multipart",
        ),
        (
            "no content type",
            Request::post("/api/upload-image")
                .body(Body::from("hello"))
                .unwrap(),
            S::BAD_REQUEST,
            "multipart",
        ),
        (
            "broken multipart",
            Request::post("/api/upload-image")
                .header("content-type", "multipart/form-data; boundary=x")
                .body(Body::from("--x\r\nnonsense"))
                .unwrap(),
            S::BAD_REQUEST,
            "malformed multipart",
        ),
        (
            "a body cut off by its client",
            Request::post("/api/upload-image")
                .header("content-type", "multipart/form-data; boundary=x")
                .body(Body::from_stream(futures_util::stream::iter([
                    Ok(bytes::Bytes::from_static(
                        b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nab",
                    )),
                    Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
                ])))
                .unwrap(),
            S::BAD_REQUEST,
            "malformed multipart",
        ),
        (
            "oversize Idempotency-Key",
            {
                let mut r = upload(&[Part::File("a.jpg", &jpeg)]);
                r.headers_mut()
                    .insert("idempotency-key", long_key.parse().unwrap());
                r
            },
            S::UNPROCESSABLE_ENTITY,
            "Idempotency-Key",
        ),
        (
            "top_k zero",
            multipart("/api/classify?top_k=0", &[Part::File("a.jpg", &jpeg)]),
            S::UNPROCESSABLE_ENTITY,
            "top_k",
        ),
        (
            "top_k too big",
            multipart("/api/classify?top_k=101", &[Part::File("a.jpg", &jpeg)]),
            S::UNPROCESSABLE_ENTITY,
            "top_k",
        ),
        (
            "top_k negative",
            multipart("/api/classify?top_k=-1", &[Part::File("a.jpg", &jpeg)]),
            S::UNPROCESSABLE_ENTITY,
            "top_k",
        ),
        (
            "top_k not a number",
            multipart(
                "/api/classify",
                &[Part::File("a.jpg", &jpeg), Part::Text("top_k", "five")],
            ),
            S::UNPROCESSABLE_ENTITY,
            "top_k",
        ),
        (
            "classify a GIF header",
            multipart("/api/classify", &[Part::File("a.gif", b"GIF89a")]),
            S::UNPROCESSABLE_ENTITY,
            "cannot be decoded",
        ),
    ];
    assert!(cases.len() >= 30);
    for (what, request, expected, message) in cases {
        let (status, body) = call(&s.app, request).await;
        assert_eq!(status, expected, "{what}: {body}");
        let detail = body["detail"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no detail in {body}"));
        assert!(
            detail.contains(message),
            "{what}: {detail:?} should mention {message:?}"
        );
    }
    assert!(s.storage.is_empty(), "rejected uploads store nothing");
    assert!(
        s.results.unfinished(usize::MAX).await.unwrap().is_empty(),
        "and record nothing"
    );
    // The service keeps serving: a good image still goes through.
    let (status, body) = call(&s.app, upload(&[Part::File("a.jpg", &jpeg)])).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        wait_final(&s.app, body["task_id"].as_str().unwrap()).await["state"],
        "SUCCESS"
    );
}

#[tokio::test]
async fn unusual_but_valid_images_are_classified() {
    let s = service();
    let cat = image::load_from_memory(&image("skimage_chelsea.png"))
        .unwrap()
        .to_rgb8();
    let (w, h) = cat.dimensions();
    let cat16 = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(w, h, |x, y| {
        image::Rgb(cat.get_pixel(x, y).0.map(|v| u16::from(v) * 257))
    });
    let grey_alpha = image::DynamicImage::ImageRgb8(cat.clone()).to_luma_alpha8();
    let mut animated = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut animated);
        let frame = image::DynamicImage::ImageRgb8(cat.clone()).to_rgba8();
        let frames = [frame.clone(), image::imageops::flip_vertical(&frame)]
            .into_iter()
            .map(image::Frame::new);
        encoder.encode_frames(frames).unwrap();
    }
    let cmyk = encode_cmyk_jpeg(cat.as_raw(), (w as usize, h as usize), false);
    // A JPEG without EXIF of its own (a second APP1 would be ignored), and not square.
    let jpeg = image("opencv_messi5.jpg");
    let rotated = with_exif_orientation(&jpeg, 6);
    let decoded = imgclf::preprocess::decode_rgb8(&rotated, u64::MAX).unwrap();
    let plain = imgclf::preprocess::decode_rgb8(&jpeg, u64::MAX).unwrap();
    assert_eq!(decoded.dimensions(), (plain.height(), plain.width()));
    assert_eq!(
        decoded.get_pixel(decoded.width() - 1, 0),
        plain.get_pixel(0, 0),
        "rotated 90° clockwise"
    );

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("16-bit PNG", encode(cat16, image::ImageFormat::Png)),
        (
            "grey + alpha PNG",
            encode(grey_alpha, image::ImageFormat::Png),
        ),
        ("animated GIF", animated),
        ("CMYK JPEG", cmyk),
        ("EXIF-rotated JPEG", rotated),
        (
            "WebP (lossless)",
            encode(cat.clone(), image::ImageFormat::WebP),
        ),
        ("BMP", encode(cat.clone(), image::ImageFormat::Bmp)),
        ("TIFF", encode(cat.clone(), image::ImageFormat::Tiff)),
        (
            "tiny 1x1 PNG",
            encode(image::RgbImage::new(1, 1), image::ImageFormat::Png),
        ),
        (
            "panorama 4000x40 PNG",
            encode(image::RgbImage::new(4000, 40), image::ImageFormat::Png),
        ),
        // Resized, the long side of a thin image is a billion pixels; the crop keeps 224.
        (
            "thin 4000000x1 PNG",
            encode(image::GrayImage::new(4_000_000, 1), image::ImageFormat::Png),
        ),
        (
            "thin 1x500000 PNG",
            encode(image::GrayImage::new(1, 500_000), image::ImageFormat::Png),
        ),
        (
            "thin 65500x1 JPEG",
            encode(image::GrayImage::new(65_500, 1), image::ImageFormat::Jpeg),
        ),
    ];
    let mut ids = Vec::new();
    for (what, bytes) in &cases {
        let (status, body) = call(
            &s.app,
            multipart("/api/upload-image", &[Part::File("x", bytes)]),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{what}: {body}");
        ids.push((what, body["task_id"].as_str().unwrap().to_string()));
    }
    for (what, id) in ids {
        let done = wait_final(&s.app, &id).await;
        assert_eq!(done["state"], "SUCCESS", "{what}: {done}");
        let top = &done["result"]["classification"][0];
        if what.contains("PNG")
            && !what.contains("tiny")
            && !what.contains("panorama")
            && !what.contains("thin")
            || what.contains("TIFF")
            || what.contains("BMP")
            || what.contains("WebP")
        {
            // Lossless copies of the cat: a cat it must remain.
            assert!(
                ["Egyptian cat", "tabby", "tiger cat"].contains(&top["label"].as_str().unwrap()),
                "{what}: {top}"
            );
        }
    }
}

#[tokio::test]
async fn every_error_is_json_with_a_detail() {
    let s = service();
    let requests = [
        (
            "an unknown route",
            Request::get("/api/nothing-here").body(Body::empty()),
        ),
        (
            "a method the route does not take",
            Request::delete("/api/upload-image").body(Body::empty()),
        ),
        (
            "a query string that names a parameter twice",
            Request::get("/api/task-status/0b0e1c1e-5f5f-4c4c-8d8d-000000000000?wait=1&wait=2")
                .body(Body::empty()),
        ),
    ];
    for (what, request) in requests {
        let response = s.app.clone().oneshot(request.unwrap()).await.unwrap();
        let status = response.status();
        assert!(status.is_client_error(), "{what}: {status}");
        let kind = response.headers()[axum::http::header::CONTENT_TYPE].clone();
        assert_eq!(kind, "application/json", "{what}");
        let body = http_body_util::BodyExt::collect(response.into_body()).await;
        let body: Value = serde_json::from_slice(&body.unwrap().to_bytes()).unwrap();
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(!detail.is_empty(), "{what}: {body}");
    }
}

#[tokio::test]
async fn unknown_tasks_are_404() {
    let s = service();
    for id in ["0b0e1c1e-5f5f-4c4c-8d8d-000000000000", "not-a-uuid", "1"] {
        let (status, body) = get(&s.app, &format!("/api/task-status/{id}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{id}");
        assert!(body["detail"].as_str().unwrap().contains("unknown task id"));
    }
}

#[tokio::test]
async fn classify_answers_synchronously() {
    let s = service();
    let bytes = image("darknet_dog.jpg");
    let request = multipart(
        "/api/classify?top_k=3",
        &[
            Part::File("dog.jpg", &bytes),
            Part::Text("metadata", r#"{"k": true}"#),
        ],
    );
    let (status, body) = call(&s.app, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let classification = body["classification"].as_array().unwrap();
    assert_eq!(classification.len(), 3);
    assert_eq!(classification[0]["label"], top1("darknet_dog.jpg"));
    assert_eq!(body["metadata"]["filename"], "dog.jpg");
    assert_eq!(body["model"], "efficientnet-lite0");
    assert!(
        s.storage.is_empty(),
        "synchronous classification stores nothing"
    );
}

/// A process without a model (a distributed `imgclf-http`) answers `/api/classify` through the
/// queue and the workers; with no worker running it says so in time instead of hanging.
#[tokio::test]
async fn classify_without_a_local_model_goes_through_the_workers() {
    let s = service_custom(Arc::new(NoopNotifier), PipelineConfig::default(), false);
    let accepting = AppState::new(s.pipeline.submitter().clone(), None, MAX_UPLOAD);
    let app = router(accepting.clone(), Duration::from_secs(3));
    let bytes = image("darknet_dog.jpg");
    let request = || {
        multipart(
            "/api/classify?top_k=3",
            &[
                Part::File("dog.jpg", &bytes),
                Part::Text("metadata", r#"{"k": true}"#),
            ],
        )
    };

    // No worker yet: the image waits in the queue, the client gets 504 and the task id.
    let (status, body) = call(&app, request()).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("/api/task-status/"),
        "{body}"
    );
    let (ready, body) = get(&app, "/ready").await;
    assert_eq!(ready, StatusCode::OK, "ready without a model: {body}");

    // A worker (here in the same process, over the same ports) answers it.
    let worker = imgclf::Worker::new(
        s.pipeline.submitter().ports().clone(),
        classifier(),
        PipelineConfig::default(),
    );
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(Arc::new(worker).run(stopped));
    let app = router(accepting, Duration::from_secs(60));
    let (status, body) = call(&app, request()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let classification = body["classification"].as_array().unwrap();
    assert_eq!(
        classification.len(),
        3,
        "the client's top_k travels with the job"
    );
    assert_eq!(classification[0]["label"], top1("darknet_dog.jpg"));
    assert_eq!(body["metadata"]["filename"], "dog.jpg");
    assert_eq!(body["metadata"]["k"], true);
    assert_eq!(body["model"], "efficientnet-lite0");
}

#[tokio::test]
async fn health_ready_metrics_and_openapi() {
    let s = service();
    let (status, _) = get(&s.app, "/health").await;
    assert_eq!(status, StatusCode::OK);
    let mut ready = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..600 {
        ready = get(&s.app, "/ready").await.0;
        if ready == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, StatusCode::OK, "ready once the model is warm");

    // A queued job shows in the depth gauge; stop the worker first so it stays queued.
    let bytes = image("opencv_apple.jpg");
    let _ = s._stop.send(true);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, _) = call(
        &s.app,
        multipart("/api/upload-image", &[Part::File("a.jpg", &bytes)]),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, metrics) = get(&s.app, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let metrics = metrics.as_str().unwrap();
    for name in [
        "image_task_success_total",
        "image_task_failure_total",
        "image_task_latency_seconds_bucket",
        "webhook_success_total",
        "webhook_failure_total",
        "webhook_latency_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    assert!(
        metrics.contains("image_queue_depth 1"),
        "queue depth is real: {metrics}"
    );
    assert!(
        metrics.contains("celery_queue_depth 1"),
        "under the replaced service's name too"
    );
    let (status, slashed) = get(&s.app, "/metrics/").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the replaced service's path, with its slash"
    );
    assert!(slashed
        .as_str()
        .unwrap()
        .contains("image_task_success_total"));

    let (status, doc) = get(&s.app, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/upload-image",
        "/api/task-status/{task_id}",
        "/api/classify",
        "/health",
        "/ready",
        "/metrics",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} documented");
    }
    drop(s.pipeline);
}

/// With `/metrics` on an address of its own, the API's address neither serves it nor lists it
/// in its OpenAPI document.
#[tokio::test]
async fn metrics_on_their_own_address_leave_the_api_and_its_document() {
    let s = service();
    let mut state = AppState::embedded(&s.pipeline, MAX_UPLOAD);
    state.serve_metrics = false;
    let app = router(state.clone(), Duration::from_secs(30));
    for path in ["/metrics", "/metrics/"] {
        let (status, _) = get(&app, path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, doc) = get(&app, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["paths"].get("/metrics").is_none(), "{doc}");
    assert!(doc["paths"].get("/api/upload-image").is_some());
    let (_, full) = get(&s.app, "/openapi.json").await;
    assert!(full["paths"].get("/metrics").is_some());

    let (status, metrics) = get(&imgclf_http::metrics_router(state), "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(metrics.as_str().unwrap().contains("image_queue_depth"));
}

#[tokio::test]
async fn api_keys_guard_the_api_but_not_health() {
    let s = service();
    let state = AppState::embedded(&s.pipeline, MAX_UPLOAD)
        .with_api_keys(&["k-one".into(), "k-two".into()]);
    let app = router(state, Duration::from_secs(30));
    let jpeg = image("opencv_apple.jpg");
    let upload = |key: Option<&str>| {
        let mut request = multipart("/api/upload-image", &[Part::File("a.jpg", &jpeg)]);
        if let Some(key) = key {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        request
    };
    for key in [None, Some("wrong"), Some("k-one2"), Some("")] {
        let response = app.clone().oneshot(upload(key)).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    for key in ["k-one", "k-two"] {
        let (status, body) = call(&app, upload(Some(key))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let status_uri = "/api/task-status/0b0e1c1e-5f5f-4c4c-8d8d-000000000000";
    assert_eq!(get(&app, status_uri).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        get(&app, "/health").await.0,
        StatusCode::OK,
        "/health stays open"
    );
    assert!(s.storage.len() == 2, "refused requests store nothing");
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let config = PipelineConfig {
        max_queue_depth: 2,
        ..PipelineConfig::default()
    };
    // No worker: the queue only grows.
    let s = service_custom(Arc::new(NoopNotifier), config, false);
    let jpeg = image("opencv_apple.jpg");
    for _ in 0..2 {
        let (status, body) = call(
            &s.app,
            multipart("/api/upload-image", &[Part::File("a.jpg", &jpeg)]),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        // The depth is cached for a second; let it be read again.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let response = s
        .app
        .clone()
        .oneshot(multipart(
            "/api/upload-image",
            &[Part::File("a.jpg", &jpeg)],
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "5");
    assert_eq!(s.storage.len(), 2, "a refused upload stores nothing");
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_task() {
    let s = service();
    let (apple, dog) = (image("opencv_apple.jpg"), image("darknet_dog.jpg"));
    let upload = |key: &str, bytes: &[u8]| {
        let mut request = multipart("/api/upload-image", &[Part::File("a.jpg", bytes)]);
        request
            .headers_mut()
            .insert("idempotency-key", key.parse().unwrap());
        request
    };
    let (status, first) = call(&s.app, upload("order-17", &apple)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let (_, again) = call(&s.app, upload("order-17", &apple)).await;
    assert_eq!(
        again["task_id"], first["task_id"],
        "same key and body: same task"
    );
    let (_, other_body) = call(&s.app, upload("order-17", &dog)).await;
    assert_ne!(other_body["task_id"], first["task_id"]);
    let (_, other_key) = call(&s.app, upload("order-18", &apple)).await;
    assert_ne!(other_key["task_id"], first["task_id"]);
    assert_eq!(s.storage.len(), 3, "the repeated upload stored nothing new");
    let done = wait_final(&s.app, first["task_id"].as_str().unwrap()).await;
    assert_eq!(done["state"], "SUCCESS");
    assert_eq!(done["attempts"], 1, "and was classified once");
    let long = "k".repeat(300);
    let (status, _) = call(&s.app, upload(&long, &apple)).await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "an oversize key is refused"
    );
}

/// Takes every waiting job off the queue and acknowledges it: the jobs are lost, as a crash
/// between recording and queueing (or a broker dropping them) would lose them.
async fn lose_every_job(queue: &MemoryQueue) -> usize {
    let deliveries = imgclf::Queue::receive(queue, 100, Duration::from_millis(10))
        .await
        .unwrap();
    let lost = deliveries.len();
    for delivery in deliveries {
        delivery.ack().await.unwrap();
    }
    lost
}

fn quick_requeue() -> PipelineConfig {
    PipelineConfig {
        requeue_after: Duration::from_secs(1),
        ..PipelineConfig::default()
    }
}

#[tokio::test]
async fn a_task_that_lost_its_job_is_queued_again_by_the_sweeper() {
    let s = service_custom(Arc::new(NoopNotifier), quick_requeue(), false);
    let id = upload_apple(&s).await;
    assert_eq!(lose_every_job(&s.queue).await, 1);
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(s.pipeline.clone().run_worker(stopped));
    let done = wait_final(&s.app, &id).await;
    assert_eq!(
        done["state"], "SUCCESS",
        "the sweeper queued it again: {done}"
    );
}

/// Uploads a photo with `key`, loses its job, lets the task go stale (with another task's job
/// waiting behind, for a `backlog`) and uploads it again with the same key: the jobs then
/// waiting.
async fn retry_a_stale_upload(s: &Service, key: &str, backlog: bool) -> u64 {
    let jpeg = image("opencv_apple.jpg");
    let upload = || {
        let mut request = multipart("/api/upload-image", &[Part::File("a.jpg", &jpeg)]);
        request
            .headers_mut()
            .insert("idempotency-key", key.parse().unwrap());
        request
    };
    let (status, first) = call(&s.app, upload()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    assert_eq!(lose_every_job(&s.queue).await, 1);
    if backlog {
        upload_apple(s).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, again) = call(&s.app, upload()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["task_id"], first["task_id"], "the same task");
    imgclf::Queue::depth(s.queue.as_ref()).await.unwrap()
}

#[tokio::test]
async fn a_retried_upload_requeues_its_stranded_task() {
    let s = service_custom(Arc::new(NoopNotifier), quick_requeue(), false);
    let waiting = retry_a_stale_upload(&s, "stranded-1", false).await;
    assert_eq!(waiting, 1, "the retry queued the stranded task again");
}

#[tokio::test]
async fn a_retried_upload_leaves_its_stale_task_to_the_sweepers_while_jobs_wait() {
    let s = service_custom(Arc::new(NoopNotifier), quick_requeue(), false);
    let waiting = retry_a_stale_upload(&s, "backlog-1", true).await;
    assert_eq!(
        waiting, 1,
        "only the other task's job: the sweepers decide on this one"
    );
}

#[tokio::test]
async fn attempts_counted_by_the_record_outlive_the_queue_s_count() {
    // An in-memory queue forgets its delivery counts when the process restarts; the record
    // keeps counting, so an image that kills every worker is still given up on.
    let config = PipelineConfig {
        max_attempts: 3,
        ..PipelineConfig::default()
    };
    let s = service_custom(Arc::new(NoopNotifier), config, false);
    let id: imgclf::TaskId = upload_apple(&s).await.parse().unwrap();
    for _ in 0..3 {
        // Three starts whose workers died (as counted before a restart).
        s.results.start(id).await.unwrap();
    }
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(s.pipeline.clone().run_worker(stopped));
    let done = wait_final(&s.app, &id.to_string()).await;
    assert_eq!(done["state"], "FAILURE", "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .starts_with("gave up after 3 attempts"),
        "{done}"
    );
}

/// A broker that never confirms a publish (RabbitMQ in flow control, say).
struct StuckQueue(MemoryQueue);

#[async_trait::async_trait]
impl imgclf::Queue for StuckQueue {
    async fn enqueue(&self, _job: &imgclf::Job) -> Result<(), imgclf::QueueError> {
        std::future::pending().await
    }
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Box<dyn imgclf::Delivery>>, imgclf::QueueError> {
        self.0.receive(max, wait).await
    }
    async fn depth(&self) -> Result<u64, imgclf::QueueError> {
        self.0.depth().await
    }
    async fn dead_letters(&self) -> Result<u64, imgclf::QueueError> {
        self.0.dead_letters().await
    }
    async fn check(&self) -> Result<(), imgclf::QueueError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_publish_that_never_returns_is_a_clean_503_with_nothing_kept() {
    let storage = Arc::new(MemoryStorage::new());
    let results = Arc::new(MemoryResults::new());
    let ports = Ports {
        storage: storage.clone(),
        queue: Arc::new(StuckQueue(MemoryQueue::default())),
        results: results.clone(),
        notifier: Arc::new(NoopNotifier),
    };
    let config = PipelineConfig {
        publish_timeout: Duration::from_millis(300),
        ..PipelineConfig::default()
    };
    let submitter = Arc::new(imgclf::Submitter::new(ports, config));
    let app = router(
        AppState::new(submitter, None, MAX_UPLOAD),
        Duration::from_secs(30),
    );
    let jpeg = image("opencv_apple.jpg");
    let response = app
        .clone()
        .oneshot(multipart(
            "/api/upload-image",
            &[Part::File("a.jpg", &jpeg)],
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert!(storage.is_empty(), "the image was removed");
    assert!(
        results.unfinished(usize::MAX).await.unwrap().is_empty(),
        "the record was removed"
    );
}

/// A broker that refuses its first `refusals` publishes (a blocked connection, say).
struct RefusingQueue {
    inner: MemoryQueue,
    refusals: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl imgclf::Queue for RefusingQueue {
    async fn enqueue(&self, job: &imgclf::Job) -> Result<(), imgclf::QueueError> {
        let refused = (self.refusals)
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refused {
            return Err(imgclf::QueueError::temporary("connection blocked"));
        }
        self.inner.enqueue(job).await
    }
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Box<dyn imgclf::Delivery>>, imgclf::QueueError> {
        self.inner.receive(max, wait).await
    }
    async fn depth(&self) -> Result<u64, imgclf::QueueError> {
        self.inner.depth().await
    }
    async fn dead_letters(&self) -> Result<u64, imgclf::QueueError> {
        self.inner.dead_letters().await
    }
    async fn check(&self) -> Result<(), imgclf::QueueError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_keyed_upload_refused_at_queueing_is_kept_for_its_retry() {
    // A client that timed out may already have retried with its key and been told 202 for this
    // very task: a refusal must not take the task away from under that answer.
    let queue = Arc::new(RefusingQueue {
        inner: MemoryQueue::default(),
        refusals: 1.into(),
    });
    let ports = Ports {
        storage: Arc::new(MemoryStorage::new()),
        queue: queue.clone(),
        results: Arc::new(MemoryResults::new()),
        notifier: Arc::new(NoopNotifier),
    };
    let config = PipelineConfig {
        max_pixels: MAX_PIXELS,
        retry_backoff: Duration::from_millis(10),
        ..PipelineConfig::default()
    };
    let pipeline = Arc::new(imgclf::Pipeline::new(ports, classifier(), config));
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(pipeline.clone().run_worker(stopped));
    let app = router(
        AppState::embedded(&pipeline, MAX_UPLOAD),
        Duration::from_secs(30),
    );
    let jpeg = image("opencv_apple.jpg");
    let upload = || {
        let mut request = multipart("/api/upload-image", &[Part::File("a.jpg", &jpeg)]);
        request
            .headers_mut()
            .insert("idempotency-key", "order-99".parse().unwrap());
        request
    };
    let (status, refused) = call(&app, upload()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    let (status, again) = call(&app, upload()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    let done = wait_final(&app, again["task_id"].as_str().unwrap()).await;
    assert_eq!(
        done["state"], "SUCCESS",
        "queued once the broker took it: {done}"
    );
    assert_eq!(done["attempts"], 1);
}

/// Distributed, a task ends in a worker's process: the result store's word that it ended
/// wakes the waits of the process that took the upload (they read the store only each second
/// besides).
#[tokio::test]
async fn a_wait_ends_when_another_process_finishes_the_task() {
    let Some(base) = imgclf_suite::service_url("IMGCLF_TEST_POSTGRES") else {
        return;
    };
    let url = imgclf_suite::fresh_postgres_database(&base).await;
    let connect = async || {
        imgclf::results::PostgresResults::connect(&url)
            .await
            .unwrap()
    };
    let (here, worker) = (Arc::new(connect().await), connect().await);
    let ports = Ports {
        storage: Arc::new(MemoryStorage::new()),
        queue: Arc::new(StuckQueue(MemoryQueue::default())),
        results: here,
        notifier: Arc::new(NoopNotifier),
    };
    let submitter = Arc::new(imgclf::Submitter::new(ports, PipelineConfig::default()));
    let app = router(
        AppState::new(submitter, None, MAX_UPLOAD),
        Duration::from_secs(30),
    );
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let listening = async || {
        let listeners: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND query = 'LISTEN \"imgclf_task_final\"'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        listeners == 1
    };
    let started = std::time::Instant::now();
    while !listening().await {
        assert!(started.elapsed() < Duration::from_secs(10), "no listener");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let record = imgclf::TaskRecord::pending(
        imgclf::TaskId::new(),
        "images/a.jpg".into(),
        Default::default(),
        None,
    );
    worker.create(&record).await.unwrap();
    worker.start(record.task_id).await.unwrap();
    let uri = format!("/api/task-status/{}?wait=10", record.task_id);
    let waiting = tokio::spawn(async move { get(&app, &uri).await });
    // Past the wait's second read, which finds it still running; the third is a second later.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let result = imgclf::TaskResult {
        task_id: record.task_id,
        metadata: Default::default(),
        classification: vec![],
        model: "test".into(),
        timings: Default::default(),
    };
    assert!(worker.complete(record.task_id, &result).await.unwrap());
    let ended = std::time::Instant::now();
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "SUCCESS", "{body}");
    assert!(
        ended.elapsed() < Duration::from_millis(400),
        "answered {:?} after the task ended",
        ended.elapsed()
    );
}

#[tokio::test]
async fn file_names_and_metadata_hold_only_what_every_database_stores() {
    let s = service_custom(Arc::new(NoopNotifier), PipelineConfig::default(), false);
    let jpeg = image("opencv_apple.jpg");
    let long_name = format!("{}.jpg", "é".repeat(200));
    let (status, body) = call(
        &s.app,
        multipart("/api/upload-image", &[Part::File(&long_name, &jpeg)]),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id: imgclf::TaskId = body["task_id"].as_str().unwrap().parse().unwrap();
    let record = s.results.get(id).await.unwrap().unwrap();
    let kept = record.metadata["filename"].as_str().unwrap();
    assert!(kept.len() <= 255 && long_name.starts_with(kept), "{kept}");

    for (what, request) in [
        (
            "a NUL in metadata",
            multipart(
                "/api/upload-image",
                &[
                    Part::File("a.jpg", &jpeg),
                    Part::Text("metadata", r#"{"note": "a\u0000b"}"#),
                ],
            ),
        ),
        (
            "a NUL in a metadata key",
            multipart(
                "/api/upload-image",
                &[
                    Part::File("a.jpg", &jpeg),
                    Part::Text("metadata", r#"{"deep": [{"k\u0000": 1}]}"#),
                ],
            ),
        ),
        (
            "a control character in the file name",
            multipart("/api/upload-image", &[Part::File("a\tb.jpg", &jpeg)]),
        ),
    ] {
        let before = s.storage.len();
        let (status, body) = call(&s.app, request).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {body}");
        assert_eq!(s.storage.len(), before, "{what}: nothing stored");
    }
}

/// Beyond the budget of bytes in flight an upload gets 503 at once; one larger than the whole
/// budget is charged all of it, so it runs when nothing else is in flight (else it could never).
#[tokio::test]
async fn uploads_beyond_the_bytes_in_flight_budget_get_503() {
    let s = service_custom(Arc::new(NoopNotifier), PipelineConfig::default(), false);
    let state = AppState::new(s.pipeline.submitter().clone(), None, MAX_UPLOAD)
        .with_inflight_budget(64 * 1024);
    // Another upload's kibibyte, in flight.
    let held = state.inflight_kib.clone().try_acquire_owned().unwrap();
    let app = router(state, Duration::from_secs(30));
    let big = image("skimage_chelsea.png");
    assert!(big.len() > 64 * 1024);
    let request = multipart("/api/upload-image", &[Part::File("big.png", &big)]);
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(s.storage.is_empty());
    let small = image("opencv_apple.jpg");
    assert!(small.len() < 60 * 1024);
    let request = multipart("/api/upload-image", &[Part::File("a.jpg", &small)]);
    let (status, body) = call(&app, request).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    drop(held);
    let request = multipart("/api/upload-image", &[Part::File("big.png", &big)]);
    let (status, body) = call(&app, request).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "alone, the larger upload runs: {body}"
    );
}

/// Uploads a photo that is accepted; returns its task id.
async fn upload_apple(s: &Service) -> String {
    let jpeg = image("opencv_apple.jpg");
    let request = multipart("/api/upload-image", &[Part::File("a.jpg", &jpeg)]);
    let (status, body) = call(&s.app, request).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["task_id"].as_str().unwrap().to_string()
}

/// `?wait=` answers as soon as the task ends (an in-process worker wakes the wait), and a
/// process without the worker (reading the result store) answers within a poll interval.
#[tokio::test]
async fn a_status_request_can_wait_for_the_end_of_its_task() {
    let s = service_custom(Arc::new(NoopNotifier), PipelineConfig::default(), false);
    let id = upload_apple(&s).await;
    let (status, body) = get(&s.app, &format!("/api/task-status/{id}?wait=0.2")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["state"], "PENDING",
        "no worker yet: the wait ends as it stands"
    );
    for bad in ["31", "-1", "soon"] {
        let (status, body) = get(&s.app, &format!("/api/task-status/{id}?wait={bad}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
    }

    let app = s.app.clone();
    let waiting = tokio::spawn({
        let id = id.clone();
        async move {
            let answer = get(&app, &format!("/api/task-status/{id}?wait=30")).await;
            (answer, std::time::Instant::now())
        }
    });
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(s.pipeline.clone().run_worker(stopped));
    let ((status, body), answered) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["state"], "SUCCESS", "{body}");
    let id: imgclf::TaskId = id.parse().unwrap();
    let record = s.results.get(id).await.unwrap().unwrap();
    let ended =
        std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(record.updated_at_ms as u64);
    let late = std::time::SystemTime::now()
        .duration_since(ended)
        .unwrap_or_default()
        .saturating_sub(answered.elapsed());
    assert!(
        late < Duration::from_millis(100),
        "answered {late:?} after the end"
    );
}

#[tokio::test]
async fn cors_headers_only_for_the_configured_origins() {
    let s = service_custom(Arc::new(NoopNotifier), PipelineConfig::default(), false);
    let preflight = |origin: &str| {
        Request::builder()
            .method("OPTIONS")
            .uri("/api/upload-image")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .body(Body::empty())
            .unwrap()
    };
    let allowed = |response: &axum::response::Response| {
        response
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_string())
    };
    // Unset: no CORS headers at all.
    let response = s
        .app
        .clone()
        .oneshot(preflight("https://app.example"))
        .await
        .unwrap();
    assert_eq!(allowed(&response), None);

    let state = AppState::embedded(&s.pipeline, MAX_UPLOAD)
        .with_cors_origins(&["https://app.example".into()])
        .unwrap();
    let app = router(state, Duration::from_secs(30));
    let response = app
        .clone()
        .oneshot(preflight("https://app.example"))
        .await
        .unwrap();
    assert_eq!(allowed(&response).as_deref(), Some("https://app.example"));
    let response = app
        .clone()
        .oneshot(preflight("https://evil.example"))
        .await
        .unwrap();
    assert_eq!(allowed(&response), None, "another origin gets nothing");
    for bad in [
        "bad\norigin",
        "https://app.example/",
        "app.example",
        "https://",
        "ftp://a",
    ] {
        assert!(
            AppState::embedded(&s.pipeline, MAX_UPLOAD)
                .with_cors_origins(&[bad.into()])
                .is_err(),
            "{bad:?} can never match a browser's Origin"
        );
    }
    // `*`: any origin.
    let state = AppState::embedded(&s.pipeline, MAX_UPLOAD)
        .with_cors_origins(&["*".into()])
        .unwrap();
    let app = router(state, Duration::from_secs(30));
    let response = app.oneshot(preflight("https://any.example")).await.unwrap();
    assert_eq!(allowed(&response).as_deref(), Some("*"));
}

/// Status requests and long polls carry no body: an exhausted budget of bytes in flight still
/// answers them (so waiting clients cannot starve uploads of it, nor be starved), while an
/// upload gets its 503.
#[tokio::test]
async fn requests_without_a_body_pass_an_exhausted_in_flight_budget() {
    let s = service_custom(Arc::new(NoopNotifier), PipelineConfig::default(), false);
    let state =
        AppState::new(s.pipeline.submitter().clone(), None, MAX_UPLOAD).with_inflight_budget(1024);
    let held = state.inflight_kib.clone().try_acquire_owned().unwrap();
    let app = router(state, Duration::from_secs(30));
    let unknown = format!("/api/task-status/{}?wait=0.1", imgclf::TaskId::new());
    assert_eq!(get(&app, &unknown).await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(&app, "/api/tasks").await.0, StatusCode::OK);
    let apple = image("opencv_apple.jpg");
    let request = multipart("/api/upload-image", &[Part::File("a.jpg", &apple)]);
    assert_eq!(call(&app, request).await.0, StatusCode::SERVICE_UNAVAILABLE);
    drop(held);
}
