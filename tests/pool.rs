//! The prefork pool: idle children forked ahead, handed requests, refilled
//! off the critical path, flushed on SIGHUP, and indistinguishable (fds,
//! env, cwd, credentials) from freshly forked workers.

use forkserver::client::Stdio;

use crate::util::{
    children_of, comm_of, example, fds_of, wait_until, zombie_children_of, zygote_of, Server,
};

pub(crate) fn pooled(pools: &[&str], extra: &[&str]) -> Server {
    let mut args = Vec::new();
    for pool in pools {
        args.extend(["--pool", pool]);
    }
    args.extend_from_slice(extra);
    Server::launch(&example("test_zygote"), &args, &[])
}

/// The idle pool children: the server's children that no client owns, but
/// the zygote.
fn idle_children(server: &Server) -> Vec<u32> {
    let owned: Vec<u32> = server
        .client()
        .list()
        .unwrap()
        .iter()
        .map(|c| c.pid)
        .collect();
    let zygote = zygote_of(server);
    children_of(server.pid())
        .into_iter()
        .filter(|&pid| !owned.contains(&pid) && Some(pid) != zygote)
        .collect()
}

/// Waits until every pool holds `idle` children, all of them warmed up.
pub(crate) fn wait_full(server: &Server, idle: u32) {
    let client = server.client();
    wait_until("the pools are full and ready", || {
        client
            .status()
            .unwrap()
            .pools
            .iter()
            .all(|p| p.idle == idle && p.ready == idle)
    });
}

#[test]
fn a_pooled_worker_is_an_idle_child_handed_the_request_then_refilled() {
    let server = pooled(&["answer=2"], &[]);
    wait_full(&server, 2);
    let idle = idle_children(&server);
    assert_eq!(idle.len(), 2, "{idle:?}");
    // Idle children hold nothing of the server's but stdio, their control
    // socket, error pipe and /dev/null.
    assert_eq!(fds_of(idle[0]).len(), 6, "{:?}", fds_of(idle[0]));

    let client = server.client();
    let mut child = client
        .worker("answer")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        idle.contains(&child.id()),
        "pid {} was not from the pool {idle:?}",
        child.id()
    );
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert_eq!(out, "42\n");
    assert!(child.wait().unwrap().success());

    let pool = &client.status().unwrap().pools[0];
    assert_eq!(
        (pool.worker.as_str(), pool.hits, pool.misses),
        ("answer", 1, 0)
    );
    wait_full(&server, 2);
    // A worker without a pool is still forked as usual.
    assert_eq!(
        client.worker("args").arg("x").output().unwrap().stdout,
        b"x\n"
    );
}

#[test]
fn a_pooled_worker_gets_its_fds_env_and_cwd() {
    let server = pooled(&["idle=1", "env=1", "fds=1"], &[]);
    wait_full(&server, 1);
    let client = server.client();
    let mut idle = client.worker("idle").stdin(Stdio::piped()).spawn().unwrap();
    assert_eq!(fds_of(idle.id()), [0, 1, 2]);
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", idle.id())).unwrap();
    assert_eq!(comm.trim(), "idle");
    drop(idle.stdin.take());
    assert!(idle.wait().unwrap().success());

    let output = client
        .worker("env")
        .arg("WHO")
        .env("WHO", "pooled")
        .current_dir("/tmp")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "WHO=pooled in /tmp\n"
    );

    let (mut reader, writer) = std::io::pipe().unwrap();
    let output = client.worker("fds").fd(9, writer).output().unwrap();
    assert_eq!(output.stdout, b"[9]\n");
    let mut got = String::new();
    std::io::Read::read_to_string(&mut reader, &mut got).unwrap();
    assert_eq!(got, "hello on fd 9\n");
    let hits: u64 = client.status().unwrap().pools.iter().map(|p| p.hits).sum();
    assert_eq!(hits, 3);
}

#[test]
fn a_pool_child_rechecks_who_it_becomes() {
    // A root server, a pooled worker, a client that is nobody: the pool
    // child (root while idle) must become nobody.
    if !crate::util::root_or_skip("pool::a_pool_child_rechecks_who_it_becomes") {
        return;
    }
    let server = pooled(&["ids=1"], &["--group", "nogroup", "--allow-uid", "nobody"]);
    let cli = crate::util::open_to_nobody(&server);
    wait_full(&server, 1);
    let output = crate::util::cli_as_nobody(&server, &cli, "spawn", &["--worker", "ids"]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "65534 65534\n",
        "{output:?}"
    );
    assert_eq!(server.client().status().unwrap().pools[0].hits, 1);
}

