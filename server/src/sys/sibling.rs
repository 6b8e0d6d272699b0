//! A fork whose child is the caller's sibling (its parent's child), for the
//! zygote (`launch/zygote/`), whose children must be the front's. Two ways,
//! [`SiblingFork`]:
//!
//! - **Clone** (the fast one): `clone3(CLONE_PARENT)`, one copy of the
//!   address space. glibc's `fork()` cannot take that flag, and a raw clone
//!   skips what glibc's fork does for the child's thread. In a
//!   single-threaded caller that holds none of glibc's locks, two things
//!   are left, and [`fork_sibling`] does both as glibc's `_Fork` does: the
//!   thread id glibc keeps in its thread descriptor (written by the kernel,
//!   `CLONE_CHILD_SETTID`, at the address found by [`GlibcThread::find`],
//!   then checked in the child), and the robust-futex list, which the
//!   kernel does not carry into a child (emptied, then registered again
//!   with `set_robust_list`). The atfork handlers do not run; the zygote
//!   runs the embedder's fork hooks around each clone.
//! - **Adopted** (the complete fallback, on any libc): [`fork_adopted`]
//!   forks twice with the libc's own `fork()`; the middle process exits at
//!   once, so the child is adopted by the nearest *subreaper* above it,
//!   which the caller's parent must be (`PR_SET_CHILD_SUBREAPER`:
//!   [`become_subreaper`]). It costs a second copy of the address space,
//!   and works in a caller that has other threads (the libc's fork resets
//!   its own locks in the child, as for any fork) — though a zygote never
//!   forks its children with other threads about (see `choose`).
//!
//! [`SiblingFork::choose`] takes Clone where glibc's descriptor is found
//! and `FORKSERVER_SIBLING_FORK=0` is not set; otherwise Adopted. The
//! switch lets CI run everything both ways. Clone also needs a caller with
//! one thread: a zygote whose preloads left threads forks itself first
//! (`launch/zygote/life.rs`).

use std::convert::Infallible;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use super::{
    clone3, cvt, dlsym, fork, owned, pidfd_open, pipe, read, run_child, wait_for, CloneArgs,
};

/// Where glibc keeps the calling thread's id, and the thread's robust-futex
/// list, as [`fork_sibling`] must set them in its child.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GlibcThread {
    /// The `tid` field of glibc's `struct pthread` for this thread.
    tid: *mut libc::pid_t,
    robust_head: *mut libc::c_void,
    robust_len: usize,
}

/// The environment variable that turns the Clone way off when `0`.
const SWITCH: &str = "FORKSERVER_SIBLING_FORK";

/// How a zygote makes its children the front's (see the module's docs).
#[derive(Debug, Clone, Copy)]
pub(crate) enum SiblingFork {
    Clone(GlibcThread),
    Adopted,
}

impl SiblingFork {
    /// Clone where it can be used, else Adopted with why not. (Clone needs
    /// a single-threaded caller too: a zygote whose preloads left threads
    /// forks a copy of itself, which has one, to fork from.)
    pub(crate) fn choose() -> (SiblingFork, Option<String>) {
        match GlibcThread::find_allowed() {
            Ok(thread) => (SiblingFork::Clone(thread), None),
            Err(why) => (SiblingFork::Adopted, Some(why)),
        }
    }

    /// This way if a first child made with it finds itself as glibc's fork
    /// would leave it (its thread id where glibc keeps it, its robust list
    /// registered), else Adopted, with why. A transient failure of the
    /// clone (EAGAIN, ENOMEM) keeps Clone: the next fork may work.
    ///
    /// # Safety
    /// As [`fork_sibling`]; the first child is left to the caller's
    /// parent to reap.
    pub(crate) unsafe fn checked(self) -> (SiblingFork, Option<String>) {
        let SiblingFork::Clone(thread) = self else {
            return (self, None);
        };
        let (verdict, fine) = match pipe(false) {
            Ok(pipe) => pipe,
            Err(_) => return (self, None),
        };
        let child = || {
            // Only reached if the clone's state was checked (fork_sibling).
            // SAFETY: writing one byte of ours to our pipe, then _exit.
            unsafe {
                libc::write(fine.as_raw_fd(), b"y".as_ptr().cast(), 1);
                libc::_exit(0)
            }
        };
        // SAFETY: passed on to the caller.
        match unsafe { fork_sibling(&thread, child) } {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) => {
                return (self, None)
            }
            Err(e) => {
                let why = format!("clone3(CLONE_PARENT) failed: {e}");
                return (SiblingFork::Adopted, Some(why));
            }
        }
        drop(fine);
        let mut byte = [0u8];
        match read(verdict.as_fd(), &mut byte) {
            Ok(1) => (self, None),
            _ => {
                let why = "a child of clone3(CLONE_PARENT) did not find its thread id and robust list as glibc's fork leaves them";
                (SiblingFork::Adopted, Some(why.into()))
            }
        }
    }

    /// Forks a child of the caller's parent (see [`fork_sibling`] and
    /// [`fork_adopted`]), with a pidfd for it.
    ///
    /// # Safety
    /// As the function for the way chosen.
    pub(crate) unsafe fn fork(
        &self,
        in_child: impl FnOnce() -> Infallible,
    ) -> io::Result<(libc::pid_t, OwnedFd)> {
        match self {
            // SAFETY: passed on to the caller.
            SiblingFork::Clone(thread) => unsafe { fork_sibling(thread, in_child) },
            // SAFETY: passed on to the caller.
            SiblingFork::Adopted => unsafe { fork_adopted(in_child) },
        }
    }
}

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
        // glibc's fork registers it in its child (`struct robust_list_head`
        // of linux/futex.h: `list`, `futex_offset`, `list_op_pending`).
        // Emptied first, as `_Fork` does: a lock on it is the parent's.
        let registered = unsafe {
            let head = thread.robust_head.cast::<*mut libc::c_void>();
            if !head.is_null() {
                head.write(thread.robust_head);
                head.add(2).write(std::ptr::null_mut());
            }
            libc::syscall(
                libc::SYS_set_robust_list,
                thread.robust_head,
                thread.robust_len,
            )
        };
        // SAFETY: the tid field of this thread's (copied) descriptor.
        if registered != 0 || unsafe { thread.tid.read() } != gettid() {
            // Not the state glibc's fork leaves: nothing of the libc's can
            // be trusted here. [`SiblingFork::checked`] finds this before
            // a zygote uses the way; a child that finds it later ends.
            // SAFETY: _exit ends this child at once.
            unsafe { libc::_exit(CLONE_MISFIT) }
        }
        run_child(in_child)
    }
    Ok((pid, owned(pidfd)))
}

