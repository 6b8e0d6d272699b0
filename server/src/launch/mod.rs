//! The launch layer: everything that makes a child, split along the fork.
//!
//! | file | runs in | does |
//! |---|---|---|
//! | `plan.rs` | server | checks a `Spawn` and builds the [`ChildPlan`](plan::ChildPlan) (pure; unit-tested) |
//! | `fork.rs` | both | the fork: thread guard, report pipe, signals blocked, unwind barrier, pidfd |
//! | `setup.rs` | child | signals, fds, credentials, directory, then exec or the worker |
//! | `report.rs` | both | the exec report: the child's failure record, the server's reading of it |
//! | `pool_child.rs` | child | a prefork pool child: warm up, wait, take its [`Assignment`](pool_child::Assignment) |
//! | `zygote/` | both | the zygote, a copy of the front that preloads and forks the workers and pool children: the front's handle (`mod.rs`), its life (`life.rs`, in the zygote) |
//!
//! [`Launcher`] is what the event loop calls: [`launch`](Launcher::launch)
//! forks a child for a request, [`prefork`](Launcher::prefork) forks an idle
//! pool child, [`hand_off`](Launcher::hand_off) gives a request to one. Each
//! returns a [`Launched`] child whose report pipe the event loop watches;
//! the ledger takes it from there.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use forkserver_protocol::{ErrorKind, Limits, RunAs, Spawn, StdioSpec, Target};

use crate::log::{log, Level};
use crate::modules::Modules;
use crate::peer::Peer;
use crate::pool::PoolChild;
use crate::sys;
use crate::threads::ForkGuard;

mod controls;
mod fields;
mod fork;
mod plan;
mod pool_child;
pub(crate) mod report;
mod setup;
pub(crate) mod zygote;

#[cfg(test)]
#[path = "plan_tests.rs"]
mod plan_tests;

pub(crate) use plan::MAX_MOVES;

/// Why a launch did not happen; becomes a `SpawnFailed` reply.
#[derive(Debug)]
pub(crate) struct LaunchError {
    pub(crate) kind: ErrorKind,
    pub(crate) errno: Option<i32>,
    pub(crate) message: String,
}

impl LaunchError {
    pub(crate) fn new(kind: ErrorKind, message: String) -> LaunchError {
        LaunchError {
            kind,
            errno: None,
            message,
        }
    }

