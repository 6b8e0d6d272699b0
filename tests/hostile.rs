//! A hostile peer of a root server: what a user allowed to connect must not
//! reach (the server's terminal, rights it does not have) and must not take
//! from other users. The server runs as root (as CI does); the peer is user
//! `nobody`, played with setpriv(1) running the example `test_peer` or the
//! CLI.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{self, Server, FORKSERVER};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `[PREFIX...] test_peer SOCKET ARGS...` as nobody; returns its stdout.
fn as_nobody(server: &Server, prefix: &[&str], args: &[&str]) -> String {
    let output = run_as_nobody(prefix, &util::peer_program(server), server, args);
    assert!(output.status.success(), "{}", text(&output.stderr));
    text(&output.stdout)
}

/// Runs `[PREFIX...] PROGRAM SOCKET_ARGS ARGS...` as nobody, where
/// SOCKET_ARGS are `--socket S` for the CLI and `S` for test_peer. The
/// PREFIX (prlimit, nice, choom) runs as nobody too, so it can only lower
/// what nobody has.
fn run_as_nobody(
    prefix: &[&str],
    program: &Path,
    server: &Server,
    args: &[&str],
) -> std::process::Output {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=nobody", "--regid=nogroup", "--init-groups", "--"])
        .args(prefix)
        .arg(program);
    if program.ends_with("forkserver-cli") {
        command.arg(args[0]).arg("--socket").arg(&server.socket);
        command.args(&args[1..]);
    } else {
        command.arg(&server.socket).args(args);
    }
    command
        .current_dir("/")
        .output()
        .expect("setpriv (util-linux) must be installed")
}

/// A root server that nobody may use, and its CLI copied where nobody can
/// run it.
fn server_for_nobody(test: &str) -> Option<(Server, PathBuf)> {
    if !util::root_or_skip(test) {
        return None;
    }
    let server = util::server_nobody_may_use(&[]);
    let cli = server.dir.path().join("forkserver-cli");
    Some((server, cli))
}

/// A pseudo-terminal pair (master, slave) for the test to hold.
fn pty() -> (OwnedFd, OwnedFd) {
    // SAFETY: plain libc calls on a new master; ptsname_r writes at most
    // `name.len()` bytes, NUL-terminated.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(master >= 0, "posix_openpt");
        let master = OwnedFd::from_raw_fd(master);
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0);
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0);
        let mut name = [0 as libc::c_char; 64];
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
            0
        );
        let slave = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(slave >= 0, "open the pty's slave");
        (master, OwnedFd::from_raw_fd(slave))
    }
}

/// What the terminal's master end reads within `wait`.
fn read_terminal(master: &OwnedFd, wait: Duration) -> String {
    let mut seen = Vec::new();
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let mut poll = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        if unsafe { libc::poll(&mut poll, 1, 50) } == 1 {
            let mut buf = [0u8; 4096];
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n as usize]);
        }
    }
    text(&seen)
}

/// The server process started by a shell in the background, as an
/// operator's `forkserver serve &` is: the shell leads a session whose
/// controlling terminal is the test's pty, and the server is in it without
/// leading it. Killed on drop.
struct ServerOnTerminal {
    server: Server,
    pid_file: PathBuf,
}

impl Drop for ServerOnTerminal {
    fn drop(&mut self) {
        if let Some(pid) = fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            // SAFETY: kill takes plain integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn server_on_terminal(slave: &OwnedFd, args: &[&str]) -> ServerOnTerminal {
    let dir = util::new_dir();
    let socket = dir.path().join("fs.sock");
    let pid_file = dir.path().join("server.pid");
    let script = format!(
        "echo on-the-terminal > /dev/tty; \"$@\" & echo $! > {}; wait",
        pid_file.display()
    );
    let mut command = util::serve_command(
        &["setsid", "--ctty", "sh", "-c", &script, "sh"],
        Path::new(FORKSERVER),
        &socket,
        dir.path(),
    );
    command
        .args(["--group", "nogroup", "--allow-uid", "nobody"])
        .args(args)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()));
    let server = Server::adopt(command.spawn().unwrap(), dir, socket);
    util::open_to_nobody(&server);
    ServerOnTerminal { server, pid_file }
}

