//! `forkserver spawn -t`: the child gets a terminal of its own, relayed to
//! the CLI's. Driven from a pseudo-terminal this test holds, as a person at
//! a terminal would: an interactive bash, job control, Ctrl-C to its
//! foreground job, a window resize, and the exit status.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{KillOnDrop, Server, FORKSERVER, TIMEOUT};

/// The test's end of a pseudo-terminal, and what it has read so far.
struct Terminal {
    master: File,
    seen: String,
    /// Where in `seen` the next `expect` starts looking.
    from: usize,
}

impl Terminal {
    /// A pseudo-terminal of 24 × 80: our master, and the slave for the CLI.
    fn open() -> (Terminal, OwnedFd) {
        let (mut master, mut slave) = (0, 0);
        let size = libc::winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two fds; the other pointers may be null
        // except the window size, which it reads.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty succeeded: both fds are new and ours.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let terminal = Terminal {
            master: File::from(master),
            seen: String::new(),
            from: 0,
        };
        (terminal, slave)
    }

    fn send(&mut self, text: &str) {
        self.master.write_all(text.as_bytes()).unwrap();
    }

    /// Reads until `text` appears (after what earlier expects consumed).
    #[track_caller]
    fn expect(&mut self, text: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(at) = self.seen[self.from..].find(text) {
                self.from += at + text.len();
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} on the terminal; it shows:\n{}",
                self.seen
            );
            let mut pollfd = libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pollfd, 1, 100) } == 1 {
                let mut buf = [0u8; 4096];
                match self.master.read(&mut buf) {
                    Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                    Err(e) => panic!("reading the terminal: {e}; it showed:\n{}", self.seen),
                }
            }
        }
    }

    fn resize(&self, rows: u16, cols: u16) {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize.
        assert_eq!(
            unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) },
            0
        );
    }
}

#[test]
fn an_interactive_shell_gets_a_terminal_job_control_and_ctrl_c() {
    if !crate::util::available_or_skip(
        "tty::an_interactive_shell_gets_a_terminal_job_control_and_ctrl_c",
        crate::util::have("bash"),
        "needs bash",
    ) {
        return;
    }
    let server = Server::start();
    let (mut terminal, slave) = Terminal::open();
    let stdio = |fd: &OwnedFd| Stdio::from(fd.try_clone().unwrap());
    let cli = Command::new(FORKSERVER)
        .args(["spawn", "--socket"])
        .arg(&server.socket)
        .args([
            "-t",
            "--env",
            "PS1=fs$ ",
            "--",
            "bash",
            "--norc",
            "--noprofile",
            "-i",
        ])
        .stdin(stdio(&slave))
        .stdout(stdio(&slave))
        .stderr(stdio(&slave))
        .spawn()
        .unwrap();
    drop(slave);
    let mut cli = KillOnDrop(cli);

    terminal.expect("fs$ ");
    terminal.send("tty; stty size\n");
    terminal.expect("/dev/pts/");
    terminal.expect("24 80");
    // Job control: a background job, listed.
    terminal.send("sleep 100 &\n");
    terminal.expect("fs$ ");
    terminal.send("jobs\n");
    terminal.expect("Running");
    terminal.expect("fs$ ");
    // Ctrl-C reaches the foreground job, not the CLI or the shell.
    terminal.send("sleep 100; echo interrupted-$((20+22))\n");
    std::thread::sleep(Duration::from_millis(300));
    terminal.send("\x03");
    terminal.expect("fs$ ");
    terminal.send("echo after-$((1+1))\n");
    terminal.expect("after-2");
    // A window resize reaches the child's terminal.
    terminal.resize(30, 100);
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(cli.0.id() as i32, libc::SIGWINCH) };
    std::thread::sleep(Duration::from_millis(200));
    terminal.send("stty size\n");
    terminal.expect("30 100");
    terminal.send("kill %1; exit 7\n");
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = cli.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the CLI did not end:\n{}",
            terminal.seen
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(7), "{}", terminal.seen);
    assert!(
        !terminal.seen.contains("interrupted-42"),
        "{}",
        terminal.seen
    );
}
