//! Prometheus metrics of the pipeline. Labels are bounded: stages and outcomes, never ids.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric of one process, in its own registry.
pub struct Metrics {
    /// The registry they are rendered from.
    pub registry: Registry,
    /// Tasks that reached `SUCCESS` here.
    pub task_success: IntCounter,
    /// Tasks that reached `FAILURE` here.
    pub task_failure: IntCounter,
    /// From acceptance to the final state.
    pub task_latency: Histogram,
    /// Callbacks delivered.
    pub webhook_success: IntCounter,
    /// Callbacks given up on.
    pub webhook_failure: IntCounter,
    /// Time to deliver (or give up on) a callback.
    pub webhook_latency: Histogram,
    /// Jobs waiting, as last read.
    pub queue_depth: IntGauge,
    /// The same, under the replaced service's name.
    pub celery_queue_depth: IntGauge,
    /// Per-stage time: queue_wait, fetch, preprocess, infer, persist.
    pub stage_seconds: HistogramVec,
    /// Images per model run.
    pub batch_size: Histogram,
    /// Final tasks deleted after `IMGCLF_RESULT_TTL`.
    pub expired_tasks: IntCounter,
    /// Images deleted after `IMGCLF_IMAGE_TTL` or with their expired task.
    pub expired_images: IntCounter,
    /// Dead letters deleted after `IMGCLF_RESULT_TTL`.
    pub expired_dead_letters: IntCounter,
    /// HTTP requests answered, by method, route template and status (`imgclf-http`).
    pub http_requests: IntCounterVec,
    /// HTTP request time, by method and route template.
    pub http_request_duration: HistogramVec,
    /// `imgclf_build_info{version,model,backend}`: one series, at 1.
    build_info: IntGaugeVec,
}

/// `imgclf_build_info`'s `backend` in a process that runs no model (one that only accepts).
pub const NO_BACKEND: &str = "none";

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered and at zero.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        // 1 ms to 33 s: a request, a stage of one image.
        let seconds = || exponential_buckets(0.001, 2.0, 16).expect("valid buckets");
        // 1 ms to 70 min: what may wait in a backlog or for a callback's retries (the last
        // attempt starts within the hour), so a slow tail is read, not clipped at 33 s.
        let long_seconds = || exponential_buckets(0.001, 2.0, 23).expect("valid buckets");
        let queue_depth =
            IntGauge::new("image_queue_depth", "Jobs waiting in the queue").expect("valid metric");
        registry
            .register(Box::new(queue_depth.clone()))
            .expect("unique metric");
        // The replaced service's README lists this name; dashboards built on it keep working.
        let celery_queue_depth = IntGauge::new(
            "celery_queue_depth",
            "Jobs waiting in the queue (the replaced service's name for image_queue_depth)",
        )
        .expect("valid metric");
        registry
            .register(Box::new(celery_queue_depth.clone()))
            .expect("unique metric");
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new("image_stage_seconds", "Time per pipeline stage")
                .buckets(long_seconds()),
            &["stage"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(stage_seconds.clone()))
            .expect("unique metric");
        // Labelled by route template, never by the path itself, so task ids stay out.
        let http_requests = IntCounterVec::new(
            Opts::new("imgclf_http_requests_total", "HTTP requests answered"),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(http_requests.clone()))
            .expect("unique metric");
        let http_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "imgclf_http_request_duration_seconds",
                "Time to answer an HTTP request, to the response head",
            )
            .buckets(seconds()),
            &["method", "route"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(http_request_duration.clone()))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "imgclf_build_info",
                "1, labelled with the version, the model and the classifier backend",
            ),
            &["version", "model", "backend"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique metric");
        // CPU, memory, descriptors and threads of this process, read from /proc at each scrape.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        let metrics = Self {
            task_success: counter("image_task_success_total", "Tasks classified successfully"),
            task_failure: counter("image_task_failure_total", "Tasks that ended in FAILURE"),
            task_latency: histogram(
                "image_task_latency_seconds",
                "Time from upload to final state",
                long_seconds(),
            ),
            expired_tasks: counter(
                "imgclf_expired_tasks_total",
                "Final tasks deleted once older than IMGCLF_RESULT_TTL",
            ),
            expired_images: counter(
                "imgclf_expired_images_total",
                "Stored images deleted by the expiry sweeper",
            ),
            expired_dead_letters: counter(
                "imgclf_expired_dead_letters_total",
                "Dead letters deleted once older than IMGCLF_RESULT_TTL",
            ),
            webhook_success: counter("webhook_success_total", "Callbacks delivered"),
            webhook_failure: counter("webhook_failure_total", "Callbacks given up on"),
            webhook_latency: histogram(
                "webhook_latency_seconds",
                "Time to deliver a callback, retries included",
                long_seconds(),
            ),
            batch_size: histogram(
                "image_batch_size",
                "Images per model run: how well batching fills the model",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
            ),
            queue_depth,
            celery_queue_depth,
            stage_seconds,
            http_requests,
            http_request_duration,
            build_info,
            registry,
        };
        // Present from the start, so a process that never loads a model still reports its
        // version; one that does names it with `set_build_info`.
        metrics.set_build_info("", NO_BACKEND);
        metrics
    }

    /// Sets `imgclf_build_info` to this build's version with `model` run by `backend` (`tract`,
    /// `ort`, or [`NO_BACKEND`]), replacing the series set before.
    pub fn set_build_info(&self, model: &str, backend: &str) {
        self.build_info.reset();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), model, backend])
            .set(1);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec");
        String::from_utf8(out).expect("Prometheus text is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_names_one_model_at_a_time() {
        let metrics = Metrics::new();
        let text = metrics.render();
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!(
                "imgclf_build_info{{backend=\"none\",model=\"\",version=\"{version}\"}} 1"
            )),
            "{text}"
        );
        metrics.set_build_info("efficientnet-lite0", "tract");
        let text = metrics.render();
        let series: Vec<_> = text
            .lines()
            .filter(|l| l.starts_with("imgclf_build_info{"))
            .collect();
        assert_eq!(
            series,
            [format!(
                "imgclf_build_info{{backend=\"tract\",model=\"efficientnet-lite0\",version=\"{version}\"}} 1"
            )]
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_come_from_proc() {
        let text = Metrics::new().render();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
        };
        // A running test binary holds megabytes, at least one thread and a few descriptors.
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_threads") >= 1.0);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_start_time_seconds") > 1.6e9);
    }

    /// A task that waited in a backlog for minutes lands in a bucket that says so: the
    /// dashboards' quantiles and the slow-task alert read it, not a clipped 33 s.
    #[test]
    fn waits_of_minutes_fall_in_finite_buckets() {
        let metrics = Metrics::new();
        metrics.task_latency.observe(600.0);
        metrics.webhook_latency.observe(3000.0);
        metrics
            .stage_seconds
            .with_label_values(&["queue_wait"])
            .observe(600.0);
        let text = metrics.render();
        for name in [
            "image_task_latency_seconds_bucket{",
            "webhook_latency_seconds_bucket{",
            "image_stage_seconds_bucket{",
        ] {
            let first_holding_it = text
                .lines()
                .filter(|l| l.starts_with(name) && l.ends_with(" 1"))
                .find_map(|l| l.split("le=\"").nth(1)?.split('"').next())
                .unwrap_or_else(|| panic!("{name} in {text}"));
            assert_ne!(first_holding_it, "+Inf", "{name}");
        }
    }
}
