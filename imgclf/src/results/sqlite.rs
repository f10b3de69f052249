use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row, SqliteConnection, SqlitePool};

use super::{ResultStore, ResultsError, StateCounts, TaskQuery};
use crate::task::{now_ms, TaskId, TaskRecord, TaskResult, TaskState, WebhookDelivery};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

const COLUMNS: &str = "task_id, state, object_key, metadata, callback_url, result, error, \
                       attempts, created_at_ms, updated_at_ms, webhook";

/// Task records in SQLite: the embedded default, one file under the data directory.
///
/// SQLite takes one writer at a time, and a writer that finds the database locked sleeps
/// (1 ms, then longer) before it tries again; so this process's writes queue on one lock
/// instead, each on a connection held for good (a pool would ping the connection's thread
/// after every statement). Reads have a pool of their own, which WAL mode runs beside a write.
pub struct SqliteResults {
    reads: SqlitePool,
    writer: tokio::sync::Mutex<Writer>,
}

/// The write connections, one for each kind of commit.
struct Writer {
    /// Commits that wait for the disk (`synchronous = FULL`).
    durable: SqliteConnection,
    /// Commits that do not (`synchronous = NORMAL`: in WAL mode a commit survives the process,
    /// not a power cut), for the one write that needs no more: [`ResultStore::start`]. Each
    /// commit of `durable` flushes the log with these in it.
    relaxed: SqliteConnection,
}

impl SqliteResults {
    /// Opens (creating if needed) the database at a `sqlite://` URL and applies migrations.
    pub async fn connect(url: &str) -> Result<Self, ResultsError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(ResultsError::permanent)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        if let Some(parent) = options.get_filename().parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                ResultsError::permanent(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let mut durable = options.connect().await.map_err(backend)?;
        MIGRATOR
            .run(&mut durable)
            .await
            .map_err(ResultsError::permanent)?;
        let relaxed = options
            .clone()
            .synchronous(SqliteSynchronous::Normal)
            .connect()
            .await
            .map_err(backend)?;
        // A local file needs no liveness check before each statement.
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(backend)?;
        Ok(Self {
            reads,
            writer: tokio::sync::Mutex::new(Writer { durable, relaxed }),
        })
    }

    /// Runs a final transition: `value`, the time, the callback made due, the id.
    async fn finish(&self, sql: &str, id: TaskId, value: &str) -> Result<bool, ResultsError> {
        let now = now_ms();
        let due = serde_json::to_string(&WebhookDelivery::due(now)).map_err(codec)?;
        let mut writer = self.writer.lock().await;
        let done = sqlx::query(sql)
            .bind(value)
            .bind(now)
            .bind(due)
            .bind(id.to_string())
            .execute(&mut writer.durable)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }
}

fn backend(error: sqlx::Error) -> ResultsError {
    let temporary = matches!(
        error,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    ) || matches!(&error, sqlx::Error::Database(db) if db.message().contains("locked"));
    ResultsError::Backend {
        source: error.into(),
        temporary,
    }
}

fn codec(error: impl Into<crate::BoxError>) -> ResultsError {
    ResultsError::Codec(error.into())
}

