//! The handlers of client requests, one method each, dispatched from
//! `EventLoop::handle`.

use std::os::fd::{AsFd, OwnedFd};
use std::panic::{self, AssertUnwindSafe};

use forkserver_protocol::{
    ChildInfo, ClientMessage, ErrorKind, OnDisconnect, ServerMessage, Spawn, StatusReport, Target,
    PROTOCOL_VERSION,
};
use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::connections::{fatal, request_error};
use super::{pipe_token, EventLoop};
use crate::launch::{describe, LaunchError};
use crate::ledger::{ChildRecord, ConnId};
use crate::log::{log, Level};
use crate::modules::panic_message;
use crate::peer::{child_credentials, Peer};
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
            ServerMessage::Welcome {
                protocol: PROTOCOL_VERSION,
                server_version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                modules: self.launcher.modules.infos.clone(),
                workers: self.launcher.modules.worker_names(),
                limits: self.limits,
            }
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
                let report = self.status(request);
                self.reply(id, ServerMessage::Status(report), Vec::new());
            }
            ClientMessage::List { id: request } => {
                let reply = self.list(id, request);
                self.reply(id, reply, Vec::new());
            }
            ClientMessage::Kill {
                id: request,
                pid,
                signal,
            } => {
                let reply = self.kill(id, request, pid, signal);
                self.reply(id, reply, Vec::new());
            }
        }
    }

    pub(super) fn spawn(&mut self, conn_id: ConnId, request: Spawn, fds: Vec<OwnedFd>) {
        let Some(conn) = self.connections.get(&conn_id) else {
            return;
        };
        let launched = self
            .ledger
            .admit(conn_id, request.id, &self.limits)
            .and_then(|()| {
                child_credentials(&conn.peer, request.user.as_ref(), self.server_uid)
                    .map_err(|message| (ErrorKind::Denied, message))
            })
            .map_err(|(kind, message)| LaunchError::new(kind, message))
            .and_then(|credentials| {
                let pooled = match &request.target {
                    Target::Worker { name, .. } => self.pools.take(name),
                    Target::Exec { .. } => None,
                };
                // A panic while checking the request (say, in a worker
                // family's name check) fails this request, not the server.
                // A forked child's panics never come back here: the fork's
                // unwind barrier ends them in the child.
                panic::catch_unwind(AssertUnwindSafe(|| match pooled {
                    Some(child) => {
                        self.launcher
                            .hand_off(child, &request, fds, credentials, &conn.peer)
                    }
                    None => self.launcher.launch(&request, fds, credentials),
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
                log!(
                    Level::Warn,
                    "spawn {} of {:?} for client '{}' ({}) refused: {}",
                    request.id,
                    describe(&request),
                    conn.client,
                    conn.peer,
                    error.message
                );
                let reply = ServerMessage::SpawnFailed {
                    id: request.id,
                    kind: error.kind,
                    errno: error.errno,
                    message: error.message,
                };
                self.ledger.refused();
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
        let peer = conn.peer.clone();
        self.ledger.launched(conn_id, &peer, &request, launched);
    }

    pub(super) fn status(&mut self, id: u64) -> StatusReport {
        let modules = &self.launcher.modules;
        let (spawns, failures) = self.ledger.counts();
        StatusReport {
            id,
            pid: std::process::id(),
            server_version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            rss_bytes: sys::resident_bytes().unwrap_or(0),
            modules: modules.infos.clone(),
            workers: modules.worker_names(),
            children: self.ledger.len() as u32,
            connections: self.connections.len() as u32,
            socket: self
                .listener
                .as_ref()
                .map(|l| l.path().display().to_string())
                .unwrap_or_default(),
            spawns,
            failures,
            pools: self.pools.info(),
        }
    }

    /// Whether a peer may see and signal a child: its own uid's children,
    /// or all of them for root and the server's own uid.
    pub(super) fn may_touch(&self, peer: &Peer, record: &ChildRecord) -> bool {
        peer.uid == 0 || peer.uid == self.server_uid || peer.uid == record.owner_uid
    }

    pub(super) fn list(&self, conn_id: ConnId, id: u64) -> ServerMessage {
        let Some(peer) = self.connections.get(&conn_id).map(|c| &c.peer) else {
            return request_error(Some(id), ErrorKind::Protocol, "no connection".into());
        };
        let mut children: Vec<ChildInfo> = self
            .ledger
            .iter()
            .filter(|(_, record)| self.may_touch(peer, record))
            .map(|(pid, record)| ChildInfo {
                pid: pid as u32,
                target: record.target.clone(),
                owner_pid: record.owner_pid,
                owner_uid: record.owner_uid,
                owner_connected: record.owner.is_some(),
                age_ms: record.started.elapsed().as_millis() as u64,
                detached: record.on_disconnect == OnDisconnect::Detach,
            })
            .collect();
        children.sort_by_key(|c| c.pid);
        ServerMessage::Children { id, children }
    }

    pub(super) fn kill(
        &self,
        conn_id: ConnId,
        id: u64,
        pid: Option<u32>,
        signal: i32,
    ) -> ServerMessage {
        let Some(peer) = self.connections.get(&conn_id).map(|c| &c.peer) else {
            return request_error(Some(id), ErrorKind::Protocol, "no connection".into());
        };
        if !(1..=libc::SIGRTMAX()).contains(&signal) {
            return request_error(
                Some(id),
                ErrorKind::Invalid,
                format!("signal {signal} is out of range 1..={}", libc::SIGRTMAX()),
            );
        }
        let targets: Vec<(libc::pid_t, &ChildRecord)> = match pid {
            Some(pid) => match self.ledger.get(pid as libc::pid_t) {
                None => {
                    return request_error(
                        Some(id),
                        ErrorKind::NoSuchChild,
                        format!("pid {pid} is not a live child of this server"),
                    )
                }
                Some(record) if !self.may_touch(peer, record) => {
                    return request_error(
                        Some(id),
                        ErrorKind::Denied,
                        format!(
                        "pid {pid} was started by uid {}; uid {} may signal only its own children",
                        record.owner_uid, peer.uid
                    ),
                    )
                }
                Some(record) => vec![(pid as libc::pid_t, record)],
            },
            None => self
                .ledger
                .iter()
                .filter(|(_, record)| self.may_touch(peer, record))
                .collect(),
        };
        let pids = targets
            .into_iter()
            .filter(|(_, record)| sys::pidfd_send_signal(record.pidfd.as_fd(), signal).is_ok())
            .map(|(pid, _)| pid as u32)
            .collect();
        ServerMessage::Killed { id, pids }
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
