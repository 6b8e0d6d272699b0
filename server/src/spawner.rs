//! The spawner: checks a `Spawn` request, prepares everything the child needs
//! (so that bad input is rejected before any fork), forks, and hands back the
//! parent's side of the new child.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::ptr;

use forkserver_protocol::{ErrorKind, Limits, RunAs, Spawn, StdioSpec, Target, WireStr};

use crate::child::{self, Action, CStringArray, ChildPlan, FailedStep};
use crate::modules::{Modules, WorkerRef};
use crate::peer::{child_credentials, Peer};
use crate::pool::{Assignment, PoolChild};
use crate::sys;
use crate::threads::ForkGuard;
use crate::worker::WorkerContext;

/// The highest fd number a client may ask for in the child.
const MAX_FD_TARGET: i32 = 65535;

/// Used when neither the request's environment nor the server's has `PATH`.
const DEFAULT_PATH: &[u8] = b"/usr/local/bin:/usr/bin:/bin";

/// Why a spawn did not happen; becomes a `SpawnFailed` reply.
#[derive(Debug)]
pub(crate) struct SpawnError {
    pub(crate) kind: ErrorKind,
    pub(crate) errno: Option<i32>,
    pub(crate) message: String,
}

impl SpawnError {
    pub(crate) fn new(kind: ErrorKind, message: String) -> SpawnError {
        SpawnError {
            kind,
            errno: None,
            message,
        }
    }

    fn os(kind: ErrorKind, doing: &str, err: io::Error) -> SpawnError {
        SpawnError {
            kind,
            errno: err.raw_os_error(),
            message: format!("{doing}: {err}"),
        }
    }
}

/// The client's ends of the pipes a spawn asked for.
#[derive(Default)]
pub(crate) struct ClientEnds {
    pub(crate) stdin: Option<OwnedFd>,
    pub(crate) stdout: Option<OwnedFd>,
    pub(crate) stderr: Option<OwnedFd>,
}

/// A child that has been forked; whether its exec succeeded is told by
/// `error_pipe` (EOF: yes; an error record: no).
pub(crate) struct Started {
    pub(crate) pid: libc::pid_t,
    pub(crate) pidfd: OwnedFd,
    pub(crate) error_pipe: OwnedFd,
    pub(crate) client_ends: ClientEnds,
    /// A pool child's control socket (see [`Stage::Starting`]).
    ///
    /// [`Stage::Starting`]: crate::children::Stage::Starting
    pub(crate) pool_control: Option<OwnedFd>,
}

pub(crate) struct Spawner {
    pub(crate) modules: Modules,
    dev_null: OwnedFd,
    /// The server's environment, read once at start.
    base_env: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The thread guard, checked before every fork.
    fork_guard: ForkGuard,
}

impl Spawner {
    pub(crate) fn new(modules: Modules, fork_guard: ForkGuard) -> io::Result<Spawner> {
        Ok(Spawner {
            modules,
            dev_null: sys::open_rdwr(c"/dev/null")?,
            base_env: std::env::vars_os()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
            fork_guard,
        })
    }

    /// Checks `request`, forks and returns the new child. `fds` are the fds
    /// attached to the request; the ones it references are installed in the
    /// child and all are closed in the server when this returns.
    pub(crate) fn spawn(
        &self,
        request: &Spawn,
        fds: Vec<OwnedFd>,
        limits: &Limits,
        run_as: Option<RunAs>,
    ) -> Result<Started, SpawnError> {
        let mut pipes = Vec::new();
        let mut client_ends = ClientEnds::default();
        let mut plan = self.plan(request, &fds, limits, &mut pipes, &mut client_ends)?;
        plan.credentials = run_as;
        let (pid, pidfd, error_pipe) = self.fork_with(|error_write| {
            // SAFETY: we are the freshly forked child; every fd in the plan is
            // open (owned by `fds`, `pipes` or the spawner).
            unsafe { child::run_child(plan, error_write) }
        })?;
        Ok(Started {
            pid,
            pidfd,
            error_pipe,
            client_ends,
            pool_control: None,
        })
    }

