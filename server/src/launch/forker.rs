//! The forker: a copy of the server, forked once when it starts serving
//! with prefork pools, that forks the pools' idle children for it, so that
//! a refill never holds the server's only thread.
//!
//! Why: `fork()` holds the calling thread in the kernel for as long as
//! copying the page tables takes (about 2 ms for a Python server that
//! imported Polars, 20 ms at 512 MB). In the server, a request, or a child's
//! exit to report, that comes meanwhile waits all of it.
//!
//! How: the server sends the forker one datagram per child wanted: the
//! worker's name, with the child's end of a new control socket and the
//! write end of its report pipe. The forker makes the child with
//! `clone3(CLONE_PARENT)` (`sys::fork_sibling`), so it is the server's
//! child as a pool child forked by the server is (reaped, signalled and
//! killed there, its parent-death signal tied to the server); the child
//! runs `pool_child::run` exactly as one forked by the server. The answer
//! is the pid, with a pidfd made by the same clone, or `-errno`.
//!
//! The forker is the server as it was when it forked it, and stays so: it
//! runs only this loop, keeps every signal blocked (as the fork left it)
//! and no fd but its socket, /dev/null and stdio. `ps` shows it as a child
//! of the server named `forker`. The embedder's fork hooks ran around that
//! one fork (a Python server's `PyOS_BeforeFork` then, its
//! `PyOS_AfterFork_Child` in each idle child's warm-up), so every child is
//! a copy of the state one fork of the server would have copied. It ends
//! at the end-of-file of its socket: when the server drops it (shutdown,
//! SIGHUP, which starts a new one from the server's state then) or dies.
//! Without one (it could not be started, died, or failed a fork), the
//! server forks its pool children itself, as before.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use forkserver_protocol::{recv_datagram, send_datagram, seqpacket_pair, ErrorKind};

use super::fork::{control_socket, report_pipe, unwind_barrier};
use super::report::Reporter;
use super::setup::close_except;
use super::{pool_child, LaunchError, Launcher};
use crate::pool::PoolChild;
use crate::sys::{self, GlibcThread};

/// The server's handle on its forker.
pub(crate) struct Forker {
    pid: libc::pid_t,
    socket: OwnedFd,
    /// Children asked for and not answered yet, in the order asked.
    asked: VecDeque<Asked>,
}

/// The server's ends of a child asked for.
struct Asked {
    worker: String,
    control: OwnedFd,
    report: OwnedFd,
}

/// A child the forker made for a worker's pool (named), or why not.
pub(crate) type Answer = (String, Result<PoolChild, LaunchError>);

/// A worker's name is at most this long on the forker's socket.
const MAX_REQUEST: usize = 4096;

impl Launcher {
    /// Forks the forker, or None where its children could not be made
    /// right (glibc's thread descriptor not found: see `sys::sibling`).
    pub(crate) fn start_forker(&self) -> Result<Option<Forker>, LaunchError> {
        let Some(thread) = GlibcThread::find() else {
            return Ok(None);
        };
        let (socket, forker_end) = seqpacket_pair()
            .map_err(|e| LaunchError::os(ErrorKind::Resource, "creating the forker's socket", e))?;
        let forked = self.fork(None, |reporter, _| {
            // SAFETY: we are the freshly forked forker; its socket, the
            // report pipe and /dev/null are open.
            unsafe { serve(self, forker_end.as_raw_fd(), reporter, &thread) }
        })?;
        sys::set_nonblocking(socket.as_raw_fd())
            .map_err(|e| LaunchError::os(ErrorKind::Resource, "the forker's socket", e))?;
        Ok(Some(Forker {
            pid: forked.pid,
            socket,
            asked: VecDeque::new(),
        }))
    }
}

