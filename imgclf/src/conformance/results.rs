use serde_json::Map;

use crate::results::{FinalTasks, ResultStore, ResultsError, TaskQuery};
use crate::task::{
    now_ms, Prediction, TaskId, TaskRecord, TaskResult, TaskState, WebhookDelivery, WebhookState,
};

/// Every result-store check, on a store that may hold other tasks.
pub async fn run(store: &dyn ResultStore) {
    create_and_get(store).await;
    state_machine(store).await;
    an_attempt_can_be_taken_back(store).await;
    idempotent_completion(store).await;
    failure_is_final(store).await;
    unfinished_lists_open_tasks(store).await;
    stale_tasks_are_claimed_once(store).await;
    concurrent_completions_write_once(store).await;
    concurrent_writes_answer_each_for_itself(store).await;
    many_writes_at_once_answer_as_in_sequence(store).await;
    webhook_state_is_kept_apart(store).await;
    callbacks_are_due_with_the_final_state_and_claimed_once(store).await;
    listing_pages_newest_first(store).await;
    expired_tasks_are_deleted_once(store).await;
    expired_images_are_claimed_once(store).await;
    final_tasks_are_told(store).await;
    store
        .check()
        .await
        .expect("a working store passes its check");
}

fn record() -> TaskRecord {
    let mut metadata = Map::new();
    metadata.insert("filename".into(), "cat.jpg".into());
    metadata.insert("nested".into(), serde_json::json!({"a": [1, 2, 3]}));
    let id = TaskId::new();
    TaskRecord::pending(
        id,
        format!("images/{id}.jpg"),
        metadata,
        Some("https://example.com/h".into()),
    )
}

fn result(id: TaskId, label: &str) -> TaskResult {
    TaskResult {
        task_id: id,
        metadata: Map::new(),
        classification: vec![Prediction {
            label: label.into(),
            class_id: 281,
            probability: 0.75,
        }],
        model: "test-model".into(),
        timings: Default::default(),
    }
}

async fn create_and_get(store: &dyn ResultStore) {
    let r = record();
    store.create(&r).await.expect("create");
    let got = store
        .get(r.task_id)
        .await
        .expect("get")
        .expect("created task exists");
    assert_eq!(got, r, "a record reads back exactly as created");
    assert!(matches!(store.create(&r).await, Err(ResultsError::Conflict(id)) if id == r.task_id));
    assert!(
        store.get(TaskId::new()).await.expect("get").is_none(),
        "unknown ids are None"
    );
    store.delete(r.task_id).await.expect("delete");
    assert!(
        store.get(r.task_id).await.expect("get").is_none(),
        "deleted tasks are gone"
    );
}

async fn state_machine(store: &dyn ResultStore) {
    let r = record();
    store.create(&r).await.expect("create");
    let started = store
        .start(r.task_id)
        .await
        .expect("start")
        .expect("known task");
    assert_eq!((started.state, started.attempts), (TaskState::Started, 1));
    let again = store
        .start(r.task_id)
        .await
        .expect("start")
        .expect("known task");
    assert_eq!(
        (again.state, again.attempts),
        (TaskState::Started, 2),
        "a redelivery counts"
    );
    assert!(store
        .complete(r.task_id, &result(r.task_id, "tabby"))
        .await
        .expect("complete"));
    let late = store
        .start(r.task_id)
        .await
        .expect("start")
        .expect("known task");
    assert_eq!(
        late.state,
        TaskState::Success,
        "a late redelivery cannot undo SUCCESS"
    );
    assert_eq!(late.attempts, 2, "starting a final task counts nothing");
    assert!(
        store.start(TaskId::new()).await.expect("start").is_none(),
        "unknown ids are None"
    );
}

