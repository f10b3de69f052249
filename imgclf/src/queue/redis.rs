//! A reliable queue on Redis streams.
//!
//! Jobs are entries of a stream read through a consumer group, so a job being processed stays in
//! the group's pending list, never only in a worker's memory. A worker that dies leaves its
//! entries pending; after `lease` they are reclaimed (`XAUTOCLAIM`) and delivered again.
//! Deliveries are counted in a hash, so attempts survive worker crashes. Retries wait in a sorted
//! set until due; dead letters go to a second stream.
//!
//! Keys, for a queue named `q`: `q` (stream), `q:delayed` (zset), `q:attempts` (hash),
//! `q:dead` (stream).

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};
use serde::{Deserialize, Serialize};

use super::{Delivery, Queue, QueueError};
use crate::task::{now_ms, Job};

const GROUP: &str = "imgclf";
/// How often an idle `receive` looks again.
const POLL: Duration = Duration::from_millis(50);

/// Moves due retries from the delay set back to the stream, atomically.
const PROMOTE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  if redis.call('ZREM', KEYS[1], member) == 1 then
    local m = cjson.decode(member)
    redis.call('XADD', KEYS[2], '*', 'job', m.job, 'attempt', m.attempt)
  end
end
return #due
"#;

/// A retry waiting in the delay set; the nonce keeps equal jobs distinct members.
#[derive(Serialize, Deserialize)]
struct Delayed {
    job: String,
    attempt: u32,
    nonce: String,
}

#[derive(Clone)]
struct Keys {
    stream: String,
    delayed: String,
    attempts: String,
    dead: String,
}

/// Jobs in a Redis stream with a consumer group.
pub struct RedisQueue {
    conn: ConnectionManager,
    keys: Keys,
    consumer: String,
    lease: Duration,
    promote: redis::Script,
}

fn backend(error: RedisError) -> QueueError {
    let temporary = error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.code(),
            Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN")
        );
    QueueError::Backend {
        source: error.into(),
        temporary,
    }
}

impl RedisQueue {
    /// Connects to `redis://…` and creates the stream and consumer group of queue `name` if
    /// needed. `lease`: how long a delivery may stay unsettled before another worker gets it.
    pub async fn connect(url: &str, name: &str, lease: Duration) -> Result<Self, QueueError> {
        let client = redis::Client::open(url).map_err(backend)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(Duration::from_secs(10))
            .set_number_of_retries(3)
            .set_max_delay(2000);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(backend)?;
        let keys = Keys {
            stream: name.to_string(),
            delayed: format!("{name}:delayed"),
            attempts: format!("{name}:attempts"),
            dead: format!("{name}:dead"),
        };
        let consumer = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let queue = Self {
            conn,
            keys,
            consumer,
            lease,
            promote: redis::Script::new(PROMOTE),
        };
        queue.ensure_group().await?;
        Ok(queue)
    }

