//! The listening socket: where it lives, how it is created, and how it is
//! removed.
//!
//! - The socket file is created mode 0600 (umask 0177 around `bind`), so there
//!   is no moment at which others could connect; with a group it is then
//!   given to that group and widened to 0660.
//! - Its directory must not let others replace it: owned by us or root, and
//!   not writable by everyone unless sticky (like /tmp).
//! - An existing path is probed by connecting to it: if a server answers, we
//!   refuse to start; if nothing listens (a server that was SIGKILLed), the
//!   stale file is removed. A path that is not a socket is never removed.
//! - On shutdown the file is removed only if it is still the one we bound
//!   (same device and inode), so a successor's socket is left alone.

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use forkserver_protocol::{connect_seqpacket, listen_seqpacket};
use serde::{Deserialize, Serialize};

use crate::sys::{self, take_passed, Passed};
use crate::ServeError;

pub(crate) struct Listener {
    socket: OwnedFd,
    path: PathBuf,
    /// Device and inode of the socket file we bound; None for a socket
    /// inherited from systemd, whose file is systemd's to remove.
    identity: Option<(u64, u64)>,
    /// Remove the socket's directory too, if it is empty then
    /// (`--remove-socket-dir`).
    remove_dir: bool,
}

/// A listener, handed over (`handover.rs`).
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct ListenerState {
    socket: RawFd,
    path: PathBuf,
    identity: Option<(u64, u64)>,
    remove_dir: bool,
}

impl Listener {
    pub(crate) fn bind(path: &Path, group: Option<u32>) -> Result<Listener, ServeError> {
        prepare_parent(path)?;
        check_parent(path)?;
        remove_if_stale(path)?;
        let old_mask = sys::umask(0o177);
        let bound = listen_seqpacket(path, 128);
        sys::umask(old_mask);
        let socket = bound.map_err(|source| ServeError::io("binding the socket", path, source))?;
        if let Some(gid) = group {
            std::os::unix::fs::lchown(path, None, Some(gid))
                .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o660)))
                .map_err(|source| {
                    let _ = fs::remove_file(path);
                    ServeError::io("giving the socket to its group", path, source)
                })?;
        }
        let meta = fs::symlink_metadata(path)
            .map_err(|source| ServeError::io("reading the new socket's metadata", path, source))?;
        Ok(Listener {
            socket,
            path: path.to_owned(),
            identity: Some((meta.dev(), meta.ino())),
            remove_dir: false,
        })
    }

    /// The listener as the next image needs it (`handover.rs`), its fd
    /// added to `passed`.
    pub(crate) fn hand_over(&self, passed: &mut Passed) -> ListenerState {
        ListenerState {
            socket: passed.pass(self.socket.as_fd()),
            path: self.path.clone(),
            identity: self.identity,
            remove_dir: self.remove_dir,
        }
    }

    /// The listener an old image handed over.
    ///
    /// # Safety
    /// `state` is this image's handover, taken once.
    pub(crate) unsafe fn taken_over(state: ListenerState) -> Listener {
        Listener {
            // SAFETY: the caller's.
            socket: unsafe { take_passed(state.socket) },
            path: state.path,
            identity: state.identity,
            remove_dir: state.remove_dir,
        }
    }

    /// Whether to remove the socket's directory with the socket (only
    /// ever an empty one: `rmdir`).
    pub(crate) fn remove_dir_too(&mut self, on: bool) {
        self.remove_dir = on;
    }

    /// The listening socket systemd passed (socket activation,
    /// sd_listen_fds(3)), if `LISTEN_PID` is us and `LISTEN_FDS` is 1: fd 3,
    /// which must be a listening `AF_UNIX` `SOCK_SEQPACKET` socket. Consumes
    /// the variables so children do not inherit them.
    pub(crate) fn from_systemd() -> Result<Option<Listener>, ServeError> {
        let pid = std::env::var("LISTEN_PID").ok();
        let fds = std::env::var("LISTEN_FDS").ok();
        for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // SAFETY: the server is single-threaded; nothing reads the
            // environment concurrently.
            unsafe { std::env::remove_var(name) };
        }
        let (Some(pid), Some(fds)) = (pid, fds) else {
            return Ok(None);
        };
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return Ok(None);
        }
        if fds != "1" {
            return Err(ServeError::Config(format!(
                "systemd passed LISTEN_FDS={fds}; forkserver serves exactly one socket (one ListenSequentialPacket= in the .socket unit)"
            )));
        }
        const SD_LISTEN_FDS_START: RawFd = 3;
        let fd = SD_LISTEN_FDS_START;
        let (domain, kind, listening) = sys::socket_kind(fd)
            .map_err(|e| ServeError::Setup("inspecting the socket systemd passed (fd 3)", e))?;
        if domain != libc::AF_UNIX || kind != libc::SOCK_SEQPACKET || !listening {
            let kind_name = match kind {
                libc::SOCK_STREAM => "SOCK_STREAM",
                libc::SOCK_DGRAM => "SOCK_DGRAM",
                libc::SOCK_SEQPACKET => "SOCK_SEQPACKET",
                _ => "an unknown type of",
            };
            return Err(ServeError::Config(format!(
                "systemd passed {kind_name} socket (domain {domain}{}) on fd 3; forkserver needs a listening AF_UNIX SOCK_SEQPACKET socket: use ListenSequentialPacket= in the .socket unit (or systemd-socket-activate --seqpacket)",
                if listening { "" } else { ", not listening" }
            )));
        }
        // SAFETY: fd 3 was handed to us by systemd and nothing else owns it.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        sys::set_cloexec_nonblocking(fd)
            .map_err(|e| ServeError::Setup("preparing the socket systemd passed", e))?;
        let path = sys::socket_path(fd).unwrap_or_else(|| PathBuf::from("(socket from systemd)"));
        Ok(Some(Listener {
            socket,
            path,
            identity: None,
            remove_dir: false,
        }))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let (Some(identity), Ok(meta)) = (self.identity, fs::symlink_metadata(&self.path)) {
            if (meta.dev(), meta.ino()) == identity {
                let _ = fs::remove_file(&self.path);
                if let Some(dir) = self.path.parent().filter(|_| self.remove_dir) {
                    // Fails, harmlessly, if anything else is in it.
                    let _ = fs::remove_dir(dir);
                }
            }
        }
    }
}

