//! [`ServeError`]: why a server could not start, or stopped with an error.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::threads::{self, MultiThreaded};

/// Why the server could not start or stopped with an error.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServeError {
    /// Another server answers on the socket path.
    AlreadyRunning(PathBuf),
    /// The process has threads, and forking would be unsafe.
    MultiThreaded(MultiThreaded),
    /// A module's preload (or a dynamic module's load or init) failed.
    Preload {
        /// The module.
        module: String,
        /// What went wrong.
        message: String,
    },
    /// A module's preload left threads running.
    PreloadStartedThreads {
        /// The module.
        module: String,
        /// Every thread of the process after that preload.
        threads: MultiThreaded,
    },
    /// The configuration or the filesystem is not as required.
    Config(String),
    /// A file system operation on a path failed.
    Io {
        /// What we were doing.
        doing: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Setting up the loop (epoll, signals) failed.
    Setup(&'static str, io::Error),
    /// The zygote (the process that runs the preloads) could not start or
    /// preload; the message is its own.
    Zygote(String),
}

impl ServeError {
    pub(crate) fn io(doing: &'static str, path: &Path, source: io::Error) -> ServeError {
        ServeError::Io {
            doing,
            path: path.to_owned(),
            source,
        }
    }
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::AlreadyRunning(path) => write!(
                f,
                "another forkserver is already listening on {}; stop it first or pass another --socket",
                path.display()
            ),
            ServeError::MultiThreaded(e) => write!(
                f,
                "refusing to serve: {e}. Stop whatever started the threads before serving, or pass --allow-threads to fork anyway"
            ),
            ServeError::Preload { module, message } => {
                write!(f, "preloading module '{module}' failed: {message}")
            }
            ServeError::PreloadStartedThreads { module, threads } => write!(
                f,
                "refusing to serve: preloading module '{module}' started threads: {threads}.{} If they sleep until used, --allow-dormant-threads forks while they stay asleep; --allow-threads forks regardless",
                threads::remedies(threads)
            ),
            ServeError::Config(message) | ServeError::Zygote(message) => f.write_str(message),
            ServeError::Io {
                doing,
                path,
                source,
            } => write!(f, "{doing} {}: {source}", path.display()),
            ServeError::Setup(doing, source) => write!(f, "{doing}: {source}"),
        }
    }
}

impl std::error::Error for ServeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServeError::MultiThreaded(e) | ServeError::PreloadStartedThreads { threads: e, .. } => {
                Some(e)
            }
            ServeError::Io { source, .. } | ServeError::Setup(_, source) => Some(source),
            _ => None,
        }
    }
}
