//! [`serve_main`]: the one front door of every server process — the stock
//! `forkserver serve`, a zygote's [`ServerBuilder::run`], and
//! `python -m forkserver_rs serve` — so the same bad option or failure ends
//! each of them the same way.

use crate::{ServeArgs, ServerBuilder};

/// The exit statuses of a server process.
pub mod exit {
    /// Served, then stopped cleanly (SIGTERM, SIGINT, or the lifeline).
    pub const SERVED: u8 = 0;
    /// Could not start (a preload failed, the socket is taken, ...) or
    /// stopped on an error.
    pub const FAILED: u8 = 1;
    /// The command line is wrong (as clap and most Unix tools use 2).
    pub const USAGE: u8 = 2;
}

/// Serves `builder`'s modules with the options `args` describe; prints any
/// error to stderr as `forkserver: ...` and returns the process's [`exit`]
/// status.
///
/// ```no_run
/// use forkserver_server::{serve_main, ServeArgs, Server};
/// use clap::Parser;
///
/// #[derive(Parser)]
/// struct Command {
///     #[command(flatten)]
///     serve: ServeArgs,
/// }
///
/// fn main() -> std::process::ExitCode {
///     let command = Command::parse();
///     serve_main(Server::builder(), &command.serve).into()
/// }
/// ```
pub fn serve_main(builder: ServerBuilder, args: &ServeArgs) -> u8 {
    let options = match args.options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("forkserver: {message}");
            return exit::USAGE;
        }
    };
    match builder.serve(&options) {
        Ok(()) => exit::SERVED,
        Err(e) => {
            eprintln!("forkserver: {e}");
            exit::FAILED
        }
    }
}
