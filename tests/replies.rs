//! Replies of any size, and the faults a client written from the protocol
//! document found: no reply exceeds `max_message_bytes`, long lists come in
//! pages, damaged requests are answered by id, and the CLI says things once
//! and stops on a signal even before its child exists.

use std::io::Read;
use std::os::unix::fs::symlink;
use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use forkserver::client::Stdio;
use forkserver::protocol::{
    encode, rmpv, ChildInfo, ClientMessage, ErrorKind, ServerMessage, Spawn, MAX_NESTING,
};

use crate::util::{
    cli_as_nobody, made_children_of, open_to_nobody, wait_until, zombie_children_of, RawConnection,
    Server, FORKSERVER,
};

/// A symlink to /bin/sleep whose path is about `len` bytes long.
pub(crate) fn long_path_to_sleep(base: &std::path::Path, len: usize) -> std::path::PathBuf {
    let mut dir = base.to_path_buf();
    // Components of at most 200 bytes (NAME_MAX is 255), then "/sleep".
    while dir.as_os_str().len() + 7 < len {
        let room = len - dir.as_os_str().len() - 7;
        dir.push("d".repeat(room.min(200)));
    }
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("sleep");
    symlink("/bin/sleep", &link).unwrap();
    link
}

#[test]
fn five_thousand_children_with_4_kb_paths_are_listed_in_pages() {
    // 5,000 pidfds in the server and as many here.
    crate::util::raise_fd_limit();
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct given.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if !crate::util::available_or_skip(
        "replies::five_thousand_children_with_4_kb_paths_are_listed_in_pages",
        limit.rlim_cur >= 12_000,
        "needs 12,000 fds (its hard RLIMIT_NOFILE is lower)",
    ) {
        return;
    }
    // 5,000 exits can come at once: room to queue them all for a client
    // that reads (the default 4096 matches the default 1024 children).
    let server = Server::start_with(&[
        "--limit",
        "max_children_per_connection=5000",
        "--limit",
        "max_children_per_uid=5000",
        "--limit",
        "max_fds_per_uid=6000",
        "--limit",
        "max_queued_replies=12000",
        "--limit",
        "max_message_bytes=16384",
    ]);
    let sleep = long_path_to_sleep(server.dir.path(), 4000);
    assert!(sleep.as_os_str().len() >= 3990, "{}", sleep.display());
    let client = server.client();
    let mut children = Vec::new();
    for _ in 0..5000 {
        let child = client
            .command(&sleep)
            .arg("60")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .server_env(true)
            .server_cwd(true)
            .spawn()
            .unwrap();
        children.push(child);
    }
    // The CLI reads every page.
    let out = StdCommand::new(FORKSERVER)
        .args(["ps", "--json", "--socket"])
        .arg(&server.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<ChildInfo> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 5000);
    assert!(listed.iter().all(|c| c.target == sleep.to_str().unwrap()));
    // A raw client sees pages within the limit, the last one saying so.
    let raw = RawConnection::greeted(&server);
    raw.send(&ClientMessage::List { id: 9 }, &[]);
    let mut pages = 0;
    loop {
        let (message, _) = raw.recv().unwrap();
        assert!(encode(&message).unwrap().len() <= 16384);
        let ServerMessage::Children { id: 9, more, .. } = message else {
            panic!("expected a page of children, got {message:?}");
        };
        pages += 1;
        if !more {
            break;
        }
    }
    assert!(pages > 100, "{pages} pages");
    // Kill's answer is paged too (5000 pids are over 16 KiB).
    let killed = client.kill(None, libc::SIGKILL).unwrap();
    assert_eq!(killed.len(), 5000);
    for mut child in children {
        assert!(child.wait().is_ok());
    }
    assert!(client.list().unwrap().is_empty());
}

#[test]
fn a_long_error_text_is_cut_with_a_marker_not_dropped() {
    let server = Server::start_with(&["--limit", "max_message_bytes=16384"]);
    let client = server.client();
    // An env key with '=' is refused naming the key: 100 KB of it.
    let key = format!("{}=", "k".repeat(100_000));
    let err = client
        .command("true")
        .server_env(true)
        .env(&key, "v")
        .status()
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("bytes cut]"), "{}", &text[..200]);
    assert!(text.len() < 16384);
    // The connection survived.
    assert!(client.command("true").status().unwrap().success());
}

#[test]
fn status_shows_a_non_root_peer_only_its_own_counts() {
    if !crate::util::root_or_skip("replies::status_shows_a_non_root_peer_only_its_own_counts") {
        return;
    }
    let server = Server::start_with(&["--group", "nogroup", "--allow-uid", "nobody"]);
    let cli = open_to_nobody(&server);
    let client = server.client();
    let _held: Vec<_> = (0..3)
        .map(|_| client.command("sleep").arg("30").spawn().unwrap())
        .collect();
    let out = cli_as_nobody(&server, &cli, "status", &["--json"]);
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["children"], 0, "{report}");
    assert_eq!(report["spawns"], 0, "{report}");
    assert_eq!(report["connections"], 1, "{report}");
    // Root sees everything.
    let all = client.status().unwrap();
    assert_eq!((all.children, all.spawns), (3, 3));
}

