//! Boot-time integration: systemd socket activation (through Debian's
//! systemd-socket-activate) and readiness (a notify socket of our own, and
//! --ready-fd).

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Instant;

use forkserver::client::Client;

use crate::util::{example, wait_until, KillOnDrop, FORKSERVER, TIMEOUT};

fn socket_activate(seqpacket: bool, socket: &std::path::Path) -> std::process::Child {
    let mut command = Command::new("systemd-socket-activate");
    if seqpacket {
        command.arg("--seqpacket");
    }
    command
        .arg("-l")
        .arg(socket)
        .arg(FORKSERVER)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd) must be installed")
}

/// The activator is in Debian's systemd package, which a container or a
/// minimal machine may lack.
fn have_activator(test: &str) -> bool {
    crate::util::available_or_skip(
        test,
        crate::util::have("systemd-socket-activate"),
        "needs systemd-socket-activate (Debian package systemd)",
    )
}

#[test]
fn serves_on_a_socket_passed_by_systemd() {
    if !have_activator("boot::serves_on_a_socket_passed_by_systemd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let mut activator = KillOnDrop(socket_activate(true, &socket));
    // The socket file appears at bind(), a moment before listen(): retry
    // until a connection is taken. The first one starts the server, which
    // inherits the socket.
    let mut client = None;
    wait_until("systemd-socket-activate listens", || {
        client = Client::connect(&socket).ok();
        client.is_some()
    });
    let client = client.unwrap();
    assert_eq!(
        client.server().pid,
        activator.0.id(),
        "the activator execs the server"
    );
    let output = client.command("echo").arg("activated").output().unwrap();
    assert_eq!(output.stdout, b"activated\n");
    // LISTEN_* are consumed, not passed on to children.
    let env = client.command("env").output().unwrap();
    assert!(!String::from_utf8_lossy(&env.stdout).contains("LISTEN_"));
    drop(client);
    // SAFETY: kill on our own unreaped child's pid.
    unsafe { libc::kill(activator.0.id() as i32, libc::SIGTERM) };
    assert!(activator.0.wait().unwrap().success());
    // The socket is systemd's: the server leaves it for its owner.
    assert!(socket.exists());
}

#[test]
fn a_stream_socket_from_systemd_is_a_clear_error() {
    if !have_activator("boot::a_stream_socket_from_systemd_is_a_clear_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stream.sock");
    let mut activator = KillOnDrop(socket_activate(false, &socket));
    // Retry until listen() has happened (the file appears at bind()).
    let mut trigger = None;
    wait_until("systemd-socket-activate listens", || {
        trigger = std::os::unix::net::UnixStream::connect(&socket).ok();
        trigger.is_some()
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut activator.0.stderr.take().unwrap(), &mut stderr).unwrap();
    let status = activator.0.wait().unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("SOCK_STREAM") && stderr.contains("ListenSequentialPacket="),
        "{stderr}"
    );
}

#[test]
fn ready_is_notified_only_after_preloading_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(TIMEOUT)).unwrap();
    let socket = dir.path().join("fs.sock");
    let log = dir.path().join("server.log");
    let started = Instant::now();
    let mut server = KillOnDrop(
        Command::new(example("test_zygote"))
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("FIXTURE_TABLE_MB", "64")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 1024];
    let n = crate::util::recv_notification(&notify, &mut buf).expect("READY=1 within TIMEOUT");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    // At the moment READY=1 arrives, preloading is done and the socket
    // answers.
    let log_then = std::fs::read_to_string(&log).unwrap();
    assert!(message.contains("READY=1"), "{message}");
    assert!(message.contains("STATUS=listening on"), "{message}");
    assert!(
        message.contains(&format!("MAINPID={}", server.0.id())),
        "{message}"
    );
    assert!(
        log_then.contains("preloaded module 'table'"),
        "READY before preload: {log_then}"
    );
    assert!(Client::connect(&socket).is_ok());
    assert!(started.elapsed() < TIMEOUT);
    // Children do not inherit NOTIFY_SOCKET.
    let env = Client::connect(&socket)
        .unwrap()
        .worker("env")
        .arg("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&env.stdout).starts_with("NOTIFY_SOCKET= in"));

    // SAFETY: kill on our own unreaped child's pid.
    unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) };
    let n = crate::util::recv_notification(&notify, &mut buf).expect("STOPPING=1 within TIMEOUT");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(server.0.wait().unwrap().success());
}

#[test]
fn ready_fd_gets_a_line_when_ready() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fs.sock");
    let mut server = KillOnDrop(
        Command::new(FORKSERVER)
            .args(["serve", "--ready-fd", "1", "--socket"])
            .arg(&socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready listening on "), "{line}");
    assert!(Client::connect(&socket).is_ok(), "ready, but not accepting");
}

#[test]
fn stderr_after_ready_moves_the_log_once_ready() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fs.sock");
    let log_path = dir.path().join("later.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut server = KillOnDrop(
        Command::new(FORKSERVER)
            .args(["serve", "-v", "--stderr-after-ready", "1", "--socket"])
            .arg(&socket)
            .stdout(Stdio::from(log))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The start-up stderr (a pipe) reaches its end while the server runs:
    // the server holds it no longer, and nothing relays it.
    let mut early = String::new();
    std::io::Read::read_to_string(&mut server.0.stderr.take().unwrap(), &mut early).unwrap();
    assert!(
        server.0.try_wait().unwrap().is_none(),
        "the server exited: {early}"
    );
    Client::connect(&socket).unwrap();
    wait_until("the server logs the connection to the file", || {
        std::fs::read_to_string(&log_path).is_ok_and(|later| later.contains("connected"))
    });
    let later = std::fs::read_to_string(&log_path).unwrap();
    assert!(later.contains("listening on"), "{later}");
    assert!(!early.contains("listening on"), "{early}");
}

#[test]
fn an_fd_flag_naming_a_closed_fd_fails_naming_the_flag() {
    for flag in ["--stderr-after-ready", "--ready-fd", "--lifeline-fd"] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(FORKSERVER)
            .args(["serve", flag, "999999", "--socket"])
            .arg(dir.path().join("fs.sock"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Exit 1 with the reason, not an abort (a debug build aborts when
        // a closed fd is owned and dropped).
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("Bad file descriptor"),
            "{flag}: {stderr}"
        );
        assert!(
            !dir.path().join("fs.sock").exists(),
            "{flag}: the socket file was left behind"
        );
    }
}
