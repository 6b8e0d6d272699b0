//! What the blocking and the async connection share of the protocol: the
//! handshake's messages, the choice between a datagram and a `bulk` file,
//! reading a datagram, and where an incoming message goes.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use forkserver_protocol::{
    decode, encode, ClientMessage, Datagram, Limits, ServerMessage, PROTOCOL_VERSION,
};

use crate::connection::{Incoming, ServerInfo};
use crate::Error;

/// Replies carry at most four fds; room for more only guards against a
/// misbehaving server (extra fds are closed when dropped).
pub(crate) const MAX_REPLY_FDS: usize = 16;

/// The encoded `hello`.
pub(crate) fn hello(client_name: &str) -> Result<Vec<u8>, Error> {
    let hello = ClientMessage::Hello {
        protocol: PROTOCOL_VERSION,
        client: client_name.to_owned(),
    };
    encode(&hello).map_err(|e| Error::Protocol(e.to_string()))
}

/// What `welcome` says, or the error the server answered `hello` with (a
/// refusal names the socket at `path`: the server's text names the uid and
/// the flags that would let it in).
pub(crate) fn server_info(welcome: Option<Incoming>, path: &Path) -> Result<ServerInfo, Error> {
    let welcome = welcome.ok_or_else(|| {
        Error::Disconnected("the server closed the connection before answering hello".into())
    })?;
    match welcome.message {
        ServerMessage::Welcome {
            server_version,
            pid,
            limits,
            modules,
            workers,
            ..
        } => Ok(ServerInfo {
            version: server_version,
            pid,
            limits,
            modules,
            workers,
        }),
        ServerMessage::Error { kind, message, .. } => Err(Error::Refused {
            kind,
            message: format!("{}: {message}", path.display()),
        }),
        other => Err(Error::Protocol(format!("expected welcome, got {other:?}"))),
    }
}

/// A request as it goes on the wire: its bytes, and the `bulk` file to
/// attach after the request's own fds when it was too big for a datagram.
pub(crate) struct Outgoing {
    pub(crate) bytes: Vec<u8>,
    file: Option<OwnedFd>,
}

impl Outgoing {
    /// The fds to send: the request's, then the bulk file if there is one.
    pub(crate) fn fds<'a>(&'a self, fds: &[BorrowedFd<'a>]) -> Vec<BorrowedFd<'a>> {
        let mut all = fds.to_vec();
        all.extend(self.file.as_ref().map(|f| f.as_fd()));
        all
    }
}

/// Encodes `message`, which carries `attached` fds; one larger than
/// `max_message_bytes` goes in a memfd, sent as a `bulk` message
/// (protocol/README.md) whose file follows those fds.
pub(crate) fn outgoing(
    message: &ClientMessage,
    attached: usize,
    limits: &Limits,
) -> Result<Outgoing, Error> {
    let bytes = encode(message).map_err(|e| Error::Protocol(e.to_string()))?;
    if bytes.len() <= limits.max_message_bytes as usize {
        return Ok(Outgoing { bytes, file: None });
    }
    if bytes.len() > limits.max_bulk_bytes as usize {
        return Err(Error::InvalidInput(format!(
            "the request holds {} bytes; the server's limit max_bulk_bytes is {}",
            bytes.len(),
            limits.max_bulk_bytes
        )));
    }
    let file = forkserver_protocol::memfd_holding(&bytes).map_err(Error::Io)?;
    let bulk = ClientMessage::Bulk {
        fd: attached as u32,
    };
    let bytes = encode(&bulk).map_err(|e| Error::Protocol(e.to_string()))?;
    Ok(Outgoing {
        bytes,
        file: Some(file),
    })
}

/// The error a failed send of `len` bytes means.
pub(crate) fn send_error(e: io::Error, len: usize) -> Error {
    match e.raw_os_error() {
        Some(libc::EPIPE) | Some(libc::ECONNRESET) => {
            Error::Disconnected("the server closed the connection".into())
        }
        Some(libc::EMSGSIZE) => Error::Protocol(format!(
            "a request of {len} bytes is too large for the socket"
        )),
        _ => Error::Io(e),
    }
}

/// The message a received datagram holds (None: the server closed).
pub(crate) fn incoming(
    datagram: Option<Datagram>,
    limits: &Limits,
) -> Result<Option<Incoming>, Error> {
    let Some(datagram) = datagram else {
        return Ok(None);
    };
    if datagram.truncated {
        return Err(Error::Protocol(format!(
            "the server sent a message over max_message_bytes ({})",
            limits.max_message_bytes
        )));
    }
    if datagram.fds_truncated {
        // The kernel could not install the fds a reply carried here: this
        // process is (nearly) out of descriptors.
        return Err(Error::Io(io::Error::other(
            "a reply's file descriptors could not all be received: this process may have run out of fds (RLIMIT_NOFILE)",
        )));
    }
    let message = decode(&datagram.bytes).map_err(|e| Error::Protocol(e.to_string()))?;
    Ok(Some(Incoming {
        message,
        fds: datagram.fds,
    }))
}

/// Where an incoming message goes.
pub(crate) enum Route {
    /// To whoever waits on this request id.
    To(u64),
    /// Nowhere: the server is closing the connection, for this reason.
    Broken(String),
    /// Nowhere: a non-fatal error about no request in particular, a message
    /// that has no place after the handshake, or one about an id whose
    /// handle was dropped (`abandoned`: forgotten once its `exited` comes).
    Nowhere,
}

pub(crate) fn route(message: &ServerMessage, abandoned: &mut HashSet<u64>) -> Route {
    match (message, message.request_id()) {
        (ServerMessage::Exited { .. }, Some(id)) if abandoned.remove(&id) => Route::Nowhere,
        (_, Some(id)) if abandoned.contains(&id) => Route::Nowhere,
        (_, Some(id)) => Route::To(id),
        (
            ServerMessage::Error {
                message,
                fatal: true,
                ..
            },
            None,
        ) => Route::Broken(format!("the server closed the connection: {message}")),
        _ => Route::Nowhere,
    }
}
