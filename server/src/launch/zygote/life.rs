//! The zygote's life, in the zygote: preload, say so, then fork a child
//! for each request of the front's until it lets go (see `mod.rs` for the
//! why and the messages).

use std::cell::Cell;
use std::convert::Infallible;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};

use forkserver_protocol::{encode, memfd_holding, recv_datagram, send_datagram, ErrorKind};

use super::{FromZygote, Ready, ToZygote, MAX_MESSAGE, MAX_REQUEST_BYTES};
use crate::launch::fork::unwind_barrier;
use crate::launch::plan::PlanFds;
use crate::launch::pool_child::{self, Assignment};
use crate::launch::report::Reporter;
use crate::launch::setup::{self, close_except};
use crate::launch::{LaunchError, Launcher};
use crate::log::{log, Level};
use crate::modules::panic_message;
use crate::peer::child_rights;
use crate::sys::{self, SiblingFork};
use crate::threads::{ForkGuard, ThreadCount, ThreadPolicy};

/// The zygote's life, in the zygote: keep only its socket (and stdio,
/// /dev/null and its report pipe, which it never uses but for the fork's
/// panic record, so that its number is never reused), preload, say so,
/// then make one child per request until the front closes the socket.
///
/// # Safety
/// Call only in the freshly forked child of a single-threaded front, with
/// `socket`, the reporter's pipe and the launcher's /dev/null open, and
/// `fork` chosen in the front (a subreaper).
pub(super) unsafe fn serve(
    launcher: &Launcher,
    socket: RawFd,
    reporter: &Reporter,
    fork: SiblingFork,
    policy: ThreadPolicy,
    pools: &[String],
    stderr_after_ready: Option<RawFd>,
) -> Infallible {
    let kept = [
        socket,
        reporter.fd(),
        launcher.dev_null.as_raw_fd(),
        stderr_after_ready.unwrap_or(socket),
    ];
    // SAFETY: this process never uses the front's objects owning the
    // closed fds: it runs this function until it exits.
    unsafe { close_except(3, kept) };
    // SAFETY: the socket is ours alone now; the borrow lasts for this loop.
    let socket = unsafe { BorrowedFd::borrow_raw(socket) };
    // Named for `ps` and `top`; each child takes the server's name back.
    let server_name = sys::thread_name();
    sys::set_thread_name(b"zygote\0\0\0\0\0\0\0\0\0\0");
    // Before the preloads: no thread yet, and a small process to clone.
    // SAFETY: single-threaded, in no lock; `fork` was chosen in the front.
    let (fork, fell_back) = unsafe { fork.checked() };
    if let Some(why) = fell_back {
        log!(
            Level::Warn,
            "zygote {}: {why}; it forks each child twice instead (adopted by the server)",
            sys::getpid()
        );
    }
    let say = |message: &FromZygote| say(socket, message, &[]);
    let guard = match preload(launcher, policy, pools) {
        Ok(guard) => guard,
        Err(message) => {
            say(&FromZygote::Failed { message });
            // SAFETY: _exit ends the zygote without the front's atexit
            // handlers.
            unsafe { libc::_exit(1) }
        }
    };
    let ready = Ready {
        pid: sys::getpid(),
        modules: launcher.modules.infos().to_vec(),
        files: launcher.modules.preloaded_files(),
    };
    let serving = Serving {
        launcher,
        socket,
        policy,
        stderr_after_ready,
        server_name,
    };
    if ThreadCount::open().ensure_one().is_err() {
        // SAFETY: the zygote's preloads are done, its threads tolerated.
        unsafe { serving.shed_threads(fork, &guard, ready) }
    }
    serving.serve(fork, &guard, ready)
}

/// What the zygote serves with, once preloaded.
struct Serving<'z> {
    launcher: &'z Launcher,
    socket: BorrowedFd<'z>,
    policy: ThreadPolicy,
    stderr_after_ready: Option<RawFd>,
    /// The server's process name, which each child takes back.
    server_name: [u8; 16],
}

