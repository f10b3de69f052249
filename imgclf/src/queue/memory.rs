use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Delivery, Queue, QueueError};
use crate::task::Job;

/// An in-process queue. It lives as long as the process: the embedded pipeline re-enqueues
/// unfinished tasks from the result store at start.
#[derive(Clone)]
pub struct MemoryQueue {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    arrived: Notify,
    /// A delivery not settled within this time is handed out again.
    lease: Duration,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Entry>,
    delayed: Vec<(Instant, Entry)>,
    in_flight: HashMap<u64, (Instant, Entry)>,
    /// Dead letters with the reason and when (ms since the epoch), oldest first.
    dead: Vec<(Job, String, i64)>,
    next_tag: u64,
}

#[derive(Clone)]
struct Entry {
    job: Job,
    /// Deliveries so far.
    attempts: u32,
}

impl State {
    /// Moves due retries and expired leases back to the ready list.
    fn promote(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.delayed.len() {
            if self.delayed[i].0 <= now {
                let (_, entry) = self.delayed.swap_remove(i);
                self.ready.push_back(entry);
            } else {
                i += 1;
            }
        }
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, (until, _))| *until <= now)
            .map(|(t, _)| *t)
            .collect();
        for tag in expired {
            if let Some((_, entry)) = self.in_flight.remove(&tag) {
                self.ready.push_front(entry);
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        let delayed = self.delayed.iter().map(|(due, _)| *due);
        delayed
            .chain(self.in_flight.values().map(|(until, _)| *until))
            .min()
    }
}

impl Default for MemoryQueue {
    fn default() -> Self {
        Self::new(Duration::from_secs(300))
    }
}

impl MemoryQueue {
    /// `lease`: how long a worker may hold a job before it is delivered again.
    pub fn new(lease: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                arrived: Notify::new(),
                lease,
            }),
        }
    }

    /// The jobs in the dead-letter queue, with the reason each was put there.
    pub fn dead_letter_jobs(&self) -> Vec<(Job, String)> {
        let state = self.shared.state.lock().unwrap();
        let dead = state.dead.iter();
        dead.map(|(job, reason, _)| (job.clone(), reason.clone()))
            .collect()
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn enqueue(&self, job: &Job) -> Result<(), QueueError> {
        let entry = Entry {
            job: job.clone(),
            attempts: 0,
        };
        self.shared.state.lock().unwrap().ready.push_back(entry);
        self.shared.arrived.notify_waiters();
        Ok(())
    }

    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Box<dyn Delivery>>, QueueError> {
        let deadline = Instant::now() + wait;
        loop {
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let wake_at = {
                let now = Instant::now();
                let mut state = self.shared.state.lock().unwrap();
                state.promote(now);
                let mut out: Vec<Box<dyn Delivery>> = Vec::new();
                while out.len() < max.max(1) {
                    let Some(mut entry) = state.ready.pop_front() else {
                        break;
                    };
                    entry.attempts += 1;
                    state.next_tag += 1;
                    let tag = state.next_tag;
                    out.push(Box::new(MemoryDelivery {
                        shared: self.shared.clone(),
                        tag,
                        job: entry.job.clone(),
                        attempt: entry.attempts,
                        settled: false,
                    }));
                    state
                        .in_flight
                        .insert(tag, (now + self.shared.lease, entry));
                }
                if !out.is_empty() || now >= deadline {
                    return Ok(out);
                }
                state.next_due().map_or(deadline, |due| due.min(deadline))
            };
            let _ = tokio::time::timeout_at(wake_at, arrived).await;
        }
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        let mut state = self.shared.state.lock().unwrap();
        state.promote(Instant::now());
        Ok((state.ready.len() + state.delayed.len()) as u64)
    }

    async fn dead_letters(&self) -> Result<u64, QueueError> {
        Ok(self.shared.state.lock().unwrap().dead.len() as u64)
    }

    async fn expire_dead_letters(&self, before_ms: i64) -> Result<u64, QueueError> {
        let dead = &mut self.shared.state.lock().unwrap().dead;
        let before = dead.len();
        dead.retain(|(_, _, at)| *at >= before_ms);
        Ok((before - dead.len()) as u64)
    }

    fn is_local(&self) -> bool {
        true
    }

    async fn check(&self) -> Result<(), QueueError> {
        Ok(())
    }
}

struct MemoryDelivery {
    shared: Arc<Shared>,
    tag: u64,
    job: Job,
    attempt: u32,
    settled: bool,
}

impl MemoryDelivery {
    /// Takes the entry back from the in-flight set; `None` if its lease ran out meanwhile and it
    /// was handed to someone else.
    fn settle(&mut self, then: impl FnOnce(&mut State, Entry)) {
        self.settled = true;
        let mut state = self.shared.state.lock().unwrap();
        if let Some((_, entry)) = state.in_flight.remove(&self.tag) {
            then(&mut state, entry);
        }
        drop(state);
        self.shared.arrived.notify_waiters();
    }
}

#[async_trait]
impl Delivery for MemoryDelivery {
    fn job(&self) -> &Job {
        &self.job
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    async fn ack(mut self: Box<Self>) -> Result<(), QueueError> {
        self.settle(|_, _| {});
        Ok(())
    }

    async fn retry(mut self: Box<Self>, after: Duration) -> Result<(), QueueError> {
        self.settle(|state, entry| state.delayed.push((Instant::now() + after, entry)));
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<(), QueueError> {
        let at = crate::task::now_ms();
        self.settle(|state, entry| state.dead.push((entry.job, reason.to_string(), at)));
        Ok(())
    }
}

impl Drop for MemoryDelivery {
    /// An unsettled delivery goes back to the front of the queue, as a broker does when a
    /// consumer's connection dies.
    fn drop(&mut self) {
        if !self.settled {
            self.settle(|state, entry| state.ready.push_front(entry));
        }
    }
}
