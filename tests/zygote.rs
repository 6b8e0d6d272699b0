//! Preloading and workers, through the `test_zygote` fixture and the
//! `zygote` and `client` examples.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;

use forkserver::client::{Error, ErrorKind, Stdio};
use serde::Serialize;

use crate::util::{
    example, failed_start, fds_of, rss_and_pss_kb, threads_of, wait_until, zygote_of, Server,
};

fn zygote(env: &[(&str, &str)]) -> Server {
    Server::launch(&example("test_zygote"), &[], env)
}

#[test]
fn a_preload_runs_once_and_100_workers_see_its_value() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("preloads");
    let server = zygote(&[("FIXTURE_PRELOAD_LOG", log.to_str().unwrap())]);
    let client = server.client();
    for _ in 0..100 {
        let output = client.worker("answer").output().unwrap();
        assert_eq!(output.stdout, b"42\n");
        assert!(output.status.success());
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "preloaded\n");
}

#[test]
fn welcome_and_status_report_modules_workers_and_rss() {
    let server = zygote(&[("FIXTURE_TABLE_MB", "16")]);
    let client = server.client();
    let info = client.server();
    let names: Vec<&str> = info.modules.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["counter", "table"]);
    assert!(
        info.workers.contains(&"answer".to_string()),
        "{:?}",
        info.workers
    );
    assert!(info.modules.iter().all(|m| m.preload_ms >= 0.0));

    let status = client.status().unwrap();
    assert_eq!(status.pid, server.pid());
    assert_eq!(status.modules, info.modules);
    // The table lives in the zygote, which preloaded it; the front never
    // touched it (unless it preloads in itself: no zygote).
    let (preloader, other) = match status.zygote_pid {
        Some(_) => (status.zygote_rss_bytes, status.rss_bytes),
        None => (status.rss_bytes, 0),
    };
    assert!(
        preloader > 16 << 20,
        "rss {preloader} is below the 16 MB table"
    );
    assert!(other < 16 << 20, "the front's rss {other} holds the table");
    assert!(
        server.log().contains("preloaded module 'table' in"),
        "{}",
        server.log()
    );
}

#[test]
fn copy_on_write_sharing_is_real() {
    let server = zygote(&[("FIXTURE_TABLE_MB", "64")]);
    let client = server.client();
    let mut workers: Vec<_> = (0..16)
        .map(|_| client.worker("idle").stdin(Stdio::piped()).spawn().unwrap())
        .collect();
    let (mut total_rss, mut total_pss) = (0, 0);
    for worker in &workers {
        let (rss, pss) = rss_and_pss_kb(worker.id());
        assert!(rss > 64 * 1024, "worker {} maps only {rss} kB", worker.id());
        total_rss += rss;
        total_pss += pss;
    }
    // 17 processes map the same 64 MB; unshared, the workers' PSS would add
    // up to their RSS.
    assert!(
        total_pss * 4 < total_rss,
        "16 workers: PSS {total_pss} kB vs RSS {total_rss} kB: not shared"
    );
    for worker in &mut workers {
        assert!(worker.wait().unwrap().success());
    }
    let output = client.worker("table_sum").output().unwrap();
    let expected: u64 = (0..64usize << 20).map(|i| (i % 251) as u64).sum();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        expected.to_string()
    );
}

#[test]
fn a_preload_that_starts_a_thread_is_refused_by_name() {
    let zygote = example("test_zygote");
    let (_, stderr) = failed_start(&zygote, &[], &[("FIXTURE_PRELOAD_THREAD", "1")]);
    assert!(
        stderr.contains("preloading module 'threads' started threads"),
        "{stderr}"
    );
    assert!(stderr.contains("'fixture-bg'"), "{stderr}");
    assert!(
        stderr.contains("deadlock") && stderr.contains("--allow-threads"),
        "{stderr}"
    );

    let server = Server::launch(
        &zygote,
        &["--allow-threads"],
        &[("FIXTURE_PRELOAD_THREAD", "1")],
    );
    wait_until("the warning is logged", || {
        server.log().contains("--allow-threads")
    });
    assert!(server.log().contains("fixture-bg"), "{}", server.log());
    let output = server.client().worker("answer").output().unwrap();
    assert_eq!(output.stdout, b"42\n");
}

