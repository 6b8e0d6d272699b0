//! The ledger: the one record of every child the server launched, from its
//! request to its reaping, and the replies each step owes its client.
//!
//! A child's life, as its client is told it:
//! 1. [`Ledger::launched`]: forked (or handed to a pool child); nothing sent
//!    yet. Its report pipe is watched by the event loop.
//! 2. [`Ledger::start_reported`]: the report pipe spoke: `Spawned` (with the
//!    pidfd and pipe ends) or `SpawnFailed`.
//! 3. [`Ledger::reaped`]: `Exited`, only after `Spawned`. If the child is
//!    reaped before its report was read, the report is read then (the pipe
//!    is closed once the child is dead), so `Spawned` still comes first.
//!
//! The ledger makes no system calls but reading a report pipe, duplicating
//! a pidfd and signalling through pidfds; the event loop sends what it
//! returns. The unit tests below drive it without forking.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use forkserver_protocol::{ChildStatus, ErrorKind, Limits, OnDisconnect, ServerMessage, Spawn};

use crate::launch::report::{self, Outcome};
use crate::launch::{describe, ClientEnds, Launched};
use crate::peer::Peer;
use crate::sys;

/// Identifies a connection in the event loop.
pub(crate) type ConnId = u64;

/// Where a child is in its life, as far as its client is told.
pub(crate) enum Stage {
    /// Launched; its report pipe has not yet said whether it started.
    Starting {
        report: OwnedFd,
        client_ends: ClientEnds,
        /// A pool child's control socket, closed only once its start is
        /// reported. Closed earlier, with the child's ready byte unread in
        /// it, Linux would mark the child's end ECONNRESET, and the child's
        /// recv would fail with that before reading the request queued
        /// ahead of it (the child would exit 0 unspecialised).
        pool_control: Option<OwnedFd>,
    },
    /// `Spawned` was sent; `Exited` follows when it is reaped.
    Running,
    /// `SpawnFailed` was sent; it exits 127 and is reaped silently.
    Failed,
}

/// One live (unreaped) child.
pub(crate) struct ChildRecord {
    /// The connection that spawned it; `None` once that closed.
    pub(crate) owner: Option<ConnId>,
    /// The spawn request's id on that connection.
    pub(crate) id: u64,
    pub(crate) pidfd: OwnedFd,
    pub(crate) stage: Stage,
    pub(crate) on_disconnect: OnDisconnect,
    /// When to SIGKILL it, after a SIGTERM that may be ignored.
    pub(crate) kill_at: Option<Instant>,
    /// It leads a process group of its own (pgid = pid): a new session, or
    /// `process_group: 0`. Killing it on disconnect kills the group.
    pub(crate) leads_group: bool,
    /// The program or worker, for `List`.
    pub(crate) target: String,
    /// The peer that spawned it (pid and uid at connect time).
    pub(crate) owner_pid: i32,
    pub(crate) owner_uid: u32,
    pub(crate) started: Instant,
}

/// A reply the ledger owes a connection.
pub(crate) struct Reply {
    pub(crate) conn: ConnId,
    pub(crate) message: ServerMessage,
    pub(crate) fds: Vec<OwnedFd>,
}

/// What settling a start produced: replies in the order to send them, and
/// the report pipe, which the event loop stops watching before it closes.
#[derive(Default)]
pub(crate) struct Settled {
    pub(crate) replies: Vec<Reply>,
    pub(crate) report: Option<OwnedFd>,
}

/// A connection's live children.
#[derive(Default)]
struct Owned {
    /// Spawn id -> pid.
    by_id: HashMap<u64, libc::pid_t>,
    /// How many of them are still `Starting`.
    starting: u32,
}

#[derive(Default)]
pub(crate) struct Ledger {
    children: HashMap<libc::pid_t, ChildRecord>,
    by_conn: HashMap<ConnId, Owned>,
    /// Children whose start is not yet reported, on every connection.
    starting: usize,
    /// Children launched and spawn requests failed, for `Status`: all
    /// together, and by the requesting peer's uid.
    spawns: u64,
    failures: u64,
    by_uid: HashMap<u32, (u64, u64)>,
    /// Live children by their peer's uid (`max_children_per_uid`).
    live_by_uid: HashMap<u32, u32>,
    /// By connection: process groups whose leader, a child of that
    /// connection, exited while members remained (`sh -c 'helper & exit'`);
    /// they are killed when the connection goes, as the leader would have
    /// been.
    lingering: HashMap<ConnId, Vec<libc::pid_t>>,
    /// Groups sent SIGTERM on a disconnect, and when they get SIGKILL.
    dying_groups: Vec<(libc::pid_t, Instant)>,
    /// When the latest child was launched.
    latest_launch: Option<Instant>,
    /// When to look again for lingering groups that emptied.
    next_lingering_check: Option<Instant>,
}

