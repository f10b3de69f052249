//! The behaviour every backend of a port must have, written once as plain async functions over
//! `&dyn Port`. Each backend's tests call `run` (and, for queues, the reconnect check) on a fresh
//! instance. They panic on the first broken promise, with a message saying which.

pub mod queue;
pub mod results;
pub mod storage;
