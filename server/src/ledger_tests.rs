//! The ledger, driven without forking: real pipes stand in for report
//! pipes, /dev/null for pidfds, and made-up pids for children.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use forkserver_protocol::{ChildStatus, ErrorKind, Limits, ServerMessage, Spawn, StdioSpec};

use super::*;
use crate::launch::report::{FailedStep, Failure};

const CONN: ConnId = 1;

fn peer() -> Peer {
    Peer {
        pid: 10,
        uid: 1000,
        gid: 1000,
        groups: Vec::new(),
        own: Err("not read in this test".into()),
    }
}

/// Records a child `pid` for spawn `id`; returns the write end of its
/// report pipe (the child's).
fn launch(ledger: &mut Ledger, pid: libc::pid_t, id: u64) -> OwnedFd {
    let (report, write) = sys::pipe(true).unwrap();
    let (stdout, _) = sys::pipe(false).unwrap();
    let mut request = Spawn::exec(id, "prog", Vec::new());
    request.stdout = StdioSpec::Pipe;
    // The pids here are made up: a child that led a process group would
    // have its (real) group signalled on disconnect.
    request.new_session = false;
    let child = Launched {
        pid,
        pidfd: std::fs::File::open("/dev/null").unwrap().into(),
        report,
        client_ends: ClientEnds {
            stdout: Some(stdout),
            ..ClientEnds::default()
        },
        pool_control: None,
    };
    ledger.launched(CONN, &peer(), &request, child);
    write
}

fn kinds(settled: &Settled) -> Vec<&'static str> {
    settled
        .replies
        .iter()
        .map(|r| match r.message {
            ServerMessage::Spawned { .. } => "spawned",
            ServerMessage::SpawnFailed { .. } => "spawn_failed",
            ServerMessage::Exited { .. } => "exited",
            _ => "other",
        })
        .collect()
}

const EXITED_0: ChildStatus = ChildStatus::Exited { code: 0 };

#[test]
fn spawned_comes_before_exited_even_when_the_reaper_is_first() {
    let mut ledger = Ledger::default();
    let write = launch(&mut ledger, 100, 1);
    assert_eq!(ledger.starting(), 1);
    // The child exec'd (its pipe closed) and exited before the event loop
    // read the pipe: the reaper runs first.
    drop(write);
    let settled = ledger.reaped(100, EXITED_0).unwrap();
    assert_eq!(kinds(&settled), ["spawned", "exited"]);
    assert!(
        settled.report.is_some(),
        "the pipe is handed back to unwatch"
    );
    // Spawned carries the pidfd then the stdout end, indexed.
    let spawned = &settled.replies[0];
    assert_eq!(spawned.fds.len(), 2);
    assert!(matches!(
        spawned.message,
        ServerMessage::Spawned {
            id: 1,
            pid: 100,
            pidfd: 0,
            stdin: None,
            stdout: Some(1),
            stderr: None,
            pty: None
        }
    ));
    assert_eq!((ledger.len(), ledger.starting()), (0, 0));
    assert_eq!(ledger.counts(), (1, 0));
    // The id is free again.
    assert!(ledger.admit(CONN, 1, 1000, &Limits::default()).is_ok());
}

#[test]
fn a_reported_start_then_a_reap_give_each_reply_once() {
    let mut ledger = Ledger::default();
    let write = launch(&mut ledger, 100, 1);
    assert!(matches!(
        report::read_outcome(ledger.report_pipe(100).unwrap()),
        Outcome::Pending
    ));
    assert!(ledger
        .start_reported(100, Outcome::Pending)
        .replies
        .is_empty());
    drop(write);
    let settled = ledger.start_reported(100, Outcome::Started);
    assert_eq!(kinds(&settled), ["spawned"]);
    assert!(ledger.report_pipe(100).is_none());
    // A stray second report settles nothing.
    assert!(ledger
        .start_reported(100, Outcome::Started)
        .replies
        .is_empty());
    assert_eq!(ledger.pid_of(CONN, 1), Some(100));
    let settled = ledger.reaped(100, ChildStatus::Exited { code: 3 }).unwrap();
    assert_eq!(kinds(&settled), ["exited"]);
    assert!(ledger.reaped(100, EXITED_0).is_none(), "reaped twice");
    assert!(ledger.reaped(999, EXITED_0).is_none(), "not ours");
}

