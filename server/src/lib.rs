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
//! `Exited` when the child is reaped. ARCHITECTURE.md at the repository's
//! root walks one spawn through the modules.
//!
//! [`serve_main`] is the whole `main` of a server process: options from
//! [`ServeArgs`], then serve, then an [`exit`] status.
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
#![deny(unsafe_op_in_unsafe_fn)]

mod args;
mod builder;
mod connection;
mod dylib;
mod entry;
mod error;
mod event_loop;
mod handover;
mod huge;
mod launch;
mod ledger;
mod listener;
mod log;
mod modules;
mod options;
mod peer;
mod pool;
mod readiness;
mod reply_size;
mod signals;
mod sys;
mod threads;
mod watch;
mod worker;

pub use args::ServeArgs;
pub use builder::{Server, ServerBuilder};
pub use entry::{exit, serve_main};
pub use error::ServeError;
pub use forkserver_protocol::Limits;
pub use huge::HugePages;
pub use log::{set_level, Level};
pub use options::ServeOptions;
pub use peer::PeerPolicy;
pub use threads::{
    ensure_single_threaded, ensure_single_threaded_after_fork_handlers, MultiThreaded, ThreadInfo,
    ThreadPolicy,
};
pub use worker::{PayloadError, WorkerContext};

/// The stock server: no embedded modules (dynamic ones from
/// `options.dylibs`). Binds `options.socket`, logs one line when ready, and
/// serves until SIGTERM or SIGINT. Returns `Ok(())` after a clean shutdown;
/// the socket file is removed.
pub fn serve(options: &ServeOptions) -> Result<(), ServeError> {
    Server::builder().serve(options)
}