async fn an_attempt_can_be_taken_back(store: &dyn ResultStore) {
    let r = record();
    store.create(&r).await.expect("create");
    let attempts = async || store.get(r.task_id).await.expect("get").unwrap().attempts;
    store.uncount_attempt(r.task_id).await.expect("uncount");
    assert_eq!(
        attempts().await,
        0,
        "a PENDING task has nothing to take back"
    );
    store.start(r.task_id).await.expect("start");
    store.start(r.task_id).await.expect("start");
    store.uncount_attempt(r.task_id).await.expect("uncount");
    let now = store.get(r.task_id).await.expect("get").unwrap();
    assert_eq!((now.state, now.attempts), (TaskState::Started, 1));
    store.uncount_attempt(r.task_id).await.expect("uncount");
    store.uncount_attempt(r.task_id).await.expect("uncount");
    assert_eq!(attempts().await, 0, "never below 0");
    store.start(r.task_id).await.expect("start");
    assert!(store
        .fail(r.task_id, "the image is broken")
        .await
        .expect("fail"));
    store.uncount_attempt(r.task_id).await.expect("uncount");
    assert_eq!(attempts().await, 1, "a final task keeps its count");
    store
        .uncount_attempt(TaskId::new())
        .await
        .expect("an unknown id is no error");
}

async fn idempotent_completion(store: &dyn ResultStore) {
    let r = record();
    store.create(&r).await.expect("create");
    store.start(r.task_id).await.expect("start");
    let first = result(r.task_id, "tabby");
    assert!(
        store.complete(r.task_id, &first).await.expect("complete"),
        "first completion writes"
    );
    assert!(!store
        .complete(r.task_id, &result(r.task_id, "other"))
        .await
        .expect("complete"));
    assert!(!store.fail(r.task_id, "late failure").await.expect("fail"));
    let got = store.get(r.task_id).await.expect("get").expect("exists");
    assert_eq!(got.state, TaskState::Success);
    assert_eq!(got.result, Some(first), "the first result stays");
    assert_eq!(got.error, None);
    assert!(!store
        .complete(TaskId::new(), &result(r.task_id, "x"))
        .await
        .expect("complete"));
}

async fn failure_is_final(store: &dyn ResultStore) {
    let r = record();
    store.create(&r).await.expect("create");
    assert!(store
        .fail(r.task_id, "the image cannot be decoded")
        .await
        .expect("fail"));
    assert!(!store
        .complete(r.task_id, &result(r.task_id, "x"))
        .await
        .expect("complete"));
    let got = store.get(r.task_id).await.expect("get").expect("exists");
    assert_eq!(got.state, TaskState::Failure);
    assert_eq!(got.error.as_deref(), Some("the image cannot be decoded"));
    assert_eq!(got.result, None);
}

async fn unfinished_lists_open_tasks(store: &dyn ResultStore) {
    let (pending, started, done) = (record(), record(), record());
    for r in [&pending, &started, &done] {
        store.create(r).await.expect("create");
    }
    store.start(started.task_id).await.expect("start");
    store
        .complete(done.task_id, &result(done.task_id, "x"))
        .await
        .expect("complete");
    let open: Vec<TaskId> = store
        .unfinished(usize::MAX)
        .await
        .expect("unfinished")
        .iter()
        .map(|r| r.task_id)
        .collect();
    assert!(open.contains(&pending.task_id) && open.contains(&started.task_id));
    assert!(
        !open.contains(&done.task_id),
        "final tasks are not unfinished"
    );
    assert!(
        store.unfinished(1).await.expect("unfinished").len() <= 1,
        "the limit holds"
    );
}

