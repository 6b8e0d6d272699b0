//! The async connection: one socket, one reader task, many waiters.
//!
//! The reader task receives every message and files it under its request
//! id, waking that id's waiter (a `Notify` per id: a thousand children
//! waiting on one connection do not wake each other). A message stays
//! filed until a waiter takes it, so a waiting future that is dropped loses
//! nothing: the next one finds it; a slot whose messages were all taken
//! goes, so a long-lived connection holds nothing for children already
//! waited for. When the connection ends, every waiter is woken and gets the
//! reason.
//!
//! The reader task lives in the runtime the connection was made in. If
//! that runtime shuts down first, the task is dropped; the next waiter,
//! in whatever runtime it runs, starts a new reader there on the same
//! socket (registered anew with that runtime), as tokio's own child
//! handles keep working when awaited in another runtime.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ::tokio::io::unix::AsyncFd;
use ::tokio::sync::{Notify, Semaphore};
use ::tokio::task::JoinHandle;
use forkserver_protocol::{
    connect_seqpacket, recv_datagram, send_datagram, ClientMessage, Limits, ServerMessage,
};

use crate::connection::{Incoming, ServerInfo};
use crate::wire::{self, Route};
use crate::Error;

/// One waiter's messages.
#[derive(Default)]
struct Slot {
    queue: VecDeque<Incoming>,
    arrived: Arc<Notify>,
}

#[derive(Default)]
struct Inbox {
    slots: HashMap<u64, Slot>,
    /// Ids whose handles were dropped: their messages are discarded.
    abandoned: HashSet<u64>,
    /// Set once the connection failed; every waiter gets it.
    broken: Option<String>,
}

struct Shared {
    /// The socket, registered with the runtime of the current reader.
    socket: Mutex<Arc<AsyncFd<OwnedFd>>>,
    /// The current reader task; None once it was dropped with its runtime.
    reader: Mutex<Option<JoinHandle<()>>>,
    info: ServerInfo,
    next_id: AtomicU64,
    inbox: Mutex<Inbox>,
    /// Spawns in flight, at most the server's `max_pending_per_connection`:
    /// a thousand spawns at once wait here rather than be refused there.
    starting: Semaphore,
}

/// A connection and its reader task; the task stops when the last handle
/// (client, command, child) is dropped, which closes the socket.
pub(crate) struct AsyncConnection {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AsyncConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncConnection")
            .field("server", &self.shared.info)
            .finish_non_exhaustive()
    }
}

impl Drop for AsyncConnection {
    fn drop(&mut self) {
        if let Some(reader) = self
            .shared
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            reader.abort();
        }
    }
}

