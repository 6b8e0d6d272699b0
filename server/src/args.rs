//! The `serve` command line, shared by the stock `forkserver serve` and every
//! zygote built with [`Server::builder`](crate::Server::builder).

use std::path::PathBuf;
use std::time::Duration;

use crate::{Level, ServeOptions, ThreadPolicy};

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
    #[arg(long, conflicts_with = "allow_dormant_threads")]
    pub allow_threads: bool,
    /// Fork even though preloads left threads, as long as each is asleep and
    /// has not run since the preloads ended, or for 2 ms (checked before
    /// every fork; a new thread, or one that keeps running, makes the fork
    /// fail with kind `threads`).
    #[arg(long)]
    pub allow_dormant_threads: bool,
    /// Load a shared library as module NAME at start (repeatable); clients
    /// run its `int SYMBOL(int argc, char **argv)` as worker NAME:SYMBOL.
    #[arg(long = "module", value_name = "NAME=PATH.so", value_parser = parse_module)]
    pub modules: Vec<(String, PathBuf)>,
    /// Also let this user connect (name or uid; repeatable). By default only
    /// the server's own uid and root may. The socket's mode must let them
    /// open it too: see --group.
    #[arg(long = "allow-uid", value_name = "USER", value_parser = parse_uid)]
    pub allow_uids: Vec<u32>,
    /// Also let members of this group connect (name or gid; repeatable).
    #[arg(long = "allow-gid", value_name = "GROUP", value_parser = parse_gid)]
    pub allow_gids: Vec<u32>,
    /// Give the socket to this group with mode 0660 (instead of 0600), so
    /// its members can open it.
    #[arg(long, value_name = "GROUP", value_parser = parse_gid)]
    pub group: Option<u32>,
    /// Keep N idle children forked for WORKER (repeatable): a request for it
    /// is handed to one of them instead of waiting for a fork.
    #[arg(long = "pool", value_name = "WORKER=N", value_parser = parse_pool)]
    pub pools: Vec<(String, u32)>,
    /// Once every module is preloaded and the socket listens, write a line
    /// ("ready ...") to this fd and close it, for supervisors and scripts.
    /// (Under systemd, NOTIFY_SOCKET is used instead, for Type=notify.)
    #[arg(long, value_name = "FD")]
    pub ready_fd: Option<i32>,
    /// Stop (as on SIGTERM) once this fd reports end-of-file: give it the
    /// read end of a pipe whose write end only the starting process holds,
    /// and the server never outlives that process.
    #[arg(long, value_name = "FD")]
    pub lifeline_fd: Option<i32>,
    /// Once started (just before the --ready-fd line), make FD the server's
    /// stderr and close it. A starter can read the start-up output from a
    /// pipe, to quote it if the start fails, while what the server logs
    /// afterwards goes to FD (its own stderr, say) with nothing relaying it.
    #[arg(long, value_name = "FD")]
    pub stderr_after_ready: Option<i32>,
    /// Reload (load the preloads afresh in a new generation) by itself when
    /// a preloaded file changes on disk: a dylib, a Python server's
    /// imported modules. Files are looked at every 2 s; the reload waits
    /// until they have stayed as they are for 1 s. A reload that fails is
    /// not retried until another file changes.
    #[arg(long)]
    pub reload_on_change: bool,
    /// The socket's directory was made for this server alone: remove it,
    /// once empty, when the socket goes (a starter killed before it could
    /// clean up leaves nothing behind in /tmp).
    #[arg(long)]
    pub remove_socket_dir: bool,
    /// Log more: -v logs every spawn and exit (as FORKSERVER_LOG=debug).
    #[arg(short, long, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Log less: -q only warnings and errors, -qq only errors.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub quiet: u8,
    /// Set a limit (repeatable), e.g. --limit max_children_per_connection=64.
    /// The limits and their defaults are listed in protocol/README.md.
    #[arg(long = "limit", value_name = "NAME=VALUE", value_parser = parse_limit)]
    pub limits: Vec<(String, u32)>,
}

fn parse_uid(s: &str) -> Result<u32, String> {
    if let Ok(uid) = s.parse() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(s) {
        Ok(Some(user)) => Ok(user.uid.as_raw()),
        Ok(None) => Err(format!("no user named '{s}'")),
        Err(e) => Err(format!("looking up user '{s}': {e}")),
    }
}

fn parse_gid(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(s) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!("no group named '{s}'")),
        Err(e) => Err(format!("looking up group '{s}': {e}")),
    }
}

fn parse_pool(s: &str) -> Result<(String, u32), String> {
    match s.rsplit_once('=') {
        Some((worker, n)) if !worker.is_empty() => n
            .parse()
            .map(|n| (worker.to_owned(), n))
            .map_err(|_| format!("the pool size must be a whole number, got '{n}'")),
        _ => Err(format!("expected WORKER=N, got '{s}'")),
    }
}

fn parse_limit(s: &str) -> Result<(String, u32), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got '{s}'"))?;
    let value = value
        .parse()
        .map_err(|_| format!("the value of {name} must be a whole number, got '{value}'"))?;
    // Check the name now, so a typo fails at the command line.
    forkserver_protocol::Limits::default().set(name, value)?;
    Ok((name.to_owned(), value))
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
        options.threads = match (self.allow_threads, self.allow_dormant_threads) {
            (true, _) => ThreadPolicy::Allow,
            (false, true) => ThreadPolicy::AllowDormant,
            (false, false) => ThreadPolicy::Refuse,
        };
        options.dylibs = self.modules.clone();
        options.policy.allow_uids = self.allow_uids.clone();
        options.policy.allow_gids = self.allow_gids.clone();
        options.group = self.group;
        options.ready_fd = self.ready_fd;
        options.lifeline_fd = self.lifeline_fd;
        options.stderr_after_ready = self.stderr_after_ready;
        options.remove_socket_dir = self.remove_socket_dir;
        options.pools = self.pools.clone();
        options.reload_on_change = self.reload_on_change;
        // The flags win over FORKSERVER_LOG, which is read otherwise.
        options.log_level = match (self.verbose, self.quiet) {
            (0, 0) => None,
            (_, 0) => Some(Level::Debug),
            (_, 1) => Some(Level::Warn),
            (_, _) => Some(Level::Error),
        };
        for (name, value) in &self.limits {
            options.limits.set(name, *value)?;
        }
        Ok(options)
    }
}