    /// Forks a prefork pool child that waits for an [`Assignment`] on its
    /// control socket, then becomes it.
    pub(crate) fn prefork(&self, worker: &str, limits: &Limits) -> Result<PoolChild, SpawnError> {
        let (control, child_end) = forkserver_protocol::seqpacket_pair().map_err(|e| {
            SpawnError::os(ErrorKind::Resource, "creating a pool control socket", e)
        })?;
        let child_control = child_end.as_raw_fd();
        let dev_null = self.dev_null.as_raw_fd();
        let (pid, pidfd, error_pipe) = self.fork_with(|error_write| {
            // SAFETY: we are the freshly forked child; all three fds are open.
            unsafe {
                child::run_pool_child(
                    child_control,
                    error_write,
                    dev_null,
                    || self.modules.prewarm(worker),
                    |bytes, fds| self.specialise(&bytes, fds, limits, error_write),
                )
            }
        })?;
        Ok(PoolChild {
            pid,
            pidfd,
            control,
            error_pipe,
            ready: false,
        })
    }

    /// In a pool child: decode the assignment, check it again (who may we
    /// become?), plan it like a fresh spawn, and run it. Never returns.
    fn specialise(
        &self,
        bytes: &[u8],
        fds: Vec<OwnedFd>,
        limits: &Limits,
        error_pipe: RawFd,
    ) -> Infallible {
        let Ok(assignment) = forkserver_protocol::decode::<Assignment>(bytes) else {
            // SAFETY: reporting on our own error pipe, then exiting.
            unsafe { child::fail_with(error_pipe, FailedStep::Setup, libc::EPROTO) }
        };
        let peer = Peer {
            pid: assignment.peer_pid,
            uid: assignment.peer_uid,
            gid: assignment.peer_gid,
            groups: assignment.peer_groups,
        };
        let request = assignment.spawn;
        let Ok(run_as) = child_credentials(&peer, request.user.as_ref(), assignment.server_uid)
        else {
            // SAFETY: as above.
            unsafe { child::fail_with(error_pipe, FailedStep::Setup, libc::EPERM) }
        };
        let (mut pipes, mut ends) = (Vec::new(), ClientEnds::default());
        match self.plan(&request, &fds, limits, &mut pipes, &mut ends) {
            Ok(mut plan) => {
                plan.credentials = run_as;
                // SAFETY: a forked, single-threaded pool child with the plan's
                // fds (in `fds`) open, and its signals already reset (by
                // run_pool_child, before it waited).
                unsafe { child::run_child_with_default_signals(plan, error_pipe) }
            }
            // SAFETY: as above.
            Err(_) => unsafe { child::fail_with(error_pipe, FailedStep::Setup, libc::EINVAL) },
        }
    }

    /// Hands a validated request to an idle pool child: pipes are made here
    /// and passed as fds, so the child needs nothing from us but one message.
    pub(crate) fn hand_off(
        &self,
        child: PoolChild,
        request: &Spawn,
        mut fds: Vec<OwnedFd>,
        limits: &Limits,
        peer: &Peer,
    ) -> Result<Started, SpawnError> {
        let (mut pipes, mut client_ends) = (Vec::new(), ClientEnds::default());
        // Validation only: the child plans again from the message.
        self.plan(request, &fds, limits, &mut pipes, &mut client_ends)?;
        let mut spawn = request.clone();
        let mut pipes = pipes.into_iter();
        for spec in [&mut spawn.stdin, &mut spawn.stdout, &mut spawn.stderr] {
            if *spec == StdioSpec::Pipe {
                fds.push(pipes.next().expect("plan made one pipe per piped stream"));
                *spec = StdioSpec::Fd {
                    index: (fds.len() - 1) as u32,
                };
            }
        }
        let assignment = Assignment {
            spawn,
            peer_uid: peer.uid,
            peer_gid: peer.gid,
            peer_groups: peer.groups.clone(),
            peer_pid: peer.pid,
            server_uid: sys::getuid(),
        };
        let bytes = forkserver_protocol::encode(&assignment)
            .map_err(|e| SpawnError::new(ErrorKind::Invalid, e.to_string()))?;
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        forkserver_protocol::send_datagram(
            child.control.as_fd(),
            &bytes,
            &borrowed,
            libc::MSG_DONTWAIT,
        )
        .map_err(|e| {
            SpawnError::os(
                ErrorKind::Resource,
                "handing the request to a pool child",
                e,
            )
        })?;
        Ok(Started {
            pid: child.pid,
            pidfd: child.pidfd,
            error_pipe: child.error_pipe,
            client_ends,
            pool_control: Some(child.control),
        })
    }