async fn stale_tasks_are_claimed_once(store: &dyn ResultStore) {
    let hour_ago = now_ms() - 3_600_000;
    let aged = |mut r: TaskRecord| {
        r.created_at_ms = hour_ago;
        r.updated_at_ms = hour_ago;
        r
    };
    let (stale_pending, stale_done, fresh) = (aged(record()), aged(record()), record());
    for r in [&stale_pending, &stale_done, &fresh] {
        store.create(r).await.expect("create");
    }
    store
        .complete(stale_done.task_id, &result(stale_done.task_id, "x"))
        .await
        .expect("complete");
    let cutoff = now_ms() - 600_000;
    // Two sweepers at once: each stale task goes to exactly one of them.
    let (a, b) = tokio::join!(
        store.claim_stale(cutoff, i64::MAX, usize::MAX),
        store.claim_stale(cutoff, i64::MAX, usize::MAX)
    );
    let count = times_claimed(a, b);
    assert_eq!(
        count(stale_pending.task_id),
        1,
        "a stale pending task, claimed once"
    );
    assert_eq!(count(stale_done.task_id), 0, "final tasks are never stale");
    assert_eq!(count(fresh.task_id), 0, "a recent task is not stale");
    let again = store
        .claim_stale(cutoff, i64::MAX, usize::MAX)
        .await
        .expect("claim");
    assert!(
        !again.iter().any(|r| r.task_id == stale_pending.task_id),
        "claiming marks the task changed, so the next sweep leaves it alone"
    );
    let got = store.get(stale_pending.task_id).await.unwrap().unwrap();
    assert_eq!(got.state, TaskState::Pending, "claiming changes no state");

    // Behind a backlog, a PENDING task accepted after the queue's head may still be waiting in
    // the queue; one accepted before it was passed over. A STARTED one is stale either way.
    let head = hour_ago + 1_000;
    let after_head = |mut r: TaskRecord| {
        r.created_at_ms = head;
        r
    };
    let passed = aged(record());
    let waiting = after_head(aged(record()));
    let mut started = after_head(aged(record()));
    started.state = TaskState::Started;
    for r in [&passed, &waiting, &started] {
        store.create(r).await.expect("create");
    }
    let claimed: Vec<TaskId> = store
        .claim_stale(cutoff, head, usize::MAX)
        .await
        .expect("claim")
        .iter()
        .map(|r| r.task_id)
        .collect();
    assert!(
        claimed.contains(&passed.task_id),
        "passed over by the queue"
    );
    assert!(claimed.contains(&started.task_id), "a stale start");
    assert!(
        !claimed.contains(&waiting.task_id),
        "still waiting its turn"
    );
    let later = store
        .claim_stale(cutoff, i64::MAX, usize::MAX)
        .await
        .expect("claim");
    assert!(
        later.iter().any(|r| r.task_id == waiting.task_id),
        "once the queue is past it, the waiting one is claimed too"
    );
}

async fn concurrent_completions_write_once(store: &dyn ResultStore) {
    let r = record();
    store.create(&r).await.expect("create");
    let (a, b, c, d) = (
        result(r.task_id, "a"),
        result(r.task_id, "b"),
        result(r.task_id, "c"),
        result(r.task_id, "d"),
    );
    // Polled together, so backends with connection pools really race.
    let wrote = tokio::join!(
        store.complete(r.task_id, &a),
        store.complete(r.task_id, &b),
        store.complete(r.task_id, &c),
        store.fail(r.task_id, "racing failure"),
        store.complete(r.task_id, &d),
    );
    let wrote = [wrote.0, wrote.1, wrote.2, wrote.3, wrote.4].map(|w| w.expect("finish"));
    assert_eq!(
        wrote.iter().filter(|w| **w).count(),
        1,
        "exactly one final write wins"
    );
}

/// Writes made together (which a backend may commit together) each get their own answer: a
/// conflict refuses only its own write.
async fn concurrent_writes_answer_each_for_itself(store: &dyn ResultStore) {
    let (a, b, taken) = (record(), record(), record());
    store.create(&taken).await.expect("create");
    let (stray, done) = (result(taken.task_id, "x"), result(a.task_id, "a"));
    let (created_a, conflict, created_b, started, missing) = tokio::join!(
        store.create(&a),
        store.create(&taken),
        store.create(&b),
        store.start(taken.task_id),
        store.complete(TaskId::new(), &stray),
    );
    created_a.expect("a new task is created beside a conflict");
    created_b.expect("a new task is created beside a conflict");
    assert!(
        matches!(conflict, Err(ResultsError::Conflict(id)) if id == taken.task_id),
        "the duplicate alone is refused"
    );
    let started = started.expect("start").expect("the task exists");
    assert_eq!((started.state, started.attempts), (TaskState::Started, 1));
    assert!(
        !missing.expect("complete"),
        "an unknown task is not completed"
    );
    let (done_a, done_b) = tokio::join!(
        store.complete(a.task_id, &done),
        store.fail(b.task_id, "b failed"),
    );
    assert!(done_a.expect("complete") && done_b.expect("fail"));
    let (a, b) = (
        store.get(a.task_id).await.expect("get").expect("a exists"),
        store.get(b.task_id).await.expect("get").expect("b exists"),
    );
    assert_eq!(a.result, Some(done));
    assert_eq!(
        (b.state, b.error.as_deref()),
        (TaskState::Failure, Some("b failed"))
    );
}

