//! The `Storage` port: image bytes by key.

mod local;
mod memory;
#[cfg(feature = "s3")]
mod s3;

pub use local::LocalStorage;
pub use memory::MemoryStorage;
#[cfg(feature = "s3")]
pub use s3::{S3Config, S3Storage};

use async_trait::async_trait;
use bytes::Bytes;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("no object at key {0:?}")]
    NotFound(String),
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    /// The backend failed; `temporary` says whether trying again may help.
    #[error("storage backend: {message}")]
    Backend { message: String, temporary: bool },
}

impl StorageError {
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
