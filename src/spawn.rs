//! `forkserver spawn`: run a program or worker through the server as if it
//! were run directly: the terminal's stdio, forwarded signals, the child's
//! exit status.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use clap::Args;
use forkserver::client::{Child, Client, Command, Error as ClientError, ErrorKind};
use libc::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};

use crate::{SocketArg, FAILURE};

/// Signals the CLI passes on to its child, as a shell's job would get them.
const FORWARDED: [i32; 7] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH];

/// GNU timeout's status for a command it had to kill.
const TIMED_OUT: u8 = 124;

#[derive(Args)]
pub(crate) struct SpawnArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Set an environment variable in the child (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(OsString, OsString)>,
    /// The child's working directory (a relative path is relative to this
    /// command's directory, or to the server's with --server-cwd).
    #[arg(long, value_name = "DIR")]
    cwd: Option<PathBuf>,
    /// Start from the server's environment (plus --env) instead of this
    /// command's.
    #[arg(long)]
    server_env: bool,
    /// Start in the server's working directory instead of this command's.
    #[arg(long)]
    server_cwd: bool,
    /// Give the child the server's umask instead of this command's.
    #[arg(long)]
    server_umask: bool,
    /// Start the child with nothing blocked and nothing ignored (the
    /// server's signal state) instead of this command's signal mask and
    /// ignored signals (`nohup forkserver spawn ...` leaves SIGHUP ignored
    /// in the child).
    #[arg(long)]
    server_signals: bool,
    /// This command's signal mask before it blocked the signals it forwards
    /// (set by `run`, not a flag).
    #[arg(skip)]
    signal_mask: Option<Vec<i32>>,
    /// Run this preloaded worker instead of a program: an embedded worker's
    /// name or MODULE:SYMBOL of a dynamic module. What follows `--` are its
    /// arguments.
    #[arg(long, value_name = "NAME")]
    worker: Option<String>,
    /// Run the child as this user (name or uid), with its primary group and
    /// supplementary groups. Only root may ask.
    #[arg(long, value_name = "USER", value_parser = parse_user)]
    user: Option<UserIds>,
    /// Set a resource limit in the child (repeatable), as prlimit(1):
    /// NAME=SOFT[:HARD] with NAME one of NOFILE, NPROC, AS, CORE, CPU,
    /// FSIZE, STACK, MEMLOCK, NICE, … and values a number or `unlimited`
    /// (HARD defaults to SOFT). `--rlimit self` gives the child all of this
    /// command's limits; without it the child has the server's.
    #[arg(long = "rlimit", value_name = "NAME=SOFT[:HARD]|self", value_parser = parse_rlimit)]
    rlimits: Vec<RlimitArg>,
    /// Create the child in this cgroup v2 directory (a path on the cgroup2
    /// mount), or `self` for this command's own cgroup, so a job's children
    /// stay in the job. You must be able to write its cgroup.procs.
    #[arg(long, value_name = "PATH|self")]
    cgroup: Option<PathBuf>,
    /// The child's nice value (-20..=19; below your own needs root).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    nice: Option<i32>,
    /// The CPUs the child may run on, e.g. 0,2-3.
    #[arg(long, value_name = "LIST", value_parser = parse_cpus)]
    cpus: Option<CpuList>,
    /// The child's oom_score_adj (-1000..=1000; below your own needs root).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    oom_score_adj: Option<i32>,
    /// SIGKILL the child if the server dies.
    #[arg(long)]
    die_with_server: bool,
    /// Run the child with no_new_privs: setuid bits and file capabilities
    /// give it nothing.
    #[arg(long)]
    no_new_privs: bool,
    /// Print the child's pid and return at once, leaving it running (it
    /// outlives this command and its connection).
    #[arg(long, conflicts_with = "timeout")]
    detach: bool,
    /// Give the child a terminal of its own (a pseudo-terminal, as its
    /// controlling terminal), relayed to this one, which is put in raw mode
    /// meanwhile, as `ssh -t` and `docker run -t` do: for shells, editors,
    /// anything interactive. Window size changes follow.
    #[arg(short = 't', long = "tty", conflicts_with = "detach")]
    tty: bool,
    /// Kill the child (SIGKILL) if it runs longer than SECS; exit 124.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    timeout: Option<Duration>,
    /// The program and its arguments (with --worker: the worker's
    /// arguments). Everything from the first word that is not a flag of
    /// `spawn` on is the command, as with env(1) and sudo(8); `--` before it
    /// is allowed and needed only for a program whose name starts with `-`.
    #[arg(
        trailing_var_arg = true,
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

/// One `--rlimit`.
#[derive(Clone, Debug)]
enum RlimitArg {
    /// All of this command's own limits.
    Caller,
    Set(String, Option<u64>, Option<u64>),
}

fn parse_rlimit(s: &str) -> Result<RlimitArg, String> {
    if s == "self" {
        return Ok(RlimitArg::Caller);
    }
    let (name, values) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=SOFT[:HARD] or self, got '{s}'"))?;
    let name = name.to_ascii_uppercase();
    let name = name.strip_prefix("RLIMIT_").unwrap_or(&name).to_owned();
    if !forkserver::protocol::RLIMITS
        .iter()
        .any(|(n, _)| *n == name)
    {
        return Err(format!(
            "unknown resource '{name}'; one of {}",
            forkserver::protocol::RLIMITS.map(|(n, _)| n).join(", ")
        ));
    }
    let value = |v: &str| -> Result<Option<u64>, String> {
        match v {
            "unlimited" | "infinity" => Ok(None),
            v => v
                .parse()
                .map(Some)
                .map_err(|_| format!("'{v}' is not a number or unlimited")),
        }
    };
    let (soft, hard) = match values.split_once(':') {
        Some((soft, hard)) => (value(soft)?, value(hard)?),
        None => (value(values)?, value(values)?),
    };
    Ok(RlimitArg::Set(name, soft, hard))
}

/// CPU numbers, from a list as taskset(1) writes it: `0,2-3`.
#[derive(Clone, Debug)]
struct CpuList(Vec<u32>);

fn parse_cpus(s: &str) -> Result<CpuList, String> {
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let number = |n: &str| {
            n.trim()
                .parse::<u32>()
                .map_err(|_| format!("'{n}' is not a CPU number in '{s}'"))
        };
        match part.split_once('-') {
            Some((from, to)) => cpus.extend(number(from)?..=number(to)?),
            None => cpus.push(number(part)?),
        }
    }
    Ok(CpuList(cpus))
}

