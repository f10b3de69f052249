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

use std::time::Duration;

use async_trait::async_trait;

use crate::task::Job;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    #[error("cannot encode or decode a job: {0}")]
    Codec(String),
    /// The backend failed; `temporary` says whether trying again may help.
    #[error("queue backend: {message}")]
    Backend { message: String, temporary: bool },
}

impl QueueError {
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

    /// Whether the backend is reachable (for readiness).
    async fn check(&self) -> Result<(), QueueError>;
}

/// One received job. Settle it exactly once: `ack` after the result is durable, `retry` to have
/// it delivered again later, `dead_letter` to give up on it.
#[async_trait]
pub trait Delivery: Send + Sync {
    fn job(&self) -> &crate::task::Job;

    /// 1 on the first delivery, counted by the backend (so it survives worker crashes).
    fn attempt(&self) -> u32;

    async fn ack(self: Box<Self>) -> Result<(), QueueError>;
    async fn retry(self: Box<Self>, after: Duration) -> Result<(), QueueError>;
    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), QueueError>;
}
