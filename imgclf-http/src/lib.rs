//! The HTTP API of imgclf, compatible with the service it replaces. The router is built here so
//! tests can drive it without a socket; `main.rs` only reads configuration and serves it.

mod docs;
mod error;
mod observe;
mod page;
mod tasks;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::multipart::{Field, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use imgclf::notify::{CallbackPolicy, FetchError, IpNet, UrlFetcher};
use imgclf::{Pipeline, Submitter, TaskId, TaskState, Upload, Worker};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use docs::{
    openapi_document, BulkAccepted, BulkItem, Classified, ErrorBody, TaskPage, TaskSummary,
    UploadAccepted,
};
pub use error::ApiError;

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
    /// All of `inflight_kib`: the most one request is charged.
    inflight_budget_kib: u32,
    /// Fetches `image_url` uploads, under the callbacks' address policy.
    pub fetcher: Arc<UrlFetcher>,
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
            inflight_budget_kib: (DEFAULT_MAX_INFLIGHT_BYTES / 1024) as u32,
            fetcher: Arc::new(url_fetcher(&[], DEFAULT_FETCH_TIMEOUT, max_upload_bytes)),
        }
    }

    /// Fetches `image_url` uploads from public addresses and from `allow` (the callbacks'
    /// allowlist), each within `timeout`.
    pub fn with_url_policy(mut self, allow: &[IpNet], timeout: Duration) -> Self {
        self.fetcher = Arc::new(url_fetcher(allow, timeout, self.max_upload_bytes));
        self
    }

    /// Lets browsers on `origins` (exact `scheme://host[:port]`, or `*` for any) call the API.
    pub fn with_cors_origins(mut self, origins: &[String]) -> Result<Self, String> {
        self.cors_origins = origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
            .map(|o| {
                // What a browser sends in `Origin`: a scheme and an authority, nothing after.
                let authority = (o.strip_prefix("https://").or_else(|| o.strip_prefix("http://")))
                    .filter(|a| !a.is_empty() && !a.contains(['/', '?', '#', '@', ' ']));
                match (o == "*" || authority.is_some()).then(|| header::HeaderValue::from_str(o)) {
                    Some(Ok(origin)) => Ok(origin),
                    _ => Err(format!(
                        "not an origin: {o:?} (expected scheme://host[:port], as browsers send it, or *)"
                    )),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(self)
    }

    /// Most bytes of a request body: the image plus room for the multipart framing and the
    /// small fields around it.
    fn body_limit(&self) -> usize {
        self.max_upload_bytes + 2 * MAX_FIELD_BYTES + 64 * 1024
    }

    /// Most bytes of a bulk upload's body.
    fn bulk_body_limit(&self) -> usize {
        BULK_BODY_UPLOADS * self.body_limit()
    }

    /// Holds at most `bytes` of request bodies at once. A body larger than the whole budget is
    /// charged all of it: it is let in when nothing else is in flight.
    pub fn with_inflight_budget(mut self, bytes: usize) -> Self {
        self.inflight_budget_kib = u32::try_from((bytes / 1024).max(1)).unwrap_or(u32::MAX);
        self.inflight_kib = Arc::new(Semaphore::new(self.inflight_budget_kib as usize));
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

/// How long fetching an `image_url` may take, by default (as a callback attempt).
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(imgclf::notify::DEFAULT_TIMEOUT_SECS);

fn url_fetcher(allow: &[IpNet], timeout: Duration, max_bytes: usize) -> UrlFetcher {
    UrlFetcher::new(CallbackPolicy::new(allow.to_vec()), timeout, max_bytes)
        .expect("an HTTP client with rustls builds")
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Every route with its documentation: the router and the OpenAPI document both come from
/// here, so neither can list a route the other lacks. `/api/*` comes first (the layers in
/// [`router`] apply to it alone).
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(<docs::ApiDoc as utoipa::OpenApi>::openapi())
        .merge(api_routes())
        .merge(open_routes())
        .merge(metrics_routes())
}

/// The API proper: authenticated, body-limited, charged to the in-flight budget.
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(upload_image))
        .routes(routes!(upload_images))
        .routes(routes!(task_status))
        .routes(routes!(classify))
        .routes(routes!(tasks::list_tasks))
        .routes(routes!(tasks::task_summary))
}

/// What needs no key: the page, the probes and the documentation.
fn open_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(page::routes())
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(docs::openapi))
}

