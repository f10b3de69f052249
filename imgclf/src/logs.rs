//! Log output for the binaries: lines for people, or one JSON object per line for collectors
//! (Loki, Elasticsearch, CloudWatch), each carrying the fields of the spans it happened in, such
//! as a request's or a task's `request_id`.

use tracing_subscriber::EnvFilter;

/// How log lines are written (`IMGCLF_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain text, for people.
    #[default]
    Text,
    /// One JSON object per line, with the current span's fields.
    Json,
}

/// Installs the global subscriber: `RUST_LOG` filters (INFO by default), lines go to stderr.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .flatten_event(true)
            .init(),
    }
}
