//! The child between `fork()` and `execve()` or its worker.
//!
//! Everything in [`run_child`] executes in the new child process, a copy of
//! the single-threaded server. Its rules, after Rust std's unix process code:
//! - until the worker's own code starts: no allocation, no locks, no stdio, no
//!   panics; only async-signal-safe libc calls on data prepared before the
//!   fork ([`ChildPlan`]). (Allocation would in fact be safe because the
//!   thread guard guarantees no other thread held the malloc lock at fork,
//!   but the setup needs none.)
//! - never return and never unwind into the server's code: every path ends in
//!   `execve` or `_exit`. A worker runs under `catch_unwind`; a panic exits
//!   101 (the default hook has printed the message to the child's stderr).
//! - report failure as a fixed-size record on the close-on-exec error pipe:
//!   the errno and the step that failed. A successful exec closes the pipe, so
//!   the server reads end-of-file; a worker closes it itself once set up,
//!   just before its code runs. A short read would be a bug.
//!
//! The server blocks every signal before forking, so a signal sent to the
//! child early (say, SIGTERM because its client went away) stays pending until
//! the child has put every disposition back to the default.

use std::ffi::{c_char, CString};
use std::io::Write;
use std::os::fd::RawFd;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;

use forkserver_protocol::RunAs;

use crate::dylib::EntryPoint;
use crate::worker::{WorkerContext, WorkerFn};

extern "C" {
    /// The C library's environment, read by `getenv` (and Rust's `env::var`).
    static mut environ: *const *const c_char;
}

/// The size of an error record on the error pipe.
pub(crate) const ERROR_RECORD_LEN: usize = 8;

/// Which step of the child's setup failed, as written to the error pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum FailedStep {
    /// `setsid`, `fcntl` or `dup2`.
    Setup = 1,
    /// `chdir`.
    Chdir = 2,
    /// `execve`.
    Exec = 3,
}

impl FailedStep {
    /// Decodes an error record; `None` for bytes that are not one.
    pub(crate) fn decode(record: [u8; ERROR_RECORD_LEN]) -> Option<(FailedStep, i32)> {
        let errno = i32::from_ne_bytes(record[..4].try_into().ok()?);
        let step = match u32::from_ne_bytes(record[4..].try_into().ok()?) {
            1 => FailedStep::Setup,
            2 => FailedStep::Chdir,
            3 => FailedStep::Exec,
            _ => return None,
        };
        Some((step, errno))
    }
}

/// NUL-terminated strings and the null-terminated pointer array C wants.
pub(crate) struct CStringArray {
    strings: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

impl CStringArray {
    pub(crate) fn new(strings: Vec<CString>) -> CStringArray {
        let ptrs = strings
            .iter()
            .map(|s| s.as_ptr())
            .chain([ptr::null()])
            .collect();
        CStringArray { strings, ptrs }
    }

    pub(crate) fn as_ptr(&self) -> *const *const c_char {
        self.ptrs.as_ptr()
    }

    fn len(&self) -> usize {
        self.strings.len()
    }
}

/// What the child does once it is set up.
pub(crate) enum Action<'m> {
    /// `execve` each path in turn, as execvp does.
    Exec { candidates: Vec<CString> },
    /// Call an embedded worker.
    Worker {
        worker: &'m WorkerFn,
        context: WorkerContext<'m>,
    },
    /// Call `int SYMBOL(int argc, char **argv)` of a dynamic module.
    Dylib { entry: EntryPoint },
}

/// Everything the child needs, built before the fork so that the child only
/// reads it.
pub(crate) struct ChildPlan<'m> {
    /// argv (for exec and dylib entry points).
    pub(crate) argv: CStringArray,
    /// The whole environment, `KEY=VALUE`.
    pub(crate) envp: CStringArray,
    pub(crate) cwd: Option<CString>,
    /// `(source, target)`: install the server's fd `source` as `target`.
    /// Sorted by target; targets are distinct.
    pub(crate) fd_moves: Vec<(RawFd, RawFd)>,
    pub(crate) new_session: bool,
    /// Who the child runs as, if not the server's own credentials.
    pub(crate) credentials: Option<RunAs>,
    pub(crate) no_new_privs: bool,
    /// The server's pid, when the child must die with it.
    pub(crate) die_with_server: Option<libc::pid_t>,
    /// The process name (`comm`) a worker gets, for `ps` and `top`.
    pub(crate) name: Option<CString>,
    pub(crate) action: Action<'m>,
}

