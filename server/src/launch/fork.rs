//! The fork itself, shared by every child the server makes.

use std::convert::Infallible;
use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::{self, AssertUnwindSafe};

use forkserver_protocol::ErrorKind;

use super::report::{FailedStep, Failure, Reporter};
use super::{LaunchError, Launcher};
use crate::sys;

/// A new child, as the server holds it.
pub(super) struct Forked {
    pub(super) pid: libc::pid_t,
    pub(super) pidfd: OwnedFd,
    /// The read end of its report pipe.
    pub(super) report: OwnedFd,
}

impl Launcher {
    /// Forks, after the thread guard, with every signal blocked across the
    /// fork, and runs `in_child` in the child with the write end of a
    /// close-on-exec report pipe.
    ///
    /// The unwind barrier: should `in_child` panic (a pool child decodes and
    /// plans before it sets up), the child reports [`FailedStep::Panic`] and
    /// exits 127, and never unwinds into its copy of the event loop. A
    /// worker's own panic never gets here: it is caught around the worker
    /// and exits 101.
    pub(super) fn fork(
        &self,
        in_child: impl FnOnce(&Reporter) -> Infallible,
    ) -> Result<Forked, LaunchError> {
        self.fork_guard
            .check()
            .map_err(|why| LaunchError::new(ErrorKind::Threads, why))?;
        let (report, report_write) = sys::pipe(true)
            .map_err(|e| LaunchError::os(ErrorKind::Resource, "creating the report pipe", e))?;
        let old_mask = sys::block_all_signals()
            .map_err(|e| LaunchError::os(ErrorKind::Resource, "blocking signals", e))?;
        let child = || {
            let reporter = Reporter::new(report_write.as_raw_fd());
            let _ = panic::catch_unwind(AssertUnwindSafe(|| in_child(&reporter)));
            reporter.fail(Failure::new(FailedStep::Panic, 0))
        };
        // SAFETY: the thread guard has just confirmed the process is
        // single-threaded (or the operator allowed otherwise), and the
        // child keeps to the after-fork rules of setup.rs.
        let forked = unsafe { sys::fork(child) };
        sys::restore_signal_mask(&old_mask);
        let pid = forked.map_err(|e| LaunchError::os(ErrorKind::Resource, "fork failed", e))?;
        // Our copy of the write end must go now, or EOF would never come.
        drop(report_write);
        match sys::pidfd_open(pid) {
            Ok(pidfd) => Ok(Forked { pid, pidfd, report }),
            Err(e) => {
                // Without a pidfd we cannot hand the child out safely.
                sys::kill_and_reap(pid);
                Err(LaunchError::os(ErrorKind::Resource, "pidfd_open failed", e))
            }
        }
    }
}
