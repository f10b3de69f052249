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

use async_trait::async_trait;

use crate::task::{TaskId, TaskRecord, TaskResult, WebhookDelivery};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResultsError {
    #[error("task {0} already exists")]
    Conflict(TaskId),
    #[error("stored task is unreadable: {0}")]
    Codec(String),
    /// The backend failed; `temporary` says whether trying again may help.
    #[error("result store backend: {message}")]
    Backend { message: String, temporary: bool },
}

impl ResultsError {
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

#[async_trait]
pub trait ResultStore: Send + Sync + 'static {
    /// Records a newly accepted task; fails with `Conflict` if the id exists.
    async fn create(&self, record: &TaskRecord) -> Result<(), ResultsError>;

    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError>;

    /// Moves a task to `STARTED` and counts the attempt, unless it is already final. Returns the
    /// record as it now is (a final one unchanged), or `None` for an unknown id.
    async fn start(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError>;

    /// Stores the result and moves the task to `SUCCESS`. True if this call did it; false if the
    /// task was already final (or unknown), in which case nothing changes.
    async fn complete(&self, id: TaskId, result: &TaskResult) -> Result<bool, ResultsError>;

    /// Moves the task to `FAILURE` with an error message, with the same guard as `complete`.
    async fn fail(&self, id: TaskId, error: &str) -> Result<bool, ResultsError>;

    /// Records where the task's callback stands; the task's own state does not change.
    async fn record_webhook(
        &self,
        id: TaskId,
        delivery: &WebhookDelivery,
    ) -> Result<(), ResultsError>;

    /// Tasks not yet final, oldest first, at most `limit`.
    async fn unfinished(&self, limit: usize) -> Result<Vec<TaskRecord>, ResultsError>;

    /// Forgets a task (an upload rolled back before it was queued).
    async fn delete(&self, id: TaskId) -> Result<(), ResultsError>;

    /// Whether the backend is reachable (for readiness).
    async fn check(&self) -> Result<(), ResultsError>;
}