#[test]
fn a_peer_s_child_never_reaches_the_server_s_terminal() {
    if !util::root_or_skip("hostile::a_peer_s_child_never_reaches_the_server_s_terminal") {
        return;
    }
    let (master, slave) = pty();
    let on_terminal = server_on_terminal(&slave, &[]);
    let server = &on_terminal.server;
    // The session's terminal is the pty: its leader's line arrives.
    assert!(
        read_terminal(&master, Duration::from_millis(300)).contains("on-the-terminal"),
        "the test's pty is not the server's controlling terminal"
    );
    let write_tty = "echo INJECTED > /dev/tty";
    // A peer that is not the server's user may not share its session...
    let refused = as_nobody(server, &[], &["same-session", "sh", "-c", write_tty]);
    assert!(
        refused.contains("may not start a child in the server's session"),
        "{refused}"
    );
    // ...and in a session of its own has no terminal.
    let own_session = util::cli_as_nobody(
        server,
        &server.dir.path().join("forkserver-cli"),
        "spawn",
        &["--", "sh", "-c", write_tty],
    );
    assert_ne!(own_session.status.code(), Some(0));
    // Root may share the server's session, but the server gave up the
    // terminal, so its children find none there either.
    let status = server
        .client()
        .command("sh")
        .args(["-c", write_tty])
        .new_session(false)
        .stderr(forkserver::client::Stdio::null())
        .status()
        .unwrap();
    assert_ne!(
        status.code(),
        Some(0),
        "/dev/tty opened in the server's session"
    );
    let seen = read_terminal(&master, Duration::from_millis(300));
    assert!(!seen.contains("INJECTED"), "reached the terminal: {seen:?}");
    assert!(
        server.log().contains("gave up the controlling terminal"),
        "{}",
        server.log()
    );
}

/// Finding 2: a peer's hard limits are read from /proc (prlimit on another
/// user's process needs CAP_SYS_RESOURCE, which root lacks in many
/// containers; the old check then compared with the server's own).
#[test]
fn a_peer_may_not_raise_its_own_hard_limits() {
    let Some((server, cli)) =
        server_for_nobody("hostile::a_peer_may_not_raise_its_own_hard_limits")
    else {
        return;
    };
    let prefix = ["prlimit", "--nofile=256:256", "--core=0:0", "--"];
    for limit in ["NOFILE=1024:1024", "CORE=unlimited"] {
        let output = run_as_nobody(
            &prefix,
            &cli,
            &server,
            &["spawn", "--rlimit", limit, "--", "true"],
        );
        assert_eq!(output.status.code(), Some(125), "{limit} was granted");
        assert!(
            text(&output.stderr).contains("may not raise the hard limit"),
            "{}",
            text(&output.stderr)
        );
    }
    // Within its own limits, it gets what it asks.
    let output = run_as_nobody(
        &prefix,
        &cli,
        &server,
        &[
            "spawn",
            "--rlimit",
            "NOFILE=128:256",
            "--",
            "sh",
            "-c",
            "ulimit -Hn",
        ],
    );
    assert_eq!(text(&output.stdout), "256\n", "{}", text(&output.stderr));
}

/// Finding 3: the rights are the connecting process's, read when it
/// connected; its child, left with the connection, gets no more.
#[test]
fn a_connection_handed_to_a_child_keeps_the_connecting_process_s_rights() {
    let Some((server, _)) = server_for_nobody(
        "hostile::a_connection_handed_to_a_child_keeps_the_connecting_process_s_rights",
    ) else {
        return;
    };
    let cases: [(&[&str], &str, &str); 3] = [
        (&["nice", "-n", "10"], "nice", "0"),
        (&["choom", "-n", "500", "--"], "oom_score_adj", "0"),
        (&["prlimit", "--nofile=256:256", "--"], "nofile", "1024"),
    ];
    for (prefix, control, value) in cases {
        let said = as_nobody(&server, prefix, &["handed-over", control, value]);
        assert!(
            said.starts_with("error: ") && said.contains("uid 65534 may"),
            "{control} {value} after the connecting process exited: {said}"
        );
    }
    // The same requests within the connecting process's own rights pass.
    let cases: [(&[&str], &str, &str); 3] = [
        (&["nice", "-n", "10"], "nice", "12"),
        (&["choom", "-n", "500", "--"], "oom_score_adj", "600"),
        (&["prlimit", "--nofile=256:256", "--"], "nofile", "200"),
    ];
    for (prefix, control, value) in cases {
        let said = as_nobody(&server, prefix, &["handed-over", control, value]);
        assert_eq!(said, "exit 0\n", "{control} {value}");
    }
}

