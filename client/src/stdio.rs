//! [`Stdio`]: where a child's standard stream comes from.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use forkserver_protocol::StdioSpec;

/// Where a child's standard stream comes from, as in `std::process::Stdio`.
#[derive(Debug)]
pub struct Stdio(pub(crate) StdioKind);

#[derive(Debug)]
pub(crate) enum StdioKind {
    /// This process's own fd 0, 1 or 2: the stream's own number, or another
    /// (`Stdio::from(io::stderr())` as a child's stdout).
    Own(Option<i32>),
    Null,
    Piped,
    Fd(OwnedFd),
}

impl Stdio {
    /// The calling process's own stream (its fd 0, 1 or 2 is passed to the
    /// server and installed in the child).
    pub fn inherit() -> Stdio {
        Stdio(StdioKind::Own(None))
    }

    /// `/dev/null`.
    pub fn null() -> Stdio {
        Stdio(StdioKind::Null)
    }

    /// A new pipe; the other end is in [`Child::stdin`](crate::Child::stdin)
    /// / `stdout` / `stderr`.
    pub fn piped() -> Stdio {
        Stdio(StdioKind::Piped)
    }
}

impl From<OwnedFd> for Stdio {
    fn from(fd: OwnedFd) -> Stdio {
        Stdio(StdioKind::Fd(fd))
    }
}

impl From<File> for Stdio {
    fn from(file: File) -> Stdio {
        Stdio(StdioKind::Fd(file.into()))
    }
}

impl From<io::Stdout> for Stdio {
    /// This process's stdout (fd 1), as std's `Stdio::from(io::stdout())`.
    fn from(_: io::Stdout) -> Stdio {
        Stdio(StdioKind::Own(Some(1)))
    }
}

impl From<io::Stderr> for Stdio {
    /// This process's stderr (fd 2), as std's `Stdio::from(io::stderr())`.
    fn from(_: io::Stderr) -> Stdio {
        Stdio(StdioKind::Own(Some(2)))
    }
}

macro_rules! stdio_from_child_pipe {
    ($($t:ty)*) => ($(impl From<$t> for Stdio {
        /// Connects this end of another child's pipe.
        fn from(pipe: $t) -> Stdio {
            Stdio(StdioKind::Fd(pipe.into()))
        }
    })*)
}

stdio_from_child_pipe! { std::process::ChildStdin std::process::ChildStdout std::process::ChildStderr }

// Defaults for streams a command leaves unset.
pub(crate) static INHERIT: StdioKind = StdioKind::Own(None);
pub(crate) static NULL: StdioKind = StdioKind::Null;
pub(crate) static PIPED: StdioKind = StdioKind::Piped;

/// The protocol's stdio spec for one stream, pushing any fd it passes.
/// `own` is this process's fd for the stream (0, 1 or 2), passed to inherit.
pub(crate) fn stdio_spec<'a>(
    kind: &'a StdioKind,
    own: i32,
    fds: &mut Vec<BorrowedFd<'a>>,
) -> StdioSpec {
    let fd = match kind {
        StdioKind::Null => return StdioSpec::Null,
        StdioKind::Piped => return StdioSpec::Pipe,
        // SAFETY: fds 0-2 are this process's standard streams, which stay
        // open for its life (std's own `Stdin::as_fd` borrows fd 0 the same
        // way). One that is closed makes the spawn fail with EBADF.
        StdioKind::Own(fd) => unsafe { BorrowedFd::borrow_raw(fd.unwrap_or(own)) },
        StdioKind::Fd(fd) => fd.as_fd(),
    };
    fds.push(fd);
    StdioSpec::Fd {
        index: (fds.len() - 1) as u32,
    }
}
