//! Each port's conformance suite on every backend compiled into this build.

use std::time::Duration;

use imgclf::conformance;
use imgclf::queue::MemoryQueue;
use imgclf::results::{MemoryResults, SqliteResults};
use imgclf::storage::{LocalStorage, MemoryStorage};

#[tokio::test]
async fn storage_memory() {
    conformance::storage::run(&MemoryStorage::new(), "t").await;
}

#[tokio::test]
async fn storage_local() {
    let dir = tempfile::tempdir().unwrap();
    conformance::storage::run(&LocalStorage::new(dir.path()).unwrap(), "t").await;
}

#[tokio::test]
async fn queue_memory() {
    conformance::queue::run(&MemoryQueue::new(Duration::from_secs(60))).await;
}

#[tokio::test]
async fn queue_memory_lease_expiry_redelivers() {
    // A worker that hangs forever holds its job only for the lease.
    let queue = MemoryQueue::new(Duration::from_millis(300));
    let job = a_job();
    imgclf::Queue::enqueue(&queue, &job).await.unwrap();
    let held = imgclf::Queue::receive(&queue, 1, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    let again = imgclf::Queue::receive(&queue, 1, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "the job comes back after the lease");
    assert_eq!((again[0].job(), again[0].attempt()), (&job, 2));
}

#[tokio::test]
async fn results_memory() {
    conformance::results::run(&MemoryResults::new()).await;
}

#[tokio::test]
async fn results_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("nested/imgclf.db").display());
    let store = SqliteResults::connect(&url)
        .await
        .expect("creates the database and migrates");
    conformance::results::run(&store).await;
    drop(store);
    // Migrations are idempotent: reopening the same file works, and so it does after a newer
    // version has added a migration of its own (a rollback).
    let store = SqliteResults::connect(&url).await.expect("reopens");
    imgclf::ResultStore::check(&store).await.unwrap();
    drop(store);
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(NEWER_MIGRATION).execute(&pool).await.unwrap();
    pool.close().await;
    let store = SqliteResults::connect(&url)
        .await
        .expect("opens after a newer version's migration");
    imgclf::ResultStore::check(&store).await.unwrap();
    // A URL that names no file would give each connection a database of its own.
    for url in ["sqlite://", "sqlite::memory:", "sqlite://?mode=memory"] {
        let refused = SqliteResults::connect(url)
            .await
            .err()
            .map(|e| e.to_string());
        assert!(
            refused
                .as_deref()
                .is_some_and(|e| e.contains("names no database file")),
            "{url}: {refused:?}"
        );
    }
}

/// What a newer version's migration leaves in sqlx's table.
const NEWER_MIGRATION: &str = "INSERT INTO _sqlx_migrations \
     (version, description, success, checksum, execution_time) \
     VALUES (99999999999999, 'a newer version', true, x'00', 0)";

// The real services: PostgreSQL, Redis, RabbitMQ and an S3 server, each from an environment
// variable that `.ci/run` sets.

