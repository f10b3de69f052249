use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{Row, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::{ResultStore, ResultsError, StateCounts, TaskQuery};
use crate::task::{now_ms, TaskId, TaskRecord, TaskResult, TaskState, WebhookDelivery};

const COLUMNS: &str = "task_id, state, object_key, metadata, callback_url, result, error, \
                       attempts, created_at_ms, updated_at_ms, webhook";

/// Task records in SQLite: the embedded default, one file under the data directory.
///
/// SQLite takes one writer at a time, and a writer that finds the database locked sleeps
/// (1 ms, then longer) before it tries again; so this process's writes queue for one thread
/// that holds the write connections for good and runs each statement itself (through sqlx,
/// each statement would be a round trip to its connection's thread). The writes that queued
/// while a commit ran go into the next commit together: one disk flush for all of them, where
/// each would wait for its own. Reads have a pool of their own, which WAL mode runs beside a
/// write.
pub struct SqliteResults {
    reads: SqlitePool,
    writes: mpsc::Sender<Write>,
}

/// Most writes in one commit: enough to share a flush among every upload and worker of a
/// busy process, few enough that one commit stays short.
const MOST_PER_COMMIT: usize = 64;

/// The write connections, one for each kind of commit.
struct Writer {
    /// Commits that wait for the disk (`synchronous = FULL`).
    durable: Connection,
    /// Commits that do not (`synchronous = NORMAL`: in WAL mode a commit survives the process,
    /// not a power cut), for a group of writes that need no more: [`ResultStore::start`]. Each
    /// commit of `durable` flushes the log with these in it.
    relaxed: Connection,
}

impl Writer {
    fn open(path: &Path) -> Result<Self, ResultsError> {
        let open = |synchronous: &str| -> rusqlite::Result<Connection> {
            let conn = Connection::open(path)?;
            conn.busy_timeout(Duration::from_secs(10))?;
            conn.pragma_update(None, "synchronous", synchronous)?;
            Ok(conn)
        };
        Ok(Self {
            durable: open("FULL").map_err(backend)?,
            relaxed: open("NORMAL").map_err(backend)?,
        })
    }
}

/// Runs a write's statement on the connection of its commit.
type Statement = Box<dyn FnOnce(&Connection) -> Ran + Send>;
/// Tells a caller how its write went, given the commit's error if the commit failed.
type Answer = Box<dyn FnOnce(Option<&rusqlite::Error>) + Send>;

/// One caller's write, waiting for its turn.
struct Write {
    /// It must be on disk before its caller hears of it.
    durable: bool,
    run: Statement,
}

/// A write that ran, waiting for its commit.
struct Ran {
    /// It failed in the database, which may have rolled back the whole transaction.
    broke: bool,
    answer: Answer,
}

impl SqliteResults {
    /// Opens (creating if needed) the database at a `sqlite://` URL and applies migrations.
    pub async fn connect(url: &str) -> Result<Self, ResultsError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(ResultsError::permanent)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let path = options.get_filename().to_owned();
        // Each connection to an in-memory SQLite has a database of its own: the records would
        // vanish between statements.
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if in_memory || path.as_os_str().is_empty() {
            return Err(ResultsError::permanent(format!(
                "{url:?} names no database file: give sqlite://PATH, or memory:// to keep the \
                 records in this process's memory"
            )));
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                ResultsError::permanent(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        // A local file needs no liveness check before each statement.
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(sqlx_backend)?;
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        // A newer version's migrations (every one adds only) do not stop this one: a rollback
        // still starts.
        migrator.set_ignore_missing(true);
        migrator
            .run(&reads)
            .await
            .map_err(ResultsError::permanent)?;
        let writer = tokio::task::spawn_blocking(move || Writer::open(&path))
            .await
            .map_err(ResultsError::permanent)??;
        let (writes, queued) = mpsc::channel(4 * MOST_PER_COMMIT);
        std::thread::Builder::new()
            .name("imgclf-sqlite-writer".into())
            .spawn(move || write_groups(queued, writer))
            .map_err(ResultsError::permanent)?;
        Ok(Self { reads, writes })
    }

    /// Runs `statement` in the next commit, and answers once that commit is made (`durable`:
    /// on disk).
    async fn write<T, F>(&self, durable: bool, statement: F) -> Result<T, ResultsError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, ResultsError> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let run = move |conn: &Connection| {
            let outcome = statement(conn);
            Ran {
                broke: matches!(outcome, Err(ResultsError::Backend { .. })),
                answer: Box::new(move |commit: Option<&rusqlite::Error>| {
                    let outcome = match (outcome, commit) {
                        (Ok(_), Some(error)) => Err(ResultsError::Backend {
                            source: error.to_string().into(),
                            temporary: is_temporary(error),
                        }),
                        (outcome, _) => outcome,
                    };
                    let _ = answer.send(outcome);
                }),
            }
        };
        let write = Write {
            durable,
            run: Box::new(run),
        };
        // A write dropped unanswered was rolled back (with another that broke the transaction)
        // or never ran (its transaction could not begin): trying it again is safe.
        let not_made =
            || ResultsError::temporary("the write was not made: its transaction did not commit");
        self.writes.send(write).await.map_err(|_| not_made())?;
        answered.await.map_err(|_| not_made())?
    }

    /// Runs a durable write that binds `values` in turn, and reads the rows it returns.
    async fn write_returning(
        &self,
        sql: String,
        values: Vec<i64>,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        self.write(true, move |conn| {
            let mut statement = conn.prepare_cached(&sql).map_err(backend)?;
            let mut rows = statement
                .query(rusqlite::params_from_iter(values))
                .map_err(backend)?;
            let mut records = Vec::new();
            while let Some(row) = rows.next().map_err(backend)? {
                records.push(record(row)?);
            }
            Ok(records)
        })
        .await
    }

    /// Runs a durable write that binds `values` in turn and returns nothing.
    async fn write_texts(
        &self,
        sql: &'static str,
        values: Vec<String>,
    ) -> Result<(), ResultsError> {
        self.write(true, move |conn| {
            conn.prepare_cached(sql)
                .and_then(|mut statement| statement.execute(rusqlite::params_from_iter(values)))
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    /// Runs a final transition: `value`, the time, the callback made due, the id.
    async fn finish(
        &self,
        sql: &'static str,
        id: TaskId,
        value: String,
    ) -> Result<bool, ResultsError> {
        let now = now_ms();
        let due = serde_json::to_string(&WebhookDelivery::due(now)).map_err(codec)?;
        self.write(true, move |conn| {
            let changed = conn
                .prepare_cached(sql)
                .and_then(|mut statement| {
                    statement.execute(params![value, now, due, id.to_string()])
                })
                .map_err(backend)?;
            Ok(changed == 1)
        })
        .await
    }
}

/// Takes the writes in turn, each group that queued meanwhile in one commit, until every
/// sender is gone.
fn write_groups(mut queued: mpsc::Receiver<Write>, writer: Writer) {
    let mut group = Vec::with_capacity(MOST_PER_COMMIT);
    while let Some(first) = queued.blocking_recv() {
        group.push(first);
        while group.len() < MOST_PER_COMMIT {
            match queued.try_recv() {
                Ok(write) => group.push(write),
                Err(_) => break,
            }
        }
        let conn = if group.iter().any(|write| write.durable) {
            &writer.durable
        } else {
            &writer.relaxed
        };
        commit(conn, group.drain(..));
    }
}

/// Runs `group` in one transaction and answers each write.
fn commit(conn: &Connection, mut group: impl ExactSizeIterator<Item = Write>) {
    if group.len() == 1 {
        let write = group.next().expect("one write");
        ((write.run)(conn).answer)(None);
        return;
    }
    // Writes dropped here unanswered hear that they were not made.
    if let Err(error) = conn.execute_batch("BEGIN IMMEDIATE") {
        tracing::warn!(%error, "SQLite could not begin a transaction");
        return;
    }
    let mut answers = Vec::with_capacity(group.len());
    for write in group {
        let ran = (write.run)(conn);
        if ran.broke {
            // The writes before it go with the rollback; the ones after it never ran.
            let _ = conn.execute_batch("ROLLBACK");
            (ran.answer)(None);
            return;
        }
        answers.push(ran.answer);
    }
    let committed = conn.execute_batch("COMMIT");
    if committed.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    for answer in answers {
        answer(committed.as_ref().err());
    }
}

fn backend(error: rusqlite::Error) -> ResultsError {
    let temporary = is_temporary(&error);
    ResultsError::Backend {
        source: error.into(),
        temporary,
    }
}

/// Busy or locked by another process, or a disk that may come back (full, failing).
fn is_temporary(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
        )
    )
}

fn sqlx_backend(error: sqlx::Error) -> ResultsError {
    let temporary = matches!(
        error,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    ) || matches!(&error, sqlx::Error::Database(db) if db.message().contains("locked"));
    ResultsError::Backend {
        source: error.into(),
        temporary,
    }
}

fn is_unique_violation(error: &rusqlite::Error) -> bool {
    matches!(
        error,
        rusqlite::Error::SqliteFailure(failure, _)
            if failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                || failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
    )
}

/// A row limit as SQLite binds it.
fn at_most(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn codec(error: impl Into<crate::BoxError>) -> ResultsError {
    ResultsError::Codec(error.into())
}

/// A row of [`COLUMNS`], as the reads (sqlx) and the writer (rusqlite) get it.
trait Columns {
    fn text(&self, name: &str) -> Result<Option<String>, ResultsError>;
    fn integer(&self, name: &str) -> Result<Option<i64>, ResultsError>;
}

impl Columns for SqliteRow {
    fn text(&self, name: &str) -> Result<Option<String>, ResultsError> {
        self.try_get(name).map_err(codec)
    }

    fn integer(&self, name: &str) -> Result<Option<i64>, ResultsError> {
        self.try_get(name).map_err(codec)
    }
}

impl Columns for rusqlite::Row<'_> {
    fn text(&self, name: &str) -> Result<Option<String>, ResultsError> {
        self.get(name).map_err(codec)
    }

    fn integer(&self, name: &str) -> Result<Option<i64>, ResultsError> {
        self.get(name).map_err(codec)
    }
}

fn record(row: &impl Columns) -> Result<TaskRecord, ResultsError> {
    let text = |name: &str| {
        row.text(name)?
            .ok_or_else(|| codec(format!("{name} is NULL")))
    };
    let integer = |name: &str| {
        row.integer(name)?
            .ok_or_else(|| codec(format!("{name} is NULL")))
    };
    Ok(TaskRecord {
        task_id: text("task_id")?.parse().map_err(codec)?,
        state: text("state")?.parse::<TaskState>().map_err(codec)?,
        object_key: text("object_key")?,
        metadata: serde_json::from_str(&text("metadata")?).map_err(codec)?,
        callback_url: row.text("callback_url")?,
        result: json(row, "result")?,
        error: row.text("error")?,
        attempts: u32::try_from(integer("attempts")?).map_err(codec)?,
        created_at_ms: integer("created_at_ms")?,
        updated_at_ms: integer("updated_at_ms")?,
        webhook: json(row, "webhook")?,
    })
}

fn json<T: serde::de::DeserializeOwned>(
    row: &impl Columns,
    name: &str,
) -> Result<Option<T>, ResultsError> {
    row.text(name)?
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(codec)
}

#[async_trait]
impl ResultStore for SqliteResults {
    async fn create(&self, r: &TaskRecord) -> Result<(), ResultsError> {
        let sql = format!("INSERT INTO tasks ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
        let result = r
            .result
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(codec)?;
        let metadata = serde_json::to_string(&r.metadata).map_err(codec)?;
        let webhook = r
            .webhook
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(codec)?;
        let r = r.clone();
        self.write(true, move |conn| {
            let inserted = conn.prepare_cached(&sql).and_then(|mut statement| {
                statement.execute(params![
                    r.task_id.to_string(),
                    r.state.as_str(),
                    r.object_key,
                    metadata,
                    r.callback_url,
                    result,
                    r.error,
                    i64::from(r.attempts),
                    r.created_at_ms,
                    r.updated_at_ms,
                    webhook,
                ])
            });
            match inserted {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => Err(ResultsError::Conflict(r.task_id)),
                Err(e) => Err(backend(e)),
            }
        })
        .await
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError> {
        let sql = format!("SELECT {COLUMNS} FROM tasks WHERE task_id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.reads)
            .await
            .map_err(sqlx_backend)?;
        row.as_ref().map(record).transpose()
    }

    async fn start(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError> {
        let sql = format!(
            "UPDATE tasks SET state = 'STARTED', attempts = attempts + 1, updated_at_ms = ? \
             WHERE task_id = ? AND state IN ('PENDING', 'STARTED') RETURNING {COLUMNS}"
        );
        // Its commit need not wait for the disk: see `Writer::relaxed`.
        let row = self
            .write(false, move |conn| {
                let mut statement = conn.prepare_cached(&sql).map_err(backend)?;
                let mut rows = statement
                    .query(params![now_ms(), id.to_string()])
                    .map_err(backend)?;
                rows.next().map_err(backend)?.map(record).transpose()
            })
            .await?;
        match row {
            Some(record) => Ok(Some(record)),
            None => self.get(id).await,
        }
    }

    async fn uncount_attempt(&self, id: TaskId) -> Result<(), ResultsError> {
        let sql = "UPDATE tasks SET attempts = attempts - 1 \
                   WHERE task_id = ? AND state = 'STARTED' AND attempts > 0";
        // Like the start it takes back, it need not wait for the disk.
        self.write(false, move |conn| {
            let mut statement = conn.prepare_cached(sql).map_err(backend)?;
            statement
                .execute(params![id.to_string()])
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn complete(&self, id: TaskId, result: &TaskResult) -> Result<bool, ResultsError> {
        let payload = serde_json::to_string(result).map_err(codec)?;
        let sql = "UPDATE tasks SET state = 'SUCCESS', result = ?, error = NULL, \
                   updated_at_ms = ?, webhook = CASE WHEN callback_url IS NULL THEN webhook \
                   ELSE ? END WHERE task_id = ? AND state IN ('PENDING', 'STARTED')";
        self.finish(sql, id, payload).await
    }

    async fn fail(&self, id: TaskId, error: &str) -> Result<bool, ResultsError> {
        let sql = "UPDATE tasks SET state = 'FAILURE', error = ?, updated_at_ms = ?, \
                   webhook = CASE WHEN callback_url IS NULL THEN webhook ELSE ? END \
                   WHERE task_id = ? AND state IN ('PENDING', 'STARTED')";
        self.finish(sql, id, error.to_owned()).await
    }

    async fn claim_callbacks(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        let sql = format!(
            "UPDATE tasks SET webhook = json_set(webhook, '$.next_attempt_at_ms', ?) \
             WHERE task_id IN (SELECT task_id FROM tasks \
             WHERE json_extract(webhook, '$.state') = 'pending' \
             AND COALESCE(json_extract(webhook, '$.next_attempt_at_ms'), 0) <= ? \
             ORDER BY json_extract(webhook, '$.next_attempt_at_ms'), task_id LIMIT ?) \
             RETURNING {COLUMNS}"
        );
        self.write_returning(sql, vec![now_ms + lease_ms, now_ms, at_most(limit)])
            .await
    }

    async fn record_webhook(
        &self,
        id: TaskId,
        claimed_until_ms: i64,
        delivery: &WebhookDelivery,
    ) -> Result<bool, ResultsError> {
        let webhook = serde_json::to_string(delivery).map_err(codec)?;
        let sql = "UPDATE tasks SET webhook = ? WHERE task_id = ? \
                   AND json_extract(webhook, '$.state') = 'pending' \
                   AND json_extract(webhook, '$.next_attempt_at_ms') = ?";
        self.write(true, move |conn| {
            let changed = conn
                .prepare_cached(sql)
                .and_then(|mut statement| {
                    statement.execute(params![webhook, id.to_string(), claimed_until_ms])
                })
                .map_err(backend)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn unfinished(&self, limit: usize) -> Result<Vec<TaskRecord>, ResultsError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tasks WHERE state IN ('PENDING', 'STARTED') \
             ORDER BY created_at_ms, task_id LIMIT ?"
        );
        let rows = sqlx::query(&sql)
            .bind(at_most(limit))
            .fetch_all(&self.reads)
            .await
            .map_err(sqlx_backend)?;
        rows.iter().map(record).collect()
    }

    async fn claim_stale(
        &self,
        before_ms: i64,
        pending_created_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        // One statement: SQLite runs it under its single writer lock.
        let sql = format!(
            "UPDATE tasks SET updated_at_ms = ? WHERE task_id IN (SELECT task_id FROM tasks \
             WHERE (state = 'STARTED' OR (state = 'PENDING' AND created_at_ms < ?)) \
             AND updated_at_ms < ? ORDER BY updated_at_ms, task_id LIMIT ?) RETURNING {COLUMNS}"
        );
        let values = vec![
            now_ms(),
            pending_created_before_ms,
            before_ms,
            at_most(limit),
        ];
        self.write_returning(sql, values).await
    }

    async fn list(&self, query: &TaskQuery) -> Result<Vec<TaskRecord>, ResultsError> {
        let mut conditions = Vec::new();
        if query.state.is_some() {
            conditions.push("state = ?");
        }
        if query.after.is_some() {
            conditions.push("(created_at_ms, task_id) < (?, ?)");
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM tasks {filter} \
             ORDER BY created_at_ms DESC, task_id DESC LIMIT ?"
        );
        let mut select = sqlx::query(&sql);
        if let Some(state) = query.state {
            select = select.bind(state.as_str());
        }
        if let Some((created_at_ms, id)) = query.after {
            select = select.bind(created_at_ms).bind(id.to_string());
        }
        let rows = select
            .bind(at_most(query.limit))
            .fetch_all(&self.reads)
            .await
            .map_err(sqlx_backend)?;
        rows.iter().map(record).collect()
    }

    async fn count_by_state(&self) -> Result<StateCounts, ResultsError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM tasks GROUP BY state")
                .fetch_all(&self.reads)
                .await
                .map_err(sqlx_backend)?;
        StateCounts::from_rows(rows)
    }

    async fn delete(&self, id: TaskId) -> Result<(), ResultsError> {
        self.write_texts("DELETE FROM tasks WHERE task_id = ?", vec![id.to_string()])
            .await
    }

    async fn delete_expired(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        // One statement under SQLite's single writer lock: sweepers at once delete each task
        // once. The legacy `results` is a view of `tasks`, so its rows go too.
        let sql = format!(
            "DELETE FROM tasks WHERE task_id IN (SELECT task_id FROM tasks \
             WHERE state IN ('SUCCESS', 'FAILURE') AND updated_at_ms < ? \
             AND COALESCE(json_extract(webhook, '$.state'), '') <> 'pending' \
             ORDER BY updated_at_ms, task_id LIMIT ?) RETURNING {COLUMNS}"
        );
        let mut records = self
            .write_returning(sql, vec![before_ms, at_most(limit)])
            .await?;
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
            "UPDATE tasks SET image_deleted_at_ms = ? WHERE task_id IN (SELECT task_id FROM tasks \
             WHERE state IN ('SUCCESS', 'FAILURE') AND updated_at_ms < ? \
             AND image_deleted_at_ms IS NULL ORDER BY updated_at_ms, task_id LIMIT ?) \
             RETURNING {COLUMNS}"
        );
        let mut records = self
            .write_returning(sql, vec![now_ms(), before_ms, at_most(limit)])
            .await?;
        // RETURNING keeps no order.
        records.sort_by_key(|r| (r.updated_at_ms, r.task_id));
        Ok(records)
    }

    async fn check(&self) -> Result<(), ResultsError> {
        if self.writes.is_closed() {
            return Err(ResultsError::permanent("the SQLite writer has stopped"));
        }
        sqlx::query("SELECT 1")
            .execute(&self.reads)
            .await
            .map_err(sqlx_backend)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;
    use std::sync::Arc;

    fn pending() -> TaskRecord {
        let id = TaskId::new();
        TaskRecord::pending(id, format!("images/{id}.jpg"), Map::new(), None)
    }

    /// A write that fails in the database rolls back the commit it shared: the writes before it
    /// hear that they were not made (and may be tried again), the one that failed hears its own
    /// error, and the connection is left ready for the next commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_write_takes_back_only_what_was_not_answered() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("imgclf.db").display());
        let store = Arc::new(SqliteResults::connect(&url).await.unwrap());
        let (before, after) = (pending(), pending());
        // The writer waits in a write of its own while the three queue: they share a commit.
        let (entered, has_entered) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let held = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .write(true, move |_| {
                        entered.send(()).unwrap();
                        released.recv().unwrap();
                        Ok(())
                    })
                    .await
            }
        });
        tokio::task::spawn_blocking(move || has_entered.recv().unwrap())
            .await
            .unwrap();
        let (made_before, broken, made_after, ()) = tokio::join!(
            store.create(&before),
            store.write(true, |conn| conn
                .execute("INSERT INTO no_such_table VALUES (1)", [])
                .map_err(backend)),
            store.create(&after),
            // Polled last: the three are queued by then.
            async { release.send(()).unwrap() },
        );
        held.await.unwrap().expect("the held write is made");
        let broken = broken.expect_err("the statement fails");
        assert!(
            broken.to_string().contains("no_such_table") && !broken.is_temporary(),
            "the failed write hears its own error: {broken}"
        );
        for (made, record) in [(made_before, &before), (made_after, &after)] {
            let error = made.expect_err("rolled back or never run");
            assert!(error.is_temporary(), "worth another try: {error}");
            assert_eq!(store.get(record.task_id).await.unwrap(), None);
            store.create(record).await.expect("made on the next try");
            assert_eq!(
                store.get(record.task_id).await.unwrap().as_ref(),
                Some(record)
            );
        }
    }
}
