//! A client's way to its server across the server's deaths: the socket's
//! path and the connection in use, opened again when the one before is
//! gone.
//!
//! A server can die (SIGKILL, the OOM killer, `systemctl restart`) and
//! another start on the same socket. A request then goes to the socket
//! again: a connection whose server hung up (`POLLHUP`, or a read that met
//! its end) is replaced, waiting up to [`Link::wait`] for a server to
//! listen. A request whose send finds the connection closed is sent once
//! more on a new one: the old server never read it. One sent before the
//! server died, and not answered, is not sent again (the server may have
//! acted on it): it fails, as do the children started on the lost
//! connection ([`Error::ServerLost`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkserver_protocol::ClientMessage;

use crate::connection::Connection;
use crate::Error;

/// How long a request waits for a server to listen again, by default: as
/// long as `forkserver` commands wait for one that is starting.
pub(crate) const DEFAULT_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub(crate) struct Link {
    path: PathBuf,
    name: String,
    current: Mutex<Arc<Connection>>,
    wait: Mutex<Duration>,
}

impl Link {
    /// Connects to `path` now (no waiting: there is no server to wait for
    /// yet, as far as we know).
    pub(crate) fn open(path: &Path, name: &str) -> Result<Link, Error> {
        Ok(Link {
            path: path.to_owned(),
            name: name.to_owned(),
            current: Mutex::new(Arc::new(Connection::open(path, name)?)),
            wait: Mutex::new(DEFAULT_WAIT),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// What the server of the connection in use said about itself.
    pub(crate) fn info(&self) -> crate::ServerInfo {
        lock(&self.current).info.clone()
    }

    /// How long a request waits for a server to listen again.
    pub(crate) fn set_wait(&self, wait: Duration) {
        *lock(&self.wait) = wait;
    }

    /// The connection to use now: the current one if its server is still
    /// there, else a new one.
    pub(crate) fn connection(&self) -> Result<Arc<Connection>, Error> {
        let mut current = lock(&self.current);
        if current.is_alive() {
            return Ok(current.clone());
        }
        self.replace(&mut current)
    }

    /// Sends the request `build` makes (given its id) on the connection to
    /// use now; if that connection turns out closed as it is sent, on a new
    /// one. Returns the connection it went on, and its id there.
    pub(crate) fn send(
        &self,
        build: impl Fn(u64) -> ClientMessage,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(Arc<Connection>, u64), Error> {
        let connection = self.connection()?;
        let id = connection.next_id();
        match connection.send(&build(id), fds) {
            Ok(()) => Ok((connection, id)),
            Err(Error::Disconnected(_)) => {
                let connection = {
                    let mut current = lock(&self.current);
                    if Arc::ptr_eq(&current, &connection) {
                        self.replace(&mut current)?
                    } else {
                        current.clone()
                    }
                };
                let id = connection.next_id();
                connection.send(&build(id), fds)?;
                Ok((connection, id))
            }
            Err(e) => Err(e),
        }
    }

    /// Opens a new connection in `current`'s place, waiting for a server
    /// to listen; fails saying the server is gone and how to start one.
    fn replace(&self, current: &mut Arc<Connection>) -> Result<Arc<Connection>, Error> {
        let wait = *lock(&self.wait);
        let deadline = Instant::now() + wait;
        loop {
            match Connection::open(&self.path, &self.name) {
                Ok(connection) => {
                    *current = Arc::new(connection);
                    return Ok(current.clone());
                }
                Err(e) if nobody_listens(&e) && Instant::now() < deadline => {
                    std::thread::sleep(RETRY);
                }
                Err(e) => return Err(gone(e, wait)),
            }
        }
    }
}

/// How often a client looks for a server to listen again.
pub(crate) const RETRY: Duration = Duration::from_millis(20);

/// Whether a failed connect means that no server listens on the socket (yet).
pub(crate) fn nobody_listens(e: &Error) -> bool {
    matches!(e, Error::Connect { source, .. }
        if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED)))
}

/// A connect that failed after waiting `wait`: no server listens there
/// (`ServerGone`), or another failure as it was (the socket closed to us).
pub(crate) fn gone(e: Error, wait: Duration) -> Error {
    match e {
        e if !nobody_listens(&e) => e,
        Error::Connect { path, source } => Error::ServerGone {
            path,
            waited: wait,
            source,
        },
        e => e,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is one assignment: a panic cannot leave it half done.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