impl Serving<'_> {
    /// The preloads left threads, which the policy tolerates: a copy of
    /// the zygote made by one fork has none, so it can make each child
    /// with one clone (a multithreaded process could not: `sys::sibling`).
    /// The copy, adopted by the front, serves from here on and says so
    /// (`Ready::pid`); this process waits for its end (the front kills it
    /// once it knows), holding nothing but its memory and sleeping threads.
    ///
    /// # Safety
    /// In the zygote, once preloaded.
    unsafe fn shed_threads(&self, fork: SiblingFork, guard: &ForkGuard, ready: Ready) -> ! {
        let failed = |message: String| -> ! {
            say(self.socket, &FromZygote::Failed { message }, &[]);
            // SAFETY: _exit ends the zygote.
            unsafe { libc::_exit(1) }
        };
        if let Err(refusal) = guard.check() {
            failed(format!(
                "the preloads' threads are not dormant: {}",
                refusal.why
            ));
        }
        let copy = || -> Infallible {
            // One thread here, on the thread descriptor the way was checked
            // with: it serves the copy as it would have the zygote. A
            // thread that appears from now on was not tolerated.
            let guard = match ForkGuard::arm(self.policy) {
                Ok(guard) => guard,
                Err(message) => failed(message),
            };
            let ready = Ready {
                pid: sys::getpid(),
                ..ready
            };
            self.serve(fork, &guard, ready)
        };
        self.launcher.modules.before_fork();
        // SAFETY: the guard just allowed a fork; the copy runs the zygote's
        // own code, as the zygote would.
        let forked = unsafe { sys::fork_adopted(copy) };
        self.launcher.modules.after_fork_in_parent();
        match forked {
            Ok((_, copy)) => {
                // SAFETY: the copy has the socket now; ours must close so
                // that the front sees the end of the one that serves.
                unsafe { libc::close(self.socket.as_raw_fd()) };
                sys::wait_readable(copy.as_fd(), -1);
                // SAFETY: _exit ends this process.
                unsafe { libc::_exit(0) }
            }
            Err(e) => failed(format!(
                "the zygote cannot fork a copy of itself without its threads: {e}"
            )),
        }
    }

    /// Says it is ready, then makes one child per request until the front
    /// closes the socket.
    fn serve(&self, fork: SiblingFork, guard: &ForkGuard, ready: Ready) -> Infallible {
        let (launcher, socket) = (self.launcher, self.socket);
        let say = |message: &FromZygote, fds: &[BorrowedFd<'_>]| say(socket, message, fds);
        say(&FromZygote::Ready(ready), &[]);
        if let Some(fd) = self.stderr_after_ready {
            // Checked by the front before it started us; a failure here
            // leaves the start-up stderr, which is all that could be done.
            let _ = sys::inherited_fd(fd).and_then(sys::replace_stderr);
        }
        let zygote = Forking {
            launcher,
            fork: Cell::new(fork),
            guard,
            doomed: Cell::new(false),
            server_name: self.server_name,
        };
        loop {
            let (request, fds) = match receive(socket) {
                Ok(Some(received)) => received,
                // End-of-file: the front dropped us or died.
                // SAFETY: as above.
                Ok(None) => unsafe { libc::_exit(0) },
                Err(message) => {
                    let refused = FromZygote::Refused {
                        kind: ErrorKind::Protocol,
                        errno: None,
                        message,
                    };
                    say(&refused, &[]);
                    continue;
                }
            };
            // A panic while checking a request (in a worker family's name
            // check, say) fails that request, not the zygote.
            let forked = panic::catch_unwind(AssertUnwindSafe(|| match request {
                ToZygote::Pool { worker } => zygote.pool_child(&worker, fds),
                ToZygote::Spawn(assignment) => zygote.worker(*assignment, fds),
                ToZygote::InMemfd => {
                    Err(LaunchError::new(ErrorKind::Protocol, "nested memfd".into()))
                }
            }))
            .unwrap_or_else(|panic| Err(checking_panicked(&*panic)));
            match forked {
                Ok((pid, pidfd)) => say(&FromZygote::Forked { pid }, &[pidfd.as_fd()]),
                Err(e) => {
                    let refused = FromZygote::Refused {
                        kind: e.kind,
                        errno: e.errno,
                        message: e.message,
                    };
                    say(&refused, &[]);
                    if zygote.doomed.get() {
                        // No fork of it is safe again; the front starts a new
                        // generation once this one has gone.
                        // SAFETY: as above.
                        unsafe { libc::_exit(1) };
                    }
                }
            }
        }
    }
}