/// `/metrics` (and `/metrics/`, the replaced service's spelling), on the API's address or on
/// an address of its own.
fn metrics_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(metrics))
        .route("/metrics/", get(metrics))
}

/// The whole API; `request_timeout` bounds each request so draining at shutdown cannot hang.
pub fn router(mut state: AppState, request_timeout: Duration) -> Router {
    // `/api/classify` answers before the timeout cuts it off.
    state.classify_wait = request_timeout.saturating_sub(Duration::from_secs(1));
    let (api, _) = api_routes().split_for_parts();
    let api = api
        .layer(DefaultBodyLimit::max(state.bulk_body_limit()))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            limit_inflight,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let (mut open, _) = open_routes().split_for_parts();
    if state.serve_metrics {
        open = open.merge(metrics_routes().split_for_parts().0);
    }
    let cors = (!state.cors_origins.is_empty()).then(|| {
        let origins = &state.cors_origins;
        let allowed = match origins.iter().any(|o| o == "*") {
            true => tower_http::cors::AllowOrigin::any(),
            false => tower_http::cors::AllowOrigin::list(origins.clone()),
        };
        tower_http::cors::CorsLayer::new()
            .allow_origin(allowed)
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static("idempotency-key"),
                REQUEST_ID_HEADER,
            ])
            .expose_headers([header::RETRY_AFTER, REQUEST_ID_HEADER])
            .max_age(Duration::from_secs(600))
    });
    api.merge(open)
        .with_state(state.clone())
        .merge(docs::ui())
        .layer(tower::util::option_layer(cors))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        // Outside the timeout, so that its 408 gets a detail too.
        .layer(middleware::map_response(json_errors))
        .layer(access_log())
        .layer(middleware::from_fn(request_id))
        .layer(middleware::from_fn_with_state(state, observe::record))
}

/// Every error answers `{"detail": …}`, as the API's own errors do: axum's rejections (a query
/// string it cannot parse, say) are plain text, and an unknown route or method has no body.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let plain = (response.headers().get(header::CONTENT_TYPE))
        .is_none_or(|kind| kind.as_bytes().starts_with(b"text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let detail = match text.is_empty() {
        true => status.canonical_reason().unwrap_or("error").to_lowercase(),
        false => text,
    };
    // The API's own error body, with the headers of the answer it replaces (`Allow`, say).
    let (answer, body) = ApiError::new(status, detail).into_response().into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.extend(answer.headers);
    Response::from_parts(parts, body)
}

/// The header that names a request, from the client or made here, and returned with the answer.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Most characters of a client's request id; a longer or stranger one is replaced.
const MAX_REQUEST_ID: usize = 128;

/// A request's id, in the request's extensions: the handlers pass it on with the job.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Names every request: the client's `x-request-id` when it is a plain token, a new UUID
/// otherwise. The id is in the access log, the response's header and the task's job, so one
/// upload can be followed into the worker that ran it.
async fn request_id(mut request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            (1..=MAX_REQUEST_ID).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string);
    let id = given.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let value = HeaderValue::from_str(&id).expect("a checked token or a UUID");
    request
        .headers_mut()
        .insert(REQUEST_ID_HEADER, value.clone());
    request.extensions_mut().insert(RequestId(id));
    let mut response = next.run(request).await;
    response.headers_mut().insert(REQUEST_ID_HEADER, value);
    response
}

/// One INFO line per request when it is answered: method, path, request id, status, latency.
fn access_log() -> TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    impl Fn(&Request) -> tracing::Span + Clone,
    (),
    tower_http::trace::DefaultOnResponse,
