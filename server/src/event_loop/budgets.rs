//! Per-uid budgets: what all the connections of one uid may hold of the
//! server at once, so that one user cannot take what the others need.
//! - `max_children_per_uid`: live children (the ledger counts them);
//! - `max_fds_per_uid`: the server's fds held for the uid — a pidfd per
//!   live child, the fds of its queued replies, its connections — at most
//!   a quarter of the server's own fd limit;
//! - `max_queued_bytes_per_uid`: bytes of replies queued for its
//!   connections that are not reading.
//!
//! A budget reached refuses that uid's next spawn (`limit`), or closes the
//! connection whose reply would not fit; other uids are not touched.
//! Queued replies are counted here as each connection's queue changes.

use std::collections::HashMap;

use forkserver_protocol::ErrorKind;

use super::EventLoop;
use crate::connection::Room;
use crate::ledger::ConnId;
use crate::sys;

/// What one uid's connections hold.
#[derive(Debug, Default)]
pub(super) struct UidUsage {
    connections: usize,
    queued_bytes: usize,
    queued_fds: usize,
}

/// Freeing at least this much of queued replies hands the memory back to
/// the system (the allocator would keep it for reuse).
const GIVE_BACK_BYTES: usize = 1 << 20;

/// Refusals logged per uid per second; past it they are counted, and the
/// count logged with the next one that is: a peer that sends refused
/// requests as fast as it can would otherwise write the server's log (and
/// the journal) as fast as it can.
const LOGGED_REFUSALS_PER_SECOND: u32 = 10;

/// Per uid: the current second's start, refusals logged in it, and those
/// not logged since the last that was.
#[derive(Debug, Default)]
pub(super) struct RefusalLog(HashMap<u32, (Option<std::time::Instant>, u32, u64)>);

impl RefusalLog {
    /// Whether to log a refusal for `uid` now; if so, how many were left
    /// out before it.
    pub(super) fn admit(&mut self, uid: u32) -> Option<u64> {
        let now = std::time::Instant::now();
        let (since, logged, left_out) = self.0.entry(uid).or_default();
        if since.is_none_or(|at| now.duration_since(at).as_secs() >= 1) {
            *since = Some(now);
            *logged = 0;
        }
        if *logged >= LOGGED_REFUSALS_PER_SECOND {
            *left_out += 1;
            return None;
        }
        *logged += 1;
        Some(std::mem::take(left_out))
    }
}

/// Every uid's usage.
#[derive(Debug, Default)]
pub(super) struct Usage(HashMap<u32, UidUsage>);

impl Usage {
    pub(super) fn connected(&mut self, uid: u32) {
        self.0.entry(uid).or_default().connections += 1;
    }

    /// A connection of `uid` closed with `queued` (bytes, fds) unsent.
    pub(super) fn disconnected(&mut self, uid: u32, queued: (usize, usize)) {
        self.queue_changed(uid, queued, (0, 0));
        if let Some(usage) = self.0.get_mut(&uid) {
            usage.connections -= 1;
            if usage.connections == 0 {
                self.0.remove(&uid);
            }
        }
    }

    /// A connection of `uid`'s queue went from `before` to `after` (bytes,
    /// fds).
    pub(super) fn queue_changed(
        &mut self,
        uid: u32,
        before: (usize, usize),
        after: (usize, usize),
    ) {
        if before == after {
            return;
        }
        let Some(usage) = self.0.get_mut(&uid) else {
            return;
        };
        usage.queued_bytes = usage.queued_bytes + after.0 - before.0;
        usage.queued_fds = usage.queued_fds + after.1 - before.1;
        if before.0 >= after.0 + GIVE_BACK_BYTES {
            sys::give_back_free_memory();
        }
    }

    fn of(&self, uid: u32) -> Option<&UidUsage> {
        self.0.get(&uid)
    }
}

impl EventLoop {
    /// What `uid` may still queue.
    pub(super) fn room(&self, uid: u32) -> Room {
        let queued = self.usage.of(uid).map_or(0, |u| u.queued_bytes);
        Room {
            bytes: (self.limits.max_queued_bytes_per_uid as usize).saturating_sub(queued),
            fds: (self.limits.max_fds_per_uid as usize).saturating_sub(self.fds_of(uid)),
        }
    }

    /// The server's fds held for `uid`.
    fn fds_of(&self, uid: u32) -> usize {
        let held = self
            .usage
            .of(uid)
            .map_or(0, |u| u.connections + u.queued_fds);
        held + self.ledger.live_of(uid) as usize
    }

    /// Whether `uid` may have one more child, as far as the server's fds
    /// go (the child's pidfd); the ledger checks the counts.
    pub(super) fn admit_fds(&self, uid: u32) -> Result<(), (ErrorKind, String)> {
        let held = self.fds_of(uid);
        if held < self.limits.max_fds_per_uid as usize {
            return Ok(());
        }
        Err((
            ErrorKind::Limit,
            format!(
                "uid {uid} holds {held} of the server's fds (its children's pidfds, its queued replies and connections; the limit max_fds_per_uid)"
            ),
        ))
    }

    /// Runs `change` on connection `id`'s queue and counts the difference
    /// to its uid.
    pub(super) fn with_queue<R>(
        &mut self,
        id: ConnId,
        change: impl FnOnce(&mut crate::connection::Connection, Room) -> R,
    ) -> Option<R> {
        let uid = self.connections.get(&id)?.peer.uid;
        let room = self.room(uid);
        let conn = self.connections.get_mut(&id)?;
        let before = conn.queued();
        let result = change(conn, room);
        let after = conn.queued();
        self.usage.queue_changed(uid, before, after);
        Some(result)
    }
}