#[test]
fn a_dead_idle_child_is_replaced_and_sighup_flushes_the_pool() {
    let server = pooled(&["answer=2"], &[]);
    wait_full(&server, 2);
    let before = idle_children(&server);
    // SAFETY: kill by pid of an idle child we just listed (it is unreaped
    // until the server reaps it, so the pid cannot be reused meanwhile).
    unsafe { libc::kill(before[0] as i32, libc::SIGKILL) };
    wait_until("the dead child is replaced", || {
        let now = idle_children(&server);
        now.len() == 2 && !now.contains(&before[0])
    });
    let replaced = idle_children(&server);
    server.signal(libc::SIGHUP);
    wait_until("SIGHUP replaces every idle child", || {
        let now = idle_children(&server);
        now.len() == 2 && now.iter().all(|pid| !replaced.contains(pid))
    });
    assert_eq!(
        server.client().worker("answer").output().unwrap().stdout,
        b"42\n"
    );
    assert!(crate::util::zombie_children_of(server.pid()).is_empty());
}

#[test]
fn the_zygote_makes_the_pool_s_children_as_the_server_s_own_and_sighup_replaces_it() {
    let server = pooled(&["answer=2"], &[]);
    wait_full(&server, 2);
    let zygote = zygote_of(&server).expect("the server started a zygote");
    let status = server.client().status().unwrap();
    assert_eq!((status.zygote_pid, status.generation), (Some(zygote), 1));
    let server_name = comm_of(server.pid()).unwrap();
    // Its children are the server's (clone3 with CLONE_PARENT), with the
    // server's name back.
    let old_idle = idle_children(&server);
    for &pid in &old_idle {
        assert_eq!(comm_of(pid).as_deref(), Some(server_name.as_str()));
    }
    server.signal(libc::SIGHUP);
    wait_until("a new zygote replaces the old one, which exits", || {
        zygote_of(&server).is_some_and(|new| new != zygote) && comm_of(zygote).is_none()
    });
    assert!(server.log().contains("generation 2 serves"));
    wait_full(&server, 2);
    // The old generation's idle children were retired.
    assert!(idle_children(&server)
        .iter()
        .all(|pid| !old_idle.contains(pid)));
    assert_eq!(
        server.client().worker("answer").output().unwrap().stdout,
        b"42\n"
    );
    assert!(zombie_children_of(server.pid()).is_empty());
}

/// `FORKSERVER_SIBLING_FORK=0` forces the way a musl build, or a server
/// that tolerates threads, takes: the zygote forks each child twice and
/// the middle process exits at once, so the server (a subreaper) adopts
/// it. Its children are the server's all the same, and a reload keeps them.
#[test]
fn without_clone3_a_zygote_s_children_are_adopted_by_the_server() {
    let server = Server::launch(
        &example("test_zygote"),
        &["--pool", "answer=2"],
        &[("FORKSERVER_SIBLING_FORK", "0")],
    );
    wait_full(&server, 2);
    let zygote = zygote_of(&server).expect("the server started a zygote");
    let server_name = comm_of(server.pid()).unwrap();
    for pid in idle_children(&server) {
        assert_eq!(comm_of(pid).as_deref(), Some(server_name.as_str()));
    }
    let client = server.client();
    // Not pooled, so the zygote forks it; it runs across a reload, and its
    // parent-death signal is tied to the server, not to the middle process
    // (which has exited by now).
    let mut idle = client
        .worker("idle")
        .stdin(Stdio::piped())
        .die_with_server(true)
        .spawn()
        .unwrap();
    assert!(children_of(server.pid()).contains(&idle.id()));
    assert_eq!(
        children_of(zygote),
        Vec::<u32>::new(),
        "no middle process is left"
    );
    assert_eq!(client.reload().unwrap().0, 2);
    wait_until("the old zygote is gone", || comm_of(zygote).is_none());
    assert_eq!(comm_of(idle.id()).as_deref(), Some("idle"));
    drop(idle.stdin.take());
    assert!(idle.wait().unwrap().success());
    for _ in 0..4 {
        assert_eq!(client.worker("answer").output().unwrap().stdout, b"42\n");
    }
    assert!(zombie_children_of(server.pid()).is_empty());
}

#[test]
fn the_zygote_ends_with_the_server() {
    let mut server = pooled(&["answer=1"], &[]);
    wait_full(&server, 1);
    let zygote = zygote_of(&server).unwrap();
    server.signal(libc::SIGTERM);
    server.wait_exit();
    wait_until("the zygote is gone", || comm_of(zygote).is_none());
}