/// Starts `test_peer SOCKET ARGS...` as nobody and reads its first `lines`
/// lines; it keeps what it holds until the returned child's stdin closes.
fn nobody_holding(server: &Server, args: &[&str], lines: usize) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--init-groups", "--"])
        .arg(util::peer_program(server))
        .arg(&server.socket)
        .args(args)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) must be installed");
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut said = String::new();
    for _ in 0..lines {
        reader.read_line(&mut said).unwrap();
    }
    (child, said)
}

/// Finding 4: replies queued for a connection that never reads cost the
/// server little, and the memory goes back. The old server queued 4096
/// replies of up to 64 kB per connection (256 MB), and kept much of it.
/// - `list` (10 children with 4 kB paths: 40 kB a page) asked for again
///   and again: a list's page is made only once the one before it left
///   the queue, so the queue fills with short refusals, and the
///   connection is closed at max_queued_replies.
/// - refusals quoting a 4 kB worker name: the connection is closed once
///   its uid's queued replies pass max_queued_bytes_per_uid (8 MiB).
#[test]
fn a_peer_that_never_reads_costs_the_server_little() {
    let Some((server, _)) =
        server_for_nobody("hostile::a_peer_that_never_reads_costs_the_server_little")
    else {
        return;
    };
    let before_kb = util::status_kb(server.pid(), "VmRSS:");
    let sleep = crate::replies::long_path_to_sleep(server.dir.path(), 4000);
    let (mut flooder, said) =
        nobody_holding(&server, &["flood-list", sleep.to_str().unwrap(), "10"], 2);
    assert!(said.starts_with("held 10\nclosed after "), "{said}");
    drop(flooder.stdin.take());
    flooder.wait().unwrap();
    let said = as_nobody(&server, &[], &["flood-unknown-worker"]);
    assert!(said.starts_with("closed after "), "{said}");
    assert!(
        server.log().contains("the limit max_queued_bytes_per_uid"),
        "{}",
        server.log()
    );
    let peak_kb = util::status_kb(server.pid(), "VmHWM:");
    assert!(
        peak_kb < before_kb + 32 * 1024,
        "the server grew from {before_kb} kB to {peak_kb} kB"
    );
    // The server closes the connection, then hands the memory back: the
    // client may see the close first.
    util::wait_until("the server gives the memory back", || {
        util::status_kb(server.pid(), "VmRSS:") < before_kb + 4 * 1024
    });
    assert!(server.client().command("true").status().unwrap().success());
}

