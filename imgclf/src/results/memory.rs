use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{ResultStore, ResultsError, StateCounts, TaskQuery};
use crate::task::{
    now_ms, TaskId, TaskRecord, TaskResult, TaskState, WebhookDelivery, WebhookState,
};

/// Task records in a map: for tests, examples and benches.
#[derive(Default)]
pub struct MemoryResults {
    tasks: Mutex<HashMap<TaskId, TaskRecord>>,
    /// Tasks whose image the sweeper deleted. Locked after `tasks` when both are.
    images_deleted: Mutex<HashSet<TaskId>>,
}

impl MemoryResults {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `change` to a task that is not final; true if it did. A change that makes
    /// the task final brings its callback due, if it has one (a callback carries the final
    /// state, never `STARTED`).
    fn update(&self, id: TaskId, change: impl FnOnce(&mut TaskRecord)) -> bool {
        let mut tasks = self.tasks.lock().unwrap();
        match tasks.get_mut(&id) {
            Some(record) if !record.state.is_final() => {
                change(record);
                record.updated_at_ms = now_ms();
                if record.state.is_final() && record.callback_url.is_some() {
                    record.webhook = Some(WebhookDelivery::due(record.updated_at_ms));
                }
                true
            }
            _ => false,
        }
    }
}

#[async_trait]
impl ResultStore for MemoryResults {
    async fn create(&self, record: &TaskRecord) -> Result<(), ResultsError> {
        let mut tasks = self.tasks.lock().unwrap();
        if tasks.contains_key(&record.task_id) {
            return Err(ResultsError::Conflict(record.task_id));
        }
        tasks.insert(record.task_id, record.clone());
        Ok(())
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError> {
        Ok(self.tasks.lock().unwrap().get(&id).cloned())
    }

    async fn start(&self, id: TaskId) -> Result<Option<TaskRecord>, ResultsError> {
        self.update(id, |record| {
            record.state = TaskState::Started;
            record.attempts += 1;
        });
        self.get(id).await
    }

    async fn uncount_attempt(&self, id: TaskId) -> Result<(), ResultsError> {
        let mut tasks = self.tasks.lock().unwrap();
        if let Some(record) = tasks.get_mut(&id) {
            if record.state == TaskState::Started {
                record.attempts = record.attempts.saturating_sub(1);
            }
        }
        Ok(())
    }

    async fn complete(&self, id: TaskId, result: &TaskResult) -> Result<bool, ResultsError> {
        Ok(self.update(id, |record| {
            record.state = TaskState::Success;
            record.result = Some(result.clone());
            record.error = None;
        }))
    }

    async fn fail(&self, id: TaskId, error: &str) -> Result<bool, ResultsError> {
        Ok(self.update(id, |record| {
            record.state = TaskState::Failure;
            record.error = Some(error.to_string());
        }))
    }

    async fn record_webhook(
        &self,
        id: TaskId,
        claimed_until_ms: i64,
        delivery: &WebhookDelivery,
    ) -> Result<bool, ResultsError> {
        let mut tasks = self.tasks.lock().unwrap();
        match tasks.get_mut(&id).and_then(|r| r.webhook.as_mut()) {
            Some(webhook)
                if webhook.state == WebhookState::Pending
                    && webhook.next_attempt_at_ms == claimed_until_ms =>
            {
                *webhook = delivery.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn unfinished(&self, limit: usize) -> Result<Vec<TaskRecord>, ResultsError> {
        let tasks = self.tasks.lock().unwrap();
        let mut open: Vec<TaskRecord> = tasks
            .values()
            .filter(|r| !r.state.is_final())
            .cloned()
            .collect();
        open.sort_by_key(|r| (r.created_at_ms, r.task_id));
        open.truncate(limit);
        Ok(open)
    }

    async fn claim_callbacks(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        let mut tasks = self.tasks.lock().unwrap();
        let mut due: Vec<&mut TaskRecord> = tasks
            .values_mut()
            .filter(|r| {
                r.webhook.as_ref().is_some_and(|w| {
                    w.state == WebhookState::Pending && w.next_attempt_at_ms <= now_ms
                })
            })
            .collect();
        due.sort_by_key(|r| (r.webhook.as_ref().map(|w| w.next_attempt_at_ms), r.task_id));
        due.truncate(limit);
        Ok(due
            .into_iter()
            .map(|r| {
                if let Some(w) = r.webhook.as_mut() {
                    w.next_attempt_at_ms = now_ms + lease_ms;
                }
                r.clone()
            })
            .collect())
    }

    async fn claim_stale(
        &self,
        before_ms: i64,
        pending_created_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        let mut tasks = self.tasks.lock().unwrap();
        let mut stale: Vec<&mut TaskRecord> = tasks
            .values_mut()
            .filter(|r| match r.state {
                TaskState::Started => true,
                TaskState::Pending => r.created_at_ms < pending_created_before_ms,
                _ => false,
            })
            .filter(|r| r.updated_at_ms < before_ms)
            .collect();
        stale.sort_by_key(|r| (r.updated_at_ms, r.task_id));
        stale.truncate(limit);
        let now = now_ms();
        Ok(stale
            .into_iter()
            .map(|r| {
                r.updated_at_ms = now;
                r.clone()
            })
            .collect())
    }

    async fn list(&self, query: &TaskQuery) -> Result<Vec<TaskRecord>, ResultsError> {
        let tasks = self.tasks.lock().unwrap();
        let mut page: Vec<TaskRecord> = tasks
            .values()
            .filter(|r| query.admits(r))
            .cloned()
            .collect();
        page.sort_by_key(|r| std::cmp::Reverse((r.created_at_ms, r.task_id)));
        page.truncate(query.limit);
        Ok(page)
    }

    async fn count_by_state(&self) -> Result<StateCounts, ResultsError> {
        let mut counts = StateCounts::default();
        for record in self.tasks.lock().unwrap().values() {
            counts.add(record.state, 1);
        }
        Ok(counts)
    }

    async fn delete(&self, id: TaskId) -> Result<(), ResultsError> {
        self.tasks.lock().unwrap().remove(&id);
        self.images_deleted.lock().unwrap().remove(&id);
        Ok(())
    }

    async fn delete_expired(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        let mut tasks = self.tasks.lock().unwrap();
        let mut expired: Vec<(i64, TaskId)> = tasks
            .values()
            .filter(|r| expired(r, before_ms))
            .filter(|r| {
                r.webhook
                    .as_ref()
                    .is_none_or(|w| w.state != WebhookState::Pending)
            })
            .map(|r| (r.updated_at_ms, r.task_id))
            .collect();
        expired.sort();
        expired.truncate(limit);
        let mut images_deleted = self.images_deleted.lock().unwrap();
        Ok(expired
            .into_iter()
            .filter_map(|(_, id)| {
                images_deleted.remove(&id);
                tasks.remove(&id)
            })
            .collect())
    }

    async fn claim_expired_images(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, ResultsError> {
        let tasks = self.tasks.lock().unwrap();
        let mut images_deleted = self.images_deleted.lock().unwrap();
        let mut due: Vec<&TaskRecord> = tasks
            .values()
            .filter(|r| expired(r, before_ms) && !images_deleted.contains(&r.task_id))
            .collect();
        due.sort_by_key(|r| (r.updated_at_ms, r.task_id));
        due.truncate(limit);
        for r in &due {
            images_deleted.insert(r.task_id);
        }
        Ok(due.into_iter().cloned().collect())
    }

    async fn check(&self) -> Result<(), ResultsError> {
        Ok(())
    }
}

/// Final and unchanged since `before_ms`.
fn expired(record: &TaskRecord, before_ms: i64) -> bool {
    record.state.is_final() && record.updated_at_ms < before_ms
}
