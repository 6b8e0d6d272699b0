//! Limits, hostile and broken clients, and faults: each answered with an
//! error naming the problem or a clean close, and the server keeps serving
//! with its fds, children and memory back at their baseline.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use forkserver::client::{Child, Error, ErrorKind, Stdio};
use forkserver::protocol::{encode, ClientMessage, ServerMessage, Spawn, Target, WireStr};

use crate::util::{
    assert_no_new_fds, example, fd_table, is_running, new_dir, wait_until, RawConnection, Server,
    FORKSERVER,
};

#[track_caller]
fn expect_limit(result: Result<Child, Error>, limit: &str) -> String {
    match result {
        Err(Error::SpawnFailed {
            kind: ErrorKind::Limit,
            message,
            ..
        }) => {
            assert!(message.contains(limit), "{message}");
            message
        }
        other => panic!("expected the {limit} limit, got {other:?}"),
    }
}

#[test]
fn argv_and_env_sizes_are_limited_by_name() {
    let server = Server::start_with(&[
        "--limit",
        "max_args_bytes=100",
        "--limit",
        "max_env=2",
        "--limit",
        "max_env_bytes=32768",
    ]);
    let client = server.client();
    let limits = client.server().limits;
    assert_eq!((limits.max_args_bytes, limits.max_env), (100, 2));
    let message = expect_limit(
        client
            .command("echo")
            .server_env(true)
            .arg("x".repeat(100))
            .spawn(),
        "max_args_bytes",
    );
    // Each argument counts with its NUL, as execve counts it.
    assert!(message.contains("101 bytes"), "{message}");
    // With the server's environment only the request's entries count (the
    // caller's whole environment is sent otherwise).
    expect_limit(
        client
            .command("true")
            .server_env(true)
            .env("A", "1")
            .env("B", "2")
            .env("C", "3")
            .spawn(),
        "max_env",
    );
    let big_env = client
        .command("true")
        .server_env(true)
        .env("A", "v".repeat(40_000))
        .spawn();
    expect_limit(big_env, "max_env_bytes");
    let output = client
        .command("echo")
        .server_env(true)
        .arg("x".repeat(99))
        .output()
        .unwrap();
    assert_eq!(output.stdout.len(), 100);
}

#[test]
fn an_unknown_limit_name_is_refused_at_the_command_line() {
    let output = std::process::Command::new(FORKSERVER)
        .args(["serve", "--limit", "max_bogus=1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown limit 'max_bogus'") && stderr.contains("max_args_bytes"),
        "{stderr}"
    );
}

