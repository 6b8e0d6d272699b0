//! The requests that look at the server rather than start a child:
//! `status`, `list` and `kill`. What a peer sees is filtered by who it is:
//! root and the server's own uid see everything; anyone else sees the
//! counts and children of its own uid (and the server-wide facts: version,
//! modules, workers, pools, memory).

use std::os::fd::AsFd;

use forkserver_protocol::{ChildInfo, ErrorKind, OnDisconnect, ServerMessage, StatusReport};

use super::connections::request_error;
use super::EventLoop;
use crate::connection::Listing;
use crate::ledger::{ChildRecord, ConnId};
use crate::peer::Peer;
use crate::reply_size::{self, paged, Page, TEXT_MAX};
use crate::sys;

/// The most stale files a status names (`stale_count` counts them all).
const STALE_LISTED: usize = 32;

impl EventLoop {
    /// Whether a peer sees everything: root, or the server's own uid.
    fn sees_all(&self, peer: &Peer) -> bool {
        peer.uid == 0 || peer.uid == self.server_uid
    }

    /// Whether a peer may see and signal a child: its own uid's children,
    /// or all of them for root and the server's own uid.
    fn may_touch(&self, peer: &Peer, record: &ChildRecord) -> bool {
        self.sees_all(peer) || peer.uid == record.owner_uid
    }

    pub(super) fn status(&mut self, conn_id: ConnId, id: u64) -> StatusReport {
        let uid = self
            .connections
            .get(&conn_id)
            .filter(|c| !self.sees_all(&c.peer))
            .map(|c| c.peer.uid);
        let (children, connections, (spawns, failures)) = match uid {
            None => (
                self.ledger.len(),
                self.connections.len(),
                self.ledger.counts(),
            ),
            Some(uid) => (
                self.ledger
                    .iter()
                    .filter(|(_, r)| r.owner_uid == uid)
                    .count(),
                self.connections
                    .values()
                    .filter(|c| c.peer.uid == uid)
                    .count(),
                self.ledger.counts_of(uid),
            ),
        };
        StatusReport {
            id,
            pid: std::process::id(),
            server_version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            rss_bytes: sys::resident_bytes(None).unwrap_or(0),
            zygote_rss_bytes: (self.generations.zygote_pid())
                .and_then(|pid| sys::resident_bytes(Some(pid as libc::pid_t)))
                .unwrap_or(0),
            modules: self.modules().to_vec(),
            workers: self.launcher.modules.worker_names(),
            children: children as u32,
            connections: connections as u32,
            socket: self
                .listener
                .as_ref()
                .map(|l| l.path().display().to_string())
                .unwrap_or_default(),
            spawns,
            failures,
            pools: self.pools.info(),
            zygote_pid: self.generations.zygote_pid(),
            generation: self.generations.number(),
            reload_failure: self.generations.failure().map(str::to_owned),
            stale: (self.generations.stale().changed())
                .take(STALE_LISTED)
                .map(|path| path.display().to_string())
                .collect(),
            stale_count: self.generations.stale().changed_count() as u32,
            truncated: false,
        }
    }

    /// Starts answering a `list`: the children the peer may see, in pages
    /// that fit, made as the client reads them ([`Listing`]).
    pub(super) fn list(&mut self, conn_id: ConnId, id: u64) {
        let Some(conn) = self.connections.get(&conn_id) else {
            return;
        };
        if let Some(listing) = &conn.listing {
            let message = format!(
                "the list of request {} is still being sent on this connection; read it first",
                listing.id
            );
            self.reply(
                conn_id,
                request_error(Some(id), ErrorKind::Limit, message),
                Vec::new(),
            );
            return;
        }
        let mut pids: Vec<libc::pid_t> = self
            .ledger
            .iter()
            .filter(|(_, record)| self.may_touch(&conn.peer, record))
            .map(|(pid, _)| pid)
            .collect();
        pids.sort_unstable();
        if let Some(conn) = self.connections.get_mut(&conn_id) {
            conn.listing = Some(Listing {
                id,
                pids: pids.into(),
            });
        }
        self.continue_listing(conn_id);
    }

