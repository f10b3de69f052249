//! The OpenAPI document, generated from the handlers' annotations and the types they return,
//! and the interactive documentation at `/docs` (Swagger UI, served from the binary: it works
//! offline).

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use imgclf::{Prediction, StateCounts, TaskId, TaskStatus};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::AppState;

/// What every error body is.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What is wrong, in words meant for the client.
    pub detail: String,
}

/// `202` to an upload: the task to follow.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UploadAccepted {
    /// The new (or, for a repeated `Idempotency-Key`, the existing) task.
    pub task_id: TaskId,
    /// Where its status is: `/api/task-status/{task_id}`.
    pub status_url: String,
}

/// One file of a bulk upload: accepted as a task, or refused with the reason.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum BulkItem {
    /// Accepted: the task to follow.
    Accepted {
        /// The file's name as sent, if it had one.
        filename: Option<String>,
        /// The task.
        task_id: TaskId,
        /// Where its status is.
        status_url: String,
    },
    /// Refused: why (what the single upload would have answered).
    Refused {
        /// The file's name as sent, if it had one.
        filename: Option<String>,
        /// Why it was refused.
        detail: String,
        /// The status the single upload would have answered: 415 or 422 for this file, 429 or
        /// 503 for a moment when it may be sent again.
        status: u16,
        /// With 429 and 503, seconds to wait before sending it again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<u64>,
    },
}

/// The answer to a bulk upload: one item per `file` field, in order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BulkAccepted {
    /// One per file, in the order they were sent.
    pub tasks: Vec<BulkItem>,
}

/// `200` of `/api/classify`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Classified {
    /// The client's metadata, plus `filename`.
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
    /// The top-k classes, most probable first.
    pub classification: Vec<Prediction>,
    /// The model that classified it.
    pub model: String,
}

/// A page of the task listing.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskPage {
    /// Newest first.
    pub tasks: Vec<TaskStatus>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    pub next_cursor: Option<String>,
}

/// Counts for the task monitor.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskSummary {
    /// Tasks per state.
    pub counts: StateCounts,
    /// Jobs waiting in the queue.
    pub queue_depth: u64,
    /// Jobs the workers gave up on (their tasks are `FAILURE`).
    pub dead_letters: u64,
}

/// The multipart form of `/api/upload-image` and `/api/classify`.
#[derive(ToSchema)]
#[allow(dead_code)] // A schema only: the handlers read the form field by field.
pub struct UploadForm {
    /// The image: JPEG, PNG, WebP, GIF, BMP or TIFF (recognised by its bytes).
    #[schema(value_type = String, format = Binary)]
    file: Option<Vec<u8>>,
    /// Instead of `file`: an http(s) URL the service fetches the image from, under the same
    /// address policy as callbacks.
    image_url: Option<String>,
    /// An http(s) URL to POST the task's status to when it ends (upload only).
    callback_url: Option<String>,
    /// A JSON object kept with the task and returned with its result.
    metadata: Option<String>,
    /// Classes to return, 1 to 100 (classify only).
    top_k: Option<u32>,
}

/// The multipart form of `/api/upload-images`.
#[derive(ToSchema)]
#[allow(dead_code)] // A schema only.
pub struct BulkForm {
    /// One or more images, each as a `file` field.
    #[schema(value_type = Vec<String>, format = Binary)]
    file: Vec<Vec<u8>>,
    /// Applies to every image.
    callback_url: Option<String>,
    /// Applies to every image.
    metadata: Option<String>,
}

/// `Authorization: Bearer <key>` when the service has API keys.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "imgclf",
        description = "Asynchronous ImageNet image classification. Upload an image, get a task \
                       id at once, wait for its status (or receive a webhook).",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "tasks", description = "Upload images and follow their tasks"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
pub(crate) struct ApiDoc;

/// The document, generated once from every route's annotations.
pub fn openapi_document() -> &'static str {
    document(true)
}

/// The document of a router that serves `/metrics` (`with_metrics`) or leaves it to an address
/// of its own, where this document would send a client to a 404.
fn document(with_metrics: bool) -> &'static str {
    static DOCUMENTS: [OnceLock<String>; 2] = [OnceLock::new(), OnceLock::new()];
    DOCUMENTS[usize::from(with_metrics)].get_or_init(|| {
        let (_, mut document) = crate::routes().split_for_parts();
        if !with_metrics {
            document.paths.paths.remove("/metrics");
        }
        document.to_pretty_json().expect("the document serialises")
    })
}

/// The OpenAPI document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
pub(crate) async fn openapi(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document(state.serve_metrics),
    )
        .into_response()
}

/// `/docs`: Swagger UI over `/openapi.json`, its assets inside the binary. The page is ours,
/// not the crate's (which names everything by absolute path): every URL on it is relative, so
/// that it works behind a proxy's path prefix, as the page at `/` does.
pub(crate) fn ui() -> Router {
    // The crate's routes serve the assets (its own pages at `/docs` and `/docs/` are never
    // reached). As a service, not a router: it routes the whole path itself.
    let assets = swagger_ui_dist::generate_routes(swagger_ui_dist::ApiDefinition {
        uri_prefix: "/docs",
        api_definition: swagger_ui_dist::OpenApiSource::Uri("openapi.json"),
        title: None,
    });
    Router::new()
        .route("/docs", get(|| async { Html(ui_page("docs/", "")) }))
        .route("/docs/", get(|| async { Html(ui_page("", "../")) }))
        .route_service("/docs/{asset}", assets.into_service())
}

/// The UI's page, from a place whose way to the assets is `assets` and to the API is `root`.
fn ui_page(assets: &str, root: &str) -> String {
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>imgclf API</title>
  <link rel="stylesheet" href="{assets}swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{assets}swagger-ui-bundle.js"></script>
<script>
  window.onload = () => {{
    window.ui = SwaggerUIBundle({{ url: '{root}openapi.json', dom_id: '#swagger-ui' }});
  }};
</script>
</body>
</html>
"#
    )
}
