//! The HTTP API of imgclf, compatible with the service it replaces. The router is built here so
//! tests can drive it without a socket; `main.rs` only reads configuration and serves it.

mod error;
mod observe;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::multipart::{Field, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use imgclf::{Pipeline, Submitter, TaskId, TaskState, Upload, Worker};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use error::ApiError;

/// The OpenAPI 3 description of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Most bytes of `metadata` (JSON) and of the other small form fields.
const MAX_FIELD_BYTES: usize = 16 * 1024;

/// Most classes a client may ask for.
const MAX_TOP_K: usize = 100;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The accepting side: every process has it.
    pub submitter: Arc<Submitter>,
    /// The model, where this process has one (the embedded default): `/api/classify` then runs
    /// it directly; without one it submits the image and waits for a worker's result.
    pub worker: Option<Arc<Worker>>,
    /// Most bytes of one uploaded image (413 beyond).
    pub max_upload_bytes: usize,
    /// SHA-256 of each accepted API key; empty turns authentication off.
    pub api_keys: Arc<Vec<[u8; 32]>>,
    /// Whether `/metrics` is served on this router (false when it has its own address).
    pub serve_metrics: bool,
    /// Origins browsers may call the API from; empty sends no CORS headers at all.
    pub cors_origins: Vec<header::HeaderValue>,
    /// How long `/api/classify` waits for a worker (set by [`router`] from its timeout).
    pub classify_wait: Duration,
    /// KiB of request bodies this process holds at once (503 with `Retry-After` beyond).
    pub inflight_kib: Arc<Semaphore>,
}

/// Bytes of request bodies held at once, by default: room for a dozen uploads at the size cap,
/// a few hundred typical photos.
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 256 * 1024 * 1024;

impl AppState {
    /// The API over an accepting side and, where this process runs one, a worker.
    pub fn new(
        submitter: Arc<Submitter>,
        worker: Option<Arc<Worker>>,
        max_upload_bytes: usize,
    ) -> Self {
        Self {
            submitter,
            worker,
            max_upload_bytes,
            api_keys: Arc::new(Vec::new()),
            serve_metrics: true,
            cors_origins: Vec::new(),
            classify_wait: Duration::from_secs(30),
            inflight_kib: Arc::new(Semaphore::new(DEFAULT_MAX_INFLIGHT_BYTES / 1024)),
        }
    }

    /// Lets browsers on `origins` (exact `scheme://host[:port]`) call the API.
    pub fn with_cors_origins(mut self, origins: &[String]) -> Result<Self, String> {
        self.cors_origins = origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
            .map(|o| header::HeaderValue::from_str(o).map_err(|_| format!("not an origin: {o:?}")))
            .collect::<Result<_, _>>()?;
        Ok(self)
    }

    /// Most bytes of a request body: the image plus room for the multipart framing and the
    /// small fields around it.
    fn body_limit(&self) -> usize {
        self.max_upload_bytes + 2 * MAX_FIELD_BYTES + 64 * 1024
    }

    /// Holds at most `bytes` of request bodies at once.
    pub fn with_inflight_budget(mut self, bytes: usize) -> Self {
        self.inflight_kib = Arc::new(Semaphore::new((bytes / 1024).max(1)));
        self
    }

    /// The API over the embedded pipeline: both sides in this process.
    pub fn embedded(pipeline: &Pipeline, max_upload_bytes: usize) -> Self {
        Self::new(
            pipeline.submitter().clone(),
            Some(pipeline.worker().clone()),
            max_upload_bytes,
        )
    }

