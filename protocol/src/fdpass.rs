//! One datagram with its file descriptors, in and out of a `SOCK_SEQPACKET`
//! socket.
//!
//! # Platform facts
//! - `SCM_RIGHTS` installs received fds in our table even when the control
//!   buffer is too small for all of them (`MSG_CTRUNC`): the ones that did fit
//!   are open and must be closed, so we walk the control messages either way
//!   and wrap every fd in an [`OwnedFd`] before looking at the flags.
//! - `MSG_CMSG_CLOEXEC` makes received fds close-on-exec atomically, so a
//!   concurrent fork-exec in the receiving process cannot leak them.
//! - A zero-byte read on a `SOCK_SEQPACKET` socket means the peer closed; the
//!   protocol therefore never sends an empty datagram.
//! - `MSG_NOSIGNAL` on every send: a peer that went away yields `EPIPE`, not a
//!   process-killing SIGPIPE.
//!
//! See unix(7) and cmsg(3).

use std::io::{self, IoSlice};
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

/// A received datagram.
#[derive(Debug)]
pub struct Datagram {
    /// The payload (at most the buffer size asked for).
    pub bytes: Vec<u8>,
    /// Every fd that arrived, owned: dropping them closes them.
    pub fds: Vec<OwnedFd>,
    /// The payload was longer than the buffer and was cut (`MSG_TRUNC`).
    pub truncated: bool,
    /// More fds were sent than fit; the extra ones were closed by the kernel
    /// (`MSG_CTRUNC`).
    pub fds_truncated: bool,
}

/// Room in a control buffer for `n` fds, in `u64` words so the buffer is
/// aligned for `cmsghdr`.
fn control_words(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    let bytes = unsafe { libc::CMSG_SPACE((n * mem::size_of::<RawFd>()) as u32) } as usize;
    bytes.div_ceil(mem::size_of::<u64>())
}