    /// Sends the next pages of connection `conn_id`'s `list` while its
    /// queue is empty (a child reaped since the list began is left out).
    pub(super) fn continue_listing(&mut self, conn_id: ConnId) {
        let max = self.limits.max_message_bytes as usize;
        loop {
            let Some(conn) = self.connections.get_mut(&conn_id) else {
                return;
            };
            if conn.dead || conn.has_queued() {
                return;
            }
            let Some(listing) = conn.listing.as_mut() else {
                return;
            };
            let mut page = Page::new(max);
            while let Some(pid) = listing.pids.pop_front() {
                let Some(record) = self.ledger.get(pid) else {
                    continue;
                };
                if page.push(child_info(pid, record)).is_err() {
                    listing.pids.push_front(pid);
                    break;
                }
            }
            let (id, more) = (listing.id, !listing.pids.is_empty());
            if !more {
                conn.listing = None;
            }
            let children = page.items;
            self.reply(
                conn_id,
                ServerMessage::Children { id, children, more },
                Vec::new(),
            );
        }
    }

    /// Signals one child or all the peer may touch; the pids signalled, in
    /// pages that fit.
    pub(super) fn kill(
        &self,
        conn_id: ConnId,
        id: u64,
        pid: Option<u32>,
        signal: i32,
    ) -> Vec<ServerMessage> {
        let Some(peer) = self.connections.get(&conn_id).map(|c| &c.peer) else {
            return vec![request_error(
                Some(id),
                ErrorKind::Protocol,
                "no connection".into(),
            )];
        };
        if !(1..=libc::SIGRTMAX()).contains(&signal) {
            return vec![request_error(
                Some(id),
                ErrorKind::Invalid,
                format!("signal {signal} is out of range 1..={}", libc::SIGRTMAX()),
            )];
        }
        let targets: Vec<(libc::pid_t, &ChildRecord)> = match pid {
            Some(pid) => match self.ledger.get(pid as libc::pid_t) {
                None => {
                    return vec![request_error(
                        Some(id),
                        ErrorKind::NoSuchChild,
                        format!("pid {pid} is not a live child of this server"),
                    )]
                }
                Some(record) if !self.may_touch(peer, record) => {
                    return vec![request_error(
                        Some(id),
                        ErrorKind::Denied,
                        format!(
                        "pid {pid} was started by uid {}; uid {} may signal only its own children",
                        record.owner_uid, peer.uid
                    ),
                    )]
                }
                Some(record) => vec![(pid as libc::pid_t, record)],
            },
            None => self
                .ledger
                .iter()
                .filter(|(_, record)| self.may_touch(peer, record))
                .collect(),
        };
        let pids: Vec<u32> = targets
            .into_iter()
            .filter(|(_, record)| sys::pidfd_send_signal(record.pidfd.as_fd(), signal).is_ok())
            .map(|(pid, _)| pid as u32)
            .collect();
        paged(
            pids,
            self.limits.max_message_bytes as usize,
            |pids, more| ServerMessage::Killed { id, pids, more },
        )
    }
}

/// What `list` says of a child.
fn child_info(pid: libc::pid_t, record: &ChildRecord) -> ChildInfo {
    let mut target = record.target.clone();
    reply_size::cut_text(&mut target, TEXT_MAX);
    ChildInfo {
        pid: pid as u32,
        target,
        owner_pid: record.owner_pid,
        owner_uid: record.owner_uid,
        owner_connected: record.owner.is_some(),
        age_ms: record.started.elapsed().as_millis() as u64,
        detached: record.on_disconnect == OnDisconnect::Detach,
        cgroup: sys::cgroup_of(pid),
    }
}
