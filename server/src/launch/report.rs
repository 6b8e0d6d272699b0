//! The exec report: how a child tells the server whether it started, in
//! both directions, in one place.
//!
//! Before forking, the server makes a close-on-exec pipe. The child holds
//! the write end ([`Reporter`]) and the server watches the read end:
//! - end-of-file with nothing written means the child started: `execve`
//!   succeeded (close-on-exec closed the pipe), or a worker closed it just
//!   before its own code ran;
//! - a 12-byte record means a step failed: the errno (`i32`), the step
//!   ([`FailedStep`] as `u32`) and a detail (`u32`: the resource of a
//!   failed `setrlimit`), in native byte order (writer and reader are the
//!   same binary). 12 bytes is below `PIPE_BUF`, so the write is atomic and
//!   a short read would be a bug.
//!
//! The child exits 127 after writing, the shell's "cannot run" status.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};

use forkserver_protocol::ErrorKind;

use crate::sys;

/// The size of a failure record.
const RECORD_LEN: usize = 12;

/// Which step of the child's setup failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum FailedStep {
    /// What has no step of its own: a pool child's own checks of its
    /// request, or the parent-death signal.
    Setup = 1,
    /// `chdir`.
    Chdir = 2,
    /// `execve`.
    Exec = 3,
    /// The child panicked before its work began (errno 0). The panic
    /// message went to the child's stderr, the server's own.
    Panic = 4,
    /// `setrlimit` (the detail is the resource).
    Rlimit = 5,
    /// `setpriority`.
    Nice = 6,
    /// `sched_setaffinity`.
    Cpus = 7,
    /// Writing /proc/self/oom_score_adj.
    OomScoreAdj = 8,
    /// Writing the cgroup's `cgroup.procs`.
    Cgroup = 9,
    /// `setsid` or `setpgid`.
    Session = 10,
    /// Copying and installing the child's fds.
    Fds = 11,
    /// Making the child's terminal its controlling terminal (`TIOCSCTTY`).
    Terminal = 12,
    /// Taking the peer's credentials (`setgroups`, `setgid`, `setuid`) or
    /// checking that they took.
    Credentials = 13,
    /// `PR_SET_NO_NEW_PRIVS`.
    NoNewPrivs = 14,
    /// The caller's ignored signals and signal mask.
    Signals = 15,
}

/// A failed step and its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) step: FailedStep,
    pub(crate) errno: i32,
    /// For `Rlimit`, the resource.
    pub(crate) detail: u32,
}

impl Failure {
    pub(crate) fn new(step: FailedStep, errno: i32) -> Failure {
        Failure {
            step,
            errno,
            detail: 0,
        }
    }

    /// `step` failed with the calling thread's errno, about `detail`.
    pub(crate) fn last_os_error_about(step: FailedStep, detail: u32) -> Failure {
        Failure {
            detail,
            ..Failure::last_os_error(step)
        }
    }