/// How often lingering groups are checked for members: a group that
/// emptied is forgotten within this, long before its number could come
/// round again (that takes the kernel's pid counter wrapping past pid_max).
const LINGERING_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl Ledger {
    /// Whether connection `conn` may launch a child for request `id` now;
    /// Err says which limit stops it.
    pub(crate) fn admit(
        &self,
        conn: ConnId,
        id: u64,
        uid: u32,
        limits: &Limits,
    ) -> Result<(), (ErrorKind, String)> {
        let live = self.live_of(uid);
        if live >= limits.max_children_per_uid {
            return Err((
                ErrorKind::Limit,
                format!(
                    "uid {uid} already has {live} live children (the limit max_children_per_uid)"
                ),
            ));
        }
        let Some(owned) = self.by_conn.get(&conn) else {
            return Ok(());
        };
        if owned.by_id.contains_key(&id) {
            Err((
                ErrorKind::Invalid,
                format!("id {id} is already used by a live child of this connection"),
            ))
        } else if owned.by_id.len() >= limits.max_children_per_connection as usize {
            Err((
                ErrorKind::Limit,
                format!(
                    "this connection already has {} live children (the limit max_children_per_connection)",
                    owned.by_id.len()
                ),
            ))
        } else if owned.starting >= limits.max_pending_per_connection {
            Err((
                ErrorKind::Limit,
                format!(
                    "this connection already has {} spawns waiting to start (the limit max_pending_per_connection)",
                    owned.starting
                ),
            ))
        } else {
            Ok(())
        }
    }

    /// Records a child launched for `request` on connection `conn`.
    pub(crate) fn launched(&mut self, conn: ConnId, peer: &Peer, request: &Spawn, child: Launched) {
        let owned = self.by_conn.entry(conn).or_default();
        owned.by_id.insert(request.id, child.pid);
        owned.starting += 1;
        self.starting += 1;
        self.spawns += 1;
        self.by_uid.entry(peer.uid).or_default().0 += 1;
        *self.live_by_uid.entry(peer.uid).or_default() += 1;
        let started = Instant::now();
        self.latest_launch = Some(started);
        self.children.insert(
            child.pid,
            ChildRecord {
                owner: Some(conn),
                id: request.id,
                pidfd: child.pidfd,
                stage: Stage::Starting {
                    report: child.report,
                    client_ends: child.client_ends,
                    pool_control: child.pool_control,
                },
                on_disconnect: request.on_disconnect,
                kill_at: None,
                leads_group: request.new_session || request.process_group == Some(0),
                target: describe(request).to_string_lossy().into_owned(),
                owner_pid: peer.pid,
                owner_uid: peer.uid,
                started,
            },
        );
    }

    /// Counts a spawn request of `uid` refused before any child existed.
    pub(crate) fn refused(&mut self, uid: u32) {
        self.failures += 1;
        self.by_uid.entry(uid).or_default().1 += 1;
    }

    /// The report pipe of a child still starting.
    pub(crate) fn report_pipe(&self, pid: libc::pid_t) -> Option<&OwnedFd> {
        match self.children.get(&pid) {
            Some(ChildRecord {
                stage: Stage::Starting { report, .. },
                ..
            }) => Some(report),
            _ => None,
        }
    }

    /// A child's report pipe has spoken (`Pending` settles nothing): its
    /// client gets `Spawned` or `SpawnFailed`.
    pub(crate) fn start_reported(&mut self, pid: libc::pid_t, outcome: Outcome) -> Settled {
        let Some(record) = self.children.get_mut(&pid) else {
            return Settled::default();
        };
        let (stage, failure) = match outcome {
            Outcome::Pending => return Settled::default(),
            Outcome::Started => (Stage::Running, None),
            Outcome::Failed(failure) => (Stage::Failed, Some(failure)),
        };
        let Stage::Starting {
            report,
            client_ends,
            pool_control,
        } = std::mem::replace(&mut record.stage, stage)
        else {
            return Settled::default();
        };
        // The child has read its request (it set up before reporting).
        drop(pool_control);
        self.starting -= 1;
        let (id, owner) = (record.id, record.owner);
        let message = match failure {
            None => spawned(id, pid, record, client_ends),
            Some(failure) => {
                self.failures += 1;
                self.by_uid.entry(record.owner_uid).or_default().1 += 1;
                let (kind, errno, message) = failure.describe();
                (
                    ServerMessage::SpawnFailed {
                        id,
                        kind,
                        errno,
                        message,
                    },
                    Vec::new(),
                )
            }
        };
        let mut settled = Settled {
            replies: Vec::new(),
            report: Some(report),
        };
        if let Some(conn) = owner {
            if let Some(owned) = self.by_conn.get_mut(&conn) {
                owned.starting = owned.starting.saturating_sub(1);
                if failure.is_some() {
                    owned.by_id.remove(&id);
                }
            }
            let (message, fds) = message;
            settled.replies.push(Reply { conn, message, fds });
        }
        settled
    }

    /// A child was reaped: its client gets `Exited` (after `Spawned`, read
    /// now if it had not been). None if it was not one of ours (an idle
    /// pool child, say).
    pub(crate) fn reaped(&mut self, pid: libc::pid_t, status: ChildStatus) -> Option<Settled> {
        let mut settled = match self.children.get(&pid)?.stage {
            Stage::Starting { ref report, .. } => {
                // The child is dead, so its end of the pipe is closed and
                // what it said is there to read: EOF means it started.
                let outcome = match report::read_outcome(report) {
                    Outcome::Pending => Outcome::Started,
                    outcome => outcome,
                };
                self.start_reported(pid, outcome)
            }
            _ => Settled::default(),
        };
        let record = self.children.remove(&pid)?;
        self.note_lingering_group(pid, &record);
        if let Some(live) = self.live_by_uid.get_mut(&record.owner_uid) {
            *live -= 1;
            if *live == 0 {
                self.live_by_uid.remove(&record.owner_uid);
            }
        }
        if let (Stage::Running, Some(conn)) = (record.stage, record.owner) {
            if let Some(owned) = self.by_conn.get_mut(&conn) {
                owned.by_id.remove(&record.id);
            }
            settled.replies.push(Reply {
                conn,
                message: ServerMessage::Exited {
                    id: record.id,
                    pid: pid as u32,
                    status,
                },
                fds: Vec::new(),
            });
        }
        Some(settled)
    }

    /// Remembers the group child `pid` led, if it is to be killed with its
    /// connection and still has members now that its leader is gone. (Its
    /// number stays reserved while a member lives; once all of them exit
    /// it could be given to another process's group after the kernel's pid
    /// counter wraps around pid_max, which is why an emptied group is
    /// forgotten within LINGERING_CHECK: `forget_empty_groups`.)
    fn note_lingering_group(&mut self, pid: libc::pid_t, record: &ChildRecord) {
        let Some(conn) = record.owner else {
            return;
        };
        if !record.leads_group
            || record.on_disconnect != OnDisconnect::Kill
            || sys::signal_group(pid, 0).is_err()
        {
            return;
        }
        self.lingering.entry(conn).or_default().push(pid);
        self.next_lingering_check
            .get_or_insert_with(|| Instant::now() + LINGERING_CHECK);
    }

    /// Forgets the lingering groups left with no member, if it is time to
    /// look (every LINGERING_CHECK while there are any).
    fn forget_empty_groups(&mut self, now: Instant) {
        if self.next_lingering_check.is_none_or(|at| at > now) {
            return;
        }
        self.lingering.retain(|_, groups| {
            groups.retain(|&pgid| sys::signal_group(pgid, 0).is_ok());
            !groups.is_empty()
        });
        self.next_lingering_check = (!self.lingering.is_empty()).then(|| now + LINGERING_CHECK);
    }

    /// Connection `conn` closed: its children lose their owner; those whose
    /// `on_disconnect` is kill get SIGTERM now and SIGKILL at `kill_at`,
    /// each with its process group if it leads one, and so do the groups
    /// its exited children left behind. Returns how many children it had.
    pub(crate) fn disconnected(&mut self, conn: ConnId, kill_at: Instant) -> usize {
        for pgid in self.lingering.remove(&conn).unwrap_or_default() {
            if sys::signal_group(pgid, libc::SIGTERM).is_ok() {
                self.dying_groups.push((pgid, kill_at));
            }
        }
        let Some(owned) = self.by_conn.remove(&conn) else {
            return 0;
        };
        for pid in owned.by_id.values() {
            let Some(record) = self.children.get_mut(pid) else {
                continue;
            };
            record.owner = None;
            if record.on_disconnect == OnDisconnect::Kill {
                // ESRCH only means it already exited and awaits reaping.
                let _ = sys::pidfd_send_signal(record.pidfd.as_fd(), libc::SIGTERM);
                record.kill_at = Some(kill_at);
                if record.leads_group {
                    // The leader is not reaped yet, so the group's number
                    // is still its own.
                    let _ = sys::signal_group(*pid, libc::SIGTERM);
                    self.dying_groups.push((*pid, kill_at));
                }
            }
        }
        owned.by_id.len()
    }

    /// The pid of connection `conn`'s live child with spawn id `id`.
    pub(crate) fn pid_of(&self, conn: ConnId, id: u64) -> Option<libc::pid_t> {
        self.by_conn.get(&conn)?.by_id.get(&id).copied()
    }

    /// How many live children connection `conn` owns.
    pub(crate) fn owned_by(&self, conn: ConnId) -> usize {
        self.by_conn.get(&conn).map_or(0, |o| o.by_id.len())
    }

    pub(crate) fn get(&self, pid: libc::pid_t) -> Option<&ChildRecord> {
        self.children.get(&pid)
    }

    /// Every live child, by pid.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (libc::pid_t, &ChildRecord)> {
        self.children.iter().map(|(&pid, record)| (pid, record))
    }

    pub(crate) fn len(&self) -> usize {
        self.children.len()
    }

    /// Children whose start is not yet reported (a refill waits for 0).
    pub(crate) fn starting(&self) -> usize {
        self.starting
    }

    /// When the latest child was launched, if any was.
    pub(crate) fn latest_launch(&self) -> Option<Instant> {
        self.latest_launch
    }

    /// Children launched and spawn requests failed.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.spawns, self.failures)
    }

    /// Children launched and spawn requests failed for peers of `uid`.
    pub(crate) fn counts_of(&self, uid: u32) -> (u64, u64) {
        self.by_uid.get(&uid).copied().unwrap_or_default()
    }

    /// Live children of peers of `uid`, detached ones included.
    pub(crate) fn live_of(&self, uid: u32) -> u32 {
        self.live_by_uid.get(&uid).copied().unwrap_or(0)
    }

    /// How many children are being killed because their connection went:
    /// what a shutdown waits for (then [`Ledger::kill_dying_groups`]).
    pub(crate) fn being_killed(&self) -> usize {
        let children = self
            .children
            .values()
            .filter(|r| r.owner.is_none() && r.on_disconnect == OnDisconnect::Kill)
            .count();
        children
    }

    /// SIGKILLs the groups still in their grace period: a server that is
    /// stopping does not wait for them (a member that already exited may
    /// stay a zombie of whoever adopted it, so the kernel cannot tell us
    /// when a group is empty).
    pub(crate) fn kill_dying_groups(&mut self) {
        for (pgid, _) in self.dying_groups.drain(..) {
            let _ = sys::signal_group(pgid, libc::SIGKILL);
        }
    }

    /// The earliest SIGKILL deadline, if any.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let groups = self.dying_groups.iter().map(|&(_, at)| at);
        self.children
            .values()
            .filter_map(|r| r.kill_at)
            .chain(groups)
            .chain(self.next_lingering_check)
            .min()
    }

    /// SIGKILLs every child and group whose grace period is over, and
    /// forgets the lingering groups that emptied.
    pub(crate) fn kill_overdue(&mut self, now: Instant) {
        for record in self.children.values_mut() {
            if record.kill_at.is_some_and(|at| at <= now) {
                let _ = sys::pidfd_send_signal(record.pidfd.as_fd(), libc::SIGKILL);
                // Stays in the ledger until reaped; no further deadline.
                record.kill_at = None;
            }
        }
        self.dying_groups.retain(|&(pgid, at)| {
            if at > now {
                return true;
            }
            // ESRCH: the group is gone already.
            let _ = sys::signal_group(pgid, libc::SIGKILL);
            false
        });
        self.forget_empty_groups(now);
    }
}

