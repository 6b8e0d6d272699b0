//! The caller's context: what a child started through the server takes
//! from the process that asked, so that it looks as if that process had
//! started it — its environment, its working directory, its umask — unless
//! a command opts out for the server's own (see [`Context`]).

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use forkserver_protocol::{Spawn, WireStr};

/// Which parts of the child's context come from the server rather than the
/// caller. All false by default: the caller's.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Context {
    pub(crate) server_env: bool,
    pub(crate) server_cwd: bool,
    pub(crate) server_umask: bool,
}

impl Context {
    /// Fills the caller's environment and umask into `request`, and opens
    /// the caller's working directory for it (the fd to pass as `cwd_fd`).
    pub(crate) fn apply(&self, request: &mut Spawn) -> io::Result<Option<OwnedFd>> {
        if !self.server_env {
            whole_environment(request);
        }
        if !self.server_umask {
            request.umask = Some(own_umask()?);
        }
        if self.server_cwd {
            return Ok(None);
        }
        open_cwd().map(Some)
    }
}

/// The caller's whole environment (unless the command cleared it) with the
/// command's edits applied, sent as a cleared environment plus every
/// variable: the server's own environment plays no part.
fn whole_environment(request: &mut Spawn) {
    let mut env: BTreeMap<WireStr, Option<WireStr>> = if request.env_clear {
        BTreeMap::new()
    } else {
        std::env::vars_os()
            .map(|(k, v)| (k.into(), Some(v.into())))
            .collect()
    };
    for (key, value) in std::mem::take(&mut request.env) {
        match value {
            Some(value) => env.insert(key, Some(value)),
            None => env.remove(&key),
        };
    }
    request.env = env;
    request.env_clear = true;
}

/// This process's working directory as an `O_PATH` fd: the child changes to
/// the very directory, however it is named (or renamed) by then, and
/// wherever the server's mount namespace would resolve a path.
fn open_cwd() -> io::Result<OwnedFd> {
    const DOT: &CStr = c".";
    // SAFETY: DOT is NUL-terminated; open returns a new fd or -1.
    let fd = unsafe {
        libc::open(
            DOT.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd == -1 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("opening this process's working directory: {e}"),
        ));
    }
    // SAFETY: open succeeded, so fd is new and ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// This process's umask, read without changing it (`Umask:` in
/// /proc/self/status, Linux 4.7+): setting and restoring it would race with
/// other threads creating files.
fn own_umask() -> io::Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Umask:"))
        .and_then(|value| u32::from_str_radix(value.trim(), 8).ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel does not show the umask in /proc/self/status; use server_umask(true)",
            )
        })
}