    /// `step` failed with the calling thread's errno.
    pub(crate) fn last_os_error(step: FailedStep) -> Failure {
        Failure::new(step, io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    fn encode(self) -> [u8; RECORD_LEN] {
        let mut record = [0u8; RECORD_LEN];
        record[..4].copy_from_slice(&self.errno.to_ne_bytes());
        record[4..8].copy_from_slice(&(self.step as u32).to_ne_bytes());
        record[8..].copy_from_slice(&self.detail.to_ne_bytes());
        record
    }

    fn decode(record: [u8; RECORD_LEN]) -> Option<Failure> {
        let errno = i32::from_ne_bytes(record[..4].try_into().ok()?);
        let step = match u32::from_ne_bytes(record[4..8].try_into().ok()?) {
            1 => FailedStep::Setup,
            2 => FailedStep::Chdir,
            3 => FailedStep::Exec,
            4 => FailedStep::Panic,
            5 => FailedStep::Rlimit,
            6 => FailedStep::Nice,
            7 => FailedStep::Cpus,
            8 => FailedStep::OomScoreAdj,
            9 => FailedStep::Cgroup,
            10 => FailedStep::Session,
            11 => FailedStep::Fds,
            12 => FailedStep::Terminal,
            13 => FailedStep::Credentials,
            14 => FailedStep::NoNewPrivs,
            15 => FailedStep::Signals,
            _ => return None,
        };
        let detail = u32::from_ne_bytes(record[8..].try_into().ok()?);
        Some(Failure {
            step,
            errno,
            detail,
        })
    }

    /// What the client is told: the `spawn_failed` kind, errno and message.
    pub(crate) fn describe(self) -> (ErrorKind, Option<i32>, String) {
        let (kind, doing) = match self.step {
            FailedStep::Exec => (ErrorKind::Exec, "cannot run the program".to_owned()),
            FailedStep::Chdir => (ErrorKind::Chdir, "cannot change to the directory".into()),
            FailedStep::Setup => (ErrorKind::Setup, "cannot set up the child".into()),
            FailedStep::Rlimit => (
                ErrorKind::Setup,
                format!(
                    "cannot set rlimits {}",
                    super::controls::resource_name(self.detail)
                ),
            ),
            FailedStep::Nice => (ErrorKind::Setup, "cannot set nice".into()),
            FailedStep::Cpus => (ErrorKind::Setup, "cannot set cpus (CPU affinity)".into()),
            FailedStep::OomScoreAdj => (ErrorKind::Setup, "cannot set oom_score_adj".into()),
            FailedStep::Cgroup => (ErrorKind::Setup, "cannot join the cgroup".into()),
            FailedStep::Session => (
                ErrorKind::Setup,
                "cannot start the child's session or process group".into(),
            ),
            FailedStep::Fds => (ErrorKind::Setup, "cannot install the child's fds".into()),
            FailedStep::Terminal => (
                ErrorKind::Setup,
                "cannot make the terminal the child's controlling terminal".into(),
            ),
            FailedStep::Credentials => (
                ErrorKind::Setup,
                "cannot take the peer's credentials (setgroups, setgid, setuid); the child did not run".into(),
            ),
            FailedStep::NoNewPrivs => (ErrorKind::Setup, "cannot set no_new_privs".into()),
            FailedStep::Signals => (
                ErrorKind::Setup,
                "cannot set the child's ignored signals or signal mask".into(),
            ),
            FailedStep::Panic => {
                return (
                    ErrorKind::Setup,
                    None,
                    "cannot set up the child: it panicked before its work began (the server's log has the panic message)".into(),
                )
            }
        };
        let error = io::Error::from_raw_os_error(self.errno);
        let whose = if self.step == FailedStep::Exec && self.errno == libc::E2BIG {
            // The server's own limits passed the request: this is execve's.
            " (the kernel's limit: arguments and environment together at most a quarter of the stack limit, 2 MiB with the usual 8 MiB, and 128 KiB for any one string)"
        } else {
            ""
        };
        (kind, Some(self.errno), format!("{doing}: {error}{whose}"))
    }
}

/// The child's end of the report pipe. Its number changes once, when the
/// child moves it above the fds it installs, hence the `Cell`.
pub(crate) struct Reporter {
    fd: Cell<RawFd>,
}

impl Reporter {
    /// The write end at `fd`, owned by this (forked) process.
    pub(crate) fn new(fd: RawFd) -> Reporter {
        Reporter { fd: Cell::new(fd) }
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.fd.get()
    }

    /// The pipe now lives at `fd` (the old number was closed or reused).
    pub(crate) fn moved_to(&self, fd: RawFd) {
        self.fd.set(fd);
    }

    /// Closes the pipe: the server reads end-of-file, "started". Nothing
    /// can be reported after this.
    pub(crate) fn close_as_started(&self) {
        // SAFETY: closing our own write end; the number is forgotten at once
        // so it is never written to after another file reuses it.
        unsafe { libc::close(self.fd.replace(-1)) };
    }

    /// The one writer of failure records: writes `failure` (if the pipe is
    /// still open) and exits 127. Async-signal-safe.
    pub(crate) fn fail(&self, failure: Failure) -> ! {
        let record = failure.encode();
        let fd = self.fd.get();
        if fd >= 0 {
            // If the write fails, the server still sees exit status 127.
            // SAFETY: an 8-byte local buffer written to our own pipe.
            let _ = sys::cvt_r(|| unsafe { libc::write(fd, record.as_ptr().cast(), RECORD_LEN) });
        }
        // SAFETY: _exit never returns and runs no destructors or atexit
        // handlers of the server's.
        unsafe { libc::_exit(127) }
    }
}

/// What the read end has said so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// End-of-file: the child started.
    Started,
    /// The child reported a failed step.
    Failed(Failure),
    /// Nothing to read yet.
    Pending,
}

/// Reads the report pipe's read end without blocking.
pub(crate) fn read_outcome(pipe: &OwnedFd) -> Outcome {
    let mut record = [0u8; RECORD_LEN];
    let broken = |errno| Outcome::Failed(Failure::new(FailedStep::Setup, errno));
    match sys::read(pipe.as_fd(), &mut record) {
        Ok(0) => Outcome::Started,
        Ok(RECORD_LEN) => Failure::decode(record).map_or(broken(libc::EPROTO), Outcome::Failed),
        // A short record cannot happen (see the module docs); treat it as a
        // broken setup rather than guess.
        Ok(_) => broken(libc::EPROTO),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Outcome::Pending,
        Err(e) => broken(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        for step in [
            FailedStep::Setup,
            FailedStep::Chdir,
            FailedStep::Exec,
            FailedStep::Panic,
            FailedStep::Rlimit,
            FailedStep::Nice,
            FailedStep::Cpus,
            FailedStep::OomScoreAdj,
            FailedStep::Cgroup,
            FailedStep::Session,
            FailedStep::Fds,
            FailedStep::Terminal,
            FailedStep::Credentials,
            FailedStep::NoNewPrivs,
            FailedStep::Signals,
        ] {
            let failure = Failure::new(step, libc::ENOENT);
            assert_eq!(Failure::decode(failure.encode()), Some(failure));
        }
        // A failed privilege drop says so, not "cannot set up the child".
        let (_, _, message) = Failure::new(FailedStep::Credentials, libc::EPERM).describe();
        assert!(
            message.starts_with("cannot take the peer's credentials"),
            "{message}"
        );
        let mut bad = Failure::new(FailedStep::Exec, 2).encode();
        bad[4] = 99;
        assert_eq!(Failure::decode(bad), None);
    }

    #[test]
    fn the_read_end_tells_pending_failed_and_started() {
        let (read, write) = sys::pipe(true).unwrap();
        assert_eq!(read_outcome(&read), Outcome::Pending);
        let failure = Failure::new(FailedStep::Chdir, libc::EACCES);
        let record = failure.encode();
        // SAFETY: writing a local buffer to our own pipe.
        let n = unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&write),
                record.as_ptr().cast(),
                RECORD_LEN,
            )
        };
        assert_eq!(n, RECORD_LEN as isize);
        assert_eq!(read_outcome(&read), Outcome::Failed(failure));
        drop(write);
        assert_eq!(read_outcome(&read), Outcome::Started);
        let (kind, errno, message) = failure.describe();
        assert_eq!((kind, errno), (ErrorKind::Chdir, Some(libc::EACCES)));
        assert!(
            message.starts_with("cannot change to the directory"),
            "{message}"
        );
    }
}
