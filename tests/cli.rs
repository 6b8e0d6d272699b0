//! `forkserver spawn` as a person at a shell uses it.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Output, Stdio};

use crate::util::Server;

fn run(mut command: std::process::Command, stdin: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn the_child_uses_the_cli_s_own_stdio() {
    let server = Server::start();
    let output = run(
        server.cli_spawn(&["--", "sh", "-c", "tr a-z A-Z; echo to-stderr >&2"]),
        b"piped in\n",
    );
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(output.stdout, b"PIPED IN\n");
    assert_eq!(output.stderr, b"to-stderr\n");
}

#[test]
fn the_cli_exits_with_the_child_s_status() {
    let server = Server::start();
    let three = run(server.cli_spawn(&["--", "sh", "-c", "exit 3"]), b"");
    assert_eq!(three.status.code(), Some(3));
    let killed = run(server.cli_spawn(&["--", "sh", "-c", "kill -KILL $$"]), b"");
    assert_eq!(killed.status.code(), Some(128 + 9));
}

#[test]
fn env_and_cwd_flags() {
    let server = Server::start();
    let output = run(
        server.cli_spawn(&[
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--cwd",
            "/",
            "--",
            "sh",
            "-c",
            "echo $A $B $(pwd)",
        ]),
        b"",
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "1 x=y /\n");
}

#[test]
fn a_missing_program_exits_127_and_a_non_executable_one_126() {
    let server = Server::start();
    let missing = run(server.cli_spawn(&["--", "nosuch"]), b"");
    assert_eq!(missing.status.code(), Some(127));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "forkserver: cannot run 'nosuch': No such file or directory (os error 2)\n"
    );

    let script = server.dir.path().join("plain-file");
    std::fs::write(&script, "echo hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let denied = run(server.cli_spawn(&["--", script.to_str().unwrap()]), b"");
    assert_eq!(denied.status.code(), Some(126));
    assert_eq!(
        String::from_utf8_lossy(&denied.stderr),
        format!(
            "forkserver: cannot run '{}': Permission denied (os error 13)\n",
            script.display()
        )
    );
}

#[test]
fn no_server_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody-home.sock");
    let mut command = std::process::Command::new(crate::util::FORKSERVER);
    command
        .arg("spawn")
        .arg("--socket")
        .arg(&socket)
        .args(["--", "true"]);
    let output = run(command, b"");
    assert_eq!(output.status.code(), Some(125));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no forkserver is listening on"), "{stderr}");
    assert!(
        stderr.contains(&format!("forkserver serve --socket {}", socket.display())),
        "{stderr}"
    );
}
