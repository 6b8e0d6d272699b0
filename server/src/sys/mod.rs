//! The server's OS layer: every raw libc call made outside the after-fork
//! child code, each behind a small safe wrapper. (The child's calls live in
//! `launch/setup.rs` and `launch/pool_child.rs`, which run between fork and
//! exec and keep to async-signal-safe calls.)
//!
//! This file holds the error helpers and fds, pipes and sockets;
//! `process.rs` fork, exec, reaping, pidfds and signals; `sibling.rs` the fork
//! whose child is the caller's sibling; `memory.rs` mappings and the
//! dynamic loader.
//!
//! One style throughout: a `-1`/errno return goes through [`cvt`] (or
//! [`cvt_r`], which retries on `EINTR`), and every new descriptor is wrapped
//! in an [`OwnedFd`] at once, so an early `?` closes it. nix is used where it
//! fits as it is (epoll in the event loop, user and group lookups).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

mod memory;
mod process;
mod sibling;

pub(crate) use memory::*;
pub(crate) use process::*;
pub(crate) use sibling::*;

/// Turns a `-1` return into the thread's `errno` as an `io::Error`.
pub(crate) fn cvt<T: IsMinusOne>(ret: T) -> io::Result<T> {
    if ret.is_minus_one() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// [`cvt`], retrying while the call is interrupted by a signal (EINTR).
pub(crate) fn cvt_r<T: IsMinusOne>(mut call: impl FnMut() -> T) -> io::Result<T> {
    loop {
        match cvt(call()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

pub(crate) trait IsMinusOne {
    fn is_minus_one(&self) -> bool;
}

macro_rules! impl_is_minus_one {
    ($($t:ident)*) => ($(impl IsMinusOne for $t {
        fn is_minus_one(&self) -> bool {
            *self == -1
        }
    })*)
}

impl_is_minus_one! { i32 i64 isize }

/// Wraps a descriptor a successful call just returned.
pub(crate) fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass only a descriptor the kernel has just created
    // for us, which nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A pipe whose both ends are close-on-exec; `nonblocking_read` makes the
/// read end non-blocking (for ends the event loop watches).
pub(crate) fn pipe(nonblocking_read: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    let (read, write) = (owned(fds[0]), owned(fds[1]));
    if nonblocking_read {
        set_nonblocking(read.as_raw_fd())?;
    }
    Ok((read, write))
}

pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own only change its status flags.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    }
    Ok(())
}

/// Sets close-on-exec and non-blocking on an inherited fd.
pub(crate) fn set_cloexec_nonblocking(fd: RawFd) -> io::Result<()> {
    set_cloexec(fd, true)?;
    set_nonblocking(fd)
}

/// Sets or clears `fd`'s close-on-exec flag (its only fd flag).
pub(crate) fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD on an fd we own only changes its fd flags.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, flags) }).map(drop)
}

/// The fds a process hands to the next image of itself across an execve
/// (an upgrade in place, `handover.rs`): their close-on-exec flags are
/// cleared just before the exec, and set again if it fails.
#[derive(Default)]
pub(crate) struct Passed(Vec<RawFd>);

impl Passed {
    /// Passes `fd`, returning the number the new image finds it at.
    pub(crate) fn pass(&mut self, fd: BorrowedFd<'_>) -> RawFd {
        self.0.push(fd.as_raw_fd());
        fd.as_raw_fd()
    }

    pub(crate) fn set_cloexec(&self, on: bool) -> io::Result<()> {
        for &fd in &self.0 {
            set_cloexec(fd, on)?;
        }
        Ok(())
    }
}

/// In the new image of an exec: the fd handed over at `fd`, close-on-exec
/// again.
///
/// # Safety
/// `fd` must be a number the old image passed (its state says which),
/// taken once.
pub(crate) unsafe fn take_passed(fd: RawFd) -> OwnedFd {
    // The flag only; the fd is ours whatever this returns.
    let _ = set_cloexec(fd, true);
    // SAFETY: the old image owned it and handed it over, open across the
    // exec; nothing in this image opened it, and the caller takes it once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// An `O_PATH` fd for `path` (enough to exec it), close-on-exec.
pub(crate) fn open_path(path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated path; returns a new fd or -1.
    let fd = cvt(unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) })?;
    Ok(owned(fd))
}

