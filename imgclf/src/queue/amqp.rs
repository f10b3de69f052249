//! A queue on RabbitMQ (AMQP 0-9-1).
//!
//! - The job queue is a durable quorum queue: persistent messages, publisher confirms, manual
//!   acks only after the result is committed, and a broker-kept delivery count
//!   (`x-delivery-count`) that survives worker crashes and reconnects.
//! - `retry(after)` republishes to a delay queue (`<name>.retry.<ms>`: a quorum queue with a
//!   per-queue TTL whose expired messages are dead-lettered back to the job queue at least
//!   once; unused delay queues expire), then acks the original. The attempts so far travel in
//!   the `x-imgclf-attempt` header.
//! - Every publish is `mandatory` and confirmed: a message no queue takes is an error, never a
//!   silent drop.
//! - `dead_letter` publishes to `<name>.dead` with the reason and the time (`x-imgclf-dead-at`,
//!   ms), then acks. `expire_dead_letters` takes expired ones from the head of that queue (the
//!   oldest) and acks them: no queue argument or policy, so it works on queues declared by
//!   earlier versions, whose arguments cannot change.
//! - The connections are re-established on the next call after one drops; the consumer
//!   channel's prefetch (`basic_qos`) is applied on every (re)connect. Publishing processes
//!   never consume, and a consuming one consumes on a connection of its own: during a memory or
//!   disk alarm RabbitMQ stops reading from every connection that publishes, and the acks that
//!   would let the alarm clear must not wait behind a worker's retries.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::acker::Acker;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tokio::sync::Mutex;

use super::{Delivery, Queue, QueueError};
use crate::config::redact;
use crate::task::{now_ms, Job};

const ATTEMPT_HEADER: &str = "x-imgclf-attempt";
const REASON_HEADER: &str = "x-imgclf-reason";
/// When a message was dead-lettered, in ms since the Unix epoch.
const DEAD_AT_HEADER: &str = "x-imgclf-dead-at";
/// A broker that has not taken a connection by then is down: one that drops packets would
/// otherwise hold every caller (an upload, a readiness check) for the system's TCP timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most dead letters one `expire_dead_letters` takes; the next sweep takes the rest.
const EXPIRE_BATCH: usize = 1000;

/// Cheap to share: deliveries hold the same connection state to publish retries.
pub struct AmqpQueue {
    inner: Arc<Inner>,
}

struct Inner {
    uri: String,
    name: String,
    dead: String,
    prefetch: u16,
    session: Mutex<Option<Session>>,
    /// Delay queues this process has declared, counted in `depth`.
    delay_queues: SyncMutex<BTreeSet<String>>,
    /// When the dead letter last seen at the head of the dead-letter queue was put there:
    /// nothing behind it is older, so nothing expires before it does and the queue need not
    /// be looked at until then.
    dead_head: SyncMutex<Option<i64>>,
}

#[derive(Clone)]
struct Session {
    connection: Arc<Connection>,
    /// Confirm-mode channel for every publish.
    publisher: Channel,
    /// Created on the first `receive`, on a connection that never publishes.
    consumer: Option<(Arc<Connection>, Consumer)>,
}

impl Session {
    fn is_alive(&self) -> bool {
        let consuming = (self.consumer.as_ref()).is_none_or(|(c, _)| c.status().connected());
        self.connection.status().connected() && self.publisher.status().connected() && consuming
    }

    async fn close(self) {
        if let Some((connection, _)) = self.consumer {
            let _ = connection.close(200, "closing").await;
        }
        let _ = self.connection.close(200, "closing").await;
    }
}

fn backend(error: lapin::Error) -> QueueError {
    let temporary = !matches!(
        error,
        lapin::Error::ProtocolError(_) | lapin::Error::ParsingError(_)
    );
    QueueError::Backend {
        source: error.into(),
        temporary,
    }
}

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert(ShortString::from(*key), value.clone());
    }
    table
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn quorum() -> FieldTable {
    args(&[("x-queue-type", AMQPValue::LongString("quorum".into()))])
}

fn header_u32(headers: Option<&FieldTable>, key: &str) -> u32 {
    let value = headers.and_then(|h| h.inner().get(key));
    let n = match value {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortUInt(n)) => i64::from(*n),
        Some(AMQPValue::Timestamp(n)) => *n as i64,
        _ => 0,
    };
    n.clamp(0, i64::from(u32::MAX)) as u32
}