#[test]
fn damaged_requests_are_answered_by_their_id() {
    let server = Server::start();
    let raw = RawConnection::connect(&server);
    // hello may say nil for its client name.
    raw.send_bytes(
        &encode(&rmpv::Value::Map(vec![
            ("type".into(), "hello".into()),
            ("protocol".into(), 1.into()),
            ("client".into(), rmpv::Value::Nil),
        ]))
        .unwrap(),
        &[],
    );
    assert!(matches!(
        raw.recv(),
        Some((ServerMessage::Welcome { .. }, _))
    ));

    let error_id = |bytes: Vec<u8>| match raw.recv() {
        Some((
            ServerMessage::Error {
                id, kind, message, ..
            },
            _,
        )) => (id, kind, message),
        other => panic!("expected an error for {bytes:02x?}, got {other:?}"),
    };
    // An unknown type with an id.
    let unknown = encode(&rmpv::Value::Map(vec![
        ("type".into(), "frobnicate".into()),
        ("id".into(), 41.into()),
    ]))
    .unwrap();
    raw.send_bytes(&unknown, &[]);
    assert_eq!(error_id(unknown).0, Some(41));
    // Trailing bytes after a valid message.
    let mut trailing = encode(&ClientMessage::Status { id: 42 }).unwrap();
    trailing.push(0xc0);
    raw.send_bytes(&trailing, &[]);
    let (id, kind, message) = error_id(trailing);
    assert_eq!((id, kind), (Some(42), ErrorKind::Protocol));
    assert!(message.contains("1 bytes follow"), "{message}");
    // An oversize request still names its id.
    let huge = encode(&ClientMessage::Spawn(Spawn::exec(
        43,
        "true",
        vec!["x".repeat(100_000).into()],
    )))
    .unwrap();
    raw.send_bytes(&huge, &[]);
    let (id, kind, _) = error_id(huge);
    assert_eq!((id, kind), (Some(43), ErrorKind::Limit));
    // Nesting: MAX_NESTING levels pass the decoder (the message's own map
    // is the first), one more does not.
    let nested = |levels: usize| {
        let mut payload = rmpv::Value::Array(Vec::new());
        for _ in 0..levels - 3 {
            payload = rmpv::Value::Array(vec![payload]);
        }
        encode(&rmpv::Value::Map(vec![
            ("type".into(), "spawn".into()),
            ("id".into(), 44.into()),
            (
                "target".into(),
                rmpv::Value::Map(vec![
                    ("kind".into(), "worker".into()),
                    ("name".into(), "none".into()),
                    ("payload".into(), payload),
                ]),
            ),
        ]))
        .unwrap()
    };
    raw.send_bytes(&nested(MAX_NESTING), &[]);
    match raw.recv() {
        Some((ServerMessage::SpawnFailed { kind, .. }, _)) => {
            assert_eq!(kind, ErrorKind::UnknownWorker)
        }
        other => panic!("{MAX_NESTING} levels should decode, got {other:?}"),
    }
    raw.send_bytes(&nested(MAX_NESTING + 1), &[]);
    let (id, kind, message) = error_id(nested(MAX_NESTING + 1));
    assert_eq!((id, kind), (Some(44), ErrorKind::Protocol), "{message}");
    // A NUL in the program is named as the program.
    raw.send(
        &ClientMessage::Spawn(Spawn::exec(45, "tr\0ue", vec![])),
        &[],
    );
    match raw.recv() {
        Some((ServerMessage::SpawnFailed { message, .. }, _)) => {
            assert!(message.contains("target.program"), "{message}")
        }
        other => panic!("expected spawn_failed, got {other:?}"),
    }
}

#[test]
fn the_ready_line_comes_in_one_write() {
    let dir = crate::util::new_dir();
    let mut process = StdCommand::new(FORKSERVER)
        .args(["serve", "-q", "--ready-fd", "1", "--socket"])
        .arg(dir.path().join("fs.sock"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // One read, already waiting when the server writes: before the fix it
    // could wake on the first of two writes and return half a line.
    let mut buf = [0u8; 4096];
    let n = process.stdout.as_mut().unwrap().read(&mut buf).unwrap();
    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
    let _ = process.kill();
    let _ = process.wait();
    assert!(
        line.starts_with("ready listening on ") && line.ends_with('\n'),
        "{line:?}"
    );
}

#[test]
fn a_big_cli_request_goes_through_and_a_signal_before_the_child_stops_the_cli() {
    let server = Server::start();
    let big = format!("X={}", "x".repeat(70_000));
    let out = server
        .cli_spawn(&["--env", &big, "--", "sh", "-c", "echo ${#X}"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"70000\n");

    // A server that does not answer (stopped): the CLI waits for its
    // child, and a SIGTERM then ends it as a shell's job would end, 143.
    server.signal(libc::SIGSTOP);
    let mut cli = server.cli_spawn(&["--", "sleep", "30"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(cli.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = cli.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the CLI ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    server.signal(libc::SIGCONT);
    assert_eq!(status.code(), Some(143));
    // The sleep, if it started after all, is killed with the connection.
    wait_until("no child is left but the zygote", || {
        made_children_of(&server).is_empty() && zombie_children_of(server.pid()).is_empty()
    });
}

#[test]
fn the_cli_says_things_once() {
    let server = Server::start();
    let out = StdCommand::new(FORKSERVER)
        .args(["kill", "1", "--socket"])
        .arg(&server.socket)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "forkserver: the server refused: pid 1 is not a live child of this server\n"
    );
}