fn parse_env(s: &str) -> Result<(OsString, OsString), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.into(), value.into())),
        _ => Err(format!("expected KEY=VALUE, got '{s}'")),
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|secs| secs.is_finite() && *secs >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("expected a number of seconds, got '{s}'"))
}

pub(crate) fn run(mut args: SpawnArgs) -> ExitCode {
    let outcome = if args.detach {
        connect(&args).and_then(|client| {
            let child = command(&client, &args)?.spawn()?;
            println!("{}", child.id());
            // Dropping the handle leaves a detached child running.
            Ok(Outcome::Detached)
        })
    } else {
        // Catch the signals to forward before connecting, so that none
        // can kill this command while the server is slow to answer.
        SignalForwarder::install()
            .map_err(ClientError::from)
            .and_then(|forwarder| {
                args.signal_mask = Some(forwarder.caller_mask.clone());
                let timeout = args.timeout;
                match start(args, &forwarder)? {
                    Started::Child(child, early) if child.pty.is_some() => {
                        crate::tty::relay(child, &forwarder, early, timeout)
                    }
                    Started::Child(child, early) => supervise(child, &forwarder, early, timeout),
                    Started::Interrupted(signal) => Ok(Outcome::Interrupted(signal)),
                }
            })
    };
    match outcome {
        Ok(Outcome::Detached) => ExitCode::SUCCESS,
        Ok(Outcome::TimedOut) => ExitCode::from(TIMED_OUT),
        Ok(Outcome::Interrupted(signal)) => ExitCode::from(128u8.wrapping_add(signal as u8)),
        Ok(Outcome::Exited(status)) => match (status.code(), status.signal()) {
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

/// The signals we forward, blocked and read from a signalfd(2): two system
/// calls to set up, where a handler and a self-pipe per signal take six
/// each. Blocked, they cannot end this command before it has passed them
/// on; they are pending until [`take`](Self::take) reads them, and a
/// signal sent twice before that counts once, as with handlers. Threads
/// started later (the starter in `start`) inherit the mask, so no thread
/// runs a default action either. The mask matters to nothing else: the
/// child is the server's, and this command execs nothing.
pub(crate) struct SignalForwarder {
    signalfd: OwnedFd,
    /// The signals this command had blocked before: the child's mask.
    caller_mask: Vec<i32>,
}

impl SignalForwarder {
    fn install() -> io::Result<SignalForwarder> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the signals are valid numbers.
        unsafe {
            libc::sigemptyset(&mut set);
            for signal in FORWARDED {
                libc::sigaddset(&mut set, signal);
            }
        }
        // SAFETY: sigset_t is plain data, filled in by pthread_sigmask.
        let mut before: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is initialised; `before` receives the old mask.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut before) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let caller_mask = (1..=libc::SIGRTMAX())
            // SAFETY: `before` was initialised by pthread_sigmask.
            .filter(|&signal| unsafe { libc::sigismember(&before, signal) } == 1)
            .collect();
        // SAFETY: -1 asks for a new signalfd for the initialised `set`.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        let signalfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalForwarder {
            signalfd,
            caller_mask,
        })
    }

    /// Readable when a forwarded signal is pending.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.signalfd.as_fd()
    }

    /// The signals that arrived since the last call, in order.
    pub(crate) fn take(&self) -> Vec<i32> {
        let mut signals = Vec::new();
        loop {
            // SAFETY: signalfd_siginfo is plain data, filled in by read.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: `info` is a writable buffer of `size` bytes.
            let n = unsafe {
                libc::read(
                    self.signalfd.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if n != size as isize {
                // EAGAIN: none left (EINTR cannot happen: the fd is
                // non-blocking).
                return signals;
            }
            signals.push(info.ssi_signo as i32);
        }
    }
}

pub(crate) enum Outcome {
    Exited(ExitStatus),
    TimedOut,
    Detached,
    /// A signal that ends a shell's job (INT, TERM, HUP, QUIT) came before
    /// the child existed.
    Interrupted(i32),
}

/// How a start ended: the child (with the signals to forward that came
/// while it started), or a signal that stops us first.
enum Started {
    Child(Child, Vec<i32>),
    Interrupted(i32),
}

/// Signals after which a shell's job is gone; the others wait for the child.
const TERMINATING: [i32; 4] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT];

