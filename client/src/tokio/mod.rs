//! An async client on tokio (feature `tokio`): [`AsyncClient`],
//! [`AsyncCommand`], [`AsyncChild`], named and behaving like
//! `tokio::process` wherever a forkserver can.
//!
//! One connection carries any number of children; a single reader task per
//! connection routes each reply to the child it is about, so a thousand
//! children wait on one connection without a thread each, and `wait` can
//! be raced in `select!` against a timeout and cancelled without losing
//! the exit status. The request building is the blocking client's
//! ([`Command`](crate::Command)), wrapped.
//!
//! ```no_run
//! use forkserver_client::tokio::AsyncClient;
//! use forkserver_client::Stdio;
//!
//! # async fn example() -> Result<(), forkserver_client::Error> {
//! let client = AsyncClient::connect("/run/user/1000/forkserver.sock").await?;
//! let output = client.command("echo").arg("hello").output().await?;
//! assert_eq!(output.stdout, b"hello\n");
//!
//! let mut child = client.command("sleep").arg("10").spawn().await?;
//! tokio::select! {
//!     status = child.wait() => println!("exited: {:?}", status?),
//!     _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => child.kill().await?,
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Differences from `tokio::process`
//! - The children are the server's: the status arrives from the server.
//!   `id()` is the pid until the status was taken, then None, as tokio's;
//!   a child's handle can be awaited in another runtime than the one it
//!   was spawned in, even after that one shut down.
//! - Children are killed when their connection closes (when the last
//!   `AsyncClient`, `AsyncCommand` and `AsyncChild` sharing it are dropped),
//!   unless spawned with `detach(true)`; `kill_on_drop(true)` kills one when
//!   its `AsyncChild` is dropped, as tokio's does.
//! - Cancelling a `spawn` after the request was sent leaves the child, if
//!   it started, to the connection's `on_disconnect`.
//! - At most the server's `max_pending_per_connection` spawns are in flight
//!   per connection; more wait their turn in `spawn`.

mod child;
mod command;
mod connection;
mod link;

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;

use forkserver_protocol::{ClientMessage, ServerMessage};

pub use child::AsyncChild;
pub use command::AsyncCommand;
use connection::AsyncConnection;
use link::AsyncLink;

use crate::{ChildInfo, Command, Error, ServerInfo, StatusReport};

/// A connection to a forkserver, for async code. Cheap to clone; clones
/// share the connection. Create it inside a tokio runtime.
///
/// If the server dies, the next request connects to its socket again, as
/// the blocking [`Client`](crate::Client) does (waiting up to 3 s, or
/// [`reconnect_wait`](AsyncClient::reconnect_wait)); the children started
/// on the lost connection report [`Error::ServerLost`].
#[derive(Debug, Clone)]
pub struct AsyncClient {
    link: Arc<AsyncLink>,
}

impl AsyncClient {
    /// Connects to the server listening on `path` and does the handshake.
    pub async fn connect(path: impl AsRef<Path>) -> Result<AsyncClient, Error> {
        let link = AsyncLink::open(path.as_ref(), &crate::client_name()).await?;
        Ok(AsyncClient {
            link: Arc::new(link),
        })
    }

    /// Sets how long a request waits for a server to listen on the socket
    /// again when the one it had is gone (3 s unless set).
    pub fn reconnect_wait(self, wait: std::time::Duration) -> AsyncClient {
        self.link.set_wait(wait);
        self
    }

    /// Connects to the server at [`default_socket_path`](crate::default_socket_path).
    pub async fn connect_default() -> Result<AsyncClient, Error> {
        AsyncClient::connect(crate::default_socket_path()).await
    }

    /// What the server said about itself when this client last connected
    /// (at first, or again after a server was lost).
    pub async fn server(&self) -> ServerInfo {
        self.link.info().await
    }

    /// The socket this client connects to.
    pub fn socket(&self) -> &Path {
        self.link.path()
    }

    /// A command that runs `program` (looked up in the child's `PATH` if it
    /// has no `/`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> AsyncCommand {
        AsyncCommand::new(self.link.clone(), Command::new(program))
    }

    /// A command that runs a preloaded worker (see
    /// [`Client::worker`](crate::Client::worker)).
    pub fn worker(&self, name: &str) -> AsyncCommand {
        AsyncCommand::new(self.link.clone(), Command::worker_on(None, name))
    }

    /// The server's status (see [`Client::status`](crate::Client::status)).
    pub async fn status(&self) -> Result<StatusReport, Error> {
        match self.call(|id| ClientMessage::Status { id }).await? {
            ServerMessage::Status(report) => Ok(report),
            other => Err(crate::unexpected("status", other)),
        }
    }

    /// The live children this client may see, every page read (see
    /// [`Client::list`](crate::Client::list)).
    pub async fn list(&self) -> Result<Vec<ChildInfo>, Error> {
        let (connection, id) = self.send(|id| ClientMessage::List { id }).await?;
        let mut all = Vec::new();
        loop {
            match reply(&connection, id).await? {
                ServerMessage::Children { children, more, .. } => {
                    all.extend(children);
                    if !more {
                        return Ok(all);
                    }
                }
                other => return Err(crate::unexpected("children", other)),
            }
        }
    }

    async fn call(&self, request: impl Fn(u64) -> ClientMessage) -> Result<ServerMessage, Error> {
        let (connection, id) = self.send(request).await?;
        reply(&connection, id).await
    }

    /// Sends a request (no fds) on the connection to use now, or on a new
    /// one if its send finds that closed (see the blocking client's link).
    async fn send(
        &self,
        request: impl Fn(u64) -> ClientMessage,
    ) -> Result<(Arc<AsyncConnection>, u64), Error> {
        let connection = self.link.connection().await?;
        let id = connection.next_id();
        match connection.send(&request(id), &[]).await {
            Ok(()) => Ok((connection, id)),
            Err(Error::Disconnected(_)) => {
                let connection = self.link.instead_of(&connection).await?;
                let id = connection.next_id();
                connection.send(&request(id), &[]).await?;
                Ok((connection, id))
            }
            Err(e) => Err(e),
        }
    }
}

async fn reply(connection: &AsyncConnection, id: u64) -> Result<ServerMessage, Error> {
    let reply = connection.take(id, |_| true).await?;
    match reply.message {
        ServerMessage::Error { kind, message, .. } => Err(Error::Refused { kind, message }),
        other => Ok(other),
    }
}
