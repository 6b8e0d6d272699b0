//! The handlers of client requests, one method each, dispatched from
//! `EventLoop::handle`.

use std::os::fd::{AsFd, OwnedFd};
use std::panic::{self, AssertUnwindSafe};

use forkserver_protocol::{
    ClientMessage, ErrorKind, ServerMessage, Spawn, Target, PROTOCOL_VERSION,
};
use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::connections::{fatal, request_error};
use super::{pipe_token, EventLoop};
use crate::launch::{describe, LaunchError};
use crate::ledger::ConnId;
use crate::log::{log, Level};
use crate::modules::panic_message;
use crate::peer::{child_rights, Peer};
use crate::reply_size;
use crate::sys;

impl EventLoop {
    pub(super) fn hello(&mut self, id: ConnId, protocol: u32, client: String) {
        let Some(conn) = self.connections.get_mut(&id) else {
            return;
        };
        let reply = if conn.greeted {
            request_error(
                None,
                ErrorKind::Protocol,
                "hello was already received".into(),
            )
        } else if protocol != PROTOCOL_VERSION {
            fatal(
                ErrorKind::Version,
                format!(
                    "client speaks protocol version {protocol}; this server (forkserver {}) speaks version {PROTOCOL_VERSION}",
                    env!("CARGO_PKG_VERSION")
                ),
            )
        } else {
            conn.greeted = true;
            log!(Level::Debug, "client '{client}' connected");
            conn.client = client;
            let welcome = ServerMessage::Welcome {
                protocol: PROTOCOL_VERSION,
                server_version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                modules: self.modules().to_vec(),
                workers: self.launcher.modules.worker_names(),
                limits: self.limits,
                truncated: false,
            };
            // Read before the client knows max_message_bytes.
            let max = (self.limits.max_message_bytes as usize).min(reply_size::WELCOME_MAX);
            reply_size::fit(welcome.clone(), max).unwrap_or(welcome)
        };
        self.reply(id, reply, Vec::new());
    }

    /// Every request kind, dispatched to its handler.
    pub(super) fn handle(&mut self, id: ConnId, message: ClientMessage, fds: Vec<OwnedFd>) {
        let greeted = self.connections.get(&id).is_some_and(|c| c.greeted);
        match message {
            ClientMessage::Hello { protocol, client } => self.hello(id, protocol, client),
            _ if !greeted => self.reply(
                id,
                fatal(
                    ErrorKind::Protocol,
                    "the first message on a connection must be hello".into(),
                ),
                Vec::new(),
            ),
            ClientMessage::Spawn(request) => self.spawn(id, request, fds),
            // Unwrapped by read_one before it gets here; never nested.
            ClientMessage::Bulk { .. } => self.reply(
                id,
                request_error(
                    None,
                    ErrorKind::Protocol,
                    "bulk: a bulk message cannot hold another".into(),
                ),
                Vec::new(),
            ),
            ClientMessage::Signal { id: child, signal } => self.signal(id, child, signal),
            ClientMessage::Status { id: request } => {
                let report = self.status(id, request);
                self.reply(id, ServerMessage::Status(report), Vec::new());
            }
            ClientMessage::List { id: request } => self.list(id, request),
            ClientMessage::Reload { id: request } => self.reload_request(id, request),
            ClientMessage::Upgrade { id: request } => self.upgrade_request(id, request),
            ClientMessage::Kill {
                id: request,
                pid,
                signal,
            } => {
                for page in self.kill(id, request, pid, signal) {
                    self.reply(id, page, Vec::new());
                }
            }
        }
    }

    pub(super) fn spawn(&mut self, conn_id: ConnId, request: Spawn, fds: Vec<OwnedFd>) {
        self.spawn_one(conn_id, request, fds);
        // What the zygote said while the front waited for it.
        if self
            .generations
            .current
            .as_ref()
            .is_some_and(|g| g.zygote.has_news())
        {
            self.zygote_answers();
        }
    }

    /// The peer of `conn` if it may operate the server (`doing` it, for
    /// request `id`): root and the server's uid. Anyone else is answered
    /// `denied`, naming both.
    pub(super) fn operator(&mut self, conn: ConnId, id: u64, doing: &str) -> Option<Peer> {
        let peer = self.connections.get(&conn)?.peer.clone();
        if peer.uid == 0 || peer.uid == self.server_uid {
            return Some(peer);
        }
        let message = format!(
            "only root and the server's uid {} may {doing} it, not uid {}",
            self.server_uid, peer.uid
        );
        self.reply(
            conn,
            request_error(Some(id), ErrorKind::Denied, message),
            Vec::new(),
        );
        None
    }

