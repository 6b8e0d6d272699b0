//! A fork whose child is the caller's sibling: `clone3(CLONE_PARENT)`, for
//! the zygote (`launch/zygote/`), whose children must be the front's.
//!
//! glibc's `fork()` cannot take that flag, and a raw clone skips what
//! glibc's fork does for the child's thread. In a single-threaded caller
//! that holds none of glibc's locks, two things are left, and
//! [`fork_sibling`] does both as glibc's fork does: the thread id glibc
//! keeps in its thread descriptor (written by the kernel,
//! `CLONE_CHILD_SETTID`, at the address found by [`GlibcThread::find`]), and
//! the robust-futex list, which the kernel does not carry into a child
//! (registered again with `set_robust_list`). The atfork handlers do not
//! run; the zygote runs the embedder's fork hooks around each clone (see
//! `launch/zygote/`).
//!
//! `FORKSERVER_SIBLING_FORK=0` in the server's environment turns this off
//! ([`GlibcThread::find_allowed`]), as if glibc's descriptor were missing
//! (musl), so that the path without it can be run on purpose.

use std::convert::Infallible;
use std::io;
use std::os::fd::OwnedFd;

use super::{clone3, cvt, dlsym, owned, run_child, CloneArgs};

/// Where glibc keeps the calling thread's id, and the thread's robust-futex
/// list, as [`fork_sibling`] must set them in its child.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GlibcThread {
    /// The `tid` field of glibc's `struct pthread` for this thread.
    tid: *mut libc::pid_t,
    robust_head: *mut libc::c_void,
    robust_len: usize,
}

/// The environment variable that turns sibling forks off when `0`.
const SWITCH: &str = "FORKSERVER_SIBLING_FORK";

impl GlibcThread {
    /// [`find`](Self::find), unless [`SWITCH`] turns sibling forks off;
    /// Err says why there are none.
    pub(crate) fn find_allowed() -> Result<GlibcThread, String> {
        if std::env::var_os(SWITCH).is_some_and(|v| v == "0") {
            return Err(format!("{SWITCH}=0 turns clone3(CLONE_PARENT) off"));
        }
        GlibcThread::find().ok_or_else(|| {
            "glibc's thread descriptor was not found (_thread_db_pthread_tid), so clone3(CLONE_PARENT) cannot be used".into()
        })
    }