#[test]
fn a_child_still_warming_up_is_not_ready_and_a_request_it_takes_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let server = Server::launch(
        &example("test_zygote"),
        &["--pool", "answer=2"],
        &[("FIXTURE_PREWARM_GATE", gate.to_str().unwrap())],
    );
    let client = server.client();
    wait_until("two idle children", || {
        client.status().unwrap().pools[0].idle == 2
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    let pool = &client.status().unwrap().pools[0];
    assert_eq!((pool.idle, pool.ready), (2, 0), "{pool:?}");

    let opener = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::fs::write(&gate, b"").unwrap();
    });
    let start = std::time::Instant::now();
    let output = server.client().worker("answer").output().unwrap();
    assert_eq!(output.stdout, b"42\n");
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(250),
        "the request ran before the child's warm-up ended: {:?}",
        start.elapsed()
    );
    opener.join().unwrap();
    assert_eq!(client.status().unwrap().pools[0].hits, 1);
    wait_full(&server, 2);
    let text = server.cli_status_text();
    assert!(
        text.contains("pool answer: 2 of 2 idle (2 ready), 1 hits, 0 misses"),
        "{text}"
    );
}

#[test]
fn a_pool_for_an_unknown_worker_fails_the_start() {
    let (_, stderr) =
        crate::util::failed_start(&example("test_zygote"), &["--pool", "nosuch=2"], &[]);
    assert!(
        stderr.contains("--pool nosuch: no worker named 'nosuch'"),
        "{stderr}"
    );
}

#[test]
fn a_child_that_panics_before_its_work_is_a_spawn_failure_and_the_server_serves_on() {
    let server = Server::launch(
        &example("test_zygote"),
        &["--pool", "panic_in_child:x=1"],
        &[("FIXTURE_CHILD_PANIC", "1")],
    );
    wait_full(&server, 1);
    let client = server.client();
    let err = client.worker("panic_in_child:x").status().unwrap_err();
    match &err {
        forkserver::client::Error::SpawnFailed { kind, message, .. } => {
            assert_eq!(*kind, forkserver::protocol::ErrorKind::Setup, "{message}");
            assert!(message.contains("panicked"), "{message}");
        }
        other => panic!("expected SpawnFailed, got {other:?}"),
    }
    // The panic unwound no further than the child: the socket file is still
    // there (a forked copy of the listener dropping would remove it), the
    // server serves, and the panicked child was reaped.
    assert!(server.socket.exists(), "the socket file is gone");
    assert!(
        server.log().contains("the fixture panics in a child"),
        "{}",
        server.log()
    );
    assert_eq!(
        client.worker("args").arg("x").output().unwrap().stdout,
        b"x\n"
    );
    wait_until("no zombie is left", || {
        zombie_children_of(server.pid()).is_empty()
    });
    let pool = &client.status().unwrap().pools[0];
    assert_eq!((pool.hits, pool.misses), (1, 0));

    // A panic in the server's own check of a request fails that request.
    match client.worker("panic_in_server:x").status().unwrap_err() {
        forkserver::client::Error::SpawnFailed { kind, message, .. } => {
            assert_eq!(kind, forkserver::protocol::ErrorKind::Invalid, "{message}");
            assert!(
                message.contains("panicked checking this request"),
                "{message}"
            );
        }
        other => panic!("expected SpawnFailed, got {other:?}"),
    }
    assert!(server.socket.exists());
    assert!(client.worker("args").status().unwrap().success());
}

/// A pooled request of any size the protocol takes goes to the pool child
/// (in a memfd past 64 KiB), as it would to a fork: 300 KB of arguments
/// used to fail "Message too long" and cost an idle child.
#[test]
fn a_large_pooled_request_is_handed_over_in_a_memfd() {
    let server = pooled(&["args=1"], &[]);
    wait_full(&server, 1);
    let client = server.client();
    let args = vec!["x".repeat(1000); 300];
    let output = client.worker("args").args(&args).output().unwrap();
    assert_eq!(output.stdout.len(), 300 * 1000 + 299 + 1);
    assert_eq!(output.status.code(), Some(300 % 256));
    let pools = client.status().unwrap().pools;
    assert_eq!((pools[0].hits, pools[0].misses), (1, 0));
    wait_full(&server, 1);
    assert!(zombie_children_of(server.pid()).is_empty());
}
