//! The ledger across an upgrade in place (`handover.rs`): every record as
//! plain data, its fds by number, its times relative to the exec.

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use forkserver_protocol::OnDisconnect;
use serde::{Deserialize, Serialize};

use super::{ChildRecord, ConnId, Ledger, Stage};
use crate::launch::ClientEnds;
use crate::sys::{take_passed, Passed};

/// The ledger, handed over.
#[derive(Serialize, Deserialize)]
pub(crate) struct LedgerState {
    children: Vec<ChildState>,
    spawns: u64,
    failures: u64,
    by_uid: Vec<(u32, (u64, u64))>,
    lingering: Vec<(ConnId, Vec<libc::pid_t>)>,
    /// Process groups and the milliseconds left before their SIGKILL.
    dying_groups: Vec<(libc::pid_t, u64)>,
    latest_launch_ms_ago: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct ChildState {
    pid: libc::pid_t,
    owner: Option<ConnId>,
    id: u64,
    pidfd: RawFd,
    stage: StageState,
    on_disconnect: OnDisconnect,
    kill_in_ms: Option<u64>,
    leads_group: bool,
    target: String,
    owner_pid: i32,
    owner_uid: u32,
    age_ms: u64,
}

#[derive(Serialize, Deserialize)]
enum StageState {
    Starting {
        report: RawFd,
        stdin: Option<RawFd>,
        stdout: Option<RawFd>,
        stderr: Option<RawFd>,
        pty: Option<RawFd>,
        pool_control: Option<RawFd>,
    },
    Running,
    Failed,
}

fn ms_until(at: Instant, now: Instant) -> u64 {
    at.saturating_duration_since(now).as_millis() as u64
}

fn pass_some(passed: &mut Passed, fd: &Option<OwnedFd>) -> Option<RawFd> {
    fd.as_ref().map(|fd| passed.pass(fd.as_fd()))
}

/// # Safety
/// As [`take_passed`], for each number.
unsafe fn take_some(fd: Option<RawFd>) -> Option<OwnedFd> {
    // SAFETY: passed on to the caller.
    fd.map(|fd| unsafe { take_passed(fd) })
}

impl Ledger {
    /// The ledger as the next image needs it, its fds added to `passed`.
    pub(crate) fn hand_over(&self, passed: &mut Passed) -> LedgerState {
        let now = Instant::now();
        let children = self
            .children
            .iter()
            .map(|(&pid, record)| {
                let stage = match &record.stage {
                    Stage::Starting {
                        report,
                        client_ends,
                        pool_control,
                    } => StageState::Starting {
                        report: passed.pass(report.as_fd()),
                        stdin: pass_some(passed, &client_ends.stdin),
                        stdout: pass_some(passed, &client_ends.stdout),
                        stderr: pass_some(passed, &client_ends.stderr),
                        pty: pass_some(passed, &client_ends.pty),
                        pool_control: pass_some(passed, pool_control),
                    },
                    Stage::Running => StageState::Running,
                    Stage::Failed => StageState::Failed,
                };
                ChildState {
                    pid,
                    owner: record.owner,
                    id: record.id,
                    pidfd: passed.pass(record.pidfd.as_fd()),
                    stage,
                    on_disconnect: record.on_disconnect,
                    kill_in_ms: record.kill_at.map(|at| ms_until(at, now)),
                    leads_group: record.leads_group,
                    target: record.target.clone(),
                    owner_pid: record.owner_pid,
                    owner_uid: record.owner_uid,
                    age_ms: now.duration_since(record.started).as_millis() as u64,
                }
            })
            .collect();
        LedgerState {
            children,
            spawns: self.spawns,
            failures: self.failures,
            by_uid: self.by_uid.iter().map(|(&uid, &n)| (uid, n)).collect(),
            lingering: self
                .lingering
                .iter()
                .map(|(&c, g)| (c, g.clone()))
                .collect(),
            dying_groups: self
                .dying_groups
                .iter()
                .map(|&(pgid, at)| (pgid, ms_until(at, now)))
                .collect(),
            latest_launch_ms_ago: self
                .latest_launch
                .map(|at| now.duration_since(at).as_millis() as u64),
        }
    }

    /// The ledger an old image handed over, with what is derived from the
    /// records (each connection's children, the counts) made again.
    ///
    /// # Safety
    /// `state` is this image's handover, taken once: its fds are open and
    /// nothing else owns them.
    pub(crate) unsafe fn taken_over(state: LedgerState) -> Ledger {
        let now = Instant::now();
        let ago = |ms: u64| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
        let ahead = |ms: u64| now + Duration::from_millis(ms);
        let mut ledger = Ledger {
            spawns: state.spawns,
            failures: state.failures,
            by_uid: state.by_uid.into_iter().collect(),
            lingering: state.lingering.into_iter().collect(),
            dying_groups: (state.dying_groups.into_iter())
                .map(|(pgid, ms)| (pgid, ahead(ms)))
                .collect(),
            latest_launch: state.latest_launch_ms_ago.map(ago),
            ..Ledger::default()
        };
        if !ledger.lingering.is_empty() {
            ledger.next_lingering_check = Some(now);
        }
        for child in state.children {
            // SAFETY (each take below): the caller's.
            let stage = match child.stage {
                StageState::Starting {
                    report,
                    stdin,
                    stdout,
                    stderr,
                    pty,
                    pool_control,
                } => unsafe {
                    Stage::Starting {
                        report: take_passed(report),
                        client_ends: ClientEnds {
                            stdin: take_some(stdin),
                            stdout: take_some(stdout),
                            stderr: take_some(stderr),
                            pty: take_some(pty),
                        },
                        pool_control: take_some(pool_control),
                    }
                },
                StageState::Running => Stage::Running,
                StageState::Failed => Stage::Failed,
            };
            let starting = matches!(stage, Stage::Starting { .. });
            if let (Some(conn), false) = (child.owner, matches!(stage, Stage::Failed)) {
                let owned = ledger.by_conn.entry(conn).or_default();
                owned.by_id.insert(child.id, child.pid);
                owned.starting += u32::from(starting);
            }
            ledger.starting += usize::from(starting);
            *ledger.live_by_uid.entry(child.owner_uid).or_default() += 1;
            let record = ChildRecord {
                owner: child.owner,
                id: child.id,
                // SAFETY: the caller's.
                pidfd: unsafe { take_passed(child.pidfd) },
                stage,
                on_disconnect: child.on_disconnect,
                kill_at: child.kill_in_ms.map(ahead),
                leads_group: child.leads_group,
                target: child.target,
                owner_pid: child.owner_pid,
                owner_uid: child.owner_uid,
                started: ago(child.age_ms),
            };
            ledger.children.insert(child.pid, record);
        }
        ledger
    }
}
