//! A client for forkserver that feels like `std::process::Command`.
//!
//! [`Client::connect`] opens a connection to a running server (started with
//! `forkserver serve`); [`Client::command`] builds a [`Command`]; `spawn`
//! returns a [`Child`] with the child's pid, a pidfd, and the pipe ends you
//! asked for. The server forks the process, so the caller's size and threads
//! cost nothing.
//!
//! ```no_run
//! use forkserver_client::{Client, Stdio};
//!
//! # fn main() -> Result<(), forkserver_client::Error> {
//! let client = Client::connect("/run/user/1000/forkserver.sock")?;
//! let output = client.command("echo").arg("hello").output()?;
//! assert_eq!(output.stdout, b"hello\n");
//!
//! let mut child = client.command("cat").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
//! drop(child.stdin.take());
//! assert!(child.wait()?.success());
//! # Ok(())
//! # }
//! ```
//!
//! One connection carries any number of children at once; each can be
//! waited from any thread. Children are killed when their connection closes
//! (when the last `Client`, `Command` and `Child` sharing it are dropped)
//! unless spawned with [`Command::detach`].
//!
//! A child gets the caller's environment, working directory and umask, as
//! if the caller had started it (see [`Command`] for the opt-outs and for
//! what differs from `std::process`). [`Command::new`] works without a
//! `Client`, on a connection to the default socket shared by the process,
//! so moving code from std is one line:
//!
//! ```no_run
//! // use std::process::Command;
//! use forkserver_client::Command;
//!
//! let status = Command::new("ls").arg("-l").status()?;
//! assert!(status.success());
//! # Ok::<(), std::io::Error>(())
//! ```
#![deny(missing_docs)]

mod caller;
mod child;
mod command;
mod connection;
mod error;
mod link;
mod spawned;
mod stdio;
#[cfg(feature = "tokio")]
pub mod tokio;
mod wire;

use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub use child::Child;
pub use command::Command;
pub use connection::ServerInfo;
pub use error::Error;
pub use forkserver_protocol::{
    default_socket_path, ChildInfo, ErrorKind, ModuleInfo, ModuleKind, StatusReport,
};
pub use stdio::Stdio;

use connection::Connection;
use forkserver_protocol::{ClientMessage, ServerMessage};
use link::Link;

/// A connection to a forkserver. Cheap to clone; clones share the connection.
///
/// If the server dies, the next request connects to its socket again
/// (waiting up to 3 s, or [`reconnect_wait`](Client::reconnect_wait), for a
/// server to listen there) and goes to the new server; the children
/// started on the lost connection report [`Error::ServerLost`] from
/// `wait`, and can still be signalled through their pidfds.
#[derive(Debug, Clone)]
pub struct Client {
    link: Arc<Link>,
}

