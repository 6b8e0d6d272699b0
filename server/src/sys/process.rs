//! Processes and signals: fork, reaping, pidfds, signal masks, ids.

use std::convert::Infallible;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::ptr;

use forkserver_protocol::ChildStatus;

use super::{cvt, cvt_r, owned};

/// fork(2) with an unwind barrier: the child runs `in_child`, which never
/// returns; should it unwind instead (a panic), the child exits 127 on the
/// spot rather than unwinding into its copy of the caller's stack (where,
/// say, dropping the listener would remove the server's socket file). Rust
/// std aborts after fork for the same reason (`panic::always_abort`, not
/// yet stable). Returns the child's pid in the parent.
///
/// # Safety
/// The process must be single-threaded (the thread guard), so the child is
/// a consistent copy; `in_child` must keep to what is safe after fork.
pub(crate) unsafe fn fork(in_child: impl FnOnce() -> Infallible) -> io::Result<libc::pid_t> {
    // SAFETY: the caller guarantees a single-threaded process.
    let pid = cvt(unsafe { libc::fork() })?;
    if pid == 0 {
        run_child(in_child)
    }
    Ok(pid)
}

/// A new child's end, for every way this module makes one: `in_child`
/// under an unwind barrier, then `_exit(127)` should it unwind (a panic),
/// without the parent's atexit handlers or destructors.
pub(super) fn run_child(in_child: impl FnOnce() -> Infallible) -> ! {
    let _ = panic::catch_unwind(AssertUnwindSafe(in_child));
    // SAFETY: _exit ends this child at once.
    unsafe { libc::_exit(127) }
}

/// The stack children made by [`spawn_sharing_memory`] run on, mapped once
/// and reused: `CLONE_VFORK` holds the calling thread until its child has
/// exec'd or exited, so one child at a time runs on it, and a raw pointer
/// keeps the type to one thread. The setup needs a few KiB; the rest of the
/// private mapping is never touched and costs nothing. Its lowest page is a
/// guard (`PROT_NONE`): a child that overran the stack faults there, and
/// dies, rather than writing over whatever the server mapped below it.
pub(crate) struct ChildStack {
    base: *mut libc::c_void,
}

impl ChildStack {
    const SIZE: usize = 256 * 1024;
    const GUARD: usize = 4096;

    pub(crate) fn new() -> io::Result<ChildStack> {
        let base = super::map_anonymous(Self::SIZE)?;
        let stack = ChildStack { base };
        // SAFETY: the lowest page of our own new mapping; nothing uses it.
        cvt(unsafe { libc::mprotect(base, Self::GUARD, libc::PROT_NONE) })?;
        Ok(stack)
    }

    /// The initial stack pointer: the stack grows down from the end of the
    /// mapping (page aligned, so 16-byte aligned as the ABI wants).
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of our own mapping.
        unsafe { self.base.cast::<u8>().add(Self::SIZE).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping; no child runs on it once a
        // spawn_sharing_memory call has returned.
        unsafe { super::unmap(self.base, Self::SIZE) };
    }
}