#[tokio::test]
async fn results_postgres() {
    let Some(base) = imgclf_suite::service_url("IMGCLF_TEST_POSTGRES") else {
        return;
    };
    let url = imgclf_suite::fresh_postgres_database(&base).await;
    let store = imgclf::results::PostgresResults::connect(&url)
        .await
        .expect("connects and migrates");
    conformance::results::run(&store).await;
    // A write the server refuses (no PostgreSQL text holds a NUL) fails alone, though it
    // went with others in one statement: more at once than the store runs statements of a
    // kind, so all but the first go as a group.
    let record = |note: &str| {
        let id = imgclf::TaskId::new();
        let metadata = serde_json::json!({ "note": note });
        let metadata = metadata.as_object().unwrap().clone();
        imgclf::TaskRecord::pending(id, format!("images/{id}.jpg"), metadata, None)
    };
    let mut records: Vec<_> = (0..12).map(|i| record(&i.to_string())).collect();
    records.insert(8, record("nul \u{0}"));
    let created = futures_util::future::join_all(
        (records.iter()).map(|r| imgclf::ResultStore::create(&store, r)),
    )
    .await;
    for (i, created) in created.iter().enumerate() {
        match i {
            8 => assert!(
                matches!(
                    created,
                    Err(imgclf::ResultsError::Backend {
                        temporary: false,
                        ..
                    })
                ),
                "{created:?}"
            ),
            _ => assert!(created.is_ok(), "{created:?}"),
        }
    }
    // The replaced service's table holds each success once.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let (rows, tasks): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM results), (SELECT count(*) FROM tasks WHERE state = 'SUCCESS')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(rows, tasks, "one legacy results row per successful task");
    // Expired tasks take their legacy rows with them.
    let expired = imgclf::ResultStore::delete_expired(&store, imgclf::task::now_ms() + 1, 1000)
        .await
        .unwrap();
    let succeeded = expired
        .iter()
        .filter(|r| r.state == imgclf::TaskState::Success);
    assert!(
        succeeded.count() > 0,
        "the suite leaves successes to expire"
    );
    let (left, tasks): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM results), (SELECT count(*) FROM tasks WHERE state = 'SUCCESS')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(left < rows, "legacy rows were deleted");
    assert_eq!(left, tasks, "still one legacy row per successful task");
    drop(store);
    let store = imgclf::results::PostgresResults::connect(&url)
        .await
        .expect("migrations are idempotent");
    imgclf::ResultStore::check(&store).await.unwrap();
    // A newer version's migration (in a rolling update, or before a rollback) does not stop
    // this version from starting.
    let newer = NEWER_MIGRATION.replace("x'00'", "'\\x00'::bytea");
    sqlx::query(&newer).execute(&pool).await.unwrap();
    let store = imgclf::results::PostgresResults::connect(&url)
        .await
        .expect("starts after a newer version's migration");
    imgclf::ResultStore::check(&store).await.unwrap();
}

#[tokio::test]
async fn queue_redis() {
    let Some(url) = imgclf_suite::service_url("IMGCLF_TEST_REDIS") else {
        return;
    };
    let name = imgclf_suite::unique_name("imgclf-test");
    let queue = imgclf::queue::RedisQueue::connect(&url, &name, Duration::from_secs(2))
        .await
        .expect("connects");
    conformance::queue::run(&queue).await;
}

