//! The answer to a spawn request, read the same way by the blocking and the
//! async client: `spawned` with its fds, or the error it came as.

use std::os::fd::OwnedFd;

use forkserver_protocol::ServerMessage;

use crate::Error;

/// A started child's pid and the fds `spawned` carried for it.
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
    pub(crate) stdin: Option<OwnedFd>,
    pub(crate) stdout: Option<OwnedFd>,
    pub(crate) stderr: Option<OwnedFd>,
    /// The master end of the child's terminal, if it asked for one.
    pub(crate) pty: Option<OwnedFd>,
}

/// Whether `message` answers a spawn (for the connection's `take`).
pub(crate) fn answers_spawn(message: &ServerMessage) -> bool {
    matches!(
        message,
        ServerMessage::Spawned { .. }
            | ServerMessage::SpawnFailed { .. }
            | ServerMessage::Error { .. }
    )
}

/// The child, or the error, that a spawn's answer says; `program` names it
/// in errors.
pub(crate) fn read_answer(
    message: ServerMessage,
    fds: Vec<OwnedFd>,
    program: &str,
) -> Result<Spawned, Error> {
    match message {
        ServerMessage::Spawned {
            pid,
            pidfd,
            stdin,
            stdout,
            stderr,
            pty,
            ..
        } => {
            let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
            let mut take = |index: Option<u32>, what: &str| -> Result<Option<OwnedFd>, Error> {
                match index {
                    None => Ok(None),
                    Some(i) => fds
                        .get_mut(i as usize)
                        .and_then(Option::take)
                        .map(Some)
                        .ok_or_else(|| {
                            Error::Protocol(format!("spawned: no fd at index {i} for {what}"))
                        }),
                }
            };
            Ok(Spawned {
                pid,
                pidfd: take(Some(pidfd), "the pidfd")?.expect("an index was given"),
                stdin: take(stdin, "stdin")?,
                stdout: take(stdout, "stdout")?,
                stderr: take(stderr, "stderr")?,
                pty: take(pty, "the terminal")?,
            })
        }
        ServerMessage::SpawnFailed {
            kind,
            errno,
            message,
            ..
        } => Err(Error::SpawnFailed {
            program: program.to_owned(),
            kind,
            errno,
            message,
        }),
        ServerMessage::Error { kind, message, .. } => Err(Error::Refused { kind, message }),
        other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
    }
}
