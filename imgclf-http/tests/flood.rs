//! The service under abuse, on loopback and bounded in count and time: hundreds of clients that
//! disconnect mid-upload, then (embedded) a flood of uploads and synchronous classifications at
//! several times capacity. Every request is answered (202, 200, 429 or 503, never a dropped
//! connection), resident memory stays bounded, and nothing is left half done: every image
//! stored has its task, every task its image, and every task is classified. The distributed
//! service (S3, PostgreSQL, and RabbitMQ or Redis) takes the disconnects too.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use sqlx::Connection;
use tokio::io::AsyncWriteExt;

/// Sends the head and half the body of an upload (or all of it, then waits `linger`), then
/// drops the connection without reading the answer.
async fn disconnect_mid_upload(address: &str, bytes: &[u8], whole: bool, linger: Duration) {
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
    tokio::time::sleep(linger).await;
}

/// `count` clients at once, each gone mid-upload: one in three after half the body, the others
/// 0 ms to 2 s after the whole of it. The server drops a request whose client is gone before
/// its acceptance starts (no answer was given, so nothing was promised); the later ones leave
/// while their image, record and job are being written, or once they are.
async fn clients_gone_mid_upload(address: &str, bytes: &[u8], count: usize) {
    let mut gone = tokio::task::JoinSet::new();
    for i in 0..count {
        let (address, bytes) = (address.to_string(), bytes.to_vec());
        let linger = Duration::from_millis([0, 5, 10, 20, 50, 100, 200, 500, 1000, 2000][i % 10]);
        gone.spawn(
            async move { disconnect_mid_upload(&address, &bytes, i % 3 != 0, linger).await },
        );
    }
    gone.join_all().await;
}

/// The first JPEG among the reference photos.
fn a_jpeg() -> Vec<u8> {
    reference_images()
        .into_iter()
        .find(|(name, _, _)| name.ends_with(".jpg"))
        .unwrap()
        .2
}

/// Fails unless the images in storage (`stored`, by key) and the tasks (`recorded`: each one's
/// image key and state) match one to one and every task succeeded: no acceptance was left
/// half done by a client that went away.
fn assert_nothing_half_done(stored: &BTreeSet<String>, recorded: &[(String, String)]) {
    let keys: BTreeSet<String> = recorded.iter().map(|(key, _)| key.clone()).collect();
    let orphans: Vec<_> = stored.difference(&keys).collect();
    let missing: Vec<_> = keys.difference(stored).collect();
    assert!(
        orphans.is_empty() && missing.is_empty(),
        "images without a task: {orphans:?}; tasks without their image: {missing:?}"
    );
    let failed: Vec<_> = recorded.iter().filter(|(_, s)| s != "SUCCESS").collect();
    assert!(failed.is_empty(), "tasks not classified: {failed:?}");
}

/// The keys of the files under `root`, as the local storage names them.
fn stored_files(root: &Path) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let key = path.strip_prefix(root).unwrap();
                keys.insert(key.to_string_lossy().into_owned());
            }
        }
    }
    keys
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
    clients_gone_mid_upload(&format!("127.0.0.1:{port}"), &a_jpeg(), 200).await;

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
    let recorded: Vec<(String, String)> =
        imgclf::ResultStore::list(&records, &imgclf::results::TaskQuery::newest(100_000))
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.object_key, r.state.to_string()))
            .collect();
    assert_nothing_half_done(&stored_files(&work.path().join("data/images")), &recorded);
    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    server.signal("-TERM");
}

/// The distributed service on `queue` with 300 clients gone mid-upload: whatever the server
/// accepted is stored, recorded and queued in full, and classified by the worker.
async fn clients_gone_leave_nothing_half_done(queue: String) {
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let Some((env, results_url)) = distributed_env(queue, port, work.path()).await else {
        return;
    };
    let http = spawn(&http_binary(), &env, work.path());
    let client = reqwest::Client::new();
    wait_ready(&client, &format!("http://127.0.0.1:{port}")).await;
    let _worker = spawn(&worker_binary(), &env, work.path());
    clients_gone_mid_upload(&format!("127.0.0.1:{port}"), &a_jpeg(), 300).await;

    // Acceptances still running end on their own: wait until every task is final and their
    // number has held for two seconds (an acceptance writes its image and record at once, so
    // one caught between the two would look half done).
    let mut db = sqlx::PgConnection::connect(&results_url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = usize::MAX;
    let recorded = loop {
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT object_key, state FROM tasks")
            .fetch_all(&mut db)
            .await
            .unwrap();
        let open = rows
            .iter()
            .filter(|(_, s)| s == "PENDING" || s == "STARTED");
        if open.count() == 0 && rows.len() == last {
            break rows;
        }
        assert!(Instant::now() < deadline, "tasks still open: {rows:?}");
        last = rows.len();
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    eprintln!("{} of 200 whole uploads accepted", recorded.len());
    assert!(
        !recorded.is_empty(),
        "uploads whose bytes all came were accepted, though their clients were gone"
    );
    assert_nothing_half_done(&stored_in_s3(&env).await, &recorded);
    http.signal("-TERM");
}

/// The keys of the objects in the bucket that `env` names.
async fn stored_in_s3(env: &[(String, String)]) -> BTreeSet<String> {
    use object_store::ObjectStore;
    let var = |name: &str| {
        let (_, value) = env.iter().find(|(key, _)| key == name).unwrap();
        value.as_str()
    };
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(var("IMGCLF_STORAGE").trim_start_matches("s3://"))
        .with_endpoint(var("IMGCLF_S3_ENDPOINT"))
        .with_access_key_id(var("IMGCLF_S3_ACCESS_KEY"))
        .with_secret_access_key(var("IMGCLF_S3_SECRET_KEY"))
        .with_region(imgclf::storage::DEFAULT_S3_REGION)
        .with_allow_http(true)
        .build()
        .unwrap();
    let listed = store
        .list_with_delimiter(Some(&"images".into()))
        .await
        .unwrap();
    listed
        .objects
        .into_iter()
        .map(|object| object.location.to_string())
        .collect()
}

#[tokio::test]
async fn clients_gone_mid_upload_leave_nothing_half_done_over_rabbitmq() {
    let Some(amqp) = service_url("IMGCLF_TEST_AMQP") else {
        return;
    };
    clients_gone_leave_nothing_half_done(amqp).await;
}

#[tokio::test]
async fn clients_gone_mid_upload_leave_nothing_half_done_over_redis() {
    let Some(redis) = service_url("IMGCLF_TEST_REDIS") else {
        return;
    };
    clients_gone_leave_nothing_half_done(redis).await;
}