/// Sends `message` (with `fds`) to the front: in a memfd if it is too big
/// for a datagram (only the first word is ever that big; it carries no fd).
/// A front that has gone is seen at the next receive.
fn say(socket: BorrowedFd<'_>, message: &FromZygote, fds: &[BorrowedFd<'_>]) {
    let bytes = encode(message).expect("the zygote's messages encode");
    if bytes.len() <= MAX_MESSAGE {
        let _ = send_datagram(socket, &bytes, fds, libc::MSG_NOSIGNAL);
        return;
    }
    let (marker, file) = match memfd_holding(&bytes) {
        Ok(file) => (FromZygote::InMemfd, Some(file)),
        Err(e) => {
            let message = format!("the zygote cannot hand over what it loaded: {e}");
            (FromZygote::Failed { message }, None)
        }
    };
    let marker = encode(&marker).expect("the zygote's messages encode");
    let fds: Vec<_> = file.iter().map(|f| f.as_fd()).collect();
    let _ = send_datagram(socket, &marker, &fds, libc::MSG_NOSIGNAL);
}

/// The error for a request whose check panicked.
fn checking_panicked(panic: &(dyn std::any::Any + Send)) -> LaunchError {
    LaunchError::new(
        ErrorKind::Invalid,
        format!(
            "the server's zygote panicked checking this request: {}",
            panic_message(panic)
        ),
    )
}

/// Runs the preloads under `policy`, checks every pool's worker name
/// against what they loaded, and arms the thread guard (here: the front's
/// reads the front's threads, and knows none of the preloads').
fn preload(
    launcher: &Launcher,
    policy: ThreadPolicy,
    pools: &[String],
) -> Result<ForkGuard, String> {
    launcher.modules.load(policy).map_err(|e| e.to_string())?;
    for worker in pools {
        panic::catch_unwind(AssertUnwindSafe(|| launcher.modules.find(worker).map(drop)))
            .unwrap_or_else(|panic| Err(checking_panicked(&*panic).message))
            .map_err(|why| format!("--pool {worker}: {why}"))?;
    }
    ForkGuard::arm(policy).map_err(|why| format!("--allow-dormant-threads: {why}"))
}

/// The next request, with its fds; None at end-of-file (or a socket that
/// fails), Err for a request that cannot be read, to refuse.
fn receive(socket: BorrowedFd<'_>) -> Result<Option<(ToZygote, Vec<OwnedFd>)>, String> {
    let datagram = match recv_datagram(socket, MAX_MESSAGE, pool_child::MAX_FDS, 0) {
        Ok(Some(datagram)) => datagram,
        Ok(None) | Err(_) => return Ok(None),
    };
    if datagram.truncated || datagram.fds_truncated {
        return Err("the zygote's request was cut short".into());
    }
    let unreadable =
        |e: forkserver_protocol::CodecError| format!("the zygote cannot read the request: {e}");
    let mut fds = datagram.fds;
    let request = pool_child::decode_assignment::<ToZygote>(&datagram.bytes).map_err(unreadable)?;
    let ToZygote::InMemfd = request else {
        return Ok(Some((request, fds)));
    };
    let file = fds.pop().ok_or("the zygote's request has no memfd")?;
    let bytes = sys::read_regular_file(file.as_fd(), MAX_REQUEST_BYTES)
        .map_err(|e| format!("the zygote cannot read the request's memfd: {e}"))?;
    let request = pool_child::decode_assignment::<ToZygote>(&bytes).map_err(unreadable)?;
    Ok(Some((request, fds)))
}

/// What the zygote forks with.
struct Forking<'z> {
    launcher: &'z Launcher,
    /// How its children become the front's; Clone until clone3 is refused.
    fork: Cell<SiblingFork>,
    guard: &'z ForkGuard,
    /// The guard refused for good: no fork of this zygote is safe again,
    /// and it exits (the front starts a new generation).
    doomed: Cell<bool>,
    /// The server's process name, which each child takes back.
    server_name: [u8; 16],
}

