//! `forkserver spawn -t`: the child's terminal relayed to ours, as `ssh -t`
//! does. Our terminal goes into raw mode (every key, Ctrl-C included, goes
//! to the child's terminal, whose line discipline turns it into signals for
//! the child's foreground job) and is restored however we leave.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use forkserver::client::{Child, Error as ClientError};
use libc::SIGWINCH;

use crate::spawn::{poll_readable, Outcome, SignalForwarder};

/// Our stdin's terminal size (rows, columns), if it is a terminal.
pub(crate) fn size_of_stdin() -> Option<(u16, u16)> {
    window_size(io::stdin().as_fd()).map(|w| (w.ws_row, w.ws_col))
}

fn window_size(fd: BorrowedFd<'_>) -> Option<libc::winsize> {
    // SAFETY: winsize is plain data that TIOCGWINSZ fills in.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (rc == 0).then_some(size)
}

/// Our terminal in raw mode while this lives.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Raw mode on stdin, if it is a terminal.
    fn enter() -> Option<RawMode> {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: termios is plain data that tcgetattr fills in.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes a termios for our own fd.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct given; tcsetattr reads it.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(fd, libc::TCSANOW, &raw);
        }
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings tcgetattr gave us.
        unsafe { libc::tcsetattr(io::stdin().as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}

/// Relays between our terminal and the child's until the child exits;
/// forwards signals (a window size change becomes the child's terminal's
/// new size); kills the child at the deadline.
pub(crate) fn relay(
    mut child: Child,
    forwarder: &SignalForwarder,
    early: Vec<i32>,
    timeout: Option<Duration>,
) -> Result<Outcome, ClientError> {
    let master = child
        .pty
        .take()
        .expect("relay is for a child with a terminal");
    let _raw = RawMode::enter();
    let deadline = timeout.map(|t| Instant::now() + t);
    for signal in early {
        on_signal(&mut child, &master, signal)?;
    }
    let (mut stdin_open, mut master_open) = (true, true);
    let mut buf = [0u8; 8192];
    let input = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    loop {
        let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if wait == Some(Duration::ZERO) {
            child.kill()?;
            child.wait()?;
            return Ok(Outcome::TimedOut);
        }
        let mut fds = vec![child.pidfd(), forwarder.fd()];
        if master_open {
            fds.push(master.as_fd());
        }
        if stdin_open && master_open {
            fds.push(input.as_fd());
        }
        let ready = poll_readable(&fds, wait)?;
        if ready[1] {
            for signal in forwarder.take() {
                on_signal(&mut child, &master, signal)?;
            }
        }
        if master_open && ready[2] {
            master_open = copy(&master, &mut io::stdout(), &mut buf)?;
        }
        if stdin_open && master_open && ready[3] {
            stdin_open = copy(&input, &mut &master, &mut buf)?;
        }
        if ready[0] {
            // The child exited: what it wrote last is still in the terminal.
            while master_open && poll_readable(&[master.as_fd()], Some(Duration::ZERO))?[0] {
                master_open = copy(&master, &mut io::stdout(), &mut buf)?;
            }
            return Ok(Outcome::Exited(child.wait()?));
        }
    }
}

/// One read from `from`, written whole to `to`; false at end of file (for
/// a terminal's master: EIO once no process holds the other end).
fn copy(mut from: &File, to: &mut impl Write, buf: &mut [u8]) -> io::Result<bool> {
    match from.read(buf) {
        Ok(0) => Ok(false),
        Ok(n) => {
            to.write_all(&buf[..n])?;
            to.flush()?;
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(e) => Err(e),
    }
}

fn on_signal(child: &mut Child, master: &File, signal: i32) -> io::Result<()> {
    if signal == SIGWINCH {
        // The child's terminal takes our size; the kernel tells its
        // foreground job (SIGWINCH).
        if let Some(size) = window_size(io::stdin().as_fd()) {
            // SAFETY: TIOCSWINSZ reads a winsize.
            unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        }
        return Ok(());
    }
    child.signal(signal)
}
