use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::Connection;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{FinalTasks, ResultStore, ResultsError, StateCounts, TaskQuery};
use crate::task::{now_ms, TaskId, TaskRecord, TaskResult, TaskState, WebhookDelivery};

const COLUMNS: &str = "task_id, state, object_key, metadata, callback_url, result, error, \
                       attempts, created_at_ms, updated_at_ms, webhook";

/// Task records in PostgreSQL, shared by every `imgclf-http` and `imgclf-worker`. The pool
/// reconnects by itself after the server restarts.
///
/// The writes of an image's life (`create`, `start`, `complete`) go in groups: the ones that
/// come in this process while a statement of their kind runs are made by the next one, one
/// round trip and one commit where each would take its own. PostgreSQL shares the log
/// flushes of concurrent commits anyway; what a group saves is the server's work per
/// statement and per transaction, which is most of its work per task.
pub struct PostgresResults {
    pool: PgPool,
    /// For the connections that listen for final tasks.
    options: PgConnectOptions,
    creates: Grouped<TaskRecord, ()>,
    /// On connections of their own with `synchronous_commit = off` (a commit returns before
    /// the server flushes its log, which it does within a fraction of a second): a start needs
    /// no more.
    starts: Grouped<TaskId, Option<TaskRecord>>,
    completes: Grouped<(TaskId, TaskResult), bool>,
}

impl PostgresResults {
    /// Connects to a `postgres://` URL and applies migrations (under the migrator's advisory
    /// lock, so processes starting together do not race).
    pub async fn connect(url: &str) -> Result<Self, ResultsError> {
        let options: PgConnectOptions = url.parse().map_err(ResultsError::permanent)?;
        let pool = pool_options(8)
            .connect_with(options.clone())
            .await
            .map_err(backend)?;
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        // A newer version's migrations (every one adds only) do not stop this one: a rolling
        // update's old processes still start, and so does a rollback.
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await.map_err(ResultsError::permanent)?;
        let relaxed = pool_options(4)
            .connect_with(options.clone().options([("synchronous_commit", "off")]))
            .await
            .map_err(backend)?;
        let creates = {
            let pool = pool.clone();
            Grouped::new(move |records| create_group(pool.clone(), records))
        };
        let starts = {
            let (relaxed, pool) = (relaxed.clone(), pool.clone());
            Grouped::new(move |ids| start_group(relaxed.clone(), pool.clone(), ids))
        };
        let completes = {
            let pool = pool.clone();
            Grouped::new(move |results| complete_group(pool.clone(), results))
        };
        Ok(Self {
            pool,
            options,
            creates,
            starts,
            completes,
        })
    }
}

/// The channel that the `tasks_final` trigger notifies with the id of each task that becomes
/// final (migration 0006).
const FINAL_CHANNEL: &str = "imgclf_task_final";