impl Forking<'_> {
    /// An idle pool child for `worker`; `fds` are its control socket's end
    /// and its report pipe's write end.
    fn pool_child(
        &self,
        worker: &str,
        fds: Vec<OwnedFd>,
    ) -> Result<(libc::pid_t, OwnedFd), LaunchError> {
        let Ok([control, report]) = <[OwnedFd; 2]>::try_from(fds) else {
            return Err(LaunchError::new(
                ErrorKind::Protocol,
                "pool: two fds".into(),
            ));
        };
        let reporter = Reporter::new(report.as_raw_fd());
        self.fork(|| {
            unwind_barrier(&reporter, || {
                // SAFETY: a fresh child of the zygote, a copy of the front,
                // with the control socket and report pipe open.
                unsafe { pool_child::run(self.launcher, worker, control.as_raw_fd(), &reporter) }
            })
        })
    }

    /// A worker for `assignment`, checked again here (who may it become?
    /// does the worker exist, in what this zygote loaded?) and planned
    /// before the fork; `fds` are its report pipe's write end, then the
    /// request's fds.
    fn worker(
        &self,
        assignment: Assignment,
        mut fds: Vec<OwnedFd>,
    ) -> Result<(libc::pid_t, OwnedFd), LaunchError> {
        if fds.is_empty() {
            return Err(LaunchError::new(
                ErrorKind::Protocol,
                "spawn: no report pipe".into(),
            ));
        }
        let report = fds.remove(0);
        let request = assignment.spawn;
        let credentials = child_rights(&assignment.peer, &request, assignment.server_uid)
            .map_err(|message| LaunchError::new(ErrorKind::Denied, message))?;
        let mut made = PlanFds::default();
        let mut plan =
            self.launcher
                .plan(&request, &assignment.peer, &fds, credentials, &mut made)?;
        plan.controlling_tty |= assignment.controlling_tty;
        let wants_cgroup = plan.cgroup.is_some();
        let reporter = Reporter::new(report.as_raw_fd());
        let forked = self.fork(|| {
            unwind_barrier(&reporter, || {
                // SAFETY: a fresh child of the zygote, single-threaded, with
                // every fd of the plan (in `fds`) and the report pipe open.
                unsafe { setup::run(plan, &reporter) }
            })
        })?;
        if wants_cgroup {
            // A worker runs preloaded code, so it is forked, and moves itself.
            crate::launch::log_cgroup(forked.0, false);
        }
        Ok(forked)
    }

    /// A sibling fork (`sys::sibling`) after the thread guard (what the
    /// request's check ran may have started a thread), with the embedder's
    /// fork hooks around it; the child takes the server's name back. A
    /// clone3 refused for good (a seccomp filter: EPERM, ENOSYS) turns to
    /// the Adopted way, logged once.
    fn fork(
        &self,
        in_child: impl FnOnce() -> Infallible,
    ) -> Result<(libc::pid_t, OwnedFd), LaunchError> {
        if let Err(refusal) = self.guard.check() {
            self.doomed.set(refusal.lasting);
            let message = if refusal.lasting {
                format!(
                    "the zygote is no longer safe to fork, and exits (a new generation starts): {}",
                    refusal.why
                )
            } else {
                format!("the zygote cannot fork now: {}", refusal.why)
            };
            return Err(LaunchError::new(ErrorKind::Threads, message));
        }
        // Copy, so that a clone refused can be followed by the other way.
        let in_child = Cell::new(Some(in_child));
        let run = || {
            sys::set_thread_name(&self.server_name);
            in_child.take().expect("a child runs its work once")()
        };
        self.launcher.modules.before_fork();
        // SAFETY: the guard has just allowed a fork (the zygote is
        // single-threaded, or its other threads are tolerated and the way
        // is Adopted), and it is inside no lock of the libc's.
        let mut forked = unsafe { self.fork.get().fork(run) };
        if let (SiblingFork::Clone(_), Err(e)) = (self.fork.get(), &forked) {
            if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) {
                log!(
                    Level::Warn,
                    "zygote {}: clone3(CLONE_PARENT) is refused ({e}); it forks each child twice from now on (adopted by the server)",
                    sys::getpid()
                );
                self.fork.set(SiblingFork::Adopted);
                // SAFETY: as above.
                forked = unsafe { SiblingFork::Adopted.fork(run) };
            }
        }
        self.launcher.modules.after_fork_in_parent();
        forked.map_err(|e| LaunchError::os(ErrorKind::Resource, "the zygote's fork failed", e))
    }
}
