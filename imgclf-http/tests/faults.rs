//! The broker, the database and the S3 server restart under a running deployment. Workers and
//! the HTTP service reconnect by themselves, uploads during an outage get a clear 503 (not a
//! hang), and nothing accepted is lost.
//!
//! Redis runs as a server of the test's own, with its append-only file on (a Redis that keeps
//! nothing on disk loses its queue in any restart, whatever the client does); so does the S3
//! server (s3s-fs, which keeps its objects in files).
//!
//! These restart the machine's RabbitMQ and PostgreSQL, so they run only when
//! `IMGCLF_TEST_RESTARTS=1` (`scripts/test.sh` sets it), one after the other, in a test binary
//! of their own (cargo runs test binaries one at a time).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use sqlx::Connection;
use tokio::sync::Mutex;

/// One restart at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

fn run_cmd(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed");
}

/// Runs the restore step when dropped, so a failing assertion cannot leave a service down.
struct Restore<'a, F: Fn()>(&'a F);

impl<F: Fn()> Drop for Restore<'_, F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

fn postgres_cluster() -> String {
    let versions = std::fs::read_dir("/etc/postgresql").expect("a Debian PostgreSQL cluster");
    versions
        .flatten()
        .next()
        .unwrap()
        .file_name()
        .to_string_lossy()
        .into_owned()
}

/// Uploads `count` images, counting 202s; 503s with `Retry-After` are fine (an outage),
/// anything else is not.
async fn upload_some(
    client: &reqwest::Client,
    base: &str,
    count: usize,
    accepted: &mut Vec<String>,
) -> usize {
    let images = reference_images();
    let mut unavailable = 0;
    for (name, _, bytes) in images.iter().cycle().take(count) {
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.clone()),
        );
        let response = client
            .post(format!("{base}/api/upload-image"))
            .multipart(form)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .expect("an answer, not a hang");
        match response.status().as_u16() {
            202 => {
                let body: serde_json::Value = response.json().await.unwrap();
                accepted.push(body["task_id"].as_str().unwrap().to_string());
            }
            503 => {
                assert!(
                    response.headers().contains_key("retry-after"),
                    "a 503 says when to retry"
                );
                unavailable += 1;
            }
            status => panic!("upload answered {status}"),
        }
    }
    unavailable
}

/// Waits until `/ready` answers 503: the outage is visible to a load balancer.
async fn wait_unready(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client.get(format!("{base}/ready")).send().await;
        if ready.is_ok_and(|r| r.status() == 503) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/ready never said 503 during the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A run on `queue`, with `settings` over the test environment's, and an outage in the middle.
async fn restart_during_a_run(
    queue: String,
    settings: &[(&str, String)],
    outage: impl Fn(),
    restore: impl Fn(),
) {
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let Some((mut env, results)) = distributed_env(queue, port, work.path()).await else {
        return;
    };
    for (key, value) in settings {
        env.retain(|(set, _)| set != key);
        env.push((key.to_string(), value.clone()));
    }
    let base = format!("http://127.0.0.1:{port}");
    let mut http = spawn(&http_binary(), &env, work.path());
    let mut worker = spawn(&worker_binary(), &env, work.path());
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;

    let mut accepted = Vec::new();
    assert_eq!(upload_some(&client, &base, 40, &mut accepted).await, 0);
    outage();
    // Whatever happens next, the service comes back for the tests after this one.
    let restored = Restore(&restore);
    // During the outage: not ready, and a clear 503, quickly.
    wait_unready(&client, &base).await;
    let started = Instant::now();
    let unavailable = upload_some(&client, &base, 3, &mut accepted).await;
    assert!(unavailable > 0, "uploads during the outage are refused");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "and do not hang"
    );
    drop(restored);
    // After it: accepted again once the service has reconnected.
    wait_ready_within(&client, &base, Duration::from_secs(90)).await;
    let before = accepted.len();
    upload_some(&client, &base, 20, &mut accepted).await;
    assert!(accepted.len() > before, "uploads work again");

    // Nothing accepted is lost, and every result is written once.
    wait_final_count(&results, accepted.len(), Duration::from_secs(300)).await;
    // And nothing of the refused uploads was kept.
    let mut db = sqlx::PgConnection::connect(&results).await.unwrap();
    let (recorded,): (i64,) = sqlx::query_as("SELECT count(*) FROM tasks")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(
        recorded as usize,
        accepted.len(),
        "only accepted uploads are recorded"
    );
    for id in &accepted {
        let status = task_status(&client, &base, id).await;
        assert_eq!(status["state"], "SUCCESS", "{status}");
    }
    http.signal("-TERM");
    worker.signal("-TERM");
    assert!(http.exits_cleanly(Duration::from_secs(60)).await);
    assert!(worker.exits_cleanly(Duration::from_secs(60)).await);
}

