//! Connections: accepting them (with the peer policy and the connection
//! limits), reading requests, sending replies, and closing them.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use forkserver_protocol::{
    decode_client_message, recv_datagram, ClientMessage, ErrorKind, Limits, ServerMessage,
};
use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::{conn_token, EventLoop, LISTENER};
use crate::connection::{Connection, Room, Sent};
use crate::ledger::ConnId;
use crate::log::{log, Level};
use crate::peer::Peer;
use crate::sys;

/// How long to stop accepting after running out of fds (EMFILE/ENFILE):
/// epoll is level-triggered, so a listener we cannot accept from would
/// otherwise wake us in a busy loop.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Requests read from one connection per wake-up, so one busy client cannot
/// starve the rest (epoll is level-triggered and comes back for more).
const READS_PER_WAKEUP: usize = 8;

/// Requests read from all of one uid's connections per round of events: a
/// uid with many busy connections waits its turn as one with a single
/// connection does, so one user cannot slow the others by opening more.
const READS_PER_UID_PER_ROUND: usize = 8;

impl EventLoop {
    pub(super) fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            let socket = match sys::accept(listener.as_fd()) {
                Ok(socket) => socket,
                Err(err) => match err.raw_os_error() {
                    Some(libc::EAGAIN) => return,
                    Some(libc::EINTR) | Some(libc::ECONNABORTED) => continue,
                    // Out of fds: the connection waits in the backlog until
                    // some are freed; stop watching the listener meanwhile.
                    Some(libc::EMFILE) | Some(libc::ENFILE) => {
                        log!(Level::Warn, "accept failed, pausing accepts: {err}");
                        self.pause_accepting();
                        return;
                    }
                    _ => {
                        log!(Level::Warn, "accept failed: {err}");
                        return;
                    }
                },
            };
            let peer = match Peer::of(socket.as_fd()) {
                Ok(peer) => peer,
                Err(e) => {
                    log!(
                        Level::Warn,
                        "refused a connection: cannot read its credentials: {e}"
                    );
                    continue;
                }
            };
            let refusal = self.refusal(&peer);
            // Room in the send buffer for the largest reply (the kernel may
            // cap it lower; a reply that then does not fit is reported).
            let _ = sys::set_send_buffer(
                socket.as_fd(),
                2 * self.limits.max_message_bytes as usize + 4096,
            );
            let mut conn = Connection::new(
                socket,
                peer,
                self.limits.max_queued_replies,
                self.limits.max_message_bytes,
            );
            if let Some((kind, message)) = refusal {
                log!(Level::Warn, "refused {}: {message}", conn.peer);
                // Its own room: it is not counted, and closes here.
                let room = Room {
                    bytes: self.limits.max_message_bytes as usize,
                    fds: 0,
                };
                conn.send(&fatal(kind, message), Vec::new(), room);
                continue;
            }
            let id = self.next_conn;
            self.next_conn += 1;
            if let Err(e) = self
                .epoll
                .add(&conn, EpollEvent::new(EpollFlags::EPOLLIN, conn_token(id)))
            {
                log!(Level::Warn, "cannot watch a new connection: {e}");
                continue;
            }
            self.usage.connected(conn.peer.uid);
            self.connections.insert(id, conn);
        }
    }

    /// Why `peer` may not connect now, if it may not: the peer policy, then
    /// the connection limits.
    fn refusal(&self, peer: &Peer) -> Option<(ErrorKind, String)> {
        let same_uid = self
            .connections
            .values()
            .filter(|c| c.peer.uid == peer.uid)
            .count();
        if let Err(why) = self.policy.check(peer, self.server_uid) {
            Some((ErrorKind::Denied, why))
        } else if self.connections.len() >= self.limits.max_connections as usize {
            Some((
                ErrorKind::Limit,
                format!(
                    "the server already holds {} connections (the limit max_connections)",
                    self.limits.max_connections
                ),
            ))
        } else if same_uid >= self.limits.max_connections_per_uid as usize {
            Some((
                ErrorKind::Limit,
                format!(
                    "uid {} already has {same_uid} connections (the limit max_connections_per_uid)",
                    peer.uid
                ),
            ))
        } else {
            None
        }
    }

    fn pause_accepting(&mut self) {
        if let Some(listener) = &self.listener {
            let _ = self.epoll.delete(listener);
            self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
        }
    }

    pub(super) fn resume_accepting(&mut self) {
        self.accept_paused_until = None;
        if let Some(listener) = &self.listener {
            if let Err(e) = self
                .epoll
                .add(listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))
            {
                log!(Level::Error, "cannot watch the listener again: {e}");
            }
        }
    }

    pub(super) fn connection_ready(&mut self, id: ConnId, flags: EpollFlags) {
        if flags.contains(EpollFlags::EPOLLOUT)
            && self.with_queue(id, |conn, _| conn.flush()) == Some(true)
        {
            self.watch_output(id, false);
            self.continue_listing(id);
        }
        if flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
            let Some(uid) = self.connections.get(&id).map(|c| c.peer.uid) else {
                return;
            };
            let read = self.reads_this_round.entry(uid).or_default();
            let quota = READS_PER_WAKEUP.min(READS_PER_UID_PER_ROUND.saturating_sub(*read));
            let mut done = 0;
            while done < quota && self.read_one(id) {
                done += 1;
            }
            *self.reads_this_round.entry(uid).or_default() += done;
        }
        if self.connections.get(&id).is_some_and(|c| c.dead) {
            self.close_connection(id);
        }
    }

    /// Reads and handles one request; false when there is nothing more to
    /// read now (or the connection is gone).
    fn read_one(&mut self, id: ConnId) -> bool {
        let Some(conn) = self.connections.get_mut(&id) else {
            return false;
        };
        let limits = self.limits;
        let datagram = match recv_datagram(
            conn.as_fd(),
            limits.max_message_bytes as usize,
            limits.max_fds_per_message as usize,
            libc::MSG_DONTWAIT,
        ) {
            Ok(Some(datagram)) => datagram,
            Ok(None) => {
                conn.dead = true;
                return false;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) => {
                log!(Level::Debug, "reading from client '{}': {e}", conn.client);
                conn.dead = true;
                return false;
            }
        };
        let discarded = if datagram.truncated {
            Some(format!(
                "a message was longer than {} bytes (the limit max_message_bytes)",
                limits.max_message_bytes
            ))
        } else if datagram.fds_truncated {
            Some(format!(
                "a message carried more than {} fds (the limit max_fds_per_message)",
                limits.max_fds_per_message
            ))
        } else {
            None
        };
        if let Some(what) = discarded {
            let message = format!("{what} and was discarded");
            // A cut message usually still holds its id near the start.
            let request = forkserver_protocol::peek_id(&datagram.bytes);
            self.reply(
                id,
                request_error(request, ErrorKind::Limit, message),
                Vec::new(),
            );
            return true;
        }
        match decode_client_message(&datagram.bytes) {
            Ok(ClientMessage::Bulk { fd }) => match unbulk(fd, datagram.fds, &limits) {
                Ok((message, fds)) => self.handle(id, message, fds),
                Err((kind, message)) => {
                    self.reply(id, request_error(None, kind, message), Vec::new())
                }
            },
            Ok(message) => self.handle(id, message, datagram.fds),
            Err(e) => {
                let error = if conn.greeted {
                    let request = forkserver_protocol::peek_id(&datagram.bytes);
                    request_error(request, ErrorKind::Protocol, e.to_string())
                } else {
                    fatal(
                        ErrorKind::Protocol,
                        format!("{e}; expected a hello message"),
                    )
                };
                self.reply(id, error, Vec::new());
            }
        }
        true
    }

    /// Sends a reply on a connection, watching for writability if it had to
    /// be queued and closing the connection if it is dead or fatal.
    pub(super) fn reply(
        &mut self,
        id: ConnId,
        message: ServerMessage,
        fds: Vec<std::os::fd::OwnedFd>,
    ) {
        let is_fatal = matches!(message, ServerMessage::Error { fatal: true, .. });
        let Some(sent) = self.with_queue(id, |conn, room| conn.send(&message, fds, room)) else {
            return;
        };
        let Some(conn) = self.connections.get_mut(&id) else {
            return;
        };
        if is_fatal {
            if let ServerMessage::Error { message, .. } = &message {
                log!(Level::Warn, "closing client '{}': {message}", conn.client);
            }
            conn.dead = true;
        }
        if sent == Sent::Queued {
            self.watch_output(id, true);
        }
        if self.connections.get(&id).is_some_and(|c| c.dead) {
            self.close_connection(id);
        }
    }

    fn watch_output(&mut self, id: ConnId, on: bool) {
        let Some(conn) = self.connections.get(&id) else {
            return;
        };
        let mut flags = EpollFlags::EPOLLIN;
        if on || conn.has_queued() {
            flags |= EpollFlags::EPOLLOUT;
        }
        let mut event = EpollEvent::new(flags, conn_token(id));
        let _ = self.epoll.modify(conn, &mut event);
    }

    /// Forgets a connection and applies each of its children's
    /// `on_disconnect`.
    pub(super) fn close_connection(&mut self, id: ConnId) {
        let Some(mut conn) = self.connections.remove(&id) else {
            return;
        };
        let _ = self.epoll.delete(&conn);
        let (uid, queued, client) = (
            conn.peer.uid,
            conn.queued(),
            std::mem::take(&mut conn.client),
        );
        // Its queue is freed first, so that the memory it held can be
        // handed back by what counts it off.
        drop(conn);
        self.usage.disconnected(uid, queued);
        let live = self
            .ledger
            .disconnected(id, Instant::now() + self.kill_grace);
        log!(
            Level::Debug,
            "client '{client}' disconnected with {live} live child(ren)"
        );
    }
}

