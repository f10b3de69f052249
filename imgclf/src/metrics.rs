//! Prometheus metrics of the pipeline. Labels are bounded: stages and outcomes, never ids.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge,
    Registry, TextEncoder,
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
    /// Per-stage time: fetch, preprocess, infer, persist.
    pub stage_seconds: HistogramVec,
    /// Images per model run.
    pub batch_size: Histogram,
}

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
        let seconds = || exponential_buckets(0.001, 2.0, 16).expect("valid buckets");
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
            HistogramOpts::new("image_stage_seconds", "Time per pipeline stage").buckets(seconds()),
            &["stage"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(stage_seconds.clone()))
            .expect("unique metric");
        Self {
            task_success: counter("image_task_success_total", "Tasks classified successfully"),
            task_failure: counter("image_task_failure_total", "Tasks that ended in FAILURE"),
            task_latency: histogram(
                "image_task_latency_seconds",
                "Time from upload to final state",
                seconds(),
            ),
            webhook_success: counter("webhook_success_total", "Callbacks delivered"),
            webhook_failure: counter("webhook_failure_total", "Callbacks given up on"),
            webhook_latency: histogram(
                "webhook_latency_seconds",
                "Time to deliver a callback, retries included",
                seconds(),
            ),
            batch_size: histogram(
                "image_batch_size",
                "Images per model run: how well batching fills the model",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
            ),
            queue_depth,
            celery_queue_depth,
            stage_seconds,
            registry,
        }
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
