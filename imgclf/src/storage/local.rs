use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{validate_key, Storage, StorageError};

/// Objects as files under a root directory. Writes go to a temporary file that is flushed to
/// disk and renamed into place, and the directory is flushed too, so a reader never sees half
/// an image and an image whose task was recorded survives a power cut. Concurrent writes into
/// one directory share its flushes: one flush started after a rename covers it.
pub struct LocalStorage {
    root: PathBuf,
    dir_flushes: Arc<DirFlushes>,
}

impl LocalStorage {
    /// Files under `root`, created if missing. Temporary files that a crash left behind are
    /// removed.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| io_error(&root, e))?;
        let removed = remove_leftovers(&root).map_err(|e| io_error(&root, e))?;
        // A directory that cannot take a file fails here, at start, not at each upload. The
        // probe is named as `put`'s temporary files are, so a crash leaves nothing for good.
        // Named for this start alone: processes sharing the directory may start together.
        let probe = root.join(format!(".probe-{}.tmp", uuid::Uuid::new_v4().simple()));
        std::fs::write(&probe, b"")
            .and_then(|()| match std::fs::remove_file(&probe) {
                // Another process's start took it as a crash's leftover.
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                removed => removed,
            })
            .map_err(|e| io_error(&root, e))?;
        if removed > 0 {
            tracing::info!(removed, root = %root.display(), "leftover temporary files removed");
        }
        Ok(Self {
            root,
            dir_flushes: Arc::default(),
        })
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
fn write_durably(path: &Path, bytes: &[u8], dir_flushes: &DirFlushes) -> std::io::Result<()> {
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
    dir_flushes.flush(dir, |dir| std::fs::File::open(dir)?.sync_all())
}

/// Directory flushes shared between the writes that need one at the same time, as a
/// database's group commit shares log flushes: a flush that starts after a file was renamed
/// into the directory makes that rename durable, so the renames that land while one flush runs
/// all wait for the next, and a burst of uploads costs about one directory flush per file
/// flush rather than one each.
#[derive(Default)]
struct DirFlushes {
    dirs: Mutex<HashMap<PathBuf, DirFlush>>,
    done: Condvar,
}

/// One directory's renames, numbered in the order they asked for a flush.
#[derive(Default)]
struct DirFlush {
    /// The last number handed out.
    asked: u64,
    /// Renames up to this number are durable.
    flushed: u64,
    /// Renames up to this number were covered by a flush that failed, and its error.
    failed: Option<(u64, ErrorKind, String)>,
    /// Whether a flush is running now.
    running: bool,
    /// Callers inside `flush`: the entry goes when none is left.
    waiting: usize,
}

impl DirFlushes {
    /// Returns once a `sync` of `dir` that started after this call has succeeded (run by this
    /// caller or another), or with the error of one that failed.
    fn flush(
        &self,
        dir: &Path,
        sync: impl Fn(&Path) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        let state = dirs.entry(dir.to_path_buf()).or_default();
        state.asked += 1;
        state.waiting += 1;
        let mine = state.asked;
        let outcome = loop {
            let state = dirs.get_mut(dir).expect("held while waiting");
            // A failure is answered before a success that came later: after a failed flush the
            // kernel may report the next one as clean although the data is gone.
            if let Some((through, kind, message)) = &state.failed {
                if mine <= *through {
                    break Err(std::io::Error::new(*kind, message.clone()));
                }
            }
            if mine <= state.flushed {
                break Ok(());
            }
            if state.running {
                dirs = self.done.wait(dirs).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            state.running = true;
            let covers = state.asked;
            drop(dirs);
            let synced = sync(dir);
            dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
            let state = dirs.get_mut(dir).expect("held while waiting");
            state.running = false;
            match &synced {
                Ok(()) => state.flushed = covers,
                Err(e) => state.failed = Some((covers, e.kind(), e.to_string())),
            }
            self.done.notify_all();
            break synced;
        };
        let state = dirs.get_mut(dir).expect("held while waiting");
        state.waiting -= 1;
        if state.waiting == 0 {
            dirs.remove(dir);
        }
        outcome
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
        let target = path.clone();
        let dir_flushes = self.dir_flushes.clone();
        tokio::task::spawn_blocking(move || write_durably(&target, &bytes, &dir_flushes))
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
    fn a_directory_that_takes_no_file_fails_at_start() {
        // sysfs: a directory even root cannot create a file in.
        let read_only = Path::new("/sys/kernel/mm");
        if read_only.is_dir() {
            let refused = LocalStorage::new(read_only).err().map(|e| e.to_string());
            assert!(refused.is_some_and(|e| e.contains("/sys/kernel/mm")));
        }
    }

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

    /// Runs `flush` from `callers` threads released at once, each with `sync`; returns each
    /// caller's outcome with when it called and returned.
    fn flush_at_once(
        flushes: &DirFlushes,
        callers: usize,
        sync: impl Fn(&Path) -> std::io::Result<()> + Sync,
    ) -> Vec<(std::io::Result<()>, std::time::Instant, std::time::Instant)> {
        let dir = Path::new("images");
        let start = std::sync::Barrier::new(callers);
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..callers)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        let called = std::time::Instant::now();
                        let outcome = flushes.flush(dir, &sync);
                        (outcome, called, std::time::Instant::now())
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        })
    }

    #[test]
    fn concurrent_renames_share_directory_flushes() {
        let syncs = Mutex::new(Vec::new());
        let callers = flush_at_once(&DirFlushes::default(), 8, |_| {
            let started = std::time::Instant::now();
            std::thread::sleep(std::time::Duration::from_millis(50));
            syncs
                .lock()
                .unwrap()
                .push((started, std::time::Instant::now()));
            Ok(())
        });
        let syncs = syncs.into_inner().unwrap();
        assert!(syncs.len() < 8, "{} flushes for 8 renames", syncs.len());
        for (outcome, called, returned) in callers {
            outcome.unwrap();
            assert!(
                syncs
                    .iter()
                    .any(|&(started, ended)| started >= called && ended <= returned),
                "each caller returns after a whole flush that started after it called"
            );
        }
    }

    #[test]
    fn a_failed_directory_flush_fails_each_rename_it_covered() {
        let syncs = std::sync::atomic::AtomicUsize::new(0);
        let flushes = DirFlushes::default();
        let callers = flush_at_once(&flushes, 8, |_| {
            syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(50));
            Err(std::io::Error::new(ErrorKind::StorageFull, "no space"))
        });
        assert!(
            syncs.into_inner() < 8,
            "the failing flushes were shared too"
        );
        for (outcome, _, _) in callers {
            let error = outcome.unwrap_err();
            assert_eq!(error.kind(), ErrorKind::StorageFull);
            assert!(error.to_string().contains("no space"), "{error}");
        }
        // The failure stays with the renames it covered: later ones flush again.
        let later = flush_at_once(&flushes, 2, |_| Ok(()));
        assert!(later.into_iter().all(|(outcome, _, _)| outcome.is_ok()));
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
