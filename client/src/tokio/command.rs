//! [`AsyncCommand`]: the blocking client's [`Command`] builder, spawned
//! asynchronously.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::{ExitStatus, Output};
use std::sync::Arc;

use forkserver_protocol::{ClientMessage, Spawn};

use super::child::AsyncChild;
use super::connection::AsyncConnection;
use super::link::AsyncLink;
use crate::spawned::{answers_spawn, read_answer};
use crate::stdio::{StdioKind, INHERIT, NULL, PIPED};
use crate::{Command, Error, Stdio};

/// A process to start through a forkserver, built like
/// `tokio::process::Command`: the same builder methods as the blocking
/// [`Command`] (it wraps one: see [`as_command_mut`](Self::as_command_mut)
/// for the rest), with `spawn`, `status` and `output` that do not block a
/// thread.
#[derive(Debug)]
pub struct AsyncCommand {
    link: Arc<AsyncLink>,
    inner: Command,
    kill_on_drop: bool,
}

/// Builder methods that pass through to the wrapped [`Command`] and return
/// `&mut AsyncCommand`, so calls chain as with tokio's.
macro_rules! pass_through {
    ($( $(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*); )*) => {$(
        $(#[$doc])*
        pub fn $name(&mut self $(, $arg: $ty)*) -> &mut AsyncCommand {
            self.inner.$name($($arg),*);
            self
        }
    )*};
}

impl AsyncCommand {
    pub(crate) fn new(link: Arc<AsyncLink>, inner: Command) -> AsyncCommand {
        AsyncCommand {
            link,
            inner,
            kill_on_drop: false,
        }
    }

    pass_through! {
        /// Adds an argument ([`Command::arg`]).
        fn arg(arg: impl AsRef<OsStr>);
        /// Sets argv\[0\] ([`Command::arg0`]).
        fn arg0(name: impl AsRef<OsStr>);
        /// Sets an environment variable ([`Command::env`]).
        fn env(key: impl AsRef<OsStr>, value: impl AsRef<OsStr>);
        /// Removes an environment variable ([`Command::env_remove`]).
        fn env_remove(key: impl AsRef<OsStr>);
        /// Starts from an empty environment ([`Command::env_clear`]).
        fn env_clear();
        /// Sets the working directory ([`Command::current_dir`]).
        fn current_dir(dir: impl AsRef<Path>);
        /// The server's environment instead of this process's
        /// ([`Command::server_env`]).
        fn server_env(on: bool);
        /// The server's directory ([`Command::server_cwd`]).
        fn server_cwd(on: bool);
        /// The server's umask ([`Command::server_umask`]).
        fn server_umask(on: bool);
        /// The server's signal state ([`Command::server_signals`]).
        fn server_signals(on: bool);
        /// A signal mask for the child ([`Command::signal_mask`]).
        fn signal_mask(signals: &[i32]);
        /// The child's stdin ([`Command::stdin`]).
        fn stdin(stdio: impl Into<Stdio>);
        /// The child's stdout ([`Command::stdout`]).
        fn stdout(stdio: impl Into<Stdio>);
        /// The child's stderr ([`Command::stderr`]).
        fn stderr(stdio: impl Into<Stdio>);
        /// Installs `fd` as `target` in the child ([`Command::fd`]).
        fn fd(target: i32, fd: impl Into<OwnedFd>);
        /// A new session or not ([`Command::new_session`]).
        fn new_session(on: bool);
        /// A process group ([`Command::process_group`]).
        fn process_group(pgid: i32);
        /// Outlives the connection ([`Command::detach`]).
        fn detach(on: bool);
        /// SIGKILL if the server dies ([`Command::die_with_server`]).
        fn die_with_server(on: bool);
        /// `PR_SET_NO_NEW_PRIVS` ([`Command::no_new_privs`]).
        fn no_new_privs(on: bool);
        /// Another user ([`Command::user`]).
        fn user(uid: u32, gid: u32, groups: &[u32]);
        /// A user id ([`Command::uid`]).
        fn uid(uid: u32);
        /// A group id ([`Command::gid`]).
        fn gid(gid: u32);
        /// A resource limit ([`Command::rlimit`]).
        fn rlimit(resource: &str, soft: Option<u64>, hard: Option<u64>);
        /// This process's limits ([`Command::caller_rlimits`]).
        fn caller_rlimits();
        /// A nice value ([`Command::nice`]).
        fn nice(nice: i32);
        /// CPU affinity ([`Command::cpus`]).
        fn cpus(cpus: &[u32]);
        /// `oom_score_adj` ([`Command::oom_score_adj`]).
        fn oom_score_adj(adj: i32);
        /// A cgroup ([`Command::cgroup`]).
        fn cgroup(dir: impl AsRef<Path>);
    }

    /// Adds arguments ([`Command::args`]).
    pub fn args<I, S>(&mut self, args: I) -> &mut AsyncCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.inner.args(args);
        self
    }

    /// Sets several environment variables ([`Command::envs`]).
    pub fn envs<I, K, V>(&mut self, vars: I) -> &mut AsyncCommand
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.inner.envs(vars);
        self
    }

    /// Gives a worker a MessagePack payload ([`Command::payload`]).
    pub fn payload<T: serde::Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<&mut AsyncCommand, Error> {
        self.inner.payload(value)?;
        Ok(self)
    }

    /// Whether dropping the [`AsyncChild`] before it exits sends it SIGKILL,
    /// as tokio's `kill_on_drop` (off by default). Independently of this,
    /// the server kills a child whose connection closes (unless
    /// [`detach`](Self::detach)ed).
    pub fn kill_on_drop(&mut self, on: bool) -> &mut AsyncCommand {
        self.kill_on_drop = on;
        self
    }

    /// Whether [`kill_on_drop`](Self::kill_on_drop) is set, as tokio's.
    pub fn get_kill_on_drop(&self) -> bool {
        self.kill_on_drop
    }

    /// The wrapped builder, for its getters.
    pub fn as_command(&self) -> &Command {
        &self.inner
    }

    /// The wrapped builder, for anything not passed through above.
    pub fn as_command_mut(&mut self) -> &mut Command {
        &mut self.inner
    }

    /// Starts the child; resolves once it runs (for a program: once
    /// `execve` succeeded). Stdio not set is inherited. At most the
    /// server's `max_pending_per_connection` spawns of one connection are
    /// in flight at once; more wait their turn here.
    pub async fn spawn(&mut self) -> Result<AsyncChild, Error> {
        self.spawn_with_defaults(&INHERIT, &INHERIT).await
    }

    /// Runs the child to completion; its exit status. As tokio's, the
    /// child's piped stdio is closed first (a child writing into a pipe
    /// nobody reads gets EPIPE rather than blocking for ever).
    pub async fn status(&mut self) -> Result<ExitStatus, Error> {
        let mut child = self.spawn().await?;
        drop(child.stdin.take());
        drop(child.stdout.take());
        drop(child.stderr.take());
        child.wait().await
    }

    /// Runs the child to completion, collecting stdout and stderr; stdin is
    /// /dev/null unless set. As tokio's (and unlike std's), stdout and
    /// stderr are piped whatever was set before: this command keeps them
    /// piped afterwards.
    pub async fn output(&mut self) -> Result<Output, Error> {
        self.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.spawn_with_defaults(&NULL, &PIPED)
            .await?
            .wait_with_output()
            .await
    }

    async fn spawn_with_defaults(
        &mut self,
        stdin: &'static StdioKind,
        out: &'static StdioKind,
    ) -> Result<AsyncChild, Error> {
        let mut connection = self.link.connection().await?;
        let (request, mut fds, extra) = self.inner.prepare(stdin, out)?;
        fds.extend(extra.iter().map(|fd| fd.as_fd()));
        let mut sent = false;
        let (permit, id) = loop {
            let permit = connection.start_permit().await;
            let id = connection.next_id();
            let message = ClientMessage::Spawn(Spawn {
                id,
                ..request.clone()
            });
            match connection.send(&message, &fds).await {
                Ok(()) => break (permit, id),
                // Closed as we sent: the server never read it (link.rs).
                Err(Error::Disconnected(_)) if !sent => {
                    drop(permit);
                    sent = true;
                    connection = self.link.instead_of(&connection).await?;
                }
                Err(e) => return Err(e),
            }
        };
        // Our copies of what the child got (its pipe ends) close before the
        // wait, as they would have in a scope.
        drop(fds);
        drop(extra);
        // Cancelled or failed before the answer: nothing will take it, so
        // its messages are discarded as they come (a child that started
        // anyway is left to the connection's on_disconnect).
        let unanswered = Unanswered {
            connection: &connection,
            id,
        };
        let reply = connection.take(id, answers_spawn).await?;
        std::mem::forget(unanswered);
        drop(permit);
        let program = self.inner.get_program().to_string_lossy().into_owned();
        let spawned = read_answer(reply.message, reply.fds, &program)?;
        AsyncChild::new(connection, id, spawned, self.kill_on_drop)
    }
}

/// Abandons a spawn's id if dropped: the spawn was cancelled or failed
/// before its answer was taken.
struct Unanswered<'a> {
    connection: &'a AsyncConnection,
    id: u64,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        self.connection.abandon(self.id);
    }
}
