//! The `serve` command line, shared by the stock `forkserver serve` and every
//! zygote built with [`Server::builder`](crate::Server::builder).

use std::path::PathBuf;
use std::time::Duration;

use crate::ServeOptions;

/// The flags of `forkserver serve`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  forkserver serve --socket /tmp/fs.sock &\n  forkserver serve --module demo=./libdemo.so"
)]
pub struct ServeArgs {
    /// Where to listen [default: $FORKSERVER_SOCKET, else
    /// $XDG_RUNTIME_DIR/forkserver.sock, else /tmp/forkserver-UID/forkserver.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Seconds a child gets between SIGTERM and SIGKILL when its client
    /// disconnects or the server stops.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub kill_grace: f64,
    /// Fork even if this process has other threads (their locks would be
    /// copied mid-use and children could deadlock).
    #[arg(long)]
    pub allow_threads: bool,
    /// Load a shared library as module NAME at start (repeatable); clients
    /// run its `int SYMBOL(int argc, char **argv)` as worker NAME:SYMBOL.
    #[arg(long = "module", value_name = "NAME=PATH.so", value_parser = parse_module)]
    pub modules: Vec<(String, PathBuf)>,
}

fn parse_module(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() && !name.contains(':') => {
            Ok((name.to_owned(), path.into()))
        }
        _ => Err(format!(
            "expected NAME=PATH.so with a NAME without ':', got '{s}'"
        )),
    }
}

impl ServeArgs {
    /// The options these flags describe; the message says what is wrong.
    pub fn options(&self) -> Result<ServeOptions, String> {
        if !(self.kill_grace.is_finite() && self.kill_grace >= 0.0) {
            return Err("--kill-grace must be a non-negative number of seconds".into());
        }
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(forkserver_protocol::default_socket_path);
        let mut options = ServeOptions::new(socket);
        options.kill_grace = Duration::from_secs_f64(self.kill_grace);
        options.allow_threads = self.allow_threads;
        options.dylibs = self.modules.clone();
        Ok(options)
    }
}