    /// Creates the consumer group (and the stream); after a Redis restart without persistence
    /// both are gone, so this also runs whenever the group is missing.
    async fn ensure_group(&self) -> Result<(), QueueError> {
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn.clone())
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(backend(e)),
            _ => Ok(()),
        }
    }

    /// Entries for this consumer: orphans whose lease ran out first, then new ones.
    async fn fetch(&self, max: usize) -> Result<Vec<(String, Job, u32)>, RedisError> {
        let mut conn = self.conn.clone();
        let lease_ms = self.lease.as_millis() as u64;
        let claimed: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(lease_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut conn)
            .await?;
        let mut unreadable = Vec::new();
        let mut entries = match claimed {
            Value::Array(parts) => parts
                .into_iter()
                .nth(1)
                .map(|value| parse_entries(value, &mut unreadable))
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        if entries.len() < max {
            let read: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(max - entries.len())
                .arg("STREAMS")
                .arg(&self.keys.stream)
                .arg(">")
                .query_async(&mut conn)
                .await?;
            // [[stream, [entries…]]] or nil
            if let Value::Array(streams) = read {
                for stream in streams {
                    if let Value::Array(mut parts) = stream {
                        if parts.len() == 2 {
                            entries.extend(parse_entries(parts.remove(1), &mut unreadable));
                        }
                    }
                }
            }
        }
        self.bury(&unreadable).await?;
        Ok(entries)
    }

    /// Moves entries no worker can read to the dead stream, as they were: left pending they
    /// would be reclaimed after every lease, forever.
    async fn bury(&self, unreadable: &[(String, String)]) -> Result<(), RedisError> {
        for (id, raw) in unreadable {
            tracing::error!(%id, "unreadable queue entry moved to the dead stream");
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("XADD")
                .arg(&self.keys.dead)
                .arg("*")
                .arg("job")
                .arg(raw)
                .arg("reason")
                .arg("unreadable queue entry")
                .ignore()
                .cmd("XACK")
                .arg(&self.keys.stream)
                .arg(GROUP)
                .arg(id)
                .ignore()
                .cmd("XDEL")
                .arg(&self.keys.stream)
                .arg(id)
                .ignore();
            pipe.query_async::<()>(&mut self.conn.clone()).await?;
        }
        Ok(())
    }

    fn delivery(&self, id: String, job: Job, attempt: u32) -> RedisDelivery {
        RedisDelivery {
            conn: self.conn.clone(),
            keys: self.keys.clone(),
            id,
            job,
            attempt,
            settled: false,
        }
    }
}

/// `[[id, [field, value, …]], …]` -> (id, job, attempts before this entry). Entries that were
/// deleted meanwhile come back as nil and are skipped; unreadable ones go to `unreadable` as
/// (id, whatever its `job` field held), for the dead stream.
fn parse_entries(value: Value, unreadable: &mut Vec<(String, String)>) -> Vec<(String, Job, u32)> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries {
        let Value::Array(parts) = entry else { continue };
        let [id, Value::Array(fields)] =
            <[Value; 2]>::try_from(parts).unwrap_or([Value::Nil, Value::Nil])
        else {
            continue;
        };
        let Ok(id) = redis::from_redis_value::<String>(&id) else {
            continue;
        };
        let (mut job, mut raw) = (None, String::new());
        let mut base = 0;
        for pair in fields.chunks_exact(2) {
            let key: String = redis::from_redis_value(&pair[0]).unwrap_or_default();
            let value: String = redis::from_redis_value(&pair[1]).unwrap_or_default();
            match key.as_str() {
                "job" => {
                    job = serde_json::from_str::<Job>(&value).ok();
                    raw = value;
                }
                "attempt" => base = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        match job {
            Some(job) => out.push((id, job, base)),
            None => unreadable.push((id, raw)),
        }
    }
    out
}

#[async_trait]
impl Queue for RedisQueue {
    async fn enqueue(&self, job: &Job) -> Result<(), QueueError> {
        let payload = serde_json::to_string(job).map_err(QueueError::Codec)?;
        redis::cmd("XADD")
            .arg(&self.keys.stream)
            .arg("*")
            .arg("job")
            .arg(payload)
            .arg("attempt")
            .arg(0)
            .query_async::<String>(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Box<dyn Delivery>>, QueueError> {
        let max = max.max(1);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut conn = self.conn.clone();
            self.promote
                .key(&self.keys.delayed)
                .key(&self.keys.stream)
                .arg(now_ms())
                .arg(max)
                .invoke_async::<i64>(&mut conn)
                .await
                .map_err(backend)?;
            let entries = match self.fetch(max).await {
                Err(e) if e.code() == Some("NOGROUP") => {
                    self.ensure_group().await?;
                    continue;
                }
                other => other.map_err(backend)?,
            };
            if !entries.is_empty() {
                let mut pipe = redis::pipe();
                for (id, _, _) in &entries {
                    pipe.hincr(&self.keys.attempts, id, 1);
                }
                let counts: Vec<u32> = pipe.query_async(&mut conn).await.map_err(backend)?;
                return Ok(entries
                    .into_iter()
                    .zip(counts)
                    .map(|((id, job, base), count)| {
                        Box::new(self.delivery(id, job, base + count)) as Box<dyn Delivery>
                    })
                    .collect());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            tokio::time::sleep(POLL.min(deadline - now)).await;
        }
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        let (len, pending, delayed): (u64, Value, u64) = redis::pipe()
            .cmd("XLEN")
            .arg(&self.keys.stream)
            .cmd("XPENDING")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .zcard(&self.keys.delayed)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        let pending: u64 = match pending {
            Value::Array(summary) => summary
                .first()
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or(0),
            _ => 0,
        };
        Ok(len.saturating_sub(pending) + delayed)
    }

    async fn dead_letters(&self) -> Result<u64, QueueError> {
        redis::cmd("XLEN")
            .arg(&self.keys.dead)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)
    }

    /// Stream ids begin with the time of the `XADD` in ms, so trimming below the cutoff id
    /// removes exactly the older entries, dead letters of older versions included.
    async fn expire_dead_letters(&self, before_ms: i64) -> Result<u64, QueueError> {
        redis::cmd("XTRIM")
            .arg(&self.keys.dead)
            .arg("MINID")
            .arg(before_ms.max(0))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)
    }

    async fn check(&self) -> Result<(), QueueError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        Ok(())
    }
}

