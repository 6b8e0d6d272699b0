//! The shared connection: one socket, many waiters.
//!
//! Replies and events are routed by request id. Whoever needs a message and
//! finds none waiting becomes the reader: it receives one datagram with the
//! lock released, files it under its id, and wakes the others. So any number
//! of `Child`ren, on any threads, can wait on one connection without a
//! background thread.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use forkserver_protocol::{
    connect_seqpacket, recv_datagram, send_datagram, ClientMessage, Limits, ModuleInfo,
    ServerMessage,
};

use crate::wire::{self, Route};
use crate::Error;

/// A message and the fds that came with it.
pub(crate) struct Incoming {
    pub(crate) message: ServerMessage,
    pub(crate) fds: Vec<OwnedFd>,
}

#[derive(Default)]
struct State {
    /// A thread is blocked receiving; others wait on the condvar.
    reading: bool,
    inbox: HashMap<u64, VecDeque<Incoming>>,
    /// Ids whose handles were dropped: their messages are discarded.
    abandoned: HashSet<u64>,
    /// Set once the connection failed; every waiter gets it.
    broken: Option<String>,
}

/// What the server said in `Welcome`.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// The server's package version.
    pub version: String,
    /// The server's pid.
    pub pid: u32,
    /// The limits it enforces.
    pub limits: Limits,
    /// The modules it preloaded.
    pub modules: Vec<ModuleInfo>,
    /// The embedded workers it offers.
    pub workers: Vec<String>,
}

pub(crate) struct Connection {
    socket: OwnedFd,
    pub(crate) info: ServerInfo,
    next_id: AtomicU64,
    state: Mutex<State>,
    arrived: Condvar,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.info)
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub(crate) fn open(path: &Path, client_name: &str) -> Result<Connection, Error> {
        let socket = connect_seqpacket(path).map_err(|source| Error::Connect {
            path: path.to_owned(),
            source,
        })?;
        // A server that refuses us (say, our uid) sends its reason and closes
        // at once, so our hello may meet a closed socket: read the reason
        // before reporting the failed send.
        match send_bytes(socket.as_fd(), &wire::hello(client_name)?, &[]) {
            Ok(()) | Err(Error::Disconnected(_)) => {}
            Err(e) => return Err(e),
        }
        // The server's limits are not known yet; a Welcome is small.
        let info = wire::server_info(
            receive_after_reset(socket.as_fd(), &Limits::default())?,
            path,
        )?;
        Ok(Connection {
            socket,
            info,
            next_id: AtomicU64::new(1),
            state: Mutex::default(),
            arrived: Condvar::new(),
        })
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends `message` with `fds`; one larger than the server's
    /// `max_message_bytes` goes as a `bulk` file (a memfd).
    pub(crate) fn send(
        &self,
        message: &ClientMessage,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        let outgoing = wire::outgoing(message, fds.len(), &self.info.limits)?;
        let fds = outgoing.fds(fds);
        send_bytes(self.socket.as_fd(), &outgoing.bytes, &fds)
    }

    /// Whether the server is still on the other end: the connection has
    /// not failed, and the server has not hung up (it died, or closed this
    /// connection) without our having read it yet.
    pub(crate) fn is_alive(&self) -> bool {
        self.lock().broken.is_none() && !hung_up(self.socket.as_fd())
    }

    /// Takes the first message for `id` that `wanted` accepts. With `block`,
    /// waits for one; without, reads only what has already arrived and
    /// returns `Ok(None)` if there is none.
    pub(crate) fn take(
        &self,
        id: u64,
        block: bool,
        wanted: impl Fn(&ServerMessage) -> bool,
    ) -> Result<Option<Incoming>, Error> {
        let mut state = self.lock();
        loop {
            if let Some(queue) = state.inbox.get_mut(&id) {
                if let Some(pos) = queue.iter().position(|m| wanted(&m.message)) {
                    let found = queue.remove(pos);
                    if queue.is_empty() {
                        state.inbox.remove(&id);
                    }
                    return Ok(found);
                }
            }
            if let Some(why) = &state.broken {
                return Err(Error::Disconnected(why.clone()));
            }
            if state.reading {
                if !block {
                    return Ok(None);
                }
                state = self
                    .arrived
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            state.reading = true;
            drop(state);
            let flags = if block { 0 } else { libc::MSG_DONTWAIT };
            let received = receive(self.socket.as_fd(), &self.info.limits, flags);
            state = self.lock();
            state.reading = false;
            self.arrived.notify_all();
            match received {
                Ok(Some(incoming)) => route(&mut state, incoming),
                Ok(None) => state.broken = Some("the server closed the connection".into()),
                Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => state.broken = Some(e.to_string()),
            }
        }
    }

    /// Discards everything queued or still to come for `id`.
    pub(crate) fn abandon(&self, id: u64) {
        let mut state = self.lock();
        state.inbox.remove(&id);
        state.abandoned.insert(id);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent (every
        // update is a single insert or remove), so poisoning is ignored.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether the server hung up on `socket` (it died or closed it), read or
/// not.
pub(crate) fn hung_up(socket: BorrowedFd<'_>) -> bool {
    let mut poll = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd of ours, no waiting.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
}

/// Files a message under its id, or records a fatal error.
fn route(state: &mut State, incoming: Incoming) {
    match wire::route(&incoming.message, &mut state.abandoned) {
        Route::To(id) => state.inbox.entry(id).or_default().push_back(incoming),
        Route::Broken(why) => state.broken = Some(why),
        Route::Nowhere => {}
    }
}

fn send_bytes(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
    send_datagram(socket, bytes, fds, 0).map_err(|e| wire::send_error(e, bytes.len()))
}

/// Like a blocking [`receive`], but a server that closed while our request
/// sat unread makes the kernel report ECONNRESET once, ahead of the reply it
/// had already sent (its reason for closing): read on past the reset.
fn receive_after_reset(socket: BorrowedFd<'_>, limits: &Limits) -> Result<Option<Incoming>, Error> {
    match receive(socket, limits, 0) {
        Err(Error::Io(e)) if e.raw_os_error() == Some(libc::ECONNRESET) => {
            match receive(socket, limits, libc::MSG_DONTWAIT) {
                Ok(Some(reply)) => Ok(Some(reply)),
                _ => Err(Error::Io(e)),
            }
        }
        other => other,
    }
}

fn receive(socket: BorrowedFd<'_>, limits: &Limits, flags: i32) -> Result<Option<Incoming>, Error> {
    let datagram = recv_datagram(
        socket,
        limits.max_message_bytes as usize,
        wire::MAX_REPLY_FDS,
        flags,
    )?;
    wire::incoming(datagram, limits)
}
