//! The client library against a real server: stdio, exit statuses, env, cwd,
//! exec errors, many children, threads, disconnects.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::thread;

use forkserver::client::{Error, ErrorKind, Stdio};

use crate::util::{self, is_running, wait_until, Server};

#[test]
fn echo_through_a_piped_stdout() {
    let server = Server::start();
    let output = server
        .client()
        .command("echo")
        .arg("hello")
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(output.stdout, b"hello\n");
    assert_eq!(output.stderr, b"");
}

#[test]
fn cat_through_a_piped_stdin() {
    let server = Server::start();
    let mut child = server
        .client()
        .command("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"through cat\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.stdout, b"through cat\n");
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn stdout_and_stderr_are_read_together() {
    // More than a pipe buffer on each stream: a reader that drained one
    // before the other would deadlock here.
    let server = Server::start();
    let output = server
        .client()
        .command("sh")
        .args([
            "-c",
            "head -c 200000 /dev/zero; head -c 200000 /dev/zero >&2",
        ])
        .output()
        .unwrap();
    assert_eq!((output.stdout.len(), output.stderr.len()), (200000, 200000));
}

#[test]
fn exit_codes_and_death_by_signal() {
    let server = Server::start();
    let client = server.client();
    assert_eq!(client.command("true").status().unwrap().code(), Some(0));
    let three = client
        .command("sh")
        .args(["-c", "exit 3"])
        .status()
        .unwrap();
    assert_eq!(three.code(), Some(3));
    let killed = client
        .command("sh")
        .args(["-c", "kill -KILL $$"])
        .status()
        .unwrap();
    assert_eq!(
        (killed.code(), killed.signal()),
        (None, Some(libc::SIGKILL))
    );
}

#[test]
fn kill_and_signal_go_through_the_pidfd() {
    let server = Server::start();
    let client = server.client();
    let mut child = client.command("sleep").arg("1000").spawn().unwrap();
    assert!(child.try_wait().unwrap().is_none());
    child.signal(libc::SIGUSR1).unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGUSR1));
    // Signalling a child that has exited is not an error and hits nobody.
    child.kill().unwrap();

    let mut sleeper = client.command("sleep").arg("1000").spawn().unwrap();
    sleeper.kill().unwrap();
    wait_until("try_wait sees the exit", || {
        sleeper.try_wait().unwrap().is_some()
    });
    assert_eq!(
        sleeper.try_wait().unwrap().unwrap().signal(),
        Some(libc::SIGKILL)
    );
}

#[test]
fn env_and_cwd_are_applied() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let output = server
        .client()
        .command("sh")
        .args(["-c", "echo \"$FOO|$HOME|$(pwd)\""])
        .env_clear()
        .env("FOO", "bar baz")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let expected = format!(
        "bar baz||{}\n",
        dir.path().canonicalize().unwrap().display()
    );
    assert_eq!(String::from_utf8(output.stdout).unwrap(), expected);

    // With server_env and without env_clear the server's environment is
    // the base (the test server runs with FORKSERVER_LOG=debug); env_remove
    // takes a variable out of it.
    let output = server
        .client()
        .command("sh")
        .args(["-c", "echo \"${FORKSERVER_LOG-unset}\""])
        .server_env(true)
        .output()
        .unwrap();
    assert_eq!(output.stdout, b"debug\n");
    let output = server
        .client()
        .command("sh")
        .args(["-c", "echo \"${FORKSERVER_LOG-unset}\""])
        .server_env(true)
        .env_remove("FORKSERVER_LOG")
        .output()
        .unwrap();
    assert_eq!(output.stdout, b"unset\n");
}

#[track_caller]
fn expect_spawn_failure(
    result: Result<forkserver::client::Child, Error>,
    kind: ErrorKind,
    errno: i32,
) -> String {
    match result {
        Err(e @ Error::SpawnFailed { .. }) => {
            let Error::SpawnFailed {
                kind: got,
                errno: got_errno,
                ..
            } = &e
            else {
                unreachable!()
            };
            assert_eq!((*got, *got_errno), (kind, Some(errno)), "{e}");
            e.to_string()
        }
        Err(other) => panic!("expected SpawnFailed, got {other}"),
        Ok(child) => panic!("expected SpawnFailed, child {} started", child.id()),
    }
}

