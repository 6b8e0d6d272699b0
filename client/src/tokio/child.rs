//! [`AsyncChild`]: a running child of the server, like
//! `tokio::process::Child`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Output};
use std::sync::Arc;

use ::tokio::io::AsyncReadExt;
use ::tokio::process::{ChildStderr, ChildStdin, ChildStdout};
use forkserver_protocol::ServerMessage;

use super::connection::AsyncConnection;
use crate::child::signal_pidfd;
use crate::spawned::Spawned;
use crate::Error;

/// A child process started by the server, awaited without blocking a
/// thread.
///
/// Its exit status arrives from the server as an `exited` event on the
/// connection; signals go through its pidfd. [`wait`](AsyncChild::wait) is
/// cancel-safe: a `wait` future dropped before the child exits loses
/// nothing, and a later `wait` gets the status. The pipe ends are
/// `tokio::process` types and can be moved out.
///
/// Dropping an `AsyncChild` leaves the child running unless the command
/// set [`kill_on_drop`](super::AsyncCommand::kill_on_drop); either way it
/// is killed when its connection closes (the server's `on_disconnect`),
/// unless spawned with `detach(true)`.
#[derive(Debug)]
pub struct AsyncChild {
    exit: ExitWatch,
    pid: u32,
    /// The write end of the child's stdin, if piped.
    pub stdin: Option<ChildStdin>,
    /// The read end of the child's stdout, if piped.
    pub stdout: Option<ChildStdout>,
    /// The read end of the child's stderr, if piped.
    pub stderr: Option<ChildStderr>,
}

/// The exit status, the pidfd and what happens on drop, apart from the pipe
/// ends so that those can be moved out of the child.
#[derive(Debug)]
struct ExitWatch {
    connection: Arc<AsyncConnection>,
    id: u64,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
    kill_on_drop: bool,
}

impl AsyncChild {
    pub(crate) fn new(
        connection: Arc<AsyncConnection>,
        id: u64,
        spawned: Spawned,
        kill_on_drop: bool,
    ) -> Result<AsyncChild, Error> {
        // Through std's pipe types, which tokio registers with its reactor.
        Ok(AsyncChild {
            stdin: spawned
                .stdin
                .map(|fd| ChildStdin::from_std(fd.into()))
                .transpose()?,
            stdout: spawned
                .stdout
                .map(|fd| ChildStdout::from_std(fd.into()))
                .transpose()?,
            stderr: spawned
                .stderr
                .map(|fd| ChildStderr::from_std(fd.into()))
                .transpose()?,
            exit: ExitWatch {
                connection,
                id,
                pidfd: spawned.pidfd,
                status: None,
                kill_on_drop,
            },
            pid: spawned.pid,
        })
    }

    /// The child's pid (in the server's pid namespace); None once its exit
    /// status was taken (`wait`, `try_wait`), as tokio's: the server has
    /// reaped it by then, and the number may be another process's.
    pub fn id(&self) -> Option<u32> {
        self.exit.status.is_none().then_some(self.pid)
    }

    /// The child's pidfd: poll it for readability to learn that it exited,
    /// or pass it to `pidfd_send_signal`.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.exit.pidfd.as_fd()
    }

    /// Sends `signal` through the pidfd; Ok if the child has already
    /// exited.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        if self.exit.status.is_some() {
            return Ok(());
        }
        signal_pidfd(self.exit.pidfd.as_fd(), signal)
    }

    /// Sends SIGKILL without waiting, as tokio's `start_kill`.
    pub fn start_kill(&mut self) -> io::Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Sends SIGKILL and waits for the child to be gone.
    pub async fn kill(&mut self) -> Result<(), Error> {
        self.start_kill()?;
        self.wait().await.map(drop)
    }

    /// Waits for the child to exit; closes its stdin first (if piped), so a
    /// child reading it sees end-of-file instead of both waiting.
    /// Cancel-safe.
    pub async fn wait(&mut self) -> Result<ExitStatus, Error> {
        drop(self.stdin.take());
        if let Some(status) = self.exit.status {
            return Ok(status);
        }
        let exited =
            (self.exit.connection.take(self.exit.id, is_exit).await).map_err(crate::child::lost)?;
        Ok(self.exit.record(exited.message))
    }

    /// The exit status if the child has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        if self.exit.status.is_some() {
            return Ok(self.exit.status);
        }
        let exited =
            (self.exit.connection.try_take(self.exit.id, is_exit)).map_err(crate::child::lost)?;
        Ok(exited.map(|e| self.exit.record(e.message)))
    }

    /// Closes stdin, reads all of stdout and stderr (those piped) at once,
    /// and waits.
    pub async fn wait_with_output(mut self) -> Result<Output, Error> {
        drop(self.stdin.take());
        let (stdout, stderr) = (self.stdout.take(), self.stderr.take());
        let (stdout, stderr) = ::tokio::try_join!(read_all(stdout), read_all(stderr))?;
        let status = self.wait().await?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }
}

impl ExitWatch {
    fn record(&mut self, exited: ServerMessage) -> ExitStatus {
        let ServerMessage::Exited { status, .. } = exited else {
            unreachable!("take returned the message it was asked for");
        };
        let status = ExitStatus::from_raw(status.into_raw());
        self.status = Some(status);
        status
    }
}

impl Drop for ExitWatch {
    fn drop(&mut self) {
        if self.status.is_none() {
            if self.kill_on_drop {
                let _ = signal_pidfd(self.pidfd.as_fd(), libc::SIGKILL);
            }
            self.connection.abandon(self.id);
        }
    }
}

fn is_exit(message: &ServerMessage) -> bool {
    matches!(message, ServerMessage::Exited { .. })
}

async fn read_all(pipe: Option<impl AsyncReadExt + Unpin>) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    if let Some(mut pipe) = pipe {
        pipe.read_to_end(&mut bytes).await?;
    }
    Ok(bytes)
}
