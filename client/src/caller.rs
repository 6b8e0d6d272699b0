//! The caller's context: what a child started through the server takes
//! from the process that asked, so that it looks as if that process had
//! started it — its environment, its working directory, its umask, its
//! signal mask and ignored signals — unless a command opts out for the
//! server's own (see [`Context`]).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use forkserver_protocol::{Spawn, WireStr};

/// Which parts of the child's context come from the server rather than the
/// caller. All false by default: the caller's.
#[derive(Debug, Clone, Default)]
pub(crate) struct Context {
    pub(crate) server_env: bool,
    pub(crate) server_cwd: bool,
    pub(crate) server_umask: bool,
    pub(crate) server_signals: bool,
    /// A signal mask given for the child, instead of the calling thread's.
    pub(crate) signal_mask: Option<Vec<u32>>,
}

impl Context {
    /// Fills the caller's environment, umask and signals into `request`,
    /// and opens
    /// the caller's working directory for it (the fd to pass as `cwd_fd`).
    pub(crate) fn apply(&self, request: &mut Spawn) -> io::Result<Option<OwnedFd>> {
        if !self.server_env {
            whole_environment(request);
        }
        if !self.server_umask || !self.server_signals {
            let own = OwnStatus::read()?;
            if !self.server_umask {
                request.umask = Some(own.umask.ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::Unsupported,
                        "this kernel does not show the umask in /proc/thread-self/status; use server_umask(true)",
                    )
                })?);
            }
            if !self.server_signals {
                request.signal_mask = match &self.signal_mask {
                    Some(mask) => mask.clone(),
                    None => signals_in(own.blocked),
                };
                // As std::process::Command does: Rust ignores SIGPIPE in
                // every program it starts, and the child gets it back.
                request.ignored_signals = signals_in(own.ignored & !bit(libc::SIGPIPE));
            }
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

/// What /proc/thread-self/status says of the calling thread: the
/// process's umask (`Umask:`, Linux 4.7+), read without changing it
/// (setting and restoring it would race with other threads creating
/// files), the thread's blocked signals (`SigBlk:`) and the process's
/// ignored ones (`SigIgn:`), as bit sets (bit N-1 for signal N).
struct OwnStatus {
    umask: Option<u32>,
    blocked: u64,
    ignored: u64,
}

impl OwnStatus {
    /// One `read` of the whole file (about 1.5 kB): `read_to_string` would
    /// grow its buffer from 32 bytes, one `read` per doubling, on every
    /// spawn.
    fn read() -> io::Result<OwnStatus> {
        let mut text = [0u8; 4096];
        let read = std::fs::File::open("/proc/thread-self/status")?.read(&mut text)?;
        // Bytes, not text: the name on the first line is the process's, in
        // whatever bytes it chose.
        let text = &text[..read];
        let field = |name: &[u8]| {
            text.split(|&b| b == b'\n')
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| std::str::from_utf8(value).ok())
                .map(str::trim)
        };
        let set = |name: &[u8]| {
            field(name)
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "no {} line in /proc/thread-self/status",
                            String::from_utf8_lossy(name)
                        ),
                    )
                })
        };
        Ok(OwnStatus {
            umask: field(b"Umask:").and_then(|octal| u32::from_str_radix(octal, 8).ok()),
            blocked: set(b"SigBlk:")?,
            ignored: set(b"SigIgn:")?,
        })
    }
}

/// The bit of signal `signal` in a /proc signal set.
fn bit(signal: i32) -> u64 {
    1 << (signal - 1)
}

/// The signal numbers in a /proc signal set.
fn signals_in(set: u64) -> Vec<u32> {
    (1..=64).filter(|&n| set & (1 << (n - 1)) != 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calling_thread_s_mask_and_the_ignored_signals_are_read() {
        let own = OwnStatus::read().unwrap();
        // SAFETY: sigset_t is plain data; pthread_sigmask fills it in.
        let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: a null new set only reads the mask.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask) };
        for signal in 1..=64 {
            // SAFETY: the set is initialised.
            let member = unsafe { libc::sigismember(&mask, signal) } == 1;
            assert_eq!(own.blocked & bit(signal) != 0, member, "signal {signal}");
        }
        // The Rust runtime ignores SIGPIPE.
        assert_ne!(own.ignored & bit(libc::SIGPIPE), 0);
        assert_eq!(signals_in(bit(1) | bit(64)), vec![1, 64]);
        // SAFETY: umask with the value it returns changes nothing.
        let umask = unsafe {
            let old = libc::umask(0o22);
            libc::umask(old);
            old
        };
        assert_eq!(own.umask, Some(umask as u32));
    }
}