    /// Finds them for the calling thread, or None unless sure: the field's
    /// offset comes from the description glibc exports for debuggers
    /// (`_thread_db_pthread_tid`: bits, count, offset, as libthread_db reads
    /// it), and is used only if the field holds this thread's id now. The
    /// addresses stay valid in every fork of this process, whose thread
    /// descriptor is a copy at the same address.
    pub(crate) fn find() -> Option<GlibcThread> {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
        let description = unsafe { dlsym(libc::RTLD_DEFAULT, c"_thread_db_pthread_tid") }?;
        // SAFETY: glibc defines the symbol as three 32-bit words.
        let [bits, count, offset] = unsafe { description.cast::<[u32; 3]>().read() };
        if bits != 32 || count != 1 {
            return None;
        }
        // SAFETY: pthread_self is always safe to call; on glibc it is the
        // address of the thread's descriptor.
        let descriptor = unsafe { libc::pthread_self() } as *mut u8;
        let tid = descriptor
            .wrapping_add(offset as usize)
            .cast::<libc::pid_t>();
        // SAFETY: within this thread's descriptor (the offset is glibc's
        // own), which lives as long as the thread; an aligned i32.
        if !tid.is_aligned() || unsafe { tid.read() } != gettid() {
            return None;
        }
        let mut robust_head: *mut libc::c_void = std::ptr::null_mut();
        let mut robust_len: usize = 0;
        // SAFETY: pid 0 is the calling thread; both out-pointers are ours.
        cvt(unsafe {
            libc::syscall(
                libc::SYS_get_robust_list,
                0,
                &mut robust_head as *mut *mut libc::c_void,
                &mut robust_len as *mut usize,
            )
        })
        .ok()?;
        Some(GlibcThread {
            tid,
            robust_head,
            robust_len,
        })
    }
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// Like `sys::fork`, but the child's parent is the caller's parent
/// (`CLONE_PARENT`: it is reaped there, and its exit signal goes there,
/// which is the caller's own exit signal: SIGCHLD for a forked caller), and
/// a pidfd for it comes back with its pid (`CLONE_PIDFD`). Linux 5.3
/// (clone3).
///
/// # Safety
/// As `sys::fork`: the caller is single-threaded and holds no lock of
/// glibc's (it is not inside malloc or stdio), and `thread` was found in
/// this process or in the process it was forked from, on the thread that
/// calls.
pub(crate) unsafe fn fork_sibling(
    thread: &GlibcThread,
    in_child: impl FnOnce() -> Infallible,
) -> io::Result<(libc::pid_t, OwnedFd)> {
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        // glibc's fork passes CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID with
        // the same address.
        flags: (libc::CLONE_PARENT
            | libc::CLONE_PIDFD
            | libc::CLONE_CHILD_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        child_tid: thread.tid as u64,
        // Must be 0 with CLONE_PARENT: the child's exit signal is then the
        // caller's own, which for a child forked by the server is SIGCHLD.
        exit_signal: 0,
        ..CloneArgs::default()
    };
    // SAFETY: no new stack (the child runs on a copy of this thread's);
    // `pidfd` and the tid field are valid; the caller guarantees the rest.
    let pid = unsafe { clone3(&args) }?;
    if pid == 0 {
        // SAFETY: the list head is this thread's own (copied) list, as
        // glibc's fork registers it in its child.
        unsafe {
            libc::syscall(
                libc::SYS_set_robust_list,
                thread.robust_head,
                thread.robust_len,
            )
        };
        run_child(in_child)
    }
    Ok((pid, owned(pidfd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_s_thread_id_field_is_found_and_checked() {
        let thread = GlibcThread::find().expect("glibc exports _thread_db_pthread_tid");
        // SAFETY: find checked the address is this thread's tid field.
        assert_eq!(unsafe { thread.tid.read() }, gettid());
    }

    #[test]
    fn a_sibling_is_its_grandparent_s_child_and_knows_its_own_thread_id() {
        let thread = GlibcThread::find().unwrap();
        let (pid_read, pid_write) = super::super::pipe(false).unwrap();
        // The middle process forks the sibling and exits: the sibling must
        // then be this (test) process's child, with its own id where glibc
        // keeps it (in the middle one's copy of this thread's descriptor).
        // Both children only make system calls and read memory: this test
        // process has other threads, whose locks they must not need.
        let sibling_child = || {
            // SAFETY: the descriptor copied into this child.
            let ours = unsafe { thread.tid.read() } == gettid();
            // SAFETY: _exit ends the child.
            unsafe { libc::_exit(if ours { 0 } else { 3 }) }
        };
        let middle_child = || {
            // SAFETY: the middle child has one thread and takes no lock.
            let code = match unsafe { fork_sibling(&thread, sibling_child) } {
                Ok((pid, _)) => {
                    let bytes = pid.to_ne_bytes();
                    // SAFETY: writing our own buffer to our own pipe.
                    unsafe {
                        libc::write(
                            std::os::fd::AsRawFd::as_raw_fd(&pid_write),
                            bytes.as_ptr().cast(),
                            4,
                        )
                    };
                    0
                }
                Err(e) => 10 + e.raw_os_error().unwrap_or(0),
            };
            // SAFETY: _exit ends the child.
            unsafe { libc::_exit(code) }
        };
        // SAFETY: the children make system calls and read memory only.
        let middle = unsafe { super::super::fork(middle_child) }.unwrap();
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(middle, &mut status, 0) }, middle);
        assert_eq!(libc::WEXITSTATUS(status), 0, "the middle process forked");
        drop(pid_write);
        let mut bytes = [0u8; 4];
        super::super::read(std::os::fd::AsFd::as_fd(&pid_read), &mut bytes).unwrap();
        let sibling = libc::pid_t::from_ne_bytes(bytes);
        // SAFETY: waiting for a child of ours (CLONE_PARENT made it so).
        assert_eq!(unsafe { libc::waitpid(sibling, &mut status, 0) }, sibling);
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "glibc's cached thread id is the sibling's"
        );
    }
}