/// A child that runs in this process's memory until it execs, as
/// `posix_spawn` makes one: `clone(CLONE_VM | CLONE_VFORK)` on a stack of its
/// own. No page table is copied, so the cost does not grow with the
/// server's memory (a fork copies the tables of every mapped page: ~20 ms
/// at 512 MB), and no page of the server's becomes copy-on-write. The
/// calling thread waits until the child has exec'd or exited; other threads
/// run on. Returns the child's pid and a pidfd for it, made by the same
/// call (CLONE_PIDFD), close-on-exec.
///
/// `in_child` runs in the child and must end in exec or `_exit`; a panic is
/// caught there and exits 127.
///
/// # Safety
/// `in_child` must write no memory but its own stack (the server's memory is
/// its memory: a drop, a free or a moved value there would be the server's
/// too), and call nothing that takes a lock another thread of the server may
/// hold or that consults the C library's thread state (see
/// `launch::setup::run_exec_sharing_memory`). Signals should be blocked
/// across the call, so that none of the server's handlers runs in the
/// child before it resets them.
pub(crate) unsafe fn spawn_sharing_memory(
    stack: &ChildStack,
    in_child: &dyn Fn() -> Infallible,
) -> io::Result<(libc::pid_t, OwnedFd)> {
    extern "C" fn start(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `&dyn Fn` below, alive while the parent waits.
        let in_child = unsafe { &*(arg as *const &dyn Fn() -> Infallible) };
        run_child(in_child)
    }
    let mut pidfd: libc::c_int = -1;
    // SAFETY: the stack is ours, and no other child runs on it (see
    // ChildStack). CLONE_VFORK keeps this thread, and so `in_child` and the
    // stack, waiting until the child has exec'd or exited. With CLONE_PIDFD
    // the kernel writes the pidfd to the parent-tid argument, `pidfd`.
    let pid = cvt(unsafe {
        libc::clone(
            start,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
            &in_child as *const &dyn Fn() -> Infallible as *mut libc::c_void,
            &mut pidfd as *mut libc::c_int,
        )
    })?;
    // Kernels before 5.2 ignore the flag and leave -1 (then pidfd_open,
    // which is 5.3, fails as it would for a fork, and the caller says so).
    let pidfd = if pidfd >= 0 {
        owned(pidfd)
    } else {
        pidfd_open(pid).inspect_err(|_| kill_and_reap(pid))?
    };
    Ok((pid, pidfd))
}

/// waitpid(2) for one child, blocking, retried on EINTR.
pub(crate) fn wait_for(pid: libc::pid_t) -> io::Result<()> {
    let mut status = 0;
    // SAFETY: waitpid writes only to `status`.
    cvt_r(|| unsafe { libc::waitpid(pid, &mut status, 0) })?;
    Ok(())
}

/// Kills and reaps a child we will not hand out (its pid is still its own:
/// it has not been reaped).
pub(crate) fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: kill on our own unreaped child; it cannot be a recycled pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = wait_for(pid);
}

/// One child that has ended, if any: `waitpid(-1, WNOHANG)`. None when all
/// are still running or there are none (`ECHILD`).
///
/// Raw libc rather than nix: nix's `WaitStatus` cannot represent a death by
/// a real-time signal and would turn that reaped status into an error.
pub(crate) fn reap_one() -> Option<(libc::pid_t, ChildStatus)> {
    let mut status = 0;
    // SAFETY: waitpid writes only to `status`.
    match cvt_r(|| unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) }) {
        Ok(0) | Err(_) => None,
        Ok(pid) if libc::WIFSIGNALED(status) => Some((
            pid,
            ChildStatus::Signaled {
                signal: libc::WTERMSIG(status),
                core_dumped: libc::WCOREDUMP(status),
            },
        )),
        Ok(pid) => Some((
            pid,
            ChildStatus::Exited {
                code: libc::WEXITSTATUS(status),
            },
        )),
    }
}

/// pidfd_open(2): an fd that refers to `pid` for as long as it is open, so
/// signals sent through it can never reach a recycled pid. Close-on-exec.
/// Must be called before the child is reaped.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    Ok(owned(fd as RawFd))
}

/// The calling thread's name (`comm`, as `ps` and `top` show it), NUL
/// padded.
pub(crate) fn thread_name() -> [u8; 16] {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    name
}

/// Names the calling thread (at most 15 bytes are kept).
pub(crate) fn set_thread_name(name: &[u8; 16]) {
    let mut terminated = *name;
    terminated[15] = 0;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes, which `terminated` is.
    unsafe { libc::prctl(libc::PR_SET_NAME, terminated.as_ptr()) };
}

/// Whether the process a pidfd refers to has exited (its pidfd is readable
/// from then on, reaped or not).
pub(crate) fn has_exited(pidfd: BorrowedFd<'_>) -> bool {
    wait_readable(pidfd, 0)
}

/// Whether `fd` is readable (or at its end) within `timeout_ms`
/// milliseconds (0: now, -1: no limit). A signal does not end the wait
/// (poll is never restarted by the kernel, SA_RESTART or not).
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> bool {
    let deadline = (timeout_ms > 0)
        .then(|| std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms as u64));
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let mut wait = timeout_ms;
    loop {
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, wait) };
        if ready >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return ready == 1
                && poll.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        }
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            wait = left.as_millis().min(i32::MAX as u128) as i32;
        }
    }
}

