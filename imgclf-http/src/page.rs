//! The web page at `/`: upload images and watch their results, and a live monitor of recent
//! tasks. Plain HTML, CSS and JS from `static/`, compiled into the binary so the service stays a
//! single file with nothing to deploy beside it.

use std::sync::OnceLock;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

/// Everything the page loads comes from this origin; no inline code or styles, no frames, no
/// plugins, and forms post nowhere (the API key field must never end up in a URL).
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' blob: data:; \
     style-src 'self'; script-src 'self'; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file, or the page rendered from one.
struct Asset {
    body: Bytes,
    content_type: &'static str,
    etag: OnceLock<HeaderValue>,
}

impl Asset {
    const fn new(body: &'static [u8], content_type: &'static str) -> Self {
        Self {
            body: Bytes::from_static(body),
            content_type,
            etag: OnceLock::new(),
        }
    }

    /// The page with this server's upload limit on its `<body>`, so that it can refuse a file
    /// that is too large before sending it (a page load is rare: rendered each time).
    fn page(max_upload_bytes: usize) -> Self {
        let template = std::str::from_utf8(INDEX.body.as_ref()).expect("the page is UTF-8");
        let body = template.replacen(
            "<body>",
            &format!("<body data-max-upload-bytes=\"{max_upload_bytes}\">"),
            1,
        );
        Self {
            body: Bytes::from(body),
            content_type: INDEX.content_type,
            etag: OnceLock::new(),
        }
    }

    /// A strong validator from the content, so a new build's files replace cached ones at once.
    fn etag(&self) -> &HeaderValue {
        self.etag.get_or_init(|| {
            let digest = crate::digest(&self.body);
            let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a valid header value")
        })
    }

    /// Whether the client's `If-None-Match` already names this content.
    fn is_cached(&self, headers: &HeaderMap) -> bool {
        let etag = self.etag().as_bytes();
        headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|tag| tag.trim())
            .any(|tag| tag == "*" || tag.trim_start_matches("W/").as_bytes() == etag)
    }

    fn respond(&self, headers: &HeaderMap) -> Response {
        let status = if self.is_cached(headers) {
            StatusCode::NOT_MODIFIED
        } else {
            StatusCode::OK
        };
        let mut response = if status == StatusCode::OK {
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(self.content_type),
                )],
                self.body.clone(),
            )
                .into_response()
        } else {
            status.into_response()
        };
        let out = response.headers_mut();
        out.insert(header::ETAG, self.etag().clone());
        // Revalidated on every load (a 304 when unchanged): the file names carry no version,
        // so a cached copy must never outlive an upgrade of the server.
        out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        out.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        out.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        out.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        response
    }
}

static INDEX: Asset = Asset::new(
    include_bytes!("../static/index.html"),
    "text/html; charset=utf-8",
);
static APP_JS: Asset = Asset::new(
    include_bytes!("../static/app.js"),
    "text/javascript; charset=utf-8",
);
static STYLE_CSS: Asset = Asset::new(
    include_bytes!("../static/style.css"),
    "text/css; charset=utf-8",
);
static FAVICON: Asset = Asset::new(include_bytes!("../static/favicon.svg"), "image/svg+xml");

/// The web page: upload images and watch their results; monitor recent tasks.
#[utoipa::path(
    get,
    path = "/",
    tag = "operations",
    responses(
        (status = 200, description = "The page (HTML; its script and styles are under /static/)", content_type = "text/html"),
        (status = 304, description = "Unchanged since the copy the client names in If-None-Match"),
    )
)]
async fn index(State(state): State<AppState>, headers: HeaderMap) -> Response {
    Asset::page(state.max_upload_bytes).respond(&headers)
}

/// The page and its files; open, like `/health`: the page holds no data, and the API calls it
/// makes carry the user's key.
pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(index))
        .route(
            "/static/app.js",
            get(|h: HeaderMap| async move { APP_JS.respond(&h) }),
        )
        .route(
            "/static/style.css",
            get(|h: HeaderMap| async move { STYLE_CSS.respond(&h) }),
        )
        .route(
            "/static/favicon.svg",
            get(|h: HeaderMap| async move { FAVICON.respond(&h) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_match_their_content_and_revalidate() {
        let etag = APP_JS.etag().to_str().unwrap().to_string();
        assert_ne!(etag, INDEX.etag().to_str().unwrap());
        let mut headers = HeaderMap::new();
        assert!(!APP_JS.is_cached(&headers));
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"other\", W/{etag}")).unwrap(),
        );
        assert!(APP_JS.is_cached(&headers));
        assert_eq!(APP_JS.respond(&headers).status(), StatusCode::NOT_MODIFIED);
        assert!(!INDEX.is_cached(&headers));
        assert_eq!(INDEX.respond(&headers).status(), StatusCode::OK);
    }
}