> {
    TraceLayer::new_for_http()
        .make_span_with(|request: &Request| {
            let id = request.extensions().get::<RequestId>();
            tracing::info_span!(
                "request",
                method = %request.method(),
                path = %request.uri().path(),
                request_id = id.map(|RequestId(id)| id.as_str()),
            )
        })
        .on_request(())
        .on_response(
            tower_http::trace::DefaultOnResponse::new()
                .level(tracing::Level::INFO)
                .latency_unit(tower_http::LatencyUnit::Micros),
        )
}

/// `/metrics` alone, for serving on its own (internal) address.
pub fn metrics_router(state: AppState) -> Router {
    metrics_routes().split_for_parts().0.with_state(state)
}

/// A global budget of request bytes in flight, taken before the body is read: beyond it a
/// client gets 503 with `Retry-After` at once, instead of every upload slowing down together
/// until memory runs out. A chunked body (no `Content-Length`) is charged the size cap; a request
/// without a body (a status request, a long poll) nothing; none more than the whole budget (a
/// bulk upload may be larger than a small budget, and would otherwise never be let in).
async fn limit_inflight(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let cap = if request.uri().path() == "/api/upload-images" {
        state.bulk_body_limit()
    } else {
        state.body_limit()
    };
    let bytes = match headers.get(header::CONTENT_LENGTH) {
        Some(length) => length
            .to_str()
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(cap, |length| length.min(cap)),
        None if headers.contains_key(header::TRANSFER_ENCODING) => cap,
        // No body at all (a status request, a long poll): nothing to hold.
        None => 0,
    };
    if bytes == 0 {
        return next.run(request).await;
    }
    let kib = u32::try_from(bytes.div_ceil(1024).max(1))
        .unwrap_or(u32::MAX)
        .min(state.inflight_budget_kib);
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
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FormParams {
    /// An http(s) URL to POST the task's status to when it ends (uploads only).
    callback_url: Option<String>,
    /// A JSON object kept with the task and returned with its result.
    metadata: Option<String>,
    /// Classes to return, 1 to 100 (`/api/classify` only).
    top_k: Option<String>,
}

/// How many single uploads' worth of bytes one bulk upload may carry.
const BULK_BODY_UPLOADS: usize = 4;

/// Most files in one bulk upload.
const MAX_BULK_FILES: usize = 64;

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

/// Upload one image: its task id comes back at once, the worker classifies it later.
#[utoipa::path(
    post,
    path = "/api/upload-image",
    tag = "tasks",
    params(FormParams, ("Idempotency-Key" = Option<String>, Header, description = "Repeating an upload with the same key and bytes answers with the same task instead of a new one")),
    request_body(content = docs::UploadForm, content_type = "multipart/form-data"),
    security((), ("api_key" = [])),
    responses(
        (status = 202, description = "Accepted: the task to follow", body = UploadAccepted),
        (status = 400, description = "The body is not a multipart form", body = ErrorBody),
        (status = 401, description = "API keys are set and none was given", body = ErrorBody),
        (status = 408, description = "The request took longer than the request timeout", body = ErrorBody),
        (status = 413, description = "The image (or a field) is over its size limit", body = ErrorBody),
        (status = 415, description = "The bytes are not JPEG, PNG, WebP, GIF, BMP or TIFF", body = ErrorBody),
        (status = 422, description = "The image does not decode or is over the pixel limit; a field is missing or invalid", body = ErrorBody),
        (status = 429, description = "Too many jobs are waiting; retry after `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "A backend cannot take the task, or too many uploads are in flight", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
async fn upload_image(
    State(state): State<AppState>,
    Query(query): Query<FormParams>,
    request_id: Option<Extension<RequestId>>,
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
    let form = read_form(&state, multipart?, query).await?;
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
        request_id: request_id.map(|Extension(RequestId(id))| id),
    };
    let task_id = submit_to_completion(&state, upload).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted(task_id))).into_response())
}

fn accepted(task_id: TaskId) -> UploadAccepted {
    UploadAccepted {
        task_id,
        status_url: format!("/api/task-status/{task_id}"),
    }
}