/// Many writes at once, as a busy process makes them (a backend may make each kind with one
/// statement): a task written twice, an existing one, an unknown one and a final one each get
/// the answer they would get alone, one after the other.
async fn many_writes_at_once_answer_as_in_sequence(store: &dyn ResultStore) {
    use futures_util::future::join_all;
    let (fresh, taken, done): (Vec<_>, _, _) =
        ((0..24).map(|_| record()).collect(), record(), record());
    for r in [&taken, &done] {
        store.create(r).await.expect("create");
    }
    assert!(store
        .complete(done.task_id, &result(done.task_id, "done"))
        .await
        .expect("complete"));
    // Not the first: a backend may send the first write alone and group the rest.
    const TWICE: usize = 5;
    let twice = &fresh[TWICE];

    let creates = join_all(fresh.iter().chain([&taken, twice]).map(|r| store.create(r))).await;
    let (fresh_created, rest) = creates.split_at(fresh.len());
    assert!(
        (fresh_created.iter().enumerate()).all(|(i, c)| i == TWICE || c.is_ok()),
        "{fresh_created:?}"
    );
    assert!(matches!(rest[0], Err(ResultsError::Conflict(id)) if id == taken.task_id));
    let twice_created = [&fresh_created[TWICE], &rest[1]];
    assert_eq!(
        twice_created.iter().filter(|c| c.is_ok()).count(),
        1,
        "one of two creates of one task wins: {twice_created:?}"
    );
    assert!(twice_created
        .iter()
        .any(|c| matches!(c, Err(ResultsError::Conflict(id)) if *id == twice.task_id)));

    let unknown = TaskId::new();
    let ids: Vec<TaskId> = (fresh.iter().map(|r| r.task_id))
        .chain([twice.task_id, unknown, done.task_id])
        .collect();
    let starts = join_all(ids.iter().map(|id| store.start(*id))).await;
    let starts: Vec<_> = starts.into_iter().map(|s| s.expect("start")).collect();
    for (id, started) in ids.iter().zip(&starts) {
        let expected = match *id {
            id if id == unknown => None,
            id if id == done.task_id => Some((TaskState::Success, 0)),
            _ => Some((TaskState::Started, 1)),
        };
        let got = started.as_ref().map(|r| (r.state, r.attempts.min(1)));
        assert_eq!(got, expected, "start of {id}");
    }
    let mut twice_attempts =
        [&starts[TWICE], &starts[fresh.len()]].map(|s| s.as_ref().unwrap().attempts);
    twice_attempts.sort();
    assert_eq!(
        twice_attempts,
        [1, 2],
        "each start of one task counts an attempt"
    );

    let completed = join_all(ids.iter().map(|id| {
        let labelled = result(*id, &id.to_string());
        async move { store.complete(*id, &labelled).await }
    }))
    .await;
    let completed: Vec<bool> = completed
        .into_iter()
        .map(|c| c.expect("complete"))
        .collect();
    let (fresh_completed, rest) = completed.split_at(fresh.len());
    assert!(
        (fresh_completed.iter().enumerate()).all(|(i, c)| i == TWICE || *c),
        "{fresh_completed:?}"
    );
    assert_eq!(
        [fresh_completed[TWICE], rest[0]]
            .iter()
            .filter(|c| **c)
            .count(),
        1,
        "one of two completions of one task writes"
    );
    assert_eq!(
        &rest[1..],
        [false, false],
        "unknown and final tasks are not completed"
    );
    for r in &fresh {
        let stored = store.get(r.task_id).await.expect("get").expect("exists");
        assert_eq!(stored.state, TaskState::Success);
        assert_eq!(
            stored.result,
            Some(result(r.task_id, &r.task_id.to_string()))
        );
    }
    let done_now = store.get(done.task_id).await.expect("get").expect("exists");
    assert_eq!(
        done_now.result,
        Some(result(done.task_id, "done")),
        "a final result stays"
    );
}