    /// Requires `Authorization: Bearer <key>` with one of `keys` on `/api/*`.
    pub fn with_api_keys(mut self, keys: &[String]) -> Self {
        let digests = keys
            .iter()
            .filter(|k| !k.is_empty())
            .map(|k| digest(k.as_bytes()))
            .collect();
        self.api_keys = Arc::new(digests);
        self
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// The whole API; `request_timeout` bounds each request so draining at shutdown cannot hang.
pub fn router(mut state: AppState, request_timeout: Duration) -> Router {
    // `/api/classify` answers before the timeout cuts it off.
    state.classify_wait = request_timeout.saturating_sub(Duration::from_secs(1));
    let body_limit = state.body_limit();
    let api = Router::new()
        .route("/api/upload-image", post(upload_image))
        .route("/api/task-status/{task_id}", get(task_status))
        .route("/api/classify", post(classify))
        .layer(DefaultBodyLimit::max(body_limit))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            limit_inflight,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let mut open = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/openapi.json", get(openapi));
    if state.serve_metrics {
        // With the trailing slash too, as the replaced service's README documents it.
        open = open
            .route("/metrics", get(metrics))
            .route("/metrics/", get(metrics));
    }
    let cors = (!state.cors_origins.is_empty()).then(|| {
        tower_http::cors::CorsLayer::new()
            .allow_origin(state.cors_origins.clone())
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static("idempotency-key"),
            ])
            .expose_headers([header::RETRY_AFTER])
            .max_age(Duration::from_secs(600))
    });
    api.merge(open)
        .layer(tower::util::option_layer(cors))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(TraceLayer::new_for_http())
        .layer(middleware::from_fn_with_state(state.clone(), observe::record))
        .with_state(state)
}

/// `/metrics` alone, for serving on its own (internal) address.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/metrics/", get(metrics))
        .with_state(state)
}

/// A global budget of request bytes in flight, taken before the body is read: beyond it a
/// client gets 503 with `Retry-After` at once, instead of every upload slowing down together
/// until memory runs out. A body without `Content-Length` is charged the size cap.
async fn limit_inflight(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let cap = state.body_limit();
    let bytes = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(cap, |length| length.min(cap));
    let kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    match state.inflight_kib.clone().try_acquire_many_owned(kib) {
        Ok(held) => {
            let response = next.run(request).await;
            drop(held);
            response
        }
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many uploads in flight; retry shortly",
        )
        .with_retry_after(1)
        .into_response(),
    }
}

/// Bearer-token check. Keys are compared as SHA-256 digests, in constant time, so neither
/// their content nor their length leaks through timing.
async fn authenticate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.api_keys.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|token| digest(token.trim().as_bytes()));
    let accepted = presented.is_some_and(|presented| {
        state.api_keys.iter().fold(false, |found, key| {
            let differs = key
                .iter()
                .zip(&presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found | (differs == 0)
        })
    });
    if accepted {
        return next.run(request).await;
    }
    let detail = "a valid API key is required: Authorization: Bearer <key>";
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, detail).into_response();
    let challenge = header::HeaderValue::from_static("Bearer");
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, challenge);
    response
}

/// Fields accepted both in the query string and in the form.
#[derive(Debug, Default, Deserialize)]
pub struct FormParams {
    callback_url: Option<String>,
    metadata: Option<String>,
    top_k: Option<String>,
}

/// A parsed upload form.
struct Form {
    bytes: Bytes,
    filename: Option<String>,
    callback_url: Option<String>,
    metadata: Map<String, Value>,
    top_k: Option<usize>,
}

/// Most bytes of an `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;