fn header_i64(headers: Option<&FieldTable>, key: &str) -> Option<i64> {
    match headers?.inner().get(key)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

impl AmqpQueue {
    /// Connects to `amqp://…` and declares queue `name` (and its dead-letter queue).
    /// `prefetch`: unacked deliveries this process may hold, tie it to the batch size.
    pub async fn connect(uri: &str, name: &str, prefetch: u16) -> Result<Self, QueueError> {
        let inner = Inner {
            uri: uri.to_string(),
            name: name.to_string(),
            dead: format!("{name}.dead"),
            prefetch: prefetch.max(1),
            session: Mutex::new(None),
            delay_queues: SyncMutex::new(BTreeSet::new()),
            dead_head: SyncMutex::new(None),
        };
        inner.session(false).await?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Closes the connections. The broker returns unacked deliveries to the queue, as it does
    /// when a worker dies.
    pub async fn close(&self) {
        if let Some(session) = self.inner.session.lock().await.take() {
            session.close().await;
        }
    }
}

impl Inner {
    /// The live session, reconnecting if the connection dropped.
    async fn session(&self, consume: bool) -> Result<Session, QueueError> {
        let mut guard = self.session.lock().await;
        if let Some(session) = guard.as_ref() {
            if session.is_alive() {
                if consume && session.consumer.is_none() {
                    let consumer = self.consume().await?;
                    guard.as_mut().expect("checked above").consumer = Some(consumer);
                }
                return Ok(guard.clone().expect("checked above"));
            }
            tracing::warn!(uri = %redact(&self.uri), "AMQP connection lost; reconnecting");
        }
        if let Some(broken) = guard.take() {
            // The other connection of a half-broken session goes too: its unacked deliveries
            // return to the queue now, not when the broker notices.
            broken.close().await;
        }
        let connection = self.connect().await?;
        let publisher = connection.create_channel().await.map_err(backend)?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(backend)?;
        publisher
            .queue_declare(&self.name, durable(), quorum())
            .await
            .map_err(backend)?;
        publisher
            .queue_declare(&self.dead, durable(), quorum())
            .await
            .map_err(backend)?;
        let consumer = if consume {
            Some(self.consume().await?)
        } else {
            None
        };
        let session = Session {
            connection: Arc::new(connection),
            publisher,
            consumer,
        };
        *guard = Some(session.clone());
        Ok(session)
    }

    async fn connect(&self) -> Result<Connection, QueueError> {
        let properties = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio);
        let connecting = Connection::connect(&self.uri, properties);
        tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                QueueError::temporary(format!("no connection within {CONNECT_TIMEOUT:?}"))
            })?
            .map_err(backend)
    }

    /// A consumer of the job queue on a connection of its own.
    async fn consume(&self) -> Result<(Arc<Connection>, Consumer), QueueError> {
        let connection = self.connect().await?;
        let consumer = async {
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(self.prefetch, BasicQosOptions::default())
                .await?;
            let options = BasicConsumeOptions::default();
            (channel.basic_consume(&self.name, "", options, FieldTable::default())).await
        };
        match consumer.await {
            Ok(consumer) => Ok((Arc::new(connection), consumer)),
            Err(e) => {
                let _ = connection.close(200, "closing").await;
                Err(backend(e))
            }
        }
    }

    /// Closes `broken` so the next call reconnects, unless another call already has.
    async fn reset(&self, broken: &Session) {
        let mut guard = self.session.lock().await;
        if (guard.as_ref()).is_some_and(|s| Arc::ptr_eq(&s.connection, &broken.connection)) {
            guard.take().expect("checked above").close().await;
        }
    }

    async fn publish(
        &self,
        queue: &str,
        payload: &[u8],
        headers: FieldTable,
    ) -> Result<(), QueueError> {
        let session = self.session(false).await?;
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(headers);
        let published = async {
            session
                .publisher
                // Mandatory: a message no queue takes comes back instead of being confirmed
                // and dropped.
                .basic_publish(
                    "",
                    queue,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    payload,
                    properties,
                )
                .await?
                .await
        }
        .await;
        match published {
            Ok(lapin::publisher_confirm::Confirmation::Ack(None)) => Ok(()),
            Ok(lapin::publisher_confirm::Confirmation::Ack(Some(returned))) => {
                Err(QueueError::temporary(format!(
                    "no queue took the message ({} {}): is queue {queue:?} declared?",
                    returned.reply_code, returned.reply_text
                )))
            }
            Ok(_) => Err(QueueError::temporary("the broker refused the message")),
            Err(e) => {
                self.reset(&session).await;
                Err(backend(e))
            }
        }
    }

    /// Declares the delay queue for `after` and returns its name. A quorum queue whose expired
    /// messages are dead-lettered back into the job queue at least once (a classic queue does
    /// it at most once: a retry could vanish); at-least-once dead-lettering needs
    /// `reject-publish` overflow.
    async fn delay_queue(&self, after: Duration) -> Result<String, QueueError> {
        let ms = after.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
        // `.retry.` rather than the classic delay queues' `.delay.`: a queue's type and
        // arguments cannot change once declared.
        let name = format!("{}.retry.{ms}", self.name);
        let session = self.session(false).await?;
        let arguments = args(&[
            ("x-queue-type", AMQPValue::LongString("quorum".into())),
            ("x-message-ttl", AMQPValue::LongUInt(ms)),
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString(self.name.clone().into()),
            ),
            (
                "x-dead-letter-strategy",
                AMQPValue::LongString("at-least-once".into()),
            ),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
            ("x-expires", AMQPValue::LongUInt(ms.saturating_add(600_000))),
        ]);
        session
            .publisher
            .queue_declare(&name, durable(), arguments)
            .await
            .map_err(backend)?;
        self.delay_queues.lock().unwrap().insert(name.clone());
        Ok(name)
    }

    /// Acks the dead letters at the head of the dead-letter queue put there before
    /// `before_ms`, up to the first that was not. That one goes back to the head (where a
    /// quorum queue returns a message) with `basic.nack`, which RabbitMQ 4.3 and later do not
    /// count against a quorum queue's delivery limit; on 4.0 to 4.2 it counts, but `dead_head`
    /// keeps each process to one look per head until it expires.
    async fn expire_head(&self, channel: &Channel, before_ms: i64) -> Result<u64, QueueError> {
        let mut expired = 0;
        for _ in 0..EXPIRE_BATCH {
            let got = channel
                .basic_get(&self.dead, BasicGetOptions { no_ack: false })
                .await
                .map_err(backend)?;
            let Some(got) = got else {
                *self.dead_head.lock().unwrap() = None;
                break;
            };
            let delivery = got.delivery;
            let headers = delivery.properties.headers().as_ref();
            let at = header_i64(headers, DEAD_AT_HEADER).or_else(|| {
                let seconds = (*delivery.properties.timestamp())?;
                i64::try_from(seconds).ok()?.checked_mul(1000)
            });
            match at {
                Some(at) if at < before_ms => {
                    delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(backend)?;
                    expired += 1;
                }
                Some(at) => {
                    let options = BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    };
                    delivery.acker.nack(options).await.map_err(backend)?;
                    *self.dead_head.lock().unwrap() = Some(at);
                    break;
                }
                None => {
                    // Dead-lettered by a version that kept no time: stamped now, at the tail,
                    // so it expires one TTL after this version first saw it.
                    let mut headers = headers.cloned().unwrap_or_default();
                    headers.insert(DEAD_AT_HEADER.into(), AMQPValue::LongLongInt(now_ms()));
                    self.publish(&self.dead, &delivery.data, headers).await?;
                    delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(backend)?;
                }
            }
        }
        Ok(expired)
    }

    /// Messages ready in a queue, on a throwaway channel: a passive declare of a missing queue
    /// closes its channel.
    async fn count(&self, queue: &str) -> Result<Option<u64>, QueueError> {
        let session = self.session(false).await?;
        let channel = session.connection.create_channel().await.map_err(backend)?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = channel
            .queue_declare(queue, options, FieldTable::default())
            .await;
        let _ = channel.close(200, "done").await;
        Ok(declared.ok().map(|q| u64::from(q.message_count())))
    }
}

