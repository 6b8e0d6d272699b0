//! [`Command`]: a `std::process::Command` whose process the server starts.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{ExitStatus, Output};
use std::sync::Arc;

use forkserver_protocol::{
    ClientMessage, FdMapping, OnDisconnect, RunAs, ServerMessage, Spawn, StdioSpec, Target, WireStr,
};

use crate::child::Child;
use crate::connection::Connection;
use crate::Error;

/// Where a child's standard stream comes from, as in `std::process::Stdio`.
#[derive(Debug)]
pub struct Stdio(StdioKind);

#[derive(Debug)]
enum StdioKind {
    Inherit,
    Null,
    Piped,
    Fd(OwnedFd),
}

// Defaults for streams a command leaves unset.
static INHERIT: StdioKind = StdioKind::Inherit;
static NULL: StdioKind = StdioKind::Null;
static PIPED: StdioKind = StdioKind::Piped;

impl Stdio {
    /// The calling process's own stream (its fd 0, 1 or 2 is passed to the
    /// server and installed in the child).
    pub fn inherit() -> Stdio {
        Stdio(StdioKind::Inherit)
    }

    /// `/dev/null`.
    pub fn null() -> Stdio {
        Stdio(StdioKind::Null)
    }

    /// A new pipe; the other end is in [`Child::stdin`] / `stdout` / `stderr`.
    pub fn piped() -> Stdio {
        Stdio(StdioKind::Piped)
    }
}

impl From<OwnedFd> for Stdio {
    fn from(fd: OwnedFd) -> Stdio {
        Stdio(StdioKind::Fd(fd))
    }
}

impl From<File> for Stdio {
    fn from(file: File) -> Stdio {
        Stdio(StdioKind::Fd(file.into()))
    }
}

macro_rules! stdio_from_child_pipe {
    ($($t:ty)*) => ($(impl From<$t> for Stdio {
        /// Connects this end of another child's pipe.
        fn from(pipe: $t) -> Stdio {
            Stdio(StdioKind::Fd(pipe.into()))
        }
    })*)
}

stdio_from_child_pipe! { std::process::ChildStdin std::process::ChildStdout std::process::ChildStderr }

/// A process to start through a forkserver, built like
/// `std::process::Command`. Made by [`Client::command`](crate::Client::command).
///
/// By default the child inherits this process's stdin, stdout and stderr,
/// the server's environment and working directory, starts in a new session,
/// and is killed if this connection closes first.
#[derive(Debug)]
pub struct Command {
    connection: Arc<Connection>,
    /// The request as built so far; its id, stdio and fd mappings are
    /// filled in at spawn time, when the fds are at hand.
    request: Spawn,
    stdin: Option<Stdio>,
    stdout: Option<Stdio>,
    stderr: Option<Stdio>,
    fds: Vec<(i32, OwnedFd)>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.info)
            .finish_non_exhaustive()
    }
}

impl Command {
    pub(crate) fn new(connection: Arc<Connection>, program: &OsStr) -> Command {
        Command::with(connection, Spawn::exec(0, program, Vec::new()))
    }

    pub(crate) fn new_worker(connection: Arc<Connection>, name: &str) -> Command {
        let mut request = Spawn::exec(0, "", Vec::new());
        request.target = Target::Worker {
            name: name.to_owned(),
            args: Vec::new(),
            payload: None,
        };
        Command::with(connection, request)
    }

    fn with(connection: Arc<Connection>, request: Spawn) -> Command {
        Command {
            connection,
            request,
            stdin: None,
            stdout: None,
            stderr: None,
            fds: Vec::new(),
        }
    }

    fn args_mut(&mut self) -> &mut Vec<WireStr> {
        match &mut self.request.target {
            Target::Exec { args, .. } | Target::Worker { args, .. } => args,
        }
    }

