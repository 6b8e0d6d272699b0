//! The zygote: a copy of the front, forked once per *generation*, that runs
//! the preloads and then forks every child that needs them (pool children
//! and workers), so that the front never runs preloaded code and a new
//! generation can load new code from disk while the old one serves.
//!
//! Why a separate process: the front owns the socket, the connections, the
//! ledger and every child; a crash in preloaded code (a C extension's
//! segfault), or the time a fork of a big process holds its only thread,
//! must cost none of them. And code preloaded in a process cannot be
//! unloaded: only a fresh copy of a front that never loaded it can load a
//! new version (a reload).
//!
//! How: the front forks the zygote (with the embedder's fork hooks around
//! that fork, as around any); the zygote closes the front's fds, runs the
//! preloads ([`Modules::load`], the thread guard after each), checks the
//! pools' worker names, and says [`FromZygote::Ready`] with the modules it
//! loaded, or [`FromZygote::Failed`] with why. Then it answers requests,
//! one datagram each, in order:
//! - [`ToZygote::Pool`] (fds: the child's end of a control socket, the
//!   write end of its report pipe): an idle pool child, which runs
//!   `pool_child::run` as one forked by the front would;
//! - [`ToZygote::Spawn`] (fds: the report pipe's write end, then the
//!   request's fds; a big one in a memfd, last): a worker for a request the
//!   front checked and made pipes for. The zygote checks it again (the
//!   worker's name, against what it loaded), plans it and forks the child,
//!   which runs the ordinary setup.
//!
//! Each child is made a sibling of the zygote (`sys::sibling`: by
//! `clone3(CLONE_PARENT)`, or forked twice and adopted by the front, a
//! subreaper), so it is the front's child: reaped, signalled and reported
//! there, its parent-death signal tied to the front, and it outlives the
//! zygote. The answer is [`FromZygote::Forked`] with a pidfd, or
//! [`FromZygote::Refused`]. The embedder's fork hooks run around each fork
//! (an interpreter's import lock). The zygote's own thread guard, armed
//! after its preloads with the server's policy, is checked before each.
//!
//! A zygote whose preloads left threads (tolerated: `--allow-dormant-threads`,
//! every Python context's server) cannot clone; it forks a copy of itself
//! (which has one thread), adopted by the front, and the copy serves: its
//! `Ready` names it, and the front kills the original.
//!
//! The zygote keeps every signal blocked (as the fork left them: the
//! front's handlers must not run here; each child resets them), and no fd
//! but its socket, /dev/null and stdio. `ps` shows it as `zygote`. It ends
//! at its socket's end-of-file: when the front lets it go (a newer
//! generation is ready, shutdown) or dies.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use forkserver_protocol::{
    decode, encode, memfd_holding, recv_datagram, send_datagram, seqpacket_pair, ErrorKind,
    ModuleInfo, RunAs, Spawn,
};
use serde::{Deserialize, Serialize};

use super::fork::{control_socket, report_pipe};
use super::pool_child::{self, Assignment};
use super::{LaunchError, Launched, Launcher};
use crate::peer::Peer;
use crate::pool::PoolChild;
use crate::sys::{self, SiblingFork};
use crate::threads::ThreadPolicy;
use crate::watch::PreloadedFile;

mod life;

/// What the front asks of its zygote.
#[derive(Debug, Serialize, Deserialize)]
enum ToZygote {
    /// An idle child for `worker`'s pool.
    Pool { worker: String },
    /// A worker for this request (as a pool child would get it).
    Spawn(Box<Assignment>),
    /// The request is in the last fd (a memfd): too big for a datagram.
    InMemfd,
}

/// What the zygote says: first `Ready` or `Failed`, then one answer per
/// request, in order.
#[derive(Debug, Serialize, Deserialize)]
enum FromZygote {
    Ready(Ready),
    Failed {
        message: String,
    },
    /// With a pidfd for `pid`.
    Forked {
        pid: i32,
    },
    Refused {
        kind: ErrorKind,
        errno: Option<i32>,
        message: String,
    },
    /// The message is in the fd sent with this one (a memfd): too big for
    /// a datagram (a Python zygote's list of preloaded files, say).
    InMemfd,
}

