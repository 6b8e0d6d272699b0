//! Starting and stopping `forkserver serve`: the ready line, the socket's
//! mode, SIGTERM, a second server, a stale socket, the default path.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;

use crate::util::{serve_command, wait_until, KillOnDrop, Server, FORKSERVER};

#[test]
fn logs_when_ready_and_stops_cleanly_on_sigterm() {
    let mut server = Server::start();
    let socket = server.socket.clone();
    wait_until("the ready line is logged", || {
        server.log().contains("listening on")
    });
    assert!(server.log().contains(&socket.display().to_string()));
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    // A running child is terminated on the way out.
    let child = server
        .client()
        .command("sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit().code(), Some(0), "{}", server.log());
    assert!(!socket.exists(), "socket left behind");
    // The server waited for it and reaped it before exiting.
    assert_eq!(crate::util::state_of(child.id()), None);
}

#[test]
fn sigint_stops_it_too() {
    let mut server = Server::start();
    server.signal(libc::SIGINT);
    assert_eq!(server.wait_exit().code(), Some(0));
    assert!(!server.socket.exists());
}

#[test]
fn a_second_server_on_the_same_path_refuses_to_start() {
    let server = Server::start();
    let second = std::process::Command::new(FORKSERVER)
        .arg("serve")
        .arg("--socket")
        .arg(&server.socket)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already listening"), "{stderr}");
    // The first one is undisturbed.
    assert!(server.client().command("true").status().unwrap().success());
}

#[test]
fn a_stale_socket_is_replaced() {
    let mut first = Server::start();
    first.signal(libc::SIGKILL);
    first.wait_exit();
    let socket = first.socket.clone();
    assert!(std::fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());

    let second = KillOnDrop(
        serve_command(&[], Path::new(FORKSERVER), &socket, first.dir.path())
            .spawn()
            .unwrap(),
    );
    wait_until("the new server answers", || {
        forkserver::protocol::connect_seqpacket(&socket).is_ok()
    });
    let client = forkserver::client::Client::connect(&socket).unwrap();
    assert_eq!(client.server().pid, second.0.id());
}

#[test]
fn a_path_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("precious");
    std::fs::write(&path, "data").unwrap();
    let output = std::process::Command::new(FORKSERVER)
        .arg("serve")
        .arg("--socket")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not a socket"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
}

#[test]
fn the_default_socket_is_under_xdg_runtime_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = KillOnDrop(
        std::process::Command::new(FORKSERVER)
            .arg("serve")
            .env_remove("FORKSERVER_SOCKET")
            .env("XDG_RUNTIME_DIR", dir.path())
            .spawn()
            .unwrap(),
    );
    let socket = dir.path().join("forkserver.sock");
    wait_until(
        "the server listens on $XDG_RUNTIME_DIR/forkserver.sock",
        || forkserver::protocol::connect_seqpacket(&socket).is_ok(),
    );
    // The CLI finds it the same way.
    let status = std::process::Command::new(FORKSERVER)
        .args(["spawn", "--", "true"])
        .env_remove("FORKSERVER_SOCKET")
        .env("XDG_RUNTIME_DIR", dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    // SAFETY: kill on our own unreaped child's pid.
    unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) };
    let mut status = None;
    wait_until("the server exits", || {
        status = server.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success());
    assert!(!socket.exists());
}

#[test]
fn log_levels_follow_the_flags() {
    // The test servers run with FORKSERVER_LOG=debug; the flags win.
    let quiet = Server::start_with(&["-q", "--limit", "max_args_bytes=32768"]);
    let client = quiet.client();
    client.command("true").status().unwrap();
    let refused = client.command("true").arg("x".repeat(40_000)).spawn();
    assert!(refused.is_err());
    let log = quiet.log();
    assert!(
        !log.contains("listening on") && !log.contains(" debug "),
        "{log}"
    );
    // Refusals are warnings, naming the peer.
    assert!(
        log.contains(" warn spawn ") && log.contains(&format!("pid {}", std::process::id())),
        "{log}"
    );

    let verbose = Server::start_with(&["-v"]);
    verbose.client().command("true").status().unwrap();
    wait_until("spawns and exits are logged", || {
        let log = verbose.log();
        log.contains(" debug spawn ") && log.contains(" ended: ")
    });
}

/// A server SIGKILLed, then another started on its socket: the same
/// `Client` connects to the new one at its next request; the children of
/// the lost connection say so from `wait` (at once, never hanging) and
/// still take signals through their pidfds.
#[test]
fn a_client_outlives_its_server() {
    let mut server = Server::start();
    let client = forkserver::client::Client::connect(&server.socket)
        .unwrap()
        .reconnect_wait(std::time::Duration::from_millis(300));
    let mut attached = client.command("sleep").arg("30").spawn().unwrap();
    let mut detached = client
        .command("sleep")
        .arg("30")
        .detach(true)
        .spawn()
        .unwrap();
    server.signal(libc::SIGKILL);
    server.wait_exit();
    for child in [&mut attached, &mut detached] {
        match child.wait() {
            Err(e @ forkserver::client::Error::ServerLost(_)) => {
                assert!(e.to_string().contains("exit status is unknown"), "{e}")
            }
            other => panic!("expected ServerLost, got {other:?}"),
        }
    }
    // No server yet: the request waits a little, then says how to start one.
    let gone = client.command("true").status().unwrap_err();
    assert!(
        matches!(gone, forkserver::client::Error::ServerGone { .. })
            && gone.to_string().contains("forkserver serve --socket"),
        "{gone}"
    );
    let second = crate::util::restart_on(&server);
    assert!(client.command("true").status().unwrap().success());
    assert_eq!(client.server().pid, second.0.id());
    assert_eq!(client.status().unwrap().pid, second.0.id());
    // The lost children were never the new server's; their pidfds still
    // reach them (neither is killed by a lost server but by us).
    for child in [&mut attached, &mut detached] {
        assert!(crate::util::is_running(child.id()));
        child.kill().unwrap();
        crate::util::wait_readable(child.pidfd());
    }
}

/// A server that dies and comes back while one request is being made:
/// a request sent after the death is sent again to the new server, not
/// failed.
#[test]
fn a_request_after_a_restart_goes_to_the_new_server() {
    let mut server = Server::start();
    let client = forkserver::client::Client::connect(&server.socket).unwrap();
    assert!(client.command("true").status().unwrap().success());
    server.signal(libc::SIGKILL);
    server.wait_exit();
    let second = crate::util::restart_on(&server);
    // Nothing read the old connection's end since: the client finds it
    // hung up when it sends.
    let listed = client.list().unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    assert_eq!(client.server().pid, second.0.id());
}
