//! Before the fork, in the server: a `Spawn` request checked and turned
//! into a [`ChildPlan`], everything the child needs, so that bad input is
//! refused before any fork and the child only reads memory prepared for it.
//!
//! Nothing here forks; the unit tests below run it as it is. The only OS
//! resources it makes are the pipes a request asks for.

use std::collections::BTreeMap;
use std::ffi::{c_char, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr;

use forkserver_protocol::{ErrorKind, RunAs, Spawn, StdioSpec, Target};

use super::controls::{check_cgroup, controls, Controls};
use super::fields::{
    c_string, check_args, check_bytes, check_count, exec_candidates, invalid, utf8_args,
};
use super::{ClientEnds, LaunchError, Launcher};
use crate::dylib::EntryPoint;
use crate::modules::WorkerRef;
use crate::peer::Peer;
use crate::sys;
use crate::worker::{WorkerContext, WorkerFn};

/// The highest fd number a client may ask for in the child.
const MAX_FD_TARGET: i32 = 65535;

/// At most this many fds are installed in one child (0–2 plus passed ones);
/// it bounds the stack array the child uses instead of allocating. The
/// server's `max_fds_per_message` limit is checked against it at start.
pub(crate) const MAX_MOVES: usize = 256;

/// NUL-terminated strings and the null-terminated pointer array C wants.
pub(crate) struct CStringArray {
    strings: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

impl CStringArray {
    pub(crate) fn new(strings: Vec<CString>) -> CStringArray {
        let ptrs = strings
            .iter()
            .map(|s| s.as_ptr())
            .chain([ptr::null()])
            .collect();
        CStringArray { strings, ptrs }
    }

    pub(crate) fn as_ptr(&self) -> *const *const c_char {
        self.ptrs.as_ptr()
    }

    /// For C entry points that may permute argv (getopt does).
    pub(crate) fn as_mut_ptr(&mut self) -> *mut *const c_char {
        self.ptrs.as_mut_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.strings.len()
    }
}

/// What the child does once it is set up.
pub(crate) enum Action<'m> {
    /// `execve` each path in turn, as execvp does.
    Exec { candidates: Vec<CString> },
    /// Call an embedded worker.
    Worker {
        worker: &'m WorkerFn,
        context: WorkerContext<'m>,
    },
    /// Call `int SYMBOL(int argc, char **argv)` of a dynamic module.
    Dylib { entry: EntryPoint },
    /// A worker the zygote resolves: this plan only checked the request
    /// (in the front, which has not run the preloads) and is never run.
    InZygote,
}

/// Everything the child needs, built before the fork so that the child only
/// reads it.
pub(crate) struct ChildPlan<'m> {
    /// argv (for exec and dylib entry points).
    pub(crate) argv: CStringArray,
    /// The whole environment, `KEY=VALUE`.
    pub(crate) envp: CStringArray,
    /// A directory fd to `fchdir` to (before `cwd`, which may be relative).
    pub(crate) cwd_fd: Option<RawFd>,
    pub(crate) cwd: Option<CString>,
    pub(crate) umask: Option<libc::mode_t>,
    /// `setpgid(0, pgid)`.
    pub(crate) process_group: Option<libc::pid_t>,
    /// Resource limits, nice, CPUs, `oom_score_adj`.
    pub(crate) controls: Controls,
    /// Make fd 0 (a terminal) the controlling terminal (`TIOCSCTTY`).
    pub(crate) controlling_tty: bool,
    /// A cgroup v2 directory (a passed fd) the child belongs in.
    pub(crate) cgroup: Option<RawFd>,
    /// The child was created in `cgroup` (by clone3); else it moves itself.
    pub(crate) cgroup_placed: bool,
    /// `(source, target)`: install the server's fd `source` as `target`.
    /// Sorted by target; targets are distinct.
    pub(crate) fd_moves: Vec<(RawFd, RawFd)>,
    pub(crate) new_session: bool,
    /// Who the child runs as, if not the server's own credentials.
    pub(crate) credentials: Option<RunAs>,
    pub(crate) no_new_privs: bool,
    /// The front's pid (the child's parent, whoever forks it), when the
    /// child must die with it.
    pub(crate) die_with_server: Option<libc::pid_t>,
    /// The process name (`comm`) a worker gets, for `ps` and `top`.
    pub(crate) name: Option<CString>,
    /// The caller's ignored signals and signal mask.
    pub(crate) signals: ChildSignals,
    pub(crate) action: Action<'m>,
}

/// The signals a child ignores and blocks, as sets built before the fork
/// (None: none).
#[derive(Default)]
pub(crate) struct ChildSignals {
    pub(crate) ignored: Option<libc::sigset_t>,
    pub(crate) mask: Option<libc::sigset_t>,
}

