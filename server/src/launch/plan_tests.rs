//! The pre-fork plan, checked without forking.

use std::os::fd::AsRawFd;

use forkserver_protocol::{ErrorKind, FdMapping, Limits, Spawn, StdioSpec, Target};

use super::fields::exec_candidates;
use super::plan::{Action, PlanFds};
use super::Launcher;
use crate::modules::Modules;
use crate::peer::{OwnControls, Peer};
use crate::threads::ForkGuard;

/// This test process as a peer.
fn me() -> Peer {
    Peer {
        pid: std::process::id() as i32,
        // SAFETY: getuid and getgid cannot fail.
        uid: unsafe { libc::getuid() },
        // SAFETY: as above.
        gid: unsafe { libc::getgid() },
        groups: Vec::new(),
        // SAFETY: as above.
        own: OwnControls::read(std::process::id() as i32, unsafe { libc::geteuid() }),
    }
}

fn launcher(limits: Limits) -> Launcher {
    Launcher::new(Modules::default(), limits, ForkGuard::Off).unwrap()
}

#[test]
fn path_search_follows_execvp() {
    let got = exec_candidates(b"ls", Some(b"/a::/b")).unwrap();
    let got: Vec<&[u8]> = got.iter().map(|c| c.as_bytes()).collect();
    assert_eq!(got, [&b"/a/ls"[..], b"./ls", b"/b/ls"]);
    let direct = exec_candidates(b"./x", None).unwrap();
    assert_eq!(direct[0].as_bytes(), b"./x");
}

#[test]
fn bad_requests_are_refused_before_any_fork() {
    let launcher = launcher(Limits::default());
    let mut request = Spawn::exec(1, "true", vec!["a\0b".into()]);
    let err = launcher
        .launch(&request, &me(), Vec::new(), None)
        .err()
        .unwrap();
    assert_eq!(err.kind, ErrorKind::Invalid);
    assert!(err.message.contains("target.args[0]"), "{}", err.message);

    request = Spawn::exec(1, "true", Vec::new());
    request.stdin = StdioSpec::Fd { index: 2 };
    let err = launcher
        .launch(&request, &me(), Vec::new(), None)
        .err()
        .unwrap();
    assert!(err.message.contains("stdin: fd index 2"), "{}", err.message);

    request = Spawn::exec(1, "true", vec!["x".into(); 5]);
    let small = self::launcher(Limits {
        max_args: 4,
        ..Limits::default()
    });
    let err = small
        .launch(&request, &me(), Vec::new(), None)
        .err()
        .unwrap();
    assert_eq!(err.kind, ErrorKind::Limit);
    assert!(err.message.contains("max_args is 4"), "{}", err.message);

    let mut request = Spawn::exec(1, "", Vec::new());
    request.target = Target::Worker {
        name: "nope".into(),
        args: Vec::new(),
        payload: None,
    };
    let err = launcher
        .launch(&request, &me(), Vec::new(), None)
        .err()
        .unwrap();
    assert_eq!(err.kind, ErrorKind::UnknownWorker);
    assert!(
        err.message.contains("no worker named 'nope'"),
        "{}",
        err.message
    );
}

