//! [`Child`]: a running child of the server, like `std::process::Child`.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{ChildStderr, ChildStdin, ChildStdout, ExitStatus, Output};
use std::sync::Arc;

use forkserver_protocol::ServerMessage;

use crate::connection::Connection;
use crate::spawned::Spawned;
use crate::Error;

/// A child process started by the server.
///
/// Its exit status comes from the server (which is its parent and reaps it)
/// as an `Exited` event; signals go straight to the process through its
/// pidfd, so they can never reach a recycled pid. A `Child` is `Send`: it can
/// be waited from another thread, and many children of one [`Client`]
/// (crate::Client) can be waited in any order.
///
/// Dropping a `Child` does not kill it; it lives until it exits or the
/// connection closes (then it is killed unless spawned with
/// [`Command::detach`](crate::Command::detach)).
///
/// As with std's, the pipe ends are plain fields that can be moved out
/// (`child.stdout.take()`, or `child.stdout.unwrap()` on a `Child` you own).
#[derive(Debug)]
pub struct Child {
    exit: ExitWatch,
    pid: u32,
    pidfd: OwnedFd,
    /// The write end of the child's stdin, if piped.
    pub stdin: Option<ChildStdin>,
    /// The read end of the child's stdout, if piped.
    pub stdout: Option<ChildStdout>,
    /// The read end of the child's stderr, if piped.
    pub stderr: Option<ChildStderr>,
    /// The master end of the child's terminal, if it was given one
    /// ([`Command::pty`](crate::Command::pty)): what the child writes is
    /// read here, and what is written here is its input.
    pub pty: Option<std::fs::File>,
}

impl Child {
    pub(crate) fn new(connection: Arc<Connection>, id: u64, spawned: Spawned) -> Child {
        Child {
            stdin: spawned.stdin.map(ChildStdin::from),
            stdout: spawned.stdout.map(ChildStdout::from),
            stderr: spawned.stderr.map(ChildStderr::from),
            pty: spawned.pty.map(std::fs::File::from),
            exit: ExitWatch {
                connection,
                id,
                status: None,
            },
            pid: spawned.pid,
            pidfd: spawned.pidfd,
        }
    }

    /// The child's pid (in the server's pid namespace).
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// The child's pidfd: poll it for readability to learn that it exited,
    /// or pass it to `pidfd_send_signal`.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Sends SIGKILL. Ok if the child has already exited.
    pub fn kill(&mut self) -> io::Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Sends `signal` through the pidfd. Ok if the child has already exited
    /// (there is no process to signal, and no other process can be hit).
    pub fn signal(&mut self, signal: i32) -> io::Result<()> {
        if self.exit.status.is_some() {
            return Ok(());
        }
        signal_pidfd(self.pidfd.as_fd(), signal)
    }

    /// Waits for the child to exit. Closes the child's stdin first (if
    /// piped), so a child reading it sees EOF instead of both waiting.
    pub fn wait(&mut self) -> Result<ExitStatus, Error> {
        drop(self.stdin.take());
        if let Some(status) = self.exit.status {
            return Ok(status);
        }
        self.exit
            .collect(true)
            .map(|status| status.expect("a blocking wait yields a status"))
    }

    /// The exit status if the child has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        if self.exit.status.is_some() {
            return Ok(self.exit.status);
        }
        self.exit.collect(false)
    }

    /// Closes stdin, reads all of stdout and stderr (those that are piped),
    /// and waits.
    pub fn wait_with_output(mut self) -> Result<Output, Error> {
        drop(self.stdin.take());
        let (stdout, stderr) = read_both(self.stdout.take(), self.stderr.take())?;
        let status = self.wait()?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }
}

/// Where a child's exit status comes from: its `Exited` event on the
/// connection. Dropped before that arrived, it tells the connection to
/// discard the event (the child itself lives on). A field of its own so
/// that `Child` has no `Drop` and its pipe ends can be moved out.
#[derive(Debug)]
struct ExitWatch {
    connection: Arc<Connection>,
    id: u64,
    status: Option<ExitStatus>,
}

impl ExitWatch {
    fn collect(&mut self, block: bool) -> Result<Option<ExitStatus>, Error> {
        let exited = self
            .connection
            .take(self.id, block, |m| {
                matches!(m, ServerMessage::Exited { .. })
            })
            .map_err(lost)?;
        if let Some(incoming) = exited {
            if let ServerMessage::Exited { status, .. } = incoming.message {
                self.status = Some(ExitStatus::from_raw(status.into_raw()));
            }
        }
        Ok(self.status)
    }
}

/// A child's exit that cannot come: its connection ended (the server died
/// or was restarted) before the server reported it.
pub(crate) fn lost(e: Error) -> Error {
    match e {
        Error::Disconnected(why) => Error::ServerLost(why),
        other => other,
    }
}

/// `pidfd_send_signal(2)`; Ok if the process has already exited (there is
/// no process to signal, and no other process can be hit).
pub(crate) fn signal_pidfd(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: a null siginfo asks the kernel to fill in SI_USER details;
    // the pidfd is open for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == -1 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err);
        }
    }
    Ok(())
}

impl Drop for ExitWatch {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.connection.abandon(self.id);
        }
    }
}

/// Reads two pipes to their ends at once (either may be absent), so a child
/// filling one while we block on the other cannot deadlock us.
fn read_both(out: Option<ChildStdout>, err: Option<ChildStderr>) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let (mut out_buf, mut err_buf) = (Vec::new(), Vec::new());
    match (out, err) {
        (None, None) => {}
        (Some(mut out), None) => {
            out.read_to_end(&mut out_buf)?;
        }
        (None, Some(mut err)) => {
            err.read_to_end(&mut err_buf)?;
        }
        (Some(out), Some(err)) => {
            let mut pipes = [
                (Some(OwnedFd::from(out)), &mut out_buf),
                (Some(OwnedFd::from(err)), &mut err_buf),
            ];
            while pipes.iter().any(|(fd, _)| fd.is_some()) {
                let mut pollfds: Vec<libc::pollfd> = pipes
                    .iter()
                    .map(|(fd, _)| libc::pollfd {
                        fd: fd.as_ref().map_or(-1, |fd| fd.as_raw_fd()),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: pollfds is a valid array of the length given.
                let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as _, -1) };
                if rc == -1 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                for (pollfd, (fd, buf)) in pollfds.iter().zip(pipes.iter_mut()) {
                    if pollfd.revents == 0 {
                        continue;
                    }
                    let mut chunk = [0u8; 8192];
                    let mut file = std::fs::File::from(fd.take().expect("polled fds are open"));
                    match file.read(&mut chunk) {
                        Ok(0) => {}
                        Ok(n) => {
                            buf.extend_from_slice(&chunk[..n]);
                            *fd = Some(file.into());
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => *fd = Some(file.into()),
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
    Ok((out_buf, err_buf))
}
