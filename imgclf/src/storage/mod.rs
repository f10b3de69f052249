//! The `Storage` port: image bytes by key.

mod local;
mod memory;
#[cfg(feature = "s3")]
mod s3;

pub use local::LocalStorage;
pub use memory::MemoryStorage;
#[cfg(feature = "s3")]
pub use s3::S3Storage;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::ConfigError;
use crate::BoxError;

/// The S3 region used when none is set.
pub const DEFAULT_S3_REGION: &str = "us-east-1";

/// Where and how to reach an S3 bucket.
#[derive(Clone)]
pub struct S3Config {
    /// The bucket (for [`from_url`], the one its URL names).
    pub bucket: String,
    /// `http(s)://host:port` of an S3-compatible server; AWS when `None`.
    pub endpoint: Option<String>,
    /// Access key id.
    pub access_key: Option<String>,
    /// Secret access key.
    pub secret_key: Option<String>,
    /// Region.
    pub region: String,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key` (MinIO wants it).
    pub path_style: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            endpoint: None,
            access_key: None,
            secret_key: None,
            region: DEFAULT_S3_REGION.into(),
            path_style: true,
        }
    }
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("access_key", &self.access_key.as_ref().map(|_| "***"))
            .field("secret_key", &self.secret_key.as_ref().map(|_| "***"))
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .finish()
    }
}

/// The storage a URL names: `memory://`, `file:///path` or `s3://bucket` (reached as `s3`
/// says; its `bucket` is the URL's).
pub async fn from_url(url: &str, s3: &S3Config) -> Result<Arc<dyn Storage>, ConfigError> {
    if url.starts_with("memory:") {
        return Ok(Arc::new(MemoryStorage::new()));
    }
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(Arc::new(LocalStorage::new(path)?));
    }
    if let Some(bucket) = url.strip_prefix("s3://") {
        let config = S3Config {
            bucket: bucket.trim_end_matches('/').to_string(),
            ..s3.clone()
        };
        #[cfg(feature = "s3")]
        return Ok(Arc::new(S3Storage::connect(config).await?));
        #[cfg(not(feature = "s3"))]
        return Err(ConfigError::not_compiled("storage", &config.bucket, "s3"));
    }
    Err(ConfigError::unsupported(
        "storage",
        url,
        "use s3://bucket, file:///path or memory://",
    ))
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// Nothing is stored at that key.
    #[error("no object at key {0:?}")]
    NotFound(String),
    /// A key that no backend may use (see [`validate_key`]).
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    /// The backend failed; `temporary` says whether trying again may help.
    #[error("storage backend: {source}")]
    Backend {
        /// What the backend said.
        source: BoxError,
        /// Whether trying again may help.
        temporary: bool,
    },
}

impl StorageError {
    /// A backend failure that may pass (a timeout, a refused connection).
    pub fn temporary(source: impl Into<BoxError>) -> Self {
        Self::Backend {
            source: source.into(),
            temporary: true,
        }
    }

    /// A backend failure that trying again cannot mend (bad credentials, a misconfiguration).
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self::Backend {
            source: source.into(),
            temporary: false,
        }
    }

    /// Whether trying again may help: the one thing retry decisions read.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            Self::Backend {
                temporary: true,
                ..
            }
        )
    }
}

/// Object storage for uploaded images.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Stores `bytes` at `key`, replacing what was there.
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError>;
    /// The bytes at `key`; `NotFound` when there are none.
    async fn get(&self, key: &str) -> Result<Bytes, StorageError>;
    /// Removes `key`; removing a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;
    /// Whether the backend is reachable (for readiness).
    async fn check(&self) -> Result<(), StorageError>;
}

/// Keys are relative paths of safe characters: no `..`, no absolute paths, no surprises on any
/// backend.
pub fn validate_key(key: &str) -> Result<(), StorageError> {
    let ok = !key.is_empty()
        && key.len() <= 512
        && key
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidKey(key.to_string()))
    }
}
