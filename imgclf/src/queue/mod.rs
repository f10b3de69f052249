//! The `Queue` port: durable delivery of jobs to workers, with attempts, delayed retries and a
//! dead-letter queue.

#[cfg(feature = "amqp")]
mod amqp;
mod memory;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
pub use self::redis::RedisQueue;
#[cfg(feature = "amqp")]
pub use amqp::AmqpQueue;
pub use memory::MemoryQueue;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::ConfigError;
use crate::task::Job;
use crate::BoxError;

/// The queue (RabbitMQ queue, Redis stream) producers and workers share, by default.
pub const DEFAULT_NAME: &str = "imgclf";
/// Seconds a worker may hold a job before another gets it, by default.
pub const DEFAULT_LEASE_SECS: u64 = 120;

/// How to use a queue, whatever its backend.
#[derive(Clone, Debug)]
pub struct QueueOptions {
    /// Name of the queue (RabbitMQ queue, Redis stream).
    pub name: String,
    /// How long a delivery may stay unsettled before another worker gets it (Redis, memory).
    pub lease: Duration,
    /// Deliveries a worker holds unacknowledged (RabbitMQ).
    pub prefetch: u16,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            name: DEFAULT_NAME.into(),
            lease: Duration::from_secs(DEFAULT_LEASE_SECS),
            prefetch: 16,
        }
    }
}

/// Whether `url` names the in-process queue (the worker must then run in the same process).
pub fn is_embedded(url: &str) -> bool {
    url.starts_with("memory:")
}

/// The queue a URL names: `amqp(s)://…`, `redis(s)://…` or `memory://`.
pub async fn from_url(url: &str, options: &QueueOptions) -> Result<Arc<dyn Queue>, ConfigError> {
    // A connection error may quote the URL, password and all.
    let redacted = |error: QueueError| match error {
        QueueError::Backend { source, temporary } => ConfigError::Queue(QueueError::Backend {
            source: crate::config::connection_error(url, &source).into(),
            temporary,
        }),
        other => ConfigError::Queue(other),
    };
    if is_embedded(url) {
        return Ok(Arc::new(MemoryQueue::new(options.lease)));
    }
    if url.starts_with("amqp://") || url.starts_with("amqps://") {
        #[cfg(feature = "amqp")]
        return Ok(Arc::new(
            AmqpQueue::connect(url, &options.name, options.prefetch)
                .await
                .map_err(redacted)?,
        ));
        #[cfg(not(feature = "amqp"))]
        return Err(ConfigError::not_compiled("queue", url, "amqp"));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        #[cfg(feature = "redis")]
        return Ok(Arc::new(
            RedisQueue::connect(url, &options.name, options.lease)
                .await
                .map_err(redacted)?,
        ));
        #[cfg(not(feature = "redis"))]
        return Err(ConfigError::not_compiled("queue", url, "redis"));
    }
    let _ = redacted;
    Err(ConfigError::unsupported(
        "queue",
        url,
        "use amqp://…, redis://… or memory://",
    ))
}

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// A job that cannot be encoded or decoded.
    #[error("cannot encode or decode a job: {0}")]
    Codec(#[source] serde_json::Error),
    /// The backend failed.
    #[error("queue backend: {source}")]
    Backend {
        /// What the backend said.
        source: BoxError,
        /// Whether trying again may help.
        temporary: bool,
    },
}

impl QueueError {
    /// A backend failure that may pass (a dropped connection, a broker restarting).
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

/// A job queue. A received job stays owned by the queue until its [`Delivery`] is settled; a
/// delivery that is dropped unsettled (the worker died) comes back.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Adds a job, durably once this returns (confirmed by the broker).
    async fn enqueue(&self, job: &Job) -> Result<(), QueueError>;

    /// Up to `max` jobs; waits up to `wait` for the first one, returns an empty batch after that.
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Box<dyn Delivery>>, QueueError>;

    /// Jobs waiting to be delivered, including delayed retries.
    async fn depth(&self) -> Result<u64, QueueError>;

    /// Jobs that ended in the dead-letter queue.
    async fn dead_letters(&self) -> Result<u64, QueueError>;

    /// Deletes the dead letters put there before `before_ms` (ms since the Unix epoch);
    /// returns how many. A backend that keeps no dead letters has none to expire.
    async fn expire_dead_letters(&self, before_ms: i64) -> Result<u64, QueueError> {
        let _ = before_ms;
        Ok(0)
    }

    /// Whether the backend is reachable (for readiness).
    async fn check(&self) -> Result<(), QueueError>;

    /// Whether only this process can take its jobs (an in-memory queue): then a worker in this
    /// process finishes every task, and its waiters need not poll the result store.
    fn is_local(&self) -> bool {
        false
    }
}

/// One received job. Settle it exactly once: `ack` after the result is durable, `retry` to have
/// it delivered again later, `dead_letter` to give up on it.
#[async_trait]
pub trait Delivery: Send + Sync {
    /// The job delivered.
    fn job(&self) -> &crate::task::Job;

    /// 1 on the first delivery, counted by the backend (so it survives worker crashes).
    fn attempt(&self) -> u32;

    /// Done: the job leaves the queue.
    async fn ack(self: Box<Self>) -> Result<(), QueueError>;
    /// Deliver the job again, not before `after`, as its next attempt.
    async fn retry(self: Box<Self>, after: Duration) -> Result<(), QueueError>;
    /// Give up: the job moves to the dead-letter queue with `reason`.
    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), QueueError>;
}
