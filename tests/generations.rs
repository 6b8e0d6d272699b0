//! Generations: a reload loads the preloads afresh in a new zygote while the
//! old one serves; a failed reload leaves the old one serving; a zygote that
//! crashes costs no child and no connection, and is restarted with a
//! growing back-off. Through the `test_zygote` fixture, whose `version`
//! preload reads a file (new code on disk) and whose `crash:` family
//! segfaults the zygote on request.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkserver::client::{Error, ErrorKind, Stdio};

use crate::util::{
    example, made_children_of, wait_until, zombie_children_of, zygote_of, Server, FORKSERVER,
};

/// A fixture server whose `version` preload reads `dir/version`, with
/// `extra` flags and environment.
fn versioned(extra: &[&str], env: &[(&str, &str)]) -> (Server, PathBuf) {
    let dir = crate::util::new_dir();
    let version = dir.path().join("version");
    std::fs::write(&version, "one\n").unwrap();
    let mut all_env = vec![("FIXTURE_VERSION_FILE", version.to_str().unwrap().to_owned())];
    all_env.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
    let all_env: Vec<(&str, &str)> = all_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::launch_in(dir, &[], &example("test_zygote"), extra, &all_env);
    (server, version)
}

fn cli_reload(server: &Server) -> std::process::Output {
    Command::new(FORKSERVER)
        .args(["reload", "--socket"])
        .arg(&server.socket)
        .output()
        .unwrap()
}

