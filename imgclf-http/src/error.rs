//! Every error becomes an HTTP status here, in one place, as `{"detail": "..."}`.

use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use imgclf::{ClassifyError, ClassifyNowError, ImageError, SubmitError};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
        }
    }

    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }

    /// A backend failed: the details go to the log, the client gets a 503 it may retry.
    pub fn unavailable(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "backend unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the service is temporarily unavailable",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"detail": self.detail}))).into_response()
    }
}

impl From<ImageError> for ApiError {
    fn from(error: ImageError) -> Self {
        let status = match error {
            ImageError::UnsupportedFormat => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ImageError::Empty | ImageError::Undecodable(_) | ImageError::TooManyPixels { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
        };
        Self::new(status, error.to_string())
    }
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> Self {
        match error {
            SubmitError::Image(e) => e.into(),
            SubmitError::Callback(e) => Self::unprocessable(e.to_string()),
            SubmitError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the service cannot accept tasks right now",
            ),
        }
    }
}

impl From<ClassifyNowError> for ApiError {
    fn from(error: ClassifyNowError) -> Self {
        match error {
            ClassifyNowError::Image(e) => e.into(),
            ClassifyNowError::Classify(e) => match e.as_ref() {
                ClassifyError::Stopped => Self::unavailable(&e),
                _ => {
                    tracing::error!(error = %e, "classification failed");
                    Self::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "the image could not be classified",
                    )
                }
            },
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
        let detail = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than the upload limit".to_string()
        } else {
            format!("malformed multipart body: {}", error.body_text())
        };
        Self::new(status, detail)
    }
}