/// The message a `bulk` carries in its last fd, with the other fds.
fn unbulk(
    index: u32,
    mut fds: Vec<OwnedFd>,
    limits: &Limits,
) -> Result<(ClientMessage, Vec<OwnedFd>), (ErrorKind, String)> {
    if fds.is_empty() || index as usize != fds.len() - 1 {
        return Err((
            ErrorKind::Protocol,
            format!(
                "bulk: fd {index} must be the last of the {} fds attached",
                fds.len()
            ),
        ));
    }
    let file = fds.pop().expect("checked non-empty");
    let bytes =
        sys::read_regular_file(file.as_fd(), limits.max_bulk_bytes as usize).map_err(|e| {
            let kind = if e.kind() == io::ErrorKind::InvalidInput {
                ErrorKind::Limit
            } else {
                ErrorKind::Protocol
            };
            (kind, format!("bulk: reading the message's file: {e}"))
        })?;
    match decode_client_message(&bytes) {
        Ok(ClientMessage::Bulk { .. }) => Err((
            ErrorKind::Protocol,
            "bulk: a bulk message cannot hold another".into(),
        )),
        Ok(message) => Ok((message, fds)),
        Err(e) => Err((ErrorKind::Protocol, format!("bulk: {e}"))),
    }
}

/// An error answering one request; the connection stays open.
pub(super) fn request_error(id: Option<u64>, kind: ErrorKind, message: String) -> ServerMessage {
    ServerMessage::Error {
        id,
        kind,
        message,
        fatal: false,
    }
}

/// An error after which the server closes the connection.
pub(super) fn fatal(kind: ErrorKind, message: String) -> ServerMessage {
    ServerMessage::Error {
        id: None,
        kind,
        message,
        fatal: true,
    }
}
