//! The forkserver server: a single-threaded process that preloads modules,
//! listens on a Unix socket and forks children for its clients.
//!
//! [`Server::builder`] builds a zygote: preloads that run once, before any
//! thread exists, and workers that run in forked children and see what the
//! preloads built, shared copy-on-write:
//!
//! ```no_run
//! use forkserver_server::Server;
//!
//! fn main() -> std::process::ExitCode {
//!     Server::builder()
//!         .preload("squares", || (0..1_000_000u64).map(|i| i * i).collect::<Vec<u64>>())
//!         .worker("square", |ctx| {
//!             let squares: &Vec<u64> = ctx.preloaded("squares");
//!             let n: usize = ctx.args()[0].parse().unwrap();
//!             println!("{}", squares[n]);
//!             0
//!         })
//!         .run() // parses the same flags as `forkserver serve`
//! }
//! ```
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
//! Without modules, [`serve`] is the stock server (what `forkserver serve`
//! runs):
//!
//! ```no_run
//! use forkserver_server::{serve, ServeOptions};
//!
//! let options = ServeOptions::new("/tmp/example.sock".into());
//! serve(&options).expect("forkserver failed");
//! ```
#![deny(missing_docs)]

mod args;
mod builder;
mod child;
mod children;
mod connection;
mod dylib;
mod event_loop;
mod huge;
mod listener;
mod log;
mod modules;
mod peer;
mod pool;
mod readiness;
mod signals;
mod spawner;
mod sys;
mod threads;
mod worker;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use args::ServeArgs;
pub use builder::{Server, ServerBuilder};
pub use forkserver_protocol::Limits;
pub use huge::HugePages;
pub use log::{set_level, Level};
pub use peer::PeerPolicy;
pub use threads::{
    ensure_single_threaded, ensure_single_threaded_after_fork_handlers, MultiThreaded, ThreadInfo,
    ThreadPolicy,
};
pub use worker::{PayloadError, WorkerContext};

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
    /// What the thread guard tolerates besides the server's own thread.
    pub threads: ThreadPolicy,
    /// Dynamic modules to load at start: `(name, path to a shared library)`.
    pub dylibs: Vec<(String, PathBuf)>,
    /// Who may connect besides the server's uid and root.
    pub policy: PeerPolicy,
    /// Give the socket to this group, mode 0660 (else mode 0600).
    pub group: Option<u32>,
    /// Write a line to this fd (then close it) once ready.
    pub ready_fd: Option<i32>,
    /// Stop once this fd (a pipe's read end) reports end-of-file.
    pub lifeline_fd: Option<i32>,
    /// How much to log; `FORKSERVER_LOG` (default info) if None.
    pub log_level: Option<Level>,
    /// Prefork pools: `(worker, number of idle children to keep)`.
    pub pools: Vec<(String, u32)>,
}

impl ServeOptions {
    /// Defaults for everything but the socket path.
    pub fn new(socket: PathBuf) -> ServeOptions {
        ServeOptions {
            socket,
            limits: Limits::default(),
            kill_grace: Duration::from_secs(5),
            threads: ThreadPolicy::Refuse,
            dylibs: Vec::new(),
            policy: PeerPolicy::default(),
            group: None,
            ready_fd: None,
            lifeline_fd: None,
            log_level: None,
            pools: Vec::new(),
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
            ServeError::Preload { module, message } => {
                write!(f, "preloading module '{module}' failed: {message}")
            }
            ServeError::PreloadStartedThreads { module, threads } => write!(
                f,
                "refusing to serve: preloading module '{module}' started threads: {threads}.{} If they sleep until used, --allow-dormant-threads forks while they stay asleep; --allow-threads forks regardless",
                modules::remedies(threads)
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
            ServeError::MultiThreaded(e) | ServeError::PreloadStartedThreads { threads: e, .. } => {
                Some(e)
            }
            ServeError::Io { source, .. } | ServeError::Setup(_, source) => Some(source),
            _ => None,
        }
    }
}

/// The stock server: no embedded modules (dynamic ones from
/// `options.dylibs`). Binds `options.socket`, logs one line when ready, and
/// serves until SIGTERM or SIGINT. Returns `Ok(())` after a clean shutdown;
/// the socket file is removed.
pub fn serve(options: &ServeOptions) -> Result<(), ServeError> {
    Server::builder().serve(options)
}