async fn webhook_state_is_kept_apart(store: &dyn ResultStore) {
    let r = record();
    store.create(&r).await.expect("create");
    store
        .complete(r.task_id, &result(r.task_id, "tabby"))
        .await
        .expect("complete");
    let now = now_ms() + 1;
    let lease = claim(store, r.task_id, now).await;
    // The first attempt failed: due again a second later.
    let pending = WebhookDelivery {
        state: WebhookState::Pending,
        attempts: 1,
        last_status: Some("HTTP 503 Service Unavailable".into()),
        updated_at_ms: now,
        next_attempt_at_ms: now + 1_000,
    };
    let recorded = store.record_webhook(r.task_id, lease, &pending).await;
    assert!(recorded.expect("record webhook"), "the claim holds");
    let retry = claim(store, r.task_id, now + 1_000).await;
    let failed = WebhookDelivery {
        state: WebhookState::Failed,
        attempts: 2,
        last_status: Some("HTTP 503 Service Unavailable".into()),
        updated_at_ms: now + 1_000,
        next_attempt_at_ms: 0,
    };
    let stale = store.record_webhook(r.task_id, lease, &failed).await;
    assert!(
        !stale.expect("record webhook"),
        "a claim whose lease was taken over records nothing"
    );
    let recorded = store.record_webhook(r.task_id, retry, &failed).await;
    assert!(recorded.expect("record webhook"), "the latest claim holds");
    let got = store.get(r.task_id).await.expect("get").expect("exists");
    assert_eq!(
        got.webhook,
        Some(failed),
        "the latest delivery state is kept"
    );
    assert_eq!(
        got.state,
        TaskState::Success,
        "a failed callback does not change the task"
    );
    let after = store.record_webhook(r.task_id, retry, &pending).await;
    assert!(
        !after.expect("record webhook"),
        "a callback given up on stays so"
    );
    let unknown = store.record_webhook(TaskId::new(), retry, &pending).await;
    assert!(!unknown.expect("unknown ids are ignored"));
}

/// Claims the callbacks due at `now` as a dispatcher does, and returns the lease of `id`'s
/// (the `next_attempt_at_ms` its claim set).
async fn claim(store: &dyn ResultStore, id: TaskId, now: i64) -> i64 {
    let claimed = store.claim_callbacks(now, 60_000, usize::MAX).await;
    let record = (claimed.expect("claim").into_iter())
        .find(|r| r.task_id == id)
        .expect("due, and claimed");
    let lease = record.webhook.expect("a callback").next_attempt_at_ms;
    assert_eq!(lease, now + 60_000, "claimed until its lease runs out");
    lease
}

