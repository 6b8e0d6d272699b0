//! The server's table of live children and the reaper that empties it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

use forkserver_protocol::{ChildStatus, OnDisconnect};

use crate::child::{FailedStep, ERROR_RECORD_LEN};
use crate::spawner::ClientEnds;
use crate::sys;

/// Identifies a connection in the event loop.
pub(crate) type ConnId = u64;

/// Where a child is in its life, as far as its client is told.
pub(crate) enum Stage {
    /// Forked; the exec error pipe has not yet told whether exec succeeded.
    Starting {
        error_pipe: OwnedFd,
        client_ends: ClientEnds,
        /// A pool child's control socket, closed only once its start is
        /// reported. Closed earlier, with the child's ready byte unread in
        /// it, Linux would mark the child's end ECONNRESET, and the child's
        /// recv would fail with that before reading the request queued
        /// ahead of it (seen: a Python pool child exiting 0 unspecialised).
        pool_control: Option<OwnedFd>,
    },
    /// `Spawned` was sent; `Exited` follows when it is reaped.
    Running,
    /// `SpawnFailed` was sent; it will exit 127 and be reaped silently.
    Failed,
}

pub(crate) struct ChildRecord {
    /// The connection that spawned it; `None` once that closed.
    pub(crate) owner: Option<ConnId>,
    /// The spawn request's id on that connection.
    pub(crate) id: u64,
    pub(crate) pidfd: OwnedFd,
    pub(crate) stage: Stage,
    pub(crate) on_disconnect: OnDisconnect,
    /// When to SIGKILL it, after a SIGTERM that may be ignored.
    pub(crate) kill_at: Option<Instant>,
    /// Its exit status, if reaped while still `Starting`.
    pub(crate) early_exit: Option<ChildStatus>,
    /// The program or worker, for `List`.
    pub(crate) target: String,
    /// The peer that spawned it (pid and uid at connect time).
    pub(crate) owner_pid: i32,
    pub(crate) owner_uid: u32,
    pub(crate) started: Instant,
}

/// What the exec error pipe said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExecOutcome {
    /// EOF: execve succeeded and closed the pipe.
    Exec,
    /// The child reported that a step failed with this errno.
    Failed(FailedStep, i32),
    /// Nothing to read yet.
    Pending,
}

/// Reads the exec error pipe without blocking.
pub(crate) fn read_exec_outcome(error_pipe: &OwnedFd) -> ExecOutcome {
    let mut record = [0u8; ERROR_RECORD_LEN];
    let n = sys::cvt_r(|| {
        // SAFETY: reading into a local buffer from our own non-blocking fd.
        unsafe {
            libc::read(
                error_pipe.as_raw_fd(),
                record.as_mut_ptr().cast(),
                record.len(),
            )
        }
    });
    match n {
        Ok(0) => ExecOutcome::Exec,
        Ok(n) if n as usize == ERROR_RECORD_LEN => match FailedStep::decode(record) {
            Some((step, errno)) => ExecOutcome::Failed(step, errno),
            None => ExecOutcome::Failed(FailedStep::Setup, libc::EPROTO),
        },
        // A short record cannot happen (8 bytes < PIPE_BUF are written at
        // once); treat it as a broken setup rather than guess.
        Ok(_) => ExecOutcome::Failed(FailedStep::Setup, libc::EPROTO),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => ExecOutcome::Pending,
        Err(e) => ExecOutcome::Failed(FailedStep::Setup, e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

#[derive(Default)]
pub(crate) struct Children {
    by_pid: HashMap<libc::pid_t, ChildRecord>,
}

impl Children {
    pub(crate) fn insert(&mut self, pid: libc::pid_t, record: ChildRecord) {
        self.by_pid.insert(pid, record);
    }

    pub(crate) fn get(&self, pid: libc::pid_t) -> Option<&ChildRecord> {
        self.by_pid.get(&pid)
    }

    pub(crate) fn get_mut(&mut self, pid: libc::pid_t) -> Option<&mut ChildRecord> {
        self.by_pid.get_mut(&pid)
    }

    pub(crate) fn remove(&mut self, pid: libc::pid_t) -> Option<ChildRecord> {
        self.by_pid.remove(&pid)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_pid.len()
    }

    /// Every child, by pid.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (libc::pid_t, &ChildRecord)> {
        self.by_pid.iter().map(|(&pid, record)| (pid, record))
    }

    /// Children that must be killed when the connection goes: SIGTERM now,
    /// SIGKILL at `kill_at`. Detached ones are just disowned.
    pub(crate) fn disown(&mut self, pids: impl IntoIterator<Item = libc::pid_t>, kill_at: Instant) {
        for pid in pids {
            let Some(record) = self.by_pid.get_mut(&pid) else {
                continue;
            };
            record.owner = None;
            if record.on_disconnect == OnDisconnect::Kill {
                // ESRCH only means it already exited and awaits reaping.
                let _ = sys::pidfd_send_signal(record.pidfd.as_fd(), libc::SIGTERM);
                record.kill_at = Some(kill_at);
            }
        }
    }

    /// How many children are being killed because their connection went:
    /// what a shutdown waits for.
    pub(crate) fn being_killed(&self) -> usize {
        self.by_pid
            .values()
            .filter(|r| r.owner.is_none() && r.on_disconnect == OnDisconnect::Kill)
            .count()
    }

    /// The earliest SIGKILL deadline, if any.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.by_pid.values().filter_map(|r| r.kill_at).min()
    }

    /// SIGKILLs every child whose grace period is over.
    pub(crate) fn kill_overdue(&mut self, now: Instant) {
        for record in self.by_pid.values_mut() {
            if record.kill_at.is_some_and(|at| at <= now) {
                let _ = sys::pidfd_send_signal(record.pidfd.as_fd(), libc::SIGKILL);
                // Stays in the table until reaped; no further deadline.
                record.kill_at = None;
            }
        }
    }
}

/// Every child that has ended: `waitpid(-1, WNOHANG)` until none is left
/// (0, "still alive") or we have no children at all (`ECHILD`).
///
/// Raw libc rather than nix: nix's `WaitStatus` cannot represent a death by a
/// real-time signal and would turn that reaped status into an error.
pub(crate) fn reap() -> Vec<(libc::pid_t, ChildStatus)> {
    let mut reaped = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only to `status`.
        match sys::cvt_r(|| unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) }) {
            Ok(0) => return reaped,
            Ok(pid) => {
                let status = if libc::WIFSIGNALED(status) {
                    ChildStatus::Signaled {
                        signal: libc::WTERMSIG(status),
                        core_dumped: libc::WCOREDUMP(status),
                    }
                } else {
                    ChildStatus::Exited {
                        code: libc::WEXITSTATUS(status),
                    }
                };
                reaped.push((pid, status));
            }
            // ECHILD: no children left. Nothing else is expected with WNOHANG.
            Err(_) => return reaped,
        }
    }
}