/// The exit code of a clone whose child found glibc's thread id wrong.
pub(crate) const CLONE_MISFIT: i32 = 121;

/// Forks a child that the caller's parent adopts: the libc's `fork()`
/// makes a middle process, which forks the child (the libc's `fork()`
/// again: the middle process has one thread) and exits at once, so the
/// child is reparented to the nearest subreaper (the caller's parent, if
/// it called [`become_subreaper`] and the caller did not). The child waits
/// for that before `in_child` runs: until then its parent is the middle
/// process, whose exit would fire a parent-death signal set too early.
/// The middle process's pid pipe tells the caller the child's pid (or
/// `-errno`), and the caller reaps it (the child is the parent's by then)
/// and opens the pidfd.
///
/// # Safety
/// As `sys::fork` for the caller, whose threads (if any) were tolerated
/// by its thread guard; `in_child` keeps to what is safe after fork.
pub(crate) unsafe fn fork_adopted(
    in_child: impl FnOnce() -> Infallible,
) -> io::Result<(libc::pid_t, OwnedFd)> {
    let (pid_read, pid_write) = pipe(false)?;
    let middle = || {
        // Async-signal-safe calls only: the middle process is a fork of a
        // process that may have other threads.
        let mut orphaned = [0; 2];
        // SAFETY: room for two fds.
        let answer = if unsafe { libc::pipe2(orphaned.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            let child = || {
                // SAFETY: our copies of the middle process's fds. The read
                // ends at the middle process's exit: its copy of the write
                // end is the last one. Then this process is adopted.
                unsafe {
                    libc::close(pid_write.as_raw_fd());
                    libc::close(orphaned[1]);
                    let mut byte = 0u8;
                    while libc::read(orphaned[0], (&mut byte as *mut u8).cast(), 1) < 0
                        && *libc::__errno_location() == libc::EINTR
                    {}
                    libc::close(orphaned[0]);
                }
                in_child()
            };
            // SAFETY: the middle process has one thread, and holds no lock
            // (its fork reset the libc's).
            match unsafe { fork(child) } {
                Ok(pid) => pid,
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            }
        };
        let bytes = answer.to_ne_bytes();
        // SAFETY: writing our own buffer to our own pipe, then _exit.
        unsafe {
            libc::write(pid_write.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0)
        }
    };
    // SAFETY: passed on to the caller; the middle process keeps to
    // async-signal-safe calls.
    let middle = unsafe { fork(middle) }?;
    drop(pid_write);
    let mut bytes = [0u8; 4];
    let got = read(pid_read.as_fd(), &mut bytes);
    // Once the middle process is reaped, the child is the subreaper's.
    wait_for(middle)?;
    let answer = match got {
        Ok(4) => libc::pid_t::from_ne_bytes(bytes),
        Ok(_) => return Err(io::Error::other("the middle process of a fork died")),
        Err(e) => return Err(e),
    };
    if answer < 0 {
        return Err(io::Error::from_raw_os_error(-answer));
    }
    // The child cannot have been reaped: it waits for nothing more, but
    // only a signal could end it this soon, and only its new parent reap it.
    Ok((answer, pidfd_open(answer)?))
}

/// Makes the calling process a child subreaper (`PR_SET_CHILD_SUBREAPER`):
/// an orphan among its descendants is reparented to it, not to init, so
/// [`fork_adopted`]'s children, made by its own child, become its own.
pub(crate) fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }).map(drop)
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