async fn callbacks_are_due_with_the_final_state_and_claimed_once(store: &dyn ResultStore) {
    let (succeeds, fails, silent) = (record(), record(), {
        let mut r = record();
        r.callback_url = None;
        r
    });
    for r in [&succeeds, &fails, &silent] {
        store.create(r).await.expect("create");
        store.start(r.task_id).await.expect("start");
    }
    // A callback carries the final state: a started task has none due.
    let started = store
        .claim_callbacks(now_ms() + 1, 60_000, usize::MAX)
        .await
        .expect("claim");
    assert!(
        !started
            .iter()
            .any(|r| [succeeds.task_id, fails.task_id].contains(&r.task_id)),
        "no callback is due before the task is final"
    );
    let got = store.get(succeeds.task_id).await.unwrap().unwrap();
    assert_eq!(got.webhook, None, "a started task has no callback yet");
    store
        .complete(succeeds.task_id, &result(succeeds.task_id, "tabby"))
        .await
        .expect("complete");
    store.fail(fails.task_id, "broken").await.expect("fail");
    store
        .complete(silent.task_id, &result(silent.task_id, "tabby"))
        .await
        .expect("complete");
    for id in [succeeds.task_id, fails.task_id] {
        let got = store.get(id).await.unwrap().unwrap();
        let webhook = got
            .webhook
            .expect("the final state brings its callback due");
        assert_eq!(webhook.state, WebhookState::Pending);
        assert_eq!(webhook.attempts, 0);
    }
    let got = store.get(silent.task_id).await.unwrap().unwrap();
    assert_eq!(got.webhook, None, "no callback_url, no callback");

    // Two dispatchers at once: each due callback goes to exactly one of them.
    let now = now_ms() + 1;
    let (a, b) = tokio::join!(
        store.claim_callbacks(now, 60_000, usize::MAX),
        store.claim_callbacks(now, 60_000, usize::MAX)
    );
    let count = times_claimed(a, b);
    assert_eq!(count(succeeds.task_id), 1, "claimed once");
    assert_eq!(count(fails.task_id), 1, "a failure's callback too, once");
    assert_eq!(count(silent.task_id), 0);
    let again = store
        .claim_callbacks(now, 60_000, usize::MAX)
        .await
        .unwrap();
    assert!(
        !again.iter().any(|r| r.task_id == succeeds.task_id),
        "within the lease it is not claimed again"
    );
    // After the lease (a dispatcher died or stalled mid-delivery) it is due again.
    let later = claim(store, succeeds.task_id, now + 60_001).await;
    // The first dispatcher, back after its lease, records nothing; the second does.
    let delivered = WebhookDelivery {
        state: WebhookState::Delivered,
        attempts: 1,
        last_status: None,
        updated_at_ms: now_ms(),
        next_attempt_at_ms: 0,
    };
    let stale = store
        .record_webhook(succeeds.task_id, now + 60_000, &delivered)
        .await;
    assert!(
        !stale.unwrap(),
        "a claim whose lease ran out records nothing"
    );
    let recorded = store
        .record_webhook(succeeds.task_id, later, &delivered)
        .await;
    assert!(recorded.unwrap(), "the latest claim holds");
    // Delivered: never claimed again.
    let after = store
        .claim_callbacks(now + 1_000_000, 60_000, usize::MAX)
        .await
        .unwrap();
    assert!(!after.iter().any(|r| r.task_id == succeeds.task_id));
}

/// How often each task came back from two claims made at once.
fn times_claimed(
    a: Result<Vec<TaskRecord>, ResultsError>,
    b: Result<Vec<TaskRecord>, ResultsError>,
) -> impl Fn(TaskId) -> usize {
    let claimed: Vec<TaskId> = a
        .expect("claim")
        .into_iter()
        .chain(b.expect("claim"))
        .map(|r| r.task_id)
        .collect();
    move |id| claimed.iter().filter(|c| **c == id).count()
}

/// Pages of the task listing: newest first, each state's filter, cursors that neither skip nor
/// repeat a task (ties on the acceptance time included), and counts per state.
async fn listing_pages_newest_first(store: &dyn ResultStore) {
    let before = store.count_by_state().await.expect("count");
    // Accepted "in the future", so that these are the newest tasks whatever else the store
    // holds; pairs share a timestamp, so the id must break ties.
    let base = now_ms() + 1_000_000_000_000;
    let mut created = Vec::new();
    for i in 0..7 {
        let mut r = record();
        r.created_at_ms = base + i / 2;
        store.create(&r).await.expect("create");
        created.push(r);
    }
    for r in &created[..3] {
        store.start(r.task_id).await.expect("start");
        store.fail(r.task_id, "boom").await.expect("fail");
    }
    let mut newest: Vec<_> = created
        .iter()
        .map(|r| (r.created_at_ms, r.task_id))
        .collect();
    newest.sort_by(|a, b| b.cmp(a));

    // Three pages of three, two and two in any state.
    let mut seen = Vec::new();
    let mut query = TaskQuery::newest(3);
    for size in [3, 3, 1] {
        let page = store.list(&query).await.expect("list");
        let page: Vec<_> = page
            .iter()
            .map(|r| (r.created_at_ms, r.task_id))
            .take_while(|(at, _)| *at >= base)
            .collect();
        assert_eq!(page.len(), size, "a page holds up to its limit");
        query.after = page.last().copied();
        seen.extend(page);
    }
    assert_eq!(
        seen, newest,
        "pages are newest first, with no task skipped or repeated"
    );

    let failed = TaskQuery {
        state: Some(TaskState::Failure),
        ..TaskQuery::newest(2)
    };
    let page = store.list(&failed).await.expect("list failed");
    assert_eq!(page.len(), 2);
    assert!(page.iter().all(|r| r.state == TaskState::Failure));
    let rest = store
        .list(&TaskQuery {
            after: page.last().map(|r| (r.created_at_ms, r.task_id)),
            ..failed.clone()
        })
        .await
        .expect("list failed, second page");
    let mut ours: Vec<_> = page
        .iter()
        .chain(&rest)
        .filter(|r| r.created_at_ms >= base)
        .map(|r| r.task_id)
        .collect();
    ours.sort();
    let mut expected: Vec<_> = created[..3].iter().map(|r| r.task_id).collect();
    expected.sort();
    assert_eq!(
        ours, expected,
        "the state filter finds exactly the failed tasks"
    );
    let pending = TaskQuery {
        state: Some(TaskState::Pending),
        ..TaskQuery::newest(10)
    };
    let page = store.list(&pending).await.expect("list pending");
    assert!(page.iter().all(|r| r.state == TaskState::Pending));
    assert!(created[3..]
        .iter()
        .all(|c| page.iter().any(|r| r.task_id == c.task_id)));

    let after = store.count_by_state().await.expect("count");
    assert_eq!(
        (after.pending, after.failure),
        (before.pending + 4, before.failure + 3),
        "counts per state"
    );
    for r in &created {
        store.delete(r.task_id).await.expect("delete");
    }
}