/// Upload several images at once (several `file` fields): each becomes a task of its own, and
/// a file that is refused does not refuse the others.
#[utoipa::path(
    post,
    path = "/api/upload-images",
    tag = "tasks",
    params(FormParams),
    request_body(content = docs::BulkForm, content_type = "multipart/form-data"),
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "One item per file, in order: its task, or why it was refused", body = BulkAccepted),
        (status = 400, description = "The body is not a multipart form", body = ErrorBody),
        (status = 401, description = "API keys are set and none was given", body = ErrorBody),
        (status = 408, description = "The request took longer than the request timeout", body = ErrorBody),
        (status = 413, description = "The body is over the bulk limit (four single uploads)", body = ErrorBody),
        (status = 422, description = "No file, over 64 files, or invalid `metadata`/`callback_url`", body = ErrorBody),
        (status = 503, description = "Too many uploads are in flight", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
async fn upload_images(
    State(state): State<AppState>,
    Query(query): Query<FormParams>,
    request_id: Option<Extension<RequestId>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<BulkAccepted>, ApiError> {
    let request_id = request_id.map(|Extension(RequestId(id))| id);
    let mut multipart = multipart?;
    let mut params = query;
    let mut files = Vec::new();
    while let Some(field) = multipart.next_field().await? {
        match field.name().unwrap_or_default() {
            "file" => {
                if files.len() == MAX_BULK_FILES {
                    return Err(ApiError::unprocessable(format!(
                        "at most {MAX_BULK_FILES} files per bulk upload"
                    )));
                }
                let raw_name = field.file_name().map(str::to_string);
                let filename = raw_name.as_deref().map(checked_filename).transpose();
                let bytes = read_field_or_skip(field, state.max_upload_bytes).await?;
                files.push((raw_name, filename, bytes));
            }
            name @ ("callback_url" | "metadata") => {
                let name = name.to_string();
                let text = read_text_field(field, &name).await?;
                if name == "callback_url" {
                    params.callback_url = Some(text);
                } else {
                    params.metadata = Some(text);
                }
            }
            _ => {}
        }
    }
    if files.is_empty() {
        return Err(ApiError::unprocessable(
            "send one or more multipart fields named 'file'",
        ));
    }
    if params.top_k.is_some() {
        return Err(ApiError::unprocessable(
            "top_k applies to /api/classify; uploads use the configured top_k",
        ));
    }
    let (metadata, callback_url) = (
        parse_metadata(params.metadata)?,
        trimmed(params.callback_url),
    );
    // Refused for the whole request, not file by file.
    if let Some(url) = &callback_url {
        state.submitter.check_callback(url).await?;
    }
    let mut tasks = Vec::with_capacity(files.len());
    for (raw_name, filename, bytes) in files {
        let submitted = match (filename, bytes) {
            (Ok(filename), Ok(bytes)) => {
                let upload = Upload {
                    bytes,
                    filename,
                    metadata: metadata.clone(),
                    callback_url: callback_url.clone(),
                    request_id: request_id.clone(),
                    ..Upload::default()
                };
                submit_to_completion(&state, upload).await
            }
            (Err(error), _) | (_, Err(error)) => Err(error),
        };
        tasks.push(match submitted.map(accepted) {
            Ok(UploadAccepted {
                task_id,
                status_url,
            }) => BulkItem::Accepted {
                filename: raw_name,
                task_id,
                status_url,
            },
            Err(error) => BulkItem::Refused {
                filename: raw_name,
                detail: error.detail,
                status: error.status.as_u16(),
                retry_after: error.retry_after,
            },
        });
    }
    Ok(Json(BulkAccepted { tasks }))
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
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct StatusParams {
    /// Seconds (at most 30) to wait for the task to end before answering.
    wait: Option<String>,
}

/// The task's status; with `?wait=SECONDS` (at most 30) it answers as soon as the task is
/// final or the wait ends, so clients need not poll.
#[utoipa::path(
    get,
    path = "/api/task-status/{task_id}",
    tag = "tasks",
    params(("task_id" = String, Path, description = "The task id an upload returned"), StatusParams),
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "Where the task stands", body = imgclf::TaskStatus),
        (status = 400, description = "A task id or query string that cannot be read (not UTF-8, a field twice)", body = ErrorBody),
        (status = 401, description = "API keys are set and none was given", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 408, description = "The request took longer than the request timeout", body = ErrorBody),
        (status = 422, description = "A bad `wait`", body = ErrorBody),
        (status = 503, description = "The result store is unreachable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
async fn task_status(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    Query(params): Query<StatusParams>,
) -> Result<Json<imgclf::TaskStatus>, ApiError> {
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
    record.map(|r| Json(r.to_status())).ok_or_else(unknown)
}

/// Classify one image now and answer with the result.
#[utoipa::path(
    post,
    path = "/api/classify",
    tag = "tasks",
    params(FormParams),
    request_body(content = docs::UploadForm, content_type = "multipart/form-data"),
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "The classification", body = Classified),
        (status = 400, description = "The body is not a multipart form", body = ErrorBody),
        (status = 401, description = "API keys are set and none was given", body = ErrorBody),
        (status = 408, description = "The request took longer than the request timeout", body = ErrorBody),
        (status = 413, description = "The image (or a field) is over its size limit", body = ErrorBody),
        (status = 415, description = "The bytes are not JPEG, PNG, WebP, GIF, BMP or TIFF", body = ErrorBody),
        (status = 422, description = "The image does not decode or is over the pixel limit; a field is missing or invalid", body = ErrorBody),
        (status = 429, description = "Too many classifications at once; retry after `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "A backend cannot take the task, or too many uploads are in flight", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 504, description = "No worker finished the image in time (a process without a model)", body = ErrorBody),
    )
)]
async fn classify(
    State(state): State<AppState>,
    Query(query): Query<FormParams>,
    request_id: Option<Extension<RequestId>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Classified>, ApiError> {
    let form = read_form(&state, multipart?, query).await?;
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
                request_id: request_id.map(|Extension(RequestId(id))| id),
                ..Upload::default()
            };
            classify_by_workers(&state, upload).await?
        }
    };
    Ok(Json(Classified {
        metadata,
        classification,
        model,
    }))
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

