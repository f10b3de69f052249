//! `imgclf-worker`: takes jobs from the shared queue, classifies them in batches, stores the
//! results and calls the webhooks, until ctrl-c or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use imgclf::{shutdown_signal, Settings};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "imgclf worker: consume jobs, classify in batches, persist, notify"
)]
struct Args {
    #[command(flatten)]
    settings: Settings,

    /// Serve Prometheus metrics (stage timings, batch sizes, outcomes) at /metrics, and /health,
    /// on this address; off when unset.
    #[arg(long, env = "IMGCLF_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,

    /// Log lines as `text` (for people) or `json` (one object per line, for log collectors).
    #[arg(long, env = "IMGCLF_LOG_FORMAT", value_enum, default_value_t)]
    log_format: imgclf::logs::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Exits 0 if the worker on IMGCLF_METRICS_ADDR answers /health, 1 otherwise: a container
    /// health check that needs nothing but this binary.
    Healthcheck,
}

/// Why the process stopped, on one line and without a backtrace: configuration errors are
/// read by people, and their messages say what to change.
fn main() -> std::process::ExitCode {
    match start() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("imgclf-worker: {}", imgclf::error_line(error.chain()));
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

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(Command::Healthcheck) = args.command {
        let probed = match args.metrics_addr {
            Some(addr) => imgclf::health::probe(addr, "/health", Duration::from_secs(3)),
            None => Err("set IMGCLF_METRICS_ADDR: the worker serves /health there".into()),
        };
        if let Err(error) = &probed {
            eprintln!("unhealthy: {error}");
        }
        std::process::exit(if probed.is_ok() { 0 } else { 1 });
    }
    let mut settings = args.settings;
    settings.apply_env()?;
    if settings.embedded_queue() {
        // Nothing else can queue a job in this process's memory: it would wait forever.
        anyhow::bail!(
            "a worker needs a shared queue: set IMGCLF_QUEUE to amqp://… or redis://…, as for \
             imgclf-http (with no shared queue, imgclf-http runs the worker itself)"
        );
    }
    // Listening for SIGTERM from the start: a stop while the model loads (a rolling update, a
    // scale-down) is a clean exit, not the signal's default death.
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let worker = tokio::select! {
        biased;
        () = &mut shutdown => {
            tracing::info!("stopped before the worker started");
            return Ok(());
        }
        built = settings.build_worker() => Arc::new(built.context("building the worker")?),
    };
    let model = &worker.classifier().spec().name;
    worker
        .metrics()
        .set_build_info(model, worker.classifier().backend());
    tracing::info!(model = %worker.classifier().spec().name, "worker started");
    if let Some(addr) = args.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        tracing::info!("metrics on http://{addr}/metrics");
        let worker = worker.clone();
        let metrics = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || async move {
                    let content_type = [(
                        axum::http::header::CONTENT_TYPE,
                        imgclf::metrics::CONTENT_TYPE,
                    )];
                    (content_type, worker.render_metrics().await)
                }),
            )
            .route("/health", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(listener, metrics).await });
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(worker.clone().run(stopped));
    shutdown.await;
    let _ = stop.send(true);
    running.await?;
    worker.classifier().stop(Duration::from_secs(30)).await;
    tracing::info!("stopped");
    Ok(())
}