/// Creates the per-uid fallback directory under /tmp with mode 0700 and
/// checks an existing one is ours and private; other parents must exist.
fn prepare_parent(path: &Path) -> Result<(), ServeError> {
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    if parent != forkserver_protocol::per_user_socket_dir() {
        return Ok(());
    }
    match fs::DirBuilder::new().mode(0o700).create(parent) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(parent).map_err(|source| {
                ServeError::io("checking the socket directory", parent, source)
            })?;
            let private = meta.is_dir()
                && meta.uid() == sys::getuid()
                && meta.permissions().mode() & 0o077 == 0;
            if private {
                Ok(())
            } else {
                Err(ServeError::Config(format!(
                    "{} is not a private directory of ours (want a directory owned by uid {} with mode 0700); remove it or pass --socket",
                    parent.display(),
                    sys::getuid()
                )))
            }
        }
        Err(source) => Err(ServeError::io(
            "creating the socket directory",
            parent,
            source,
        )),
    }
}

/// Refuses a directory in which someone else could replace our socket.
fn check_parent(path: &Path) -> Result<(), ServeError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let meta = fs::metadata(parent)
        .map_err(|source| ServeError::io("checking the socket's directory", parent, source))?;
    let mode = meta.permissions().mode();
    let owner_ok = meta.uid() == sys::getuid() || meta.uid() == 0;
    let world_writable_unsticky = mode & 0o002 != 0 && mode & 0o1000 == 0;
    if !owner_ok || world_writable_unsticky {
        return Err(ServeError::Config(format!(
            "{} is {}; anyone who can write there could replace the socket. Put it in a directory owned by you or root that others cannot write to",
            parent.display(),
            if owner_ok {
                format!("writable by everyone without the sticky bit (mode {:o})", mode & 0o7777)
            } else {
                format!("owned by uid {}", meta.uid())
            }
        )));
    }
    Ok(())
}

fn remove_if_stale(path: &Path) -> Result<(), ServeError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(ServeError::io("checking the socket path", path, source)),
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::Config(format!(
            "{} exists and is not a socket; remove it or choose another --socket",
            path.display()
        )));
    }
    match connect_seqpacket(path) {
        Ok(_) => Err(ServeError::AlreadyRunning(path.to_owned())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => fs::remove_file(path)
            .map_err(|source| ServeError::io("removing the stale socket", path, source)),
        Err(source) => Err(ServeError::io("probing the existing socket", path, source)),
    }
}
