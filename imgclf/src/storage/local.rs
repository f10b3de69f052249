use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{validate_key, Storage, StorageError};

/// Objects as files under a root directory. Writes go to a temporary file that is renamed into
/// place, so a reader never sees half an image.
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Files under `root`, created if missing.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| io_error(&root, e))?;
        Ok(Self { root })
    }

    /// The directory objects are kept in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
}

fn io_error(path: &Path, error: std::io::Error) -> StorageError {
    let temporary = !matches!(
        error.kind(),
        ErrorKind::PermissionDenied | ErrorKind::InvalidInput
    );
    let source = std::io::Error::new(error.kind(), format!("{}: {error}", path.display()));
    StorageError::Backend {
        source: source.into(),
        temporary,
    }
}

#[async_trait]
impl Storage for LocalStorage {
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let path = self.path(key)?;
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io_error(parent, e))?;
        }
        let tmp = path.with_file_name(format!(".{}.tmp", uuid::Uuid::new_v4()));
        tokio::fs::write(&tmp, &bytes)
            .await
            .map_err(|e| io_error(&tmp, e))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| io_error(&path, e))
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = self.path(key)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(bytes.into()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(StorageError::NotFound(key.into())),
            Err(e) => Err(io_error(&path, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&path, e)),
        }
    }

    async fn check(&self) -> Result<(), StorageError> {
        let meta = tokio::fs::metadata(&self.root)
            .await
            .map_err(|e| io_error(&self.root, e))?;
        if meta.is_dir() {
            Ok(())
        } else {
            Err(StorageError::permanent(format!(
                "{} is not a directory",
                self.root.display()
            )))
        }
    }
}