/// The process is alive.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses((status = 200, description = "Alive", body = Object, example = json!({"status": "ok"})))
)]
async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when every backend answers and, where this process has a model, it has run once.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to take work", body = Object, example = json!({"status": "ready"})),
        (status = 503, description = "Not ready, with the reason", body = Object, example = json!({"status": "not ready", "detail": "queue unreachable"})),
    )
)]
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

/// Prometheus metrics (also at `/metrics/`, unless served on their own address).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain"))
)]
async fn metrics(State(state): State<AppState>) -> Response {
    let content_type = [(header::CONTENT_TYPE, imgclf::metrics::CONTENT_TYPE)];
    (content_type, state.submitter.render_metrics().await).into_response()
}

async fn read_form(
    state: &AppState,
    mut multipart: Multipart,
    query: FormParams,
) -> Result<Form, ApiError> {
    let mut params = query;
    let mut file: Option<(Bytes, Option<String>)> = None;
    let mut image_url = None;
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
                    read_field(field, state.max_upload_bytes, "the image").await?,
                    filename,
                ));
            }
            name @ ("callback_url" | "metadata" | "top_k" | "image_url") => {
                let name = name.to_string();
                let text = read_text_field(field, &name).await?;
                match name.as_str() {
                    "callback_url" => params.callback_url = Some(text),
                    "metadata" => params.metadata = Some(text),
                    "image_url" => image_url = trimmed(Some(text)),
                    _ => params.top_k = Some(text),
                }
            }
            // Unknown fields are skipped, as the replaced service did.
            _ => {}
        }
    }
    let (bytes, filename) = match (file, image_url) {
        (Some(file), None) => file,
        (None, Some(url)) => (fetch_image(state, &url).await?, url_filename(&url)),
        (Some(_), Some(_)) => {
            return Err(ApiError::unprocessable(
                "send either 'file' or 'image_url', not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::unprocessable(
                "missing multipart field 'file' with the image (or 'image_url')",
            ))
        }
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
    Ok(Form {
        bytes,
        filename,
        callback_url: trimmed(params.callback_url),
        metadata: parse_metadata(params.metadata)?,
        top_k,
    })
}

