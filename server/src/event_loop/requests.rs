//! The handlers of client requests, one method each, dispatched from
//! `EventLoop::handle`.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use forkserver_protocol::{
    ChildInfo, ErrorKind, OnDisconnect, ServerMessage, Spawn, StatusReport, Target,
    PROTOCOL_VERSION,
};

use super::{fatal, pipe_token, request_error, ConnId, EventLoop};
use crate::children::{ChildRecord, Stage};
use crate::log::{log, Level};
use crate::peer::{child_credentials, Peer};
use crate::spawner::{self, SpawnError};
use crate::sys;
use nix::sys::epoll::{EpollEvent, EpollFlags};

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
                modules: self.spawner.modules.infos.clone(),
                workers: self.spawner.modules.worker_names(),
                limits: self.limits,
            }
        };
        self.reply(id, reply, Vec::new());
    }

    pub(super) fn spawn(&mut self, conn_id: ConnId, request: Spawn, fds: Vec<OwnedFd>) {
        let Some(conn) = self.connections.get(&conn_id) else {
            return;
        };
        let refusal = if conn.children.contains_key(&request.id) {
            Some(SpawnError::new(
                ErrorKind::Invalid,
                format!(
                    "id {} is already used by a live child of this connection",
                    request.id
                ),
            ))
        } else if conn.children.len() >= self.limits.max_children_per_connection as usize {
            Some(SpawnError::new(
                ErrorKind::Limit,
                format!(
                    "this connection already has {} live children (the limit max_children_per_connection)",
                    conn.children.len()
                ),
            ))
        } else if conn.pending >= self.limits.max_pending_per_connection {
            Some(SpawnError::new(
                ErrorKind::Limit,
                format!(
                    "this connection already has {} spawns waiting to start (the limit max_pending_per_connection)",
                    conn.pending
                ),
            ))
        } else {
            None
        };
        let credentials = child_credentials(&conn.peer, request.user.as_ref(), self.server_uid)
            .map_err(|message| SpawnError::new(ErrorKind::Denied, message));
        let pooled = match (&refusal, &credentials, &request.target) {
            (None, Ok(_), Target::Worker { name, .. }) => self.pools.take(name),
            _ => None,
        };
        let result = match (refusal, credentials, pooled) {
            (Some(error), _, _) | (None, Err(error), _) => Err(error),
            (None, Ok(_), Some(child)) => {
                self.spawner
                    .hand_off(child, &request, fds, &self.limits, &conn.peer)
            }
            (None, Ok(run_as), None) => self.spawner.spawn(&request, fds, &self.limits, run_as),
        };
        let started = match result {
            Ok(started) => started,
            Err(error) => {
                log!(
                    Level::Warn,
                    "spawn {} of {:?} for client '{}' ({}) refused: {}",
                    request.id,
                    spawner::describe(&request),
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
                self.failures += 1;
                self.reply(conn_id, reply, Vec::new());
                return;
            }
        };
        log!(
            Level::Debug,
            "spawn {} of {:?}: pid {}",
            request.id,
            spawner::describe(&request),
            started.pid
        );
        if let Err(e) = self.epoll.add(
            &started.error_pipe,
            EpollEvent::new(EpollFlags::EPOLLIN, pipe_token(started.pid)),
        ) {
            // Cannot happen short of memory exhaustion; the reaper still
            // resolves the child when it exits, but say so.
            log!(
                Level::Error,
                "cannot watch pid {}'s exec pipe: {e}",
                started.pid
            );
        }
        let conn = self
            .connections
            .get_mut(&conn_id)
            .expect("a connection stays open while its request is handled");
        conn.children.insert(request.id, started.pid);
        conn.pending += 1;
        self.starting += 1;
        self.spawns += 1;
        self.children.insert(
            started.pid,
            ChildRecord {
                owner: Some(conn_id),
                id: request.id,
                pidfd: started.pidfd,
                stage: Stage::Starting {
                    error_pipe: started.error_pipe,
                    client_ends: started.client_ends,
                    pool_control: started.pool_control,
                },
                on_disconnect: request.on_disconnect,
                kill_at: None,
                early_exit: None,
                target: spawner::describe(&request).to_string_lossy().into_owned(),
                owner_pid: conn.peer.pid,
                owner_uid: conn.peer.uid,
                started: Instant::now(),
            },
        );
    }

    pub(super) fn status(&mut self, id: u64) -> StatusReport {
        let modules = &self.spawner.modules;
        StatusReport {
            id,
            pid: std::process::id(),
            server_version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            rss_bytes: sys::resident_bytes().unwrap_or(0),
            modules: modules.infos.clone(),
            workers: modules.worker_names(),
            children: self.children.len() as u32,
            connections: self.connections.len() as u32,
            socket: self
                .listener
                .as_ref()
                .map(|l| l.path().display().to_string())
                .unwrap_or_default(),
            spawns: self.spawns,
            failures: self.failures,
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
            .children
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
            Some(pid) => match self.children.get(pid as libc::pid_t) {
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
                .children
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
            let pid = self
                .connections
                .get(&conn_id)
                .and_then(|c| c.children.get(&child_id).copied());
            match pid.and_then(|pid| self.children.get(pid)) {
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