    fn spawn_one(&mut self, conn_id: ConnId, request: Spawn, fds: Vec<OwnedFd>) {
        let Some(conn) = self.connections.get(&conn_id) else {
            return;
        };
        let launched = self
            .ledger
            .admit(conn_id, request.id, conn.peer.uid, &self.limits)
            .and_then(|()| self.admit_fds(conn.peer.uid))
            .and_then(|()| {
                child_rights(&conn.peer, &request, self.server_uid)
                    .map_err(|message| (ErrorKind::Denied, message))
            })
            .map_err(|(kind, message)| LaunchError::new(kind, message))
            .and_then(|credentials| {
                let (pooled, worker) = match &request.target {
                    Target::Worker { name, .. } => (self.pools.take(name), true),
                    Target::Exec { .. } => (None, false),
                };
                let why_none = (worker && self.generations.current.is_none() && pooled.is_none())
                    .then(|| self.generations.why_none());
                let zygote = self.generations.current.as_mut().map(|g| &mut g.zygote);
                // A panic while checking the request fails this request,
                // not the server. A forked child's panics never come back
                // here: the fork's unwind barrier ends them in the child.
                panic::catch_unwind(AssertUnwindSafe(|| match (pooled, zygote) {
                    (Some(child), _) => {
                        self.launcher
                            .hand_off(child, &request, fds, credentials, &conn.peer)
                    }
                    // A worker needs the preloads: the zygote forks it.
                    (None, Some(zygote)) if worker => {
                        zygote.spawn(&self.launcher, &request, fds, credentials, &conn.peer)
                    }
                    (None, None) if worker => Err(LaunchError::new(
                        ErrorKind::Resource,
                        why_none.unwrap_or_default(),
                    )),
                    // An exec shares nothing preloaded: the front starts it.
                    (None, _) => self.launcher.launch(&request, &conn.peer, fds, credentials),
                }))
                .unwrap_or_else(|panic| {
                    Err(LaunchError::new(
                        ErrorKind::Invalid,
                        format!(
                            "the server panicked checking this request: {}",
                            panic_message(&*panic)
                        ),
                    ))
                })
            });
        let launched = match launched {
            Ok(launched) => launched,
            Err(error) => {
                if let Some(left_out) = self.refusal_log.admit(conn.peer.uid) {
                    let also = if left_out > 0 {
                        format!(
                            " ({left_out} more of uid {}'s refusals were not logged)",
                            conn.peer.uid
                        )
                    } else {
                        String::new()
                    };
                    log!(
                        Level::Warn,
                        "spawn {} of {:?} for client '{}' ({}) refused: {}{also}",
                        request.id,
                        describe(&request),
                        conn.client,
                        conn.peer,
                        error.message
                    );
                }
                let reply = ServerMessage::SpawnFailed {
                    id: request.id,
                    kind: error.kind,
                    errno: error.errno,
                    message: error.message,
                };
                self.ledger.refused(conn.peer.uid);
                self.reply(conn_id, reply, Vec::new());
                return;
            }
        };
        log!(
            Level::Debug,
            "spawn {} of {:?}: pid {}",
            request.id,
            describe(&request),
            launched.pid
        );
        if let Err(e) = self.epoll.add(
            &launched.report,
            EpollEvent::new(EpollFlags::EPOLLIN, pipe_token(launched.pid)),
        ) {
            // Cannot happen short of memory exhaustion; the reaper still
            // settles the child when it exits, but say so.
            log!(
                Level::Error,
                "cannot watch pid {}'s report pipe: {e}",
                launched.pid
            );
        }
        self.ledger
            .launched(conn_id, &conn.peer, &request, launched);
    }

    pub(super) fn signal(&mut self, conn_id: ConnId, child_id: u64, signal: i32) {
        let reply = if !(1..=libc::SIGRTMAX()).contains(&signal) {
            request_error(
                Some(child_id),
                ErrorKind::Invalid,
                format!("signal {signal} is out of range 1..={}", libc::SIGRTMAX()),
            )
        } else {
            let pid = self.ledger.pid_of(conn_id, child_id);
            match pid.and_then(|pid| self.ledger.get(pid)) {
                None => request_error(
                    Some(child_id),
                    ErrorKind::NoSuchChild,
                    format!("no live child with id {child_id} on this connection"),
                ),
                Some(record) => match sys::pidfd_send_signal(record.pidfd.as_fd(), signal) {
                    Ok(()) => ServerMessage::Signaled {
                        id: child_id,
                        signal,
                    },
                    Err(e) => request_error(
                        Some(child_id),
                        ErrorKind::NoSuchChild,
                        format!("cannot signal child {child_id}: {e}"),
                    ),
                },
            }
        };
        self.reply(conn_id, reply, Vec::new());
    }
}
