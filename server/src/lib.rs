//! The forkserver server: a single-threaded process that listens on a Unix
//! socket and forks children for its clients.
//!
//! [`serve`] binds the socket, checks the process is single-threaded (the
//! thread guard, see [`ensure_single_threaded`]), and runs an epoll loop until
//! SIGTERM or SIGINT. Clients speak the protocol of
//! [`forkserver_protocol`]; each `Spawn` is validated, forked, set up in the
//! child (signals reset, unrequested fds closed, stdio installed, env and cwd
//! applied) and exec'd, and the outcome is reported to the client: `Spawned`
//! with a pidfd and pipe ends, or `SpawnFailed` with the OS error, then
//! `Exited` when the child is reaped.
//!
//! The server never starts a thread, so it must not run inside a
//! multithreaded program such as a test harness: run it as its own process
//! (`forkserver serve`).
//!
//! ```no_run
//! use forkserver_server::{serve, ServeOptions};
//!
//! let options = ServeOptions::new("/tmp/example.sock".into());
//! serve(&options).expect("forkserver failed");
//! ```
#![deny(missing_docs)]

mod child;
mod children;
mod connection;
mod event_loop;
mod listener;
mod log;
mod signals;
mod spawner;
mod sys;
mod threads;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use forkserver_protocol::Limits;
pub use log::{set_level, Level};
pub use threads::{ensure_single_threaded, MultiThreaded, ThreadInfo};

use crate::log::log;

/// How to run a server.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// Where to listen.
    pub socket: PathBuf,
    /// The limits enforced and announced in `Welcome`.
    pub limits: Limits,
    /// How long a child gets between SIGTERM and SIGKILL when its client
    /// disconnects or the server shuts down.
    pub kill_grace: Duration,
    /// Fork even if the process has other threads. Unsafe for the children
    /// (they may deadlock); off by default.
    pub allow_threads: bool,
}

impl ServeOptions {
    /// Defaults for everything but the socket path.
    pub fn new(socket: PathBuf) -> ServeOptions {
        ServeOptions {
            socket,
            limits: Limits::default(),
            kill_grace: Duration::from_secs(5),
            allow_threads: false,
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServeError {
    /// Another server answers on the socket path.
    AlreadyRunning(PathBuf),
    /// The process has threads, and forking would be unsafe.
    MultiThreaded(MultiThreaded),
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
}

impl ServeError {
    fn io(doing: &'static str, path: &Path, source: io::Error) -> ServeError {
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
            ServeError::Config(message) => f.write_str(message),
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
            ServeError::MultiThreaded(e) => Some(e),
            ServeError::Io { source, .. } | ServeError::Setup(_, source) => Some(source),
            _ => None,
        }
    }
}

/// Binds `options.socket`, logs one line when ready, and serves until SIGTERM
/// or SIGINT. Returns `Ok(())` after a clean shutdown; the socket file is
/// removed.
pub fn serve(options: &ServeOptions) -> Result<(), ServeError> {
    log::init_from_env();
    if options.limits.max_fds_per_message as usize + 3 > child::MAX_MOVES {
        return Err(ServeError::Config(format!(
            "max_fds_per_message must be at most {}",
            child::MAX_MOVES - 3
        )));
    }
    if let Err(e) = ensure_single_threaded() {
        if !options.allow_threads {
            return Err(ServeError::MultiThreaded(e));
        }
        log!(Level::Warn, "--allow-threads: serving anyway although {e}");
    }
    let signals = signals::SignalPipe::install()
        .map_err(|e| ServeError::Setup("installing signal handlers", e))?;
    let listener = listener::Listener::bind(&options.socket)?;
    let mut event_loop = event_loop::EventLoop::new(listener, signals, options)?;
    log!(
        Level::Info,
        "listening on {} (protocol {}, version {})",
        options.socket.display(),
        forkserver_protocol::PROTOCOL_VERSION,
        env!("CARGO_PKG_VERSION")
    );
    event_loop.run()?;
    log!(Level::Info, "stopped");
    Ok(())
}