/// Runs in the child right after `fork()`: sets the process up as `plan`
/// says and execs it or runs its worker. Never returns.
///
/// # Safety
/// Call only in a freshly forked child of a single-threaded process, with
/// every fd in `plan.fd_moves` and `error_pipe` open.
pub(crate) unsafe fn run_child(plan: ChildPlan<'_>, error_pipe: RawFd) -> ! {
    // 1. Signals: the server installed handlers (through signal-hook) and
    //    ignores SIGPIPE. execve resets handlers but not SIG_IGN, and a handler
    //    firing before exec would write into the server's signal pipe. Put
    //    every disposition back to the default, then unblock the mask the
    //    server set before forking.
    reset_signals();
    run_child_with_default_signals(plan, error_pipe)
}

/// [`run_child`] from step 2, for a child whose signal dispositions are
/// already the defaults and whose mask is empty: an idle pool child reset
/// them before it waited, and 64 `sigaction` calls (~9 µs) are not repeated
/// on the request's path.
///
/// # Safety
/// As [`run_child`], and the signals must be as said.
pub(crate) unsafe fn run_child_with_default_signals(
    mut plan: ChildPlan<'_>,
    error_pipe: RawFd,
) -> ! {
    // SAFETY (whole function): only async-signal-safe calls on memory the
    // parent prepared and which no one else can touch in this process.

    // 2. A new session, so the child is never in the server's process group
    //    (and never gets the terminal's job-control signals meant for it).
    if plan.new_session && libc::setsid() == -1 {
        fail(error_pipe, FailedStep::Setup);
    }

    // 3. File descriptors. Sources may sit on the very numbers other entries
    //    want as targets, so first copy every source (and the error pipe) above
    //    the highest target, then dup2 each copy into place. dup2 clears
    //    close-on-exec on the target; the high copies keep it.
    let highest_target = plan.fd_moves.last().map_or(2, |&(_, target)| target.max(2));
    let floor = highest_target + 1;
    let error_pipe = libc::fcntl(error_pipe, libc::F_DUPFD_CLOEXEC, floor);
    if error_pipe == -1 {
        // Nowhere to report to; the server sees EOF without exec and an exit
        // status of 127.
        libc::_exit(127);
    }
    let mut high = [0 as RawFd; MAX_MOVES];
    if plan.fd_moves.len() > MAX_MOVES {
        fail_with(error_pipe, FailedStep::Setup, libc::E2BIG);
    }
    for (i, &(source, _)) in plan.fd_moves.iter().enumerate() {
        high[i] = libc::fcntl(source, libc::F_DUPFD_CLOEXEC, floor);
        if high[i] == -1 {
            fail(error_pipe, FailedStep::Setup);
        }
    }
    for (i, &(_, target)) in plan.fd_moves.iter().enumerate() {
        if retry_eintr(|| libc::dup2(high[i], target)) == -1 {
            fail(error_pipe, FailedStep::Setup);
        }
    }
    // 4. Close every fd the child was not given: the gaps between targets, and
    //    everything from `floor` up except the error pipe (the high copies,
    //    the listener, other clients' sockets, the signal pipe, epoll...).
    let mut next = 0;
    for &(_, target) in &plan.fd_moves {
        if target > next {
            close_range(next, target - 1);
        }
        next = target + 1;
    }
    if next < floor {
        close_range(next, floor - 1);
    }
    if error_pipe > floor {
        close_range(floor, error_pipe - 1);
    }
    close_range(error_pipe + 1, RawFd::MAX);

    // 5. Credentials, in the only order that works: supplementary groups and
    //    gid while we still may, uid last; then check the change took.
    if let Some(user) = &plan.credentials {
        if libc::setgroups(user.groups.len(), user.groups.as_ptr()) == -1
            || libc::setgid(user.gid) == -1
            || libc::setuid(user.uid) == -1
        {
            fail(error_pipe, FailedStep::Setup);
        }
        if libc::getuid() != user.uid
            || libc::geteuid() != user.uid
            || libc::getgid() != user.gid
            || libc::getegid() != user.gid
        {
            fail_with(error_pipe, FailedStep::Setup, libc::EPERM);
        }
    }
    if plan.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1 {
        fail(error_pipe, FailedStep::Setup);
    }
    // The parent-death signal is cleared by credential changes, so it is set
    // after them. If the server died before this point, the signal will
    // never come: getppid() tells.
    if let Some(server) = plan.die_with_server {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1 {
            fail(error_pipe, FailedStep::Setup);
        }
        if libc::getppid() != server {
            libc::_exit(127);
        }
    }

    // 6. Working directory (after the credential change, so the user's own
    //    permissions apply).
    if let Some(cwd) = &plan.cwd {
        if libc::chdir(cwd.as_ptr()) == -1 {
            fail(error_pipe, FailedStep::Chdir);
        }
    }

    match plan.action {
        Action::Exec { candidates } => exec(&candidates, &plan.argv, &plan.envp, error_pipe),
        Action::Worker {
            worker,
            mut context,
        } => {
            start_worker(plan.name.as_ref(), &plan.envp, error_pipe);
            // From here on the worker's own code runs in a new
            // single-threaded process; it may allocate, lock, print.
            let code =
                panic::catch_unwind(AssertUnwindSafe(|| worker(&mut context))).unwrap_or(101);
            exit_flushed(code)
        }
        Action::Dylib { entry } => {
            start_worker(plan.name.as_ref(), &plan.envp, error_pipe);
            // The module may permute the argv array (getopt does); it is
            // this process's own copy.
            let argc = plan.argv.len() as libc::c_int;
            let code = entry(argc, plan.argv.ptrs.as_mut_ptr().cast());
            exit_flushed(code)
        }
    }
}