impl AsyncConnection {
    /// Connects and does the handshake; must run inside a tokio runtime.
    pub(crate) async fn open(path: &Path, client_name: &str) -> Result<AsyncConnection, Error> {
        let socket = connect_seqpacket(path).map_err(|source| Error::Connect {
            path: path.to_owned(),
            source,
        })?;
        set_nonblocking(socket.as_fd())?;
        // SAFETY: an OwnedFd keeps its one fd open, the same file, for as
        // long as the AsyncFd that owns it lives.
        let socket = unsafe { AsyncFd::register(socket) }.map_err(|e| Error::Io(e.into()))?;
        // As in the blocking client: a refusing server closes at once, so
        // read its reason even if our hello met a closed socket.
        match send(&socket, &wire::hello(client_name)?, &[]).await {
            Ok(()) | Err(Error::Disconnected(_)) => {}
            Err(e) => return Err(e),
        }
        let welcome = match receive(&socket, &Limits::default()).await {
            Err(Error::Io(e)) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                receive(&socket, &Limits::default())
                    .await
                    .or(Err(Error::Io(e)))?
            }
            other => other?,
        };
        let info = wire::server_info(welcome, path)?;
        let pending = info.limits.max_pending_per_connection.max(1) as usize;
        let shared = Arc::new(Shared {
            socket: Mutex::new(Arc::new(socket)),
            reader: Mutex::new(None),
            info,
            next_id: AtomicU64::new(1),
            inbox: Mutex::default(),
            starting: Semaphore::new(pending),
        });
        start_reader(&shared);
        Ok(AsyncConnection { shared })
    }

    /// Whether the server is still on the other end (as the blocking
    /// connection's `is_alive`).
    pub(crate) fn is_alive(&self) -> bool {
        self.lock().broken.is_none()
            && !crate::connection::hung_up(self.shared.socket().get_ref().as_fd())
    }

    pub(crate) fn info(&self) -> &ServerInfo {
        &self.shared.info
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Waits for room to start one more spawn (see `Shared::starting`).
    pub(crate) async fn start_permit(&self) -> ::tokio::sync::SemaphorePermit<'_> {
        self.shared
            .starting
            .acquire()
            .await
            .expect("the semaphore is never closed")
    }

    /// Sends `message` with `fds` (a `bulk` file if it is too big).
    pub(crate) async fn send(
        &self,
        message: &ClientMessage,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        if let Some(why) = self.lock().broken.clone() {
            return Err(Error::Disconnected(why));
        }
        let outgoing = wire::outgoing(message, fds.len(), &self.shared.info.limits)?;
        let fds = outgoing.fds(fds);
        self.ensure_reader()?;
        let socket = self.shared.socket();
        send(&socket, &outgoing.bytes, &fds).await
    }

    /// The first message for `id` that `wanted` accepts, waiting for it.
    /// Cancel-safe: a message is removed only when returned.
    pub(crate) async fn take(
        &self,
        id: u64,
        wanted: impl Fn(&ServerMessage) -> bool,
    ) -> Result<Incoming, Error> {
        loop {
            self.ensure_reader()?;
            let arrived = {
                let mut inbox = self.lock();
                if let Some(found) = take_filed(&mut inbox, id, &wanted) {
                    return Ok(found);
                }
                if let Some(why) = &inbox.broken {
                    return Err(Error::Disconnected(why.clone()));
                }
                inbox.slots.entry(id).or_default().arrived.clone()
            };
            arrived.notified().await;
        }
    }

    /// The first filed message for `id` that `wanted` accepts, if any, or
    /// the connection's failure.
    pub(crate) fn try_take(
        &self,
        id: u64,
        wanted: impl Fn(&ServerMessage) -> bool,
    ) -> Result<Option<Incoming>, Error> {
        let mut inbox = self.lock();
        match take_filed(&mut inbox, id, &wanted) {
            Some(found) => Ok(Some(found)),
            None => match &inbox.broken {
                Some(why) => Err(Error::Disconnected(why.clone())),
                None => Ok(None),
            },
        }
    }

    /// Discards everything filed or still to come for `id`.
    pub(crate) fn abandon(&self, id: u64) {
        let mut inbox = self.lock();
        inbox.slots.remove(&id);
        inbox.abandoned.insert(id);
    }

    fn lock(&self) -> MutexGuard<'_, Inbox> {
        lock(&self.shared)
    }

    /// Starts a reader in the current runtime if the last one was dropped
    /// with its own (see the module's docs).
    fn ensure_reader(&self) -> Result<(), Error> {
        let mut reader = self.shared.reader.lock().unwrap_or_else(|p| p.into_inner());
        if reader.is_some() || self.lock().broken.is_some() {
            return Ok(());
        }
        // The old registration belongs to a runtime that is gone: the same
        // socket, duplicated, is registered with this one.
        let old = self.shared.socket();
        let fd = old.get_ref().try_clone().map_err(Error::Io)?;
        // SAFETY: as in `open`: the OwnedFd keeps its fd open for as long as
        // the AsyncFd that owns it lives.
        let socket = unsafe { AsyncFd::register(fd) }.map_err(|e| Error::Io(e.into()))?;
        *self.shared.socket.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(socket);
        *reader = Some(::tokio::spawn(read_all(self.shared.clone())));
        Ok(())
    }
}

