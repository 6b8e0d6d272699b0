//! [`Command`]: a `std::process::Command` whose process the server starts.

use std::ffi::OsStr;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::sync::Arc;

use forkserver_protocol::{
    ClientMessage, FdMapping, OnDisconnect, PtySize, Rlimit, RunAs, Spawn, Target, WireStr, RLIMITS,
};

use crate::caller::Context;
use crate::child::Child;
use crate::link::Link;
use crate::spawned::{answers_spawn, read_answer};
use crate::stdio::{stdio_spec, Stdio, StdioKind, INHERIT, NULL, PIPED};
use crate::Error;

/// A process to start through a forkserver, built like
/// `std::process::Command`: [`Command::new`] on the process-wide default
/// connection, or [`Client::command`](crate::Client::command) on a given one.
///
/// The child looks as if this process had started it: it gets this
/// process's environment (with this command's changes), working directory
/// and umask, and a program name without a `/` is looked up in the child's
/// `PATH`. By default it inherits this process's stdin, stdout and stderr,
/// starts in a new session, and is killed if the connection closes first
/// (see [`detach`](Command::detach)).
///
/// # Differences from `std::process::Command`
/// - The child is the server's child, not this process's: its parent pid is
///   the server's, and its exit status arrives from the server.
/// - It is killed (SIGTERM, then SIGKILL) when its connection closes, which
///   for [`Command::new`] is when this process exits; std's children
///   outlive their parent. [`detach`](Command::detach) gives std's
///   behaviour.
/// - It starts in a new session unless [`new_session`](Command::new_session)
///   or [`process_group`](Command::process_group) says otherwise: a child
///   left in the server's session could get the server's terminal signals.
/// - There is no `pre_exec`: a closure cannot cross a socket. What a
///   `pre_exec` hook would do belongs in a preloaded worker (see the
///   server crate's `Server::builder`).
/// - [`uid`](Command::uid)/[`gid`](Command::gid) are granted by the server:
///   a root server may run a root client's child as anyone; anyone else may
///   name only their own uid and gid.
pub struct Command {
    /// None: the process-wide default link, opened at first use.
    link: Option<Arc<Link>>,
    /// The request as built so far; its id, stdio, fd mappings and caller
    /// context are filled in at spawn time.
    request: Spawn,
    stdin: Option<Stdio>,
    stdout: Option<Stdio>,
    stderr: Option<Stdio>,
    fds: Vec<(i32, OwnedFd)>,
    context: Context,
    /// The cgroup v2 directory the child belongs in, opened at spawn.
    cgroup: Option<PathBuf>,
}

impl Command {
    /// A command that runs `program` through the forkserver at
    /// [`default_socket_path`](crate::default_socket_path), connected at
    /// the first spawn and shared by every such command in this process
    /// (reconnected if the server went away): a drop-in for
    /// `std::process::Command::new`.
    ///
    /// ```no_run
    /// use forkserver_client::Command;
    ///
    /// let output = Command::new("echo").arg("hello").output()?;
    /// assert_eq!(output.stdout, b"hello\n");
    /// # Ok::<(), forkserver_client::Error>(())
    /// ```
    pub fn new(program: impl AsRef<OsStr>) -> Command {
        Command::with(None, Spawn::exec(0, program.as_ref(), Vec::new()))
    }

    pub(crate) fn on(link: Arc<Link>, program: &OsStr) -> Command {
        Command::with(Some(link), Spawn::exec(0, program, Vec::new()))
    }

    /// A command for worker `name` (on the default connection if None).
    pub(crate) fn worker_on(link: Option<Arc<Link>>, name: &str) -> Command {
        let mut request = Spawn::exec(0, "", Vec::new());
        request.target = Target::Worker {
            name: name.to_owned(),
            args: Vec::new(),
            payload: None,
        };
        Command::with(link, request)
    }