impl Client {
    /// Connects to the server listening on `path` and does the handshake.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        Ok(Client {
            link: Arc::new(Link::open(path.as_ref(), &client_name())?),
        })
    }

    /// Sets how long a request waits for a server to listen on the socket
    /// again when the one it had is gone (3 s unless set); then it fails
    /// with [`Error::ServerGone`]. Shared by this client's clones.
    pub fn reconnect_wait(self, wait: std::time::Duration) -> Client {
        self.link.set_wait(wait);
        self
    }

    /// Connects to the server at [`default_socket_path`].
    pub fn connect_default() -> Result<Client, Error> {
        Client::connect(default_socket_path())
    }

    /// What the server said about itself when this client last connected
    /// (at first, or again after a server was lost).
    pub fn server(&self) -> ServerInfo {
        self.link.info()
    }

    /// The socket this client connects to.
    pub fn socket(&self) -> &Path {
        self.link.path()
    }

    /// A command that runs `program` (looked up in the child's `PATH` if it
    /// has no `/`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        Command::on(self.link.clone(), program.as_ref())
    }

    /// A command that runs a preloaded worker in a forked child of the
    /// server, without exec: an embedded worker by name (see
    /// [`ServerInfo::workers`]), or `MODULE:SYMBOL` of a dynamic module.
    pub fn worker(&self, name: &str) -> Command {
        Command::worker_on(Some(self.link.clone()), name)
    }

    /// The server's pid, version, uptime, socket, RSS, modules with their
    /// preload times, counts of children, connections, spawns and failures.
    pub fn status(&self) -> Result<StatusReport, Error> {
        match self.call(|id| ClientMessage::Status { id })? {
            ServerMessage::Status(report) => Ok(report),
            other => Err(unexpected("status", other)),
        }
    }

    /// The server's live children this client may see: all of them for root
    /// and the server's own uid, else those its uid started. (The server
    /// sends a long list in pages; this reads them all.)
    pub fn list(&self) -> Result<Vec<ChildInfo>, Error> {
        let mut all = Vec::new();
        self.call_pages(
            |id| ClientMessage::List { id },
            |reply| match reply {
                ServerMessage::Children { children, more, .. } => {
                    all.extend(children);
                    Ok(more)
                }
                other => Err(unexpected("children", other)),
            },
        )?;
        Ok(all)
    }

    /// Sends `signal` to the child with `pid`, or to every child this client
    /// may touch (`None`), whoever spawned it; returns the pids signalled.
    /// A child started by another uid is refused (`denied`) unless this
    /// client is root or the server's own uid.
    pub fn kill(&self, pid: Option<u32>, signal: i32) -> Result<Vec<u32>, Error> {
        let mut all = Vec::new();
        self.call_pages(
            |id| ClientMessage::Kill { id, pid, signal },
            |reply| match reply {
                ServerMessage::Killed { pids, more, .. } => {
                    all.extend(pids);
                    Ok(more)
                }
                other => Err(unexpected("killed", other)),
            },
        )?;
        Ok(all)
    }

    /// Has the server load its preloads afresh from what is on disk now (a
    /// new generation), and waits until the new generation serves; returns
    /// its number and the modules it preloaded. Running children and
    /// connections are untouched. Root and the server's uid only; a reload
    /// that fails (an import error, a module that started threads) is
    /// `Error::Refused` quoting why, and the old generation serves on.
    pub fn reload(&self) -> Result<(u64, Vec<ModuleInfo>), Error> {
        match self.call(|id| ClientMessage::Reload { id })? {
            ServerMessage::Reloaded {
                generation,
                modules,
                ..
            } => Ok((generation, modules)),
            other => Err(unexpected("reloaded", other)),
        }
    }

    /// Upgrades the server in place: it runs its binary again (the file on
    /// disk now) with the same pid, keeping every connection (this one
    /// included) and every child, and starts a fresh generation; waits
    /// until the new image serves. Returns its version and the version it
    /// replaced. Root and the server's uid only. If the new binary cannot
    /// take over (it does not start, or cannot read the state handed to
    /// it), this is `Error::Refused` saying why, and the old image serves
    /// on with everything it had.
    pub fn upgrade(&self) -> Result<(String, String), Error> {
        match self.call(|id| ClientMessage::Upgrade { id })? {
            ServerMessage::Upgraded {
                version, previous, ..
            } => Ok((version, previous)),
            other => Err(unexpected("upgraded", other)),
        }
    }

    /// Sends a request whose answer comes in pages and hands each page to
    /// `page`, which says whether more follow.
    fn call_pages(
        &self,
        request: impl Fn(u64) -> ClientMessage,
        mut page: impl FnMut(ServerMessage) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        let (connection, id) = self.link.send(request, &[])?;
        while page(reply(&connection, id)?)? {}
        Ok(())
    }

    /// Sends a request made with a fresh id and waits for its reply; an
    /// error reply becomes `Error::Refused`.
    fn call(&self, request: impl Fn(u64) -> ClientMessage) -> Result<ServerMessage, Error> {
        let (connection, id) = self.link.send(request, &[])?;
        reply(&connection, id)
    }
}

/// The next reply to request `id` on `connection`; an error reply becomes
/// `Error::Refused`.
fn reply(connection: &Connection, id: u64) -> Result<ServerMessage, Error> {
    let reply = connection
        .take(id, true, |_| true)?
        .expect("a blocking take returns a message or an error");
    match reply.message {
        ServerMessage::Error { kind, message, .. } => Err(Error::Refused { kind, message }),
        other => Ok(other),
    }
}

/// This program's name, for the server's logs.
fn client_name() -> String {
    std::env::args()
        .next()
        .unwrap_or_else(|| "forkserver-client".into())
}

/// The link [`Command::new`] uses: to [`default_socket_path`], opened at
/// first use and shared by the whole process (which connects again if the
/// server is gone, as any client does).
fn default_link() -> Result<Arc<Link>, Error> {
    static DEFAULT: Mutex<Option<Arc<Link>>> = Mutex::new(None);
    let mut slot = DEFAULT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(link) = slot.as_ref() {
        return Ok(link.clone());
    }
    let link = Arc::new(Link::open(&default_socket_path(), &client_name())?);
    *slot = Some(link.clone());
    Ok(link)
}

fn unexpected(wanted: &str, got: ServerMessage) -> Error {
    Error::Protocol(format!("expected {wanted}, got {got:?}"))
}