#[test]
fn a_failed_start_gets_spawn_failed_and_no_exited() {
    let mut ledger = Ledger::default();
    let _write = launch(&mut ledger, 100, 1);
    let failure = Failure::new(FailedStep::Exec, libc::ENOENT);
    let settled = ledger.start_reported(100, Outcome::Failed(failure));
    assert_eq!(kinds(&settled), ["spawn_failed"]);
    let ServerMessage::SpawnFailed { kind, errno, .. } = &settled.replies[0].message else {
        unreachable!()
    };
    assert_eq!((*kind, *errno), (ErrorKind::Exec, Some(libc::ENOENT)));
    assert_eq!(ledger.pid_of(CONN, 1), None, "the id is free at once");
    let settled = ledger
        .reaped(100, ChildStatus::Exited { code: 127 })
        .unwrap();
    assert!(settled.replies.is_empty());
    assert_eq!(ledger.counts(), (1, 1));
}

#[test]
fn limits_count_live_and_starting_children() {
    let mut ledger = Ledger::default();
    let limits = Limits {
        max_children_per_connection: 3,
        max_pending_per_connection: 2,
        ..Limits::default()
    };
    let first = launch(&mut ledger, 100, 1);
    let _second = launch(&mut ledger, 101, 2);
    let (kind, message) = ledger.admit(CONN, 1, 1000, &limits).unwrap_err();
    assert_eq!(kind, ErrorKind::Invalid, "{message}");
    let (kind, message) = ledger.admit(CONN, 3, 1000, &limits).unwrap_err();
    assert!(
        message.contains("max_pending_per_connection"),
        "{kind:?} {message}"
    );
    drop(first);
    ledger.start_reported(100, Outcome::Started);
    assert!(ledger.admit(CONN, 3, 1000, &limits).is_ok());
    let _third = launch(&mut ledger, 102, 3);
    ledger.start_reported(102, Outcome::Started);
    let (_, message) = ledger.admit(CONN, 4, 1000, &limits).unwrap_err();
    assert!(message.contains("max_children_per_connection"), "{message}");
}

#[test]
fn a_uid_s_live_children_are_counted_over_its_connections() {
    let mut ledger = Ledger::default();
    let limits = Limits {
        max_children_per_uid: 2,
        ..Limits::default()
    };
    let _first = launch(&mut ledger, 100, 1);
    assert!(ledger.admit(CONN + 1, 1, 1000, &limits).is_ok());
    let _second = launch(&mut ledger, 101, 2);
    assert_eq!(ledger.live_of(1000), 2);
    // Another connection of the same uid is refused; another uid is not.
    let (kind, message) = ledger.admit(CONN + 1, 1, 1000, &limits).unwrap_err();
    assert_eq!(kind, ErrorKind::Limit);
    assert!(message.contains("max_children_per_uid"), "{message}");
    assert!(ledger.admit(CONN + 1, 1, 1001, &limits).is_ok());
    // A disconnect keeps them counted until they are reaped.
    ledger.disconnected(CONN, Instant::now());
    assert_eq!(ledger.live_of(1000), 2);
    ledger.reaped(100, EXITED_0);
    assert_eq!(ledger.live_of(1000), 1);
    assert!(ledger.admit(CONN + 1, 1, 1000, &limits).is_ok());
}

#[test]
fn a_closed_connections_children_are_disowned_and_reaped_silently() {
    let mut ledger = Ledger::default();
    let write = launch(&mut ledger, 100, 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    assert_eq!(ledger.disconnected(CONN, deadline), 1);
    assert_eq!(ledger.being_killed(), 1);
    assert_eq!(ledger.next_deadline(), Some(deadline));
    // Nothing is owed to a connection that is gone, in either order.
    drop(write);
    let settled = ledger.reaped(100, EXITED_0).unwrap();
    assert!(settled.replies.is_empty());
    assert_eq!((ledger.len(), ledger.being_killed()), (0, 0));
    assert!(ledger.next_deadline().is_none());
}

#[test]
fn a_lingering_group_is_forgotten_once_empty() {
    use std::os::unix::process::CommandExt;
    // Real groups: one that ended (its leader reaped), one that lives.
    let spawn = |secs: &str| {
        std::process::Command::new("sleep")
            .arg(secs)
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let mut ended = spawn("0");
    ended.wait().unwrap();
    let mut living = spawn("30");
    let mut ledger = Ledger::default();
    let (gone, alive) = (ended.id() as libc::pid_t, living.id() as libc::pid_t);
    ledger.lingering.insert(CONN, vec![gone, alive]);
    let now = Instant::now();
    ledger.next_lingering_check = Some(now);
    assert_eq!(ledger.next_deadline(), Some(now));
    ledger.kill_overdue(now);
    assert_eq!(ledger.lingering.get(&CONN), Some(&vec![alive]));
    assert_eq!(ledger.next_deadline(), Some(now + LINGERING_CHECK));
    living.kill().unwrap();
    living.wait().unwrap();
    ledger.kill_overdue(now + LINGERING_CHECK);
    assert!(ledger.lingering.is_empty());
    assert_eq!(ledger.next_deadline(), None);
}
