use std::collections::HashSet;
use std::time::Duration;

use crate::queue::{Delivery, Queue};
use crate::task::{Job, TaskId};

const WAIT: Duration = Duration::from_secs(5);
const SHORT: Duration = Duration::from_millis(200);

/// Every queue check, on an empty queue of its own, the attempt counts that the retries'
/// backoff relies on included.
pub async fn run(queue: &dyn Queue) {
    assert_eq!(
        queue.depth().await.expect("depth"),
        0,
        "the suite needs an empty queue"
    );
    every_job_is_delivered_once(queue).await;
    unsettled_deliveries_come_back(queue).await;
    retry_waits_and_counts(queue).await;
    dead_letters_are_counted(queue).await;
    dead_letters_expire(queue).await;
    concurrent_consumers_share_nothing(queue).await;
    queue
        .check()
        .await
        .expect("a working queue passes its check");
}

fn job() -> Job {
    let task_id = TaskId::new();
    Job {
        task_id,
        object_key: format!("images/{task_id}.jpg"),
        // Every backend carries the optional fields through.
        top_k: Some(3),
        request_id: Some("req-7f3a".into()),
    }
}

/// Receives until `n` deliveries are in hand or `WAIT` passes.
async fn receive_n(queue: &dyn Queue, n: usize) -> Vec<Box<dyn Delivery>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(
            queue
                .receive(n - got.len(), Duration::from_millis(500))
                .await
                .expect("receive"),
        );
    }
    got
}

async fn every_job_is_delivered_once(queue: &dyn Queue) {
    let jobs: Vec<Job> = (0..20).map(|_| job()).collect();
    for j in &jobs {
        queue.enqueue(j).await.expect("enqueue");
    }
    assert_eq!(
        queue.depth().await.expect("depth"),
        20,
        "depth counts waiting jobs"
    );
    let got = receive_n(queue, 20).await;
    let ids: HashSet<TaskId> = got.iter().map(|d| d.job().task_id).collect();
    assert_eq!(
        ids,
        jobs.iter().map(|j| j.task_id).collect(),
        "every job, ordering aside"
    );
    assert_eq!(got.len(), 20, "and each once");
    for d in &got {
        assert_eq!(d.attempt(), 1, "a first delivery is attempt 1");
        let original = jobs
            .iter()
            .find(|j| j.task_id == d.job().task_id)
            .expect("known job");
        assert_eq!(d.job(), original, "the job arrives intact");
    }
    for d in got {
        d.ack().await.expect("ack");
    }
    assert!(
        queue.receive(10, SHORT).await.expect("receive").is_empty(),
        "acked jobs are gone"
    );
    assert_eq!(queue.depth().await.expect("depth"), 0);
}

async fn unsettled_deliveries_come_back(queue: &dyn Queue) {
    let j = job();
    queue.enqueue(&j).await.expect("enqueue");
    let got = receive_n(queue, 1).await;
    assert_eq!(got.len(), 1);
    // The worker holding it goes away without settling it.
    drop(got);
    let again = receive_n(queue, 1).await;
    assert_eq!(again.len(), 1, "an unsettled delivery is delivered again");
    assert_eq!(again[0].job(), &j);
    assert_eq!(again[0].attempt(), 2, "the redelivery counts as an attempt");
    for d in again {
        d.ack().await.expect("ack");
    }
}

async fn retry_waits_and_counts(queue: &dyn Queue) {
    let j = job();
    queue.enqueue(&j).await.expect("enqueue");
    let first = receive_n(queue, 1).await.pop().expect("delivered");
    first
        .retry(Duration::from_millis(1500))
        .await
        .expect("retry");
    assert!(
        queue
            .receive(1, Duration::from_millis(300))
            .await
            .expect("receive")
            .is_empty(),
        "a retried job waits out its delay"
    );
    assert_eq!(
        queue.depth().await.expect("depth"),
        1,
        "a delayed job still counts as waiting"
    );
    let second = receive_n(queue, 1)
        .await
        .pop()
        .expect("delivered after the delay");
    assert_eq!(second.job(), &j);
    assert_eq!(second.attempt(), 2);
    second.ack().await.expect("ack");
}

async fn dead_letters_are_counted(queue: &dyn Queue) {
    let before = queue.dead_letters().await.expect("dead letters");
    let j = job();
    queue.enqueue(&j).await.expect("enqueue");
    let d = receive_n(queue, 1).await.pop().expect("delivered");
    d.dead_letter("cannot be decoded")
        .await
        .expect("dead-letter");
    assert_eq!(
        queue.dead_letters().await.expect("dead letters"),
        before + 1
    );
    assert!(
        queue.receive(1, SHORT).await.expect("receive").is_empty(),
        "dead letters stay dead"
    );
}

/// Dead letters older than the cutoff are deleted, newer ones kept; a second expiry with the same
/// cutoff deletes nothing.
async fn dead_letters_expire(queue: &dyn Queue) {
    let bury = |reason: &'static str| async move {
        queue.enqueue(&job()).await.expect("enqueue");
        let d = receive_n(queue, 1).await.pop().expect("delivered");
        d.dead_letter(reason).await.expect("dead-letter");
    };
    bury("older").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cutoff = crate::task::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    bury("newer").await;
    let buried = queue.dead_letters().await.expect("dead letters");
    assert!(buried >= 2);
    let expired = queue.expire_dead_letters(cutoff).await.expect("expire");
    assert_eq!(
        expired,
        buried - 1,
        "every dead letter before the cutoff (earlier checks' too), and only those"
    );
    assert_eq!(
        settled_dead_letters(queue, 1).await,
        1,
        "the newer dead letter stays"
    );
    assert_eq!(
        queue.expire_dead_letters(cutoff).await.expect("expire"),
        0,
        "nothing older is left"
    );
    let later = crate::task::now_ms() + 1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut expired = 0;
    while expired == 0 && tokio::time::Instant::now() < deadline {
        expired += queue.expire_dead_letters(later).await.expect("expire");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(expired, 1);
    assert_eq!(settled_dead_letters(queue, 0).await, 0);
}

/// The dead letters counted once the count has settled on `expected` (or after 5 s): a dead
/// letter a broker takes back (RabbitMQ's nack with requeue, when expiry stops at a newer one)
/// is in its count again a moment after the call returns, not at once.
async fn settled_dead_letters(queue: &dyn Queue, expected: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let count = queue.dead_letters().await.expect("dead letters");
        if count == expected || tokio::time::Instant::now() > deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn concurrent_consumers_share_nothing(queue: &dyn Queue) {
    let jobs: Vec<Job> = (0..40).map(|_| job()).collect();
    for j in &jobs {
        queue.enqueue(j).await.expect("enqueue");
    }
    let consume = || async {
        let mut held = Vec::new();
        loop {
            let got = queue
                .receive(3, Duration::from_millis(300))
                .await
                .expect("receive");
            if got.is_empty() {
                break;
            }
            held.extend(got);
        }
        held
    };
    // Everyone holds what they received until the end: nothing may be handed out twice.
    let (a, b, c) = tokio::join!(consume(), consume(), consume());
    let mut seen = HashSet::new();
    for d in a.iter().chain(&b).chain(&c) {
        assert!(
            seen.insert(d.job().task_id),
            "job {} delivered twice",
            d.job().task_id
        );
    }
    assert_eq!(seen.len(), jobs.len(), "consumers together got every job");
    for d in a.into_iter().chain(b).chain(c) {
        d.ack().await.expect("ack");
    }
}