#[async_trait]
impl Queue for AmqpQueue {
    async fn enqueue(&self, job: &Job) -> Result<(), QueueError> {
        let payload = serde_json::to_vec(job).map_err(QueueError::Codec)?;
        self.inner
            .publish(&self.inner.name, &payload, FieldTable::default())
            .await
    }

    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Box<dyn Delivery>>, QueueError> {
        let inner = &self.inner;
        let session = inner.session(true).await?;
        let (_, mut consumer) = session.consumer.clone().expect("a consuming session");
        let mut out: Vec<Box<dyn Delivery>> = Vec::new();
        let mut timeout = wait;
        while out.len() < max.max(1) {
            // A zero timeout still polls once: it takes what is already buffered.
            let next = match tokio::time::timeout(timeout, consumer.next()).await {
                Ok(next) => next,
                Err(_) => break,
            };
            timeout = Duration::ZERO;
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => {
                    inner.reset(&session).await;
                    if out.is_empty() {
                        return Err(backend(e));
                    }
                    break;
                }
                None => {
                    inner.reset(&session).await;
                    if out.is_empty() {
                        return Err(QueueError::temporary("the consumer was cancelled"));
                    }
                    break;
                }
            };
            let headers = delivery.properties.headers().as_ref();
            let attempt =
                header_u32(headers, ATTEMPT_HEADER) + header_u32(headers, "x-delivery-count") + 1;
            match serde_json::from_slice::<Job>(&delivery.data) {
                Ok(job) => out.push(Box::new(AmqpDelivery {
                    inner: inner.clone(),
                    acker: Some(delivery.acker),
                    job,
                    attempt,
                })),
                Err(e) => {
                    tracing::error!(error = %e, "unreadable message dead-lettered");
                    let mut headers = FieldTable::default();
                    headers.insert(
                        REASON_HEADER.into(),
                        AMQPValue::LongString(format!("unreadable: {e}").into()),
                    );
                    headers.insert(DEAD_AT_HEADER.into(), AMQPValue::LongLongInt(now_ms()));
                    inner.publish(&inner.dead, &delivery.data, headers).await?;
                    delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(backend)?;
                }
            }
        }
        Ok(out)
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        let inner = &self.inner;
        let mut total = inner.count(&inner.name).await?.unwrap_or(0);
        let delays: Vec<String> = inner.delay_queues.lock().unwrap().iter().cloned().collect();
        for name in delays {
            match inner.count(&name).await? {
                Some(n) => total += n,
                None => {
                    inner.delay_queues.lock().unwrap().remove(&name);
                }
            }
        }
        Ok(total)
    }

    async fn dead_letters(&self) -> Result<u64, QueueError> {
        Ok(self.inner.count(&self.inner.dead).await?.unwrap_or(0))
    }

    async fn expire_dead_letters(&self, before_ms: i64) -> Result<u64, QueueError> {
        let inner = &self.inner;
        if inner
            .dead_head
            .lock()
            .unwrap()
            .is_some_and(|head| head >= before_ms)
        {
            return Ok(0);
        }
        let session = inner.session(false).await?;
        let channel = session.connection.create_channel().await.map_err(backend)?;
        let expired = inner.expire_head(&channel, before_ms).await;
        // Closing the channel returns whatever it still holds.
        let _ = channel.close(200, "done").await;
        expired
    }

    async fn check(&self) -> Result<(), QueueError> {
        self.inner.session(false).await.map(|_| ())
    }
}

