//! Which files a run classifies, in a deterministic order.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// One file to classify, or a path that could not even be listed.
#[derive(Debug)]
pub struct Input {
    /// As named on the command line or found under a folder named there.
    pub path: PathBuf,
    /// Why it cannot be read, when that is known already.
    pub problem: Option<String>,
}

/// What the walk found.
#[derive(Debug, Default)]
pub struct Walked {
    /// The files, in command-line order, each folder's entries sorted by name.
    pub inputs: Vec<Input>,
    /// Files in folders not named like images (and not regular files).
    pub skipped: usize,
    /// Paths to a file already taken under another path (links, a folder named twice).
    pub duplicates: usize,
}

/// Extensions of the formats the service reads.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

fn named_like_an_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|i| e.eq_ignore_ascii_case(i)))
}

/// Expands `paths`: a file is taken whatever its name (it was asked for), a folder is walked
/// depth-first in name order, skipping hidden entries and, unless `all_files`, files not named
/// like images. Nothing here fails: what cannot be read becomes an input with its problem, so
/// it is reported with the rest.
pub fn collect(paths: &[PathBuf], all_files: bool) -> Walked {
    let mut walk = Walk {
        all_files,
        walked: Walked::default(),
        files: HashSet::new(),
        folders: HashSet::new(),
    };
    for path in paths {
        match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => walk.folder(path),
            Ok(_) => walk.push(path.clone(), None),
            Err(error) => walk.push(path.clone(), Some(unreadable(path, &error))),
        }
    }
    walk.walked
}

struct Walk {
    all_files: bool,
    walked: Walked,
    /// Files already taken, by canonical path: one named twice is classified once.
    files: HashSet<PathBuf>,
    /// Folders already walked, by canonical path: symbolic links cannot make a loop.
    folders: HashSet<PathBuf>,
}

impl Walk {
    fn push(&mut self, path: PathBuf, problem: Option<String>) {
        let identity = fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if self.files.insert(identity) {
            self.walked.inputs.push(Input { path, problem });
        } else {
            self.walked.duplicates += 1;
        }
    }

    fn folder(&mut self, dir: &Path) {
        let identity = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        if !self.folders.insert(identity) {
            return;
        }
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) => {
                let problem = format!("cannot list the folder: {error}");
                return self.push(dir.to_path_buf(), Some(problem));
            }
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            if entry.file_name().as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let path = entry.path();
            let wanted = self.all_files || named_like_an_image(&path);
            // Follows symbolic links: a linked folder is walked, a linked file read.
            match fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => self.folder(&path),
                Ok(meta) if meta.is_file() && wanted => self.push(path, None),
                Ok(_) => self.walked.skipped += 1,
                Err(error) if wanted => {
                    let problem = unreadable(&path, &error);
                    self.push(path, Some(problem));
                }
                Err(_) => self.walked.skipped += 1,
            }
        }
    }
}

fn unreadable(path: &Path, error: &std::io::Error) -> String {
    let dangling = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if dangling {
        format!("cannot read: a symbolic link to nothing readable ({error})")
    } else {
        format!("cannot read: {error}")
    }
}
