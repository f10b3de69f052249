//! The embedded service under abuse, on loopback and bounded in count and time: hundreds of
//! clients that disconnect mid-upload, then a flood of uploads and synchronous classifications
//! at several times capacity. Every request is answered (202, 200, 429 or 503, never a dropped
//! connection), resident memory stays bounded, and every task that was recorded reaches a final
//! state.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;

/// Sends the head and half the body of an upload, then drops the connection.
async fn disconnect_mid_upload(address: &str, bytes: &[u8], whole: bool) {
    let boundary = "flood-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\
         Content-Type: image/jpeg\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let head = format!(
        "POST /api/upload-image HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; \
         boundary={boundary}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else {
        return;
    };
    let sent = if whole { body.len() } else { body.len() / 2 };
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&body[..sent]).await;
    // Gone without reading the answer.
}

#[tokio::test]
async fn disconnects_and_a_flood_leave_every_task_final_and_memory_bounded() {
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let env: Vec<(String, String)> = [
        ("IMGCLF_ADDR", format!("127.0.0.1:{port}")),
        (
            "IMGCLF_DATA_DIR",
            work.path().join("data").display().to_string(),
        ),
        ("IMGCLF_MAX_QUEUE_DEPTH", "200".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let server = spawn(&http_binary(), &env, work.path());
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    let images = reference_images();
    let jpeg = images
        .iter()
        .find(|(name, _, _)| name.ends_with(".jpg"))
        .unwrap()
        .2
        .clone();

    // 200 clients gone mid-upload: half of them after half the body, half after all of it.
    let address = format!("127.0.0.1:{port}");
    let mut gone = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (address, jpeg) = (address.clone(), jpeg.clone());
        gone.spawn(async move { disconnect_mid_upload(&address, &jpeg, i % 2 == 0).await });
    }
    gone.join_all().await;

    // A flood: 48 clients at once, uploads and synchronous classifications mixed.
    let started = Instant::now();
    let mut peak_kib = 0;
    let mut flood = tokio::task::JoinSet::new();
    for client_no in 0..48 {
        let (client, base, images) = (client.clone(), base.clone(), images.clone());
        flood.spawn(async move {
            let mut answers = Vec::new();
            for (i, (name, _, bytes)) in images.iter().cycle().skip(client_no).take(12).enumerate()
            {
                let path = if i % 3 == 0 {
                    "classify"
                } else {
                    "upload-image"
                };
                let form = reqwest::multipart::Form::new().part(
                    "file",
                    reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.clone()),
                );
                let response = client
                    .post(format!("{base}/api/{path}"))
                    .multipart(form)
                    .timeout(Duration::from_secs(120))
                    .send()
                    .await
                    .expect("every request is answered");
                answers.push(response.status().as_u16());
            }
            answers
        });
    }
    let pid = server.0.id();
    let mut answers = Vec::new();
    while !flood.is_empty() {
        peak_kib = peak_kib.max(vm_rss_kib(pid));
        tokio::select! {
            done = flood.join_next() => answers.extend(done.unwrap().unwrap()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    let count = |code: u16| answers.iter().filter(|a| **a == code).count();
    eprintln!(
        "flood of {} requests in {:?}: {} accepted, {} classified, {} busy (429), {} unavailable \
         (503); peak RSS {} MiB",
        answers.len(),
        started.elapsed(),
        count(202),
        count(200),
        count(429),
        count(503),
        peak_kib / 1024
    );
    assert!(
        answers.iter().all(|a| [200, 202, 429, 503].contains(a)),
        "{answers:?}"
    );
    assert!(
        count(202) + count(200) > 0,
        "the service worked through the flood"
    );
    assert!(peak_kib / 1024 < 1024, "resident memory stayed bounded");

    // Every task recorded (by the disconnected clients too) reaches a final state.
    let database = format!("sqlite://{}", work.path().join("data/imgclf.db").display());
    let records = imgclf::results::SqliteResults::connect(&database)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let open = imgclf::ResultStore::unfinished(&records, usize::MAX)
            .await
            .unwrap();
        if open.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} tasks never finished",
            open.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    server.signal("-TERM");
}
