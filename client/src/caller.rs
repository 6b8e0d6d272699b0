//! The caller's context: what a child started through the server takes
//! from the process that asked, so that it looks as if that process had
//! started it — its environment, its working directory, its umask — unless
//! a command opts out for the server's own (see [`Context`]).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

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
    open_dir(Path::new("."))
}

/// A directory as an `O_PATH` fd, to pass to the server.
pub(crate) fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))?;
    // SAFETY: the path is NUL-terminated; open returns a new fd or -1.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd == -1 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("opening the directory {}: {e}", dir.display()),
        ));
    }
    // SAFETY: open succeeded, so fd is new and ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// This process's cgroup v2 directory: the cgroup2 mount (from
/// /proc/self/mountinfo) joined with the `0::` line of /proc/self/cgroup.
pub(crate) fn own_cgroup() -> io::Result<PathBuf> {
    let missing = |what: &str| io::Error::new(io::ErrorKind::NotFound, what.to_owned());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    // Fields: ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS... - FSTYPE ...
    let mount = mountinfo
        .lines()
        .find(|line| {
            line.split(" - ")
                .nth(1)
                .is_some_and(|tail| tail.starts_with("cgroup2 "))
        })
        .and_then(|line| line.split_whitespace().nth(4))
        .ok_or_else(|| missing("no cgroup v2 file system is mounted here (cgroup v1 only)"))?;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")?;
    let path = cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| missing("this process has no cgroup v2 path (/proc/self/cgroup)"))?;
    Ok(Path::new(mount).join(path.trim_start_matches('/')))
}

/// This process's umask, read without changing it (`Umask:` in
/// /proc/self/status, Linux 4.7+): setting and restoring it would race with
/// other threads creating files.
///
/// One `read` of the file's start: `Umask:` is its second line, after
/// `Name:` (at most ~70 bytes). `read_to_string` would grow its buffer from
/// 32 bytes, one `read` per doubling, nine in all: on every spawn.
fn own_umask() -> io::Result<u32> {
    let unsupported = || {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "this kernel does not show the umask in /proc/self/status; use server_umask(true)",
        )
    };
    let mut start = [0u8; 512];
    let read = std::fs::File::open("/proc/self/status")?.read(&mut start)?;
    // Bytes, not text: the name on the line before is the process's, in
    // whatever bytes it chose.
    let start = &start[..read];
    let value = start
        .windows(7)
        .position(|w| w == b"\nUmask:")
        .map(|at| &start[at + 7..])
        .and_then(|rest| rest.split(|&b| b == b'\n').next())
        .and_then(|value| std::str::from_utf8(value).ok())
        .and_then(|value| u32::from_str_radix(value.trim(), 8).ok());
    value.ok_or_else(unsupported)
}