fn restarts_enabled() -> bool {
    match std::env::var("IMGCLF_TEST_RESTARTS").as_deref() {
        Ok("1") => true,
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI must run the restart tests: set IMGCLF_TEST_RESTARTS=1")
        }
        _ => {
            eprintln!("skipped: set IMGCLF_TEST_RESTARTS=1 to restart RabbitMQ and PostgreSQL under a run");
            false
        }
    }
}

/// A RabbitMQ outage under a run on the machine's broker, one at a time.
async fn rabbitmq_outage(outage: impl Fn(), restore: impl Fn()) {
    if !restarts_enabled() {
        return;
    }
    let Some(amqp) = service_url("IMGCLF_TEST_AMQP") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    restart_during_a_run(amqp, &[], outage, restore).await;
}

#[tokio::test]
async fn a_rabbitmq_restart_loses_nothing() {
    rabbitmq_outage(
        || run_cmd("rabbitmqctl", &["stop_app"]),
        || run_cmd("rabbitmqctl", &["start_app"]),
    )
    .await;
}

/// RabbitMQ's Erlang VM killed with SIGKILL, not stopped: quorum queues confirm a publish only
/// once it is on disk, so what was accepted survives; the init script starts the broker again
/// as its own user.
#[tokio::test]
async fn a_rabbitmq_killed_under_a_run_loses_nothing() {
    rabbitmq_outage(
        // pkill exits 1 when nothing matched: the broker must have been running.
        || run_cmd("pkill", &["-KILL", "-f", "beam.smp.*rabbit"]),
        || {
            run_cmd("/etc/init.d/rabbitmq-server", &["start"]);
            run_cmd("rabbitmqctl", &["await_startup"]);
        },
    )
    .await;
}

#[tokio::test]
async fn a_postgres_restart_loses_nothing() {
    if !restarts_enabled() {
        return;
    }
    let Some(amqp) = service_url("IMGCLF_TEST_AMQP") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let cluster = postgres_cluster();
    restart_during_a_run(
        amqp,
        &[],
        || {
            run_cmd(
                "pg_ctlcluster",
                &[
                    "--skip-systemctl-redirect",
                    &cluster,
                    "main",
                    "stop",
                    "-m",
                    "fast",
                ],
            )
        },
        || {
            run_cmd(
                "pg_ctlcluster",
                &["--skip-systemctl-redirect", &cluster, "main", "start"],
            )
        },
    )
    .await;
}