/// pidfd_send_signal(2).
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: a null siginfo asks the kernel to fill in SI_USER details.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            ptr::null::<libc::siginfo_t>(),
            0,
        )
    })?;
    Ok(())
}

/// Sends `signal` to every process in process group `pgid` (`kill(-pgid)`;
/// signal 0 only asks whether the group has a member left).
pub(crate) fn signal_group(pgid: libc::pid_t, signal: i32) -> io::Result<()> {
    // SAFETY: kill takes plain integers; a negative pid names a group.
    cvt(unsafe { libc::kill(-pgid, signal) })?;
    Ok(())
}

/// The current signal mask is replaced by one blocking every signal; the
/// returned mask restores it. Used around fork so that a signal sent to the
/// new child before it has reset its handlers stays pending until it has.
pub(crate) fn block_all_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigfillset/pthread_sigmask fill them in.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(old)
    }
}

/// Puts back a mask saved by [`block_all_signals`].
pub(crate) fn restore_signal_mask(mask: &libc::sigset_t) {
    // SAFETY: mask came from pthread_sigmask, so it is a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, mask, ptr::null_mut()) };
}

/// The signals `mask` holds, by number (to hand a mask across an exec).
pub(crate) fn signals_in(mask: &libc::sigset_t) -> Vec<i32> {
    (1..=libc::SIGRTMAX())
        // SAFETY: sigismember reads a valid set.
        .filter(|&signal| unsafe { libc::sigismember(mask, signal) } == 1)
        .collect()
}

/// Sets the signal mask to exactly `signals`.
pub(crate) fn set_signal_mask(signals: &[i32]) {
    // SAFETY: sigset_t is plain data that sigemptyset fills in; sigaddset
    // ignores a number that is no signal.
    unsafe {
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut mask);
        for &signal in signals {
            libc::sigaddset(&mut mask, signal);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &mask, ptr::null_mut());
    }
}

/// SIGPIPE to SIG_IGN: a client that goes away costs an `EPIPE`, not our
/// life.
pub(crate) fn ignore_sigpipe() -> io::Result<()> {
    // SAFETY: SIG_IGN installs no handler code; the server is
    // single-threaded, so no one races this.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The user id of this process.
pub(crate) fn getuid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// The process id of this process.
pub(crate) fn getpid() -> libc::pid_t {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

/// Sets the file mode creation mask, returning the old one.
pub(crate) fn umask(mask: libc::mode_t) -> libc::mode_t {
    // SAFETY: umask cannot fail; the server is single-threaded, so no other
    // thread creates files while the mask is changed.
    unsafe { libc::umask(mask) }
}

/// Lets other runnable processes on this CPU run before this one goes on.
pub(crate) fn yield_cpu() {
    // SAFETY: sched_yield has no preconditions and cannot fail on Linux.
    unsafe { libc::sched_yield() };
}

/// This process's soft limit on open files (`RLIMIT_NOFILE`), capped at
/// `u32::MAX`.
pub(crate) fn open_files_limit() -> u32 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return u32::MAX;
    }
    limit.rlim_cur.min(u32::MAX as u64) as u32
}

/// Field `n` (counted from 1, as proc(5) numbers them; `n` > 2) of a
/// `/proc/PID/stat` line. The name (field 2, in parentheses) may hold
/// spaces and parentheses itself, so the fields are counted from the last
/// ')'.
pub(crate) fn stat_field(line: &[u8], n: usize) -> Option<&str> {
    let after_name = &line[line.iter().rposition(|&b| b == b')')? + 1..];
    let field = after_name
        .split(|&b| b == b' ')
        .filter(|f| !f.is_empty())
        .nth(n.checked_sub(3)?)?;
    std::str::from_utf8(field).ok()
}

