//! Test fixtures: a real `forkserver serve` process on a socket in a temp dir,
//! and readers of the kernel's truth under /proc.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use forkserver::client::Client;
use forkserver::protocol::{
    connect_seqpacket, decode, encode, recv_datagram, send_datagram, ClientMessage, ServerMessage,
    PROTOCOL_VERSION,
};
use tempfile::TempDir;

/// How long any wait in these tests may take before it counts as a failure.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub const FORKSERVER: &str = env!("CARGO_BIN_EXE_forkserver");

/// A `forkserver serve` process for one test. Killed and reaped on drop.
pub struct Server {
    process: Child,
    pub dir: TempDir,
    pub socket: PathBuf,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Starts `forkserver serve --socket DIR/fs.sock EXTRA_ARGS…` and waits
    /// until it accepts connections.
    #[track_caller]
    pub fn start_with(extra_args: &[&str]) -> Server {
        Server::launch(Path::new(FORKSERVER), extra_args, &[])
    }

    /// Starts `PROGRAM serve --socket DIR/fs.sock EXTRA_ARGS…` (the stock
    /// server or a zygote) with `env` added, and waits until it accepts
    /// connections.
    #[track_caller]
    pub fn launch(program: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::launch_in(new_dir(), &[], program, extra_args, env)
    }

    /// Like [`launch`](Self::launch), in a given directory and under a
    /// wrapper command (`WRAPPER… PROGRAM serve …`, e.g. prlimit or setpriv).
    #[track_caller]
    pub fn launch_in(
        dir: TempDir,
        wrapper: &[&str],
        program: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        raise_fd_limit();
        let socket = dir.path().join("fs.sock");
        let mut command = serve_command(wrapper, program, &socket, dir.path());
        let process = command
            .args(extra_args)
            .envs(env.iter().copied())
            .spawn()
            .expect("start the server");
        Server::adopt(process, dir, socket)
    }

    /// A server process started by the caller (with `serve_command`, say),
    /// once it accepts connections on `socket`.
    #[track_caller]
    pub fn adopt(process: Child, dir: TempDir, socket: PathBuf) -> Server {
        let mut server = Server {
            process,
            dir,
            socket,
        };
        server.wait_ready();
        server
    }

