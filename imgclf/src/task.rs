//! The nouns every port shares: task ids, states, jobs, predictions and task records.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Identifies one uploaded image from acceptance to result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(value_type = String, format = Uuid))]
pub struct TaskId(Uuid);

impl TaskId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    /// A task id determined by an idempotency key and the uploaded bytes (a UUIDv8 over their
    /// SHA-256).
    pub fn derived(key: &str, bytes: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update((key.len() as u64).to_be_bytes());
        hash.update(key.as_bytes());
        hash.update(Sha256::digest(bytes));
        let digest: [u8; 32] = hash.finalize().into();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        Self(uuid::Builder::from_custom_bytes(first).into_uuid())
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl From<Uuid> for TaskId {
    fn from(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for TaskId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// The states of the API contract (Celery's names, kept for compatibility).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TaskState {
    /// Accepted, waiting for a worker.
    Pending,
    /// A worker has it (again, after a redelivery).
    Started,
    /// Classified; the result is stored.
    Success,
    /// Given up on; the error is stored.
    Failure,
}

impl TaskState {
    /// The state's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Started => "STARTED",
            Self::Success => "SUCCESS",
            Self::Failure => "FAILURE",
        }
    }

    /// A final state never changes again.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Success | Self::Failure)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "PENDING" => Ok(Self::Pending),
            "STARTED" => Ok(Self::Started),
            "SUCCESS" => Ok(Self::Success),
            "FAILURE" => Ok(Self::Failure),
            other => Err(format!("unknown task state {other:?}")),
        }
    }
}

/// The queue message: small on purpose, the image itself stays in storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The task this job runs.
    pub task_id: TaskId,
    /// Where the image is in storage.
    pub object_key: String,
    /// Classes to return, when the client asked for other than the configured number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// The upload's request id (`x-request-id`), so the worker's log lines for this task can
    /// be found from the client's request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// One class of the model's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Prediction {
    /// The class name.
    pub label: String,
    /// The class index in the model's output.
    pub class_id: usize,
    /// Softmax probability.
    pub probability: f32,
}

/// The result payload, in the shape the replaced service returned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskResult {
    /// The task.
    pub task_id: TaskId,
    /// Client metadata plus `filename` and `object_name`.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The top-k classes, most probable first.
    pub classification: Vec<Prediction>,
    /// Which model produced the classification.
    pub model: String,
    /// Where the time went for this image.
    #[serde(default)]
    pub timings: StageTimings,
}

/// Milliseconds per pipeline stage of one task (also histogrammed in `/metrics`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StageTimings {
    /// From acceptance to the worker starting it (first attempt).
    pub queue_wait_ms: f64,
    /// Reading the image from storage.
    pub fetch_ms: f64,
    /// Decoding and preprocessing, waiting for a preprocessing thread included.
    pub preprocess_ms: f64,
    /// Waiting for the model and running it, as part of a batch.
    pub infer_ms: f64,
}

/// Everything the result store knows about one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task.
    pub task_id: TaskId,
    /// Where it stands.
    pub state: TaskState,
    /// Where the image is in storage.
    pub object_key: String,
    /// Client metadata plus `filename` and `object_name`.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Where to POST the status when the task ends.
    pub callback_url: Option<String>,
    /// The result, once `SUCCESS`.
    pub result: Option<TaskResult>,
    /// What went wrong, once `FAILURE`: a generic message and an error id.
    pub error: Option<String>,
    /// How many times a worker has started this task.
    pub attempts: u32,
    /// When it was accepted (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// When it last changed.
    pub updated_at_ms: i64,
    /// The callback's delivery, kept apart from the task's own state.
    pub webhook: Option<WebhookDelivery>,
}

/// Where a task's callback stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum WebhookState {
    /// Not delivered yet.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed.
    Failed,
}

/// The state of a task's callback.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookDelivery {
    /// Pending, delivered or failed.
    pub state: WebhookState,
    /// Requests sent so far.
    pub attempts: u32,
    /// The last answer (`HTTP 503`) or error, if any.
    pub last_status: Option<String>,
    /// When it last changed.
    pub updated_at_ms: i64,
    /// While pending: not before this (ms since the Unix epoch) is it tried next.
    #[serde(default)]
    pub next_attempt_at_ms: i64,
}

impl WebhookDelivery {
    /// A callback due now: what finishing a task with a `callback_url` writes, in the same
    /// transaction as the task's final state (the outbox the dispatcher delivers from).
    pub fn due(now_ms: i64) -> Self {
        Self {
            state: WebhookState::Pending,
            attempts: 0,
            last_status: None,
            updated_at_ms: now_ms,
            next_attempt_at_ms: now_ms,
        }
    }
}

impl TaskRecord {
    /// A freshly accepted task, in state `PENDING`.
    pub fn pending(
        task_id: TaskId,
        object_key: String,
        metadata: serde_json::Map<String, serde_json::Value>,
        callback_url: Option<String>,
    ) -> Self {
        let now = now_ms();
        Self {
            task_id,
            state: TaskState::Pending,
            object_key,
            metadata,
            callback_url,
            result: None,
            error: None,
            attempts: 0,
            created_at_ms: now,
            updated_at_ms: now,
            webhook: None,
        }
    }

    /// The queue message for this task.
    pub fn job(&self) -> Job {
        Job {
            task_id: self.task_id,
            object_key: self.object_key.clone(),
            top_k: None,
            request_id: None,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The task-status document of the API (also the webhook payload and an item of the task
/// listing): what a client may know of a task, without where its image is stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskStatus {
    /// The task.
    pub task_id: TaskId,
    /// Where it stands.
    pub state: TaskState,
    /// How many times a worker has started it.
    pub attempts: u32,
    /// When it was accepted (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// When it last changed.
    pub updated_at_ms: i64,
    /// The uploaded file's name, when the client gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// The result, once `SUCCESS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskResult>,
    /// What went wrong, once `FAILURE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The callback's delivery, when one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookDelivery>,
}

impl TaskRecord {
    /// What the API shows of this task.
    pub fn to_status(&self) -> TaskStatus {
        TaskStatus {
            task_id: self.task_id,
            state: self.state,
            attempts: self.attempts,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            filename: self
                .metadata
                .get("filename")
                .and_then(|f| f.as_str())
                .map(str::to_string),
            result: self.result.clone(),
            error: self.error.clone(),
            webhook: self.webhook.clone(),
        }
    }

    /// The task-status document as JSON: the webhook payload.
    pub fn status(&self) -> serde_json::Value {
        serde_json::to_value(self.to_status()).unwrap_or_default()
    }
}