/// The image at a client's URL, fetched under the callbacks' address policy, with the upload's
/// size limit (what is fetched is then checked like an uploaded file).
async fn fetch_image(state: &AppState, url: &str) -> Result<Bytes, ApiError> {
    state.fetcher.fetch(url).await.map_err(|error| match error {
        FetchError::TooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, error.to_string())
        }
        other => ApiError::unprocessable(other.to_string()),
    })
}

/// The last segment of a URL's path, as the file name kept with the task.
fn url_filename(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next()?.split_once("://")?.1;
    let name = path.split_once('/')?.1.rsplit('/').next()?;
    checked_filename(name).ok().filter(|n| !n.is_empty())
}

/// A small text field (`metadata`, `callback_url`, `top_k`), at most [`MAX_FIELD_BYTES`].
async fn read_text_field(field: Field<'_>, name: &str) -> Result<String, ApiError> {
    let bytes = read_field(field, MAX_FIELD_BYTES, name).await?;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::unprocessable(format!("'{name}' is not UTF-8 text")))
}

/// A field's text without surrounding blanks; nothing if that is empty.
fn trimmed(text: Option<String>) -> Option<String> {
    text.map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// `metadata`: a JSON object without NUL characters, or nothing.
fn parse_metadata(text: Option<String>) -> Result<Map<String, Value>, ApiError> {
    match text.as_deref().map(str::trim) {
        None | Some("") => Ok(Map::new()),
        Some(text) if text.len() > MAX_FIELD_BYTES => Err(ApiError::unprocessable(format!(
            "'metadata' is over {MAX_FIELD_BYTES} bytes"
        ))),
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(map)) if map_has_nul(&map) => Err(ApiError::unprocessable(
                "'metadata' may not contain NUL characters",
            )),
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(ApiError::unprocessable("'metadata' must be a JSON object")),
            Err(e) => Err(ApiError::unprocessable(format!(
                "'metadata' is not valid JSON: {e}"
            ))),
        },
    }
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

/// Reads a bulk upload's file: an oversized one is read to its end and dropped, so that the
/// files after it still arrive. The outer error is the request's; the inner one the file's.
async fn read_field_or_skip(
    mut field: Field<'_>,
    max: usize,
) -> Result<Result<Bytes, ApiError>, ApiError> {
    let mut buffer = BytesMut::new();
    let mut oversized = false;
    while let Some(chunk) = field.chunk().await? {
        oversized |= buffer.len() + chunk.len() > max;
        if oversized {
            buffer = BytesMut::new();
        } else {
            buffer.extend_from_slice(&chunk);
        }
    }
    if oversized {
        return Ok(Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the image is larger than the limit of {max} bytes"),
        )));
    }
    Ok(Ok(buffer.freeze()))
}

/// Reads a field, refusing it with 413 as soon as it passes `max` bytes.
async fn read_field(mut field: Field<'_>, max: usize, what: &str) -> Result<Bytes, ApiError> {
    // The chunks as they come, joined once at the end: one copy into one buffer of the exact
    // size, rather than a buffer that grows (and is copied) as an image of megabytes arrives.
    let (mut chunks, mut len) = (Vec::new(), 0);
    while let Some(chunk) = field.chunk().await? {
        len += chunk.len();
        if len > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{what} is larger than the limit of {max} bytes"),
            ));
        }
        chunks.push(chunk);
    }
    if chunks.len() == 1 {
        return Ok(chunks.swap_remove(0));
    }
    let mut joined = BytesMut::with_capacity(len);
    chunks
        .iter()
        .for_each(|chunk| joined.extend_from_slice(chunk));
    Ok(joined.freeze())
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
        // A reply written in pieces (a streamed image, a long list) must not wait for the
        // client's delayed acknowledgement of the piece before it, as Nagle's algorithm would.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY could not be set");
        }
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
