//! One client connection: its handshake state and its bounded queue of
//! replies the socket could not take yet. (Its children are in the ledger;
//! what its uid may still queue, over all its connections, is the event
//! loop's to say: [`Room`].)

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};

use forkserver_protocol::{encode, send_datagram, ErrorKind, ServerMessage};
use serde::{Deserialize, Serialize};

use crate::ledger::ConnId;
use crate::log::{log, Level};
use crate::peer::Peer;
use crate::reply_size;
use crate::sys::{take_passed, Passed};

pub(crate) struct Connection {
    socket: OwnedFd,
    /// Who is connected, as the kernel says.
    pub(crate) peer: Peer,
    /// Set once a matching `Hello` was answered.
    pub(crate) greeted: bool,
    /// The client's name from `Hello`, for logs.
    pub(crate) client: String,
    outbox: VecDeque<(Vec<u8>, Vec<OwnedFd>)>,
    /// Bytes and fds in `outbox`.
    queued_bytes: usize,
    queued_fds: usize,
    /// Replies queued beyond this mean the client is not reading; it is
    /// dropped rather than buffered for without bound.
    max_queued: usize,
    /// No reply is larger (`max_message_bytes`).
    max_bytes: usize,
    /// The connection is to be closed (peer gone, fatal error, or flooding).
    pub(crate) dead: bool,
    /// A `list` whose pages are still to be made.
    pub(crate) listing: Option<Listing>,
}

/// A `list` being answered: its pages are made one at a time, each once the
/// one before has left the queue, so a list costs the server its pids
/// until then rather than every page at once.
pub(crate) struct Listing {
    /// The request's id.
    pub(crate) id: u64,
    /// The children still to describe, in order.
    pub(crate) pids: VecDeque<libc::pid_t>,
}

/// What the connection's uid may still queue, over all its connections
/// (`max_queued_bytes_per_uid`, `max_fds_per_uid`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Room {
    pub(crate) bytes: usize,
    pub(crate) fds: usize,
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
            queued_bytes: 0,
            queued_fds: 0,
            max_queued: max_queued as usize,
            max_bytes: max_bytes as usize,
            dead: false,
            listing: None,
        }
    }

    /// Sends `message` with `fds` now if the socket takes it and nothing is
    /// queued ahead of it, else queues it (in order) if `room` allows; a
    /// client whose replies do not fit is not reading, and is closed.
    pub(crate) fn send(&mut self, message: &ServerMessage, fds: Vec<OwnedFd>, room: Room) -> Sent {
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
        let over = if bytes.len() > room.bytes {
            Some("max_queued_bytes_per_uid")
        } else if fds.len() > room.fds {
            Some("max_fds_per_uid")
        } else {
            None
        };
        if let Some(limit) = over {
            log!(
                Level::Warn,
                "client '{}' ({}) is not reading its replies, and one more would pass its uid's share of the server (the limit {limit}); closing its connection",
                self.client,
                self.peer
            );
            self.dead = true;
            return Sent::Dropped;
        }
        self.queued_bytes += bytes.len();
        self.queued_fds += fds.len();
        self.outbox.push_back((bytes, fds));
        Sent::Queued
    }

    /// Bytes and fds of the replies queued.
    pub(crate) fn queued(&self) -> (usize, usize) {
        (self.queued_bytes, self.queued_fds)
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
            self.queued_bytes -= bytes.len();
            self.queued_fds -= fds.len();
            match self.write(&bytes, &fds) {
                Ok(true) => {}
                Ok(false) => {
                    self.queued_bytes += bytes.len();
                    self.queued_fds += fds.len();
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
                (self.queued_bytes, self.queued_fds) = (0, 0);
                Err(())
            }
        }
    }
}

/// A connection, handed over (`handover.rs`).
#[derive(Serialize, Deserialize)]
pub(crate) struct ConnectionState {
    pub(crate) id: ConnId,
    socket: RawFd,
    peer: Peer,
    greeted: bool,
    client: String,
    /// Replies queued, with their fds by number.
    outbox: Vec<(Vec<u8>, Vec<RawFd>)>,
    max_queued: usize,
    max_bytes: usize,
    dead: bool,
    listing: Option<(u64, Vec<libc::pid_t>)>,
}

impl Connection {
    /// The connection as the next image needs it, its fds added to
    /// `passed`.
    pub(crate) fn hand_over(&self, id: ConnId, passed: &mut Passed) -> ConnectionState {
        ConnectionState {
            id,
            socket: passed.pass(self.socket.as_fd()),
            peer: self.peer.clone(),
            greeted: self.greeted,
            client: self.client.clone(),
            outbox: (self.outbox.iter())
                .map(|(bytes, fds)| {
                    let fds = fds.iter().map(|fd| passed.pass(fd.as_fd())).collect();
                    (bytes.clone(), fds)
                })
                .collect(),
            max_queued: self.max_queued,
            max_bytes: self.max_bytes,
            dead: self.dead,
            listing: (self.listing.as_ref()).map(|l| (l.id, l.pids.iter().copied().collect())),
        }
    }

    /// A connection an old image handed over.
    ///
    /// # Safety
    /// `state` is this image's handover, taken once.
    pub(crate) unsafe fn taken_over(state: ConnectionState) -> Connection {
        let outbox: VecDeque<(Vec<u8>, Vec<OwnedFd>)> = (state.outbox.into_iter())
            // SAFETY: the caller's.
            .map(|(bytes, fds)| {
                (
                    bytes,
                    fds.into_iter()
                        .map(|fd| unsafe { take_passed(fd) })
                        .collect(),
                )
            })
            .collect();
        Connection {
            // SAFETY: the caller's.
            socket: unsafe { take_passed(state.socket) },
            peer: state.peer,
            greeted: state.greeted,
            client: state.client,
            queued_bytes: outbox.iter().map(|(bytes, _)| bytes.len()).sum(),
            queued_fds: outbox.iter().map(|(_, fds)| fds.len()).sum(),
            outbox,
            max_queued: state.max_queued,
            max_bytes: state.max_bytes,
            dead: state.dead,
            listing: state.listing.map(|(id, pids)| Listing {
                id,
                pids: pids.into(),
            }),
        }
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}