/// `Spawned` and its fds: the pidfd first, then the pipe ends asked for.
fn spawned(
    id: u64,
    pid: libc::pid_t,
    record: &ChildRecord,
    ends: ClientEnds,
) -> (ServerMessage, Vec<OwnedFd>) {
    let mut fds = Vec::with_capacity(4);
    // The server keeps its own pidfd to signal the child; the client gets a
    // duplicate. If dup fails (EMFILE), the client gets no fd and is told.
    match record.pidfd.try_clone() {
        Ok(pidfd) => fds.push(pidfd),
        Err(e) => {
            return (
                ServerMessage::Error {
                    id: Some(id),
                    kind: ErrorKind::Resource,
                    message: format!(
                        "child {pid} started but its pidfd could not be duplicated: {e}"
                    ),
                    fatal: false,
                },
                Vec::new(),
            )
        }
    }
    let mut index = |end: Option<OwnedFd>| {
        end.map(|fd| {
            fds.push(fd);
            (fds.len() - 1) as u32
        })
    };
    let stdin = index(ends.stdin);
    let stdout = index(ends.stdout);
    let stderr = index(ends.stderr);
    let pty = index(ends.pty);
    let message = ServerMessage::Spawned {
        id,
        pid: pid as u32,
        pidfd: 0,
        stdin,
        stdout,
        stderr,
        pty,
    };
    (message, fds)
}

#[path = "ledger_handover.rs"]
mod handover;
pub(crate) use handover::LedgerState;

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