    /// Forks (after the thread guard, with signals blocked across the fork)
    /// and runs `in_child` in the child with the write end of a close-on-exec
    /// error pipe. Returns the child's pid, its pidfd and the pipe's read end.
    fn fork_with(
        &self,
        in_child: impl FnOnce(RawFd) -> Infallible,
    ) -> Result<(libc::pid_t, OwnedFd, OwnedFd), SpawnError> {
        self.fork_guard
            .check()
            .map_err(|why| SpawnError::new(ErrorKind::Threads, why))?;
        let (error_read, error_write) = sys::pipe(true)
            .map_err(|e| SpawnError::os(ErrorKind::Resource, "creating the exec error pipe", e))?;
        let old_mask = sys::block_all_signals()
            .map_err(|e| SpawnError::os(ErrorKind::Resource, "blocking signals", e))?;
        // SAFETY: the server is single-threaded (the thread guard), so the
        // child is a consistent copy; in_child never returns.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // `in_child` never returns (Infallible has no values); the match
            // says so to the type checker, which already knows.
            #[allow(unreachable_code)]
            match in_child(error_write.as_raw_fd()) {}
        }
        let fork_error = io::Error::last_os_error();
        sys::restore_signal_mask(&old_mask);
        if pid == -1 {
            return Err(SpawnError::os(
                ErrorKind::Resource,
                "fork failed",
                fork_error,
            ));
        }
        // Our copy of the write end must go now, or EOF would never come.
        drop(error_write);
        match sys::pidfd_open(pid) {
            Ok(pidfd) => Ok((pid, pidfd, error_read)),
            Err(e) => {
                // Without a pidfd we cannot hand the child out safely; it has
                // not been reaped, so its pid is still its own.
                // SAFETY: kill and waitpid on our own unreaped child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, ptr::null_mut(), 0);
                }
                Err(SpawnError::os(ErrorKind::Resource, "pidfd_open failed", e))
            }
        }
    }

    /// Validates the request and builds the child's plan. Pipes the request
    /// asks for are created here: the child's ends go to `pipes` (kept open
    /// until after the fork), the client's to `client_ends`.
    fn plan(
        &self,
        request: &Spawn,
        fds: &[OwnedFd],
        limits: &Limits,
        pipes: &mut Vec<OwnedFd>,
        client_ends: &mut ClientEnds,
    ) -> Result<ChildPlan<'_>, SpawnError> {
        check_count("env", request.env.len(), limits.max_env, "max_env")?;
        let env_bytes: usize = request
            .env
            .iter()
            .map(|(k, v)| k.as_bytes().len() + v.as_ref().map_or(0, |v| v.as_bytes().len()))
            .sum();
        check_bytes("env", env_bytes, limits.max_env_bytes, "max_env_bytes")?;
        let env = self.environment(request)?;
        let (argv, name, action) = match &request.target {
            Target::Exec {
                program,
                args,
                arg0,
            } => {
                if program.as_bytes().is_empty() {
                    return Err(invalid("target.program is empty".into()));
                }
                check_args(args, limits)?;
                let mut argv = Vec::with_capacity(args.len() + 1);
                argv.push(c_string(arg0.as_ref().unwrap_or(program), "target.arg0")?);
                for (i, arg) in args.iter().enumerate() {
                    argv.push(c_string(arg, &format!("target.args[{i}]"))?);
                }
                let candidates = exec_candidates(program.as_bytes(), env.get(&b"PATH"[..]))?;
                (argv, None, Action::Exec { candidates })
            }
            Target::Worker {
                name,
                args,
                payload,
            } => {
                check_args(args, limits)?;
                let worker = self
                    .modules
                    .find(name)
                    .map_err(|message| SpawnError::new(ErrorKind::UnknownWorker, message))?;
                let args = utf8_args(args)?;
                let fd_targets = request.fds.iter().map(|m| m.target).collect();
                let mut argv = vec![c_string(&name.as_str().into(), "target.name")?];
                let action = match worker {
                    WorkerRef::Embedded(worker) => {
                        let payload = match payload {
                            None => None,
                            Some(value) => {
                                let mut bytes = Vec::new();
                                rmpv::encode::write_value(&mut bytes, value)
                                    .expect("writing to a Vec cannot fail");
                                Some(bytes)
                            }
                        };
                        let context = WorkerContext {
                            target: name.clone(),
                            args,
                            payload,
                            fd_targets,
                            preloaded: &self.modules.preloaded,
                        };
                        Action::Worker { worker, context }
                    }
                    WorkerRef::Dylib(entry) => {
                        if payload.is_some() {
                            return Err(invalid(format!(
                                "target.payload: '{name}' is a dynamic module symbol, which takes only args"
                            )));
                        }
                        for (i, arg) in args.iter().enumerate() {
                            argv.push(c_string(
                                &arg.as_str().into(),
                                &format!("target.args[{i}]"),
                            )?);
                        }
                        Action::Dylib { entry }
                    }
                };
                // The kernel keeps 15 bytes of a process name.
                let comm: Vec<u8> = name.bytes().filter(|&b| b != 0).take(15).collect();
                let comm = CString::new(comm).expect("NUL bytes were filtered out");
                (argv, Some(comm), action)
            }
        };
        let envp = env
            .into_iter()
            .map(|(mut k, v)| {
                k.push(b'=');
                k.extend_from_slice(&v);
                // Keys and values were checked for NUL in environment() (the
                // server's own environment cannot contain one).
                CString::new(k).expect("environment entries have no NUL")
            })
            .collect();
        let cwd = match &request.cwd {
            Some(dir) => Some(c_string(dir, "cwd")?),
            None => None,
        };
        let fd_moves = self.fd_moves(request, fds, pipes, client_ends)?;
        Ok(ChildPlan {
            argv: CStringArray::new(argv),
            envp: CStringArray::new(envp),
            cwd,
            fd_moves,
            new_session: request.new_session,
            credentials: None,
            no_new_privs: request.no_new_privs,
            die_with_server: request
                .die_with_server
                // SAFETY: getpid cannot fail.
                .then(|| unsafe { libc::getpid() }),
            name,
            action,
        })
    }

    /// The child's environment: the server's (unless cleared) with the
    /// request's changes.
    fn environment(&self, request: &Spawn) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, SpawnError> {
        let mut env = if request.env_clear {
            BTreeMap::new()
        } else {
            self.base_env.clone()
        };
        for (key, value) in &request.env {
            let k = key.as_bytes();
            if k.is_empty() || k.contains(&b'=') || k.contains(&0) {
                return Err(invalid(format!(
                    "env key {key:?} must be non-empty without '=' or NUL bytes"
                )));
            }
            match value {
                Some(v) if v.as_bytes().contains(&0) => {
                    return Err(invalid(format!("env value of {key:?} contains a NUL byte")))
                }
                Some(v) => env.insert(k.to_vec(), v.as_bytes().to_vec()),
                None => env.remove(k),
            };
        }
        Ok(env)
    }

    /// Where each of the child's fds comes from, sorted by target.
    fn fd_moves(
        &self,
        request: &Spawn,
        fds: &[OwnedFd],
        pipes: &mut Vec<OwnedFd>,
        client_ends: &mut ClientEnds,
    ) -> Result<Vec<(RawFd, RawFd)>, SpawnError> {
        let passed = |index: u32, field: &str| -> Result<RawFd, SpawnError> {
            fds.get(index as usize)
                .map(|fd| fd.as_raw_fd())
                .ok_or_else(|| {
                    invalid(format!(
                        "{field}: fd index {index} is out of range (the request carried {} fds)",
                        fds.len()
                    ))
                })
        };
        let mut moves = Vec::with_capacity(3 + request.fds.len());
        let stdio = [
            (&request.stdin, &mut client_ends.stdin, "stdin"),
            (&request.stdout, &mut client_ends.stdout, "stdout"),
            (&request.stderr, &mut client_ends.stderr, "stderr"),
        ];
        for (target, (spec, client_end, field)) in stdio.into_iter().enumerate() {
            let source = match spec {
                StdioSpec::Null => self.dev_null.as_raw_fd(),
                StdioSpec::Fd { index } => passed(*index, field)?,
                StdioSpec::Pipe => {
                    let (read, write) = sys::pipe(false).map_err(|e| {
                        SpawnError::os(
                            ErrorKind::Resource,
                            &format!("creating the {field} pipe"),
                            e,
                        )
                    })?;
                    let (child_end, ours) = if target == 0 {
                        (read, write)
                    } else {
                        (write, read)
                    };
                    let raw = child_end.as_raw_fd();
                    pipes.push(child_end);
                    *client_end = Some(ours);
                    raw
                }
            };
            moves.push((source, target as RawFd));
        }
        for (i, mapping) in request.fds.iter().enumerate() {
            let field = format!("fds[{i}]");
            if !(3..=MAX_FD_TARGET).contains(&mapping.target) {
                return Err(invalid(format!(
                    "{field}.target is {}; it must be between 3 and {MAX_FD_TARGET} (0-2 are set by stdin, stdout and stderr)",
                    mapping.target
                )));
            }
            if let Some(j) = request.fds[..i]
                .iter()
                .position(|m| m.target == mapping.target)
            {
                return Err(invalid(format!(
                    "{field}.target {} is also fds[{j}].target",
                    mapping.target
                )));
            }
            moves.push((passed(mapping.index, &field)?, mapping.target));
        }
        moves.sort_by_key(|&(_, target)| target);
        Ok(moves)
    }
}

