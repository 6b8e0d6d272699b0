//! The `forkserver` command: parses flags, calls the libraries, and turns the
//! outcome into an exit status.

mod inspect;
mod spawn;
mod tty;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use forkserver::client::{Client, Error};
use forkserver::protocol::default_socket_path;
use forkserver::server::{serve_main, ServeArgs, Server};

/// Exit status when forkserver itself fails (not the program it runs), as
/// `env` and `nice` use 125.
const FAILURE: u8 = 125;

#[derive(Parser)]
#[command(
    name = "forkserver",
    version,
    about = "A single-threaded forkserver: start it once, then spawn processes through it",
    after_help = "Examples:\n  forkserver serve &\n  forkserver spawn -- echo hello\n  forkserver status"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Preload modules, listen on a Unix socket and spawn processes for
    /// clients until SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Run a program as a child of the server, with this terminal's stdin,
    /// stdout and stderr, and exit with its status.
    #[command(
        after_help = "Examples:\n  forkserver spawn -- echo hello\n  forkserver spawn --env LANG=C --cwd /tmp -- ls -l\n  forkserver spawn --timeout 10 -- make test\n  forkserver spawn --worker demo:hello -- world\n\nSignals sent to this command (INT, TERM, HUP, QUIT, USR1, USR2, WINCH) are\nforwarded to the child. Exits with the program's exit code, 128+N if signal N\nkilled it, 124 if --timeout killed it, 127 if it was not found, 126 if it\ncould not be executed, 125 if forkserver failed."
    )]
    Spawn(spawn::SpawnArgs),
    /// Show the server's pid, version, uptime, socket, modules, children,
    /// spawns, failures and memory.
    #[command(
        after_help = "Examples:\n  forkserver status\n  forkserver status --json | jq .children"
    )]
    Status(inspect::StatusArgs),
    /// List the server's live children (all of them for root and the
    /// server's user; your own otherwise).
    #[command(after_help = "Examples:\n  forkserver ps\n  forkserver ps --json")]
    Ps(inspect::PsArgs),
    /// Send a signal to one of the server's children, or to all you may
    /// touch (your own; all of them for root and the server's user).
    #[command(
        after_help = "Examples:\n  forkserver kill 12345\n  forkserver kill -s HUP 12345\n  forkserver kill --all -s KILL"
    )]
    Kill(inspect::KillArgs),
    /// Load the server's preloads afresh from what is on disk now (a new
    /// generation), without losing a child or a connection; waits until the
    /// new generation serves. With --exec, upgrade the server in place: it
    /// runs its binary again (the file on disk now), same pid, keeping every
    /// connection and child. Root and the server's user only.
    #[command(
        after_help = "Examples:\n  forkserver reload\n  forkserver reload --exec      (after installing a new forkserver)\n  systemctl reload forkserver   (ExecReload=forkserver reload)\n\nExits 0 once the new generation (or image) serves, 1 if it failed (the old\none serves on; the reason is printed), 125 if the server could not be reached."
    )]
    Reload(inspect::ReloadArgs),
}

/// The --socket flag of the client commands.
#[derive(Args)]
pub(crate) struct SocketArg {
    /// The server's socket [default: $FORKSERVER_SOCKET, else
    /// $XDG_RUNTIME_DIR/forkserver.sock, else /tmp/forkserver-UID/forkserver.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

/// How long the client commands wait for a server that is starting (its
/// socket not there yet, or not listening yet): `forkserver serve &` then a
/// client command at once is a race a user should not see.
const CONNECT_WAIT: Duration = Duration::from_secs(3);

impl SocketArg {
    pub(crate) fn path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(default_socket_path)
    }

    /// Connects, waiting up to [`CONNECT_WAIT`] for a server that is
    /// starting.
    pub(crate) fn connect(&self) -> Result<Client, Error> {
        let path = self.path();
        let deadline = Instant::now() + CONNECT_WAIT;
        loop {
            match Client::connect(&path) {
                Err(Error::Connect { source, .. })
                    if matches!(
                        source.raw_os_error(),
                        Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve_main(Server::builder(), &args).into(),
        Command::Spawn(args) => spawn::run(args),
        Command::Status(args) => inspect::status(args),
        Command::Ps(args) => inspect::ps(args),
        Command::Kill(args) => inspect::kill(args),
        Command::Reload(args) => inspect::reload(args),
    }
}

/// Reports a client error and picks the exit status.
pub(crate) fn failed(error: &Error) -> ExitCode {
    eprintln!("forkserver: {error}");
    ExitCode::from(FAILURE)
}