    /// Waits until the server serves. Its socket takes connections as soon
    /// as it listens, before its event loop and first generation exist (and
    /// with them fds a test's baseline of the server's fds must hold): so
    /// then for the "listening on" line, logged once they do (unless the
    /// server was started quiet, `-q`, and does not log it).
    #[track_caller]
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        // Connected to once only: each connection made before the event
        // loop runs waits in the backlog, and counts against the uid's
        // connections once accepted.
        let mut listening = false;
        loop {
            listening = listening || connect_seqpacket(&self.socket).is_ok();
            if listening && (self.quiet() || self.log().contains("listening on")) {
                return;
            }
            if let Some(status) = self.process.try_wait().unwrap() {
                panic!("server exited at start with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "server not ready: {}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the server was started with `-q`/`--quiet` (it then does not
    /// log "listening on").
    fn quiet(&self) -> bool {
        fs::read(format!("/proc/{}/cmdline", self.pid())).map_or(true, |cmdline| {
            cmdline
                .split(|&b| b == 0)
                .any(|arg| arg == b"-q" || arg == b"--quiet" || arg == b"-qq")
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket).expect("connect to the test server")
    }

    /// What the server wrote to stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// `forkserver spawn --socket … ARGS…`, ready to run.
    pub fn cli_spawn(&self, args: &[&str]) -> Command {
        let mut command = Command::new(FORKSERVER);
        command
            .arg("spawn")
            .arg("--socket")
            .arg(&self.socket)
            .args(args);
        command
    }

    /// What `forkserver status --socket …` prints about the server.
    pub fn cli_status_text(&self) -> String {
        let output = Command::new(FORKSERVER)
            .args(["status", "--socket"])
            .arg(&self.socket)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Sends `signal` to the server process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on our own unreaped child's pid.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, signal) }, 0);
    }

    /// Waits for the server to exit, within TIMEOUT.
    #[track_caller]
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit: {}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    /// SIGTERM first, so the server kills the children a test left running
    /// (an orphan would hold the test runner's output pipes open); SIGKILL if
    /// it does not stop in time.
    fn drop(&mut self) {
        // SAFETY: kill on our own unreaped child's pid.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(self.process.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A child process that is killed and reaped when the test ends, even by a
/// failed assertion (a stray server would hold the test runner's pipes open).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts another `forkserver serve` on `server`'s socket (the first one
/// is gone: killed and reaped), in its directory; returns once it answers.
pub fn restart_on(server: &Server) -> KillOnDrop {
    let second = KillOnDrop(
        serve_command(
            &[],
            Path::new(FORKSERVER),
            &server.socket,
            server.dir.path(),
        )
        .spawn()
        .unwrap(),
    );
    wait_until("the new server answers", || {
        forkserver::protocol::connect_seqpacket(&server.socket).is_ok()
    });
    second
}

/// Waits (within TIMEOUT) until `fd` is readable: for a pidfd, until its
/// process has exited.
#[track_caller]
pub fn wait_readable(fd: std::os::fd::BorrowedFd<'_>) {
    let mut poll = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd of ours.
    let ready = unsafe { libc::poll(&mut poll, 1, TIMEOUT.as_millis() as i32) };
    assert_eq!(ready, 1, "not readable within {TIMEOUT:?}");
}

/// Lets user nobody reach `server`: opens its directory for traversal and
/// copies the CLI there (the build tree may be closed to others). Returns the
/// copy. The socket's own mode must admit nobody too (`--group nogroup`).
pub fn open_to_nobody(server: &Server) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(server.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let cli = server.dir.path().join("forkserver-cli");
    fs::copy(FORKSERVER, &cli).unwrap();
    fs::set_permissions(&cli, fs::Permissions::from_mode(0o755)).unwrap();
    cli
}

/// Runs `CLI COMMAND --socket S ARGS…` as user nobody (setpriv(1)).
pub fn cli_as_nobody(
    server: &Server,
    cli: &Path,
    command: &str,
    args: &[&str],
) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--init-groups", "--"])
        .arg(cli)
        .arg(command)
        .arg("--socket")
        .arg(&server.socket)
        .args(args)
        .current_dir("/")
        .output()
        .expect("setpriv (util-linux) must be installed")
}

/// Whether a test that needs `what` (root, a program, a package) may run:
/// true if `available`. Otherwise the test is skipped — it says so on
/// stderr and in `$FORKSERVER_SKIP_LOG` (tests/all.sh counts the lines) —
/// unless `$FORKSERVER_NO_SKIP` is set (CI sets it: there, nothing may be
/// skipped), which fails the test instead.
#[track_caller]
pub fn available_or_skip(test: &str, available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    assert!(
        std::env::var_os("FORKSERVER_NO_SKIP").is_none(),
        "{test}: skipped: {what} (FORKSERVER_NO_SKIP is set)"
    );
    skip(test, what)
}

/// Like [`available_or_skip`], for what the machine kind itself lacks
/// (CI's too): skipped, saying why, even under `FORKSERVER_NO_SKIP`.
pub fn kernel_has_or_skip(test: &str, available: bool, what: &str) -> bool {
    available || skip(test, what)
}

/// Records a skipped test; false.
fn skip(test: &str, what: &str) -> bool {
    let line = format!("{test}: skipped: {what}");
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("FORKSERVER_SKIP_LOG") {
        use std::io::Write;
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        writeln!(file, "{line}").unwrap();
    }
    false
}

/// [`available_or_skip`] for a test that needs root (to switch users, or
/// to lift limits that bind everyone else).
#[track_caller]
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    available_or_skip(
        test,
        root,
        "needs root (it switches users or sets limits); CI runs it as root",
    )
}

/// Whether `program` is on PATH, for [`available_or_skip`].
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Raises this process's soft fd limit to its hard limit, once: the tests
/// hold thousands of pidfds and pipes at once (the 5,000-children test, the
/// soak), and servers they start inherit the limit. A login's soft limit is
/// often 1024.
pub fn raise_fd_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write the struct given.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    });
}

/// A fresh temp dir for a test's server.
pub fn new_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("fs-test")
        .tempdir()
        .unwrap()
}

/// `[WRAPPER…] PROGRAM serve --socket SOCKET` with stderr going to
/// DIR/server.log.
pub fn serve_command(wrapper: &[&str], program: &Path, socket: &Path, dir: &Path) -> Command {
    let log = fs::File::create(dir.join("server.log")).unwrap();
    let mut command = match wrapper.split_first() {
        None => Command::new(program),
        Some((first, rest)) => {
            let mut command = Command::new(first);
            command.args(rest).arg(program);
            command
        }
    };
    command
        .arg("serve")
        .arg("--socket")
        .arg(socket)
        .env("FORKSERVER_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    command
}

/// Runs `PROGRAM serve --socket TMP/fs.sock ARGS…` with `env` added, for a
/// start that is expected to fail: returns its exit status and stderr.
pub fn failed_start(program: &Path, args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(program)
        .arg("serve")
        .arg("--socket")
        .arg(dir.path().join("fs.sock"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success(), "the server started: {output:?}");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// An example program built by `cargo test` (target/…/examples/NAME).
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} was not built; run the tests with cargo test",
        path.display()
    );
    path
}

/// Smaps totals of a process in kB: (Rss, Pss), from /proc/PID/smaps_rollup.
pub fn rss_and_pss_kb(pid: u32) -> (u64, u64) {
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let field = |name: &str| -> u64 {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in smaps_rollup"))
    };
    (field("Rss:"), field("Pss:"))
}

/// Polls `done` until it returns true, failing the test after TIMEOUT.
#[track_caller]
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// The open fd numbers of a process, from /proc/PID/fd.
pub fn fds_of(pid: u32) -> Vec<i32> {
    let mut fds: Vec<i32> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    fds.sort_unstable();
    fds
}

/// Every open fd of a process with what it refers to.
pub fn fd_table(pid: u32) -> Vec<(i32, PathBuf)> {
    fds_of(pid)
        .into_iter()
        .filter_map(|fd| Some((fd, fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?)))
        .collect()
}

/// Waits until every fd `pid` has open was already open (to the same file)
/// in `baseline`: nothing leaked. Fails with both tables after TIMEOUT.
#[track_caller]
pub fn assert_no_new_fds(pid: u32, baseline: &[(i32, PathBuf)]) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let now = fd_table(pid);
        if now.iter().all(|entry| baseline.contains(entry)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fds of {pid} did not return to baseline\nbaseline: {baseline:?}\nnow: {now:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// What fd `fd` of process `pid` refers to (e.g. `pipe:[1234]`).
pub fn fd_target(pid: u32, fd: i32) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap()
}

/// Our own fd's target.
pub fn own_fd_target(fd: BorrowedFd<'_>) -> PathBuf {
    fd_target(std::process::id(), fd.as_raw_fd())
}

/// The state letter of a process (R, S, Z…) from /proc/PID/stat, or None if
/// it no longer exists.
pub fn state_of(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The comm field may hold spaces and parentheses; the state follows the
    // last ')'.
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// A process's name (`comm`), or None if it no longer exists.
pub fn comm_of(pid: u32) -> Option<String> {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end().to_owned())
}

/// The parent pid of a process, from /proc/PID/stat.
fn ppid_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()
}

/// Every child process of `parent`, sorted.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut children: Vec<u32> = fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| ppid_of(pid) == Some(parent))
        .collect();
    children.sort_unstable();
    children
}