/// What a zygote loaded: its modules, and the files they came from.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Ready {
    /// The process that serves: the zygote, or the copy of it without the
    /// threads its preloads left (`life.rs`, `shed_threads`).
    pub(crate) pid: libc::pid_t,
    pub(crate) modules: Vec<ModuleInfo>,
    pub(crate) files: Vec<PreloadedFile>,
}

/// The largest message on the zygote's socket; a bigger request goes in a
/// memfd, as a pool child's assignment does.
const MAX_MESSAGE: usize = pool_child::INLINE_ASSIGNMENT_BYTES;

/// The largest request read from a memfd (see `pool_child`).
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// How long the front waits for the zygote to fork a worker before it
/// gives up on the zygote: a fork copies page tables (20 ms at 512 MB), so
/// this is only ever reached by a zygote that is stuck.
const SPAWN_ANSWER_WAIT_MS: i32 = 10_000;

/// The front's handle on a zygote.
pub(crate) struct Zygote {
    pid: libc::pid_t,
    socket: OwnedFd,
    /// Requests sent and not answered yet, in the order sent.
    asked: VecDeque<Asked>,
    /// Pool answers read while waiting for a spawn's.
    early: Vec<Answer>,
    /// Why it is of no use any more, found while waiting for a spawn's
    /// answer.
    broken: Option<String>,
}

/// The front's ends of a request.
enum Asked {
    Pool {
        worker: String,
        control: OwnedFd,
        report: OwnedFd,
    },
    Spawn,
}

/// A child the zygote made for a worker's pool (named), or why not.
pub(crate) type Answer = (String, Result<PoolChild, LaunchError>);

impl Launcher {
    /// Forks a zygote; it preloads under `policy`, checks `pools`' workers,
    /// and says whether it is ready on its socket ([`Zygote::wait_ready`],
    /// [`Zygote::ready`]). It makes its children with `fork` (the front
    /// must be a subreaper: `sys::become_subreaper`).
    ///
    /// `stderr_after_ready` (`--stderr-after-ready`, for the first
    /// generation only) is kept open in the zygote, which makes it its
    /// stderr once ready, as the front does: else the zygote would hold
    /// the start-up stderr open for the server's whole life.
    pub(crate) fn start_zygote(
        &self,
        fork: SiblingFork,
        policy: ThreadPolicy,
        pools: &[String],
        stderr_after_ready: Option<RawFd>,
    ) -> Result<Zygote, LaunchError> {
        let (socket, zygote_end) = seqpacket_pair()
            .map_err(|e| LaunchError::os(ErrorKind::Resource, "creating the zygote's socket", e))?;
        let forked = self.fork(None, |reporter, _| {
            // SAFETY: we are the freshly forked zygote; its socket, the
            // report pipe and /dev/null are open.
            unsafe {
                life::serve(
                    self,
                    zygote_end.as_raw_fd(),
                    reporter,
                    fork,
                    policy,
                    pools,
                    stderr_after_ready,
                )
            }
        })?;
        sys::set_nonblocking(socket.as_raw_fd())
            .map_err(|e| LaunchError::os(ErrorKind::Resource, "the zygote's socket", e))?;
        Ok(Zygote {
            pid: forked.pid,
            socket,
            asked: VecDeque::new(),
            early: Vec::new(),
            broken: None,
        })
    }
}

impl Zygote {
    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Waits as long as the preloads take for the zygote's first word:
    /// what it loaded, or why it could not.
    pub(crate) fn wait_ready(&mut self) -> Result<Ready, String> {
        loop {
            sys::wait_readable(self.socket.as_fd(), -1);
            if let Some(outcome) = self.ready() {
                return outcome;
            }
        }
    }