#[test]
fn exec_failures_arrive_with_their_errno() {
    let server = Server::start();
    let client = server.client();
    let message = expect_spawn_failure(
        client.command("no-such-program-here").spawn(),
        ErrorKind::Exec,
        libc::ENOENT,
    );
    assert_eq!(
        message,
        "cannot run 'no-such-program-here': No such file or directory (os error 2)"
    );

    let script = server.dir.path().join("not-executable");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    expect_spawn_failure(
        client.command(&script).spawn(),
        ErrorKind::Exec,
        libc::EACCES,
    );

    expect_spawn_failure(
        client.command("true").current_dir("/no/such/dir").spawn(),
        ErrorKind::Chdir,
        libc::ENOENT,
    );
    // The connection still works after failures.
    assert!(client.command("true").status().unwrap().success());
}

#[test]
fn child_has_exactly_its_stdio_and_the_fds_it_was_given() {
    let server = Server::start();
    let client = server.client();
    let (read_end, write_end) = std::io::pipe().unwrap();
    let extra: OwnedFd = write_end.into();
    let extra_target = util::own_fd_target(extra.as_fd());
    let mut child = client
        .command("sleep")
        .arg("1000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .fd(7, extra)
        .spawn()
        .unwrap();
    let pid = child.id();
    // sleep may open locale files for a moment as it starts; what it holds
    // once settled is what it was given.
    wait_until("the child holds exactly fds 0, 1, 2 and 7", || {
        util::fds_of(pid) == [0, 1, 2, 7]
    });
    assert_eq!(util::fd_target(pid, 7), extra_target);
    assert_eq!(util::fd_target(pid, 0).to_str(), Some("/dev/null"));
    child.kill().unwrap();
    child.wait().unwrap();
    drop(read_end);

    let mut plain = client.command("sleep").arg("1000").spawn().unwrap();
    wait_until("the child holds exactly fds 0, 1 and 2", || {
        util::fds_of(plain.id()) == [0, 1, 2]
    });
    plain.kill().unwrap();
    plain.wait().unwrap();
}

#[test]
fn fifty_children_in_flight_waited_in_reverse_order() {
    let server = Server::start();
    let client = server.client();
    // Each child blocks reading its stdin, so all fifty are alive at once;
    // wait() closes a child's stdin, letting just that one exit.
    let mut children: Vec<_> = (0..50)
        .map(|i| {
            let child = client
                .command("sh")
                .args(["-c", &format!("read line; exit {i}")])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            (i, child)
        })
        .collect();
    assert!(children.iter().all(|(_, c)| is_running(c.id())));
    while let Some((i, mut child)) = children.pop() {
        assert_eq!(child.wait().unwrap().code(), Some(i));
    }
}

#[test]
fn children_are_waited_from_other_threads() {
    let server = Server::start();
    let client = server.client();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let mut child = client
                .command("sh")
                .args(["-c", &format!("sleep 0.{i}; exit {}", 10 + i)])
                .spawn()
                .unwrap();
            thread::spawn(move || child.wait().unwrap().code())
        })
        .collect();
    let codes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(codes, [Some(10), Some(11), Some(12), Some(13)]);
}

#[test]
fn disconnect_kills_children_but_not_detached_ones() {
    let server = Server::start();
    let client = server.client();
    let attached = client.command("sleep").arg("1000").spawn().unwrap();
    let detached = client
        .command("sleep")
        .arg("1000")
        .detach(true)
        .spawn()
        .unwrap();
    let (attached_pid, detached_pid) = (attached.id(), detached.id());
    drop((client, attached, detached));
    wait_until("the attached child is gone", || !is_running(attached_pid));
    assert!(is_running(detached_pid), "the detached child was killed");
    // The server still reaps it when it ends.
    // SAFETY: the pid is alive and unreaped (the server reaps only after death).
    unsafe { libc::kill(detached_pid as i32, libc::SIGKILL) };
    wait_until("the detached child is reaped", || {
        util::state_of(detached_pid).is_none()
    });
}

#[test]
fn a_child_ignoring_sigterm_is_killed_after_the_grace_period() {
    let server = Server::start_with(&["--kill-grace", "0.3"]);
    let client = server.client();
    let mut stubborn = client
        .command("sh")
        .args(["-c", "trap '' TERM; echo ready; exec sleep 1000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    stubborn
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .unwrap();
    let pid = stubborn.id();
    drop((client, stubborn));
    wait_until("the stubborn child is killed", || !is_running(pid));
}