fn version_of(client: &forkserver::client::Client) -> String {
    let output = client.worker("version").output().unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[test]
fn a_reload_loads_new_code_and_keeps_every_child_connection_and_the_pid() {
    let (server, version) = versioned(&["--pool", "version=1"], &[]);
    let client = server.client();
    assert_eq!(version_of(&client), "one");
    let first_zygote = zygote_of(&server).unwrap();
    // Started before the reload and still running after it: a worker that
    // prints its generation's value once its stdin closes, and an exec
    // child.
    let mut old_worker = client
        .worker("version")
        .arg("wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sleeper = client.command("sleep").arg("30").spawn().unwrap();

    std::fs::write(&version, "two\n").unwrap();
    let reload = cli_reload(&server);
    let said = String::from_utf8_lossy(&reload.stdout);
    assert!(reload.status.success(), "{reload:?}");
    assert!(said.contains("generation 2 serves"), "{said}");
    assert!(said.contains("version"), "{said}");

    // New spawns (pooled or not) run the new code, from a new zygote; the
    // front is the same process, on the same connection.
    assert_eq!(version_of(&client), "two");
    assert_eq!(version_of(&server.client()), "two");
    let status = client.status().unwrap();
    assert_eq!((status.pid, status.generation), (server.pid(), 2));
    assert_ne!(status.zygote_pid, Some(first_zygote));
    wait_until("the old zygote exits", || {
        crate::util::comm_of(first_zygote).is_none()
    });

    // The children started before it are untouched, and their ends reach
    // this client: the old worker still has the old code.
    drop(old_worker.stdin.take());
    let output = old_worker.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(output.stdout, b"one\n");
    sleeper.kill().unwrap();
    assert_eq!(sleeper.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert!(
        server.log().contains("generation 2 serves"),
        "{}",
        server.log()
    );
    wait_until("no zombie is left", || {
        zombie_children_of(server.pid()).is_empty()
    });
}

#[test]
fn a_reload_that_fails_leaves_the_old_generation_serving_and_says_why() {
    let dir = crate::util::new_dir();
    let fail_if = dir.path().join("fail");
    let (server, version) = versioned(&[], &[("FIXTURE_FAIL_IF", fail_if.to_str().unwrap())]);
    let client = server.client();
    std::fs::write(&version, "two\n").unwrap();
    std::fs::write(&fail_if, "").unwrap();
    let reload = cli_reload(&server);
    let said = String::from_utf8_lossy(&reload.stderr);
    assert_eq!(reload.status.code(), Some(1), "{reload:?}");
    assert!(
        said.contains("reload failed") && said.contains("the fixture was told to fail"),
        "{said}"
    );
    assert!(said.contains("generation 1 serves on"), "{said}");
    // The old generation serves on, with the old code; status says why the
    // reload failed, and so does the log.
    assert_eq!(version_of(&client), "one");
    let status = client.status().unwrap();
    assert_eq!(status.generation, 1);
    assert!(
        status
            .reload_failure
            .as_deref()
            .is_some_and(|why| why.contains("the fixture was told to fail")),
        "{status:?}"
    );
    assert!(server
        .cli_status_text()
        .contains("the latest reload failed"));
    assert!(server.log().contains("the fixture was told to fail"));
    // Fixed on disk, the next reload works and clears the failure.
    std::fs::remove_file(&fail_if).unwrap();
    assert!(cli_reload(&server).status.success());
    assert_eq!(version_of(&client), "two");
    assert_eq!(client.status().unwrap().reload_failure, None);
}

#[test]
fn a_zygote_that_crashes_costs_no_child_and_no_connection() {
    let (server, _version) = versioned(&[], &[]);
    let others = server.client();
    let mut worker = others
        .worker("version")
        .arg("wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let first = zygote_of(&server).unwrap();
    // Another client's request makes the zygote segfault before any fork.
    let crasher = server.client();
    match crasher.worker("crash:now").spawn() {
        Err(Error::SpawnFailed { kind, message, .. }) => {
            assert_eq!(kind, ErrorKind::Resource, "{message}");
            assert!(message.contains("zygote"), "{message}");
        }
        other => panic!("expected the crash to fail the request, got {other:?}"),
    }
    // The front, the connections and the children live on; exec spawns
    // never needed the zygote.
    assert!(others.command("true").status().unwrap().success());
    assert!(crasher.command("true").status().unwrap().success());
    wait_until("a new generation serves", || {
        let status = others.status().unwrap();
        status.generation == 2 && status.zygote_pid.is_some_and(|pid| pid != first)
    });
    assert_eq!(version_of(&crasher), "one");
    drop(worker.stdin.take());
    let output = worker.wait_with_output().unwrap();
    assert_eq!(output.stdout, b"one\n", "the old worker finished");
    assert!(server.log().contains("no child or connection is lost"));
    assert_eq!(others.status().unwrap().pid, server.pid());
}

#[test]
fn a_preload_that_crashes_at_import_is_retried_with_a_growing_back_off() {
    let dir = crate::util::new_dir();
    let crash_if = dir.path().join("crash");
    let (server, _version) = versioned(&[], &[("FIXTURE_CRASH_IF", crash_if.to_str().unwrap())]);
    let client = server.client();
    // From now on every generation aborts while preloading.
    std::fs::write(&crash_if, "").unwrap();
    let zygote = zygote_of(&server).unwrap();
    // SAFETY: kill by pid of the server's child we just found.
    unsafe { libc::kill(zygote as i32, libc::SIGKILL) };
    wait_until("four restarts have failed", || {
        server.log().matches("the next try is in").count() >= 4
    });
    // Each wait is twice the one before: no respawn storm.
    let log = server.log();
    let waits: Vec<u64> = log
        .match_indices("the next try is in ")
        .map(|(at, text)| {
            let rest = &log[at + text.len()..];
            rest[..rest.find(" ms").unwrap()].parse().unwrap()
        })
        .collect();
    assert!(
        waits.windows(2).all(|w| w[1] == w[0] * 2),
        "back-off {waits:?}"
    );
    // Meanwhile worker spawns fail saying so, and everything else works.
    match client.worker("version").spawn() {
        Err(Error::SpawnFailed { message, .. }) => {
            assert!(message.contains("no zygote is serving"), "{message}")
        }
        other => panic!("expected no zygote, got {other:?}"),
    }
    assert!(client.command("true").status().unwrap().success());
    // Fixed on disk, a later try serves.
    std::fs::remove_file(&crash_if).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if client.status().unwrap().zygote_pid.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(version_of(&client), "one");
}

#[test]
fn reload_and_upgrade_are_for_root_and_the_server_s_uid_only() {
    if !crate::util::root_or_skip("reload_and_upgrade_are_for_root_and_the_server_s_uid_only") {
        return;
    }
    let server = crate::util::server_nobody_may_use(&[]);
    let cli = server.dir.path().join("forkserver-cli");
    for (args, asked) in [(&[][..], "reload"), (&["--exec"][..], "upgrade")] {
        let output = crate::util::cli_as_nobody(&server, &cli, "reload", args);
        let said = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        assert!(
            said.contains(&format!("only root and the server's uid 0 may {asked} it")),
            "{said}"
        );
    }
    let status = server.client().status().unwrap();
    assert_eq!((status.generation, status.pid), (1, server.pid()));
    assert!(!server.log().contains("upgrading in place"));
}

/// A client keeps ~300 spawns a second in flight (exec and worker, pooled
/// and not) while the server is reloaded 10 times: every request is
/// answered with a child, every child's exit reaches its client, and the
/// front's pid never changes.
#[test]
fn spawns_go_on_through_ten_reloads_and_three_upgrades_in_place() {
    let (server, version) = versioned(&["--pool", "version=2"], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let spawned = Arc::new(AtomicU64::new(0));
    let reloading = Arc::new(AtomicBool::new(false));
    let worst_during_reload = Arc::new(Mutex::new(Duration::ZERO));
    let socket = server.socket.clone();
    let runners: Vec<_> = (0..6)
        .map(|n| {
            let (stop, spawned, socket) = (stop.clone(), spawned.clone(), socket.clone());
            let (reloading, worst) = (reloading.clone(), worst_during_reload.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let client = forkserver::client::Client::connect(&socket).unwrap();
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let during = reloading.load(Ordering::Relaxed);
                    let mut command = match (n + round) % 3 {
                        0 => client.command("true"),
                        1 => client.worker("version"),
                        _ => client.worker("args"),
                    };
                    let output = command
                        .output()
                        .map_err(|e| format!("round {round}: {e}"))?;
                    if !output.status.success() {
                        return Err(format!("round {round}: {output:?}"));
                    }
                    if during {
                        let mut worst = worst.lock().unwrap();
                        *worst = (*worst).max(started.elapsed());
                    }
                    spawned.fetch_add(1, Ordering::Relaxed);
                    round += 1;
                    // About 50 a second per runner.
                    std::thread::sleep(Duration::from_millis(15));
                }
                Ok(())
            })
        })
        .collect();
    let client = server.client();
    let started = Instant::now();
    let mut generation = 1;
    for n in 0..10 {
        std::fs::write(&version, format!("v{n}\n")).unwrap();
        // Started before, running through it: its exit must come back.
        let mut long = client.command("sleep").arg("0.3").spawn().unwrap();
        reloading.store(true, Ordering::Relaxed);
        generation = client.reload().unwrap().0;
        // After the 4th, 7th and 10th reload, an upgrade in place too: the
        // front runs its binary again, keeping every runner's connection.
        if n % 3 == 0 && n > 0 {
            let (now, before) = client.upgrade().unwrap();
            assert_eq!(now, before, "the same binary");
            assert_eq!(client.status().unwrap().generation, generation + 1);
            generation += 1;
        }
        reloading.store(false, Ordering::Relaxed);
        assert!(long.wait().unwrap().success());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        generation, 14,
        "10 reloads and 3 upgrades after generation 1"
    );
    stop.store(true, Ordering::Relaxed);
    for runner in runners {
        runner.join().unwrap().unwrap();
    }
    assert_eq!(client.status().unwrap().pid, server.pid());
    assert_eq!(version_of(&client), "v9");
    let total = spawned.load(Ordering::Relaxed);
    eprintln!(
        "{total} spawns in {:.1} s through 10 reloads and 3 upgrades in place, 0 refused; worst spawn during a reload or upgrade: {:?}",
        started.elapsed().as_secs_f64(),
        worst_during_reload.lock().unwrap()
    );
    wait_until("every child is reaped", || {
        made_children_of(&server)
            .iter()
            .all(|&pid| crate::util::comm_of(pid).as_deref() != Some("sleep"))
            && zombie_children_of(server.pid()).is_empty()
    });
}

/// A dylib rewritten on disk after the server loaded it is stale: `status`
/// names it and the log says so once, until a reload loads it.
#[test]
fn a_changed_dylib_is_reported_stale_until_a_reload() {
    let dir = crate::util::new_dir();
    let library = dir.path().join("demo.so");
    std::fs::copy(crate::dylib::demo_module(), &library).unwrap();
    let module = format!("demo={}", library.display());
    let server = Server::launch_in(
        dir,
        &[],
        std::path::Path::new(FORKSERVER),
        &["--module", &module],
        &[],
    );
    let client = server.client();
    assert_eq!(client.status().unwrap().stale_count, 0);
    // Replaced as an upgrade replaces it: a new file renamed over the old.
    let fresh = server.dir.path().join("demo.so.new");
    std::fs::copy(crate::dylib::demo_module(), &fresh).unwrap();
    std::fs::rename(&fresh, &library).unwrap();
    wait_until("status names the stale dylib", || {
        client.status().unwrap().stale == [library.display().to_string()]
    });
    assert!(server
        .cli_status_text()
        .contains("stale: 1 preloaded file(s)"));
    let log = server.log();
    assert_eq!(
        log.matches("changed on disk since it was loaded").count(),
        1,
        "{log}"
    );
    assert!(cli_reload(&server).status.success());
    assert_eq!(client.status().unwrap().stale_count, 0);
}

/// `--reload-on-change` reloads by itself once the changed files settle,
/// and a worker spawned after it runs the new code.
#[test]
fn reload_on_change_reloads_by_itself() {
    let dir = crate::util::new_dir();
    let library = dir.path().join("demo.so");
    std::fs::copy(crate::dylib::demo_module(), &library).unwrap();
    let module = format!("demo={}", library.display());
    let server = Server::launch_in(
        dir,
        &[],
        std::path::Path::new(FORKSERVER),
        &["--module", &module, "--reload-on-change"],
        &[],
    );
    let client = server.client();
    let fresh = server.dir.path().join("demo.so.new");
    std::fs::copy(crate::dylib::demo_module(), &fresh).unwrap();
    std::fs::rename(&fresh, &library).unwrap();
    wait_until("a new generation serves", || {
        let status = client.status().unwrap();
        status.generation == 2 && status.stale_count == 0
    });
    assert!(server
        .log()
        .contains("--reload-on-change: 1 preloaded file(s) changed"));
    let code = client.worker("demo:exit_with").arg("7").status().unwrap();
    assert_eq!(code.code(), Some(7));
}

/// Under systemd a reload is `RELOADING=1` (with the monotonic clock's
/// time) then `READY=1`, as sd_notify(3) asks of a `Type=notify-reload`
/// service; a failed reload is followed by `READY=1` too (the old
/// generation serves).
#[test]
fn a_reload_tells_systemd_reloading_then_ready() {
    let dir = crate::util::new_dir();
    let notify_path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(crate::util::TIMEOUT)).unwrap();
    let (server, _version) = versioned(&[], &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);
    let mut buf = [0u8; 1024];
    let mut next = || {
        let n = crate::util::recv_notification(&notify, &mut buf)
            .expect("a notification within TIMEOUT");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(next().contains("READY=1"));
    server.signal(libc::SIGHUP);
    let reloading = next();
    assert!(reloading.contains("RELOADING=1"), "{reloading}");
    let usec: u64 = reloading
        .lines()
        .find_map(|line| line.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC with RELOADING=1")
        .parse()
        .unwrap();
    assert!(usec > 0);
    let ready = next();
    assert!(
        ready.contains("READY=1") && ready.contains("generation 2 serves"),
        "{ready}"
    );
}

/// A reload asked while another generation preloads is not answered by
/// that one, which read the disk before the ask: a new generation follows
/// it, shared by every ask made meanwhile.
#[test]
fn a_reload_asked_during_another_gets_a_generation_started_after_it() {
    // Each generation reads the version file, then preloads for 600 ms.
    let (server, version) = versioned(&[], &[("FIXTURE_PRELOAD_MS", "600")]);
    let ask = || {
        let socket = server.socket.clone();
        std::thread::spawn(move || {
            let client = forkserver::client::Client::connect(&socket).unwrap();
            client.reload().unwrap().0
        })
    };
    std::fs::write(&version, "two\n").unwrap();
    let first = ask();
    wait_until("generation 2 is preloading", || {
        server.log().contains("starting a new generation")
    });
    std::thread::sleep(Duration::from_millis(100));
    // Changed on disk after generation 2 read it, and asked for three
    // times while it preloads.
    std::fs::write(&version, "three\n").unwrap();
    let later: Vec<_> = (0..3).map(|_| ask()).collect();
    assert_eq!(first.join().unwrap(), 2);
    let later: Vec<u64> = later.into_iter().map(|a| a.join().unwrap()).collect();
    assert_eq!(later, [3, 3, 3]);
    assert_eq!(version_of(&server.client()), "three");
    assert_eq!(
        server.log().matches("starting a new generation").count(),
        2,
        "{}",
        server.log()
    );
}
