//! cgroup v2 placement: a child created in the cgroup its client names
//! (clone3 with CLONE_INTO_CGROUP for programs, a worker moving itself in),
//! only where the peer could have placed it, and shown by `ps --json`.
//! Needs root and a writable cgroup2 mount (found in /proc/self/mountinfo;
//! on this machine kind, /sys/fs/cgroup/unified beside the v1 hierarchies).

use std::os::unix::fs::chown;
use std::path::PathBuf;

use forkserver::client::{Error, ErrorKind, Stdio};

use crate::util::{
    available_or_skip, cli_as_nobody, example, open_to_nobody, root_or_skip, Server,
};

/// A fresh cgroup under the cgroup2 mount, removed on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn create(test: &str) -> Option<TestCgroup> {
        if !root_or_skip(test) {
            return None;
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = mountinfo
            .lines()
            .find(|l| {
                l.split(" - ")
                    .nth(1)
                    .is_some_and(|t| t.starts_with("cgroup2 "))
            })
            .and_then(|l| l.split_whitespace().nth(4))
            .map(PathBuf::from);
        let dir = mount.map(|m| m.join(format!("forkserver-test-{}-{test}", std::process::id())));
        let made = dir.as_ref().is_some_and(|d| std::fs::create_dir(d).is_ok());
        if !available_or_skip(test, made, "needs a writable cgroup2 mount") {
            return None;
        }
        Some(TestCgroup(dir.unwrap()))
    }

    /// Its path as /proc/PID/cgroup shows it.
    fn name(&self) -> String {
        format!("/{}", self.0.file_name().unwrap().to_string_lossy())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Empty once its processes are gone; retry while they are reaped.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[test]
fn a_program_and_a_worker_start_in_the_cgroup_asked_for() {
    let Some(cgroup) = TestCgroup::create("cgroups_placed") else {
        return;
    };
    let server = Server::launch(&example("test_zygote"), &["-v"], &[]);
    let client = server.client();
    let out = client
        .command("grep")
        .args(["^0::", "/proc/self/cgroup"])
        .cgroup(&cgroup.0)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("0::{}\n", cgroup.name())
    );
    assert!(
        server.log().contains("created in its cgroup by clone3"),
        "{}",
        server.log()
    );

    // A worker runs the server's code, so it moves itself in instead.
    let mut worker = client
        .worker("idle")
        .stdin(Stdio::piped())
        .cgroup(&cgroup.0)
        .spawn()
        .unwrap();
    let listed = client.list().unwrap();
    let entry = listed.iter().find(|c| c.pid == worker.id()).unwrap();
    assert_eq!(entry.cgroup.as_deref(), Some(cgroup.name().as_str()));
    assert!(
        server.log().contains("moves itself into its cgroup"),
        "{}",
        server.log()
    );
    drop(worker.stdin.take());
    assert!(worker.wait().unwrap().success());

    // Not a cgroup2 directory: refused before any fork, naming the field.
    match client.command("true").cgroup("/tmp").status() {
        Err(Error::SpawnFailed { kind, message, .. }) => {
            assert_eq!(kind, ErrorKind::Invalid);
            assert!(
                message.contains("not a directory of a cgroup v2"),
                "{message}"
            );
        }
        other => panic!("expected an invalid cgroup, got {other:?}"),
    }
}

#[test]
fn a_peer_places_children_only_where_it_may_write_cgroup_procs() {
    let Some(cgroup) = TestCgroup::create("cgroups_delegated") else {
        return;
    };
    let server = Server::start_with(&["--group", "nogroup", "--allow-uid", "nobody"]);
    let cli = open_to_nobody(&server);
    let path = cgroup.0.to_str().unwrap().to_owned();
    let spawn = || {
        cli_as_nobody(
            &server,
            &cli,
            "spawn",
            &["--cgroup", &path, "--", "grep", "^0::", "/proc/self/cgroup"],
        )
    };
    // Root's cgroup: nobody may not put a child there.
    let out = spawn();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may not write that cgroup's cgroup.procs")
    );
    // Delegated to nobody (its cgroup.procs chowned): allowed, and the child
    // runs as nobody in it.
    chown(cgroup.0.join("cgroup.procs"), Some(65534), Some(65534)).unwrap();
    let out = spawn();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("0::{}\n", cgroup.name())
    );
}

#[test]
fn a_pids_limit_stops_a_fork_bomb_in_the_cgroup_only() {
    let Some(cgroup) = TestCgroup::create("cgroups_pids") else {
        return;
    };
    let root = cgroup.0.parent().unwrap().to_owned();
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if !crate::util::kernel_has_or_skip(
        "cgroups::a_pids_limit_stops_a_fork_bomb_in_the_cgroup_only",
        controllers.split_whitespace().any(|c| c == "pids"),
        "needs the pids controller on cgroup2 (bound to cgroup v1 on this machine)",
    ) {
        return;
    }
    std::fs::write(root.join("cgroup.subtree_control"), "+pids").unwrap();
    std::fs::write(cgroup.0.join("pids.max"), "5").unwrap();
    let server = Server::start();
    let client = server.client();
    let out = client
        .command("sh")
        .args(["-c", "for i in 1 2 3 4 5 6 7 8; do sleep 1 & done; wait"])
        .cgroup(&cgroup.0)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fork"),
        "{out:?}"
    );
    // The server and its other children are not limited.
    let children: Vec<_> = (0..8)
        .map(|_| client.command("sleep").arg("1").spawn().unwrap())
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
}

/// A spawn into a frozen cgroup never reports its start; pool refills for
/// everyone else go on meanwhile (they used to wait for every start).
#[test]
fn a_start_that_never_reports_holds_up_no_refill() {
    let Some(cgroup) = TestCgroup::create("cgroups::a_start_that_never_reports_holds_up_no_refill")
    else {
        return;
    };
    std::fs::write(cgroup.0.join("cgroup.freeze"), "1").unwrap();
    let server = crate::pool::pooled(&["answer=1"], &[]);
    crate::pool::wait_full(&server, 1);
    let socket = server.socket.clone();
    let dir = cgroup.0.clone();
    let stuck = std::thread::spawn(move || {
        let client = forkserver::client::Client::connect(&socket).unwrap();
        client.command("true").cgroup(&dir).status()
    });
    crate::util::wait_until("the frozen child exists", || {
        std::fs::read_to_string(cgroup.0.join("cgroup.procs")).is_ok_and(|p| !p.is_empty())
    });
    // The pool's child goes to this request; its refill must not wait for
    // the frozen start.
    let client = server.client();
    assert_eq!(client.worker("answer").output().unwrap().stdout, b"42\n");
    crate::pool::wait_full(&server, 1);
    std::fs::write(cgroup.0.join("cgroup.freeze"), "0").unwrap();
    assert!(stuck.join().unwrap().unwrap().success());
}