impl Forker {
    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Asks for an idle child for `worker`'s pool; it comes with
    /// [`answers`](Self::answers).
    pub(crate) fn ask(&mut self, worker: &str) -> Result<(), LaunchError> {
        let (control, child_end) = control_socket()?;
        let (report, report_write) = report_pipe()?;
        send_datagram(
            self.socket.as_fd(),
            worker.as_bytes(),
            &[child_end.as_fd(), report_write.as_fd()],
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
        .map_err(|e| LaunchError::os(ErrorKind::Resource, "asking the forker", e))?;
        self.asked.push_back(Asked {
            worker: worker.to_owned(),
            control,
            report,
        });
        Ok(())
    }

    /// The children asked for that have been made since the last call,
    /// with their workers' names, and why the forker is no use any more, if
    /// it is not: it is gone, or its fork failed (clone3 may be refused
    /// where fork is not, by a seccomp filter; the server's own forks say
    /// whether the failure was the system's). What it was still asked for
    /// is then lost: a child made meanwhile reads the end-of-file of its
    /// control socket and exits.
    pub(crate) fn answers(&mut self) -> (Vec<Answer>, Option<String>) {
        let mut answers = Vec::new();
        loop {
            let datagram = match recv_datagram(self.socket.as_fd(), 4, 1, libc::MSG_DONTWAIT) {
                Ok(Some(datagram)) => datagram,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return (answers, None),
                Ok(None) => return (answers, Some("closed its socket".to_owned())),
                Err(e) => return (answers, Some(format!("cannot be read from: {e}"))),
            };
            let Some(asked) = self.asked.pop_front() else {
                return (answers, Some("answered what was not asked".to_owned()));
            };
            let Ok(bytes) = <[u8; 4]>::try_from(datagram.bytes.as_slice()) else {
                return (answers, Some("sent a malformed answer".to_owned()));
            };
            let answer = i32::from_ne_bytes(bytes);
            match datagram.fds.into_iter().next() {
                Some(pidfd) if answer > 0 => {
                    let Asked {
                        worker,
                        control,
                        report,
                    } = asked;
                    answers.push((worker, idle_child(answer, pidfd, control, report)));
                }
                _ => {
                    let error = std::io::Error::from_raw_os_error(answer.saturating_neg());
                    return (answers, Some(format!("could not fork: {error}")));
                }
            }
        }
    }
}

impl AsFd for Forker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// The idle child `pid` with the server's ends of its sockets, unless it
/// has died already: then the server may have reaped it before it knew it
/// was one of its pool's.
fn idle_child(
    pid: libc::pid_t,
    pidfd: OwnedFd,
    control: OwnedFd,
    report: OwnedFd,
) -> Result<PoolChild, LaunchError> {
    if sys::has_exited(pidfd.as_fd()) {
        return Err(LaunchError::new(
            ErrorKind::Resource,
            format!("idle child {pid} died as it started"),
        ));
    }
    Ok(PoolChild {
        pid,
        pidfd,
        control,
        report,
        ready: false,
    })
}

/// The forker's life, in the forker: keep only its socket (and stdio,
/// /dev/null and its report pipe, which it never uses but for the fork's
/// panic record, so that its number is never reused), then make one idle
/// child per request until the server closes the socket. Signals stay blocked, as the fork left them: the server's
/// handlers must not run here, and the children need them blocked until
/// their warm-up is over (`pool_child::run`).
///
/// # Safety
/// Call only in the freshly forked child of a single-threaded server, with
/// `socket`, the reporter's pipe and the launcher's /dev/null open, and
/// `thread` found in the server.
unsafe fn serve(
    launcher: &Launcher,
    socket: RawFd,
    reporter: &Reporter,
    thread: &GlibcThread,
) -> Infallible {
    // SAFETY: this process never uses the server's objects owning the
    // closed fds: it runs this loop until it exits.
    unsafe { close_except(3, [socket, reporter.fd(), launcher.dev_null.as_raw_fd()]) };
    // SAFETY: the socket is ours alone now; the borrow lasts for this loop.
    let socket = unsafe { BorrowedFd::borrow_raw(socket) };
    // Named for `ps` and `top`; each child takes the server's name back.
    let server_name = sys::thread_name();
    sys::set_thread_name(b"forker\0\0\0\0\0\0\0\0\0\0");
    loop {
        let request = match recv_datagram(socket, MAX_REQUEST, 2, 0) {
            Ok(Some(request)) if !request.truncated && request.fds.len() == 2 => request,
            // End-of-file (the server dropped us or died), or nothing
            // the server sends.
            // SAFETY: _exit ends the forker without the server's atexit
            // handlers.
            _ => unsafe { libc::_exit(0) },
        };
        let worker = String::from_utf8_lossy(&request.bytes).into_owned();
        let [control, report] = <[OwnedFd; 2]>::try_from(request.fds).expect("two fds, checked");
        let child_reporter = Reporter::new(report.as_raw_fd());
        let in_child = || {
            sys::set_thread_name(&server_name);
            unwind_barrier(&child_reporter, || {
                // SAFETY: a fresh child of the forker, which is a copy of
                // the server, with the control socket and report pipe open.
                unsafe { pool_child::run(launcher, &worker, control.as_raw_fd(), &child_reporter) }
            })
        };
        // SAFETY: this process is single-threaded and inside no lock of
        // glibc's; `thread` was found in the server, which forked us.
        let forked = unsafe { sys::fork_sibling(thread, in_child) };
        // Ours: the child has its own copies.
        drop((control, report));
        let (answer, pidfd) = match forked {
            Ok((pid, pidfd)) => (pid, Some(pidfd)),
            Err(e) => (-e.raw_os_error().unwrap_or(libc::EIO), None),
        };
        let fds: Vec<BorrowedFd<'_>> = pidfd.iter().map(|fd| fd.as_fd()).collect();
        // A server that has gone is seen at the next receive.
        let _ = send_datagram(socket, &answer.to_ne_bytes(), &fds, libc::MSG_NOSIGNAL);
    }
}
