//! The fork itself, shared by every child the server makes.

use std::cell::Cell;
use std::convert::Infallible;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::panic::{self, AssertUnwindSafe};

use forkserver_protocol::ErrorKind;

use super::plan::ChildPlan;
use super::report::{FailedStep, Failure, Reporter};
use super::{setup, LaunchError, Launcher};
use crate::log::{log, Level};
use crate::sys;

/// A new child, as the server holds it.
pub(super) struct Forked {
    pub(super) pid: libc::pid_t,
    pub(super) pidfd: OwnedFd,
    /// The read end of its report pipe.
    pub(super) report: OwnedFd,
    /// It was created in the cgroup asked for (by clone3).
    pub(super) placed: bool,
}

/// A child's report pipe: the read end (non-blocking, for the event loop)
/// and the write end, both close-on-exec.
pub(super) fn report_pipe() -> Result<(OwnedFd, OwnedFd), LaunchError> {
    sys::pipe(true).map_err(|e| LaunchError::os(ErrorKind::Resource, "creating the report pipe", e))
}

/// A pool child's control socket: the server's end and the child's.
pub(super) fn control_socket() -> Result<(OwnedFd, OwnedFd), LaunchError> {
    forkserver_protocol::seqpacket_pair()
        .map_err(|e| LaunchError::os(ErrorKind::Resource, "creating a pool control socket", e))
}

/// Runs a new child's work; should it panic, reports [`FailedStep::Panic`]
/// and exits 127 (see [`Launcher::fork`]).
pub(super) fn unwind_barrier(reporter: &Reporter, work: impl FnOnce() -> Infallible) -> Infallible {
    let _ = panic::catch_unwind(AssertUnwindSafe(work));
    reporter.fail(Failure::new(FailedStep::Panic, 0))
}

impl Launcher {
    /// Forks, after the thread guard, with every signal blocked across the
    /// fork, and runs `in_child` in the child with the write end of a
    /// close-on-exec report pipe, and whether the child was created in
    /// `cgroup` already (by clone3; else it must move itself, if asked).
    ///
    /// The unwind barrier: should `in_child` panic (a pool child decodes and
    /// plans before it sets up), the child reports [`FailedStep::Panic`] and
    /// exits 127, and never unwinds into its copy of the event loop. A
    /// worker's own panic never gets here: it is caught around the worker
    /// and exits 101.
    pub(super) fn fork(
        &self,
        cgroup: Option<BorrowedFd<'_>>,
        in_child: impl FnOnce(&Reporter, bool) -> Infallible,
    ) -> Result<Forked, LaunchError> {
        let (report, report_write, old_mask) = self.before_a_child()?;
        // The embedder's prepare handler (an interpreter takes its locks);
        // its parent handler runs below, whatever the fork did.
        self.modules.before_fork();
        // One of the two forks below runs it, once, in its child.
        let in_child = Cell::new(Some(in_child));
        let child = |placed: bool| {
            let reporter = Reporter::new(report_write.as_raw_fd());
            let in_child = in_child.take().expect("a child runs its work once");
            unwind_barrier(&reporter, || in_child(&reporter, placed))
        };
        // SAFETY (both forks): the thread guard has just confirmed the
        // process is single-threaded (or the operator allowed otherwise),
        // and the child keeps to the after-fork rules of setup.rs; a child
        // made by clone3 only execs (the caller passes a cgroup only then).
        let mut placed = false;
        let mut forked = Err(std::io::Error::from_raw_os_error(libc::ENOSYS));
        if let Some(cgroup) = cgroup {
            forked = unsafe { sys::fork_into_cgroup(cgroup, || child(true)) };
            placed = forked.is_ok();
            if let Err(e) = &forked {
                log!(
                    Level::Debug,
                    "clone3(CLONE_INTO_CGROUP) failed ({e}); the child will move itself (cgroup.procs)"
                );
            }
        }
        if !placed {
            forked = unsafe { sys::fork(|| child(false)) };
        }
        self.modules.after_fork_in_parent();
        sys::restore_signal_mask(&old_mask);
        let pid = forked.map_err(|e| LaunchError::os(ErrorKind::Resource, "fork failed", e))?;
        // Our copy of the write end must go now, or EOF would never come.
        drop(report_write);
        Self::with_pidfd(pid, report, placed)
    }

    /// Starts a child that execs `plan` as `posix_spawn` would: made by
    /// `clone(CLONE_VM | CLONE_VFORK)`, it sets itself up in the server's
    /// memory and execs, so nothing of the server's is copied (the cost of a
    /// fork grows with the server's memory; this does not). Only for a plan
    /// that execs, with no credentials and no cgroup
    /// (`setup::run_exec_sharing_memory` says why); the thread guard still
    /// applies, so that the same requests are refused as by [`Self::fork`].
    /// The embedder's fork hooks do not run: no code of the server's runs
    /// in the child.
    pub(super) fn exec_sharing_memory(&self, plan: &ChildPlan<'_>) -> Result<Forked, LaunchError> {
        let (report, report_write, old_mask) = self.before_a_child()?;
        let in_child = || {
            let reporter = Reporter::new(report_write.as_raw_fd());
            // SAFETY: we are that child; every fd of the plan and the
            // report pipe are open, and the plan execs (the caller checked).
            unsafe { setup::run_exec_sharing_memory(plan, &reporter) }
        };
        // SAFETY: the child only reads the plan and writes its own stack
        // (run_exec_sharing_memory's rules); signals are blocked.
        let spawned = unsafe { sys::spawn_sharing_memory(&self.exec_stack, &in_child) };
        sys::restore_signal_mask(&old_mask);
        let (pid, pidfd) =
            spawned.map_err(|e| LaunchError::os(ErrorKind::Resource, "fork failed", e))?;
        drop(report_write);
        Ok(Forked {
            pid,
            pidfd,
            report,
            placed: false,
        })
    }

    /// What every new child needs first: the thread guard's consent, its
    /// report pipe (read end, write end), and every signal blocked (the old
    /// mask returned, to restore once the child exists).
    fn before_a_child(&self) -> Result<(OwnedFd, OwnedFd, libc::sigset_t), LaunchError> {
        self.fork_guard
            .check()
            .map_err(|refusal| LaunchError::new(ErrorKind::Threads, refusal.why))?;
        let (report, report_write) = report_pipe()?;
        let old_mask = sys::block_all_signals()
            .map_err(|e| LaunchError::os(ErrorKind::Resource, "blocking signals", e))?;
        Ok((report, report_write, old_mask))
    }

    /// A started child's pidfd, or the child killed and reaped if none can
    /// be had.
    fn with_pidfd(pid: libc::pid_t, report: OwnedFd, placed: bool) -> Result<Forked, LaunchError> {
        match sys::pidfd_open(pid) {
            Ok(pidfd) => Ok(Forked {
                pid,
                pidfd,
                report,
                placed,
            }),
            Err(e) => {
                // Without a pidfd we cannot hand the child out safely.
                sys::kill_and_reap(pid);
                Err(LaunchError::os(ErrorKind::Resource, "pidfd_open failed", e))
            }
        }
    }
}