    /// The zygote's first word, if it has come (its socket is readable).
    pub(crate) fn ready(&mut self) -> Option<Result<Ready, String>> {
        match self.receive() {
            Err(None) => None,
            Err(Some(why)) => Some(Err(format!("the zygote {why}"))),
            Ok((FromZygote::Ready(ready), _)) => {
                if ready.pid != self.pid && ready.pid > 0 {
                    // The zygote's copy without threads serves; the
                    // zygote itself, waiting for its end, is of no use.
                    // SAFETY: kill on our own child, not yet reaped.
                    unsafe { libc::kill(self.pid, libc::SIGKILL) };
                    self.pid = ready.pid;
                }
                Some(Ok(ready))
            }
            Ok((FromZygote::Failed { message }, _)) => Some(Err(message)),
            Ok(_) => Some(Err("the zygote answered before it was ready".into())),
        }
    }

    /// Asks for an idle child for `worker`'s pool; it comes with
    /// [`answers`](Self::answers).
    pub(crate) fn ask(&mut self, worker: &str) -> Result<(), LaunchError> {
        let (control, child_end) = control_socket()?;
        let (report, report_write) = report_pipe()?;
        let request = ToZygote::Pool {
            worker: worker.to_owned(),
        };
        self.send(&request, vec![child_end, report_write])?;
        self.asked.push_back(Asked::Pool {
            worker: worker.to_owned(),
            control,
            report,
        });
        Ok(())
    }

    /// Has the zygote fork a worker for `request` from `peer` and waits
    /// for it (as long as the fork takes: the front would wait as long
    /// forking it itself). The request is checked here first, and its
    /// pipes made, as for a pool child (`Launcher::assignment`).
    pub(crate) fn spawn(
        &mut self,
        launcher: &Launcher,
        request: &Spawn,
        fds: Vec<OwnedFd>,
        credentials: Option<RunAs>,
        peer: &Peer,
    ) -> Result<Launched, LaunchError> {
        let (assignment, mut fds, client_ends) =
            launcher.assignment(request, fds, credentials, peer)?;
        let (report, report_write) = report_pipe()?;
        fds.insert(0, report_write);
        self.send(&ToZygote::Spawn(Box::new(assignment)), fds)?;
        self.asked.push_back(Asked::Spawn);
        loop {
            if !sys::wait_readable(self.socket.as_fd(), SPAWN_ANSWER_WAIT_MS) {
                let why = format!("did not answer within {} s", SPAWN_ANSWER_WAIT_MS / 1000);
                return Err(self.lost(why));
            }
            let (answer, pidfd) = match self.receive() {
                Ok(received) => received,
                Err(None) => continue,
                Err(Some(why)) => return Err(self.lost(why)),
            };
            match self.asked.pop_front() {
                Some(Asked::Spawn) => {}
                Some(Asked::Pool {
                    worker,
                    control,
                    report,
                }) => match pool_answer(answer, pidfd, control, report) {
                    Ok(child) => {
                        self.early.push((worker, child));
                        continue;
                    }
                    Err(why) => return Err(self.lost(why)),
                },
                None => return Err(self.lost("answered what was not asked".into())),
            }
            return match (answer, pidfd) {
                (FromZygote::Forked { pid }, Some(pidfd)) => Ok(Launched {
                    pid,
                    pidfd,
                    report,
                    client_ends,
                    pool_control: None,
                }),
                (
                    FromZygote::Refused {
                        kind,
                        errno,
                        message,
                    },
                    _,
                ) => Err(LaunchError {
                    kind,
                    errno,
                    message,
                }),
                _ => Err(self.lost("sent a malformed answer".into())),
            };
        }
    }

    /// Records that the zygote is of no use (`why`), for
    /// [`answers`](Self::answers) to say; the error for the request that
    /// found it.
    fn lost(&mut self, why: String) -> LaunchError {
        let error = LaunchError::new(ErrorKind::Resource, format!("the zygote {why}"));
        self.broken = Some(why);
        error
    }

    /// Whether [`answers`](Self::answers) has something to say that no
    /// event will announce: pool answers read while the front waited for a
    /// spawn's, or the zygote's end found then.
    pub(crate) fn has_news(&self) -> bool {
        !self.early.is_empty() || self.broken.is_some()
    }

