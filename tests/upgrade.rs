//! Upgrade in place (`forkserver reload --exec`, SIGUSR2, the `upgrade`
//! request): the server runs its binary again, the file on disk now, with
//! the same pid, keeping every connection and child; a binary that cannot
//! take over leaves the old image serving with everything it had.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use forkserver::client::{Child, Client, Stdio};

use crate::util::{new_dir, wait_until, zombie_children_of, Server, FORKSERVER};

/// A server run from a copy of `forkserver` in the test's directory, which
/// a test replaces as a package upgrade does.
fn copied_server() -> (Server, PathBuf) {
    let dir = new_dir();
    let exe = dir.path().join("forkserver");
    std::fs::copy(FORKSERVER, &exe).unwrap();
    let server = Server::launch_in(dir, &[], &exe, &[], &[]);
    (server, exe)
}

/// Puts a new file at `exe` (written beside it, then renamed over it, as
/// package managers do): the running server's binary is then deleted.
fn replace(exe: &Path, contents: &[u8]) {
    let new = exe.with_extension("new");
    std::fs::write(&new, contents).unwrap();
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&new, exe).unwrap();
}

/// What /proc/PID/exe says the process runs.
fn running(server: &Server) -> String {
    let link = std::fs::read_link(format!("/proc/{}/exe", server.pid())).unwrap();
    link.to_string_lossy().into_owned()
}

fn cli_upgrade(server: &Server) -> Output {
    Command::new(FORKSERVER)
        .args(["reload", "--exec", "--socket"])
        .arg(&server.socket)
        .output()
        .unwrap()
}

/// A `cat` started through `client`: what it is sent comes back once its
/// stdin closes, and then its exit.
fn cat(client: &Client) -> Child {
    client
        .command("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn echo_through(mut cat: Child, text: &str) {
    let mut stdin = cat.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).unwrap();
    drop(stdin);
    let mut out = String::new();
    cat.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(out, text);
    assert!(cat.wait().unwrap().success());
}

#[test]
fn an_upgrade_runs_the_new_binary_with_the_same_pid_connections_and_children() {
    let (server, exe) = copied_server();
    let client = server.client();
    let before = cat(&client);
    let detached = server
        .cli_spawn(&[
            "--detach",
            "--",
            "sh",
            "-c",
            "exec sleep 30 >/dev/null 2>&1",
        ])
        .output()
        .unwrap();
    let detached: u32 = String::from_utf8_lossy(&detached.stdout)
        .trim()
        .parse()
        .unwrap();
    replace(&exe, &std::fs::read(FORKSERVER).unwrap());
    assert!(running(&server).ends_with("(deleted)"));

    let upgraded = cli_upgrade(&server);
    assert!(upgraded.status.success(), "{upgraded:?}\n{}", server.log());
    assert!(String::from_utf8_lossy(&upgraded.stdout).contains("upgraded in place"));
    // The new file runs, in the same process.
    assert_eq!(running(&server), exe.to_string_lossy());
    let status = client.status().unwrap();
    assert_eq!((status.pid, status.generation), (server.pid(), 2));
    // The connection made before goes on, and its child's exit reaches it.
    echo_through(before, "handed over\n");
    let listed = client.list().unwrap();
    assert!(
        listed.iter().any(|c| c.pid == detached),
        "{detached} in {listed:?}\n{}",
        server.log()
    );
    assert!(client.command("true").status().unwrap().success());

    // SIGUSR2 does the same.
    let before = cat(&client);
    server.signal(libc::SIGUSR2);
    wait_until("the second upgrade serves", || {
        server.log().matches("upgraded in place").count() == 2
    });
    assert_eq!(client.status().unwrap().generation, 3);
    echo_through(before, "twice\n");
    client.kill(Some(detached), libc::SIGKILL).unwrap();
    wait_until("no zombie is left", || {
        zombie_children_of(server.pid()).is_empty()
    });
}

#[test]
fn an_upgrade_to_a_binary_that_cannot_start_changes_nothing() {
    let (server, exe) = copied_server();
    let client = server.client();
    let before = cat(&client);
    replace(&exe, b"#!/bin/sh\necho 'not a forkserver' >&2\nexit 3\n");

    let upgraded = cli_upgrade(&server);
    assert_eq!(upgraded.status.code(), Some(1), "{upgraded:?}");
    let stderr = String::from_utf8_lossy(&upgraded.stderr);
    assert!(
        stderr.contains("upgrade failed") && stderr.contains("exit status: 3"),
        "{stderr}"
    );
    assert!(
        server.log().contains("not a forkserver"),
        "{}",
        server.log()
    );
    // The old image serves on, with its connection and child.
    assert!(running(&server).ends_with("(deleted)"));
    let status = client.status().unwrap();
    assert_eq!((status.pid, status.generation), (server.pid(), 1));
    echo_through(before, "still here\n");
}

#[test]
fn a_new_image_that_cannot_read_the_state_runs_the_old_binary_again() {
    let (server, exe) = copied_server();
    let client = server.client();
    let before = cat(&client);
    // Passes the check (it runs the real binary), then hands the new image
    // an fd that is not the state, as a binary that reads another format
    // would fail to read it.
    let script = format!(
        "#!/bin/sh\n[ -n \"$FORKSERVER_HANDOVER_FD\" ] && export FORKSERVER_HANDOVER_FD=999\nexec {FORKSERVER} \"$@\"\n"
    );
    replace(&exe, script.as_bytes());

    let upgraded = cli_upgrade(&server);
    assert_eq!(upgraded.status.code(), Some(1), "{upgraded:?}");
    let stderr = String::from_utf8_lossy(&upgraded.stderr);
    assert!(
        stderr.contains("could not take over") && stderr.contains("fd 999"),
        "{stderr}"
    );
    // The old binary (deleted from disk, run again from an fd) took
    // everything back.
    assert!(running(&server).ends_with("(deleted)"));
    let status = client.status().unwrap();
    assert_eq!(status.pid, server.pid());
    echo_through(before, "taken back\n");
    assert!(client.command("true").status().unwrap().success());
}
