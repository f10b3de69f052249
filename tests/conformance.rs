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
    let job = imgclf::Job {
        task_id: imgclf::TaskId::new(),
        object_key: "images/x.jpg".into(),
    };
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
    // Migrations are idempotent: reopening the same file works.
    let store = SqliteResults::connect(&url).await.expect("reopens");
    imgclf::ResultStore::check(&store).await.unwrap();
}