async fn upload_image(
    State(state): State<AppState>,
    Query(query): Query<FormParams>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => match value.to_str() {
            Ok(key) if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY => Some(key.to_string()),
            _ => {
                return Err(ApiError::unprocessable(format!(
                    "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                )))
            }
        },
    };
    let form = read_form(multipart?, query, state.max_upload_bytes).await?;
    if form.top_k.is_some() {
        return Err(ApiError::unprocessable(
            "top_k applies to /api/classify; uploads use the configured top_k",
        ));
    }
    let upload = Upload {
        bytes: form.bytes,
        filename: form.filename,
        metadata: form.metadata,
        callback_url: form.callback_url,
        idempotency_key,
        top_k: None,
    };
    let task_id = submit_to_completion(&state, upload).await?;
    let body = json!({
        "task_id": task_id,
        "status_url": format!("/api/task-status/{task_id}"),
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Once the bytes are in, acceptance runs to its end on a task of its own: a client that
/// disconnects or times out cannot stop it between storing, recording and queueing.
async fn submit_to_completion(state: &AppState, upload: Upload) -> Result<TaskId, ApiError> {
    let submitter = state.submitter.clone();
    tokio::spawn(async move { submitter.submit(upload).await })
        .await
        .map_err(ApiError::unavailable)?
        .map_err(Into::into)
}

/// Most seconds a status request may wait for its task to end.
const MAX_WAIT_SECONDS: f64 = 30.0;

/// `?wait=SECONDS` on a status request.
#[derive(Debug, Default, Deserialize)]
struct StatusParams {
    wait: Option<String>,
}

/// The task's status; with `?wait=SECONDS` (at most 30) it answers as soon as the task is
/// final or the wait ends, so clients need not poll.
async fn task_status(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    Query(params): Query<StatusParams>,
) -> Result<Json<Value>, ApiError> {
    let unknown = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown task id {task_id:?}"),
        )
    };
    let wait = match params.wait.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => match text.parse::<f64>() {
            Ok(seconds) if (0.0..=MAX_WAIT_SECONDS).contains(&seconds) => {
                Some(Duration::from_secs_f64(seconds))
            }
            _ => {
                return Err(ApiError::unprocessable(format!(
                    "'wait' must be a number of seconds from 0 to {MAX_WAIT_SECONDS}"
                )))
            }
        },
    };
    let id: TaskId = task_id.parse().map_err(|_| unknown())?;
    let submitter = &state.submitter;
    let record = match wait {
        // Within the request's own timeout, whatever the client asked.
        Some(wait) => submitter.wait(id, wait.min(state.classify_wait)).await,
        None => submitter.status(id).await,
    };
    let record = record.map_err(ApiError::unavailable)?;
    record.map(|r| Json(r.status())).ok_or_else(unknown)
}

async fn classify(
    State(state): State<AppState>,
    Query(query): Query<FormParams>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let form = read_form(multipart?, query, state.max_upload_bytes).await?;
    if form.callback_url.is_some() {
        return Err(ApiError::unprocessable(
            "callback_url applies to /api/upload-image only",
        ));
    }
    let top_k = form.top_k.unwrap_or(state.submitter.config().top_k);
    let mut metadata = form.metadata;
    if let Some(filename) = &form.filename {
        metadata.insert("filename".into(), filename.clone().into());
    }
    let (classification, model) = match &state.worker {
        Some(worker) => (
            worker.classify_now(form.bytes, top_k).await?,
            worker.classifier().spec().name.clone(),
        ),
        None => {
            let upload = Upload {
                bytes: form.bytes,
                filename: form.filename,
                metadata: metadata.clone(),
                top_k: Some(top_k),
                ..Upload::default()
            };
            classify_by_workers(&state, upload).await?
        }
    };
    Ok(Json(json!({
        "metadata": metadata,
        "classification": classification,
        "model": model,
    })))
}

/// `/api/classify` in a process without a model: submit the image as a task and wait for a
/// worker's result.
async fn classify_by_workers(
    state: &AppState,
    upload: Upload,
) -> Result<(Vec<imgclf::Prediction>, String), ApiError> {
    let submitter = &state.submitter;
    let task_id = submit_to_completion(state, upload).await?;
    let record = submitter
        .wait(task_id, state.classify_wait)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| ApiError::unavailable(format!("task {task_id} vanished")))?;
    match (record.state, record.result) {
        (TaskState::Success, Some(result)) => Ok((result.classification, result.model)),
        (TaskState::Failure, _) => Err(ApiError::unprocessable(format!(
            "the image could not be classified: {}",
            record.error.unwrap_or_default()
        ))),
        _ => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no worker finished the image in time; it is task {task_id}, see \
                 /api/task-status/{task_id}"
            ),
        )),
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when every backend answers and, where this process has a model, it has run once.
async fn ready(State(state): State<AppState>) -> Response {
    let ports = state.submitter.ports();
    let (storage, queue, results) = tokio::join!(
        ports.storage.check(),
        ports.queue.check(),
        ports.results.check()
    );
    let mut problems = Vec::new();
    if state
        .worker
        .as_ref()
        .is_some_and(|w| !w.classifier().is_ready())
    {
        problems.push("model not loaded yet".to_string());
    }
    for (port, failed) in [
        ("storage", storage.err().map(|e| e.to_string())),
        ("queue", queue.err().map(|e| e.to_string())),
        ("results", results.err().map(|e| e.to_string())),
    ] {
        if let Some(error) = failed {
            tracing::warn!(port, %error, "readiness check failed");
            problems.push(format!("{port} unreachable"));
        }
    }
    if problems.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        let body = json!({"status": "not ready", "detail": problems.join("; ")});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let content_type = [(header::CONTENT_TYPE, imgclf::metrics::CONTENT_TYPE)];
    (content_type, state.submitter.render_metrics().await).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn read_form(
    mut multipart: Multipart,
    query: FormParams,
    max_upload_bytes: usize,
) -> Result<Form, ApiError> {
    let mut params = query;
    let mut file: Option<(Bytes, Option<String>)> = None;
    while let Some(field) = multipart.next_field().await? {
        match field.name().unwrap_or_default() {
            "file" => {
                if file.is_some() {
                    return Err(ApiError::unprocessable(
                        "send exactly one field named 'file'",
                    ));
                }
                let filename = field.file_name().map(checked_filename).transpose()?;
                file = Some((
                    read_field(field, max_upload_bytes, "the image").await?,
                    filename,
                ));
            }
            name @ ("callback_url" | "metadata" | "top_k") => {
                let name = name.to_string();
                let bytes = read_field(field, MAX_FIELD_BYTES, &name).await?;
                let text = String::from_utf8(bytes.to_vec())
                    .map_err(|_| ApiError::unprocessable(format!("'{name}' is not UTF-8 text")))?;
                match name.as_str() {
                    "callback_url" => params.callback_url = Some(text),
                    "metadata" => params.metadata = Some(text),
                    _ => params.top_k = Some(text),
                }
            }
            // Unknown fields are skipped, as the replaced service did.
            _ => {}
        }
    }
    let Some((bytes, filename)) = file else {
        return Err(ApiError::unprocessable(
            "missing multipart field 'file' with the image",
        ));
    };
    let metadata = match params.metadata.as_deref().map(str::trim) {
        None | Some("") => Map::new(),
        Some(text) if text.len() > MAX_FIELD_BYTES => {
            return Err(ApiError::unprocessable(format!(
                "'metadata' is over {MAX_FIELD_BYTES} bytes"
            )))
        }
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(map)) => {
                if map_has_nul(&map) {
                    return Err(ApiError::unprocessable(
                        "'metadata' may not contain NUL characters",
                    ));
                }
                map
            }
            Ok(_) => return Err(ApiError::unprocessable("'metadata' must be a JSON object")),
            Err(e) => {
                return Err(ApiError::unprocessable(format!(
                    "'metadata' is not valid JSON: {e}"
                )))
            }
        },
    };
    let top_k = match params.top_k.as_deref().map(str::trim) {
        None => None,
        Some(text) => match text.parse::<usize>() {
            Ok(k) if (1..=MAX_TOP_K).contains(&k) => Some(k),
            _ => {
                return Err(ApiError::unprocessable(format!(
                    "'top_k' must be a whole number from 1 to {MAX_TOP_K}"
                )))
            }
        },
    };
    let callback_url = params
        .callback_url
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty());
    Ok(Form {
        bytes,
        filename,
        callback_url,
        metadata,
        top_k,
    })
}