#[test]
fn a_failing_or_panicking_preload_fails_the_start_naming_the_module() {
    let zygote = example("test_zygote");
    let (_, stderr) = failed_start(&zygote, &[], &[("FIXTURE_PRELOAD_FAIL", "1")]);
    assert!(
        stderr.contains("preloading module 'failing' failed: the fixture was told to fail"),
        "{stderr}"
    );
    let (_, stderr) = failed_start(&zygote, &[], &[("FIXTURE_PRELOAD_PANIC", "1")]);
    assert!(
        stderr.contains(
            "preloading module 'panicking' failed: panicked: the fixture was told to panic"
        ),
        "{stderr}"
    );
}

#[test]
fn a_worker_panic_exits_101_and_the_server_is_unharmed() {
    let server = zygote(&[]);
    let client = server.client();
    let output = client.worker("panic").output().unwrap();
    assert_eq!(output.status.code(), Some(101));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("worker panicked on purpose"), "{stderr}");
    assert_eq!(client.worker("answer").output().unwrap().stdout, b"42\n");
    assert_eq!(threads_of(server.pid()), 1);
}

#[derive(Debug, Serialize)]
struct Order {
    customer: String,
    lines: Vec<Line>,
    tags: BTreeMap<String, i64>,
    note: Option<String>,
}

#[derive(Debug, Serialize)]
struct Line {
    sku: u32,
    quantity: u16,
    price: f64,
}

#[test]
fn a_nested_payload_round_trips_through_msgpack() {
    let server = zygote(&[]);
    let order = Order {
        customer: "Zoë \"Z\" O'Neil".into(),
        lines: vec![
            Line {
                sku: 7,
                quantity: 3,
                price: 9.99,
            },
            Line {
                sku: 4_000_000_000,
                quantity: 65535,
                price: -0.5,
            },
        ],
        tags: BTreeMap::from([
            ("rush".to_string(), 1),
            ("weight".to_string(), -12_345_678_901),
        ]),
        note: None,
    };
    let output = server
        .client()
        .worker("payload")
        .payload(&order)
        .unwrap()
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stderr), "");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{order:?}\n")
    );

    // A payload of the wrong shape is the worker's error to report.
    let output = server
        .client()
        .worker("payload")
        .payload(&[1, 2])
        .unwrap()
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not decode"));
}

#[test]
fn worker_args_exit_code_env_cwd_and_unflushed_stdout() {
    let server = zygote(&[]);
    let client = server.client();
    let output = client
        .worker("args")
        .args(["a", "b c", "d"])
        .output()
        .unwrap();
    assert_eq!(
        (output.stdout.as_slice(), output.status.code()),
        (&b"a b c d\n"[..], Some(3))
    );

    let output = client
        .worker("env")
        .arg("GREETING")
        .env("GREETING", "hi there")
        .current_dir("/tmp")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "GREETING=hi there in /tmp\n"
    );

    let output = client.worker("no_newline").output().unwrap();
    assert_eq!(output.stdout, b"no newline, flushed at exit");
    assert_eq!(output.status.code(), Some(7));
}

#[test]
fn a_worker_has_only_its_stdio_and_the_fds_it_was_given() {
    let server = zygote(&[]);
    let client = server.client();
    let mut idle = client.worker("idle").stdin(Stdio::piped()).spawn().unwrap();
    assert_eq!(fds_of(idle.id()), [0, 1, 2]);
    // The worker names itself after its target.
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", idle.id())).unwrap();
    assert_eq!(comm.trim(), "idle");
    idle.stdin.take().unwrap().write_all(b"x").unwrap();
    assert!(idle.wait().unwrap().success());

    let (mut reader, writer) = std::io::pipe().unwrap();
    let output = client.worker("fds").fd(9, writer).output().unwrap();
    assert_eq!(output.stdout, b"[9]\n");
    let mut from_worker = String::new();
    std::io::Read::read_to_string(&mut reader, &mut from_worker).unwrap();
    assert_eq!(from_worker, "hello on fd 9\n");
}

#[test]
fn an_unknown_worker_is_a_spawn_failure_naming_it() {
    let server = zygote(&[]);
    match server.client().worker("nosuch").spawn() {
        Err(Error::SpawnFailed {
            kind: ErrorKind::UnknownWorker,
            message,
            ..
        }) => {
            assert!(message.contains("no worker named 'nosuch'"), "{message}");
            assert!(
                message.contains("answer"),
                "lists what is offered: {message}"
            );
        }
        other => panic!("expected an unknown-worker failure, got {other:?}"),
    }
    let output = server.cli_spawn(&["--worker", "nosuch"]).output().unwrap();
    assert_eq!(output.status.code(), Some(127));
    let output = server
        .cli_spawn(&["--worker", "args", "--", "x", "y"])
        .output()
        .unwrap();
    assert_eq!(
        (output.stdout.as_slice(), output.status.code()),
        (&b"x y\n"[..], Some(2))
    );
}