    pub(crate) fn os(kind: ErrorKind, doing: &str, err: io::Error) -> LaunchError {
        LaunchError {
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
    /// The master end of the child's terminal.
    pub(crate) pty: Option<OwnedFd>,
}

/// A child forked (or handed a request) for a spawn; whether it started is
/// told by `report` (see [`report`]).
pub(crate) struct Launched {
    pub(crate) pid: libc::pid_t,
    pub(crate) pidfd: OwnedFd,
    /// The read end of its report pipe.
    pub(crate) report: OwnedFd,
    pub(crate) client_ends: ClientEnds,
    /// A pool child's control socket, kept until its start is reported
    /// (see the ledger's `Stage::Starting`).
    pub(crate) pool_control: Option<OwnedFd>,
}

/// Makes children for requests, from the server's warm state.
pub(crate) struct Launcher {
    pub(crate) modules: Modules,
    limits: Limits,
    dev_null: OwnedFd,
    /// The server's environment, read once at start.
    base_env: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The thread guard, checked before every fork.
    fork_guard: ForkGuard,
    /// What an exec spawn's child runs on until its exec
    /// ([`Launcher::exec_sharing_memory`]).
    exec_stack: sys::ChildStack,
    /// The front's pid, the parent of every child (the zygote's and the
    /// pool children's copies keep it: they make children for the front).
    front: libc::pid_t,
}

impl Launcher {
    pub(crate) fn new(
        modules: Modules,
        limits: Limits,
        fork_guard: ForkGuard,
    ) -> io::Result<Launcher> {
        Ok(Launcher {
            modules,
            limits,
            dev_null: sys::open_rdwr(c"/dev/null")?,
            base_env: std::env::vars_os()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
            fork_guard,
            exec_stack: sys::ChildStack::new()?,
            front: sys::getpid(),
        })
    }

    /// Checks `request` from `peer`, forks a child for it, running as
    /// `credentials`.
    /// `fds` are the fds attached to the request; the ones it references are
    /// installed in the child and all are closed in the server on return.
    pub(crate) fn launch(
        &self,
        request: &Spawn,
        peer: &Peer,
        fds: Vec<OwnedFd>,
        credentials: Option<RunAs>,
    ) -> Result<Launched, LaunchError> {
        let mut made = plan::PlanFds::default();
        let mut plan = self.plan(request, peer, &fds, credentials, &mut made)?;
        // Only a child that execs may be made by clone3 (see
        // sys::fork_into_cgroup); a worker moves itself.
        let cgroup = plan
            .cgroup
            .filter(|_| matches!(plan.action, plan::Action::Exec { .. }))
            // SAFETY: the fd is one of `fds`, open until this returns.
            .map(|fd| unsafe { BorrowedFd::borrow_raw(fd) });
        let wants_cgroup = plan.cgroup.is_some();
        let forked = if matches!(plan.action, plan::Action::Exec { .. })
            && plan.credentials.is_none()
            && !wants_cgroup
        {
            self.exec_sharing_memory(&plan)?
        } else {
            self.fork(cgroup, |reporter, placed| {
                plan.cgroup_placed = placed;
                // SAFETY: we are the freshly forked child; every fd in the
                // plan is open (owned by `fds`, `made` or the launcher).
                unsafe { setup::run(plan, reporter) }
            })?
        };
        if wants_cgroup {
            log_cgroup(forked.pid, forked.placed);
        }
        Ok(Launched {
            pid: forked.pid,
            pidfd: forked.pidfd,
            report: forked.report,
            client_ends: made.client_ends,
            pool_control: None,
        })
    }

    /// Hands a request to an idle pool child, checked here first (the child
    /// checks it again, as it would for a fork). Pipes are made here and
    /// passed as fds, so the child needs nothing from us but one message.
    pub(crate) fn hand_off(
        &self,
        child: PoolChild,
        request: &Spawn,
        fds: Vec<OwnedFd>,
        credentials: Option<RunAs>,
        peer: &Peer,
    ) -> Result<Launched, LaunchError> {
        let (assignment, mut fds, client_ends) =
            self.assignment(request, fds, credentials, peer)?;
        let mut bytes = forkserver_protocol::encode(&assignment)
            .map_err(|e| LaunchError::new(ErrorKind::Invalid, e.to_string()))?;
        if bytes.len() > pool_child::INLINE_ASSIGNMENT_BYTES {
            // Too big for one datagram on the control socket: in a memfd,
            // as clients send big requests.
            let file = forkserver_protocol::memfd_holding(&bytes).map_err(|e| {
                LaunchError::os(
                    ErrorKind::Resource,
                    "writing the request for a pool child",
                    e,
                )
            })?;
            fds.push(file);
            bytes = pool_child::IN_THE_LAST_FD.to_vec();
        }
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        forkserver_protocol::send_datagram(
            child.control.as_fd(),
            &bytes,
            &borrowed,
            libc::MSG_DONTWAIT,
        )
        .map_err(|e| {
            LaunchError::os(
                ErrorKind::Resource,
                "handing the request to a pool child",
                e,
            )
        })?;
        Ok(Launched {
            pid: child.pid,
            pidfd: child.pidfd,
            report: child.report,
            client_ends,
            pool_control: Some(child.control),
        })
    }

    /// Checks `request` and makes its pipes (and terminal), for a child
    /// that is not forked here (a pool child, a zygote's worker): the
    /// request as that child gets it, every pipe end and terminal replaced
    /// by a passed fd (appended to `fds`), and the client's ends.
    fn assignment(
        &self,
        request: &Spawn,
        mut fds: Vec<OwnedFd>,
        credentials: Option<RunAs>,
        peer: &Peer,
    ) -> Result<(pool_child::Assignment, Vec<OwnedFd>, ClientEnds), LaunchError> {
        let mut made = plan::PlanFds::default();
        self.plan(request, peer, &fds, credentials, &mut made)?;
        let mut spawn = request.clone();
        let mut pipes = made.child_pipes.into_iter();
        let controlling_tty = spawn.pty.take().is_some();
        if controlling_tty {
            // The terminal made here goes as the child's stdio, and the
            // child makes it its controlling terminal.
            fds.push(pipes.next().expect("plan made the terminal's slave end"));
            let index = (fds.len() - 1) as u32;
            spawn.stdin = StdioSpec::Fd { index };
            spawn.stdout = StdioSpec::Fd { index };
            spawn.stderr = StdioSpec::Fd { index };
        }
        for spec in [&mut spawn.stdin, &mut spawn.stdout, &mut spawn.stderr] {
            if *spec == StdioSpec::Pipe {
                fds.push(pipes.next().expect("plan made one pipe per piped stream"));
                *spec = StdioSpec::Fd {
                    index: (fds.len() - 1) as u32,
                };
            }
        }
        let assignment = pool_child::Assignment {
            spawn,
            peer: peer.clone(),
            server_uid: sys::getuid(),
            controlling_tty,
        };
        Ok((assignment, fds, made.client_ends))
    }
}

/// Says how child `pid`, which asked for a cgroup, gets into it.
fn log_cgroup(pid: libc::pid_t, placed: bool) {
    let how = if placed {
        "created in its cgroup by clone3"
    } else {
        "moves itself into its cgroup (cgroup.procs)"
    };
    log!(Level::Debug, "pid {pid} {how}");
}

/// For log lines and `list`: the program or worker a request runs.
pub(crate) fn describe(request: &Spawn) -> &OsStr {
    match &request.target {
        Target::Exec { program, .. } => program.as_os_str(),
        Target::Worker { name, .. } => OsStr::new(name.as_str()),
    }
}