    fn with(link: Option<Arc<Link>>, request: Spawn) -> Command {
        Command {
            link,
            request,
            stdin: None,
            stdout: None,
            stderr: None,
            fds: Vec::new(),
            context: Context::default(),
            cgroup: None,
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
    /// this process's working directory, as with std (to the server's with
    /// [`server_cwd`](Command::server_cwd)).
    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Command {
        self.request.cwd = Some(dir.as_ref().as_os_str().into());
        self
    }

    /// Starts the child from the server's environment (plus this command's
    /// changes) instead of this process's.
    pub fn server_env(&mut self, on: bool) -> &mut Command {
        self.context.server_env = on;
        self
    }

    /// Starts the child in the server's working directory instead of this
    /// process's ([`current_dir`](Command::current_dir) is then relative to
    /// the server's).
    pub fn server_cwd(&mut self, on: bool) -> &mut Command {
        self.context.server_cwd = on;
        self
    }

    /// Gives the child the server's umask instead of this process's.
    pub fn server_umask(&mut self, on: bool) -> &mut Command {
        self.context.server_umask = on;
        self
    }

    /// Starts the child with the server's signal state — nothing blocked,
    /// nothing ignored — instead of the calling thread's signal mask and
    /// this process's ignored signals (but SIGPIPE, which the child gets
    /// back at its default, as `std::process::Command` does).
    pub fn server_signals(&mut self, on: bool) -> &mut Command {
        self.context.server_signals = on;
        self
    }

    /// Blocks `signals` in the child instead of those the calling thread
    /// blocks: for a caller that blocks signals of its own to handle them
    /// (with a signalfd, say) and wants the child to have the mask it had
    /// before.
    pub fn signal_mask(&mut self, signals: &[i32]) -> &mut Command {
        self.context.signal_mask = Some(signals.iter().map(|&s| s as u32).collect());
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

    /// Puts the child in process group `pgid` (`setpgid`), as std's
    /// `CommandExt::process_group`: 0 makes a new group led by the child.
    /// The child then stays in the server's session (no `setsid`), and a
    /// nonzero `pgid` must be a group in the server's session.
    pub fn process_group(&mut self, pgid: i32) -> &mut Command {
        self.request.process_group = Some(pgid);
        self.request.new_session = false;
        self
    }

    /// Sets resource limit `resource` (as prlimit(1) names it without
    /// `RLIMIT_`: `NOFILE`, `NPROC`, `AS`, `CORE`, `CPU`, `STACK`, …; None
    /// for unlimited). The child otherwise has the server's limits, not
    /// this process's: see [`caller_rlimits`](Command::caller_rlimits). A
    /// non-root client may not raise a hard limit above its own.
    pub fn rlimit(&mut self, resource: &str, soft: Option<u64>, hard: Option<u64>) -> &mut Command {
        self.request.rlimits.retain(|l| l.resource != resource);
        self.request.rlimits.push(Rlimit {
            resource: resource.to_owned(),
            soft,
            hard,
        });
        self
    }

    /// Gives the child this process's own resource limits, every one of
    /// them (as a child of this process would inherit them); limits set
    /// with [`rlimit`](Command::rlimit) after this win.
    pub fn caller_rlimits(&mut self) -> &mut Command {
        for (name, resource) in RLIMITS {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes the struct given.
            if unsafe { libc::getrlimit(resource as _, &mut limit) } == 0 {
                let value = |v| (v != libc::RLIM_INFINITY).then_some(v);
                self.rlimit(name, value(limit.rlim_cur), value(limit.rlim_max));
            }
        }
        self
    }

    /// The child's nice value (absolute, -20..=19); below this client's own
    /// is root's privilege.
    pub fn nice(&mut self, nice: i32) -> &mut Command {
        self.request.nice = Some(nice);
        self
    }

    /// The CPUs the child may run on (`sched_setaffinity`).
    pub fn cpus(&mut self, cpus: &[u32]) -> &mut Command {
        self.request.cpus = Some(cpus.to_vec());
        self
    }

    /// The child's `oom_score_adj` (-1000..=1000); below this client's own
    /// is root's privilege.
    pub fn oom_score_adj(&mut self, adj: i32) -> &mut Command {
        self.request.oom_score_adj = Some(adj);
        self
    }

    /// Creates the child in the cgroup v2 directory `dir` (a path on the
    /// cgroup2 mount, opened at spawn and passed as a directory fd), as
    /// systemd-run's `--slice` places units: it is created there by
    /// `clone3(CLONE_INTO_CGROUP)` (a worker moves itself in before its
    /// code runs). This process must be able to write the cgroup's
    /// `cgroup.procs` (a delegated cgroup); the server checks.
    pub fn cgroup(&mut self, dir: impl AsRef<Path>) -> &mut Command {
        self.cgroup = Some(dir.as_ref().to_owned());
        self
    }

    /// Creates the child in this process's own cgroup (v2), so a job's
    /// children stay in the job; see [`cgroup`](Command::cgroup).
    pub fn caller_cgroup(&mut self) -> Result<&mut Command, Error> {
        self.cgroup = Some(crate::caller::own_cgroup()?);
        Ok(self)
    }

    /// Gives the child a new pseudo-terminal of `rows` × `cols` as its
    /// controlling terminal and its stdin, stdout and stderr (a terminal
    /// session of its own, like `ssh -t`); its master end is
    /// [`Child::pty`](crate::Child::pty).
    pub fn pty(&mut self, rows: u16, cols: u16) -> &mut Command {
        self.request.pty = Some(PtySize { rows, cols });
        self.request.new_session = true;
        self.stdin = Some(Stdio::null());
        self.stdout = Some(Stdio::null());
        self.stderr = Some(Stdio::null());
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

    /// Runs the child as another user, with these supplementary groups.
    /// The server refuses unless this client is root, or names its own uid
    /// and gid (a root server runs everyone else's children as themselves).
    pub fn user(&mut self, uid: u32, gid: u32, groups: &[u32]) -> &mut Command {
        self.request.user = Some(RunAs {
            uid,
            gid,
            groups: groups.to_vec(),
        });
        self
    }

    /// Runs the child with user id `uid`, as std's `CommandExt::uid` (the
    /// gid stays this process's unless [`gid`](Command::gid) is called; no
    /// supplementary groups, as std drops them). See [`user`](Command::user)
    /// for who may.
    pub fn uid(&mut self, uid: u32) -> &mut Command {
        let gid = self.request.user.as_ref().map_or_else(own_gid, |u| u.gid);
        self.user(uid, gid, &[])
    }

    /// Runs the child with group id `gid`, as std's `CommandExt::gid`.
    pub fn gid(&mut self, gid: u32) -> &mut Command {
        let uid = self.request.user.as_ref().map_or_else(own_uid, |u| u.uid);
        self.user(uid, gid, &[])
    }

    /// The program (a worker's name, for a worker).
    pub fn get_program(&self) -> &OsStr {
        match &self.request.target {
            Target::Exec { program, .. } => program.as_os_str(),
            Target::Worker { name, .. } => OsStr::new(name.as_str()),
        }
    }

    /// The arguments after the program, as std's `get_args`.
    pub fn get_args(&self) -> impl ExactSizeIterator<Item = &OsStr> {
        match &self.request.target {
            Target::Exec { args, .. } | Target::Worker { args, .. } => {
                args.iter().map(WireStr::as_os_str)
            }
        }
    }

    /// The environment changes this command makes: `Some` sets, `None`
    /// removes (sorted by key), as std's `get_envs`.
    pub fn get_envs(&self) -> impl ExactSizeIterator<Item = (&OsStr, Option<&OsStr>)> {
        self.request
            .env
            .iter()
            .map(|(k, v)| (k.as_os_str(), v.as_ref().map(WireStr::as_os_str)))
    }

    /// The working directory set with [`current_dir`](Command::current_dir).
    pub fn get_current_dir(&self) -> Option<&Path> {
        self.request.cwd.as_ref().map(|c| Path::new(c.as_os_str()))
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
        let link = match &self.link {
            Some(link) => link.clone(),
            None => crate::default_link()?,
        };
        let (request, mut fds, extra) = self.prepare(stdin, out)?;
        fds.extend(extra.iter().map(|fd| fd.as_fd()));
        let with_id = |id| {
            ClientMessage::Spawn(Spawn {
                id,
                ..request.clone()
            })
        };
        let (connection, id) = link.send(with_id, &fds)?;
        let reply = connection
            .take(id, true, answers_spawn)?
            .expect("a blocking take returns a message or an error");
        let program = self.get_program().to_string_lossy();
        let spawned = read_answer(reply.message, reply.fds, &program)?;
        Ok(Child::new(connection, id, spawned))
    }

    /// Checks the command and builds its request (id still 0) with the fds
    /// it refers to by index — all but the ones opened here (the working
    /// directory, the cgroup), which the third value holds and which the
    /// sender attaches last, in that order (the request already names their
    /// indexes). Unset stdio takes the defaults.
    pub(crate) fn prepare(
        &self,
        stdin: &'static StdioKind,
        out: &'static StdioKind,
    ) -> Result<(Spawn, Vec<BorrowedFd<'_>>, Vec<OwnedFd>), Error> {
        self.check_nul()?;
        let (mut request, fds) = self.request(stdin, out);
        let mut extra = Vec::new();
        if let Some(cwd) = self.context.apply(&mut request)? {
            request.cwd_fd = Some((fds.len() + extra.len()) as u32);
            extra.push(cwd);
        }
        if let Some(dir) = &self.cgroup {
            request.cgroup = Some((fds.len() + extra.len()) as u32);
            extra.push(crate::caller::open_dir(dir)?);
        }
        Ok((request, fds, extra))
    }

    /// A NUL byte cannot reach `execve`; std refuses it at spawn with
    /// `InvalidInput`, and so do we, before asking the server.
    fn check_nul(&self) -> Result<(), Error> {
        let has_nul = |s: &WireStr| s.as_bytes().contains(&0);
        let field = match &self.request.target {
            Target::Exec { program, .. } if has_nul(program) => Some("the program"),
            Target::Exec {
                arg0: Some(arg0), ..
            } if has_nul(arg0) => Some("arg0"),
            _ if self.get_args().any(|a| a.as_encoded_bytes().contains(&0)) => Some("an argument"),
            _ if self
                .request
                .env
                .iter()
                .any(|(k, v)| has_nul(k) || v.as_ref().is_some_and(has_nul)) =>
            {
                Some("an environment variable")
            }
            _ if self.request.cwd.as_ref().is_some_and(has_nul) => Some("the working directory"),
            _ => None,
        };
        match field {
            Some(field) => Err(Error::InvalidInput(format!(
                "nul byte found in provided data: {field} of '{}'",
                self.get_program().to_string_lossy()
            ))),
            None => Ok(()),
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

/// Like std's: the command as a shell line, `cd "/p" && FOO="bar" "prog" "1"`
/// (`{:#?}` shows every field).
impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            return f
                .debug_struct("Command")
                .field("request", &self.request)
                .field("stdin", &self.stdin)
                .field("stdout", &self.stdout)
                .field("stderr", &self.stderr)
                .field("context", &self.context)
                .finish_non_exhaustive();
        }
        if let Some(cwd) = self.get_current_dir() {
            write!(f, "cd {cwd:?} && ")?;
        }
        let key = |k: &OsStr| k.to_string_lossy().into_owned();
        if self.request.env_clear {
            write!(f, "env -i ")?;
        } else if self.get_envs().any(|(_, v)| v.is_none()) {
            write!(f, "env ")?;
            for (k, _) in self.get_envs().filter(|(_, v)| v.is_none()) {
                write!(f, "-u {} ", key(k))?;
            }
        }
        for (k, v) in self.get_envs() {
            if let Some(v) = v {
                write!(f, "{}={v:?} ", key(k))?;
            }
        }
        match &self.request.target {
            Target::Exec {
                program,
                arg0: Some(arg0),
                ..
            } if arg0 != program => {
                write!(f, "[{:?}] {:?}", program.as_os_str(), arg0.as_os_str())?
            }
            Target::Worker { name, .. } => write!(f, "worker {name:?}")?,
            _ => write!(f, "{:?}", self.get_program())?,
        }
        for arg in self.get_args() {
            write!(f, " {arg:?}")?;
        }
        Ok(())
    }
}

fn kind_or<'a>(stdio: &'a Option<Stdio>, default: &'static StdioKind) -> &'a StdioKind {
    stdio.as_ref().map_or(default, |s| &s.0)
}

fn own_uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

fn own_gid() -> u32 {
    // SAFETY: getgid cannot fail.
    unsafe { libc::getgid() }
}