/// Output of `rabbitmqctl`, trimmed.
fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?} failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Deliveries of `queue` that the broker has handed out and not yet seen settled.
fn unacked(queue: &str) -> u64 {
    let listing = rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages_unacknowledged",
    ]);
    (listing.lines())
        .find_map(|line| line.strip_prefix(&format!("{queue}\t")))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Waits until `queue` has `count` unacked deliveries (the broker's figures lag by seconds).
async fn until_unacked(queue: &str, count: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while unacked(queue) != count {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// During a memory alarm RabbitMQ stops reading from every connection that publishes, so a
/// worker whose retry is held up there must still get its other jobs' acks through: they free
/// the memory that ends the alarm.
#[tokio::test]
async fn a_rabbitmq_memory_alarm_holds_no_worker_s_acks() {
    if !restarts_enabled() {
        return;
    }
    let Some(url) = service_url("IMGCLF_TEST_AMQP") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let name = unique_name("imgclf-alarm");
    let worker = imgclf::queue::AmqpQueue::connect(&url, &name, 8)
        .await
        .unwrap();
    for _ in 0..2 {
        let id = imgclf::TaskId::new();
        let job = imgclf::Job {
            task_id: id,
            object_key: format!("images/{id}.jpg"),
            top_k: None,
            request_id: None,
        };
        imgclf::Queue::enqueue(&worker, &job).await.unwrap();
    }
    let mut held = imgclf::Queue::receive(&worker, 2, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(held.len(), 2);
    until_unacked(&name, 2, "the broker sees both deliveries").await;

    let watermark = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
    let restore = || {
        let _ = Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", watermark.as_str()])
            .status();
    };
    watermark
        .parse::<f64>()
        .expect("a relative watermark, as the broker ships");
    run_cmd("rabbitmqctl", &["set_vm_memory_high_watermark", "0.000001"]);
    let restored = Restore(&restore);
    // The retry's publish waits for the alarm to end: its connection is now blocked.
    let retrying = tokio::spawn(held.remove(0).retry(Duration::from_millis(10)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!retrying.is_finished(), "the alarm holds publishes");
    tokio::time::timeout(Duration::from_secs(10), held.remove(0).ack())
        .await
        .expect("an ack is sent during the alarm")
        .unwrap();
    until_unacked(&name, 1, "the ack reached the broker during the alarm").await;
    drop(restored);
    tokio::time::timeout(Duration::from_secs(30), retrying)
        .await
        .expect("the retry goes through once the alarm ends")
        .unwrap()
        .unwrap();
    worker.close().await;
}

/// Redis is killed with SIGKILL, not stopped: with its append-only file synced on every write,
/// nothing it confirmed is lost.
#[tokio::test]
async fn a_redis_killed_under_a_run_loses_nothing_when_redis_persists() {
    if !restarts_enabled() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let start = || {
        let args = [
            "--port".to_string(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--appendonly".into(),
            "yes".into(),
            "--appendfsync".into(),
            "always".into(),
            "--save".into(),
            "".into(),
            "--dir".into(),
            dir.path().display().to_string(),
        ];
        let mut command = Command::new("redis-server");
        command.args(args);
        start_listening(command, port, "redis-server")
    };
    killed_under_a_run(format!("redis://127.0.0.1:{port}"), &[], start).await;
}

/// A server of the test's own, started by `start`, killed with SIGKILL under a run on `queue`
/// and started again.
async fn killed_under_a_run(
    queue: String,
    settings: &[(&str, String)],
    start: impl Fn() -> Process,
) {
    let server = std::cell::RefCell::new(Some(start()));
    restart_during_a_run(
        queue,
        settings,
        || {
            if let Some(process) = server.borrow_mut().take() {
                process.signal("-KILL");
            }
        },
        || {
            server.borrow_mut().get_or_insert_with(&start);
        },
    )
    .await;
}

/// Starts `start` and waits until it listens on `port`.
fn start_listening(mut start: Command, port: u16, name: &str) -> Process {
    let child = start
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{name} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Process(child)
}

/// The S3 server is killed with SIGKILL under a run and started again on its files: uploads
/// meanwhile get a 503, and the jobs whose image the worker cannot read wait the outage out
/// instead of failing.
#[tokio::test]
async fn an_s3_server_killed_under_a_run_loses_nothing() {
    if !restarts_enabled() {
        return;
    }
    let (Some(amqp), Some(binary)) = (
        service_url("IMGCLF_TEST_AMQP"),
        service_url("IMGCLF_TEST_S3S_BIN"),
    ) else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let port = free_port();
    let (key, secret) = ("test", "testtest");
    let start = || {
        let mut command = Command::new(&binary);
        command.current_dir(dir.path()).args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            key,
            "--secret-key",
            secret,
        ]);
        command.arg(&data);
        start_listening(command, port, "s3s-fs")
    };
    let settings = [
        ("IMGCLF_S3_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("IMGCLF_S3_ACCESS_KEY", key.into()),
        ("IMGCLF_S3_SECRET_KEY", secret.into()),
    ];
    killed_under_a_run(amqp, &settings, start).await;
}
