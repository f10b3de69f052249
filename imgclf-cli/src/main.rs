//! `imgclf`: classify image files and folders with an imgclf server (`--server URL`) or with the
//! library in-process (`--local`), and read a task's status.
//!
//! Files are uploaded with an `Idempotency-Key` derived from their content, so a run that was
//! interrupted can simply be started again: the server answers with the tasks it already has
//! and classifies nothing twice. `--local` builds the whole pipeline in memory; see
//! [`local`] for how the library is embedded.

mod local;
mod output;
mod remote;
mod run;
mod walk;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::output::Format;

#[derive(Debug, Parser)]
#[command(
    name = "imgclf",
    version,
    about = "Classify images with imgclf, on a server or in-process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Classifies image files, and the images in folders (walked recursively, hidden entries
    /// skipped). Prints one record per image on stdout; exits 1 if any image failed.
    Classify(ClassifyArgs),
    /// Prints a task's status document (JSON).
    Status(StatusArgs),
}

/// How to reach the server.
#[derive(Debug, Args)]
struct ServerArgs {
    /// Base URL of the imgclf server.
    #[arg(long, env = "IMGCLF_SERVER", default_value = "http://127.0.0.1:8000")]
    server: String,
    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "IMGCLF_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Most attempts per request while the server is busy (429 or 503, waiting as its
    /// Retry-After says) or unreachable; a wait for a result retries busy answers until
    /// --timeout. A request timeout (408) is tried twice at most.
    #[arg(long, env = "IMGCLF_ATTEMPTS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    attempts: u32,
}

#[derive(Debug, Args)]
struct ClassifyArgs {
    /// Image files and folders.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Classify in this process with the library instead of on a server.
    #[arg(long, env = "IMGCLF_LOCAL", value_parser = BoolishValueParser::new())]
    local: bool,
    #[command(flatten)]
    server: ServerArgs,
    /// Images in flight at once: uploads to the server, or images submitted to the in-process
    /// pipeline [default: 8; with --local, twice the cores, at least 8].
    #[arg(long, env = "IMGCLF_CONCURRENCY", value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: Option<u32>,
    /// Output on stdout: an aligned table, JSON lines or CSV.
    #[arg(long, env = "IMGCLF_FORMAT", value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Classes shown per image (a server returns its configured number; this keeps at most
    /// that many).
    #[arg(long, env = "IMGCLF_TOP_K", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    top_k: u32,
    /// Seconds to wait for one image's result once it was accepted (at most a year).
    #[arg(long, env = "IMGCLF_WAIT_TIMEOUT", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=MOST_WAIT_SECS))]
    timeout: u64,
    /// In folders, send every file, not only those named like images (.jpg, .png, …).
    #[arg(long, env = "IMGCLF_ALL_FILES", value_parser = BoolishValueParser::new())]
    all_files: bool,
    /// Files larger than this many bytes are reported, not read.
    #[arg(long, env = "IMGCLF_MAX_FILE_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_file_bytes: u64,
    /// Images whose task ended in FAILURE (in this run or an earlier one: the same content
    /// names the same task) are submitted once more as a new task, after the failure's cause
    /// was mended. Rerunning stays idempotent: the new task's key follows from the failed one.
    #[arg(long, env = "IMGCLF_RETRY_FAILED", value_parser = BoolishValueParser::new())]
    retry_failed: bool,
    /// No progress bar (there is none anyway when stderr is not a terminal).
    #[arg(long, env = "IMGCLF_NO_PROGRESS", value_parser = BoolishValueParser::new())]
    no_progress: bool,
    #[command(flatten)]
    model: local::ModelArgs,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The task id an upload returned.
    task_id: String,
    #[command(flatten)]
    server: ServerArgs,
    /// Seconds to wait for the task to end before printing (at most 30).
    #[arg(long, env = "IMGCLF_STATUS_WAIT", value_parser = status_wait)]
    wait: Option<f64>,
}

/// Longest `--timeout`: a year, far past any wait a run means, and far from overflowing a clock.
const MOST_WAIT_SECS: u64 = 365 * 24 * 3600;

/// `--wait`: seconds from 0 to 30, as the server takes them.
fn status_wait(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(seconds) if (0.0..=30.0).contains(&seconds) => Ok(seconds),
        _ => Err("expected seconds from 0 to 30".into()),
    }
}

/// Exit status when the run itself could not go on (no server, a refused API key, no model),
/// as opposed to 1 for images that failed.
const FATAL: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Classify(args) => classify(args).await,
        Command::Status(args) => status(args).await,
    };
    outcome.unwrap_or_else(|error| {
        eprintln!("imgclf: {}", imgclf::error_line(error.chain()));
        ExitCode::from(FATAL)
    })
}

async fn classify(args: ClassifyArgs) -> anyhow::Result<ExitCode> {
    let walked = walk::collect(&args.paths, args.all_files);
    if walked.inputs.is_empty() {
        eprintln!(
            "imgclf: no images in the given paths ({} other files skipped; --all-files sends them)",
            walked.skipped
        );
        return Ok(ExitCode::from(1));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let backend = if args.local {
        run::Backend::Local(local::Local::start(&args.model, args.top_k as usize).await?)
    } else {
        let remote = remote::Remote::new(
            &args.server.server,
            args.server.api_key.as_deref(),
            args.server.attempts,
        )?;
        remote.check().await?;
        run::Backend::Remote(remote)
    };
    let concurrency = match (args.concurrency, args.local) {
        (Some(n), _) => n as usize,
        (None, false) => 8,
        (None, true) => (2 * cores).max(8),
    };
    let options = run::Options {
        concurrency,
        format: args.format,
        top_k: args.top_k as usize,
        timeout: Duration::from_secs(args.timeout),
        max_file_bytes: args.max_file_bytes,
        progress: !args.no_progress,
        retry_failed: args.retry_failed,
    };
    let summary = run::run(backend, walked.inputs, &options).await?;
    let mut skipped = match walked.skipped {
        0 => String::new(),
        n => format!("; {n} non-image files skipped"),
    };
    if walked.duplicates > 0 {
        let n = walked.duplicates;
        skipped += &format!("; {n} paths to files already listed (links) skipped");
    }
    eprintln!(
        "imgclf: {} images, {} classified, {} failed in {:.1} s{skipped}",
        summary.total,
        summary.succeeded,
        summary.total - summary.succeeded,
        summary.elapsed.as_secs_f64(),
    );
    Ok(if summary.succeeded == summary.total {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let remote = remote::Remote::new(
        &args.server.server,
        args.server.api_key.as_deref(),
        args.server.attempts,
    )?;
    match remote.status(&args.task_id, args.wait).await? {
        Some(document) => {
            println!("{}", serde_json::to_string_pretty(&document)?);
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("imgclf: the server knows no task {:?}", args.task_id);
            Ok(ExitCode::from(1))
        }
    }
}