    /// The pool children asked for that have been made since the last
    /// call, with their workers' names, and why the zygote is no use any
    /// more, if it is not: it is gone, or its fork failed (clone3 may be
    /// refused where fork is not, by a seccomp filter). What it was still
    /// asked for is then lost: a child made meanwhile reads the end-of-file
    /// of its control socket and exits.
    pub(crate) fn answers(&mut self) -> (Vec<Answer>, Option<String>) {
        let mut answers = std::mem::take(&mut self.early);
        if let Some(why) = &self.broken {
            return (answers, Some(why.clone()));
        }
        loop {
            let (answer, pidfd) = match self.receive() {
                Ok(received) => received,
                Err(None) => return (answers, None),
                Err(Some(why)) => return (answers, Some(why)),
            };
            let Some(Asked::Pool {
                worker,
                control,
                report,
            }) = self.asked.pop_front()
            else {
                return (answers, Some("answered what was not asked".to_owned()));
            };
            match pool_answer(answer, pidfd, control, report) {
                Ok(child) => answers.push((worker, child)),
                Err(why) => return (answers, Some(why)),
            }
        }
    }

    fn send(&self, request: &ToZygote, mut fds: Vec<OwnedFd>) -> Result<(), LaunchError> {
        let failed = |e| LaunchError::os(ErrorKind::Resource, "writing to the zygote", e);
        let mut bytes =
            encode(request).map_err(|e| LaunchError::new(ErrorKind::Invalid, e.to_string()))?;
        if bytes.len() > MAX_MESSAGE {
            fds.push(memfd_holding(&bytes).map_err(failed)?);
            bytes = encode(&ToZygote::InMemfd).expect("a unit variant encodes");
        }
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        send_datagram(
            self.socket.as_fd(),
            &bytes,
            &borrowed,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
        .map_err(failed)
    }

    /// One message from the zygote, with the pidfd it may carry; Err(None)
    /// if none is waiting, Err(Some(why)) if the zygote is gone or broken.
    fn receive(&mut self) -> Result<(FromZygote, Option<OwnedFd>), Option<String>> {
        let datagram = match recv_datagram(self.socket.as_fd(), MAX_MESSAGE, 1, libc::MSG_DONTWAIT)
        {
            Ok(Some(datagram)) => datagram,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Err(None),
            Ok(None) => return Err(Some("closed its socket".to_owned())),
            Err(e) => return Err(Some(format!("cannot be read from: {e}"))),
        };
        let malformed = |e: String| Some(format!("sent a malformed message: {e}"));
        let message =
            decode::<FromZygote>(&datagram.bytes).map_err(|e| malformed(e.to_string()))?;
        let fd = datagram.fds.into_iter().next();
        let FromZygote::InMemfd = message else {
            return Ok((message, fd));
        };
        let file = fd.ok_or_else(|| malformed("no memfd".into()))?;
        let bytes = sys::read_regular_file(file.as_fd(), MAX_REQUEST_BYTES)
            .map_err(|e| malformed(e.to_string()))?;
        let message = decode::<FromZygote>(&bytes).map_err(|e| malformed(e.to_string()))?;
        Ok((message, None))
    }
}

impl AsFd for Zygote {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// The idle child an answer names, unless it died already (then the front
/// may have reaped it before it knew it was one of its pools'); Err says
/// why the zygote is no use.
fn pool_answer(
    answer: FromZygote,
    pidfd: Option<OwnedFd>,
    control: OwnedFd,
    report: OwnedFd,
) -> Result<Result<PoolChild, LaunchError>, String> {
    let (pid, pidfd) = match (answer, pidfd) {
        (FromZygote::Forked { pid }, Some(pidfd)) => (pid, pidfd),
        (FromZygote::Refused { message, .. }, _) => return Err(message),
        _ => return Err("sent a malformed answer".into()),
    };
    if sys::has_exited(pidfd.as_fd()) {
        return Ok(Err(LaunchError::new(
            ErrorKind::Resource,
            format!("idle child {pid} died as it started"),
        )));
    }
    Ok(Ok(PoolChild {
        pid,
        pidfd,
        control,
        report,
        ready: false,
    }))
}
