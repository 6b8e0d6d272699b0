//! Stale preloads: the files a generation preloaded (its dylibs, a Python
//! server's imported modules), as they were when it loaded them, and which
//! of them have changed on disk since. Code preloaded in a process cannot
//! change under it: a changed file means the workers run an older version
//! than the disk holds (and a worker that imports a sibling module lazily
//! mixes the two), until a reload loads it.
//!
//! The zygote records each file right after its preloads
//! ([`PreloadedFile::record`]); the front looks at them again every
//! [`INTERVAL`] ([`Watch::check`]): one `stat` a file, nothing read.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How often the front looks at the files.
pub(crate) const INTERVAL: Duration = Duration::from_secs(2);

/// With `--reload-on-change`: how long the files must stay as they are
/// before the reload (an upgrade writes many files, one after another).
pub(crate) const SETTLE: Duration = Duration::from_secs(1);

/// A preloaded file, as it was: a change of any of these (a rewrite, a
/// replacement by rename, as pip does) makes it stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PreloadedFile {
    pub(crate) path: PathBuf,
    identity: Option<(u64, u64, i64, i64, u64)>,
}

impl PreloadedFile {
    /// `path` as it is now.
    pub(crate) fn record(path: &Path) -> PreloadedFile {
        PreloadedFile {
            path: path.to_owned(),
            identity: identity(path),
        }
    }
}

/// Device, inode, modification time (s, ns) and size; None if it is gone.
fn identity(path: &Path) -> Option<(u64, u64, i64, i64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((
        meta.dev(),
        meta.ino(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.size(),
    ))
}

/// A generation's preloaded files, and which have changed since.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    files: Vec<PreloadedFile>,
    changed: BTreeSet<PathBuf>,
    /// When the latest change was seen.
    last_change: Option<Instant>,
    /// How many changed files the latest automatic reload was for.
    reloaded_for: usize,
}

impl Watch {
    pub(crate) fn new(files: Vec<PreloadedFile>) -> Watch {
        Watch {
            files,
            ..Watch::default()
        }
    }

    /// Whether there is anything to look at.
    pub(crate) fn any(&self) -> bool {
        !self.files.is_empty()
    }

    /// Looks at every file again; returns those seen changed for the first
    /// time.
    pub(crate) fn check(&mut self) -> Vec<PathBuf> {
        let mut new = Vec::new();
        for file in &self.files {
            if !self.changed.contains(&file.path) && identity(&file.path) != file.identity {
                new.push(file.path.clone());
            }
        }
        if !new.is_empty() {
            self.changed.extend(new.iter().cloned());
            self.last_change = Some(Instant::now());
        }
        new
    }

    /// The files changed since the generation preloaded them, in order.
    pub(crate) fn changed(&self) -> impl Iterator<Item = &Path> {
        self.changed.iter().map(PathBuf::as_path)
    }

    pub(crate) fn changed_count(&self) -> usize {
        self.changed.len()
    }

    /// For `--reload-on-change`: whether to reload now — files changed and
    /// then stayed as they are for [`SETTLE`], and more of them than the
    /// last automatic reload was for (one that failed is not retried until
    /// something changes again). Counts the reload as made.
    pub(crate) fn take_reload(&mut self) -> bool {
        let settled = self.last_change.is_some_and(|at| at.elapsed() >= SETTLE);
        if settled && self.changed.len() > self.reloaded_for {
            self.reloaded_for = self.changed.len();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_replaced_or_removed_file_is_changed_and_said_once() {
        let dir = std::env::temp_dir().join(format!("forkserver-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths: Vec<PathBuf> = ["a.py", "b.py", "c.py", "same.py"]
            .iter()
            .map(|name| dir.join(name))
            .collect();
        for path in &paths {
            std::fs::write(path, "x = 1\n").unwrap();
        }
        let mut watch = Watch::new(paths.iter().map(|p| PreloadedFile::record(p)).collect());
        assert!(watch.check().is_empty());
        // Rewritten with another size; replaced by rename (a new inode, as
        // pip installs); removed.
        std::fs::write(&paths[0], "x = 22\n").unwrap();
        let fresh = dir.join("fresh");
        std::fs::write(&fresh, "x = 1\n").unwrap();
        std::fs::rename(&fresh, &paths[1]).unwrap();
        std::fs::remove_file(&paths[2]).unwrap();
        assert_eq!(watch.check(), paths[..3].to_vec());
        assert!(watch.check().is_empty(), "each change is said once");
        assert_eq!(watch.changed().count(), 3);
        assert!(!watch.take_reload(), "not settled yet");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
