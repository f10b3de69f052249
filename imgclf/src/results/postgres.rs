use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::Connection;
use sqlx::Row;
use uuid::Uuid;

use super::{ResultStore, ResultsError, StateCounts, TaskQuery};
use crate::task::{now_ms, TaskId, TaskRecord, TaskResult, TaskState, WebhookDelivery};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

const COLUMNS: &str = "task_id, state, object_key, metadata, callback_url, result, error, \
                       attempts, created_at_ms, updated_at_ms, webhook";

/// Task records in PostgreSQL, shared by every `imgclf-http` and `imgclf-worker`. The pool
/// reconnects by itself after the server restarts.
pub struct PostgresResults {
    pool: PgPool,
    /// Connections with `synchronous_commit = off` (a commit returns before the server
    /// flushes its log, which it does within a fraction of a second), for the one write that
    /// needs no more: [`ResultStore::start`].
    relaxed: PgPool,
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
        MIGRATOR.run(&pool).await.map_err(ResultsError::permanent)?;
        let relaxed = pool_options(4)
            .connect_with(options.options([("synchronous_commit", "off")]))
            .await
            .map_err(backend)?;
        Ok(Self { pool, relaxed })
    }
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
        let sql = format!(
            "INSERT INTO tasks ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        );
        let result = r
            .result
            .as_ref()
            .map(serde_json::to_value)
            .transpose()
            .map_err(codec)?;
        let inserted = sqlx::query(&sql)
            .bind(r.task_id.as_uuid())
            .bind(r.state.as_str())
            .bind(&r.object_key)
            .bind(serde_json::Value::Object(r.metadata.clone()))
            .bind(&r.callback_url)
            .bind(result)
            .bind(&r.error)
            .bind(r.attempts as i32)
            .bind(r.created_at_ms)
            .bind(r.updated_at_ms)
            .bind(
                r.webhook
                    .as_ref()
                    .map(serde_json::to_value)
                    .transpose()
                    .map_err(codec)?,
            )
            .execute(&self.pool)
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
        let sql = format!("SELECT {COLUMNS} FROM tasks WHERE task_id = $1");
        let row = sqlx::query(&sql)
            .bind(id.as_uuid())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.as_ref().map(record).transpose()
    }

    async fn start(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError> {
        let sql = format!(
            "UPDATE tasks SET state = 'STARTED', attempts = attempts + 1, updated_at_ms = $1 \
             WHERE task_id = $2 AND state IN ('PENDING', 'STARTED') RETURNING {COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(now_ms())
            .bind(id.as_uuid())
            .fetch_optional(&self.relaxed)
            .await
            .map_err(backend)?;
        match row {
            Some(row) => record(&row).map(Some),
            None => self.get(id).await,
        }
    }

    async fn complete(&self, id: TaskId, result: &TaskResult) -> Result<bool, ResultsError> {
        let payload = serde_json::to_value(result).map_err(codec)?;
        let now = now_ms();
        let due = serde_json::to_value(WebhookDelivery::due(now)).map_err(codec)?;
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
        .fetch_one(&self.pool)
        .await
        .map_err(backend)?;
        Ok(written == 1)
    }

    async fn fail(&self, id: TaskId, error: &str) -> Result<bool, ResultsError> {
        let now = now_ms();
        let due = serde_json::to_value(WebhookDelivery::due(now)).map_err(codec)?;
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
        delivery: &WebhookDelivery,
    ) -> Result<(), ResultsError> {
        let webhook = serde_json::to_value(delivery).map_err(codec)?;
        sqlx::query("UPDATE tasks SET webhook = $1 WHERE task_id = $2")
            .bind(webhook)
            .bind(id.as_uuid())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
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
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        // SKIP LOCKED: sweepers of several workers split the stale tasks between them.
        let sql = format!(
            "UPDATE tasks SET updated_at_ms = $1 WHERE task_id IN (SELECT task_id FROM tasks \
             WHERE state IN ('PENDING', 'STARTED') AND updated_at_ms < $2 \
             ORDER BY updated_at_ms, task_id LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING {COLUMNS}"
        );
        let rows = sqlx::query(&sql)
            .bind(now_ms())
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
}