/// Every disposition back to the default, and an empty signal mask.
unsafe fn reset_signals() {
    let mut default: libc::sigaction = std::mem::zeroed();
    default.sa_sigaction = libc::SIG_DFL;
    for signal in 1..=libc::SIGRTMAX() {
        if signal != libc::SIGKILL && signal != libc::SIGSTOP {
            // Fails only for numbers libc reserves (32, 33); nothing to reset.
            libc::sigaction(signal, &default, ptr::null_mut());
        }
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::pthread_sigmask(libc::SIG_SETMASK, &empty, ptr::null_mut());
}

/// A prefork pool child, right after `fork()`: drops everything of the
/// server's it must not hold while idle (every fd but its control socket,
/// error pipe and /dev/null), maps code in, runs `prewarm` (the builder's
/// [`pool_prewarm`](crate::ServerBuilder::pool_prewarm); a panic there is
/// ignored) with signals still blocked, resets its signal dispositions,
/// tells the server it is ready, then waits for its one request and
/// becomes it via `specialise`, which must end in
/// [`run_child_with_default_signals`] (it returns `Infallible`: it cannot
/// return).
///
/// Unlike the fork-to-exec path, an idle pool child is a process of its own:
/// a copy of the single-threaded server, so it may allocate and decode. If
/// the server closes the control socket (a flush, or shutdown) before
/// sending a request, the child exits 0.
///
/// # Safety
/// Call only in a freshly forked child of a single-threaded process, with
/// `control` and `error_pipe` open.
pub(crate) unsafe fn run_pool_child(
    control: RawFd,
    error_pipe: RawFd,
    dev_null: RawFd,
    prewarm: impl FnOnce(),
    specialise: impl FnOnce(Vec<u8>, Vec<std::os::fd::OwnedFd>) -> std::convert::Infallible,
) -> ! {
    // Signals stay blocked (as the server forked) until the warm-up is
    // over: the server's handlers are still installed, and one would write
    // into whatever file reuses the number of the server's signal pipe.
    // Keep 0-2 (they are replaced when the request comes), the control
    // socket, the error pipe and /dev/null (for `null` stdio); close the rest.
    let mut keep = [control, error_pipe, dev_null];
    keep.sort_unstable();
    let mut next = 3;
    for fd in keep {
        if fd > next {
            close_range(next, fd - 1);
        }
        next = next.max(fd + 1);
    }
    close_range(next, RawFd::MAX);
    map_code_in();
    // Best effort: a failed warm-up leaves a cold child, still usable.
    let _ = panic::catch_unwind(AssertUnwindSafe(prewarm));
    // Default dispositions from here on (what a prewarm installed goes
    // too, as it would in a forked worker), so the request's path need not
    // reset them again.
    reset_signals();
    // Ready: one byte the server reads before choosing a child for a request
    // (ignored if the server has gone; the recv below then sees EOF).
    // SAFETY: a one-byte static buffer, sent on our own socket.
    libc::send(
        control,
        b"r".as_ptr().cast(),
        1,
        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
    );
    // SAFETY: control is ours alone now; the borrow lasts for the call.
    let socket = std::os::fd::BorrowedFd::borrow_raw(control);
    match forkserver_protocol::recv_datagram(socket, 1 << 20, 512, 0) {
        Ok(Some(datagram)) if !datagram.truncated && !datagram.fds_truncated => {
            libc::close(control);
            match specialise(datagram.bytes, datagram.fds) {}
        }
        // EOF: flushed before use. Anything else: nothing to become.
        _ => libc::_exit(0),
    }
}

/// Enters into this idle pool child's page tables the code and read-only
/// data of the file holding the server's code and of the C library. fork
/// copies no page-table entries for file mappings, so without this each
/// code page the request's decode, plan and setup run faults on first use:
/// ~20 faults, ~80 µs of a pool hit (traced with exceptions:page_fault_user).
/// MADV_POPULATE_READ (Linux 5.14) fills them now, off the request's path;
/// on older kernels it fails and the child stays as it was.
fn map_code_in() {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let ours = map_code_in as *const () as usize;
    let libc_code = libc::close as *const () as usize;
    let mappings: Vec<(usize, usize, &str, &str)> = maps
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let perms = fields.next()?;
            let path = fields.nth(3)?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            Some((start, end, perms, path))
        })
        .collect();
    let file_of = |address: usize| {
        mappings
            .iter()
            .find(|&&(start, end, _, _)| (start..end).contains(&address))
            .map(|&(_, _, _, path)| path)
    };
    let files = [file_of(ours), file_of(libc_code)];
    for &(start, end, perms, path) in &mappings {
        if files.contains(&Some(path)) && !perms.contains('w') {
            // SAFETY: advice on a range this process has mapped; populating
            // page-table entries for readable pages changes no contents.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_POPULATE_READ,
                );
            }
        }
    }
}

