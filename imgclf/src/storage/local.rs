use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{validate_key, Storage, StorageError};

/// Objects as files under a root directory. Writes go to a temporary file that is flushed to
/// disk and renamed into place, and the directory is flushed too, so a reader never sees half
/// an image and an image whose task was recorded survives a power cut.
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Files under `root`, created if missing. Temporary files that a crash left behind are
    /// removed.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| io_error(&root, e))?;
        let removed = remove_leftovers(&root).map_err(|e| io_error(&root, e))?;
        if removed > 0 {
            tracing::info!(removed, root = %root.display(), "leftover temporary files removed");
        }
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

/// Whether a file name is one of `put`'s temporary files.
fn is_temporary_file(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Removes `put`'s temporary files under `dir`; returns how many.
fn remove_leftovers(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            removed += remove_leftovers(&entry.path())?;
        } else if kind.is_file() && is_temporary_file(&entry.file_name()) {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Writes `bytes` to a temporary file beside `path`, flushes it, renames it into place and
/// flushes the directory: after this returns the image is on disk under its name.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
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
        let target = path.clone();
        tokio::task::spawn_blocking(move || write_durably(&target, &bytes))
            .await
            .map_err(|e| StorageError::temporary(format!("writing the file stopped: {e}")))?
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_s_temporary_files_are_removed_at_start() {
        let root = tempfile::tempdir().unwrap();
        let images = root.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let leftover = images.join(".5f0c8a.tmp");
        let kept = images.join("kept.jpg");
        std::fs::write(&leftover, b"half an image").unwrap();
        std::fs::write(&kept, b"a whole image").unwrap();
        LocalStorage::new(root.path()).unwrap();
        assert!(!leftover.exists(), "the crash's temporary file is gone");
        assert!(kept.exists(), "stored images stay");
    }

    #[tokio::test]
    async fn put_leaves_no_temporary_file() {
        let root = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(root.path()).unwrap();
        storage
            .put("images/a.jpg", Bytes::from_static(b"x"))
            .await
            .unwrap();
        let names: Vec<_> = std::fs::read_dir(root.path().join("images"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.jpg"]);
    }
}