/// Most bytes of a kept file name.
const MAX_FILENAME_BYTES: usize = 255;

/// A client's file name, as kept in the metadata: no control characters (a NUL is text no
/// database stores), at most [`MAX_FILENAME_BYTES`] (longer names are cut at a character).
fn checked_filename(name: &str) -> Result<String, ApiError> {
    if name.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "the file name may not contain control characters",
        ));
    }
    let mut end = name.len().min(MAX_FILENAME_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Ok(name[..end].to_string())
}

/// Whether a JSON value holds a NUL anywhere, in a key or a string (PostgreSQL's JSONB, for
/// one, refuses it).
fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map_has_nul(map),
        _ => false,
    }
}

/// Whether a JSON object holds a NUL in a key or anywhere in a value.
fn map_has_nul(map: &Map<String, Value>) -> bool {
    map.iter().any(|(k, v)| k.contains('\0') || has_nul(v))
}

/// Reads a field, refusing it with 413 as soon as it passes `max` bytes.
async fn read_field(mut field: Field<'_>, max: usize, what: &str) -> Result<Bytes, ApiError> {
    let mut buffer = BytesMut::new();
    while let Some(chunk) = field.chunk().await? {
        if buffer.len() + chunk.len() > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{what} is larger than the limit of {max} bytes"),
            ));
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}

/// Time a client has to send a request's head, by default: on a new connection and between
/// keep-alive requests alike, so slow or idle clients cannot hold connections.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` resolves, then lets the requests in progress end
/// (the router's timeout bounds them). Each client gets `header_timeout` to send a request's
/// head, and a connection waiting that long for its next request is closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    header_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}
