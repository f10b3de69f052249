//! The `ResultStore` port: the record of every accepted task and its guarded state machine.
//!
//! `PENDING -> STARTED -> SUCCESS | FAILURE`; `STARTED -> STARTED` on a redelivery. A final state
//! never changes: a late redelivery cannot undo a result, and completing twice writes once.

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use memory::MemoryResults;
#[cfg(feature = "postgres")]
pub use postgres::PostgresResults;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteResults;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::ConfigError;
use crate::task::{TaskId, TaskRecord, TaskResult, TaskState, WebhookDelivery};
use crate::BoxError;

/// The result store a URL names: `postgres(ql)://…`, `sqlite://path` or `memory://`.
pub async fn from_url(url: &str) -> Result<Arc<dyn ResultStore>, ConfigError> {
    if url.starts_with("memory:") {
        return Ok(Arc::new(MemoryResults::new()));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return Ok(Arc::new(PostgresResults::connect(url).await.map_err(
            // A connection error may quote the URL, password and all.
            |e| {
                let temporary = e.is_temporary();
                let text = match e {
                    ResultsError::Backend { source, .. } => {
                        crate::config::connection_error(url, &source)
                    }
                    other => crate::config::connection_error(url, &other),
                };
                ConfigError::Results(ResultsError::Backend {
                    source: text.into(),
                    temporary,
                })
            },
        )?));
        #[cfg(not(feature = "postgres"))]
        return Err(ConfigError::not_compiled("results", url, "postgres"));
    }
    if url.starts_with("sqlite:") {
        #[cfg(feature = "sqlite")]
        return Ok(Arc::new(SqliteResults::connect(url).await?));
        #[cfg(not(feature = "sqlite"))]
        return Err(ConfigError::not_compiled("results", url, "sqlite"));
    }
    Err(ConfigError::unsupported(
        "results",
        url,
        "use postgres://…, sqlite://path or memory://",
    ))
}

/// Why a result store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResultsError {
    /// `create` for an id that exists.
    #[error("task {0} already exists")]
    Conflict(TaskId),
    /// A stored record that cannot be read back (never temporary).
    #[error("stored task is unreadable: {0}")]
    Codec(#[source] BoxError),
    /// The backend failed.
    #[error("result store backend: {source}")]
    Backend {
        /// What the backend said.
        source: BoxError,
        /// Whether trying again may help.
        temporary: bool,
    },
}

impl ResultsError {
    /// A backend failure that may pass (a dropped connection, a deadlock, a locked database).
    pub fn temporary(source: impl Into<BoxError>) -> Self {
        Self::Backend {
            source: source.into(),
            temporary: true,
        }
    }

    /// A backend failure that trying again cannot mend.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self::Backend {
            source: source.into(),
            temporary: false,
        }
    }

    /// Whether trying again may help: the one thing retry decisions read.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            Self::Backend {
                temporary: true,
                ..
            }
        )
    }
}

