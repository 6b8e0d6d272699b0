//! The benchmark harness: every measurement side by side in one run, medians
//! and p90s, printed as a table and written as JSON.
//!
//! ```sh
//! cargo bench --bench harness            # ~2 minutes; FS_BENCH_QUICK=1 for a smoke run
//! ```
//!
//! This binary plays three roles (chosen by FS_BENCH_ROLE): the harness, a
//! zygote with a preload of FS_BENCH_MB megabytes, and the "cold" program
//! that builds the same preload itself, as a freshly exec'd process must.
//! The harness forks in its own process only while it is single-threaded.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::process::{Child as OsChild, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkserver::client::tokio::AsyncClient;
use forkserver::client::{Client, Stdio as FsStdio};
use forkserver::protocol::{
    connect_seqpacket, listen_seqpacket, recv_datagram, send_datagram, seqpacket_pair,
};
use forkserver::server::{HugePages, Server};

fn env_usize(name: &str) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The preload: `mb` megabytes, every page written, in ordinary or huge pages.
enum Table {
    Plain(#[allow(dead_code)] Vec<u8>),
    Huge(#[allow(dead_code)] HugePages),
}

fn build_table(mb: usize, huge: bool) -> Table {
    let len = mb << 20;
    if huge {
        let mut pages = HugePages::zeroed(len).expect("map huge pages");
        pages.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        Table::Huge(pages)
    } else {
        Table::Plain((0..len).map(|i| i as u8).collect())
    }
}

fn main() {
    match std::env::var("FS_BENCH_ROLE").as_deref() {
        Ok("zygote") => zygote(),
        Ok("cold") => cold(),
        _ => harness(),
    }
}

fn zygote() {
    let (mb, huge) = (env_usize("FS_BENCH_MB"), env_usize("FS_BENCH_HUGE") == 1);
    let code = Server::builder()
        .pool("first_byte", env_usize("FS_BENCH_POOL") as u32)
        .preload("table", move || build_table(mb, huge))
        // Writes a byte, then lives until its stdin closes: a worker that
        // exited at once would tear down its copy of the preload's page
        // tables (3 ms at 512 MB, in the kernel, not preemptible here) on the
        // CPU the client was woken on, delaying the client's read of
        // `Spawned` (seen in a sched trace), which is not what a spawn costs.
        .worker("first_byte", |_| {
            let mut out = std::io::stdout().lock();
            let written = out.write_all(b"!").and_then(|()| out.flush());
            let _ = std::io::stdin().read(&mut [0u8; 1]);
            written.map_or(1, |()| 0)
        })
        .worker("idle", |_| {
            let _ = std::io::stdin().read(&mut [0u8; 1]);
            0
        })
        .worker("exit0", |_| 0)
        .run();
    std::process::exit(if code == std::process::ExitCode::SUCCESS {
        0
    } else {
        1
    });
}

fn cold() {
    let _table = build_table(env_usize("FS_BENCH_MB"), false);
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(b"!").and_then(|()| out.flush());
    if env_usize("FS_BENCH_IDLE") == 1 {
        let _ = std::io::stdin().read(&mut [0u8; 1]);
    }
}

/// How the server's zygote makes its children the server's: one clone3
/// (glibc, no tolerated thread), or forked twice and adopted (musl, a
/// server tolerating threads; `FORKSERVER_SIBLING_FORK=0`).
#[derive(Clone, Copy, PartialEq)]
enum Fork {
    Clone,
    Adopted,
}

/// One row of the report.
#[derive(serde::Serialize)]
struct Row {
    group: &'static str,
    name: String,
    median_us: f64,
    p90_us: f64,
    runs: usize,
    unit: &'static str,
}

struct Report {
    rows: Vec<Row>,
    quick: bool,
}

impl Report {
    fn runs(&self, full: usize) -> usize {
        if self.quick {
            (full / 10).max(3)
        } else {
            full
        }
    }

    /// Times `once` `runs` times after a few warm-up calls.
    fn time(&mut self, group: &'static str, name: String, runs: usize, mut once: impl FnMut()) {
        for _ in 0..(runs / 10).max(1) {
            once();
        }
        let mut samples: Vec<f64> = (0..runs)
            .map(|_| {
                let start = Instant::now();
                once();
                start.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        self.add_samples(group, name, &mut samples, "µs");
    }

    fn add_samples(
        &mut self,
        group: &'static str,
        name: String,
        samples: &mut [f64],
        unit: &'static str,
    ) {
        samples.sort_by(f64::total_cmp);
        let row = Row {
            group,
            name,
            median_us: samples[samples.len() / 2],
            p90_us: samples[(samples.len() * 9 / 10).min(samples.len() - 1)],
            runs: samples.len(),
            unit,
        };
        eprintln!(
            "  {:<58} {:>12.1} {:>12.1} {}",
            row.name, row.median_us, row.p90_us, unit
        );
        self.rows.push(row);
    }

    fn median(&self, name: &str) -> f64 {
        self.rows
            .iter()
            .find(|r| r.name == name)
            .map_or(f64::NAN, |r| r.median_us)
    }
}

/// A server process for the harness, stopped on drop.
struct Running {
    process: OsChild,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start(program: &std::path::Path, env: &[(&str, String)]) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("bench.sock");
        let mut process = Command::new(program)
            .args([
                "serve",
                "-q",
                "--ready-fd",
                "1",
                "--limit",
                "max_connections_per_uid=256",
                "--socket",
            ])
            .arg(&socket)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a server");
        let mut line = String::new();
        BufReader::new(process.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("ready"), "server not ready: {line:?}");
        Running {
            process,
            socket,
            _dir: dir,
        }
    }

    fn zygote(mb: usize, huge: bool) -> Running {
        Running::zygote_with_pool(mb, huge, 0, Fork::Clone)
    }

    /// A zygote keeping `pool` idle children for worker `first_byte`,
    /// forking its children the way `fork` says.
    fn zygote_with_pool(mb: usize, huge: bool, pool: usize, fork: Fork) -> Running {
        let me = std::env::current_exe().unwrap();
        let mut env = vec![
            ("FS_BENCH_ROLE", "zygote".to_string()),
            ("FS_BENCH_MB", mb.to_string()),
            ("FS_BENCH_HUGE", (huge as u8).to_string()),
            ("FS_BENCH_POOL", pool.to_string()),
        ];
        if fork == Fork::Adopted {
            env.push(("FORKSERVER_SIBLING_FORK", "0".to_string()));
        }
        Running::start(&me, &env)
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket).unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.process.id() as i32, libc::SIGTERM) };
        let _ = self.process.wait();
    }
}