fn invalid(message: String) -> SpawnError {
    SpawnError::new(ErrorKind::Invalid, message)
}

fn check_args(args: &[WireStr], limits: &Limits) -> Result<(), SpawnError> {
    check_count("target.args", args.len(), limits.max_args, "max_args")?;
    let bytes = args.iter().map(|a| a.as_bytes().len()).sum();
    check_bytes(
        "target.args",
        bytes,
        limits.max_args_bytes,
        "max_args_bytes",
    )
}

fn check_bytes(field: &str, bytes: usize, limit: u32, name: &str) -> Result<(), SpawnError> {
    if bytes > limit as usize {
        return Err(SpawnError::new(
            ErrorKind::Limit,
            format!("{field} holds {bytes} bytes; the limit {name} is {limit}"),
        ));
    }
    Ok(())
}

fn check_count(field: &str, count: usize, limit: u32, name: &str) -> Result<(), SpawnError> {
    if count > limit as usize {
        return Err(SpawnError::new(
            ErrorKind::Limit,
            format!("{field} has {count} entries; the limit {name} is {limit}"),
        ));
    }
    Ok(())
}

/// Worker arguments must be UTF-8 (a worker sees `&[String]`).
fn utf8_args(args: &[WireStr]) -> Result<Vec<String>, SpawnError> {
    args.iter()
        .enumerate()
        .map(|(i, arg)| {
            String::from_utf8(arg.as_bytes().to_vec())
                .map_err(|_| invalid(format!("target.args[{i}] is not valid UTF-8")))
        })
        .collect()
}