#[test]
fn connections_per_uid_are_limited() {
    let server = Server::start_with(&["--limit", "max_connections_per_uid=2"]);
    let _first = server.client();
    let _second = server.client();
    match forkserver::client::Client::connect(&server.socket) {
        Err(Error::Refused {
            kind: ErrorKind::Limit,
            message,
        }) => {
            assert!(message.contains("max_connections_per_uid"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(_first);
    wait_until("a slot frees up", || {
        forkserver::client::Client::connect(&server.socket).is_ok()
    });
}

#[test]
fn pending_spawns_per_connection_are_limited() {
    let server = Server::launch(
        &example("test_zygote"),
        &["--limit", "max_pending_per_connection=1"],
        &[],
    );
    let conn = RawConnection::greeted(&server);
    // Stop the server so both requests are read in one wake-up, before the
    // first child's start is reported (through its report pipe, in a later
    // turn of the loop).
    let worker = |id| {
        let mut spawn = Spawn::exec(id, "unused", vec![]);
        spawn.target = Target::Worker {
            name: "answer".into(),
            args: Vec::new(),
            payload: None,
        };
        ClientMessage::Spawn(spawn)
    };
    server.signal(libc::SIGSTOP);
    conn.send(&worker(1), &[]);
    conn.send(&worker(2), &[]);
    server.signal(libc::SIGCONT);
    let mut refused = None;
    for _ in 0..3 {
        if let Some((
            ServerMessage::SpawnFailed {
                id, kind, message, ..
            },
            _,
        )) = conn.recv()
        {
            refused = Some((id, kind, message));
        }
    }
    let (id, kind, message) = refused.expect("the second spawn was refused");
    assert_eq!((id, kind), (2, ErrorKind::Limit));
    assert!(message.contains("max_pending_per_connection"), "{message}");
}

#[test]
fn a_truncated_message_is_a_protocol_error() {
    let server = Server::start();
    let conn = RawConnection::greeted(&server);
    let whole = encode(&ClientMessage::Spawn(Spawn::exec(1, "true", vec![]))).unwrap();
    conn.send_bytes(&whole[..whole.len() / 2], &[]);
    match conn.recv() {
        Some((
            ServerMessage::Error {
                kind: ErrorKind::Protocol,
                fatal: false,
                ..
            },
            _,
        )) => {}
        other => panic!("{other:?}"),
    }
    conn.send_bytes(&whole, &[]);
    assert!(matches!(
        conn.recv(),
        Some((ServerMessage::Spawned { id: 1, .. }, _))
    ));
}

#[test]
fn a_client_that_never_reads_is_dropped_not_buffered_forever() {
    let server = Server::start_with(&["--limit", "max_queued_replies=8"]);
    let baseline = fd_table(server.pid());
    let conn = RawConnection::greeted(&server);
    // Each spawn earns two replies; the socket buffer holds a few hundred.
    for id in 0..2000 {
        let request = encode(&ClientMessage::Spawn(Spawn::exec(id, "true", vec![]))).unwrap();
        if forkserver::protocol::send_datagram(conn.socket.as_fd(), &request, &[], 0).is_err() {
            break; // the server has dropped us
        }
        if server.log().contains("the limit max_queued_replies") {
            break;
        }
    }
    wait_until("the server drops the client", || {
        server.log().contains("has not read 8 replies")
    });
    drop(conn);
    // Everyone else is still served, and nothing leaked.
    assert!(server.client().command("true").status().unwrap().success());
    assert_no_new_fds(server.pid(), &baseline);
    wait_until("all children reaped", || {
        server.client().status().unwrap().children == 0
    });
}

#[test]
fn disconnecting_mid_spawn_leaks_nothing() {
    let server = Server::start();
    let client = server.client();
    let baseline = fd_table(server.pid());
    let rss_before = client.status().unwrap().rss_bytes;
    for id in 0..50 {
        let conn = RawConnection::greeted(&server);
        conn.send(
            &ClientMessage::Spawn(Spawn::exec(id, "sleep", vec!["1000".into()])),
            &[],
        );
        let garbage = [0xc1u8; 8];
        conn.send_bytes(&garbage, &[]);
        drop(conn);
    }
    wait_until("every orphaned child is killed and reaped", || {
        client.status().unwrap().children == 0
    });
    assert_no_new_fds(server.pid(), &baseline);
    assert!(crate::util::zombie_children_of(server.pid()).is_empty());
    let rss_after = client.status().unwrap().rss_bytes;
    assert!(
        rss_after < rss_before + (4 << 20),
        "RSS grew from {rss_before} to {rss_after} bytes"
    );
}

#[test]
fn die_with_server_kills_the_child_when_the_server_dies() {
    let mut server = Server::start();
    let client = server.client();
    let bound = client
        .command("sleep")
        .arg("1000")
        .die_with_server(true)
        .spawn()
        .unwrap();
    let free = client
        .command("sleep")
        .arg("1000")
        .detach(true)
        .spawn()
        .unwrap();
    let (bound_pid, free_pid) = (bound.id(), free.id());
    server.signal(libc::SIGKILL);
    server.wait_exit();
    wait_until("the bound child dies with the server", || {
        !is_running(bound_pid)
    });
    assert!(
        is_running(free_pid),
        "a child without die_with_server outlives the server"
    );
    // SAFETY: kill by pid of a process we know is running (checked above).
    unsafe { libc::kill(free_pid as i32, libc::SIGKILL) };
}

/// A worker is forked by the zygote (or handed to a pool child) yet its
/// parent is the server, so `die_with_server` binds it to the server: it
/// runs (it used to end at once, its plan naming the zygote or itself as
/// the parent to check), and dies with the server, not with the zygote.
#[test]
fn die_with_server_binds_workers_pooled_or_not_to_the_server() {
    let mut server = Server::launch(
        &crate::util::example("test_zygote"),
        &["--pool", "idle=1"],
        &[],
    );
    crate::pool::wait_full(&server, 1);
    let client = server.client();
    // The first is handed to the pool child (idle=1); the second finds the
    // pool empty and is forked by the zygote.
    let bound: Vec<_> = (0..2)
        .map(|_| {
            client
                .worker("idle")
                .stdin(forkserver::client::Stdio::piped())
                .die_with_server(true)
                .spawn()
                .unwrap()
        })
        .collect();
    let pids: Vec<u32> = bound.iter().map(|c| c.id()).collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        pids.iter().all(|&pid| is_running(pid)),
        "the bound workers run"
    );
    // The zygote's death is not the server's.
    if let Some(zygote) = crate::util::zygote_of(&server) {
        // SAFETY: kill by pid of the server's child we just found.
        unsafe { libc::kill(zygote as i32, libc::SIGKILL) };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            pids.iter().all(|&pid| is_running(pid)),
            "they outlive the zygote"
        );
    }
    server.signal(libc::SIGKILL);
    server.wait_exit();
    wait_until("the bound workers die with the server", || {
        pids.iter().all(|&pid| !is_running(pid))
    });
    drop(bound);
}

#[test]
fn running_out_of_fds_is_reported_and_the_server_recovers() {
    // max_fds_per_uid (a quarter of the fds by default) would refuse the
    // spawns before the fds run out: let this uid have them all.
    let server = Server::launch_in(
        new_dir(),
        &["prlimit", "--nofile=48:48", "--"],
        Path::new(FORKSERVER),
        &["--limit", "max_fds_per_uid=1000"],
        &[],
    );
    let client = server.client();
    let mut children = Vec::new();
    let failure = loop {
        assert!(children.len() < 100, "48 fds never ran out");
        let spawned = client
            .command("sleep")
            .arg("1000")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(child) => children.push(child),
            Err(e) => break e,
        }
    };
    // Whichever runs out first, the server (pipes, pidfd) or the child
    // (copying fds into place), the client is told EMFILE.
    match &failure {
        Error::SpawnFailed {
            kind: ErrorKind::Resource | ErrorKind::Setup,
            errno: Some(libc::EMFILE),
            message,
            ..
        } => assert!(message.contains("Too many open files"), "{message}"),
        other => panic!("expected EMFILE, got {other}"),
    }
    for child in &mut children {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    drop(children);
    let output = client.command("echo").arg("recovered").output().unwrap();
    assert_eq!(output.stdout, b"recovered\n");
    // New connections are accepted again too.
    assert!(server.client().command("true").status().unwrap().success());
}

#[test]
fn fork_failing_with_eagain_is_reported_and_the_server_recovers() {
    if !crate::util::root_or_skip(
        "robustness::fork_failing_with_eagain_is_reported_and_the_server_recovers",
    ) {
        return;
    }
    // RLIMIT_NPROC does not bind root, so this server runs as nobody.
    let dir = new_dir();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = dir.path().join("forkserver");
    std::fs::copy(FORKSERVER, &program).unwrap();
    let wrapper = [
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--init-groups",
        "prlimit",
        "--nproc=4",
        "--",
    ];
    let server = Server::launch_in(dir, &wrapper, &program, &[], &[]);
    let client = server.client();
    let mut children = Vec::new();
    let failure = loop {
        assert!(children.len() < 20, "RLIMIT_NPROC never stopped a fork");
        match client.command("sleep").arg("1000").spawn() {
            Ok(child) => children.push(child),
            Err(e) => break e,
        }
    };
    match &failure {
        Error::SpawnFailed {
            kind: ErrorKind::Resource,
            errno: Some(libc::EAGAIN),
            message,
            ..
        } => {
            assert!(message.contains("fork failed"), "{message}")
        }
        other => panic!("expected EAGAIN from fork, got {other}"),
    }
    for child in &mut children {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert!(client.command("true").status().unwrap().success());
}

#[test]
fn non_utf8_arguments_and_paths_pass_through_exec() {
    let server = Server::start();
    let conn = RawConnection::greeted(&server);
    let arg = WireStr::from(vec![b'a', 0xff, b'b']);
    let mut request = Spawn::exec(1, "printf", vec!["%s".into(), arg]);
    request.stdout = forkserver::protocol::StdioSpec::Pipe;
    conn.send(&ClientMessage::Spawn(request), &[]);
    let fds = match conn.recv() {
        Some((
            ServerMessage::Spawned {
                stdout: Some(index),
                ..
            },
            fds,
        )) => {
            let mut out = Vec::new();
            let mut file = std::fs::File::from(fds.into_iter().nth(index as usize).unwrap());
            std::io::Read::read_to_end(&mut file, &mut out).unwrap();
            out
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(fds, [b'a', 0xff, b'b']);
}
