//! The behaviour every backend of a port must have, written once as plain async functions over
//! `&dyn Port`. Each backend's tests call `run` (and, for queues, the reconnect check) on a fresh
//! instance. They panic on the first broken promise, with a message saying which.

/// What every `Queue` must do.
pub mod queue;
/// What every `ResultStore` must do.
pub mod results;
/// What every `Storage` must do.
pub mod storage;