/// Sends `bytes` as one datagram with `fds` attached, with `MSG_NOSIGNAL`.
/// `extra_flags` is or-ed in (e.g. `libc::MSG_DONTWAIT`).
///
/// The datagram is sent whole or not at all; `EAGAIN` means try again later.
pub fn send_datagram(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    extra_flags: i32,
) -> io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let mut control = vec![
        0u64;
        if fds.is_empty() {
            0
        } else {
            control_words(fds.len())
        }
    ];
    // SAFETY: msghdr is a plain C struct; all-zero is a valid empty header.
    let mut header: libc::msghdr = unsafe { mem::zeroed() };
    header.msg_iov = iov.as_ptr() as *mut libc::iovec;
    header.msg_iovlen = iov.len() as _;
    if !fds.is_empty() {
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = (control.len() * mem::size_of::<u64>()) as _;
        // SAFETY: the control buffer is aligned (u64 words) and sized by
        // CMSG_SPACE for exactly fds.len() descriptors, so CMSG_FIRSTHDR is
        // non-null and CMSG_DATA has room for them.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * mem::size_of::<RawFd>()) as u32) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                ptr::write_unaligned(data.add(i), fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: header points at live buffers for the duration of the call.
        let sent = unsafe {
            libc::sendmsg(
                socket.as_raw_fd(),
                &header,
                libc::MSG_NOSIGNAL | extra_flags,
            )
        };
        if sent >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one datagram of at most `max_bytes` bytes and `max_fds` fds, with
/// `MSG_CMSG_CLOEXEC`. Returns `Ok(None)` when the peer has closed.
/// `extra_flags` is or-ed in (e.g. `libc::MSG_DONTWAIT`).
pub fn recv_datagram(
    socket: BorrowedFd<'_>,
    max_bytes: usize,
    max_fds: usize,
    extra_flags: i32,
) -> io::Result<Option<Datagram>> {
    // Not zeroed: the kernel writes the bytes it received and only those
    // are kept. Zeroing `max_bytes` (64 KiB by default) for every message
    // wrote 16 pages, each a copy-on-write fault in a server that has just
    // forked, for a request of a few hundred bytes.
    let mut bytes: Vec<u8> = Vec::with_capacity(max_bytes);
    let mut control = vec![0u64; control_words(max_fds.max(1))];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: max_bytes,
    };
    // SAFETY: msghdr is a plain C struct; all-zero is a valid empty header.
    let mut header: libc::msghdr = unsafe { mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = (control.len() * mem::size_of::<u64>()) as _;
    let received = loop {
        // SAFETY: header points at live, writable buffers of the sizes given.
        let n = unsafe {
            libc::recvmsg(
                socket.as_raw_fd(),
                &mut header,
                libc::MSG_CMSG_CLOEXEC | extra_flags,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let fds = take_fds(&header);
    if received == 0 && fds.is_empty() {
        return Ok(None);
    }
    // SAFETY: recvmsg wrote `received` bytes (at most iov_len, the
    // capacity) at the start of the buffer.
    unsafe { bytes.set_len(received.min(max_bytes)) };
    // Gives back the rest of the buffer (in place: a shrinking realloc).
    bytes.shrink_to_fit();
    Ok(Some(Datagram {
        bytes,
        fds,
        truncated: header.msg_flags & libc::MSG_TRUNC != 0,
        fds_truncated: header.msg_flags & libc::MSG_CTRUNC != 0,
    }))
}

/// Takes ownership of every fd in the `SCM_RIGHTS` messages of `header`.
fn take_fds(header: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: header was filled by recvmsg; the CMSG_* macros walk only within
    // msg_controllen, and each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / 4 fds that the kernel just installed in our
    // table, so each is ours to own exactly once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..payload / mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(header, cmsg);
        }
    }
    fds
}

/// A new memfd (close-on-exec) holding `bytes`: how a message too big for
/// one datagram travels, as the last fd of a small one (`bulk`). The
/// receiver reads it as a regular file.
pub fn memfd_holding(bytes: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated name and flags; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"forkserver-message".as_ptr(), libc::MFD_CLOEXEC) };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create succeeded, so fd is new and ours alone.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    io::Write::write_all(&mut file, bytes)?;
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn is_cloexec(fd: BorrowedFd<'_>) -> bool {
        // SAFETY: F_GETFD on a valid fd has no side effects.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        flags & libc::FD_CLOEXEC != 0
    }

    #[test]
    fn bytes_and_fds_arrive_together_and_cloexec() {
        let (a, b) = crate::seqpacket_pair().unwrap();
        let (x, _y) = UnixStream::pair().unwrap();
        send_datagram(a.as_fd(), b"hello", &[x.as_fd(), x.as_fd()], 0).unwrap();
        let got = recv_datagram(b.as_fd(), 64, 4, 0).unwrap().unwrap();
        assert_eq!(got.bytes, b"hello");
        assert_eq!(got.fds.len(), 2);
        assert!(!got.truncated && !got.fds_truncated);
        assert!(got.fds.iter().all(|fd| is_cloexec(fd.as_fd())));
    }

    #[test]
    fn oversize_payload_and_fd_list_are_flagged() {
        let (a, b) = crate::seqpacket_pair().unwrap();
        let (x, _y) = UnixStream::pair().unwrap();
        let fds = [x.as_fd(); 5];
        send_datagram(a.as_fd(), &[7u8; 100], &fds, 0).unwrap();
        let got = recv_datagram(b.as_fd(), 10, 2, 0).unwrap().unwrap();
        assert_eq!(got.bytes.len(), 10);
        assert!(got.truncated);
        assert!(got.fds_truncated);
        assert!(got.fds.len() <= 5);
    }

    #[test]
    fn closed_peer_reads_as_none() {
        let (a, b) = crate::seqpacket_pair().unwrap();
        drop(a);
        assert!(recv_datagram(b.as_fd(), 10, 1, 0).unwrap().is_none());
    }
}