impl Shared {
    fn socket(&self) -> Arc<AsyncFd<OwnedFd>> {
        self.socket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Spawns the first reader task, in the runtime the connection is made in.
fn start_reader(shared: &Arc<Shared>) {
    let task = ::tokio::spawn(read_all(shared.clone()));
    *shared.reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
}

/// Marks the reader gone when its task is dropped unfinished (its runtime
/// shut down), and wakes every waiter so that one starts a new reader.
struct ReaderGone<'a>(&'a Shared);

impl Drop for ReaderGone<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() || lock(self.0).broken.is_some() {
            return;
        }
        self.0
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        wake_all(self.0);
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, Inbox> {
    // Every update is a single insert or remove: a panic while holding the
    // lock leaves the inbox consistent, so poisoning is ignored.
    shared
        .inbox
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn take_filed(
    inbox: &mut Inbox,
    id: u64,
    wanted: &impl Fn(&ServerMessage) -> bool,
) -> Option<Incoming> {
    let slot = inbox.slots.get_mut(&id)?;
    let at = slot.queue.iter().position(|m| wanted(&m.message))?;
    let found = slot.queue.remove(at);
    // Nothing left for this id: its slot goes (one waiter at a time takes
    // an id's messages, so no one is parked on its Notify now).
    if slot.queue.is_empty() {
        inbox.slots.remove(&id);
    }
    found
}

/// The reader task: files every message under its id until the connection
/// ends, then wakes every waiter with the reason.
async fn read_all(shared: Arc<Shared>) {
    let gone = ReaderGone(&shared);
    let socket = shared.socket();
    let why = loop {
        match receive(&socket, &shared.info.limits).await {
            Ok(Some(incoming)) => file(&shared, incoming),
            Ok(None) => break "the server closed the connection".to_owned(),
            Err(e) => break e.to_string(),
        }
        if lock(&shared).broken.is_some() {
            std::mem::forget(gone);
            return wake_all(&shared);
        }
    };
    lock(&shared).broken.get_or_insert(why);
    std::mem::forget(gone);
    wake_all(&shared);
}

fn file(shared: &Shared, incoming: Incoming) {
    let mut inbox = lock(shared);
    match wire::route(&incoming.message, &mut inbox.abandoned) {
        Route::To(id) => {
            let slot = inbox.slots.entry(id).or_default();
            slot.queue.push_back(incoming);
            // A permit is kept if nobody waits yet: the next wait returns
            // at once.
            slot.arrived.notify_one();
        }
        Route::Broken(why) => inbox.broken = Some(why),
        Route::Nowhere => {}
    }
}

fn wake_all(shared: &Shared) {
    for slot in lock(shared).slots.values() {
        slot.arrived.notify_one();
    }
}

async fn send(
    socket: &AsyncFd<OwnedFd>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), Error> {
    loop {
        let mut ready = socket.writable().await?;
        match ready.try_io(|s| send_datagram(s.as_fd(), bytes, fds, libc::MSG_DONTWAIT)) {
            Ok(result) => return result.map_err(|e| wire::send_error(e, bytes.len())),
            Err(_would_block) => continue,
        }
    }
}

async fn receive(socket: &AsyncFd<OwnedFd>, limits: &Limits) -> Result<Option<Incoming>, Error> {
    loop {
        let mut ready = socket.readable().await?;
        let received = ready.try_io(|s| {
            recv_datagram(
                s.as_fd(),
                limits.max_message_bytes as usize,
                wire::MAX_REPLY_FDS,
                libc::MSG_DONTWAIT,
            )
        });
        match received {
            Ok(datagram) => return wire::incoming(datagram?, limits),
            Err(_would_block) => continue,
        }
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL/F_SETFL on an fd we own only change its status flags.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags == -1 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == -1
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