#[test]
fn the_zygote_and_client_examples_agree_with_the_cold_path() {
    let limit = ("ZYGOTE_SIEVE_LIMIT", "2000000");
    let server = Server::launch(&example("zygote"), &[], &[limit]);
    let output = Command::new(example("client"))
        .arg(&server.socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("module sieve preloaded in"), "{stdout}");
    assert!(stdout.contains("pi(1000000) = 78498"), "{stdout}");
    assert!(stdout.contains("97 is prime\n91 is not prime"), "{stdout}");
    assert!(stdout.contains("exit status: 0"), "{stdout}");

    let cold = Command::new(example("zygote"))
        .args(["query", "pi", "1999999"])
        .env(limit.0, limit.1)
        .output()
        .unwrap();
    let warm = server
        .client()
        .worker("pi")
        .arg("1999999")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&warm.stdout),
        "pi(1999999) = 148933\n"
    );
    assert_eq!(warm.stdout, cold.stdout);
}

#[test]
fn a_zygote_that_became_multithreaded_refuses_to_fork_and_a_new_generation_replaces_it() {
    let server = zygote(&[("FIXTURE_LATE_THREAD", "1")]);
    let client = server.client();
    assert_eq!(client.worker("answer").output().unwrap().stdout, b"42\n");
    let first = crate::util::zygote_of(&server).expect("a zygote");
    // The family's check starts a thread in the zygote, just before the
    // fork: the fork is refused, naming it.
    match client.worker("late_thread:x").spawn() {
        Err(Error::SpawnFailed {
            kind: ErrorKind::Threads,
            message,
            ..
        }) => {
            assert!(
                message.contains("'late-thread'") && message.contains("deadlock"),
                "{message}"
            )
        }
        other => panic!("expected a refusal to fork, got {other:?}"),
    }
    // The front is untouched: exec spawns never needed the zygote.
    assert!(client.command("true").status().unwrap().success());
    wait_until("a new generation serves", || {
        let status = client.status().unwrap();
        status.generation == 2 && status.zygote_pid.is_some_and(|pid| pid != first)
    });
    assert_eq!(client.worker("answer").output().unwrap().stdout, b"42\n");
    assert_eq!(client.status().unwrap().pid, server.pid());
}

#[test]
fn dormant_threads_are_left_behind_and_a_new_one_is_never_tolerated() {
    let env = [
        ("FIXTURE_PRELOAD_THREAD", "1"),
        ("FIXTURE_LATE_THREAD", "1"),
    ];
    let launch = || Server::launch(&example("test_zygote"), &["--allow-dormant-threads"], &env);
    let refusal_of =
        |client: &forkserver::client::Client, worker: &str| match client.worker(worker).spawn() {
            Err(Error::SpawnFailed {
                kind: ErrorKind::Threads,
                message,
                ..
            }) => message,
            other => panic!("expected a refusal to fork, got {other:?}"),
        };

    // A sleeping thread left by a preload: served, and logged as tolerated.
    let server = launch();
    let client = server.client();
    for _ in 0..5 {
        assert_eq!(client.worker("answer").output().unwrap().stdout, b"42\n");
    }
    assert!(
        server.log().contains("tolerating 1 dormant thread(s)")
            && server.log().contains("'fixture-bg'"),
        "{}",
        server.log()
    );
    // The zygote that serves is a copy of the one that preloaded, made by
    // one fork, so without the thread: it makes each child with one clone.
    let status = client.status().unwrap();
    let serving = status.zygote_pid.expect("a zygote serves");
    assert_eq!(threads_of(serving), 1);
    assert_eq!(zygote_of(&server), Some(serving));
    assert_eq!(client.worker("answer").output().unwrap().stdout, b"42\n");
    drop(client);
    drop(server);

    // A thread that appears after the preloads is never tolerated: here
    // the family's check starts it, in the zygote, just before the fork.
    let server = launch();
    let client = server.client();
    assert_eq!(client.worker("answer").output().unwrap().stdout, b"42\n");
    // Its name, not just its existence: the guard's message names it.
    let message = refusal_of(&client, "late_thread:x");
    assert!(
        message.contains("'late-thread' started after the preloads"),
        "{message}"
    );
}