/// Reads files of `/proc/PID` (`names`, in order) through one open
/// directory of it, so that all come from one process: should it exit (and
/// its pid be reused) between two reads, the later ones fail (ESRCH)
/// rather than read another process's.
pub(crate) fn read_proc_files<const N: usize>(
    pid: libc::pid_t,
    names: [&CStr; N],
) -> io::Result<[String; N]> {
    let dir = std::ffi::CString::new(format!("/proc/{pid}")).expect("no NUL in a number");
    // SAFETY: the path is NUL-terminated.
    let dir = owned(cvt_r(|| unsafe {
        libc::open(
            dir.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?);
    let mut texts: [String; N] = std::array::from_fn(|_| String::new());
    for (name, text) in names.iter().zip(&mut texts) {
        // SAFETY: the name is NUL-terminated and relative to `dir`.
        let file = owned(cvt_r(|| unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        })?);
        let mut file = std::fs::File::from(file);
        std::io::Read::read_to_string(&mut file, text)?;
    }
    Ok(texts)
}

/// A process's cgroup v2 path (the `0::` line of /proc/PID/cgroup).
pub(crate) fn cgroup_of(pid: libc::pid_t) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
}

/// `CLONE_INTO_CGROUP` (Linux 5.7), not in every libc crate version.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` of clone3(2), as far as `cgroup` (version 2).
#[repr(C)]
#[derive(Default)]
pub(super) struct CloneArgs {
    pub(super) flags: u64,
    pub(super) pidfd: u64,
    pub(super) child_tid: u64,
    pub(super) parent_tid: u64,
    pub(super) exit_signal: u64,
    pub(super) stack: u64,
    pub(super) stack_size: u64,
    pub(super) tls: u64,
    pub(super) set_tid: u64,
    pub(super) set_tid_size: u64,
    pub(super) cgroup: u64,
}

/// clone3(2) with no new stack: it forks as fork does, returning 0 in the
/// child and the child's pid in the caller.
///
/// # Safety
/// As [`fork`]; `args` must not ask for a new stack, and every pointer in
/// it must be valid.
pub(super) unsafe fn clone3(args: &CloneArgs) -> io::Result<libc::pid_t> {
    // SAFETY: a valid args struct of its own size, as the caller guarantees.
    let pid = cvt(unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    })?;
    Ok(pid as libc::pid_t)
}

/// Like [`fork`], but the child is created in the cgroup whose directory
/// `cgroup` is (`clone3` with `CLONE_INTO_CGROUP`, Linux 5.7). Errors with
/// the kernel's errno (ENOSYS on older kernels) before any child exists.
///
/// glibc's fork bookkeeping does not run (no atfork handlers, and the
/// child's cached thread id is its parent's): only for a child that execs
/// after the setup's plain system calls, never one that runs the server's
/// code as a worker.
///
/// # Safety
/// As [`fork`], and `in_child` must end in exec or `_exit`.
pub(crate) unsafe fn fork_into_cgroup(
    cgroup: BorrowedFd<'_>,
    in_child: impl FnOnce() -> Infallible,
) -> io::Result<libc::pid_t> {
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: no new stack; the caller guarantees a single-threaded process.
    let pid = unsafe { clone3(&args) }?;
    if pid == 0 {
        run_child(in_child)
    }
    Ok(pid)
}

/// CLOCK_MONOTONIC in microseconds (what systemd's `MONOTONIC_USEC=`
/// means), or 0 if the clock cannot be read.
pub(crate) fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec of ours to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        return 0;
    }
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000
}

/// NULL-terminated pointers to `strings`, for the exec calls.
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    let mut pointers: Vec<_> = strings.iter().map(|s| s.as_ptr()).collect();
    pointers.push(std::ptr::null());
    pointers
}

/// execve(2): returns only if it failed, with why.
pub(crate) fn execve(path: &CStr, argv: &[CString], env: &[CString]) -> io::Error {
    let (argv, env) = (pointers(argv), pointers(env));
    // SAFETY: NUL-terminated strings in NULL-terminated arrays, alive for
    // the call.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), env.as_ptr()) };
    io::Error::last_os_error()
}

/// execveat(2) of the file `fd` refers to (`AT_EMPTY_PATH`): returns only
/// if it failed, with why.
pub(crate) fn execveat_empty_path(fd: RawFd, argv: &[CString], env: &[CString]) -> io::Error {
    let (argv, env) = (pointers(argv), pointers(env));
    // SAFETY: as for execve; "" with AT_EMPTY_PATH names `fd` itself.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            c"".as_ptr(),
            argv.as_ptr(),
            env.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    io::Error::last_os_error()
}