/// fork + _exit + waitpid in this process: the physical floor.
fn raw_fork() {
    // SAFETY: the harness is single-threaded whenever it calls this; the
    // child only calls _exit.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::_exit(0);
        }
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// fork + execve(/bin/true) + waitpid from this process.
fn fork_exec_true() {
    let path = c"/bin/true";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: the child calls only execve and _exit (async-signal-safe), on
    // data built before the fork, so other threads cannot deadlock it.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// Starts this binary as a cold process that builds an `mb` MB preload
/// itself, and returns once it has written its first byte. With `idle` it
/// then waits for its stdin to close.
fn start_cold(mb: usize, idle: bool) -> OsChild {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("FS_BENCH_ROLE", "cold")
        .env("FS_BENCH_MB", mb.to_string())
        .env("FS_BENCH_IDLE", (idle as u8).to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.as_mut().unwrap();
    stdout.read_exact(&mut [0u8; 1]).unwrap();
    child
}

/// `/bin/true` spawned to exit three ways from this process as it is now:
/// through the server, with std::process::Command, and with fork+exec.
fn exec_rows(report: &mut Report, client: &Client, client_kind: &str, runs: usize) {
    report.time(
        "exec",
        format!("/bin/true via forkserver ({client_kind})"),
        runs,
        || {
            client.command("/bin/true").status().unwrap();
        },
    );
    report.time(
        "exec",
        format!("/bin/true via std::process::Command ({client_kind})"),
        runs,
        || {
            Command::new("/bin/true").status().unwrap();
        },
    );
    report.time(
        "exec",
        format!("/bin/true via fork+exec ({client_kind})"),
        runs,
        fork_exec_true,
    );
}

/// How many spawns are in flight at once in the async throughput rows.
const IN_FLIGHT: usize = 32;

/// `/bin/true` spawn+exit cycles per second with [`IN_FLIGHT`] at once:
/// through the async client (one connection), through the blocking client
/// (one connection, a thread each), and with tokio::process::Command. The
/// runtime is gone (its threads joined) before the harness forks again.
fn async_throughput_rows(report: &mut Report, stock: &Running, duration: Duration) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let count = |name: &str, cycles: &AtomicU64, start: Instant, report: &mut Report| {
        let per_second = cycles.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        report.add_samples(
            "throughput",
            format!("/bin/true spawn+exit, {IN_FLIGHT} in flight: {name}"),
            &mut [per_second],
            "cycles/s",
        );
    };
    let cycles = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    runtime.block_on(async {
        let client = AsyncClient::connect(&stock.socket).await.unwrap();
        let tasks: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                let (client, cycles) = (client.clone(), cycles.clone());
                tokio::spawn(async move {
                    while start.elapsed() < duration {
                        client.command("/bin/true").status().await.unwrap();
                        cycles.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    count("async client, one connection", &cycles, start, report);

    let cycles = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                let cycles = cycles.clone();
                tokio::spawn(async move {
                    while start.elapsed() < duration {
                        tokio::process::Command::new("/bin/true")
                            .status()
                            .await
                            .unwrap();
                        cycles.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    count("tokio::process::Command", &cycles, start, report);
    drop(runtime);

    let cycles = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let client = stock.client();
    let threads: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (client, cycles) = (client.clone(), cycles.clone());
            std::thread::spawn(move || {
                while start.elapsed() < duration {
                    client.command("/bin/true").status().unwrap();
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    count(
        "blocking client, one connection, a thread each",
        &cycles,
        start,
        report,
    );
}

/// Sends every datagram received on `socket` back, fds included, until EOF.
fn echo(socket: BorrowedFd<'_>) {
    while let Ok(Some(request)) = recv_datagram(socket, 256, 8, 0) {
        let fds: Vec<_> = request.fds.iter().map(|fd| fd.as_fd()).collect();
        if send_datagram(socket, &request.bytes, &fds, 0).is_err() {
            break;
        }
    }
}

/// One request (100 bytes) and its reply, 3 fds each way.
fn round_trip(socket: BorrowedFd<'_>, fds: &[BorrowedFd<'_>]) {
    send_datagram(socket, &[0u8; 100], fds, 0).unwrap();
    let reply = recv_datagram(socket, 256, 8, 0).unwrap().unwrap();
    assert_eq!(reply.fds.len(), 3);
}

/// Forks a child that closes its copy of `parents_end` (so that the
/// parent's close is EOF for the peer), runs `in_child` and exits.
fn fork_running(parents_end: &OwnedFd, in_child: impl FnOnce()) -> libc::pid_t {
    let parents_end = parents_end.as_raw_fd();
    // SAFETY: the harness is single-threaded whenever it calls this (the
    // round-trip thread has been joined); the child closes its own copy of
    // an fd, runs `in_child`, which only allocates and does socket I/O,
    // then _exits (1 on a panic, which must not unwind into the harness's
    // code in a copy of the harness).
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::close(parents_end);
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(in_child));
            libc::_exit(if ran.is_ok() { 0 } else { 1 });
        }
        assert!(pid > 0, "fork failed");
        pid
    }
}

fn reap(pid: libc::pid_t) {
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
}

/// A SEQPACKET request and reply carrying 3 fds each way, with a thread as
/// the peer, then with a child process (the server, its pool children and
/// its clients are processes: a pooled spawn cannot go below this).
fn seqpacket_round_trips(report: &mut Report) {
    let (read_end, write_end) = std::io::pipe().unwrap();
    let fds = [read_end.as_fd(), write_end.as_fd(), read_end.as_fd()];
    let runs = report.runs(2000);

    let (ours, theirs) = seqpacket_pair().unwrap();
    let peer = std::thread::spawn(move || echo(theirs.as_fd()));
    report.time(
        "ipc",
        "SEQPACKET round trip, 3 fds each way".into(),
        runs,
        || round_trip(ours.as_fd(), &fds),
    );
    drop(ours);
    peer.join().unwrap();

    let (ours, theirs) = seqpacket_pair().unwrap();
    let peer = fork_running(&ours, || echo(theirs.as_fd()));
    drop(theirs);
    report.time(
        "ipc",
        "SEQPACKET round trip, 3 fds each way, process peer".into(),
        runs,
        || round_trip(ours.as_fd(), &fds),
    );
    drop(ours);
    reap(peer);
}

/// The floor of a pool hit in this design, with no work anywhere: the
/// request goes client -> relay -> a pre-forked child that has waited,
/// unused, since its fork -> relay -> client, 3 fds each way. That is four
/// one-way hops between three processes, and the child's first run of the
/// path after its fork. As the server does, the relay forks the next child
/// after a hit and the client starts timing once it waits.
fn hand_off_floor(report: &mut Report) {
    let (client, relay_end) = seqpacket_pair().unwrap();
    let relay = fork_running(&client, || {
        let relay = relay_end.as_fd();
        loop {
            let (ours, theirs) = seqpacket_pair().unwrap();
            let child = fork_running(&ours, || {
                // Ready, then serve one request and wait for EOF, as a
                // worker that lives on.
                send_datagram(theirs.as_fd(), b"r", &[], 0).unwrap();
                echo(theirs.as_fd());
            });
            drop(theirs);
            let ready = recv_datagram(ours.as_fd(), 8, 0, 0);
            let forwarded = ready.is_ok_and(|r| r.is_some())
                && send_datagram(relay, b"r", &[], 0).is_ok()
                && forward(relay, ours.as_fd())
                && forward(ours.as_fd(), relay)
                // The client's "done" (EOF when it has finished).
                && recv_datagram(relay, 8, 0, 0).is_ok_and(|d| d.is_some());
            drop(ours);
            reap(child);
            if !forwarded {
                return;
            }
        }
    });
    drop(relay_end);
    let (read_end, write_end) = std::io::pipe().unwrap();
    let fds = [read_end.as_fd(), write_end.as_fd(), read_end.as_fd()];
    let runs = report.runs(300);
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + runs / 10 {
        recv_datagram(client.as_fd(), 8, 0, 0).unwrap().unwrap();
        let start = Instant::now();
        round_trip(client.as_fd(), &fds);
        let took = start.elapsed().as_secs_f64() * 1e6;
        send_datagram(client.as_fd(), b"d", &[], 0).unwrap();
        if i >= runs / 10 {
            samples.push(took);
        }
    }
    report.add_samples(
        "ipc",
        "hand-off floor: client -> relay -> fresh pre-forked child -> relay -> client".into(),
        &mut samples,
        "µs",
    );
    drop(client);
    reap(relay);
}

/// The floor of the other hand-off shape, Android's USAP: a pre-forked child
/// blocks in `accept` on a pool socket of its own; the client connects,
/// sends its request (3 fds) and reads the reply (3 fds) from the child
/// directly. Two hops and a connect; the server is not on the path.
fn usap_floor(report: &mut Report) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.sock");
    let listener = listen_seqpacket(&path, 16).unwrap();
    // The children block in accept (the listener is non-blocking, for epoll).
    // SAFETY: fcntl on a socket we own, flags from F_GETFL.
    unsafe {
        let flags = libc::fcntl(listener.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(
            listener.as_raw_fd(),
            libc::F_SETFL,
            flags & !libc::O_NONBLOCK,
        );
    }
    let (read_end, write_end) = std::io::pipe().unwrap();
    let fds = [read_end.as_fd(), write_end.as_fd(), read_end.as_fd()];
    let runs = report.runs(300);
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + runs / 10 {
        let (ready, ready_in_child) = seqpacket_pair().unwrap();
        let child = fork_running(&ready, || {
            send_datagram(ready_in_child.as_fd(), b"r", &[], 0).unwrap();
            // SAFETY: accept on the listener this child inherited; the fd it
            // returns is ours to own.
            let connection = unsafe {
                let fd = libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                );
                assert!(fd >= 0, "accept failed");
                OwnedFd::from_raw_fd(fd)
            };
            // Serve the request, then live until the client hangs up.
            echo(connection.as_fd());
        });
        drop(ready_in_child);
        recv_datagram(ready.as_fd(), 8, 0, 0).unwrap().unwrap();
        let start = Instant::now();
        let connection = connect_seqpacket(&path).unwrap();
        round_trip(connection.as_fd(), &fds);
        let took = start.elapsed().as_secs_f64() * 1e6;
        drop(connection);
        reap(child);
        if i >= runs / 10 {
            samples.push(took);
        }
    }
    report.add_samples(
        "ipc",
        "USAP-shaped floor: connect to a fresh pre-forked child blocked in accept".into(),
        &mut samples,
        "µs",
    );
}

/// Receives one datagram on `from` and sends it on `to`, fds included.
fn forward(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> bool {
    let Ok(Some(message)) = recv_datagram(from, 256, 8, 0) else {
        return false;
    };
    let fds: Vec<_> = message.fds.iter().map(|fd| fd.as_fd()).collect();
    send_datagram(to, &message.bytes, &fds, 0).is_ok()
}

fn pss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn harness() {
    let quick = std::env::var_os("FS_BENCH_QUICK").is_some();
    let mut report = Report {
        rows: Vec::new(),
        quick,
    };
    eprintln!("{:<60} {:>12} {:>12}", "measurement", "median", "p90");

    // 1. Worker spawn latency against raw fork and a cold start.
    let n = report.runs(300);
    report.time(
        "worker",
        "raw fork+_exit+waitpid (bench process, small)".into(),
        n,
        raw_fork,
    );
    for mb in [0usize, 64, 512] {
        for (pool, fork) in [(0usize, Fork::Clone), (0, Fork::Adopted), (4, Fork::Clone)] {
            let zygote = Running::zygote_with_pool(mb, false, pool, fork);
            let client = zygote.client();
            let via = match (pool, fork) {
                (0, Fork::Clone) => "worker",
                (0, Fork::Adopted) => "worker (adopted: forked twice)",
                _ => "pooled worker",
            };
            let runs = report.runs(if mb >= 512 { 60 } else { 200 });
            let mut to_spawned = Vec::with_capacity(runs);
            let mut to_byte = Vec::with_capacity(runs);
            for i in 0..runs + runs / 10 {
                // With a pool, measure a hit: wait until it is full again (the
                // refill runs when the server is idle) and every child has
                // warmed up (one still warming up would compete for a CPU
                // with the hit).
                while pool > 0 && client.status().unwrap().pools[0].ready < pool as u32 {
                    std::thread::sleep(Duration::from_micros(200));
                }
                let start = Instant::now();
                let mut child = client
                    .worker("first_byte")
                    .stdin(FsStdio::piped())
                    .stdout(FsStdio::piped())
                    .spawn()
                    .unwrap();
                let spawned = start.elapsed();
                child
                    .stdout
                    .as_mut()
                    .unwrap()
                    .read_exact(&mut [0u8; 1])
                    .unwrap();
                let byte = start.elapsed();
                drop(child.stdin.take());
                child.wait().unwrap();
                if i >= runs / 10 {
                    to_spawned.push(spawned.as_secs_f64() * 1e6);
                    to_byte.push(byte.as_secs_f64() * 1e6);
                }
            }
            report.add_samples(
                "worker",
                format!("{via}, {mb} MB preload: request -> Spawned"),
                &mut to_spawned,
                "µs",
            );
            report.add_samples(
                "worker",
                format!("{via}, {mb} MB preload: request -> first byte"),
                &mut to_byte,
                "µs",
            );
        }
        let cold_runs = report.runs(if mb >= 512 { 10 } else { 40 });
        report.time(
            "worker",
            format!("Command of a cold start, {mb} MB preload -> first byte"),
            cold_runs,
            || {
                start_cold(mb, false).wait().unwrap();
            },
        );
    }

    // Part R: worker spawns while the server reloads without pause (a new
    // generation preloading 64 MB all the while, then taking over) vs
    // steady. The front serves on from the old generation meanwhile.
    {
        let zygote = Running::zygote(64, false);
        for reloading in [false, true] {
            let stop = Arc::new(AtomicBool::new(false));
            let reloader = reloading.then(|| {
                let (socket, stop) = (zygote.socket.clone(), stop.clone());
                std::thread::spawn(move || {
                    let client = Client::connect(&socket).unwrap();
                    let mut reloads = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        client.reload().expect("a reload");
                        reloads += 1;
                    }
                    reloads
                })
            });
            let client = zygote.client();
            let runs = report.runs(400);
            let mut samples: Vec<f64> = (0..runs)
                .map(|_| {
                    let start = Instant::now();
                    client.worker("exit0").status().unwrap();
                    start.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            stop.store(true, Ordering::Relaxed);
            let reloads = reloader.map(|t| t.join().unwrap());
            samples.sort_by(f64::total_cmp);
            let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
            let during = match reloads {
                Some(n) => format!("while reloading ({n} reloads)"),
                None => "steady".into(),
            };
            eprintln!("  (p99 {p99:.1} µs {during})");
            let name = if reloading {
                "worker, 64 MB preload -> exit, while reloading"
            } else {
                "worker, 64 MB preload -> exit, steady"
            };
            report.add_samples("reload", name.into(), &mut samples, "µs");
        }
    }

    // Part C: fork cost at 512 MB, ordinary vs huge pages.
    for huge in [false, true] {
        let table = build_table(512, huge);
        let kind = if huge { "huge pages" } else { "4 KiB pages" };
        report.time(
            "fork",
            format!("raw fork, 512 MB touched in {kind}"),
            report.runs(40),
            raw_fork,
        );
        drop(table);
        let zygote = Running::zygote(512, huge);
        let client = zygote.client();
        report.time(
            "fork",
            format!("worker from a 512 MB zygote in {kind}: -> exit"),
            report.runs(60),
            || {
                client.worker("exit0").status().unwrap();
            },
        );
    }

    // 2. Exec latency: through the server vs from this process, small and big.
    let stock = Running::start(std::path::Path::new(env!("CARGO_BIN_EXE_forkserver")), &[]);
    let client = stock.client();
    let n = report.runs(300);
    exec_rows(&mut report, &client, "small client", n);
    {
        // The same exec asked of a zygote holding a 512 MB preload: a fork
        // of it would copy the page tables of all 512 MB.
        let zygote = Running::zygote(512, false);
        let client = zygote.client();
        report.time(
            "exec",
            "/bin/true via a 512 MB zygote (small client)".into(),
            report.runs(100),
            || {
                client.command("/bin/true").status().unwrap();
            },
        );
    }
    {
        // A big client: 4 GB touched and 8 busy threads.
        let big: Vec<u8> = (0..4usize << 30).map(|i| i as u8).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let busy: Vec<_> = (0..8)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    }
                    x
                })
            })
            .collect();
        let n = report.runs(100);
        exec_rows(&mut report, &client, "4 GB, 8 busy threads", n);
        stop.store(true, Ordering::Relaxed);
        busy.into_iter().for_each(|t| {
            t.join().unwrap();
        });
        std::hint::black_box(&big);
    }
    drop(stock);

    // 3. Throughput: spawn+exit cycles per second, N connections at once.
    let zygote = Running::zygote(0, false);
    for connections in [1usize, 2, 8, 64] {
        let cycles = Arc::new(AtomicU64::new(0));
        let duration = if quick {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(3)
        };
        let start = Instant::now();
        let threads: Vec<_> = (0..connections)
            .map(|_| {
                let (client, cycles) = (zygote.client(), cycles.clone());
                std::thread::spawn(move || {
                    while start.elapsed() < duration {
                        client.worker("exit0").status().unwrap();
                        cycles.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let per_second = cycles.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        report.add_samples(
            "throughput",
            format!("worker spawn+exit, {connections} connections"),
            &mut [per_second],
            "cycles/s",
        );
    }
    drop(zygote);

    // 3b. Exec throughput with 32 in flight: the async client on one
    // connection, the blocking client shared by 32 threads, and
    // tokio::process::Command, in the same run.
    let stock = Running::start(std::path::Path::new(env!("CARGO_BIN_EXE_forkserver")), &[]);
    let duration = if quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(3)
    };
    async_throughput_rows(&mut report, &stock, duration);
    drop(stock);

    // 4. Memory: 32 idle workers over a 256 MB preload vs 32 cold copies.
    let zygote = Running::zygote(256, false);
    let client = zygote.client();
    let mut workers: Vec<_> = (0..32)
        .map(|_| {
            client
                .worker("idle")
                .stdin(FsStdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let workers_pss: u64 = workers.iter().map(|w| pss_kb(w.id())).sum();
    for w in &mut workers {
        drop(w.stdin.take());
        w.wait().unwrap();
    }
    let mut cold: Vec<_> = (0..32).map(|_| start_cold(256, true)).collect();
    let cold_pss: u64 = cold.iter().map(|c| pss_kb(c.id())).sum();
    for c in &mut cold {
        drop(c.stdin.take());
        c.wait().unwrap();
    }
    report.add_samples(
        "memory",
        "total PSS, 32 idle workers over 256 MB preload".into(),
        &mut [workers_pss as f64 / 1024.0],
        "MB",
    );
    report.add_samples(
        "memory",
        "total PSS, 32 processes loading 256 MB each".into(),
        &mut [cold_pss as f64 / 1024.0],
        "MB",
    );
    drop(zygote);

    // The IPC floor: one request/reply with 3 fds each way, and a pool
    // hit's floor: four hops through a fresh child.
    seqpacket_round_trips(&mut report);
    hand_off_floor(&mut report);
    usap_floor(&mut report);

    print_table(&report);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report.rows).unwrap()).unwrap();
    println!("\nJSON: {}", path.display());
}

fn print_table(report: &Report) {
    println!("\n| group | measurement | median | p90 | runs |\n|---|---|---|---|---|");
    for r in &report.rows {
        println!(
            "| {} | {} | {:.1} {} | {:.1} {} | {} |",
            r.group, r.name, r.median_us, r.unit, r.p90_us, r.unit, r.runs
        );
    }
    let m = |name: &str| report.median(name);
    let fork = m("raw fork+_exit+waitpid (bench process, small)");
    println!("\nRatios (medians):");
    for mb in [0, 64, 512] {
        let spawned = m(&format!("worker, {mb} MB preload: request -> Spawned"));
        let byte = m(&format!("worker, {mb} MB preload: request -> first byte"));
        let cold = m(&format!(
            "Command of a cold start, {mb} MB preload -> first byte"
        ));
        println!(
            "- {mb} MB: worker Spawned / raw fork = {:.2}; cold start / worker first byte = {:.1}x; server overhead over raw fork = {:.0} µs",
            spawned / fork,
            cold / byte,
            spawned - fork
        );
    }
    let exec_small = m("/bin/true via forkserver (small client)");
    let exec_big = m("/bin/true via forkserver (4 GB, 8 busy threads)");
    let fork_exec_big = m("/bin/true via fork+exec (4 GB, 8 busy threads)");
    println!(
        "- exec via server: big client / small client = {:.2}; fork+exec from the big client / via server = {:.2}",
        exec_big / exec_small,
        fork_exec_big / exec_big
    );
    let ipc = m("SEQPACKET round trip, 3 fds each way, process peer");
    let floor = m("hand-off floor: client -> relay -> fresh pre-forked child -> relay -> client");
    let usap = m("USAP-shaped floor: connect to a fresh pre-forked child blocked in accept");
    println!(
        "- hand-off floor (no work) = {floor:.0} µs = {:.1}x a 3-fd SEQPACKET round trip between processes ({ipc:.1} µs); USAP-shaped floor = {usap:.0} µs = {:.1}x",
        floor / ipc,
        usap / ipc
    );
    for mb in [0, 64, 512] {
        let pooled = m(&format!(
            "pooled worker, {mb} MB preload: request -> Spawned"
        ));
        let forked = m(&format!("worker, {mb} MB preload: request -> Spawned"));
        println!(
            "- {mb} MB: pooled worker Spawned = {pooled:.0} µs ({:.1}x the round trip, {:.1}x the floor) vs forked worker {forked:.0} µs ({:.1}x faster)",
            pooled / ipc,
            pooled / floor,
            forked / pooled
        );
    }
    println!(
        "- fork at 512 MB: 4 KiB pages / huge pages = {:.1}",
        m("raw fork, 512 MB touched in 4 KiB pages") / m("raw fork, 512 MB touched in huge pages")
    );
}
