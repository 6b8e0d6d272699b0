//! The `forkserver` command: parses flags, calls the libraries, and turns the
//! outcome into an exit status.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use forkserver::client::{Client, Error as ClientError, ErrorKind};
use forkserver::protocol::default_socket_path;
use forkserver::server::{serve, ServeArgs};

/// Exit status when forkserver itself fails (not the program it runs), as
/// `env` and `nice` use 125.
const FAILURE: u8 = 125;

#[derive(Parser)]
#[command(
    name = "forkserver",
    version,
    about = "A single-threaded forkserver: start it once, then spawn processes through it",
    after_help = "Examples:\n  forkserver serve &\n  forkserver spawn -- echo hello"
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
        after_help = "Examples:\n  forkserver spawn -- echo hello\n  forkserver spawn --env LANG=C --cwd /tmp -- ls -l\n\nExits with the program's exit code, 128+N if signal N killed it, 127 if it\nwas not found, 126 if it could not be executed, 125 if forkserver failed."
    )]
    Spawn(SpawnArgs),
}

#[derive(Args)]
struct SocketArg {
    /// The server's socket [default: $FORKSERVER_SOCKET, else
    /// $XDG_RUNTIME_DIR/forkserver.sock, else /tmp/forkserver-UID/forkserver.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

impl SocketArg {
    fn path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(default_socket_path)
    }
}

#[derive(Args)]
struct SpawnArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Set an environment variable in the child (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(OsString, OsString)>,
    /// The child's working directory (relative paths are relative to the
    /// server's working directory).
    #[arg(long, value_name = "DIR")]
    cwd: Option<PathBuf>,
    /// Run this preloaded worker instead of a program: an embedded worker's
    /// name or MODULE:SYMBOL of a dynamic module. What follows `--` are its
    /// arguments.
    #[arg(long, value_name = "NAME")]
    worker: Option<String>,
    /// Run the child as this user (name or uid), with its primary group and
    /// supplementary groups. Only root may ask.
    #[arg(long, value_name = "USER", value_parser = parse_user)]
    user: Option<UserIds>,
    /// SIGKILL the child if the server dies.
    #[arg(long)]
    die_with_server: bool,
    /// Run the child with no_new_privs: setuid bits and file capabilities
    /// give it nothing.
    #[arg(long)]
    no_new_privs: bool,
    /// The program and its arguments (with --worker: the worker's arguments).
    #[arg(
        last = true,
        required_unless_present = "worker",
        value_name = "PROGRAM ARGS"
    )]
    command: Vec<OsString>,
}

/// A user's uid, primary gid and supplementary groups.
#[derive(Clone, Debug)]
struct UserIds {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

fn parse_user(s: &str) -> Result<UserIds, String> {
    use nix::unistd::{getgrouplist, Uid, User};
    let user = match s.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(s),
    }
    .map_err(|e| format!("looking up user '{s}': {e}"))?
    .ok_or_else(|| format!("no user '{s}'"))?;
    let name = std::ffi::CString::new(user.name.as_str()).map_err(|e| e.to_string())?;
    let groups =
        getgrouplist(&name, user.gid).map_err(|e| format!("listing the groups of '{s}': {e}"))?;
    Ok(UserIds {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups: groups.iter().map(|g| g.as_raw()).collect(),
    })
}

fn parse_env(s: &str) -> Result<(OsString, OsString), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.into(), value.into())),
        _ => Err(format!("expected KEY=VALUE, got '{s}'")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => run_serve(args),
        Command::Spawn(args) => run_spawn(args),
    }
}

fn run_serve(args: ServeArgs) -> ExitCode {
    let options = match args.options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("forkserver: {message}");
            return ExitCode::from(2);
        }
    };
    match serve(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forkserver: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_spawn(args: SpawnArgs) -> ExitCode {
    let path = args.socket.path();
    let result = Client::connect(&path).and_then(|client| {
        let mut command = match &args.worker {
            Some(name) => {
                let mut command = client.worker(name);
                command.args(&args.command);
                command
            }
            None => {
                let (program, rest) = args.command.split_first().expect("clap requires PROGRAM");
                let mut command = client.command(program);
                command.args(rest);
                command
            }
        };
        command.envs(args.env.iter().map(|(k, v)| (k, v)));
        if let Some(cwd) = &args.cwd {
            command.current_dir(cwd);
        }
        if let Some(user) = &args.user {
            command.user(user.uid, user.gid, &user.groups);
        }
        command
            .die_with_server(args.die_with_server)
            .no_new_privs(args.no_new_privs);
        command.status()
    });
    match result {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => ExitCode::from(code as u8),
            (None, Some(signal)) => ExitCode::from(128u8.wrapping_add(signal as u8)),
            (None, None) => ExitCode::from(FAILURE),
        },
        Err(e) => {
            eprintln!("forkserver: {e}");
            ExitCode::from(spawn_failure_status(&e))
        }
    }
}

/// The shell's statuses for a program that could not run: 127 when it was
/// not found (a missing worker too), 126 when it was found but could not be
/// executed.
fn spawn_failure_status(error: &ClientError) -> u8 {
    match error {
        ClientError::SpawnFailed {
            kind: ErrorKind::UnknownWorker,
            ..
        } => 127,
        ClientError::SpawnFailed {
            kind: ErrorKind::Exec,
            errno,
            ..
        } => match *errno {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => 127,
            _ => 126,
        },
        _ => FAILURE,
    }
}
