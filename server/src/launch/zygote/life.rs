//! The zygote's life, in the zygote: preload, say so, then fork a child
//! for each request of the front's until it lets go (see `mod.rs` for the
//! why and the messages).

use std::convert::Infallible;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};

use forkserver_protocol::{encode, memfd_holding, recv_datagram, send_datagram, ErrorKind};

use super::{FromZygote, Preloading, Ready, ToZygote, MAX_MESSAGE, MAX_REQUEST_BYTES};
use crate::launch::fork::unwind_barrier;
use crate::launch::plan::PlanFds;
use crate::launch::pool_child::{self, Assignment};
use crate::launch::report::Reporter;
use crate::launch::setup::{self, close_except};
use crate::launch::{LaunchError, Launcher};
use crate::modules::panic_message;
use crate::peer::child_rights;
use crate::sys::{self, GlibcThread};
use crate::threads::{self, ThreadCount};

/// The zygote's life, in the zygote: keep only its socket (and stdio,
/// /dev/null and its report pipe, which it never uses but for the fork's
/// panic record, so that its number is never reused), preload, say so,
/// then make one child per request until the front closes the socket.
///
/// # Safety
/// Call only in the freshly forked child of a single-threaded front, with
/// `socket`, the reporter's pipe and the launcher's /dev/null open, and
/// `thread` found in the front.
pub(super) unsafe fn serve(
    launcher: &Launcher,
    socket: RawFd,
    reporter: &Reporter,
    thread: &GlibcThread,
    preloading: Preloading,
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
    sys::set_thread_name(match preloading {
        Preloading::InZygote => b"zygote\0\0\0\0\0\0\0\0\0\0",
        Preloading::RanInFront => b"forker\0\0\0\0\0\0\0\0\0\0",
    });
    let say = |message: &FromZygote, fds: &[BorrowedFd<'_>]| {
        let bytes = encode(message).expect("the zygote's messages encode");
        // A front that has gone is seen at the next receive.
        if bytes.len() <= MAX_MESSAGE {
            let _ = send_datagram(socket, &bytes, fds, libc::MSG_NOSIGNAL);
        } else {
            // Only the first word is ever this big; it carries no fd.
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
    };
    if let Err(message) = preload(launcher, preloading, pools) {
        say(&FromZygote::Failed { message }, &[]);
        // SAFETY: _exit ends the zygote without the front's atexit handlers.
        unsafe { libc::_exit(1) };
    }
    let ready = Ready {
        modules: launcher.modules.infos().to_vec(),
        files: launcher.modules.preloaded_files(),
    };
    say(&FromZygote::Ready(ready), &[]);
    if let Some(fd) = stderr_after_ready {
        // Checked by the front before it started us; a failure here leaves
        // the start-up stderr, which is all that could be done.
        let _ = sys::inherited_fd(fd).and_then(sys::replace_stderr);
    }
    let thread_count = ThreadCount::open();
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
        let zygote = Forking {
            launcher,
            thread,
            thread_count: &thread_count,
            server_name,
        };
        // A panic while checking a request (in a worker family's name
        // check, say) fails that request, not the zygote.
        let forked = panic::catch_unwind(AssertUnwindSafe(|| match request {
            ToZygote::Pool { worker } => zygote.pool_child(&worker, fds),
            ToZygote::Spawn(assignment) => zygote.worker(*assignment, fds),
            ToZygote::InMemfd => Err(LaunchError::new(ErrorKind::Protocol, "nested memfd".into())),
        }))
        .unwrap_or_else(|panic| Err(checking_panicked(&*panic)));
        match forked {
            Ok((pid, pidfd)) => say(&FromZygote::Forked { pid }, &[pidfd.as_fd()]),
            Err(e) => {
                let threads = e.kind == ErrorKind::Threads;
                let refused = FromZygote::Refused {
                    kind: e.kind,
                    errno: e.errno,
                    message: e.message,
                };
                say(&refused, &[]);
                if threads {
                    // No fork of it is safe again; the front starts a new
                    // generation once this one has gone.
                    // SAFETY: as above.
                    unsafe { libc::_exit(1) };
                }
            }
        }
    }
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

/// Runs the preloads (unless they ran in the front), then checks every
/// pool's worker name against what they loaded.
fn preload(launcher: &Launcher, preloading: Preloading, pools: &[String]) -> Result<(), String> {
    if preloading == Preloading::InZygote {
        let policy = threads::ThreadPolicy::Refuse;
        launcher.modules.load(policy).map_err(|e| e.to_string())?;
    }
    for worker in pools {
        panic::catch_unwind(AssertUnwindSafe(|| launcher.modules.find(worker).map(drop)))
            .unwrap_or_else(|panic| Err(checking_panicked(&*panic).message))
            .map_err(|why| format!("--pool {worker}: {why}"))?;
    }
    Ok(())
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
    /// Found in the front, which forked the zygote.
    thread: &'z GlibcThread,
    thread_count: &'z ThreadCount,
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

    /// `sys::fork_sibling` after the thread guard (what the request's check
    /// ran may have started a thread), with the embedder's fork hooks
    /// around it; the child takes the server's name back.
    fn fork(
        &self,
        in_child: impl FnOnce() -> Infallible,
    ) -> Result<(libc::pid_t, OwnedFd), LaunchError> {
        self.thread_count
            .ensure_one()
            .map_err(|threads| {
                LaunchError::new(
                    ErrorKind::Threads,
                    format!("the zygote is no longer single-threaded, and exits (a new generation starts): {threads}"),
                )
            })?;
        self.launcher.modules.before_fork();
        let in_child = || {
            sys::set_thread_name(&self.server_name);
            in_child()
        };
        // SAFETY: the zygote is single-threaded (just checked) and inside
        // no lock of glibc's; `thread` was found in the front, which forked
        // it.
        let forked = unsafe { sys::fork_sibling(self.thread, in_child) };
        self.launcher.modules.after_fork_in_parent();
        forked.map_err(|e| LaunchError::os(ErrorKind::Resource, "the zygote's fork failed", e))
    }
}
