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

#[test]
fn signals_sent_to_the_cli_reach_the_child() {
    let server = Server::start();
    let mut cli = server
        .cli_spawn(&[
            "--",
            "sh",
            "-c",
            "trap 'exit 42' INT; echo ready; while :; do sleep 0.05; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(cli.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready, "ready\n");
    // SAFETY: kill on our own unreaped child's pid.
    unsafe { libc::kill(cli.id() as i32, libc::SIGINT) };
    assert_eq!(cli.wait().unwrap().code(), Some(42));
}

/// The signals a process no longer leaves to their default action: those
/// it blocks or catches (the `SigBlk` and `SigCgt` masks of
/// /proc/PID/status).
fn handled_signals(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .unwrap_or(0)
    };
    mask("SigBlk:") | mask("SigCgt:")
}

#[test]
fn an_interrupt_while_the_server_does_not_answer_ends_the_cli_with_130() {
    let server = Server::start();
    // A stopped server accepts connections (the kernel queues them) but
    // answers nothing: the CLI waits for its welcome.
    server.signal(libc::SIGSTOP);
    let mut cli = server.cli_spawn(&["--", "sleep", "30"]).spawn().unwrap();
    crate::util::wait_until("the CLI catches SIGINT to forward it", || {
        handled_signals(cli.id()) & (1 << (libc::SIGINT - 1)) != 0
    });
    let asked = std::time::Instant::now();
    // SAFETY: kill on our own unreaped child's pid.
    unsafe { libc::kill(cli.id() as i32, libc::SIGINT) };
    let status = cli.wait().unwrap();
    // As a shell reports a job that SIGINT ended, after the CLI's grace
    // for a start already on its way (half a second).
    assert_eq!(status.code(), Some(130));
    assert!(asked.elapsed() >= std::time::Duration::from_millis(400));
    server.signal(libc::SIGCONT);
    // The server then reads a request from a connection that has gone:
    // whatever it started is killed, and it serves on.
    let output = run(server.cli_spawn(&["--", "echo", "served"]), b"");
    assert_eq!(output.stdout, b"served\n");
}

#[test]
fn a_terminal_reaches_the_child_as_a_terminal() {
    let server = Server::start();
    let inner = format!(
        "{} spawn --socket {} -- sh -c 'test -t 0 && test -t 1 && echo tty'",
        crate::util::FORKSERVER,
        server.socket.display()
    );
    // script(1) runs the CLI on a new pseudo-terminal.
    let output = std::process::Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux) must be installed");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("tty"),
        "{output:?}"
    );
    assert!(output.status.success());
}

#[test]
fn detach_prints_the_pid_and_returns_at_once() {
    let server = Server::start();
    // The child lets go of the CLI's pipes, or reading them to the end would
    // wait for it.
    let output = run(
        server.cli_spawn(&[
            "--detach",
            "--",
            "sh",
            "-c",
            "exec sleep 1000 >/dev/null 2>&1",
        ]),
        b"",
    );
    assert!(output.status.success());
    let pid: u32 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(
        crate::util::is_running(pid),
        "the detached child outlives the CLI"
    );
    let kill = std::process::Command::new(crate::util::FORKSERVER)
        .args(["kill", "--socket"])
        .arg(&server.socket)
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    crate::util::wait_until("the detached child is killed", || {
        !crate::util::is_running(pid)
    });
}

#[test]
fn timeout_kills_the_child_and_exits_124() {
    let server = Server::start();
    let started = std::time::Instant::now();
    let output = run(
        server.cli_spawn(&["--timeout", "0.3", "--", "sleep", "1000"]),
        b"",
    );
    assert_eq!(output.status.code(), Some(124));
    assert!(String::from_utf8_lossy(&output.stderr).contains("timed out after"));
    assert!(started.elapsed() < crate::util::TIMEOUT);
    assert_eq!(server.client().status().unwrap().children, 0);
}

#[test]
fn status_and_ps_speak_json() {
    let server = Server::start();
    let client = server.client();
    let child = client.command("sleep").arg("1000").spawn().unwrap();
    let json = |command: &str| -> serde_json::Value {
        let output = std::process::Command::new(crate::util::FORKSERVER)
            .args([command, "--json", "--socket"])
            .arg(&server.socket)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let status = json("status");
    assert_eq!(status["pid"], server.pid());
    assert_eq!(status["children"], 1);
    assert_eq!(status["spawns"], 1);
    assert_eq!(status["socket"], server.socket.display().to_string());
    assert!(status["rss_bytes"].as_u64().unwrap() > 0);
    let ps = json("ps");
    assert_eq!(ps[0]["pid"], child.id());
    assert_eq!(ps[0]["target"], "sleep");
    assert_eq!(ps[0]["owner_pid"], std::process::id());
    assert_eq!(ps[0]["detached"], false);
    let text = server.cli_status_text();
    assert!(
        text.contains(&format!("(pid {})", server.pid())) && text.contains("1 live"),
        "{text}"
    );
}