impl ChildSignals {
    fn of(request: &Spawn) -> Result<ChildSignals, LaunchError> {
        Ok(ChildSignals {
            ignored: signal_set(&request.ignored_signals, "ignored_signals")?,
            mask: signal_set(&request.signal_mask, "signal_mask")?,
        })
    }
}

/// The set of `signals`, None if there are none; refuses a number that is
/// not a signal, and SIGKILL and SIGSTOP, which can be neither ignored nor
/// blocked.
fn signal_set(signals: &[u32], field: &str) -> Result<Option<libc::sigset_t>, LaunchError> {
    if signals.is_empty() {
        return Ok(None);
    }
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::sigemptyset(&mut set) };
    for &signal in signals {
        if signal == 0 || signal > libc::SIGRTMAX() as u32 {
            return Err(invalid(format!(
                "{field}: {signal} is not a signal number (1..={})",
                libc::SIGRTMAX()
            )));
        }
        let number = signal as libc::c_int;
        if number == libc::SIGKILL || number == libc::SIGSTOP {
            return Err(invalid(format!(
                "{field}: signal {signal} (SIGKILL or SIGSTOP) can be neither ignored nor blocked"
            )));
        }
        // SAFETY: the set is initialised and the number in range. (glibc
        // refuses the two signals it keeps for its threads, 32 and 33;
        // nothing can ignore or block those in the child either.)
        unsafe { libc::sigaddset(&mut set, number) };
    }
    Ok(Some(set))
}

/// The fds a plan refers to that the server made for it: the child's pipe
/// ends (kept open until after the fork) and the client's.
#[derive(Default)]
pub(crate) struct PlanFds {
    pub(crate) child_pipes: Vec<OwnedFd>,
    pub(crate) client_ends: ClientEnds,
}

