//! One client connection: its handshake state and its bounded queue of
//! replies the socket could not take yet. (Its children are in the ledger.)

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use forkserver_protocol::{encode, send_datagram, ServerMessage};

use crate::log::{log, Level};
use crate::peer::Peer;

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
    pub(crate) fn new(socket: OwnedFd, peer: Peer, max_queued: u32) -> Connection {
        Connection {
            socket,
            peer,
            greeted: false,
            client: String::new(),
            outbox: VecDeque::new(),
            max_queued: max_queued as usize,
            dead: false,
        }
    }

    /// Sends `message` with `fds` now if the socket takes it and nothing is
    /// queued ahead of it, else queues it (in order).
    pub(crate) fn send(&mut self, message: &ServerMessage, fds: Vec<OwnedFd>) -> Sent {
        if self.dead {
            return Sent::Dropped;
        }
        let bytes = match encode(message) {
            Ok(bytes) => bytes,
            Err(e) => {
                log!(Level::Error, "cannot encode a reply: {e}");
                return Sent::Dropped;
            }
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
            Err(e) => {
                log!(Level::Debug, "client '{}' is gone: {e}", self.client);
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
