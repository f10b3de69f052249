//! Request metrics: `imgclf_http_requests_total{method,route,status}` and
//! `imgclf_http_request_duration_seconds{method,route}`, in the process's own registry.
//!
//! Labels stay bounded: the route is the matched template (`/api/task-status/{task_id}`), never
//! the path a client sent, and a method outside the standard ones counts as `OTHER`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::AppState;

/// The `route` of a request that matched no route (404s for unknown paths, probes, scanners).
pub const UNMATCHED: &str = "unmatched";

/// Counts and times every request, labelled by the route it matched. Added with
/// `Router::layer`, so it runs after routing and sees [`MatchedPath`].
pub async fn record(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, MatchedPath::as_str)
        .to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = state.submitter.metrics();
    metrics
        .http_request_duration
        .with_label_values(&[method, &route])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .http_requests
        .with_label_values(&[method, &route, response.status().as_str()])
        .inc();
    response
}

/// The method as a label: one of the standard nine, or `OTHER` (extension methods are
/// client-chosen text).
fn method_label(method: &Method) -> &'static str {
    [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::PATCH, "PATCH"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ]
    .into_iter()
    .find(|(standard, _)| standard == method)
    .map_or("OTHER", |(_, name)| name)
}