    /// Adds an argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Command {
        self.args_mut().push(arg.as_ref().into());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args_mut()
            .extend(args.into_iter().map(|a| a.as_ref().into()));
        self
    }

    /// Sets argv\[0\] (the program name the child sees); the program itself by
    /// default. Ignored for workers.
    pub fn arg0(&mut self, name: impl AsRef<OsStr>) -> &mut Command {
        if let Target::Exec { arg0, .. } = &mut self.request.target {
            *arg0 = Some(name.as_ref().into());
        }
        self
    }

    /// Gives a worker `value`, encoded as MessagePack (structs as maps with
    /// named fields); the worker decodes it with `ctx.payload::<T>()`. Fails
    /// if `value` cannot be encoded, or if this command runs a program rather
    /// than a worker.
    pub fn payload<T: serde::Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<&mut Command, Error> {
        let Target::Worker { payload, .. } = &mut self.request.target else {
            return Err(Error::Protocol(
                "a payload is for workers; a program gets args and env".into(),
            ));
        };
        let bytes = rmp_serde::to_vec_named(value)
            .map_err(|e| Error::Protocol(format!("cannot encode the payload: {e}")))?;
        let value = rmpv::decode::read_value(&mut bytes.as_slice())
            .map_err(|e| Error::Protocol(format!("cannot encode the payload: {e}")))?;
        *payload = Some(value);
        Ok(self)
    }

    /// Sets an environment variable in the child.
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Command {
        self.request
            .env
            .insert(key.as_ref().into(), Some(value.as_ref().into()));
        self
    }

    /// Sets several environment variables.
    pub fn envs<I, K, V>(&mut self, vars: I) -> &mut Command
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self.env(k, v);
        }
        self
    }

    /// Removes a variable from the child's environment.
    pub fn env_remove(&mut self, key: impl AsRef<OsStr>) -> &mut Command {
        self.request.env.insert(key.as_ref().into(), None);
        self
    }

    /// Starts the child with an empty environment (plus what `env` sets
    /// afterwards). Like std, this also forgets earlier `env` calls.
    pub fn env_clear(&mut self) -> &mut Command {
        self.request.env_clear = true;
        self.request.env.clear();
        self
    }

    /// Sets the child's working directory. A relative path is relative to
    /// the server's working directory, not this process's.
    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Command {
        self.request.cwd = Some(dir.as_ref().as_os_str().into());
        self
    }

    /// The child's stdin.
    pub fn stdin(&mut self, stdio: impl Into<Stdio>) -> &mut Command {
        self.stdin = Some(stdio.into());
        self
    }

    /// The child's stdout.
    pub fn stdout(&mut self, stdio: impl Into<Stdio>) -> &mut Command {
        self.stdout = Some(stdio.into());
        self
    }

    /// The child's stderr.
    pub fn stderr(&mut self, stdio: impl Into<Stdio>) -> &mut Command {
        self.stderr = Some(stdio.into());
        self
    }

    /// Installs `fd` as fd number `target` (at least 3) in the child.
    pub fn fd(&mut self, target: i32, fd: impl Into<OwnedFd>) -> &mut Command {
        self.fds.push((target, fd.into()));
        self
    }

    /// Whether the child starts in a new session (`setsid`); true by default.
    pub fn new_session(&mut self, on: bool) -> &mut Command {
        self.request.new_session = on;
        self
    }

    /// Whether the child keeps running when this connection closes (it is
    /// killed by default).
    pub fn detach(&mut self, on: bool) -> &mut Command {
        self.request.on_disconnect = if on {
            OnDisconnect::Detach
        } else {
            OnDisconnect::Kill
        };
        self
    }

    /// Whether the child is SIGKILLed if the server dies
    /// (`PR_SET_PDEATHSIG`); off by default.
    pub fn die_with_server(&mut self, on: bool) -> &mut Command {
        self.request.die_with_server = on;
        self
    }

    /// Whether the child runs with `PR_SET_NO_NEW_PRIVS`: no exec can grant
    /// it privileges (setuid bits, file capabilities). Off by default.
    pub fn no_new_privs(&mut self, on: bool) -> &mut Command {
        self.request.no_new_privs = on;
        self
    }

    /// Runs the child as another user. The server refuses unless this
    /// client is root (a root server runs everyone else's children as
    /// themselves).
    pub fn user(&mut self, uid: u32, gid: u32, groups: &[u32]) -> &mut Command {
        self.request.user = Some(RunAs {
            uid,
            gid,
            groups: groups.to_vec(),
        });
        self
    }

    /// Starts the child and returns once it runs (for a program: once
    /// `execve` succeeded). Stdio not set is inherited.
    pub fn spawn(&mut self) -> Result<Child, Error> {
        self.spawn_with_defaults(&INHERIT, &INHERIT)
    }

    /// Runs the child to completion and returns its exit status. Stdio not
    /// set is inherited.
    pub fn status(&mut self) -> Result<ExitStatus, Error> {
        self.spawn()?.wait()
    }

    /// Runs the child to completion, collecting its stdout and stderr. Unless
    /// set, stdin is `/dev/null` and stdout and stderr are piped.
    pub fn output(&mut self) -> Result<Output, Error> {
        self.spawn_with_defaults(&NULL, &PIPED)?.wait_with_output()
    }

    fn spawn_with_defaults(
        &mut self,
        stdin: &'static StdioKind,
        out: &'static StdioKind,
    ) -> Result<Child, Error> {
        let (mut request, fds) = self.request(stdin, out);
        let id = self.connection.next_id();
        request.id = id;
        self.connection.send(&ClientMessage::Spawn(request), &fds)?;
        let reply = self
            .connection
            .take(id, true, |m| {
                matches!(
                    m,
                    ServerMessage::Spawned { .. }
                        | ServerMessage::SpawnFailed { .. }
                        | ServerMessage::Error { .. }
                )
            })?
            .expect("a blocking take returns a message or an error");
        match reply.message {
            ServerMessage::Spawned {
                pid,
                pidfd,
                stdin,
                stdout,
                stderr,
                ..
            } => Child::new(
                self.connection.clone(),
                id,
                pid,
                reply.fds,
                [Some(pidfd), stdin, stdout, stderr],
            ),
            ServerMessage::SpawnFailed {
                kind,
                errno,
                message,
                ..
            } => Err(Error::SpawnFailed {
                program: match &self.request.target {
                    Target::Exec { program, .. } => program.to_string(),
                    Target::Worker { name, .. } => name.clone(),
                },
                kind,
                errno,
                message,
            }),
            ServerMessage::Error { kind, message, .. } => Err(Error::Refused { kind, message }),
            other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// The Spawn message (id still 0) and the fds it refers to by index.
    fn request(
        &self,
        stdin_default: &'static StdioKind,
        out_default: &'static StdioKind,
    ) -> (Spawn, Vec<BorrowedFd<'_>>) {
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        let stdin = stdio_spec(kind_or(&self.stdin, stdin_default), 0, &mut fds);
        let stdout = stdio_spec(kind_or(&self.stdout, out_default), 1, &mut fds);
        let stderr = stdio_spec(kind_or(&self.stderr, out_default), 2, &mut fds);
        let mut mappings = Vec::with_capacity(self.fds.len());
        for (target, fd) in &self.fds {
            fds.push(fd.as_fd());
            mappings.push(FdMapping {
                index: (fds.len() - 1) as u32,
                target: *target,
            });
        }
        let mut request = self.request.clone();
        (request.stdin, request.stdout, request.stderr) = (stdin, stdout, stderr);
        request.fds = mappings;
        (request, fds)
    }
}

/// The protocol's stdio spec for one stream, pushing any fd it passes.
/// `own` is this process's fd for the stream (0, 1 or 2), passed to inherit.
fn stdio_spec<'a>(kind: &'a StdioKind, own: i32, fds: &mut Vec<BorrowedFd<'a>>) -> StdioSpec {
    let fd = match kind {
        StdioKind::Null => return StdioSpec::Null,
        StdioKind::Piped => return StdioSpec::Pipe,
        // SAFETY: fds 0-2 are this process's standard streams, which stay
        // open for its life (std's own `Stdin::as_fd` borrows fd 0 the same
        // way); if one was closed, sendmsg fails with EBADF.
        StdioKind::Inherit => unsafe { BorrowedFd::borrow_raw(own) },
        StdioKind::Fd(fd) => fd.as_fd(),
    };
    fds.push(fd);
    StdioSpec::Fd {
        index: (fds.len() - 1) as u32,
    }
}

fn kind_or<'a>(stdio: &'a Option<Stdio>, default: &'static StdioKind) -> &'a StdioKind {
    stdio.as_ref().map_or(default, |s| &s.0)
}