fn record(row: &SqliteRow) -> Result<TaskRecord, ResultsError> {
    let text = |name: &str| row.try_get::<String, _>(name).map_err(codec);
    let result: Option<String> = row.try_get("result").map_err(codec)?;
    Ok(TaskRecord {
        task_id: text("task_id")?.parse().map_err(codec)?,
        state: text("state")?.parse::<TaskState>().map_err(codec)?,
        object_key: text("object_key")?,
        metadata: serde_json::from_str(&text("metadata")?).map_err(codec)?,
        callback_url: row.try_get("callback_url").map_err(codec)?,
        result: result
            .map(|r| serde_json::from_str(&r))
            .transpose()
            .map_err(codec)?,
        error: row.try_get("error").map_err(codec)?,
        attempts: row.try_get::<i64, _>("attempts").map_err(codec)? as u32,
        created_at_ms: row.try_get("created_at_ms").map_err(codec)?,
        updated_at_ms: row.try_get("updated_at_ms").map_err(codec)?,
        webhook: row
            .try_get::<Option<String>, _>("webhook")
            .map_err(codec)?
            .map(|w| serde_json::from_str(&w))
            .transpose()
            .map_err(codec)?,
    })
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
        let mut writer = self.writer.lock().await;
        let inserted = sqlx::query(&sql)
            .bind(r.task_id.to_string())
            .bind(r.state.as_str())
            .bind(&r.object_key)
            .bind(serde_json::to_string(&r.metadata).map_err(codec)?)
            .bind(&r.callback_url)
            .bind(result)
            .bind(&r.error)
            .bind(i64::from(r.attempts))
            .bind(r.created_at_ms)
            .bind(r.updated_at_ms)
            .bind(
                r.webhook
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(codec)?,
            )
            .execute(&mut writer.durable)
            .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                Err(ResultsError::Conflict(r.task_id))
            }
            Err(e) => Err(backend(e)),
        }
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError> {
        let sql = format!("SELECT {COLUMNS} FROM tasks WHERE task_id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.reads)
            .await
            .map_err(backend)?;
        row.as_ref().map(record).transpose()
    }

    async fn start(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError> {
        let sql = format!(
            "UPDATE tasks SET state = 'STARTED', attempts = attempts + 1, updated_at_ms = ? \
             WHERE task_id = ? AND state IN ('PENDING', 'STARTED') RETURNING {COLUMNS}"
        );
        let mut writer = self.writer.lock().await;
        let row = sqlx::query(&sql)
            .bind(now_ms())
            .bind(id.to_string())
            .fetch_optional(&mut writer.relaxed)
            .await
            .map_err(backend)?;
        drop(writer);
        match row {
            Some(row) => record(&row).map(Some),
            None => self.get(id).await,
        }
    }

    async fn complete(&self, id: TaskId, result: &TaskResult) -> Result<bool, ResultsError> {
        let payload = serde_json::to_string(result).map_err(codec)?;
        let sql = "UPDATE tasks SET state = 'SUCCESS', result = ?, error = NULL, \
                   updated_at_ms = ?, webhook = CASE WHEN callback_url IS NULL THEN webhook \
                   ELSE ? END WHERE task_id = ? AND state IN ('PENDING', 'STARTED')";
        self.finish(sql, id, &payload).await
    }

    async fn fail(&self, id: TaskId, error: &str) -> Result<bool, ResultsError> {
        let sql = "UPDATE tasks SET state = 'FAILURE', error = ?, updated_at_ms = ?, \
                   webhook = CASE WHEN callback_url IS NULL THEN webhook ELSE ? END \
                   WHERE task_id = ? AND state IN ('PENDING', 'STARTED')";
        self.finish(sql, id, error).await
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
        let mut writer = self.writer.lock().await;
        let rows = sqlx::query(&sql)
            .bind(now_ms + lease_ms)
            .bind(now_ms)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut writer.durable)
            .await
            .map_err(backend)?;
        rows.iter().map(record).collect()
    }

    async fn record_webhook(
        &self,
        id: TaskId,
        delivery: &WebhookDelivery,
    ) -> Result<(), ResultsError> {
        let webhook = serde_json::to_string(delivery).map_err(codec)?;
        let mut writer = self.writer.lock().await;
        sqlx::query("UPDATE tasks SET webhook = ? WHERE task_id = ?")
            .bind(webhook)
            .bind(id.to_string())
            .execute(&mut writer.durable)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn unfinished(&self, limit: usize) -> Result<Vec<TaskRecord>, ResultsError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tasks WHERE state IN ('PENDING', 'STARTED') \
             ORDER BY created_at_ms, task_id LIMIT ?"
        );
        let rows = sqlx::query(&sql)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.reads)
            .await
            .map_err(backend)?;
        rows.iter().map(record).collect()
    }

    async fn claim_stale(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        // One statement: SQLite runs it under its single writer lock.
        let sql = format!(
            "UPDATE tasks SET updated_at_ms = ? WHERE task_id IN (SELECT task_id FROM tasks \
             WHERE state IN ('PENDING', 'STARTED') AND updated_at_ms < ? \
             ORDER BY updated_at_ms, task_id LIMIT ?) RETURNING {COLUMNS}"
        );
        let mut writer = self.writer.lock().await;
        let rows = sqlx::query(&sql)
            .bind(now_ms())
            .bind(before_ms)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut writer.durable)
            .await
            .map_err(backend)?;
        rows.iter().map(record).collect()
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
            .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
            .fetch_all(&self.reads)
            .await
            .map_err(backend)?;
        rows.iter().map(record).collect()
    }

    async fn count_by_state(&self) -> Result<StateCounts, ResultsError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM tasks GROUP BY state")
                .fetch_all(&self.reads)
                .await
                .map_err(backend)?;
        StateCounts::from_rows(rows)
    }

    async fn delete(&self, id: TaskId) -> Result<(), ResultsError> {
        let mut writer = self.writer.lock().await;
        sqlx::query("DELETE FROM tasks WHERE task_id = ?")
            .bind(id.to_string())
            .execute(&mut writer.durable)
            .await
            .map_err(backend)?;
        Ok(())
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
        let mut writer = self.writer.lock().await;
        let rows = sqlx::query(&sql)
            .bind(before_ms)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut writer.durable)
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
            "UPDATE tasks SET image_deleted_at_ms = ? WHERE task_id IN (SELECT task_id FROM tasks \
             WHERE state IN ('SUCCESS', 'FAILURE') AND updated_at_ms < ? \
             AND image_deleted_at_ms IS NULL ORDER BY updated_at_ms, task_id LIMIT ?) \
             RETURNING {COLUMNS}"
        );
        let mut writer = self.writer.lock().await;
        let rows = sqlx::query(&sql)
            .bind(now_ms())
            .bind(before_ms)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut writer.durable)
            .await
            .map_err(backend)?;
        let mut records = rows.iter().map(record).collect::<Result<Vec<_>, _>>()?;
        // RETURNING keeps no order.
        records.sort_by_key(|r| (r.updated_at_ms, r.task_id));
        Ok(records)
    }

    async fn check(&self) -> Result<(), ResultsError> {
        sqlx::query("SELECT 1")
            .execute(&self.reads)
            .await
            .map_err(backend)?;
        Ok(())
    }
}
