//! Upgrade in place, as the event loop does it: the old image hands its
//! state over and runs the binary again; the new one takes it over
//! (`handover.rs` has the why, the exec, and what keeps a failed upgrade
//! from losing anything).

use std::os::fd::AsFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use forkserver_protocol::{ErrorKind, ServerMessage};
use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::connections::request_error;
use super::{conn_token, pipe_token, EventLoop};
use crate::connection::Connection;
use crate::handover::{Handover, FORMAT};
use crate::ledger::{ConnId, Ledger};
use crate::log::{log, Level};
use crate::sys::{self, Passed};

/// What a new image owes once its first generation serves: the answer to
/// whoever asked for the upgrade.
pub(super) struct TakenOver {
    asker: Option<(ConnId, u64)>,
    previous: String,
    /// The upgrade failed and this is the old binary again, with why.
    failed: Option<String>,
}

impl EventLoop {
    /// An `upgrade` request from `conn`: root and the server's uid only.
    pub(super) fn upgrade_request(&mut self, conn: ConnId, id: u64) {
        if let Some(peer) = self.operator(conn, id, "upgrade") {
            self.upgrade(&format!("upgrade asked by {peer}"), Some((conn, id)));
        }
    }

    /// Runs the server's binary again in this process, handing everything
    /// over (SIGUSR2, the `upgrade` request). Returns only if the upgrade
    /// did not happen: then this image serves on, as it was, and `asker`
    /// is told why.
    pub(super) fn upgrade(&mut self, why: &str, asker: Option<(ConnId, u64)>) {
        let image = match &self.image {
            Ok(image) => Rc::clone(image),
            Err(e) => {
                let why = format!("this server's binary is unknown: {e}");
                return self.upgrade_failed(asker, why);
            }
        };
        let Some(listener) = &self.listener else {
            return self.upgrade_failed(asker, "the server is shutting down".into());
        };
        log!(
            Level::Info,
            "{why}: upgrading in place: checking that {} can take over",
            image.exe().display()
        );
        if let Err(why) = image.probe() {
            return self.upgrade_failed(asker, why);
        }
        let mut passed = Passed::default();
        let state = Handover {
            format: FORMAT,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            listener: listener.hand_over(&mut passed),
            connections: (self.connections.iter())
                .map(|(&id, conn)| conn.hand_over(id, &mut passed))
                .collect(),
            next_conn: self.next_conn,
            ledger: self.ledger.hand_over(&mut passed),
            generation: self.generations.latest(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            notify_socket: self.readiness.as_ref().and_then(|r| r.socket_path()),
            signal_mask: Vec::new(),
            asker,
            reloads_waiting: self.generations.waiting_reloads(),
        };
        if let Some(lifeline) = &self.lifeline {
            // Found again at the same number by `--lifeline-fd`.
            passed.pass(lifeline.as_fd());
        }
        log!(
            Level::Info,
            "handing over {} connection(s) and {} child(ren) to {}",
            state.connections.len(),
            self.ledger.len(),
            image.exe().display()
        );
        self.readiness_reloading();
        let old_mask = match sys::block_all_signals() {
            Ok(mask) => mask,
            Err(e) => return self.upgrade_failed(asker, format!("blocking signals: {e}")),
        };
        let state = Handover {
            signal_mask: sys::signals_in(&old_mask),
            ..state
        };
        let error = image.exec(&state, &passed);
        sys::restore_signal_mask(&old_mask);
        let why = format!("cannot run {}: {error}", image.exe().display());
        self.upgrade_failed(asker, why);
    }

    fn upgrade_failed(&mut self, asker: Option<(ConnId, u64)>, why: String) {
        log!(
            Level::Error,
            "the upgrade in place failed; this image serves on, with every connection and child: {why}"
        );
        if let Some((conn, id)) = asker {
            let message = format!("the upgrade failed; the server serves on as it was: {why}");
            let reply = request_error(Some(id), ErrorKind::Invalid, message);
            self.reply(conn, reply, Vec::new());
        }
        self.readiness_ready("the upgrade failed; the server serves on");
    }

    /// In a new image: takes over the connections and children an old one
    /// handed over (its listener was taken by `serve`); what is owed is
    /// answered by [`Self::upgrade_answered`] once a generation serves.
    ///
    /// # Safety
    /// `state` is this image's handover, taken once.
    pub(super) unsafe fn take_over(
        &mut self,
        state: Handover,
        failed: Option<String>,
    ) -> TakenOver {
        for conn in state.connections {
            let id = conn.id;
            // SAFETY: the caller's.
            let conn = unsafe { Connection::taken_over(conn) };
            let mut flags = EpollFlags::EPOLLIN;
            if conn.has_queued() {
                flags |= EpollFlags::EPOLLOUT;
            }
            if let Err(e) = self
                .epoll
                .add(&conn, EpollEvent::new(flags, conn_token(id)))
            {
                log!(Level::Error, "cannot watch a connection handed over: {e}");
                continue;
            }
            self.usage.connected(conn.peer.uid);
            self.usage
                .queue_changed(conn.peer.uid, (0, 0), conn.queued());
            self.connections.insert(id, conn);
        }
        self.next_conn = state.next_conn;
        // SAFETY: the caller's.
        self.ledger = unsafe { Ledger::taken_over(state.ledger) };
        let starting: Vec<_> = (self.ledger.iter())
            .map(|(pid, _)| pid)
            .filter(|&pid| self.ledger.report_pipe(pid).is_some())
            .collect();
        for pid in starting {
            let report = self.ledger.report_pipe(pid).expect("filtered above");
            let event = EpollEvent::new(EpollFlags::EPOLLIN, pipe_token(pid));
            if let Err(e) = self.epoll.add(report, event) {
                log!(Level::Error, "cannot watch pid {pid}'s report pipe: {e}");
            }
        }
        let uptime = Duration::from_millis(state.uptime_ms);
        self.started = Instant::now().checked_sub(uptime).unwrap_or(self.started);
        self.generations
            .taken_over(state.generation, state.reloads_waiting);
        // Children that ended while no image watched.
        while let Some((pid, status)) = sys::reap_one() {
            self.child_reaped(pid, status);
        }
        TakenOver {
            asker: state.asker,
            previous: state.version,
            failed,
        }
    }

    /// A new image serves: says so, and answers whoever asked.
    pub(super) fn upgrade_answered(&mut self, taken: TakenOver) {
        let version = env!("CARGO_PKG_VERSION");
        let generation = self.generations.latest();
        let reply = match &taken.failed {
            Some(why) => {
                log!(
                    Level::Error,
                    "the upgrade in place failed, and the old binary took the server back: {why}"
                );
                let message =
                    format!("the new binary could not take over, and the old one serves on: {why}");
                taken
                    .asker
                    .map(|(_, id)| request_error(Some(id), ErrorKind::Invalid, message))
            }
            None => {
                log!(
                    Level::Info,
                    "upgraded in place from {} to {version}: {} connection(s) and {} child(ren) kept; generation {generation} serves",
                    taken.previous,
                    self.connections.len(),
                    self.ledger.len()
                );
                taken.asker.map(|(_, id)| ServerMessage::Upgraded {
                    id,
                    version: version.to_owned(),
                    previous: taken.previous.clone(),
                    generation,
                })
            }
        };
        if let (Some((conn, _)), Some(reply)) = (taken.asker, reply) {
            self.reply(conn, reply, Vec::new());
        }
    }
}