/// Step 7 for programs: exec, trying each candidate path as execvp does: keep going past "not
/// here" errors, remember that some candidate was not executable, and stop at
/// any other error.
unsafe fn exec(
    candidates: &[CString],
    argv: &CStringArray,
    envp: &CStringArray,
    error_pipe: RawFd,
) -> ! {
    let mut saw_eacces = false;
    let mut errno = libc::ENOENT;
    for path in candidates {
        libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        errno = last_errno();
        match errno {
            libc::EACCES => saw_eacces = true,
            libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
            _ => break,
        }
    }
    if saw_eacces && errno != libc::EACCES && is_not_found(errno) {
        errno = libc::EACCES;
    }
    fail_with(error_pipe, FailedStep::Exec, errno)
}

/// Step 7 for workers: name the process, install the environment, and close the
/// error pipe, which tells the server the worker has started.
unsafe fn start_worker(name: Option<&CString>, envp: &CStringArray, error_pipe: RawFd) {
    if let Some(name) = name {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
    }
    // The array outlives the worker: this process ends in _exit without
    // ever dropping the plan.
    environ = envp.as_ptr();
    libc::close(error_pipe);
}

/// Flushes Rust's and C's buffered stdout (a worker's `println!`/`printf`
/// output), then exits without running the server's atexit handlers.
fn exit_flushed(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    // SAFETY: fflush(NULL) flushes every C stdio stream; _exit never returns.
    unsafe {
        libc::fflush(ptr::null_mut());
        libc::_exit(code)
    }
}

/// At most this many fds are installed in one child (0–2 plus passed ones);
/// it bounds the stack array the child uses instead of allocating. The
/// server's `max_fds_per_message` limit is checked against it at start.
pub(crate) const MAX_MOVES: usize = 256;

fn is_not_found(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT
    )
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// close_range(2); falls back to closing one by one up to the fd limit on
/// kernels older than 5.9.
unsafe fn close_range(first: RawFd, last: RawFd) {
    let rc = libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0);
    if rc == -1 {
        let limit = match libc::sysconf(libc::_SC_OPEN_MAX) {
            n if n > 0 => n.min(last as libc::c_long + 1) as RawFd,
            _ => 1024.min(last.saturating_add(1)),
        };
        for fd in first..limit {
            libc::close(fd);
        }
    }
}

unsafe fn retry_eintr(mut call: impl FnMut() -> i32) -> i32 {
    loop {
        let rc = call();
        if rc != -1 || last_errno() != libc::EINTR {
            return rc;
        }
    }
}

unsafe fn fail(error_pipe: RawFd, step: FailedStep) -> ! {
    fail_with(error_pipe, step, last_errno())
}

/// Writes the error record and exits 127, the shell's "cannot run" status.
pub(crate) unsafe fn fail_with(error_pipe: RawFd, step: FailedStep, errno: i32) -> ! {
    let mut record = [0u8; ERROR_RECORD_LEN];
    record[..4].copy_from_slice(&errno.to_ne_bytes());
    record[4..].copy_from_slice(&(step as u32).to_ne_bytes());
    // A pipe write of 8 bytes is atomic (< PIPE_BUF); if it fails the server
    // still sees the exit status.
    retry_eintr(|| libc::write(error_pipe, record.as_ptr().cast(), record.len()) as i32);
    libc::_exit(127)
}