fn command(client: &Client, args: &SpawnArgs) -> Result<Command, ClientError> {
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
    for limit in &args.rlimits {
        match limit {
            RlimitArg::Caller => command.caller_rlimits(),
            RlimitArg::Set(name, soft, hard) => command.rlimit(name, *soft, *hard),
        };
    }
    if let Some(nice) = args.nice {
        command.nice(nice);
    }
    if let Some(CpuList(cpus)) = &args.cpus {
        command.cpus(cpus);
    }
    if let Some(adj) = args.oom_score_adj {
        command.oom_score_adj(adj);
    }
    if let Some(cgroup) = &args.cgroup {
        if cgroup.as_os_str() == "self" {
            command.caller_cgroup()?;
        } else {
            command.cgroup(cgroup);
        }
    }
    if args.tty {
        let (rows, cols) = crate::tty::size_of_stdin().unwrap_or((24, 80));
        command.pty(rows, cols);
    }
    if let Some(mask) = &args.signal_mask {
        command.signal_mask(mask);
    }
    command
        .server_env(args.server_env)
        .server_cwd(args.server_cwd)
        .server_umask(args.server_umask)
        .server_signals(args.server_signals)
        .die_with_server(args.die_with_server)
        .no_new_privs(args.no_new_privs)
        .detach(args.detach);
    Ok(command)
}

/// Connects and starts the child on a helper thread while this one
/// watches for signals. A terminating signal that comes before the child
/// exists ends this command with 128+N — after a short grace, since the
/// child may already run while its `spawned` is on the way (then it gets
/// the signal, as if it had come a moment later). If the command ends
/// first, its connection closes and the server kills the child if it
/// started meanwhile. Other signals are kept for the child.
fn start(args: SpawnArgs, forwarder: &SignalForwarder) -> Result<Started, ClientError> {
    let (done, started) = UnixStream::pair()?;
    let starter = std::thread::spawn(move || {
        let child = connect(&args).and_then(|client| command(&client, &args)?.spawn());
        // Wakes the poll below; the result waits in the join handle.
        let _ = io::Write::write(&mut &done, &[1]);
        child
    });
    let mut early = Vec::new();
    let mut give_up = None;
    loop {
        let wait = give_up.map(|at: Instant| at.saturating_duration_since(Instant::now()));
        let ready = poll_readable(&[started.as_fd(), forwarder.fd()], wait)?;
        if ready[0] {
            let child = starter.join().expect("spawning does not panic")?;
            early.extend(forwarder.take());
            return Ok(Started::Child(child, early));
        }
        if let (Some(at), Some(&signal)) = (give_up, early.iter().find(|s| TERMINATING.contains(s)))
        {
            if Instant::now() >= at {
                return Ok(Started::Interrupted(signal));
            }
        }
        for signal in forwarder.take() {
            if TERMINATING.contains(&signal) && give_up.is_none() {
                give_up = Some(Instant::now() + START_GRACE);
            }
            early.push(signal);
        }
    }
}

/// How long a start may still finish after a terminating signal.
const START_GRACE: Duration = Duration::from_millis(500);

fn connect(args: &SpawnArgs) -> Result<Client, ClientError> {
    args.socket.connect()
}

/// Waits for the child, forwarding signals to it through its pidfd and
/// killing it at the deadline.
fn supervise(
    mut child: Child,
    forwarder: &SignalForwarder,
    early: Vec<i32>,
    timeout: Option<Duration>,
) -> Result<Outcome, ClientError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    // Signals that came while the child was starting are forwarded too.
    for signal in early {
        child.signal(signal)?;
    }
    loop {
        for signal in forwarder.take() {
            child.signal(signal)?;
        }
        let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if wait == Some(Duration::ZERO) {
            child.kill()?;
            child.wait()?;
            eprintln!(
                "forkserver: timed out after {:?}; killed pid {}",
                timeout.unwrap_or_default(),
                child.id()
            );
            return Ok(Outcome::TimedOut);
        }
        if poll_readable(&[child.pidfd(), forwarder.fd()], wait)?[0] {
            // The child ended; its status is on the way from the server.
            return Ok(Outcome::Exited(child.wait()?));
        }
    }
}

/// poll(2) for readability, retrying on EINTR; which fds are readable.
pub(crate) fn poll_readable(
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
) -> io::Result<Vec<bool>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: pollfds is a valid array of the length given.
        let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as _, ms) };
        if rc >= 0 {
            return Ok(pollfds.iter().map(|p| p.revents != 0).collect());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
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
