//! The async client (`forkserver::client::tokio`) against a real server:
//! many children on one connection, `select!` against a timeout, a
//! cancelled `wait`, the connection dying under pending futures, workers
//! with payloads, `kill_on_drop`.

use std::os::fd::AsFd;
use std::time::Duration;

use forkserver::client::tokio::AsyncClient;
use forkserver::client::{Error, Stdio};

use crate::util::{example, is_running, raise_fd_limit, wait_until, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_children_share_one_connection() {
    raise_fd_limit();
    let server = Server::start();
    let client = AsyncClient::connect(&server.socket).await.unwrap();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let output = client
                    .command("echo")
                    .arg(format!("child {i}"))
                    .output()
                    .await
                    .unwrap();
                assert!(output.status.success());
                assert_eq!(output.stdout, format!("child {i}\n").into_bytes());
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let status = client.status().await.unwrap();
    assert_eq!(
        (status.spawns, status.failures, status.children),
        (1000, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_races_a_timeout_and_a_cancelled_wait_loses_nothing() {
    let server = Server::start();
    let client = AsyncClient::connect(&server.socket).await.unwrap();

    // select!: the timeout wins, the child is killed and reported so.
    let mut child = client.command("sleep").arg("30").spawn().await.unwrap();
    let pid = child.id().unwrap();
    tokio::select! {
        status = child.wait() => panic!("sleep 30 ended early: {status:?}"),
        _ = tokio::time::sleep(Duration::from_millis(200)) => child.kill().await.unwrap(),
    }
    let status = child.wait().await.unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert!(!is_running(pid));

    // A wait cancelled before the exit, then another: the status is there.
    let mut child = client
        .command("sh")
        .args(["-c", "sleep 0.3; exit 7"])
        .spawn()
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(50), child.wait())
            .await
            .is_err()
    );
    assert_eq!(child.try_wait().unwrap(), None);
    assert_eq!(child.wait().await.unwrap().code(), Some(7));
    assert_eq!(child.try_wait().unwrap().and_then(|s| s.code()), Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pending_wait_says_the_server_was_lost_and_a_new_server_is_used() {
    let mut server = Server::start();
    let client = AsyncClient::connect(&server.socket)
        .await
        .unwrap()
        .reconnect_wait(Duration::from_millis(300));
    let mut waits = Vec::new();
    let mut pidfds = Vec::new();
    for _ in 0..10 {
        let mut child = client
            .command("sleep")
            .arg("30")
            .detach(true)
            .spawn()
            .await
            .unwrap();
        pidfds.push(child.pidfd().try_clone_to_owned().unwrap());
        waits.push(tokio::spawn(async move { (child.wait().await, child) }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.signal(libc::SIGKILL);
    server.wait_exit();
    let mut lost = Vec::new();
    for wait in waits {
        match tokio::time::timeout(Duration::from_secs(10), wait).await {
            Ok(Ok((Err(Error::ServerLost(why)), child))) => {
                assert!(why.contains("closed"), "{why}");
                lost.push(child);
            }
            other => panic!("expected the server to be lost, got {other:?}"),
        }
    }
    // No server: a request waits for one, then says so.
    match client.command("true").status().await {
        Err(e @ Error::ServerGone { .. }) => {
            assert!(e.to_string().contains("forkserver serve --socket"), "{e}")
        }
        other => panic!("expected ServerGone, got {other:?}"),
    }
    // A new server on the socket: the same client uses it.
    let second = crate::util::restart_on(&server);
    assert!(client.command("true").status().await.unwrap().success());
    assert_eq!(client.server().await.pid, second.0.id());
    // The lost children run on (detached), and still take signals through
    // their pidfds.
    for mut child in lost {
        child.start_kill().unwrap();
    }
    for pidfd in pidfds {
        crate::util::wait_readable(pidfd.as_fd());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_payloads_pipes_and_kill_on_drop() {
    let server = Server::launch(&example("test_zygote"), &[], &[]);
    let client = AsyncClient::connect(&server.socket).await.unwrap();
    let output = client
        .worker("args")
        .args(["one", "two"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        (output.status.code(), output.stdout),
        (Some(2), b"one two\n".to_vec())
    );

    #[derive(serde::Serialize)]
    struct Order {
        customer: String,
        lines: Vec<()>,
        tags: std::collections::BTreeMap<String, i64>,
        note: Option<String>,
    }
    let order = Order {
        customer: "ada".into(),
        lines: vec![],
        tags: [("rush".to_owned(), 1)].into(),
        note: None,
    };
    let output = client
        .worker("payload")
        .payload(&order)
        .unwrap()
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("customer: \"ada\""));

    // Pipes both ways, moved out of the child.
    let mut child = client
        .command("tr")
        .args(["a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .await
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"shout\n")
        .await
        .unwrap();
    drop(stdin);
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stdout.take().unwrap(), &mut out)
        .await
        .unwrap();
    assert_eq!(out, "SHOUT\n");
    assert!(child.wait().await.unwrap().success());
    drop(child);

    // kill_on_drop: dropping the handle kills the child.
    let child = client
        .command("sleep")
        .arg("30")
        .kill_on_drop(true)
        .spawn()
        .await
        .unwrap();
    let pid = child.id().unwrap();
    child.signal(0).unwrap();
    drop(child);
    wait_until("the dropped child is killed", || !is_running(pid));
    // Without it, the child lives on until its connection closes.
    let child = client.command("sleep").arg("30").spawn().await.unwrap();
    let pid = child.id().unwrap();
    drop(child);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(is_running(pid));
    // The last handle of the connection goes: the server kills its children.
    drop(client);
    wait_until("the connection's children are killed", || !is_running(pid));
}

/// tokio's `process_spawned_and_wait_in_different_runtime`: the runtime the
/// connection was made in is gone (and its reader task with it) before the
/// child exits; waiting in another runtime starts a reader there. (It used
/// to wait for ever.)
#[test]
fn a_child_spawned_in_one_runtime_is_waited_for_in_another() {
    let server = Server::start();
    let socket = server.socket.clone();
    let mut child = ::tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = AsyncClient::connect(&socket).await.unwrap();
        client.command("sleep").arg("0.2").spawn().await.unwrap()
    });
    assert!(child.id().is_some());
    let status = ::tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { ::tokio::time::timeout(Duration::from_secs(10), child.wait()).await })
        .expect("wait returned")
        .unwrap();
    assert!(status.success());
    // As tokio's: no pid once the status was taken.
    assert_eq!(child.id(), None);
}

/// As tokio's: `status()` closes the child's piped stdio before waiting, so
/// a child writing more than a pipe holds is not left blocked (it used to
/// hang with `head -c 1000000 /dev/zero`).
#[tokio::test]
async fn status_closes_piped_stdio_before_waiting() {
    let server = Server::start();
    let client = AsyncClient::connect(&server.socket).await.unwrap();
    let status = ::tokio::time::timeout(
        Duration::from_secs(10),
        client
            .command("head")
            .args(["-c", "1000000", "/dev/zero"])
            .stdout(Stdio::piped())
            .status(),
    )
    .await
    .expect("status returned")
    .unwrap();
    // head met a closed pipe: SIGPIPE, at its default as std gives it.
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGPIPE)
    );
}

/// As tokio's: `output()` pipes stdout and stderr whatever was set before.
#[tokio::test]
async fn output_pipes_stdout_and_stderr_as_tokio_s() {
    let server = Server::start();
    let client = AsyncClient::connect(&server.socket).await.unwrap();
    let output = client
        .command("sh")
        .args(["-c", "echo out; echo err >&2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(
        (output.stdout.as_slice(), output.stderr.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
}
