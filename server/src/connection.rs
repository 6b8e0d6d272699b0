//! One client connection: its handshake state and its bounded queue of
//! replies the socket could not take yet. (Its children are in the ledger.)

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use forkserver_protocol::{encode, send_datagram, ErrorKind, ServerMessage};

use crate::log::{log, Level};
use crate::peer::Peer;
use crate::reply_size;

pub(crate) struct Connection {
    socket: OwnedFd,
    /// Who is connected, as the kernel says.
    pub(crate) peer: Peer,
    /// Set once a matching `Hello` was answered.
    pub(crate) greeted: bool,
    /// The client's name from `Hello`, for logs.
    pub(crate) client: String,
    outbox: VecDeque<(Vec<u8>, Vec<OwnedFd>)>,
    /// Replies queued beyond this mean the client is not reading; it is
    /// dropped rather than buffered for without bound.
    max_queued: usize,
    /// No reply is larger (`max_message_bytes`).
    max_bytes: usize,
    /// The connection is to be closed (peer gone, fatal error, or flooding).
    pub(crate) dead: bool,
}

/// What `send` did with a message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Written to the socket.
    Now,
    /// Queued; the caller must watch for writability.
    Queued,
    /// Not sent; the connection is dead.
    Dropped,
}

impl Connection {
    pub(crate) fn new(socket: OwnedFd, peer: Peer, max_queued: u32, max_bytes: u32) -> Connection {
        Connection {
            socket,
            peer,
            greeted: false,
            client: String::new(),
            outbox: VecDeque::new(),
            max_queued: max_queued as usize,
            max_bytes: max_bytes as usize,
            dead: false,
        }
    }

    /// Sends `message` with `fds` now if the socket takes it and nothing is
    /// queued ahead of it, else queues it (in order).
    pub(crate) fn send(&mut self, message: &ServerMessage, fds: Vec<OwnedFd>) -> Sent {
        if self.dead {
            return Sent::Dropped;
        }
        let bytes = match self.encode(message) {
            Some(bytes) => bytes,
            None => return Sent::Dropped,
        };
        if self.outbox.is_empty() {
            match self.write(&bytes, &fds) {
                Ok(true) => return Sent::Now,
                Ok(false) => {}
                Err(()) => return Sent::Dropped,
            }
        }
        if self.outbox.len() >= self.max_queued {
            log!(
                Level::Warn,
                "client '{}' ({}) has not read {} replies (the limit max_queued_replies); closing its connection",
                self.client,
                self.peer,
                self.max_queued
            );
            self.dead = true;
            return Sent::Dropped;
        }
        self.outbox.push_back((bytes, fds));
        Sent::Queued
    }

    /// The reply's bytes, shrunk to `max_bytes` if need be (see
    /// reply_size.rs); one that cannot shrink is replaced by an error that
    /// says so, never dropped in silence.
    fn encode(&self, message: &ServerMessage) -> Option<Vec<u8>> {
        let bytes = match encode(message) {
            Ok(bytes) => bytes,
            Err(e) => {
                log!(Level::Error, "cannot encode a reply: {e}");
                return None;
            }
        };
        if bytes.len() <= self.max_bytes {
            return Some(bytes);
        }
        let size = bytes.len();
        match reply_size::fit(message.clone(), self.max_bytes) {
            Some(fitted) => encode(&fitted).ok(),
            None => {
                log!(
                    Level::Warn,
                    "a reply to client '{}' was {size} bytes, over max_message_bytes; sending an error instead",
                    self.client
                );
                encode(&ServerMessage::Error {
                    id: message.request_id(),
                    kind: ErrorKind::Resource,
                    message: format!(
                        "the reply was {size} bytes, over max_message_bytes ({})",
                        self.max_bytes
                    ),
                    fatal: false,
                })
                .ok()
            }
        }
    }

    /// Writes queued replies until the socket is full. Returns true when the
    /// queue is empty.
    pub(crate) fn flush(&mut self) -> bool {
        while let Some((bytes, fds)) = self.outbox.pop_front() {
            match self.write(&bytes, &fds) {
                Ok(true) => {}
                Ok(false) => {
                    self.outbox.push_front((bytes, fds));
                    return false;
                }
                Err(()) => return true,
            }
        }
        true
    }

    pub(crate) fn has_queued(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Ok(true): sent; Ok(false): the socket is full; Err: the peer is gone
    /// (marks the connection dead).
    fn write(&mut self, bytes: &[u8], fds: &[OwnedFd]) -> Result<bool, ()> {
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|fd| fd.as_fd()).collect();
        match send_datagram(self.socket.as_fd(), bytes, &borrowed, libc::MSG_DONTWAIT) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            // The socket's send buffer is smaller than the reply (the buffer
            // is set at accept; a system cap can keep it smaller): the
            // client is told, in a reply small enough to go.
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) && !bytes.is_empty() => {
                log!(
                    Level::Warn,
                    "a {}-byte reply does not fit client '{}''s socket buffer: {e}",
                    bytes.len(),
                    self.client
                );
                let error = ServerMessage::Error {
                    id: forkserver_protocol::peek_id(bytes),
                    kind: ErrorKind::Resource,
                    message: format!(
                        "a {}-byte reply did not fit the socket's send buffer; lower max_message_bytes",
                        bytes.len()
                    ),
                    fatal: false,
                };
                match encode(&error) {
                    Ok(small) => self.write(&small, &[]),
                    Err(_) => Ok(true),
                }
            }
            Err(e) => {
                let gone = matches!(
                    e.raw_os_error(),
                    Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
                );
                if gone {
                    log!(Level::Debug, "client '{}' is gone: {e}", self.client);
                } else {
                    // Not the peer leaving: say why the connection goes.
                    log!(
                        Level::Warn,
                        "cannot send {} bytes to client '{}' ({}): {e}; closing its connection",
                        bytes.len(),
                        self.client,
                        self.peer
                    );
                }
                self.dead = true;
                self.outbox.clear();
                Err(())
            }
        }
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}