#[test]
fn a_plan_has_argv_env_edits_sorted_fd_moves_and_pipes() {
    let launcher = launcher(Limits::default());
    let passed = std::fs::File::open("/dev/null").unwrap();
    let fds = vec![passed.into()];
    let mut request = Spawn::exec(7, "prog", vec!["one".into()]);
    if let Target::Exec { arg0, .. } = &mut request.target {
        *arg0 = Some("zero".into());
    }
    request.env_clear = true;
    request.env = [
        ("PATH".into(), Some("/nowhere:/bin".into())),
        ("A".into(), None),
        ("B".into(), Some("2".into())),
    ]
    .into();
    request.stdout = StdioSpec::Pipe;
    request.fds = vec![FdMapping {
        index: 0,
        target: 9,
    }];
    let mut made = PlanFds::default();
    let plan = launcher
        .plan(&request, &me(), &fds, None, &mut made)
        .unwrap();

    let strings = |array: &super::plan::CStringArray| -> Vec<String> {
        (0..array.len())
            .map(|i| {
                // SAFETY: the array holds `len` valid C strings.
                let ptr = unsafe { *array.as_ptr().add(i) };
                // SAFETY: each pointer is a NUL-terminated string it owns.
                unsafe { std::ffi::CStr::from_ptr(ptr) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    };
    assert_eq!(strings(&plan.argv), ["zero", "one"]);
    assert_eq!(strings(&plan.envp), ["B=2", "PATH=/nowhere:/bin"]);
    let Action::Exec { candidates } = &plan.action else {
        panic!("an exec plan");
    };
    let candidates: Vec<_> = candidates.iter().map(|c| c.to_str().unwrap()).collect();
    assert_eq!(candidates, ["/nowhere/prog", "/bin/prog"]);

    // stdin and stderr from /dev/null, stdout a pipe whose read end is the
    // client's, fd 9 the passed file; sorted by target.
    let targets: Vec<i32> = plan.fd_moves.iter().map(|&(_, t)| t).collect();
    assert_eq!(targets, [0, 1, 2, 9]);
    assert_eq!(made.child_pipes.len(), 1);
    assert_eq!(plan.fd_moves[1].0, made.child_pipes[0].as_raw_fd());
    assert_eq!(plan.fd_moves[3].0, fds[0].as_raw_fd());
    assert!(made.client_ends.stdout.is_some() && made.client_ends.stdin.is_none());
    assert_eq!(plan.die_with_server, None);
}

#[test]
fn fd_targets_must_be_distinct_and_in_range() {
    let launcher = launcher(Limits::default());
    let fds = vec![std::fs::File::open("/dev/null").unwrap().into()];
    let mut request = Spawn::exec(1, "true", Vec::new());
    request.fds = vec![
        FdMapping {
            index: 0,
            target: 5,
        },
        FdMapping {
            index: 0,
            target: 5,
        },
    ];
    let err = launcher
        .plan(&request, &me(), &fds, None, &mut PlanFds::default())
        .err()
        .unwrap();
    assert!(
        err.message
            .contains("fds[1].target 5 is also fds[0].target"),
        "{}",
        err.message
    );
    request.fds = vec![FdMapping {
        index: 0,
        target: 2,
    }];
    let err = launcher
        .plan(&request, &me(), &fds, None, &mut PlanFds::default())
        .err()
        .unwrap();
    assert!(
        err.message.contains("must be between 3 and"),
        "{}",
        err.message
    );
}

#[test]
fn controls_are_checked_by_name_range_and_right() {
    let launcher = launcher(Limits::default());
    let spawn_with = |edit: &dyn Fn(&mut Spawn)| {
        let mut request = Spawn::exec(1, "true", Vec::new());
        edit(&mut request);
        launcher
            .plan(&request, &me(), &[], None, &mut PlanFds::default())
            .map(|plan| plan.controls.rlimits.len())
    };
    let limit =
        |resource: &str, soft: Option<u64>, hard: Option<u64>| forkserver_protocol::Rlimit {
            resource: resource.into(),
            soft,
            hard,
        };
    assert_eq!(
        spawn_with(&|r| r.rlimits = vec![limit("NOFILE", Some(64), Some(128))]).unwrap(),
        1
    );
    let err = spawn_with(&|r| r.rlimits = vec![limit("FILES", Some(1), Some(1))]).unwrap_err();
    assert!(
        err.message.contains("'FILES' is not one of"),
        "{}",
        err.message
    );
    let err = spawn_with(&|r| r.rlimits = vec![limit("NOFILE", Some(9), Some(8))]).unwrap_err();
    assert!(
        err.message.contains("above its hard limit"),
        "{}",
        err.message
    );
    let err = spawn_with(&|r| r.nice = Some(40)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid);
    let err = spawn_with(&|r| r.cpus = Some(vec![])).unwrap_err();
    assert!(err.message.contains("cpus is empty"), "{}", err.message);
    let err = spawn_with(&|r| r.cpus = Some(vec![100_000])).unwrap_err();
    assert!(err.message.contains("beyond"), "{}", err.message);
    let err = spawn_with(&|r| r.oom_score_adj = Some(2000)).unwrap_err();
    assert!(
        err.message.contains("outside -1000..=1000"),
        "{}",
        err.message
    );
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        // Raising a hard limit past its own is refused for a non-root peer.
        let err = spawn_with(&|r| r.rlimits = vec![limit("NOFILE", None, None)]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Denied, "{}", err.message);
    }
}