impl Launcher {
    /// Validates `request` from `peer` and builds the child's plan, running
    /// as `credentials`. `fds` are the fds attached to the request; pipes
    /// the request asks for are made here, into `made`.
    pub(crate) fn plan(
        &self,
        request: &Spawn,
        peer: &Peer,
        fds: &[OwnedFd],
        credentials: Option<RunAs>,
        made: &mut PlanFds,
    ) -> Result<ChildPlan<'_>, LaunchError> {
        let limits = &self.limits;
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
                // First, so that a NUL in the program is named as the program.
                let candidates =
                    exec_candidates(program.as_bytes(), env.get(&b"PATH"[..]).copied())?;
                check_args(args, limits)?;
                let mut argv = Vec::with_capacity(args.len() + 1);
                argv.push(c_string(arg0.as_ref().unwrap_or(program), "target.arg0")?);
                for (i, arg) in args.iter().enumerate() {
                    argv.push(c_string(arg, &format!("target.args[{i}]"))?);
                }
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
                    .map_err(|message| LaunchError::new(ErrorKind::UnknownWorker, message))?;
                let args = utf8_args(args)?;
                let mut argv = vec![c_string(&name.as_str().into(), "target.name")?];
                let action = match worker {
                    WorkerRef::InZygote => Action::InZygote,
                    WorkerRef::Embedded(worker, preloaded) => {
                        let payload = payload.as_ref().map(|value| {
                            let mut bytes = Vec::new();
                            rmpv::encode::write_value(&mut bytes, value)
                                .expect("writing to a Vec cannot fail");
                            bytes
                        });
                        let context = WorkerContext {
                            target: name.clone(),
                            args,
                            payload,
                            fd_targets: request.fds.iter().map(|m| m.target).collect(),
                            preloaded,
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
            .map(|(k, v)| {
                // One allocation per entry, sized for CString's NUL too.
                let mut entry = Vec::with_capacity(k.len() + v.len() + 2);
                entry.extend_from_slice(k);
                entry.push(b'=');
                entry.extend_from_slice(v);
                // Keys and values were checked for NUL in environment() (the
                // server's own environment cannot contain one).
                CString::new(entry).expect("environment entries have no NUL")
            })
            .collect();
        let cwd = match &request.cwd {
            Some(dir) => Some(c_string(dir, "cwd")?),
            None => None,
        };
        let cwd_fd = match request.cwd_fd {
            Some(index) => Some(passed(fds, index, "cwd_fd")?),
            None => None,
        };
        let umask = match request.umask {
            Some(mask) if mask > 0o777 => {
                return Err(invalid(format!(
                    "umask {mask:#o} is not a file mode mask (at most 0o777)"
                )))
            }
            mask => mask.map(|m| m as libc::mode_t),
        };
        if let Some(pgid) = request.process_group {
            if request.new_session {
                return Err(invalid(
                    "process_group needs new_session: false (a new session is a new process group already)".into(),
                ));
            }
            if pgid < 0 {
                return Err(invalid(format!("process_group {pgid} is negative")));
            }
        }
        let controls = controls(request, peer)?;
        let cgroup = match request.cgroup {
            Some(index) => {
                let fd = passed(fds, index, "cgroup")?;
                // SAFETY: the fd is one of `fds`, open for this call.
                check_cgroup(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }, peer)?;
                Some(fd)
            }
            None => None,
        };
        let fd_moves = self.fd_moves(request, fds, made)?;
        Ok(ChildPlan {
            argv: CStringArray::new(argv),
            envp: CStringArray::new(envp),
            cwd_fd,
            cwd,
            umask,
            process_group: request.process_group,
            controls,
            controlling_tty: request.pty.is_some(),
            cgroup,
            cgroup_placed: false,
            fd_moves,
            new_session: request.new_session,
            credentials,
            no_new_privs: request.no_new_privs,
            die_with_server: request.die_with_server.then_some(self.front),
            name,
            signals: ChildSignals::of(request)?,
            action,
        })
    }

    /// The child's environment: the server's (unless cleared) with the
    /// request's changes, borrowed from both: a request carries the
    /// caller's whole environment, and copying each variable into a map of
    /// its own before building `envp` doubled the allocations of every
    /// spawn (each a heap page written, copy-on-write after a fork).
    fn environment<'a>(
        &'a self,
        request: &'a Spawn,
    ) -> Result<BTreeMap<&'a [u8], &'a [u8]>, LaunchError> {
        let mut env: BTreeMap<&[u8], &[u8]> = if request.env_clear {
            BTreeMap::new()
        } else {
            self.base_env
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect()
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
                Some(v) => env.insert(k, v.as_bytes()),
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
        made: &mut PlanFds,
    ) -> Result<Vec<(RawFd, RawFd)>, LaunchError> {
        let passed = |index, field: &str| passed(fds, index, field);
        let mut moves = Vec::with_capacity(3 + request.fds.len());
        if let Some(size) = request.pty {
            let stdio_set = [&request.stdin, &request.stdout, &request.stderr]
                .iter()
                .any(|s| **s != StdioSpec::Null);
            if stdio_set || !request.new_session || request.process_group.is_some() {
                return Err(invalid(
                    "pty gives the child its stdin, stdout and stderr and a session of its own: leave stdio null, new_session true and process_group unset".into(),
                ));
            }
            let (master, slave) = sys::open_pty(size.rows, size.cols).map_err(|e| {
                LaunchError::os(ErrorKind::Resource, "opening a pseudo-terminal", e)
            })?;
            moves.extend((0..3).map(|target| (slave.as_raw_fd(), target)));
            made.child_pipes.push(slave);
            made.client_ends.pty = Some(master);
        } else {
            self.stdio_moves(request, fds, made, &mut moves)?;
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

    /// The moves for fds 0-2 as the request's stdio specs say.
    fn stdio_moves(
        &self,
        request: &Spawn,
        fds: &[OwnedFd],
        made: &mut PlanFds,
        moves: &mut Vec<(RawFd, RawFd)>,
    ) -> Result<(), LaunchError> {
        let passed = |index, field: &str| passed(fds, index, field);
        let stdio = [
            (&request.stdin, &mut made.client_ends.stdin, "stdin"),
            (&request.stdout, &mut made.client_ends.stdout, "stdout"),
            (&request.stderr, &mut made.client_ends.stderr, "stderr"),
        ];
        for (target, (spec, client_end, field)) in stdio.into_iter().enumerate() {
            let source = match spec {
                StdioSpec::Null => self.dev_null.as_raw_fd(),
                StdioSpec::Fd { index } => passed(*index, field)?,
                StdioSpec::Pipe => {
                    let (read, write) = sys::pipe(false).map_err(|e| {
                        LaunchError::os(
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
                    made.child_pipes.push(child_end);
                    *client_end = Some(ours);
                    raw
                }
            };
            moves.push((source, target as RawFd));
        }
        Ok(())
    }
}

/// The passed fd at `index`, for request field `field`.
fn passed(fds: &[OwnedFd], index: u32, field: &str) -> Result<RawFd, LaunchError> {
    fds.get(index as usize)
        .map(|fd| fd.as_raw_fd())
        .ok_or_else(|| {
            invalid(format!(
                "{field}: fd index {index} is out of range (the request carried {} fds)",
                fds.len()
            ))
        })
}