/// A task in `state` that ended `at` (ms since the epoch).
fn ended(state: TaskState, at: i64) -> TaskRecord {
    let mut r = record();
    r.state = state;
    (r.created_at_ms, r.updated_at_ms) = (at, at);
    match state {
        TaskState::Success => r.result = Some(result(r.task_id, "tabby")),
        TaskState::Failure => r.error = Some("broken".into()),
        _ => {}
    }
    r
}

/// Tasks that ended before a cutoff in 2001, so that no other task of the store is as old.
const LONG_AGO: i64 = 1_000_000_000_000;

/// Expiry deletes final tasks unchanged since the cutoff and nothing else, oldest first, at most
/// the limit per call, each once however many sweepers run; one whose callback is still due
/// waits for it.
async fn expired_tasks_are_deleted_once(store: &dyn ResultStore) {
    let cutoff = LONG_AGO + 1_000;
    let finals: Vec<TaskRecord> = (0..12)
        .map(|i| {
            let state = [TaskState::Success, TaskState::Failure][i as usize % 2];
            ended(state, LONG_AGO + i)
        })
        .collect();
    let kept = [
        ended(TaskState::Pending, LONG_AGO),
        ended(TaskState::Started, LONG_AGO),
        // Ended at the cutoff, not before it.
        ended(TaskState::Success, cutoff),
    ];
    let mut calling_back = ended(TaskState::Failure, LONG_AGO);
    calling_back.webhook = Some(WebhookDelivery::due(LONG_AGO));
    for r in finals.iter().chain(&kept).chain([&calling_back]) {
        store.create(r).await.expect("create");
    }

    let first = store
        .delete_expired(cutoff, 5)
        .await
        .expect("delete expired");
    assert_eq!(
        first,
        finals[..5],
        "the oldest first, at most the limit, each as it was recorded"
    );
    // Three sweepers at once, in small batches: each task is deleted (and returned) once.
    let sweep = || async {
        let mut deleted = Vec::new();
        loop {
            let batch = store
                .delete_expired(cutoff, 2)
                .await
                .expect("delete expired");
            assert!(batch.len() <= 2, "the limit holds");
            if batch.is_empty() {
                return deleted;
            }
            deleted.extend(batch.into_iter().map(|r| r.task_id));
        }
    };
    let (a, b, c) = tokio::join!(sweep(), sweep(), sweep());
    let swept: Vec<TaskId> = a.into_iter().chain(b).chain(c).collect();
    for r in &finals[5..] {
        let times = swept.iter().filter(|id| **id == r.task_id).count();
        assert_eq!(times, 1, "an expired task is deleted once");
    }
    for r in &finals {
        assert!(
            store.get(r.task_id).await.expect("get").is_none(),
            "an expired task is gone"
        );
    }
    for r in kept.iter().chain([&calling_back]) {
        assert!(
            !swept.contains(&r.task_id),
            "unfinished, recent and calling-back tasks are kept"
        );
        assert_eq!(store.get(r.task_id).await.expect("get").as_ref(), Some(r));
    }

    // Its callback given up on, the last one expires too.
    let failed = WebhookDelivery {
        state: WebhookState::Failed,
        attempts: 5,
        last_status: Some("HTTP 500".into()),
        updated_at_ms: now_ms(),
        next_attempt_at_ms: 0,
    };
    let lease = claim(store, calling_back.task_id, LONG_AGO).await;
    let recorded = store
        .record_webhook(calling_back.task_id, lease, &failed)
        .await;
    assert!(recorded.expect("record webhook"));
    let last = store
        .delete_expired(cutoff, 100)
        .await
        .expect("delete expired");
    let last: Vec<TaskId> = last.iter().map(|r| r.task_id).collect();
    assert_eq!(last, [calling_back.task_id]);
    for r in &kept {
        store.delete(r.task_id).await.expect("delete");
    }
}