#[tokio::test]
async fn queue_redis_orphans_are_reclaimed_after_the_lease() {
    let Some(url) = imgclf_suite::service_url("IMGCLF_TEST_REDIS") else {
        return;
    };
    let name = imgclf_suite::unique_name("imgclf-test");
    let lease = Duration::from_millis(800);
    let crashed = imgclf::queue::RedisQueue::connect(&url, &name, lease)
        .await
        .unwrap();
    let job = a_job();
    imgclf::Queue::enqueue(&crashed, &job).await.unwrap();
    let held = imgclf::Queue::receive(&crashed, 1, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    // The worker dies: nothing settles or releases its delivery.
    std::mem::forget(held);
    drop(crashed);
    let survivor = imgclf::queue::RedisQueue::connect(&url, &name, lease)
        .await
        .unwrap();
    assert!(
        imgclf::Queue::receive(&survivor, 1, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty(),
        "not before the lease"
    );
    let again = imgclf::Queue::receive(&survivor, 1, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "reclaimed after the lease");
    assert_eq!((again[0].job(), again[0].attempt()), (&job, 2));
}

#[tokio::test]
async fn queue_amqp() {
    let Some(url) = imgclf_suite::service_url("IMGCLF_TEST_AMQP") else {
        return;
    };
    let name = imgclf_suite::unique_name("imgclf-test");
    let queue = imgclf::queue::AmqpQueue::connect(&url, &name, 64)
        .await
        .expect("connects");
    conformance::queue::run(&queue).await;
}

#[tokio::test]
async fn queue_amqp_unacked_jobs_survive_a_dead_connection() {
    let Some(url) = imgclf_suite::service_url("IMGCLF_TEST_AMQP") else {
        return;
    };
    let name = imgclf_suite::unique_name("imgclf-test");
    let crashed = imgclf::queue::AmqpQueue::connect(&url, &name, 8)
        .await
        .unwrap();
    let job = a_job();
    imgclf::Queue::enqueue(&crashed, &job).await.unwrap();
    let held = imgclf::Queue::receive(&crashed, 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    // The worker dies holding the job: no ack, no nack, the connection just goes.
    std::mem::forget(held);
    crashed.close().await;
    let survivor = imgclf::queue::AmqpQueue::connect(&url, &name, 8)
        .await
        .unwrap();
    let again = imgclf::Queue::receive(&survivor, 1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "the broker delivers it again");
    assert_eq!(
        (again[0].job(), again[0].attempt()),
        (&job, 2),
        "and counts the attempt"
    );
}

/// The S3 suite on one S3-compatible server, at the URL in `var`.
async fn storage_s3_on(var: &str) {
    let Some(endpoint) = imgclf_suite::service_url(var) else {
        return;
    };
    let config = imgclf::storage::S3Config {
        bucket: imgclf_suite::unique_name("imgclf-test"),
        endpoint: Some(endpoint),
        access_key: Some(
            std::env::var("IMGCLF_TEST_S3_ACCESS_KEY").unwrap_or_else(|_| "test".into()),
        ),
        secret_key: Some(
            std::env::var("IMGCLF_TEST_S3_SECRET_KEY").unwrap_or_else(|_| "testtest".into()),
        ),
        region: "us-east-1".into(),
        path_style: true,
    };
    let store = imgclf::storage::S3Storage::connect(config)
        .await
        .expect("creates the bucket");
    conformance::storage::run(&store, "t").await;
}

/// moto (Python), the S3 server the rest of the suite uses.
#[tokio::test]
async fn storage_s3() {
    storage_s3_on("IMGCLF_TEST_S3").await;
}

/// s3s-fs (Rust), a second, independent S3 implementation.
#[tokio::test]
async fn storage_s3_second_server() {
    storage_s3_on("IMGCLF_TEST_S3_SECOND").await;
}

#[tokio::test]
async fn queue_redis_unreadable_entries_go_to_the_dead_stream() {
    let Some(url) = imgclf_suite::service_url("IMGCLF_TEST_REDIS") else {
        return;
    };
    let name = imgclf_suite::unique_name("imgclf-test");
    let queue = imgclf::queue::RedisQueue::connect(&url, &name, Duration::from_millis(300))
        .await
        .unwrap();
    // An entry no version of the worker can read, written beside a good job.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("XADD")
        .arg(&name)
        .arg("*")
        .arg("job")
        .arg("{not a job")
        .query_async::<String>(&mut conn)
        .await
        .unwrap();
    let job = a_job();
    imgclf::Queue::enqueue(&queue, &job).await.unwrap();
    let got = imgclf::Queue::receive(&queue, 10, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "the good job is delivered");
    assert_eq!(got[0].job(), &job);
    for delivery in got {
        delivery.ack().await.unwrap();
    }
    assert_eq!(imgclf::Queue::dead_letters(&queue).await.unwrap(), 1);
    // Past the lease nothing comes back: the unreadable entry is no longer pending.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = imgclf::Queue::receive(&queue, 10, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(again.is_empty(), "nothing left to reclaim");
    let left: u64 = redis::cmd("XLEN")
        .arg(&name)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "the unreadable entry left the stream");
}

#[tokio::test]
async fn queue_amqp_refuses_a_publish_no_queue_takes() {
    let Some(url) = imgclf_suite::service_url("IMGCLF_TEST_AMQP") else {
        return;
    };
    let name = imgclf_suite::unique_name("imgclf-test");
    let queue = imgclf::queue::AmqpQueue::connect(&url, &name, 8)
        .await
        .expect("connects");
    // Someone deletes the queue under a running publisher.
    let deleted = std::process::Command::new("rabbitmqctl")
        .args(["delete_queue", &name])
        .output()
        .expect("rabbitmqctl runs");
    assert!(deleted.status.success(), "{deleted:?}");
    let job = a_job();
    let published = imgclf::Queue::enqueue(&queue, &job).await;
    assert!(
        published.is_err(),
        "a message no queue takes is an error, not a confirmed drop"
    );
}

/// A job for a task of its own.
fn a_job() -> imgclf::Job {
    imgclf::Job {
        task_id: imgclf::TaskId::new(),
        object_key: "images/x.jpg".into(),
        top_k: None,
        request_id: None,
    }
}
