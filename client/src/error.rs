//! The client's error type.

use std::fmt;
use std::io;
use std::path::PathBuf;

use forkserver_protocol::ErrorKind;

/// What went wrong talking to a forkserver.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// No server accepted a connection on the socket.
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// The OS error from `connect`.
        source: io::Error,
    },
    /// Sending or receiving on the connection failed.
    Io(io::Error),
    /// The server closed the connection; the text says why when it told us.
    Disconnected(String),
    /// The server went away (it died or was restarted) before it reported
    /// this child's exit: the exit status is unknown, and the child may
    /// still run (its pidfd still signals it: [`Child::kill`](crate::Child::kill)).
    ServerLost(String),
    /// The server is gone, and no server listened on its socket again
    /// within the client's reconnect wait.
    ServerGone {
        /// The socket path.
        path: PathBuf,
        /// How long the client waited.
        waited: std::time::Duration,
        /// The OS error of the last `connect`.
        source: io::Error,
    },
    /// The server sent something this client cannot read.
    Protocol(String),
    /// The server refused a request (or the connection) with an error reply.
    Refused {
        /// The kind of error the server named.
        kind: ErrorKind,
        /// The server's explanation.
        message: String,
    },
    /// The request cannot be sent as it is (a NUL byte in a string, a
    /// request larger than the server takes); the text names the field.
    /// Its [`kind`](Error::kind) is `InvalidInput`, as std's.
    InvalidInput(String),
    /// The child could not be started.
    SpawnFailed {
        /// The program (or target) that was to run.
        program: String,
        /// Which step failed.
        kind: ErrorKind,
        /// The OS error number, if the failure was an OS error.
        errno: Option<i32>,
        /// The server's explanation.
        message: String,
    },
}

impl Error {
    /// The OS error number behind this error, if there is one: for a failed
    /// exec, the `execve` errno (ENOENT, EACCES…).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Connect { source, .. }
            | Error::Io(source)
            | Error::ServerGone { source, .. } => source.raw_os_error(),
            Error::SpawnFailed { errno, .. } => *errno,
            _ => None,
        }
    }
}

impl Error {
    /// The `std::io::ErrorKind` this error corresponds to: the OS error's
    /// where there is one (so a missing program is `NotFound`, as with
    /// std), `InvalidInput` for a request refused as invalid.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::Connect { source, .. }
            | Error::Io(source)
            | Error::ServerGone { source, .. } => source.kind(),
            Error::ServerLost(_) => io::ErrorKind::ConnectionAborted,
            Error::InvalidInput(_)
            | Error::SpawnFailed {
                kind: ErrorKind::Invalid,
                ..
            }
            | Error::Refused {
                kind: ErrorKind::Invalid,
                ..
            } => io::ErrorKind::InvalidInput,
            Error::SpawnFailed {
                errno: Some(errno), ..
            } => io::Error::from_raw_os_error(*errno).kind(),
            Error::SpawnFailed {
                kind: ErrorKind::UnknownWorker,
                ..
            } => io::ErrorKind::NotFound,
            Error::SpawnFailed {
                kind: ErrorKind::Denied,
                ..
            }
            | Error::Refused {
                kind: ErrorKind::Denied,
                ..
            } => io::ErrorKind::PermissionDenied,
            Error::Disconnected(_) => io::ErrorKind::BrokenPipe,
            Error::Protocol(_) => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { path, source }
                if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) =>
            {
                write!(
                    f,
                    "the forkserver socket {} is closed to uid {} ({source}): the socket or a directory above it does not let you in. The server's owner can open it with `forkserver serve --group GROUP` (the socket becomes 0660 for GROUP; its directory must let you through) and admit you with `--allow-uid USER` or `--allow-gid GROUP`",
                    path.display(),
                    // SAFETY: getuid cannot fail.
                    unsafe { libc::getuid() }
                )
            }
            Error::Connect { path, source } => write!(
                f,
                "no forkserver is listening on {} ({source}); start one with `forkserver serve --socket {}`",
                path.display(),
                path.display()
            ),
            Error::Io(e) => write!(f, "talking to the forkserver: {e}"),
            Error::Disconnected(why) => f.write_str(why),
            Error::ServerLost(why) => write!(
                f,
                "the forkserver was lost before it reported this child's exit ({why}): its exit status is unknown, and it may still be running (its pidfd still signals it)"
            ),
            Error::ServerGone {
                path,
                waited,
                source,
            } => write!(
                f,
                "the forkserver on {} is gone, and none listened there again within {:.1} s ({source}); start one with `forkserver serve --socket {}`",
                path.display(),
                waited.as_secs_f64(),
                path.display()
            ),
            Error::Protocol(why) => write!(f, "unexpected reply from the forkserver: {why}"),
            Error::Refused { message, .. } => write!(f, "the server refused: {message}"),
            Error::InvalidInput(message) => f.write_str(message),
            // The server's words after its own "cannot run the program: "
            // (the errno's text, and for E2BIG whose limit it was).
            Error::SpawnFailed {
                program,
                kind: ErrorKind::Exec,
                errno: Some(errno),
                message,
            } => match message.strip_prefix("cannot run the program: ") {
                Some(detail) => write!(f, "cannot run '{program}': {detail}"),
                None => write!(
                    f,
                    "cannot run '{program}': {}",
                    io::Error::from_raw_os_error(*errno)
                ),
            },
            Error::SpawnFailed {
                program, message, ..
            } => write!(f, "cannot start '{program}': {message}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. }
            | Error::Io(source)
            | Error::ServerGone { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

/// Lets `?` carry a client error out of a function returning `io::Result`,
/// keeping the errno where there is one.
impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io(e) => e,
            other => io::Error::new(other.kind(), other),
        }
    }
}