/// Children of `parent` that are zombies (state Z).
/// One datagram from `socket` (a notify socket with a read timeout). A
/// socket read with a timeout is not restarted after a signal handler runs,
/// even one installed with SA_RESTART (signal(7)), and this test process
/// has handlers (glibc's own, for its internal signals, at least): CI saw
/// `EINTR` here. An interrupted read is tried again, not taken for the
/// timeout.
pub fn recv_notification(
    socket: &std::os::unix::net::UnixDatagram,
    buf: &mut [u8],
) -> io::Result<usize> {
    loop {
        match socket.recv(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The server's zygote (the child that preloads and forks its workers and
/// pool children), if it has one.
pub fn zygote_of(server: &Server) -> Option<u32> {
    children_of(server.pid())
        .into_iter()
        .find(|&pid| comm_of(pid).as_deref() == Some("zygote"))
}

/// The server's children but its zygote: the children it made.
pub fn made_children_of(server: &Server) -> Vec<u32> {
    let zygote = zygote_of(server);
    children_of(server.pid())
        .into_iter()
        .filter(|&pid| Some(pid) != zygote)
        .collect()
}

pub fn zombie_children_of(parent: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| ppid_of(pid) == Some(parent) && state_of(pid) == Some('Z'))
        .collect()
}

/// The `Threads:` line of /proc/PID/status.
pub fn threads_of(pid: u32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// True while `pid` exists and is not a zombie.
pub fn is_running(pid: u32) -> bool {
    matches!(state_of(pid), Some(state) if state != 'Z')
}

/// A raw protocol connection, for speaking to the server without the client
/// library (and sending what it never would).
pub struct RawConnection {
    pub socket: OwnedFd,
}

impl RawConnection {
    pub fn connect(server: &Server) -> RawConnection {
        let socket = connect_seqpacket(&server.socket).unwrap();
        let timeout = libc::timeval {
            tv_sec: TIMEOUT.as_secs() as _,
            tv_usec: 0,
        };
        // SAFETY: setting a receive timeout on our own socket.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(rc, 0);
        RawConnection { socket }
    }

    /// Connects and completes the handshake.
    pub fn greeted(server: &Server) -> RawConnection {
        let conn = RawConnection::connect(server);
        conn.send(
            &ClientMessage::Hello {
                protocol: PROTOCOL_VERSION,
                client: "raw-test".into(),
            },
            &[],
        );
        match conn.recv() {
            Some((ServerMessage::Welcome { .. }, _)) => conn,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    pub fn send(&self, message: &ClientMessage, fds: &[BorrowedFd<'_>]) {
        self.send_bytes(&encode(message).unwrap(), fds);
    }

    pub fn send_bytes(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        send_datagram(self.socket.as_fd(), bytes, fds, 0).unwrap();
    }

    /// The next message, or None at EOF. Fails the test on a timeout.
    #[track_caller]
    pub fn recv(&self) -> Option<(ServerMessage, Vec<OwnedFd>)> {
        match recv_datagram(self.socket.as_fd(), 1 << 20, 16, 0) {
            Ok(Some(d)) => Some((decode(&d.bytes).unwrap(), d.fds)),
            Ok(None) => None,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => panic!("no reply within TIMEOUT"),
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => None,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Copies the example `test_peer` where nobody can run it (beside the
/// server's socket, whose directory `open_to_nobody` opened).
pub fn peer_program(server: &Server) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let copy = server.dir.path().join("test_peer");
    fs::copy(example("test_peer"), &copy).unwrap();
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// A field of /proc/PID/status in kB (VmRSS, VmHWM).
pub fn status_kb(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap()
}

/// A server (under `wrapper`: prlimit, say) that user nobody may use: the
/// socket given to group nogroup, uid nobody allowed, its directory opened
/// for nobody to traverse.
pub fn server_nobody_may_use(wrapper: &[&str]) -> Server {
    let server = Server::launch_in(
        new_dir(),
        wrapper,
        Path::new(FORKSERVER),
        &["--group", "nogroup", "--allow-uid", "nobody"],
        &[],
    );
    open_to_nobody(&server);
    server
}