/// Listens for final tasks on a connection of its own, telling `told` of each, until `told`'s
/// receiver goes; after a failure, connects again a second later.
async fn tell_final_tasks(options: PgConnectOptions, told: mpsc::Sender<FinalTasks>) {
    loop {
        let listened = tokio::select! {
            listened = listen_for_final_tasks(&options, &told) => listened,
            _ = told.closed() => return,
        };
        if let Err(error) = listened {
            tracing::warn!(%error, "not listening for final tasks; waits read the store at short intervals");
        }
        if told.send(FinalTasks::NotListening).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Returns only with the connection's error, or when `told`'s receiver has gone.
async fn listen_for_final_tasks(
    options: &PgConnectOptions,
    told: &mpsc::Sender<FinalTasks>,
) -> Result<(), sqlx::Error> {
    // The listener reconnects through a pool: this one holds its connection and nothing else.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with(options.clone())
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(FINAL_CHANNEL).await?;
    loop {
        // Now, and after each reconnection: what ended before may have gone untold.
        if told.send(FinalTasks::Listening).await.is_err() {
            return Ok(());
        }
        // `None`: the connection was lost and is back, listening again.
        while let Some(notification) = listener.try_recv().await? {
            if let Ok(id) = notification.payload().parse() {
                if told.send(FinalTasks::Final(id)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Most writes in one statement: enough for every upload and worker of a busy process.
const MOST_PER_STATEMENT: usize = 64;

/// Statements of each kind at once. A write that finds none running goes straight to the
/// server on its caller's task, as it would with no grouping; one that finds one running
/// waits for it to end and goes in the next, with every other that came meanwhile. More at
/// once would take a few writes that come together sooner, and split the groups of many: in
/// BENCHMARKS.md, one gives the most tasks per second for the least CPU from 16 in flight
/// up, and a little less throughput than four at four in flight.
const STATEMENTS: usize = 1;

/// Callers' writes of one kind, made in groups when they come faster than single statements
/// go (up to [`MOST_PER_STATEMENT`] in one).
struct Grouped<I, O> {
    inner: Arc<GroupedInner<I, O>>,
}

type Answer<O> = oneshot::Sender<Result<O, ResultsError>>;
type MakeGroup<I, O> =
    Box<dyn Fn(Vec<I>) -> BoxFuture<'static, Vec<Result<O, ResultsError>>> + Send + Sync>;

struct GroupedInner<I, O> {
    /// Makes a group's writes, answering them in order.
    make: MakeGroup<I, O>,
    state: std::sync::Mutex<Waiting<I, O>>,
}

struct Waiting<I, O> {
    /// Statements running now.
    running: usize,
    queued: Vec<(I, Answer<O>)>,
}

impl<I: Send + 'static, O: Send + 'static> Grouped<I, O> {
    fn new<Fut>(make: impl Fn(Vec<I>) -> Fut + Send + Sync + 'static) -> Self
    where
        Fut: Future<Output = Vec<Result<O, ResultsError>>> + Send + 'static,
    {
        let make: MakeGroup<I, O> = Box::new(move |group| Box::pin(make(group)));
        Self {
            inner: Arc::new(GroupedInner {
                make,
                state: std::sync::Mutex::new(Waiting {
                    running: 0,
                    queued: Vec::new(),
                }),
            }),
        }
    }

    /// Makes `input`: at once if a statement is free, else in the next group.
    async fn make(&self, input: I) -> Result<O, ResultsError> {
        let turn = {
            let mut state = self.inner.state();
            if state.running < STATEMENTS {
                state.running += 1;
                Turn::Now(input)
            } else {
                let (answer, answered) = oneshot::channel();
                state.queued.push((input, answer));
                Turn::Queued(answered)
            }
        };
        match turn {
            Turn::Queued(answered) => answered.await.map_err(|_| not_made())?,
            Turn::Now(input) => {
                // Hands the statement on to what queued meanwhile, even if this caller gives up.
                let _running = Running(self.inner.clone());
                let mut outcome = (self.inner.make)(vec![input]).await;
                outcome.pop().unwrap_or_else(|| Err(not_made()))
            }
        }
    }
}

enum Turn<I, O> {
    /// A statement is free: the write goes now.
    Now(I),
    /// The write waits for its group.
    Queued(oneshot::Receiver<Result<O, ResultsError>>),
}

/// Unanswered, a write's statement may or may not have run; every write is guarded, so
/// trying it again never makes it twice.
fn not_made() -> ResultsError {
    ResultsError::temporary("the write was not made")
}

impl<I, O> GroupedInner<I, O> {
    fn state(&self) -> std::sync::MutexGuard<'_, Waiting<I, O>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running statement: when it ends, the writes that queued meanwhile go as the next group.
struct Running<I: Send + 'static, O: Send + 'static>(Arc<GroupedInner<I, O>>);

impl<I: Send + 'static, O: Send + 'static> Drop for Running<I, O> {
    fn drop(&mut self) {
        let inner = &self.0;
        let mut state = inner.state();
        if state.queued.is_empty() {
            state.running -= 1;
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to run the next group on (it is shutting down): the waiting writes
            // are told they were not made rather than left waiting.
            state.running -= 1;
            for (_, answer) in state.queued.drain(..) {
                let _ = answer.send(Err(not_made()));
            }
            return;
        };
        let take = state.queued.len().min(MOST_PER_STATEMENT);
        let group: Vec<_> = state.queued.drain(..take).collect();
        drop(state);
        let running = Running(inner.clone());
        runtime.spawn(async move {
            let (inputs, answers): (Vec<I>, Vec<Answer<O>>) = group.into_iter().unzip();
            for (answer, outcome) in answers.into_iter().zip((running.0.make)(inputs).await) {
                let _ = answer.send(outcome);
            }
        });
    }
}

/// Makes a group's writes: the first write for each task with one statement (`together`,
/// answering them in order), or each alone (`one`) if that fails, so that one bad write
/// cannot fail the others; then any repeats, one at a time, in order. (A task twice in one
/// group is rare: a redelivery racing the first delivery, or two uploads with one
/// idempotency key. A repeat must see its first write's outcome, as it would in sequence.)
async fn make_group<T, O, One>(
    group: Vec<T>,
    id: impl Fn(&T) -> TaskId,
    together: impl AsyncFnOnce(&[T]) -> Result<Vec<Result<O, ResultsError>>, ResultsError>,
    one: impl Fn(T) -> One,
) -> Vec<Result<O, ResultsError>>
where
    One: Future<Output = Result<O, ResultsError>>,
{
    let mut answers: Vec<Option<Result<O, ResultsError>>> = group.iter().map(|_| None).collect();
    let mut seen = HashSet::new();
    let (firsts, repeats): (Vec<_>, Vec<_>) =
        (group.into_iter().enumerate()).partition(|(_, write)| seen.insert(id(write)));
    let (indices, firsts): (Vec<usize>, Vec<T>) = firsts.into_iter().unzip();
    let made = match firsts.len() {
        1 => None,
        _ => together(&firsts).await.ok(),
    };
    let outcomes = match made {
        Some(outcomes) => outcomes,
        None => futures_util::future::join_all(firsts.into_iter().map(&one)).await,
    };
    for (i, outcome) in indices.into_iter().zip(outcomes) {
        answers[i] = Some(outcome);
    }
    for (i, write) in repeats {
        answers[i] = Some(one(write).await);
    }
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(not_made())))
        .collect()
}

fn json(value: &impl serde::Serialize) -> Result<serde_json::Value, ResultsError> {
    serde_json::to_value(value).map_err(codec)
}

async fn create_group(pool: PgPool, records: Vec<TaskRecord>) -> Vec<Result<(), ResultsError>> {
    let together = async |records: &[TaskRecord]| create_together(&pool, records).await;
    make_group(records, |r| r.task_id, together, |r| create_one(&pool, r)).await
}

/// Creates tasks of distinct ids with one statement; a conflict for each id that exists.
async fn create_together(
    pool: &PgPool,
    records: &[TaskRecord],
) -> Result<Vec<Result<(), ResultsError>>, ResultsError> {
    let mut columns = CreateColumns::default();
    for record in records {
        columns.push(record)?;
    }
    let sql = format!(
        "INSERT INTO tasks ({COLUMNS}) SELECT * FROM UNNEST($1::uuid[], $2::text[], \
         $3::text[], $4::jsonb[], $5::text[], $6::jsonb[], $7::text[], $8::int4[], \
         $9::int8[], $10::int8[], $11::jsonb[]) ON CONFLICT (task_id) DO NOTHING \
         RETURNING task_id"
    );
    let inserted: HashSet<Uuid> = sqlx::query_scalar(&sql)
        .bind(columns.task_id)
        .bind(columns.state)
        .bind(columns.object_key)
        .bind(columns.metadata)
        .bind(columns.callback_url)
        .bind(columns.result)
        .bind(columns.error)
        .bind(columns.attempts)
        .bind(columns.created_at_ms)
        .bind(columns.updated_at_ms)
        .bind(columns.webhook)
        .fetch_all(pool)
        .await
        .map_err(backend)?
        .into_iter()
        .collect();
    Ok(records
        .iter()
        .map(|r| match inserted.contains(&r.task_id.as_uuid()) {
            true => Ok(()),
            false => Err(ResultsError::Conflict(r.task_id)),
        })
        .collect())
}

/// A group of new records, column by column, for `UNNEST`.
#[derive(Default)]
struct CreateColumns {
    task_id: Vec<Uuid>,
    state: Vec<&'static str>,
    object_key: Vec<String>,
    metadata: Vec<serde_json::Value>,
    callback_url: Vec<Option<String>>,
    result: Vec<Option<serde_json::Value>>,
    error: Vec<Option<String>>,
    attempts: Vec<i32>,
    created_at_ms: Vec<i64>,
    updated_at_ms: Vec<i64>,
    webhook: Vec<Option<serde_json::Value>>,
}

impl CreateColumns {
    fn push(&mut self, r: &TaskRecord) -> Result<(), ResultsError> {
        self.task_id.push(r.task_id.as_uuid());
        self.state.push(r.state.as_str());
        self.object_key.push(r.object_key.clone());
        self.metadata
            .push(serde_json::Value::Object(r.metadata.clone()));
        self.callback_url.push(r.callback_url.clone());
        self.result.push(r.result.as_ref().map(json).transpose()?);
        self.error.push(r.error.clone());
        self.attempts.push(r.attempts as i32);
        self.created_at_ms.push(r.created_at_ms);
        self.updated_at_ms.push(r.updated_at_ms);
        self.webhook.push(r.webhook.as_ref().map(json).transpose()?);
        Ok(())
    }
}

async fn create_one(pool: &PgPool, r: TaskRecord) -> Result<(), ResultsError> {
    let sql = format!(
        "INSERT INTO tasks ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    );
    let inserted = sqlx::query(&sql)
        .bind(r.task_id.as_uuid())
        .bind(r.state.as_str())
        .bind(&r.object_key)
        .bind(serde_json::Value::Object(r.metadata.clone()))
        .bind(&r.callback_url)
        .bind(r.result.as_ref().map(json).transpose()?)
        .bind(&r.error)
        .bind(r.attempts as i32)
        .bind(r.created_at_ms)
        .bind(r.updated_at_ms)
        .bind(r.webhook.as_ref().map(json).transpose()?)
        .execute(pool)
        .await;
    match inserted {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
            Err(ResultsError::Conflict(r.task_id))
        }
        Err(e) => Err(backend(e)),
    }
}

async fn start_group(
    relaxed: PgPool,
    durable: PgPool,
    ids: Vec<TaskId>,
) -> Vec<Result<Option<TaskRecord>, ResultsError>> {
    let together = async |ids: &[TaskId]| start_together(&relaxed, &durable, ids).await;
    make_group(
        ids,
        |id| *id,
        together,
        |id| start_one(&relaxed, &durable, id),
    )
    .await
}

/// Starts distinct tasks with one statement; the records as they now are, a final one
/// unchanged, an unknown one `None`. An error after the statement ran belongs to the tasks
/// it did not start: the others' attempts are counted, and must not be counted again.
async fn start_together(
    relaxed: &PgPool,
    durable: &PgPool,
    ids: &[TaskId],
) -> Result<Vec<Result<Option<TaskRecord>, ResultsError>>, ResultsError> {
    let uuids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
    let sql = format!(
        "UPDATE tasks SET state = 'STARTED', attempts = attempts + 1, updated_at_ms = $1 \
         FROM UNNEST($2::uuid[]) AS started(id) \
         WHERE task_id = started.id AND state IN ('PENDING', 'STARTED') RETURNING {COLUMNS}"
    );
    let rows = sqlx::query(&sql)
        .bind(now_ms())
        .bind(&uuids)
        .fetch_all(relaxed)
        .await
        .map_err(backend)?;
    let mut records = HashMap::with_capacity(ids.len());
    let mut unreadable = None;
    for row in &rows {
        match record(row) {
            Ok(record) => {
                records.insert(record.task_id, record);
            }
            Err(e) => unreadable = Some(e.to_string()),
        }
    }
    if records.len() < ids.len() && unreadable.is_none() {
        // The final and the unknown, as they are.
        let rest: Vec<Uuid> = (ids.iter())
            .filter(|id| !records.contains_key(id))
            .map(|id| id.as_uuid())
            .collect();
        let sql = format!("SELECT {COLUMNS} FROM tasks WHERE task_id = ANY($1)");
        match sqlx::query(&sql).bind(&rest).fetch_all(durable).await {
            Ok(rows) => {
                for row in &rows {
                    match record(row) {
                        Ok(record) => {
                            records.insert(record.task_id, record);
                        }
                        Err(e) => unreadable = Some(e.to_string()),
                    }
                }
            }
            Err(e) => return Ok(answer_or(ids, records, backend(e))),
        }
    }
    match unreadable {
        Some(e) => Ok(answer_or(ids, records, ResultsError::Codec(e.into()))),
        None => Ok(ids.iter().map(|id| Ok(records.remove(id))).collect()),
    }
}

/// Each task's record, or `error` for those without one.
fn answer_or(
    ids: &[TaskId],
    mut records: HashMap<TaskId, TaskRecord>,
    error: ResultsError,
) -> Vec<Result<Option<TaskRecord>, ResultsError>> {
    let (codec, temporary, text) = (
        matches!(error, ResultsError::Codec(_)),
        error.is_temporary(),
        error.to_string(),
    );
    let error = || match (codec, temporary) {
        (true, _) => ResultsError::Codec(text.clone().into()),
        (false, true) => ResultsError::temporary(text.clone()),
        (false, false) => ResultsError::permanent(text.clone()),
    };
    ids.iter()
        .map(|id| records.remove(id).map(Some).ok_or_else(error))
        .collect()
}

async fn start_one(
    relaxed: &PgPool,
    durable: &PgPool,
    id: TaskId,
) -> Result<Option<TaskRecord>, ResultsError> {
    let sql = format!(
        "UPDATE tasks SET state = 'STARTED', attempts = attempts + 1, updated_at_ms = $1 \
         WHERE task_id = $2 AND state IN ('PENDING', 'STARTED') RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(now_ms())
        .bind(id.as_uuid())
        .fetch_optional(relaxed)
        .await
        .map_err(backend)?;
    match row {
        Some(row) => record(&row).map(Some),
        None => get(durable, id).await,
    }
}

async fn get(pool: &PgPool, id: TaskId) -> Result<Option<TaskRecord>, ResultsError> {
    let sql = format!("SELECT {COLUMNS} FROM tasks WHERE task_id = $1");
    let row = sqlx::query(&sql)
        .bind(id.as_uuid())
        .fetch_optional(pool)
        .await
        .map_err(backend)?;
    row.as_ref().map(record).transpose()
}

async fn complete_group(
    pool: PgPool,
    results: Vec<(TaskId, TaskResult)>,
) -> Vec<Result<bool, ResultsError>> {
    let together = async |results: &[(TaskId, TaskResult)]| complete_together(&pool, results).await;
    let one = |(id, result): (TaskId, TaskResult)| complete_one(&pool, id, result);
    make_group(results, |(id, _)| *id, together, one).await
}

/// Completes distinct tasks with one statement; for each, whether this made it final.
async fn complete_together(
    pool: &PgPool,
    results: &[(TaskId, TaskResult)],
) -> Result<Vec<Result<bool, ResultsError>>, ResultsError> {
    let now = now_ms();
    let due = json(&WebhookDelivery::due(now))?;
    let (mut ids, mut payloads, mut models) = (Vec::new(), Vec::new(), Vec::new());
    for (id, result) in results {
        ids.push(id.as_uuid());
        payloads.push(json(result)?);
        models.push(result.model.as_str());
    }
    // `complete_one`'s statement for many: the result rows are written only for the tasks
    // the UPDATE made final. A join on the ids (not `task_id = ANY(…)`, which the planner
    // may answer by scanning every unfinished task) finds each by its key.
    let done: HashSet<Uuid> = sqlx::query_scalar(
        "WITH done AS ( \
             UPDATE tasks SET state = 'SUCCESS', result = given.payload, model = given.model_name, \
             error = NULL, updated_at_ms = $4, \
             webhook = CASE WHEN callback_url IS NULL THEN webhook ELSE $5 END \
             FROM UNNEST($1::uuid[], $2::jsonb[], $3::text[]) AS given(id, payload, model_name) \
             WHERE task_id = given.id AND state IN ('PENDING', 'STARTED') \
             RETURNING task_id, given.payload), \
         kept AS ( \
             INSERT INTO results (task_id, payload) SELECT task_id::text, payload::json FROM done \
             ON CONFLICT (task_id) DO NOTHING) \
         SELECT task_id FROM done",
    )
    .bind(&ids)
    .bind(&payloads)
    .bind(&models)
    .bind(now)
    .bind(&due)
    .fetch_all(pool)
    .await
    .map_err(backend)?
    .into_iter()
    .collect();
    Ok(ids.iter().map(|id| Ok(done.contains(id))).collect())
}

async fn complete_one(pool: &PgPool, id: TaskId, result: TaskResult) -> Result<bool, ResultsError> {
    let payload = json(&result)?;
    let now = now_ms();
    let due = json(&WebhookDelivery::due(now))?;
    // One statement, so one round trip and one commit: the result row is written only if
    // this call made the task final (the CTE's INSERT reads the UPDATE's rows).
    let (written,): (i64,) = sqlx::query_as(
        "WITH done AS ( \
             UPDATE tasks SET state = 'SUCCESS', result = $1, model = $2, error = NULL, \
             updated_at_ms = $3, \
             webhook = CASE WHEN callback_url IS NULL THEN webhook ELSE $5 END \
             WHERE task_id = $4 AND state IN ('PENDING', 'STARTED') RETURNING task_id), \
         kept AS ( \
             INSERT INTO results (task_id, payload) SELECT task_id::text, $1 FROM done \
             ON CONFLICT (task_id) DO NOTHING) \
         SELECT count(*) FROM done",
    )
    .bind(&payload)
    .bind(&result.model)
    .bind(now)
    .bind(id.as_uuid())
    .bind(&due)
    .fetch_one(pool)
    .await
    .map_err(backend)?;
    Ok(written == 1)
}

/// A pool that checks a connection before lending it only when it has been idle a while: a
/// server restart drops connections that sat unused, while one used a moment ago is alive, and
/// a check before every statement (sqlx's default) is a round trip to the server each time.
fn pool_options(connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for > Duration::from_secs(1) {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
}

fn backend(error: sqlx::Error) -> ResultsError {
    let temporary = match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        // Class 08 (connection), 40 (rollback: serialization, deadlock), 53 (resources),
        // 57P (operator intervention: admin shutdown, cannot connect now).
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || code.starts_with("40")
                || code.starts_with("53")
                || code.starts_with("57P")
        }),
        _ => false,
    };
    ResultsError::Backend {
        source: error.into(),
        temporary,
    }
}

fn codec(error: impl Into<crate::BoxError>) -> ResultsError {
    ResultsError::Codec(error.into())
}

fn record(row: &PgRow) -> Result<TaskRecord, ResultsError> {
    let state: String = row.try_get("state").map_err(codec)?;
    let metadata: serde_json::Value = row.try_get("metadata").map_err(codec)?;
    let result: Option<serde_json::Value> = row.try_get("result").map_err(codec)?;
    Ok(TaskRecord {
        task_id: row.try_get::<Uuid, _>("task_id").map_err(codec)?.into(),
        state: state.parse::<TaskState>().map_err(codec)?,
        object_key: row.try_get("object_key").map_err(codec)?,
        metadata: serde_json::from_value(metadata).map_err(codec)?,
        callback_url: row.try_get("callback_url").map_err(codec)?,
        result: result
            .map(serde_json::from_value)
            .transpose()
            .map_err(codec)?,
        error: row.try_get("error").map_err(codec)?,
        attempts: row.try_get::<i32, _>("attempts").map_err(codec)? as u32,
        created_at_ms: row.try_get("created_at_ms").map_err(codec)?,
        updated_at_ms: row.try_get("updated_at_ms").map_err(codec)?,
        webhook: row
            .try_get::<Option<serde_json::Value>, _>("webhook")
            .map_err(codec)?
            .map(serde_json::from_value)
            .transpose()
            .map_err(codec)?,
    })
}

#[async_trait]
impl ResultStore for PostgresResults {
    async fn create(&self, r: &TaskRecord) -> Result<(), ResultsError> {
        self.creates.make(r.clone()).await
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError> {
        get(&self.pool, id).await
    }

    async fn start(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError> {
        self.starts.make(id).await
    }

    async fn uncount_attempt(&self, id: TaskId) -> Result<(), ResultsError> {
        sqlx::query(
            "UPDATE tasks SET attempts = attempts - 1 \
             WHERE task_id = $1 AND state = 'STARTED' AND attempts > 0",
        )
        .bind(id.as_uuid())
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn complete(&self, id: TaskId, result: &TaskResult) -> Result<bool, ResultsError> {
        self.completes.make((id, result.clone())).await
    }

    async fn fail(&self, id: TaskId, error: &str) -> Result<bool, ResultsError> {
        let now = now_ms();
        let due = json(&WebhookDelivery::due(now))?;
        let done = sqlx::query(
            "UPDATE tasks SET state = 'FAILURE', error = $1, updated_at_ms = $2, \
             webhook = CASE WHEN callback_url IS NULL THEN webhook ELSE $4 END \
             WHERE task_id = $3 AND state IN ('PENDING', 'STARTED')",
        )
        .bind(error)
        .bind(now)
        .bind(id.as_uuid())
        .bind(&due)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn claim_callbacks(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        // SKIP LOCKED: dispatchers of several workers split the due callbacks between them.
        let sql = format!(
            "UPDATE tasks SET webhook = jsonb_set(webhook, '{{next_attempt_at_ms}}', to_jsonb($1::bigint)) \
             WHERE task_id IN (SELECT task_id FROM tasks WHERE webhook->>'state' = 'pending' \
             AND COALESCE((webhook->>'next_attempt_at_ms')::bigint, 0) <= $2 \
             ORDER BY (webhook->>'next_attempt_at_ms')::bigint, task_id LIMIT $3 \
             FOR UPDATE SKIP LOCKED) RETURNING {COLUMNS}"
        );
        let rows = sqlx::query(&sql)
            .bind(now_ms + lease_ms)
            .bind(now_ms)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter().map(record).collect()
    }

    async fn record_webhook(
        &self,
        id: TaskId,
        claimed_until_ms: i64,
        delivery: &WebhookDelivery,
    ) -> Result<bool, ResultsError> {
        let webhook = json(delivery)?;
        let done = sqlx::query(
            "UPDATE tasks SET webhook = $1 WHERE task_id = $2 AND webhook->>'state' = 'pending' \
             AND (webhook->>'next_attempt_at_ms')::bigint = $3",
        )
        .bind(webhook)
        .bind(id.as_uuid())
        .bind(claimed_until_ms)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn unfinished(&self, limit: usize) -> Result<Vec<TaskRecord>, ResultsError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tasks WHERE state IN ('PENDING', 'STARTED') \
             ORDER BY created_at_ms, task_id LIMIT $1"
        );
        let rows = sqlx::query(&sql)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter().map(record).collect()
    }

    async fn claim_stale(
        &self,
        before_ms: i64,
        pending_created_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        // SKIP LOCKED: sweepers of several workers split the stale tasks between them.
        let sql = format!(
            "UPDATE tasks SET updated_at_ms = $1 WHERE task_id IN (SELECT task_id FROM tasks \
             WHERE (state = 'STARTED' OR (state = 'PENDING' AND created_at_ms < $2)) \
             AND updated_at_ms < $3 ORDER BY updated_at_ms, task_id LIMIT $4 \
             FOR UPDATE SKIP LOCKED) RETURNING {COLUMNS}"
        );
        let rows = sqlx::query(&sql)
            .bind(now_ms())
            .bind(pending_created_before_ms)
            .bind(before_ms)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter().map(record).collect()
    }

    async fn list(&self, query: &TaskQuery) -> Result<Vec<TaskRecord>, ResultsError> {
        let mut conditions = Vec::new();
        if query.state.is_some() {
            conditions.push(format!("state = ${}", conditions.len() + 1));
        }
        if query.after.is_some() {
            let n = conditions.len() + 1;
            conditions.push(format!("(created_at_ms, task_id) < (${n}, ${})", n + 1));
        }
        let parameters = conditions.len() + usize::from(query.after.is_some());
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM tasks {filter} \
             ORDER BY created_at_ms DESC, task_id DESC LIMIT ${}",
            parameters + 1
        );
        let mut select = sqlx::query(&sql);
        if let Some(state) = query.state {
            select = select.bind(state.as_str());
        }
        if let Some((created_at_ms, id)) = query.after {
            select = select.bind(created_at_ms).bind(id.as_uuid());
        }
        let rows = select
            .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter().map(record).collect()
    }

    async fn count_by_state(&self) -> Result<StateCounts, ResultsError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM tasks GROUP BY state")
                .fetch_all(&self.pool)
                .await
                .map_err(backend)?;
        StateCounts::from_rows(rows)
    }

    async fn delete(&self, id: TaskId) -> Result<(), ResultsError> {
        sqlx::query("DELETE FROM tasks WHERE task_id = $1")
            .bind(id.as_uuid())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn delete_expired(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        // SKIP LOCKED: sweepers of several workers split the expired tasks between them. The
        // replaced service's `results` rows go in the same statement, so the two never disagree.
        let sql = format!(
            "WITH expired AS (DELETE FROM tasks WHERE task_id IN (SELECT task_id FROM tasks \
             WHERE state IN ('SUCCESS', 'FAILURE') AND updated_at_ms < $1 \
             AND COALESCE(webhook->>'state', '') <> 'pending' \
             ORDER BY updated_at_ms, task_id LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING {COLUMNS}), \
             legacy AS (DELETE FROM results WHERE task_id IN (SELECT task_id::text FROM expired)) \
             SELECT {COLUMNS} FROM expired"
        );
        let rows = sqlx::query(&sql)
            .bind(before_ms)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        let mut records = rows.iter().map(record).collect::<Result<Vec<_>, _>>()?;
        // RETURNING keeps no order.
        records.sort_by_key(|r| (r.updated_at_ms, r.task_id));
        Ok(records)
    }

    async fn claim_expired_images(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        let sql = format!(
            "UPDATE tasks SET image_deleted_at_ms = $1 WHERE task_id IN (SELECT task_id FROM tasks \
             WHERE state IN ('SUCCESS', 'FAILURE') AND updated_at_ms < $2 \
             AND image_deleted_at_ms IS NULL ORDER BY updated_at_ms, task_id LIMIT $3 \
             FOR UPDATE SKIP LOCKED) RETURNING {COLUMNS}"
        );
        let rows = sqlx::query(&sql)
            .bind(now_ms())
            .bind(before_ms)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        let mut records = rows.iter().map(record).collect::<Result<Vec<_>, _>>()?;
        // RETURNING keeps no order.
        records.sort_by_key(|r| (r.updated_at_ms, r.task_id));
        Ok(records)
    }

    async fn check(&self) -> Result<(), ResultsError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// Each call listens on a connection of its own, which closes when the receiver goes.
    fn final_tasks(&self) -> Option<mpsc::Receiver<FinalTasks>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (told, receiver) = mpsc::channel(1024);
        runtime.spawn(tell_final_tasks(self.options.clone(), told));
        Some(receiver)
    }
}
