//! `imgclf-http`: configuration in, the API out. With an in-memory queue (the default) it also
//! runs the worker, so one command serves the whole pipeline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use imgclf::config::{env_or_file, redact};
use imgclf::{shutdown_signal, Settings};
use imgclf_http::{metrics_router, router, AppState};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "imgclf HTTP API: upload, task status, health, readiness, metrics"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "IMGCLF_ADDR", default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// Most bytes of one uploaded image (413 beyond).
    #[arg(long, env = "IMGCLF_MAX_UPLOAD_BYTES", default_value_t = 20 * 1024 * 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_upload_bytes: usize,
    /// Seconds one request may take.
    #[arg(long, env = "IMGCLF_REQUEST_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    request_timeout: u64,
    /// API keys, comma-separated: when set, /api/* needs `Authorization: Bearer <key>`. Also
    /// read from the file IMGCLF_API_KEYS_FILE names.
    #[arg(
        long,
        env = "IMGCLF_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// Seconds a client has to send a request's head (also the idle time before a keep-alive
    /// connection is closed).
    #[arg(long, env = "IMGCLF_HEADER_TIMEOUT", default_value_t = imgclf_http::DEFAULT_HEADER_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_timeout: u64,
    /// Origins browsers may call the API from, comma-separated (`https://app.example.com`);
    /// unset sends no CORS headers.
    #[arg(long, env = "IMGCLF_CORS_ORIGINS", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// Most bytes of request bodies held at once; uploads beyond it get 503 with Retry-After.
    #[arg(long, env = "IMGCLF_MAX_INFLIGHT_BYTES", default_value_t = imgclf_http::DEFAULT_MAX_INFLIGHT_BYTES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_inflight_bytes: usize,
    /// Serve /metrics on this address only (e.g. an internal interface) instead of IMGCLF_ADDR.
    #[arg(long, env = "IMGCLF_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    settings: Settings,
    /// Log lines as `text` (for people) or `json` (one object per line, for log collectors).
    #[arg(long, env = "IMGCLF_LOG_FORMAT", value_enum, default_value_t)]
    log_format: imgclf::logs::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Exits 0 if the service on IMGCLF_ADDR answers /health, 1 otherwise: a container health
    /// check that needs nothing but this binary.
    Healthcheck,
}

/// Why the process stopped, on one line and without a backtrace: configuration errors are
/// read by people, and their messages say what to change.
fn main() -> std::process::ExitCode {
    match start() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("imgclf-http: {}", imgclf::error_line(error.chain()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn start() -> anyhow::Result<()> {
    imgclf::tune_malloc();
    dotenvy::dotenv().ok();
    let args = Args::parse();
    imgclf::logs::init(args.log_format);
    imgclf::scheduling::service_runtime(args.settings.batch_scheduling)?.block_on(run(args))
}

/// The API keys given, else those of the file IMGCLF_API_KEYS_FILE names. Set to nothing (as
/// compose files unset a variable), IMGCLF_API_KEYS is unset; set to blanks and commas only, it
/// is a mistake that would leave the API open, and an error.
fn api_keys(given: &[String]) -> anyhow::Result<Vec<String>> {
    let mut listed = given.join(",");
    if listed.is_empty() {
        listed = env_or_file("IMGCLF_API_KEYS")?.unwrap_or_default();
    }
    let keys: Vec<String> = (listed.split(',').map(str::trim))
        .filter(|k| !k.is_empty())
        .map(String::from)
        .collect();
    if keys.is_empty() && !listed.is_empty() {
        anyhow::bail!("IMGCLF_API_KEYS holds no key, only commas and blanks: unset it to leave the API open, or list keys separated by commas");
    }
    Ok(keys)
}

async fn run(mut args: Args) -> anyhow::Result<()> {
    if let Some(Command::Healthcheck) = args.command {
        let probed = imgclf::health::probe(args.addr, "/health", Duration::from_secs(3));
        if let Err(error) = &probed {
            eprintln!("unhealthy: {error}");
        }
        std::process::exit(if probed.is_ok() { 0 } else { 1 });
    }
    args.settings.apply_env()?;
    args.api_keys = api_keys(&args.api_keys)?;
    let settings = &args.settings;

    // With an in-process queue this process is the whole service; with a shared one it only
    // accepts, and the workers own the model.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Listening for SIGTERM from the start: a stop while the model loads is a clean exit.
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let (submitter, worker, worker_task) = if settings.embedded_queue() {
        let pipeline = Arc::new(tokio::select! {
            biased;
            () = &mut shutdown => {
                tracing::info!("stopped before the service started");
                return Ok(());
            }
            built = settings.build_pipeline() => built.context("building the pipeline")?,
        });
        let requeued = pipeline.submitter().requeue_unfinished().await?;
        if requeued > 0 {
            tracing::info!(requeued, "unfinished tasks from the last run queued again");
        }
        let task = tokio::spawn(pipeline.worker().clone().run(stopped));
        let worker = pipeline.worker().clone();
        let model = &worker.classifier().spec().name;
        worker
            .metrics()
            .set_build_info(model, worker.classifier().backend());
        tracing::info!(model = %worker.classifier().spec().name, "embedded worker started");
        (pipeline.submitter().clone(), Some(worker), Some(task))
    } else {
        let submitter = settings
            .build_submitter()
            .await
            .context("connecting the backends")?;
        (Arc::new(submitter), None, None)
    };
    tracing::info!(
        storage = %redact(&settings.storage_url()),
        queue = %redact(&settings.queue_url()),
        results = %redact(&settings.results_url()),
        "backends connected"
    );

    let classifier = worker.as_ref().map(|worker| worker.classifier().clone());
    let mut state = AppState::new(submitter, worker, args.max_upload_bytes)
        .with_api_keys(&args.api_keys)
        .with_url_policy(
            &settings.webhook_allow,
            Duration::from_secs(settings.webhook_timeout.max(1)),
        )
        .with_inflight_budget(args.max_inflight_bytes)
        .with_cors_origins(&args.cors_origins)
        .map_err(anyhow::Error::msg)?;
    if state.api_keys.is_empty() {
        tracing::warn!("IMGCLF_API_KEYS is unset: the API is open to anyone who can reach it");
    }
    if let Some(addr) = args.metrics_addr {
        state.serve_metrics = false;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!("metrics on http://{addr}/metrics");
        let metrics = metrics_router(state.clone());
        tokio::spawn(async move { axum::serve(listener, metrics).await });
    }
    let app = router(state, Duration::from_secs(args.request_timeout.max(1)));
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    let header_timeout = Duration::from_secs(args.header_timeout.max(1));
    imgclf_http::serve(listener, app, header_timeout, shutdown).await;

    let _ = stop.send(true);
    if let Some(task) = worker_task {
        task.await?;
    }
    if let Some(classifier) = classifier {
        classifier.stop(Duration::from_secs(30)).await;
    }
    tracing::info!("stopped");
    Ok(())
}