/// Takes ownership of an fd the operator passed by number (`--ready-fd`,
/// `--lifeline-fd`, `--stderr-after-ready`), after checking that it is
/// open: owning a closed number would close someone else's fd later (and
/// abort a debug build, whose I/O-safety check catches it).
pub(crate) fn inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the fd's flags; EBADF if it is not open.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: the fd is open, and the operator passed it for us to use;
    // nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes `fd` the process's stderr (fd 2), closing `fd`.
pub(crate) fn replace_stderr(fd: OwnedFd) -> io::Result<()> {
    if fd.as_raw_fd() == libc::STDERR_FILENO {
        // Already there; dropping it would close stderr.
        let _ = std::os::fd::IntoRawFd::into_raw_fd(fd);
        return Ok(());
    }
    // SAFETY: dup2 onto fd 2 replaces it atomically; `fd` is ours and
    // stays open (until dropped) for the call.
    cvt_r(|| unsafe { libc::dup2(fd.as_raw_fd(), libc::STDERR_FILENO) })?;
    Ok(())
}

/// Opens `path` read-write and close-on-exec.
pub(crate) fn open_rdwr(path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: path is NUL-terminated.
    let fd = cvt_r(|| unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    Ok(owned(fd))
}

/// What [`leave_controlling_terminal`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Terminal {
    /// The process had no controlling terminal.
    None,
    /// It had one and gave it up.
    Left,
    /// It leads its session, whose controlling terminal it keeps: giving
    /// it up would hang up the terminal's foreground process group.
    KeptAsSessionLeader,
}

/// Gives up this process's controlling terminal (`TIOCNOTTY`, see
/// tty_ioctl(4)) unless it leads its session. The process stays in its
/// process group, so the terminal's job-control signals (Ctrl-C, a shell's
/// `kill %1`) still reach it; what goes is `/dev/tty` for it and for every
/// process it forks afterwards.
pub(crate) fn leave_controlling_terminal() -> io::Result<Terminal> {
    // SAFETY: the path is NUL-terminated; O_NOCTTY never acquires one.
    let tty = cvt_r(|| unsafe {
        libc::open(
            c"/dev/tty".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    });
    let tty = match tty {
        Ok(fd) => owned(fd),
        // ENXIO: no controlling terminal. (EACCES and the like would mean
        // a /dev/tty we cannot open, hence one we cannot leave either.)
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(Terminal::None),
        Err(e) => return Err(e),
    };
    // SAFETY: getsid and getpid take plain integers.
    if unsafe { libc::getsid(0) == libc::getpid() } {
        return Ok(Terminal::KeptAsSessionLeader);
    }
    // SAFETY: TIOCNOTTY takes no argument.
    cvt(unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCNOTTY) })?;
    Ok(Terminal::Left)
}

/// A new pseudo-terminal of `rows` × `cols`: (master, slave), both
/// close-on-exec and neither becoming our controlling terminal.
pub(crate) fn open_pty(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let master = owned(cvt(unsafe {
        libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)
    })?);
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: calls on our new master; ptsname_r writes at most the length
    // given into `name`, NUL-terminated.
    unsafe {
        cvt(libc::grantpt(master.as_raw_fd()))?;
        cvt(libc::unlockpt(master.as_raw_fd()))?;
        let rc = libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    // SAFETY: `name` is the NUL-terminated path ptsname_r wrote.
    let slave = cvt_r(|| unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    let slave = owned(slave);
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize.
    cvt(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) })?;
    Ok((master, slave))
}

/// Whether `dir` is on a cgroup v2 file system (`fstatfs`).
pub(crate) fn is_cgroup2(dir: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: statfs is plain data that fstatfs fills in.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the buffer is a statfs.
    cvt(unsafe { libc::fstatfs(dir.as_raw_fd(), &mut fs) })?;
    // f_type and the constant are i64 with glibc, u64 and i64 with musl:
    // the casts are needed on one and no-ops on the other.
    #[allow(clippy::unnecessary_cast)]
    Ok(fs.f_type as i64 == libc::CGROUP2_SUPER_MAGIC as i64)
}

/// `fstatat(dir, name)`, not following a final symlink.
pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data that fstatat fills in.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated name relative to our fd; the buffer is a stat.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut stat,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(stat)
}

/// read(2), retried on EINTR; `WouldBlock` on an empty non-blocking fd.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer and its length describe `buf`.
    let n = cvt_r(|| unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })?;
    Ok(n as usize)
}

