//! One classification run: read, submit, wait and report every file, a bounded number at once,
//! the records in input order.

use std::collections::VecDeque;
use std::io::{IsTerminal, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use imgclf::{Prediction, TaskRecord};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::local::Local;
use crate::output::{self, Format, Record};
use crate::remote::Remote;
use crate::walk::Input;

/// A reason to stop the whole run: the server is gone, the API key is refused.
#[derive(Debug)]
pub struct Fatal(pub String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// Where a task ended up.
#[derive(Debug)]
pub struct Verdict {
    pub task_id: Option<String>,
    pub state: String,
    pub classification: Vec<Prediction>,
    pub error: Option<String>,
}

impl Verdict {
    /// No result, for `why`.
    pub fn error(task_id: Option<String>, why: String) -> Self {
        Self {
            task_id,
            state: output::ERROR.into(),
            classification: Vec::new(),
            error: Some(why),
        }
    }

    /// From the server's task-status document.
    pub fn from_status(task_id: &str, document: &Value) -> Self {
        let classification = document["result"]["classification"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|p| serde_json::from_value(p.clone()).ok())
                    .collect()
            })
            .unwrap_or_default();
        Self {
            task_id: Some(task_id.to_string()),
            state: document["state"].as_str().unwrap_or("UNKNOWN").to_string(),
            classification,
            error: document["error"].as_str().map(str::to_string),
        }
    }

    /// From a task record of the in-process pipeline.
    pub fn from_record(record: &TaskRecord) -> Self {
        Self {
            task_id: Some(record.task_id.to_string()),
            state: record.state.as_str().to_string(),
            classification: record
                .result
                .as_ref()
                .map(|r| r.classification.clone())
                .unwrap_or_default(),
            error: record.error.clone(),
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(self.state.as_str(), "SUCCESS" | "FAILURE")
    }

    /// Still unfinished when the wait ended.
    pub fn timed_out(mut self, waited: Duration) -> Self {
        let id = self.task_id.as_deref().unwrap_or("?");
        self.error = Some(format!(
            "no result within {} s; `imgclf status {id}` tells later",
            waited.as_secs()
        ));
        self
    }
}

/// Who classifies.
pub enum Backend {
    Remote(Remote),
    Local(Local),
}

impl Backend {
    async fn submit(
        &self,
        name: &str,
        bytes: Bytes,
        key: &str,
    ) -> Result<Result<String, String>, Fatal> {
        match self {
            Self::Remote(remote) => remote.upload(name, bytes, key).await,
            Self::Local(local) => local.submit(name, bytes, key).await,
        }
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Verdict, Fatal> {
        match self {
            Self::Remote(remote) => remote.wait(task_id, timeout).await,
            Self::Local(local) => local.wait(task_id, timeout).await,
        }
    }
}

/// How a run goes.
pub struct Options {
    /// Files read and submitted at once.
    pub concurrency: usize,
    pub format: Format,
    /// Classes kept per image.
    pub top_k: usize,
    /// Longest wait for one result.
    pub timeout: Duration,
    pub max_file_bytes: u64,
    /// A progress bar on stderr, if it is a terminal.
    pub progress: bool,
    /// Submit an image whose task failed again, as a new task.
    pub retry_failed: bool,
}

/// How a run went.
pub struct Summary {
    pub total: usize,
    pub succeeded: usize,
    pub elapsed: Duration,
}

/// Classifies every input and writes its record on stdout, in input order.
///
/// At most `concurrency` files are read and submitted at once; twice as many are in flight
/// counting those waiting for their result, so a slow image ahead holds back only a bounded
/// number of finished ones.
pub async fn run(
    backend: Backend,
    inputs: Vec<Input>,
    options: &Options,
) -> Result<Summary, Fatal> {
    let started = Instant::now();
    let backend = Arc::new(backend);
    let submitting = Arc::new(Semaphore::new(options.concurrency));
    let total = inputs.len();
    let bar = progress_bar(total as u64, options.progress);
    let path_width = inputs
        .iter()
        .map(|i| i.path.display().to_string().chars().count())
        .max()
        .unwrap_or(0);
    let mut writer = output::Writer::new(std::io::stdout().lock(), options.format, path_width);
    let write_failed = |e: std::io::Error| Fatal(format!("writing to stdout: {e}"));
    bar.suspend(|| writer.header()).map_err(write_failed)?;

    let window = 2 * options.concurrency;
    let mut inputs = inputs.into_iter();
    let mut in_flight = VecDeque::with_capacity(window);
    let mut succeeded = 0;
    let outcome = loop {
        while in_flight.len() < window {
            let Some(input) = inputs.next() else { break };
            let task = one(
                backend.clone(),
                submitting.clone(),
                input,
                options.timeout,
                options.max_file_bytes,
                options.retry_failed,
            );
            let bar = bar.clone();
            in_flight.push_back(tokio::spawn(async move {
                let record = task.await;
                bar.inc(1);
                record
            }));
        }
        let Some(next) = in_flight.pop_front() else {
            break Ok(());
        };
        let mut record = match next.await {
            Ok(Ok(record)) => record,
            Ok(Err(fatal)) => break Err(fatal),
            Err(panic) => break Err(Fatal(format!("a file's task panicked: {panic}"))),
        };
        record.classification.truncate(options.top_k);
        if record.succeeded() {
            succeeded += 1;
        } else {
            let why = record.error.as_deref().unwrap_or("failed");
            bar.suspend(|| eprintln!("imgclf: {}: {why}", record.path));
        }
        if let Err(error) = bar.suspend(|| writer.record(&record)) {
            break Err(write_failed(error));
        }
    };
    bar.finish_and_clear();
    for task in &in_flight {
        task.abort();
    }
    if let Backend::Local(local) = &*backend {
        local.shutdown().await;
    }
    outcome.map(|()| Summary {
        total,
        succeeded,
        elapsed: started.elapsed(),
    })
}

/// Reads, submits and waits for one file.
async fn one(
    backend: Arc<Backend>,
    submitting: Arc<Semaphore>,
    input: Input,
    timeout: Duration,
    max_file_bytes: u64,
    retry_failed: bool,
) -> Result<Record, Fatal> {
    let shown = input.path.display().to_string();
    let fail = |why: String| Ok(Record::error(shown.clone(), why));
    if let Some(problem) = input.problem {
        return fail(problem);
    }
    let permit = submitting
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let path = input.path.clone();
    let read = tokio::task::spawn_blocking(move || read_and_key(&path, max_file_bytes)).await;
    let (bytes, key) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(why)) => return fail(why),
        Err(panic) => return fail(format!("reading panicked: {panic}")),
    };
    // Only informational for the server, which refuses control characters in it (a name on
    // Linux may hold a tab or a line break).
    let name: String = input
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| shown.clone())
        .chars()
        .map(|c| if c.is_control() { '_' } else { c })
        .collect();
    let (mut key, mut permit, mut retries) = (key, Some(permit), 0);
    let verdict = loop {
        let task_id = match backend.submit(&name, bytes.clone(), &key).await? {
            Ok(task_id) => task_id,
            Err(why) => return fail(why),
        };
        // Waiting for the result holds no submission slot.
        drop(permit.take());
        let verdict = backend.wait(&task_id, timeout).await?;
        // An earlier run's retries of this content answer at once with their own verdicts;
        // the chain ends at the first task that did not fail.
        if !(retry_failed && verdict.state == "FAILURE" && retries < MAX_RETRIES) {
            break verdict;
        }
        retries += 1;
        key = retry_key(&key, &task_id);
    };
    Ok(Record {
        path: shown,
        task_id: verdict.task_id,
        state: verdict.state,
        classification: verdict.classification,
        error: verdict.error,
    })
}

/// Most new tasks `--retry-failed` makes for one image across runs.
const MAX_RETRIES: u32 = 20;

/// The idempotency key of the task that retries failed task `failed_task_id` (whose key was
/// `key`): the same for every run, within the server's 255 bytes however long the chain.
fn retry_key(key: &str, failed_task_id: &str) -> String {
    let next = hex::encode(Sha256::digest(format!("{key}\n{failed_task_id}")));
    format!("retry-{next}")
}

/// The file's bytes and its idempotency key: the hex SHA-256 of the content, so the same
/// image, under any name and in any run, names the same task.
fn read_and_key(path: &Path, max_bytes: u64) -> Result<(Bytes, String), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    // Bounded by reading, not by the size on disk, which a device or pipe does not have.
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > max_bytes {
        return Err(format!(
            "larger than {max_bytes} bytes (--max-file-bytes); not sent"
        ));
    }
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    let key = hex::encode(Sha256::digest(&bytes));
    Ok((bytes.into(), key))
}

fn progress_bar(len: u64, wanted: bool) -> ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} images ({per_sec}, ETA {eta})",
    )
    .expect("a valid template");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