struct AmqpDelivery {
    inner: Arc<Inner>,
    /// Taken when the delivery is settled.
    acker: Option<Acker>,
    job: Job,
    attempt: u32,
}

impl AmqpDelivery {
    /// Publishes the job to `queue` with this attempt count (and `reason`), then acks.
    async fn move_to(&mut self, queue: &str, reason: Option<&str>) -> Result<(), QueueError> {
        let payload = serde_json::to_vec(&self.job).map_err(QueueError::Codec)?;
        let mut headers = args(&[(
            ATTEMPT_HEADER,
            AMQPValue::LongLongInt(i64::from(self.attempt)),
        )]);
        if let Some(reason) = reason {
            headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
            headers.insert(DEAD_AT_HEADER.into(), AMQPValue::LongLongInt(now_ms()));
        }
        self.inner.publish(queue, &payload, headers).await?;
        self.ack_now().await
    }

    async fn ack_now(&mut self) -> Result<(), QueueError> {
        match self.acker.take() {
            Some(acker) => acker.ack(BasicAckOptions::default()).await.map_err(backend),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Delivery for AmqpDelivery {
    fn job(&self) -> &Job {
        &self.job
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    async fn ack(mut self: Box<Self>) -> Result<(), QueueError> {
        self.ack_now().await
    }

    async fn retry(mut self: Box<Self>, after: Duration) -> Result<(), QueueError> {
        let queue = self.inner.delay_queue(after).await?;
        self.move_to(&queue, None).await
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<(), QueueError> {
        let dead = self.inner.dead.clone();
        self.move_to(&dead, Some(reason)).await
    }
}

impl Drop for AmqpDelivery {
    /// An unsettled delivery goes straight back to the queue (the broker would return it anyway
    /// when the channel closes, but the process may live on).
    fn drop(&mut self) {
        let Some(acker) = self.acker.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let options = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            if let Err(error) = acker.nack(options).await {
                tracing::debug!(%error, "returning a dropped delivery failed; the broker will");
            }
        });
    }
}
