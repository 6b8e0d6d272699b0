//! Per-spawn process controls: resource limits, nice, CPU affinity and
//! oom_score_adj, applied in the child before its work, checked before the
//! fork, and refused where a non-root peer asks for more than it has.

use std::path::Path;

use forkserver::client::{Error, ErrorKind};

use crate::util::{cli_as_nobody, new_dir, open_to_nobody, root_or_skip, Server, FORKSERVER};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const REPORT: &str =
    "ulimit -n; ulimit -Hn; nice; grep Cpus_allowed_list /proc/self/status | cut -f2; cat /proc/self/oom_score_adj";

#[test]
fn the_cli_and_the_client_apply_limits_nice_cpus_and_oom_score_adj() {
    let server = Server::start();
    let out = server
        .cli_spawn(&[
            "--rlimit",
            "NOFILE=64:128",
            "--nice",
            "5",
            "--cpus",
            "0",
            "--oom-score-adj",
            "500",
            "--",
            "sh",
            "-c",
            REPORT,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "64\n128\n5\n0\n500\n");

    let out = server
        .client()
        .command("sh")
        .args(["-c", REPORT])
        .rlimit("NOFILE", Some(32), Some(64))
        .nice(3)
        .cpus(&[0])
        .oom_score_adj(100)
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "32\n64\n3\n0\n100\n");
}

#[test]
fn the_server_s_limits_are_the_default_and_self_gives_the_caller_s() {
    let server = Server::launch_in(
        new_dir(),
        &["prlimit", "--nofile=100:200", "--"],
        Path::new(FORKSERVER),
        &[],
        &[],
    );
    let out = server
        .cli_spawn(&["sh", "-c", "ulimit -n"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "100\n");
    // The caller's, through a shell whose limit differs from the server's.
    let line = format!(
        "ulimit -n 150 && exec '{FORKSERVER}' spawn --socket '{}' --rlimit self sh -c 'ulimit -n'",
        server.socket.display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &line])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "150\n", "{out:?}");
}

#[test]
fn bad_controls_are_refused_naming_the_field() {
    let server = Server::start();
    let client = server.client();
    let invalid = |result: Result<std::process::ExitStatus, Error>, field: &str| match result {
        Err(Error::SpawnFailed { kind, message, .. }) => {
            assert_eq!(kind, ErrorKind::Invalid, "{message}");
            assert!(message.contains(field), "{message}");
        }
        other => panic!("expected an invalid {field}, got {other:?}"),
    };
    invalid(
        client
            .command("true")
            .rlimit("FILES", Some(1), Some(1))
            .status(),
        "rlimits[0].resource",
    );
    invalid(
        client
            .command("true")
            .rlimit("NOFILE", Some(9), Some(8))
            .status(),
        "above its hard limit",
    );
    invalid(client.command("true").nice(99).status(), "nice 99");
    invalid(client.command("true").cpus(&[]).status(), "cpus is empty");
    invalid(
        client.command("true").oom_score_adj(5000).status(),
        "oom_score_adj 5000",
    );
    // A CPU that passes the check but not the kernel fails in the child,
    // reported as that step.
    match client.command("true").cpus(&[1023]).status() {
        Err(Error::SpawnFailed { kind, message, .. }) => {
            assert_eq!(kind, ErrorKind::Setup);
            assert!(message.contains("cannot set cpus"), "{message}");
        }
        other => panic!("expected a setup failure, got {other:?}"),
    }
    // The CLI refuses a bad flag before connecting.
    let out = server
        .cli_spawn(&["--rlimit", "FILES=1", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unknown resource 'FILES'"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_non_root_peer_may_not_ask_for_more_than_it_has() {
    if !root_or_skip("controls::a_non_root_peer_may_not_ask_for_more_than_it_has") {
        return;
    }
    let server = Server::start_with(&["--group", "nogroup", "--allow-uid", "nobody"]);
    let cli = open_to_nobody(&server);
    let refused = |flags: &[&str], what: &str| {
        let mut args = flags.to_vec();
        args.extend(["--", "true"]);
        let out = cli_as_nobody(&server, &cli, "spawn", &args);
        assert_eq!(out.status.code(), Some(125), "{flags:?}: {out:?}");
        assert!(
            text(&out.stderr).contains(what),
            "{flags:?}: {}",
            text(&out.stderr)
        );
    };
    refused(
        &["--rlimit", "NOFILE=unlimited"],
        "may not raise the hard limit of NOFILE",
    );
    refused(&["--nice", "-5"], "may not raise priority");
    refused(&["--oom-score-adj", "-100"], "may only raise it");
    // What it could do to itself goes through.
    let out = cli_as_nobody(
        &server,
        &cli,
        "spawn",
        &[
            "--rlimit",
            "NOFILE=50",
            "--nice",
            "10",
            "--oom-score-adj",
            "200",
            "--",
            "sh",
            "-c",
            REPORT,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(
        (lines[0].as_str(), lines[2].as_str(), lines[4].as_str()),
        ("50", "10", "200")
    );
}