/// The record of every accepted task.
#[async_trait]
pub trait ResultStore: Send + Sync + 'static {
    /// Records a newly accepted task; fails with `Conflict` if the id exists.
    async fn create(&self, record: &TaskRecord) -> Result<(), ResultsError>;

    /// The task's record; `None` for an unknown id.
    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError>;

    /// Moves a task to `STARTED` and counts the attempt, unless it is already final. Returns the
    /// record as it now is (a final one unchanged), or `None` for an unknown id.
    ///
    /// The count must outlive the worker (an image that crashes every worker is given up on
    /// after its attempts), not a power cut: a store may commit it without waiting for the
    /// disk, and the next write that does wait takes it to disk too.
    async fn start(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError>;

    /// Takes back the attempt that the last `start` of a still-`STARTED` task counted: it
    /// ended in a temporary error (an outage, not the image), which must not bring the task
    /// nearer to being given up on. Nothing changes for a task that is not `STARTED`, or whose
    /// count is already 0.
    async fn uncount_attempt(&self, id: TaskId) -> Result<(), ResultsError>;

    /// Stores the result and moves the task to `SUCCESS`; a task with a `callback_url` gets its
    /// callback due ([`WebhookDelivery::due`]) in the same write. True if this call did it;
    /// false if the task was already final (or unknown), in which case nothing changes.
    async fn complete(&self, id: TaskId, result: &TaskResult) -> Result<bool, ResultsError>;

    /// Moves the task to `FAILURE` with an error message, with the same guard and the same
    /// callback as `complete`.
    async fn fail(&self, id: TaskId, error: &str) -> Result<bool, ResultsError>;

    /// Callbacks pending and due by `now_ms`, at most `limit`; each is put off by `lease_ms`
    /// (its `next_attempt_at_ms` moved), so dispatchers running at once take each once, and one
    /// that dies mid-delivery leaves it to be taken again after the lease.
    async fn claim_callbacks(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError>;

    /// Records where a claimed callback stands after an attempt, if the claim still holds: the
    /// stored callback is pending with the `next_attempt_at_ms` the claim set
    /// (`claimed_until_ms`). A dispatcher that outlived its lease (another may have claimed
    /// the callback since, and recorded its own attempt) changes nothing. True if recorded;
    /// the task's own state never changes.
    async fn record_webhook(
        &self,
        id: TaskId,
        claimed_until_ms: i64,
        delivery: &WebhookDelivery,
    ) -> Result<bool, ResultsError>;

    /// Tasks not yet final, oldest first, at most `limit`.
    async fn unfinished(&self, limit: usize) -> Result<Vec<TaskRecord>, ResultsError>;

    /// Unfinished tasks unchanged since `before_ms` (ms since the Unix epoch), oldest change
    /// first, at most `limit`; `PENDING` ones only if also accepted before
    /// `pending_created_before_ms` (one accepted since may still be waiting in the queue).
    /// Each is marked changed now, so that sweepers running at once claim a task once per
    /// period.
    async fn claim_stale(
        &self,
        before_ms: i64,
        pending_created_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError>;

    /// Tasks newest first (by acceptance time, then id), in `query`'s state if it names one,
    /// strictly after its cursor, at most its limit: a page of the task monitor.
    async fn list(&self, query: &TaskQuery) -> Result<Vec<TaskRecord>, ResultsError>;

    /// How many tasks are in each state.
    async fn count_by_state(&self) -> Result<StateCounts, ResultsError>;

    /// Forgets a task (an upload rolled back before it was queued).
    async fn delete(&self, id: TaskId) -> Result<(), ResultsError>;

    /// Deletes final tasks (`SUCCESS`, `FAILURE`) unchanged since `before_ms`, oldest first, at
    /// most `limit`, and returns them, so that their images can be deleted too. Sweepers
    /// running at once delete each task once. A task not yet final never expires (nothing
    /// accepted is lost; a stuck one is queued again instead), nor does one whose callback is
    /// still due: it expires once the callback is delivered or given up on. The replaced
    /// service's `results` rows of the tasks go with them, in the same write.
    async fn delete_expired(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError>;

    /// Final tasks unchanged since `before_ms` whose image is not yet marked deleted, oldest
    /// first, at most `limit`; each is marked now, so that sweepers running at once take each
    /// once and no sweep takes it again. The records stay.
    async fn claim_expired_images(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError>;

    /// Whether the backend is reachable (for readiness).
    async fn check(&self) -> Result<(), ResultsError>;

    /// Tells of tasks as they become final, whichever process finished them, where the store
    /// can (PostgreSQL's `LISTEN`/`NOTIFY`), so that waiters need not read the store at short
    /// intervals; `None` where it cannot.
    fn final_tasks(&self) -> Option<tokio::sync::mpsc::Receiver<FinalTasks>> {
        None
    }
}

/// What [`ResultStore::final_tasks`] tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalTasks {
    /// Every task that becomes final from now on will be told; any may have ended untold
    /// before.
    Listening,
    /// This task became final.
    Final(TaskId),
    /// Nothing is told until the next [`FinalTasks::Listening`] (the connection was lost).
    NotListening,
}

/// A page of [`ResultStore::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskQuery {
    /// Only tasks in this state.
    pub state: Option<TaskState>,
    /// Only tasks older than this one, in the listing's order: the last task of the previous
    /// page, as `(created_at_ms, task_id)`.
    pub after: Option<(i64, TaskId)>,
    /// Most tasks returned.
    pub limit: usize,
}

impl TaskQuery {
    /// The newest `limit` tasks in any state.
    pub fn newest(limit: usize) -> Self {
        Self {
            state: None,
            after: None,
            limit,
        }
    }

    /// Whether `record` belongs on this page (before the limit applies): the memory store's
    /// filter, and the definition the SQL stores' queries follow.
    pub fn admits(&self, record: &TaskRecord) -> bool {
        self.state.is_none_or(|state| record.state == state)
            && self
                .after
                .is_none_or(|after| (record.created_at_ms, record.task_id) < after)
    }
}

/// Tasks per state, as [`ResultStore::count_by_state`] counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StateCounts {
    /// Accepted, waiting for a worker.
    pub pending: u64,
    /// Being classified.
    pub started: u64,
    /// Classified.
    pub success: u64,
    /// Given up on.
    pub failure: u64,
}

impl StateCounts {
    /// The counts of a SQL `SELECT state, count(*) … GROUP BY state`.
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) fn from_rows(rows: Vec<(String, i64)>) -> Result<Self, ResultsError> {
        let mut counts = Self::default();
        for (state, count) in rows {
            let state = state
                .parse()
                .map_err(|e: String| ResultsError::Codec(e.into()))?;
            counts.add(state, count.max(0) as u64);
        }
        Ok(counts)
    }

    /// Adds `count` tasks in `state`.
    pub fn add(&mut self, state: TaskState, count: u64) {
        match state {
            TaskState::Pending => self.pending += count,
            TaskState::Started => self.started += count,
            TaskState::Success => self.success += count,
            TaskState::Failure => self.failure += count,
        }
    }
}
