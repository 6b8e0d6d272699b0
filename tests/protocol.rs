//! The wire protocol spoken raw: handshake errors, malformed and hostile
//! requests, the server's Signal request. Every error names the problem and
//! the server keeps serving.

use std::os::fd::{AsFd, OwnedFd};

use forkserver::protocol::{
    ChildStatus, ClientMessage, ErrorKind, FdMapping, ServerMessage, Spawn, StdioSpec,
};

use crate::util::{assert_no_new_fds, fd_table, wait_until, RawConnection, Server};

#[track_caller]
fn expect_error(
    reply: Option<(ServerMessage, Vec<OwnedFd>)>,
    kind: ErrorKind,
    fatal: bool,
) -> String {
    match reply {
        Some((
            ServerMessage::Error {
                kind: got,
                fatal: got_fatal,
                message,
                ..
            },
            _,
        )) => {
            assert_eq!((got, got_fatal), (kind, fatal), "{message}");
            message
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

/// The message of a `spawn_failed` for request `id` of this `kind`.
#[track_caller]
fn expect_spawn_failed(
    reply: Option<(ServerMessage, Vec<OwnedFd>)>,
    id: u64,
    kind: ErrorKind,
) -> String {
    match reply {
        Some((
            ServerMessage::SpawnFailed {
                id: got_id,
                kind: got_kind,
                message,
                ..
            },
            _,
        )) => {
            assert_eq!((got_id, got_kind), (id, kind), "{message}");
            message
        }
        other => panic!("expected spawn_failed for {id}, got {other:?}"),
    }
}

#[test]
fn a_version_mismatch_is_refused_by_name_then_closed() {
    let server = Server::start();
    let conn = RawConnection::connect(&server);
    conn.send(
        &ClientMessage::Hello {
            protocol: 99,
            client: "future".into(),
        },
        &[],
    );
    let message = expect_error(conn.recv(), ErrorKind::Version, true);
    assert!(
        message.contains("version 99") && message.contains("version 1"),
        "{message}"
    );
    assert!(conn.recv().is_none(), "connection not closed");
    assert!(server.client().command("true").status().unwrap().success());
}

#[test]
fn requests_before_hello_are_refused() {
    let server = Server::start();
    let conn = RawConnection::connect(&server);
    conn.send(&ClientMessage::Spawn(Spawn::exec(1, "true", vec![])), &[]);
    let message = expect_error(conn.recv(), ErrorKind::Protocol, true);
    assert!(message.contains("must be hello"), "{message}");
    assert!(conn.recv().is_none());
}

#[test]
fn garbage_gets_an_error_and_the_server_keeps_serving() {
    let server = Server::start();
    let conn = RawConnection::greeted(&server);
    conn.send_bytes(b"\xc1 definitely not msgpack", &[]);
    expect_error(conn.recv(), ErrorKind::Protocol, false);
    // Valid msgpack of the wrong shape.
    conn.send_bytes(&forkserver::protocol::encode(&[1, 2, 3]).unwrap(), &[]);
    expect_error(conn.recv(), ErrorKind::Protocol, false);
    // Nesting deep enough to overflow a recursive decoder's stack.
    for byte in [0x91u8, 0x81] {
        let mut nested = vec![byte; 60_000];
        nested.push(0xc0);
        conn.send_bytes(&nested, &[]);
        expect_error(conn.recv(), ErrorKind::Protocol, false);
    }
    // The same connection still spawns.
    conn.send(&ClientMessage::Spawn(Spawn::exec(5, "true", vec![])), &[]);
    assert!(matches!(
        conn.recv(),
        Some((ServerMessage::Spawned { id: 5, .. }, _))
    ));
    assert!(matches!(
        conn.recv(),
        Some((ServerMessage::Exited { id: 5, .. }, _))
    ));
}

#[test]
fn an_oversize_message_is_refused_naming_the_limit() {
    let server = Server::start();
    let conn = RawConnection::greeted(&server);
    conn.send(
        &ClientMessage::Spawn(Spawn::exec(1, "true", vec!["x".repeat(100_000).into()])),
        &[],
    );
    let message = expect_error(conn.recv(), ErrorKind::Limit, false);
    assert!(message.contains("max_message_bytes"), "{message}");

    // One fd more than the limit: the whole message is discarded, and every
    // fd that did arrive is closed.
    let baseline = fd_table(server.pid());
    let (_read_end, write_end) = std::io::pipe().unwrap();
    let too_many = vec![write_end.as_fd(); 65];
    conn.send(
        &ClientMessage::Spawn(Spawn::exec(2, "true", vec![])),
        &too_many,
    );
    let message = expect_error(conn.recv(), ErrorKind::Limit, false);
    assert!(
        message.contains("more than 64 fds (the limit max_fds_per_message)"),
        "{message}"
    );
    assert_no_new_fds(server.pid(), &baseline);
}

#[test]
fn bad_fd_requests_name_the_field_and_leak_nothing() {
    let server = Server::start();
    let conn = RawConnection::greeted(&server);
    conn.send(&ClientMessage::Spawn(Spawn::exec(1, "true", vec![])), &[]);
    conn.recv();
    conn.recv();
    let baseline = fd_table(server.pid());
    let (read_end, write_end) = std::io::pipe().unwrap();

    let mut out_of_range = Spawn::exec(2, "true", vec![]);
    out_of_range.stdout = StdioSpec::Fd { index: 3 };
    conn.send(&ClientMessage::Spawn(out_of_range), &[write_end.as_fd()]);
    let message = expect_spawn_failed(conn.recv(), 2, ErrorKind::Invalid);
    assert!(
        message.contains("stdout: fd index 3 is out of range"),
        "{message}"
    );

    let mut colliding = Spawn::exec(3, "true", vec![]);
    colliding.fds = vec![
        FdMapping {
            index: 0,
            target: 5,
        },
        FdMapping {
            index: 1,
            target: 5,
        },
    ];
    conn.send(
        &ClientMessage::Spawn(colliding),
        &[write_end.as_fd(), read_end.as_fd()],
    );
    let message = expect_spawn_failed(conn.recv(), 3, ErrorKind::Invalid);
    assert!(
        message.contains("fds[1].target 5 is also fds[0].target"),
        "{message}"
    );

    let mut low_target = Spawn::exec(4, "true", vec![]);
    low_target.fds = vec![FdMapping {
        index: 0,
        target: 1,
    }];
    conn.send(&ClientMessage::Spawn(low_target), &[write_end.as_fd()]);
    let message = expect_spawn_failed(conn.recv(), 4, ErrorKind::Invalid);
    assert!(message.contains("fds[0].target is 1"), "{message}");

    // A valid request with an fd it never references: the fd is closed too.
    let mut unreferenced = Spawn::exec(5, "true", vec![]);
    unreferenced.stdout = StdioSpec::Fd { index: 0 };
    conn.send(
        &ClientMessage::Spawn(unreferenced),
        &[write_end.as_fd(), read_end.as_fd()],
    );
    assert!(matches!(
        conn.recv(),
        Some((ServerMessage::Spawned { id: 5, .. }, _))
    ));
    assert!(matches!(
        conn.recv(),
        Some((ServerMessage::Exited { id: 5, .. }, _))
    ));

    // Every fd that came with the requests was closed.
    assert_no_new_fds(server.pid(), &baseline);
}

#[test]
fn a_reused_live_id_is_refused() {
    let server = Server::start();
    let conn = RawConnection::greeted(&server);
    conn.send(
        &ClientMessage::Spawn(Spawn::exec(9, "sleep", vec!["1000".into()])),
        &[],
    );
    let pid = match conn.recv() {
        Some((ServerMessage::Spawned { id: 9, pid, .. }, _)) => pid,
        other => panic!("{other:?}"),
    };
    conn.send(&ClientMessage::Spawn(Spawn::exec(9, "true", vec![])), &[]);
    let message = expect_spawn_failed(conn.recv(), 9, ErrorKind::Invalid);
    assert!(message.contains("id 9 is already used"), "{message}");
    drop(conn);
    wait_until("the sleeper is killed on disconnect", || {
        !crate::util::is_running(pid)
    });
}

#[test]
fn the_signal_request_reaches_the_child() {
    let server = Server::start();
    let conn = RawConnection::greeted(&server);
    conn.send(
        &ClientMessage::Spawn(Spawn::exec(1, "sleep", vec!["1000".into()])),
        &[],
    );
    let fds = match conn.recv() {
        Some((
            ServerMessage::Spawned {
                id: 1,
                pidfd: 0,
                stdin: None,
                stdout: None,
                stderr: None,
                ..
            },
            fds,
        )) => fds,
        other => panic!("{other:?}"),
    };
    assert_eq!(fds.len(), 1, "just the pidfd");
    assert!(crate::util::own_fd_target(fds[0].as_fd())
        .to_string_lossy()
        .contains("pidfd"));
    conn.send(&ClientMessage::Signal { id: 1, signal: 99 }, &[]);
    expect_error(conn.recv(), ErrorKind::Invalid, false);
    conn.send(
        &ClientMessage::Signal {
            id: 2,
            signal: libc::SIGTERM,
        },
        &[],
    );
    expect_error(conn.recv(), ErrorKind::NoSuchChild, false);
    conn.send(
        &ClientMessage::Signal {
            id: 1,
            signal: libc::SIGTERM,
        },
        &[],
    );
    assert!(matches!(
        conn.recv(),
        Some((
            ServerMessage::Signaled {
                id: 1,
                signal: libc::SIGTERM
            },
            _
        ))
    ));
    match conn.recv() {
        Some((ServerMessage::Exited { id: 1, status, .. }, _)) => assert_eq!(
            status,
            ChildStatus::Signaled {
                signal: libc::SIGTERM,
                core_dumped: false
            }
        ),
        other => panic!("{other:?}"),
    }
}