/// The whole content of `file`, which must be a regular file (a memfd is
/// one: reading it cannot block) of at most `max` bytes.
pub(crate) fn read_regular_file(file: BorrowedFd<'_>, max: usize) -> io::Result<Vec<u8>> {
    // SAFETY: stat is plain data that fstat fills in.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the buffer is a stat.
    cvt(unsafe { libc::fstat(file.as_raw_fd(), &mut stat) })?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is not a regular file (send a memfd)",
        ));
    }
    let size = stat.st_size.max(0) as usize;
    if size > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it holds {size} bytes; the limit max_bulk_bytes is {max}"),
        ));
    }
    let mut bytes = vec![0u8; size];
    let mut done = 0;
    while done < size {
        // SAFETY: the buffer from `done` on has `size - done` bytes.
        let n = cvt_r(|| unsafe {
            libc::pread(
                file.as_raw_fd(),
                bytes[done..].as_mut_ptr().cast(),
                size - done,
                done as libc::off_t,
            )
        })?;
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    bytes.truncate(done);
    Ok(bytes)
}

/// recv(2) with MSG_DONTWAIT: `WouldBlock` when nothing is queued.
pub(crate) fn recv_nonblocking(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer and its length describe `buf`.
    let n = cvt_r(|| unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    })?;
    Ok(n as usize)
}

/// accept4(2): a new connection, close-on-exec and non-blocking.
pub(crate) fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers ask for no peer address.
    let fd = cvt(unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            ptr::null_mut(),
            ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    })?;
    Ok(owned(fd))
}

/// getsockopt(2) into `value`; returns the length the kernel wrote (or, on
/// ERANGE, the length it needs).
fn getsockopt<T>(fd: RawFd, name: libc::c_int, value: &mut [T]) -> (io::Result<()>, usize) {
    let mut len = std::mem::size_of_val(value) as libc::socklen_t;
    // SAFETY: the buffer and its length describe `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (cvt(rc).map(drop), len as usize)
}

/// `SO_PEERCRED`: the pid, uid and gid of a connected Unix socket's peer
/// at connect time.
pub(crate) fn peer_credentials(socket: BorrowedFd<'_>) -> io::Result<(i32, u32, u32)> {
    // SAFETY: ucred is plain data; all zeroes is a valid value.
    let mut cred = [unsafe { std::mem::zeroed::<libc::ucred>() }];
    getsockopt(socket.as_raw_fd(), libc::SO_PEERCRED, &mut cred).0?;
    Ok((cred[0].pid, cred[0].uid, cred[0].gid))
}

/// `SO_PEERGROUPS` (Linux 4.13+): the peer's supplementary groups at
/// connect time.
pub(crate) fn peer_groups(socket: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let (rc, len) = getsockopt(socket.as_raw_fd(), libc::SO_PEERGROUPS, &mut groups);
        let count = len / std::mem::size_of::<libc::gid_t>();
        match rc {
            Ok(()) => {
                groups.truncate(count);
                return Ok(groups);
            }
            // ERANGE: the kernel wrote the size it needs into `len`.
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) && count > groups.len() => {
                groups.resize(count, 0);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Asks for a send buffer of `bytes` (`SO_SNDBUF`; the kernel doubles it
/// and caps it at `net.core.wmem_max`).
pub(crate) fn set_send_buffer(socket: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let value = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: the option value is a c_int of the length given.
    cvt(unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// A socket's domain, type, and whether it is listening.
pub(crate) fn socket_kind(fd: RawFd) -> io::Result<(i32, i32, bool)> {
    let option = |name| -> io::Result<i32> {
        let mut value = [0 as libc::c_int];
        getsockopt(fd, name, &mut value).0?;
        Ok(value[0])
    };
    Ok((
        option(libc::SO_DOMAIN)?,
        option(libc::SO_TYPE)?,
        option(libc::SO_ACCEPTCONN)? != 0,
    ))
}

/// The filesystem path a Unix socket is bound to, if any.
pub(crate) fn socket_path(fd: RawFd) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; getsockname fills at most `len`.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe `addr`.
    cvt(unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) })
        .ok()?;
    let bytes: Vec<u8> = addr
        .sun_path
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    (!bytes.is_empty()).then(|| std::ffi::OsStr::from_bytes(&bytes).into())
}
