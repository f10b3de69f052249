//! Every error becomes an HTTP status here, in one place, as `{"detail": "..."}`.

use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use imgclf::{ClassifyNowError, ImageError, SubmitError};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: String,
    /// Seconds a client should wait before retrying (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Tells the client to retry after `seconds`.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }

    /// A backend failed: the details go to the log under an error id, the client gets the id
    /// and a 503 it may retry, never the details (they may name hosts or credentials).
    pub fn unavailable(error: impl std::fmt::Display) -> Self {
        let id = imgclf::error_id();
        tracing::error!(error_id = %id, %error, "backend unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the service is temporarily unavailable (error id {id})"),
        )
        .with_retry_after(5)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({"detail": self.detail}))).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<ImageError> for ApiError {
    fn from(error: ImageError) -> Self {
        let status = match error {
            ImageError::UnsupportedFormat => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ImageError::Empty
            | ImageError::Undecodable(_)
            | ImageError::TooCostly(_)
            | ImageError::TooManyPixels { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        };
        Self::new(status, error.to_string())
    }
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> Self {
        match error {
            SubmitError::Image(e) => e.into(),
            SubmitError::Callback(e) => Self::unprocessable(e.to_string()),
            SubmitError::Busy { retry_after, .. } => {
                let seconds = retry_after.as_secs().max(1);
                Self::new(StatusCode::TOO_MANY_REQUESTS, error.to_string())
                    .with_retry_after(seconds)
            }
            // Unavailable, and whatever a later version adds.
            other => Self::unavailable(other),
        }
    }
}

impl From<ClassifyNowError> for ApiError {
    fn from(error: ClassifyNowError) -> Self {
        match error {
            ClassifyNowError::Image(e) => e.into(),
            ClassifyNowError::Classify(e) if e.is_temporary() => Self::unavailable(&e),
            ClassifyNowError::Busy => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, error.to_string()).with_retry_after(1)
            }
            other => {
                let id = imgclf::error_id();
                tracing::error!(error = %other, error_id = %id, "classification failed");
                Self::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("the image could not be classified (error id {id})"),
                )
            }
        }
    }
}

impl From<MultipartRejection> for ApiError {
    fn from(rejection: MultipartRejection) -> Self {
        Self::new(
            rejection.status(),
            format!(
                "expected a multipart/form-data body: {}",
                rejection.body_text()
            ),
        )
    }
}

impl From<MultipartError> for ApiError {
    fn from(error: MultipartError) -> Self {
        let status = error.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::new(status, "the request body is larger than the upload limit");
        }
        // axum answers 500 for a body that could not be read (cut short, a bad chunk, the
        // client gone): the request's fault, not the server's.
        let status = if status.is_server_error() {
            StatusCode::BAD_REQUEST
        } else {
            status
        };
        Self::new(
            status,
            format!("malformed multipart body: {}", error.body_text()),
        )
    }
}
