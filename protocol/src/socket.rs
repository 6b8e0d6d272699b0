//! `SOCK_SEQPACKET` Unix sockets on filesystem paths: the one transport the
//! protocol runs on. Every socket is created close-on-exec.
//!
//! # Platform facts
//! - A `sun_path` holds 107 bytes plus a NUL; longer paths are refused with
//!   `ENAMETOOLONG` rather than silently cut.
//! - Only filesystem paths are accepted: abstract-namespace sockets have no
//!   permissions, so anyone on the machine could connect (CVE-2022-42919).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes[0] == 0 || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path must be a non-empty filesystem path without NUL bytes",
        ));
    }
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path is {} bytes; a Unix socket path holds at most {}",
                bytes.len(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn seqpacket_socket(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket() returns a new fd or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | flags,
            0,
        )
    };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is new and ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects a blocking `SOCK_SEQPACKET` socket to `path`.
pub fn connect_seqpacket(path: &Path) -> io::Result<OwnedFd> {
    let (addr, len) = sockaddr(path)?;
    let socket = seqpacket_socket(0)?;
    loop {
        // SAFETY: addr is a valid sockaddr_un of length len.
        let rc = unsafe {
            libc::connect(
                socket.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        if rc == 0 {
            return Ok(socket);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Binds a non-blocking `SOCK_SEQPACKET` socket to `path` and listens. The
/// socket file gets the mode the caller's umask allows.
pub fn listen_seqpacket(path: &Path, backlog: i32) -> io::Result<OwnedFd> {
    let (addr, len) = sockaddr(path)?;
    let socket = seqpacket_socket(libc::SOCK_NONBLOCK)?;
    // SAFETY: addr is a valid sockaddr_un of length len.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(socket.as_raw_fd(), backlog) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// A connected pair of close-on-exec `SOCK_SEQPACKET` Unix sockets (for a
/// server and a child it talks to, or for tests).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors socketpair writes.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded, so both fds are new and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Where client and server look for the socket when none is named:
/// `$FORKSERVER_SOCKET`, else `$XDG_RUNTIME_DIR/forkserver.sock`, else
/// `/tmp/forkserver-UID/forkserver.sock` (the server creates that directory
/// with mode 0700).
pub fn default_socket_path() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("FORKSERVER_SOCKET").filter(|p| !p.is_empty()) {
        return path.into();
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        return Path::new(&dir).join("forkserver.sock");
    }
    per_user_socket_dir().join("forkserver.sock")
}

/// `/tmp/forkserver-UID`: the directory of the last-resort default socket.
pub fn per_user_socket_dir() -> std::path::PathBuf {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    Path::new("/tmp").join(format!("forkserver-{uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_paths_are_refused_not_cut() {
        let long = "/tmp/".to_owned() + &"x".repeat(200);
        let err = connect_seqpacket(Path::new(&long)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("at most 107"), "{err}");
    }

    #[test]
    fn listen_then_connect() {
        let dir = std::env::temp_dir().join(format!("fs-proto-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let _listener = listen_seqpacket(&path, 4).unwrap();
        connect_seqpacket(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