/// Image expiry takes final tasks unchanged since the cutoff once each, however many sweepers
/// run, and keeps their records.
async fn expired_images_are_claimed_once(store: &dyn ResultStore) {
    let cutoff = LONG_AGO + 1_000;
    let finals: Vec<TaskRecord> = (0..6)
        .map(|i| ended([TaskState::Failure, TaskState::Success][i % 2], LONG_AGO))
        .collect();
    let kept = [
        ended(TaskState::Pending, LONG_AGO),
        ended(TaskState::Success, cutoff),
    ];
    for r in finals.iter().chain(&kept) {
        store.create(r).await.expect("create");
    }
    let claim = || async {
        let mut claimed = Vec::new();
        loop {
            let batch = store
                .claim_expired_images(cutoff, 2)
                .await
                .expect("claim images");
            assert!(batch.len() <= 2, "the limit holds");
            if batch.is_empty() {
                return claimed;
            }
            claimed.extend(batch);
        }
    };
    let (a, b) = tokio::join!(claim(), claim());
    let claimed: Vec<TaskRecord> = a.into_iter().chain(b).collect();
    for r in &finals {
        let times: Vec<_> = claimed.iter().filter(|c| c.task_id == r.task_id).collect();
        assert_eq!(times, [r], "claimed once, with its object key");
    }
    for r in &kept {
        assert!(!claimed.iter().any(|c| c.task_id == r.task_id));
    }
    assert!(
        store
            .claim_expired_images(cutoff, usize::MAX)
            .await
            .expect("claim images")
            .is_empty(),
        "a claimed image is not claimed again"
    );
    for r in finals.iter().chain(&kept) {
        assert_eq!(
            store.get(r.task_id).await.expect("get").as_ref(),
            Some(r),
            "the record stays as it was"
        );
        store.delete(r.task_id).await.expect("delete");
    }
}

/// A store that tells of final tasks tells of each as it ends, completed or failed, and not of
/// one that has only started.
async fn final_tasks_are_told(store: &dyn ResultStore) {
    let Some(mut told) = store.final_tasks() else {
        return;
    };
    let mut next = async || {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), told.recv()).await;
        next.expect("told within 10 s").expect("still telling")
    };
    assert_eq!(next().await, FinalTasks::Listening, "listening, first");
    let (done, failed, open) = (record(), record(), record());
    for r in [&done, &failed, &open] {
        store.create(r).await.expect("create");
        store.start(r.task_id).await.expect("start");
    }
    assert!(store
        .complete(done.task_id, &result(done.task_id, "tabby"))
        .await
        .unwrap());
    assert!(store.fail(failed.task_id, "broken").await.unwrap());
    let mut ended = std::collections::HashSet::new();
    while !(ended.contains(&done.task_id) && ended.contains(&failed.task_id)) {
        match next().await {
            FinalTasks::Final(id) => {
                assert_ne!(id, open.task_id, "a started task is not final");
                ended.insert(id);
            }
            other => panic!("told {other:?} while listening"),
        }
    }
}
