//! A child's start and end: the exec error pipe's verdict (`Spawned` or
//! `SpawnFailed`) and its reaping (`Exited`), in that order whatever order
//! the kernel reports them in.

use std::io;
use std::os::fd::OwnedFd;

use forkserver_protocol::{ChildStatus, ErrorKind, ServerMessage};

use super::{request_error, EventLoop};
use crate::child::FailedStep;
use crate::children::{read_exec_outcome, ChildRecord, ExecOutcome, Stage};
use crate::log::{log, Level};
use crate::spawner::ClientEnds;

impl EventLoop {
    pub(super) fn exec_pipe_ready(&mut self, pid: libc::pid_t) {
        let Some(ChildRecord {
            stage: Stage::Starting { error_pipe, .. },
            ..
        }) = self.children.get(pid)
        else {
            return;
        };
        match read_exec_outcome(error_pipe) {
            ExecOutcome::Pending => {}
            outcome => self.resolve_start(pid, outcome),
        }
    }

    /// The exec pipe has spoken: tell the owner `Spawned` or `SpawnFailed`,
    /// and `Exited` too if the child was already reaped.
    pub(super) fn resolve_start(&mut self, pid: libc::pid_t, outcome: ExecOutcome) {
        let Some(record) = self.children.get_mut(pid) else {
            return;
        };
        let succeeded = outcome == ExecOutcome::Exec;
        let Stage::Starting {
            error_pipe,
            client_ends,
            pool_control,
        } = std::mem::replace(
            &mut record.stage,
            if succeeded {
                Stage::Running
            } else {
                Stage::Failed
            },
        )
        else {
            return;
        };
        let _ = self.epoll.delete(&error_pipe);
        drop(error_pipe);
        // The child has read its request (it set up before reporting).
        drop(pool_control);
        self.starting -= 1;
        let (owner, id, early_exit) = (record.owner, record.id, record.early_exit);
        let reply = match outcome {
            ExecOutcome::Exec => {
                let (message, fds) = spawned_reply(id, pid, record, client_ends);
                Some((message, fds))
            }
            ExecOutcome::Failed(step, errno) => {
                self.failures += 1;
                let (kind, doing) = match step {
                    FailedStep::Exec => (ErrorKind::Exec, "cannot run the program"),
                    FailedStep::Chdir => (ErrorKind::Chdir, "cannot change to the directory"),
                    FailedStep::Setup => (ErrorKind::Setup, "cannot set up the child"),
                };
                let message = format!("{doing}: {}", io::Error::from_raw_os_error(errno));
                Some((
                    ServerMessage::SpawnFailed {
                        id,
                        kind,
                        errno: Some(errno),
                        message,
                    },
                    Vec::new(),
                ))
            }
            ExecOutcome::Pending => None,
        };
        if let (Some(conn), Some((message, fds))) = (owner, reply) {
            if let Some(c) = self.connections.get_mut(&conn) {
                c.pending = c.pending.saturating_sub(1);
                if !succeeded {
                    c.children.remove(&id);
                }
            }
            self.reply(conn, message, fds);
        }
        if let Some(status) = early_exit {
            self.child_reaped(pid, status);
        }
    }

    pub(super) fn child_reaped(&mut self, pid: libc::pid_t, status: ChildStatus) {
        let Some(record) = self.children.get_mut(pid) else {
            if self.pools.remove(pid) {
                log!(
                    Level::Warn,
                    "idle pool child {pid} died ({status:?}); refilling"
                );
            } else {
                log!(Level::Debug, "reaped pid {pid} that was not ours to report");
            }
            return;
        };
        if let Stage::Starting { error_pipe, .. } = &record.stage {
            // The child is dead, so its end of the pipe is closed and the
            // outcome is there to read now.
            record.early_exit = Some(status);
            let outcome = match read_exec_outcome(error_pipe) {
                ExecOutcome::Pending => ExecOutcome::Exec,
                outcome => outcome,
            };
            self.resolve_start(pid, outcome);
            return;
        }
        let Some(record) = self.children.remove(pid) else {
            return;
        };
        log!(
            Level::Debug,
            "pid {pid} (id {}) ended: {status:?}",
            record.id
        );
        let (Stage::Running, Some(conn)) = (record.stage, record.owner) else {
            return;
        };
        if let Some(c) = self.connections.get_mut(&conn) {
            c.children.remove(&record.id);
        }
        let message = ServerMessage::Exited {
            id: record.id,
            pid: pid as u32,
            status,
        };
        self.reply(conn, message, Vec::new());
    }
}

/// `Spawned` and its fds: the pidfd first, then the pipe ends asked for.
fn spawned_reply(
    id: u64,
    pid: libc::pid_t,
    record: &ChildRecord,
    ends: ClientEnds,
) -> (ServerMessage, Vec<OwnedFd>) {
    let mut fds = Vec::with_capacity(4);
    // The server keeps its own pidfd to signal the child; the client gets a
    // duplicate. If dup fails (EMFILE), the client gets no fd and is told.
    match record.pidfd.try_clone() {
        Ok(pidfd) => fds.push(pidfd),
        Err(e) => {
            return (
                request_error(
                    Some(id),
                    ErrorKind::Resource,
                    format!("child {pid} started but its pidfd could not be duplicated: {e}"),
                ),
                Vec::new(),
            )
        }
    }
    let mut index = |end: Option<OwnedFd>| {
        end.map(|fd| {
            fds.push(fd);
            (fds.len() - 1) as u32
        })
    };
    let stdin = index(ends.stdin);
    let stdout = index(ends.stdout);
    let stderr = index(ends.stderr);
    let message = ServerMessage::Spawned {
        id,
        pid: pid as u32,
        pidfd: 0,
        stdin,
        stdout,
        stderr,
    };
    (message, fds)
}