fn c_string(s: &WireStr, field: &str) -> Result<CString, SpawnError> {
    CString::new(s.as_bytes()).map_err(|_| invalid(format!("{field} contains a NUL byte")))
}

/// The paths execve should try for `program`: itself if it contains a `/`,
/// else `DIR/program` for each entry of the child's `PATH` (an empty entry
/// meaning the current directory, as execvp has it).
fn exec_candidates(program: &[u8], path: Option<&Vec<u8>>) -> Result<Vec<CString>, SpawnError> {
    let to_c = |bytes: Vec<u8>| {
        CString::new(bytes).map_err(|_| invalid("target.program contains a NUL byte".into()))
    };
    if program.contains(&b'/') {
        return Ok(vec![to_c(program.to_vec())?]);
    }
    let path = path.map_or(DEFAULT_PATH, |p| p.as_slice());
    path.split(|&b| b == b':')
        .map(|dir| {
            let dir = if dir.is_empty() { b"." as &[u8] } else { dir };
            let mut full = Vec::with_capacity(dir.len() + 1 + program.len());
            full.extend_from_slice(dir);
            full.push(b'/');
            full.extend_from_slice(program);
            to_c(full)
        })
        .collect()
}

/// For log lines: the program or worker a request runs.
pub(crate) fn describe(request: &Spawn) -> &OsStr {
    match &request.target {
        Target::Exec { program, .. } => program.as_os_str(),
        Target::Worker { name, .. } => OsStr::new(name.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_search_follows_execvp() {
        let got = exec_candidates(b"ls", Some(&b"/a::/b".to_vec())).unwrap();
        let got: Vec<&[u8]> = got.iter().map(|c| c.as_bytes()).collect();
        assert_eq!(got, [&b"/a/ls"[..], b"./ls", b"/b/ls"]);
        let direct = exec_candidates(b"./x", None).unwrap();
        assert_eq!(direct[0].as_bytes(), b"./x");
    }

    #[test]
    fn bad_requests_are_refused_before_any_fork() {
        let spawner = Spawner::new(Modules::default(), ForkGuard::Off).unwrap();
        let limits = Limits::default();
        let mut request = Spawn::exec(1, "true", vec!["a\0b".into()]);
        let err = spawner
            .spawn(&request, Vec::new(), &limits, None)
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::Invalid);
        assert!(err.message.contains("target.args[0]"), "{}", err.message);

        request = Spawn::exec(1, "true", Vec::new());
        request.stdin = StdioSpec::Fd { index: 2 };
        let err = spawner
            .spawn(&request, Vec::new(), &limits, None)
            .err()
            .unwrap();
        assert!(err.message.contains("stdin: fd index 2"), "{}", err.message);

        request = Spawn::exec(1, "true", vec!["x".into(); 5]);
        let small = Limits {
            max_args: 4,
            ..Limits::default()
        };
        let err = spawner
            .spawn(&request, Vec::new(), &small, None)
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::Limit);
        assert!(err.message.contains("max_args is 4"), "{}", err.message);
    }
}