struct RedisDelivery {
    conn: ConnectionManager,
    keys: Keys,
    id: String,
    job: Job,
    attempt: u32,
    settled: bool,
}

impl RedisDelivery {
    /// Removes the entry from the stream, with `also` in the same transaction.
    async fn settle(&mut self, also: impl FnOnce(&mut redis::Pipeline)) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        also(&mut pipe);
        pipe.cmd("XACK")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg(&self.id)
            .ignore();
        pipe.cmd("XDEL")
            .arg(&self.keys.stream)
            .arg(&self.id)
            .ignore();
        pipe.hdel(&self.keys.attempts, &self.id).ignore();
        pipe.query_async::<()>(&mut self.conn)
            .await
            .map_err(backend)?;
        self.settled = true;
        Ok(())
    }

    fn payload(&self) -> Result<String, QueueError> {
        serde_json::to_string(&self.job).map_err(QueueError::Codec)
    }
}

#[async_trait]
impl Delivery for RedisDelivery {
    fn job(&self) -> &Job {
        &self.job
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    async fn ack(mut self: Box<Self>) -> Result<(), QueueError> {
        self.settle(|_| {}).await
    }

    async fn retry(mut self: Box<Self>, after: Duration) -> Result<(), QueueError> {
        let delayed = Delayed {
            job: self.payload()?,
            attempt: self.attempt,
            nonce: uuid::Uuid::new_v4().simple().to_string(),
        };
        let member = serde_json::to_string(&delayed).map_err(QueueError::Codec)?;
        let due = now_ms() + after.as_millis() as i64;
        let key = self.keys.delayed.clone();
        self.settle(|pipe| {
            pipe.zadd(key, member, due).ignore();
        })
        .await
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<(), QueueError> {
        let (payload, attempt, key) = (self.payload()?, self.attempt, self.keys.dead.clone());
        let reason = reason.to_string();
        self.settle(|pipe| {
            pipe.cmd("XADD")
                .arg(key)
                .arg("*")
                .arg("job")
                .arg(payload)
                .arg("attempt")
                .arg(attempt)
                .arg("reason")
                .arg(reason)
                .ignore();
        })
        .await
    }
}

impl Drop for RedisDelivery {
    /// An unsettled delivery is marked idle past any lease, so the next `receive` anywhere
    /// reclaims it at once instead of after the lease.
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (mut conn, stream, id) = (self.conn.clone(), self.keys.stream.clone(), self.id.clone());
        runtime.spawn(async move {
            let released: Result<Value, _> = redis::cmd("XCLAIM")
                .arg(&stream)
                .arg(GROUP)
                .arg("released")
                .arg(0)
                .arg(&id)
                .arg("IDLE")
                .arg(365 * 24 * 3600 * 1000_i64)
                .arg("JUSTID")
                .query_async(&mut conn)
                .await;
            if let Err(error) = released {
                tracing::debug!(%error, %id, "releasing a dropped delivery failed; its lease will");
            }
        });
    }
}