/// Finding 5: one uid may hold a quarter of the server's fds
/// (max_fds_per_uid); with a peer holding all it may, another uid still
/// spawns. (The old server gave one connection 1004 of 1024 fds, and the
/// next user's spawn failed with EMFILE.)
#[test]
fn one_uid_cannot_take_the_server_s_fds() {
    if !util::root_or_skip("hostile::one_uid_cannot_take_the_server_s_fds") {
        return;
    }
    let server = util::server_nobody_may_use(&["prlimit", "--nofile=1024:1024", "--"]);
    let (mut holder, said) = nobody_holding(&server, &["hold", "2000"], 2);
    let held: usize = said
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("held "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!((200..=256).contains(&held), "{said}");
    assert!(said.contains("max_fds_per_uid"), "{said}");
    // Root, another uid, still gets children with pipes, many of them.
    let client = server.client();
    let mut children = Vec::new();
    for _ in 0..100 {
        let child = client
            .command("sleep")
            .arg("1000")
            .stdin(forkserver::client::Stdio::piped())
            .stdout(forkserver::client::Stdio::piped())
            .spawn()
            .unwrap();
        children.push(child);
    }
    for child in &mut children {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    drop(holder.stdin.take());
    holder.wait().unwrap();
}

/// Finding 7: what a child leaves behind in its process group (a helper it
/// started in the background) goes with the connection, as the child
/// would; a detached child's group stays.
#[test]
fn a_disconnect_kills_the_process_groups_of_its_children() {
    let server = Server::start();
    let helper_of = |output: &[u8]| -> u32 {
        text(output)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no pid in {:?}", text(output)))
    };
    // The child exits at once, leaving its helper; the CLI then exits 0
    // and disconnects.
    let output = server
        .cli_spawn(&["--", "sh", "-c", "sleep 1000 & echo $!; exit 0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let left_behind = helper_of(&output.stdout);
    util::wait_until("the exited child's helper is killed", || {
        !util::is_running(left_behind)
    });

    // The child still runs when its client goes: its group goes with it.
    let client = server.client();
    let mut child = client
        .command("sh")
        .args(["-c", "sleep 1000 & echo $!; wait"])
        .stdout(forkserver::client::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let helper = helper_of(line.as_bytes());
    let leader = child.id();
    drop(child);
    drop(client);
    util::wait_until("the child and its helper are killed", || {
        !util::is_running(leader) && !util::is_running(helper)
    });

    // A detached child's group is its own business.
    let pid_file = server.dir.path().join("helper.pid");
    let script = format!("sleep 1000 & echo $! > {}; wait", pid_file.display());
    let status = server
        .cli_spawn(&["--detach", "--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    util::wait_until("the detached child writes its helper's pid", || {
        fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n'))
    });
    let detached_helper = helper_of(fs::read_to_string(&pid_file).unwrap().as_bytes());
    std::thread::sleep(Duration::from_millis(200));
    assert!(util::is_running(detached_helper));
    // SAFETY: kill by pid of a process this test started (running, above).
    unsafe { libc::kill(detached_helper as i32, libc::SIGKILL) };
}

/// Finding 8, arguments: their count follows their bytes (no separate 4096
/// cap), and what passes the server's limits but not execve's says the
/// limit was the kernel's.
#[test]
fn arguments_are_bounded_by_their_bytes_and_the_kernel_s_limit_is_named() {
    let server = Server::start();
    let args: Vec<String> = (0..10_000).map(|i| format!("{i:0100}")).collect();
    let output = server
        .cli_spawn(&["--", "sh", "-c", "echo $#", "sh"])
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(text(&output.stdout), "10000\n", "{}", text(&output.stderr));
    // One string over execve's 128 KiB is the kernel's to refuse.
    let error = server
        .client()
        .command("true")
        .arg("x".repeat(200_000))
        .status()
        .unwrap_err()
        .to_string();
    assert!(error.contains("Argument list too long"), "{error}");
    assert!(error.contains("the kernel's limit"), "{error}");
}

/// Finding 8, fds: a target just under the server's soft fd limit is
/// installed (the setup's copies above it no longer run out of room).
#[test]
fn an_fd_target_just_under_the_fd_limit_is_installed() {
    // A soft limit of 1024 under this process's own hard one (which a
    // user who is not root cannot raise), so the server may raise it.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct given.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if !util::available_or_skip(
        "hostile::an_fd_target_just_under_the_fd_limit_is_installed",
        limit.rlim_max > 1100,
        "needs a hard RLIMIT_NOFILE above 1100",
    ) {
        return;
    }
    let nofile = format!("--nofile=1024:{}", limit.rlim_max);
    let server = Server::launch_in(
        util::new_dir(),
        &["prlimit", &nofile, "--"],
        Path::new(FORKSERVER),
        &[],
        &[],
    );
    let (_read, write) = std::io::pipe().unwrap();
    let write = OwnedFd::from(write);
    let pipe = util::own_fd_target(std::os::fd::AsFd::as_fd(&write));
    let output = server
        .client()
        .command("readlink")
        .arg("/proc/self/fd/1020")
        .fd(1020, write)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), pipe.to_str().unwrap());
}
