//! The child between `fork()` and `execve()` or its worker: [`run`].
//!
//! Everything here executes in the new child process, a copy of the
//! single-threaded server. Its rules, after Rust std's unix process code:
//! - until the worker's own code starts: no allocation, no locks, no stdio,
//!   no panics; only async-signal-safe libc calls on data prepared before
//!   the fork ([`ChildPlan`]). (Allocation would in fact be safe, because
//!   the thread guard guarantees no other thread held the malloc lock at
//!   fork, but the setup needs none.)
//! - never return and never unwind into the server's code: every path ends
//!   in `execve`, the worker's exit, or [`Reporter::fail`], the one writer
//!   of the failure record. A worker runs under `catch_unwind`; a panic
//!   exits 101 (the default hook has printed the message to its stderr).
//!
//! The server blocks every signal before forking, so a signal sent to the
//! child early (say, SIGTERM because its client went away) stays pending
//! until the child has put every disposition back to the default.
//!
//! A child that only execs may instead share the server's memory until its
//! exec (`clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn`): it runs
//! [`run_exec_sharing_memory`], under stricter rules written there.

use std::convert::Infallible;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::RawFd;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;

use super::controls::Controls;
use super::plan::{Action, CStringArray, ChildPlan, ChildSignals, MAX_MOVES};
use super::report::{FailedStep, Failure, Reporter};
use crate::sys::cvt_r;

extern "C" {
    /// The C library's environment, read by `getenv` (and Rust's `env::var`).
    static mut environ: *const *const libc::c_char;
}

/// Runs in the child right after `fork()`: resets signal dispositions,
/// sets the process up as `plan` says, and execs it or runs its worker.
/// Never returns; a failed step is reported through `reporter`.
///
/// # Safety
/// Call only in a freshly forked child of a single-threaded process, with
/// every fd in `plan.fd_moves` and the reporter's pipe open.
pub(crate) unsafe fn run(plan: ChildPlan<'_>, reporter: &Reporter) -> ! {
    // 1. Signals: the server installed handlers (through signal-hook) and
    //    ignores SIGPIPE. execve resets handlers but not SIG_IGN, and a
    //    handler firing before exec would write into the server's signal
    //    pipe. Put every disposition back to the default, then unblock the
    //    mask the server set before forking.
    // SAFETY: a fresh child, as the caller guarantees.
    unsafe { reset_signals() };
    // SAFETY: as above, and the signals are now as the next call needs.
    unsafe { run_with_default_signals(plan, reporter) }
}

/// [`run`] from step 2, for a child whose signal dispositions are already
/// the defaults and whose mask is empty: an idle pool child reset them
/// before it waited, so the request's path does not repeat it.
///
/// # Safety
/// As [`run`], and the signals must be as said.
pub(crate) unsafe fn run_with_default_signals(plan: ChildPlan<'_>, reporter: &Reporter) -> ! {
    // SAFETY: the caller's guarantees are setup's.
    let Err(failure) = unsafe { setup(plan, reporter) };
    reporter.fail(failure)
}

/// Runs in a child made by `clone(CLONE_VM | CLONE_VFORK)` for a plan
/// that execs ([`Launcher::exec_sharing_memory`](super::Launcher)): resets
/// the signals, sets the process up and execs, as [`run`] does. Never
/// returns; a failed step is reported through `reporter`.
///
/// This child runs in the server's memory, on a stack of its own, while the
/// server's thread waits for it to exec or exit. On top of the rules above:
/// it writes no memory but its own stack, and takes the plan by reference,
/// so nothing of the server's is moved, dropped or freed here (the server
/// drops the plan once the child has gone); and it makes no C library call
/// that consults the server's threads (the `setuid` family broadcasts to
/// every thread of the process it thinks it is in), which is why a plan
/// with credentials is forked instead (as is one with a cgroup, which
/// needs `clone3`).
///
/// # Safety
/// Call only in such a child, with every fd in `plan.fd_moves` and the
/// reporter's pipe open, and `plan.action` an [`Action::Exec`].
pub(crate) unsafe fn run_exec_sharing_memory(plan: &ChildPlan<'_>, reporter: &Reporter) -> ! {
    // SAFETY: a fresh child, as the caller guarantees; sigaction and
    // sigprocmask change only this process's signal state.
    unsafe { reset_signals() };
    // SAFETY: as the caller guarantees.
    if let Err(failure) = unsafe { prepare(plan, reporter) } {
        reporter.fail(failure)
    }
    let Action::Exec { candidates } = &plan.action else {
        reporter.fail(Failure::new(FailedStep::Setup, libc::EINVAL))
    };
    // SAFETY: the strings were built before the clone and live on.
    reporter.fail(unsafe { exec(candidates, &plan.argv, &plan.envp) })
}

/// Steps 2 to 9. Returns only with the step that failed.
///
/// # Safety
/// As [`run_with_default_signals`].
unsafe fn setup(plan: ChildPlan<'_>, reporter: &Reporter) -> Result<Infallible, Failure> {
    // SAFETY: as the caller guarantees.
    unsafe { prepare(&plan, reporter) }?;
    // SAFETY: as the caller guarantees.
    unsafe { become_target(plan, reporter) }
}

/// Steps 2 to 8: session, fds, terminal, controls, credentials, directory
/// and umask, signals, reading the plan only. Returns the step that failed.
///
/// # Safety
/// As [`run_with_default_signals`].
unsafe fn prepare(plan: &ChildPlan<'_>, reporter: &Reporter) -> Result<(), Failure> {
    let check = |rc: libc::c_int, step| {
        if rc == -1 {
            Err(Failure::last_os_error(step))
        } else {
            Ok(rc)
        }
    };

    // 2. A new session, so the child is never in the server's process group
    //    (and never gets the terminal's job-control signals meant for it).
    if plan.new_session {
        // SAFETY: setsid has no memory effects.
        check(unsafe { libc::setsid() }, FailedStep::Session)?;
    }
    //    Or a process group of the client's choosing (0: a new one).
    if let Some(pgid) = plan.process_group {
        // SAFETY: setpgid has no memory effects.
        check(unsafe { libc::setpgid(0, pgid) }, FailedStep::Session)?;
    }

    // 3. File descriptors. Sources may sit on the very numbers other entries
    //    want as targets, so first copy every source (and the report pipe,
    //    and the directory fd) above the highest target, then dup2 each copy
    //    into place. dup2 clears close-on-exec on the target; the high copies
    //    keep it.
    let highest_target = plan.fd_moves.last().map_or(2, |&(_, target)| target.max(2));
    let floor = highest_target + 1;
    if plan.fd_moves.len() > MAX_MOVES {
        return Err(Failure::new(FailedStep::Fds, libc::E2BIG));
    }
    //    The copies need room above the highest target: a target near the
    //    fd limit would leave none (EINVAL), so the soft limit is raised to
    //    the hard one for the moves and put back once they are done.
    // SAFETY: getrlimit and setrlimit read and write a local rlimit.
    let lowered = unsafe { room_for_copies(floor + plan.fd_moves.len() as RawFd + 3) }?;
    // SAFETY: F_DUPFD_CLOEXEC duplicates an fd we hold; no memory effects.
    let moved = unsafe { libc::fcntl(reporter.fd(), libc::F_DUPFD_CLOEXEC, floor) };
    reporter.moved_to(check(moved, FailedStep::Fds)?);
    // The cgroup directory, if the child must move itself into it.
    let cgroup_fd = match plan.cgroup.filter(|_| !plan.cgroup_placed) {
        // SAFETY: as above; the fd is open (the caller guarantees).
        Some(fd) => Some(check(
            unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor) },
            FailedStep::Fds,
        )?),
        None => None,
    };
    let cwd_fd = match plan.cwd_fd {
        // SAFETY: as above; the directory fd is open (the caller guarantees).
        Some(fd) => Some(check(
            unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor) },
            FailedStep::Fds,
        )?),
        None => None,
    };
    let mut high = [0 as RawFd; MAX_MOVES];
    for (i, &(source, _)) in plan.fd_moves.iter().enumerate() {
        // SAFETY: as above; every source is open (the caller guarantees).
        high[i] = check(
            unsafe { libc::fcntl(source, libc::F_DUPFD_CLOEXEC, floor) },
            FailedStep::Fds,
        )?;
    }
    for (i, &(_, target)) in plan.fd_moves.iter().enumerate() {
        // SAFETY: dup2 between fds; EINTR is retried.
        cvt_r(|| unsafe { libc::dup2(high[i], target) })
            .map_err(|_| Failure::last_os_error(FailedStep::Fds))?;
    }

    // 4. Close every fd the child was not given: the gaps between targets,
    //    and everything from `floor` up except the report pipe and the
    //    directory fd (the high copies, the listener, other clients'
    //    sockets, the signal pipe, epoll...).
    // SAFETY: this child execs or runs its worker next; the server's
    // objects owning these fds are never used in it again.
    unsafe {
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
        close_except(
            floor,
            [reporter.fd(), cwd_fd.unwrap_or(-1), cgroup_fd.unwrap_or(-1)],
        );
    }
    if let Some(limit) = lowered {
        // SAFETY: setrlimit reads a local rlimit; lowering the soft limit
        // below open fds is allowed (they stay open).
        check(
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) },
            FailedStep::Fds,
        )?;
    }

    //    A terminal of its own at 0-2 becomes the controlling terminal of
    //    the new session (after setsid, as TIOCSCTTY requires).
    if plan.controlling_tty {
        // SAFETY: ioctl on fd 0, a terminal; the argument is an int.
        check(
            unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) },
            FailedStep::Terminal,
        )?;
    }

    // 5. Process controls, while the child still has the server's
    //    privileges (a higher hard limit, a lower nice or oom_score_adj need
    //    them; the server checked what this peer may ask for).
    // SAFETY: the plan's data lives on; these calls change only this
    // process.
    unsafe { apply_controls(&plan.controls) }?;
    if let Some(dir) = cgroup_fd {
        // SAFETY: our own fd; the write moves only this process.
        unsafe { join_cgroup(dir) }?;
    }

    // 6. Credentials, in the only order that works: supplementary groups and
    //    gid while we still may, uid last; then check the change took.
    if let Some(user) = &plan.credentials {
        // SAFETY: the groups slice is valid for its length; the id calls
        // have no memory effects.
        unsafe {
            check(
                libc::setgroups(user.groups.len(), user.groups.as_ptr()),
                FailedStep::Credentials,
            )?;
            check(libc::setgid(user.gid), FailedStep::Credentials)?;
            check(libc::setuid(user.uid), FailedStep::Credentials)?;
        }
        // SAFETY: these getters cannot fail.
        let took = unsafe {
            libc::getuid() == user.uid
                && libc::geteuid() == user.uid
                && libc::getgid() == user.gid
                && libc::getegid() == user.gid
        };
        if !took {
            return Err(Failure::new(FailedStep::Credentials, libc::EPERM));
        }
    }
    if plan.no_new_privs {
        // SAFETY: prctl with integer arguments only.
        check(
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
            FailedStep::NoNewPrivs,
        )?;
    }
    // The parent-death signal is cleared by credential changes, so it is set
    // after them. If the server died before this point, the signal will
    // never come: getppid() tells.
    if let Some(server) = plan.die_with_server {
        // SAFETY: prctl with integer arguments only.
        check(
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) },
            FailedStep::Setup,
        )?;
        // SAFETY: getppid cannot fail.
        if unsafe { libc::getppid() } != server {
            // No one is left to report to; end as the signal would have.
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(127) };
        }
    }

    // 7. Working directory (after the credential change, so the user's own
    //    permissions apply): the client's directory fd, then `cwd`, which
    //    may be relative to it. Then the file mode creation mask.
    if let Some(fd) = cwd_fd {
        // SAFETY: fchdir and close on our own fd; no memory effects.
        unsafe {
            check(libc::fchdir(fd), FailedStep::Chdir)?;
            libc::close(fd);
        }
    }
    if let Some(cwd) = &plan.cwd {
        // SAFETY: cwd is NUL-terminated.
        check(unsafe { libc::chdir(cwd.as_ptr()) }, FailedStep::Chdir)?;
    }
    if let Some(mask) = plan.umask {
        // SAFETY: umask cannot fail and has no memory effects.
        unsafe { libc::umask(mask) };
    }

    // 8. The caller's signals, last, so that none of them holds up the
    //    setup: the signals it ignores (exec keeps SIG_IGN, as it would
    //    have from the caller), then its signal mask. Until here the child
    //    had every disposition at its default and nothing blocked.
    // SAFETY: the sets were built before the fork; sigaction and
    // sigprocmask change only this process's signal state.
    unsafe { apply_signals(&plan.signals) }
}

/// Raises the soft limit on open files to the hard one if fds up to
/// `highest` do not fit under it; returns the limit to put back, if it did.
///
/// # Safety
/// Call only in the child being set up (the limit is the process's).
unsafe fn room_for_copies(highest: RawFd) -> Result<Option<libc::rlimit>, Failure> {
    // SAFETY: rlimit is plain data, filled in by getrlimit.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes one rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == -1 {
        return Err(Failure::last_os_error(FailedStep::Fds));
    }
    if (highest as u64) < limit.rlim_cur || limit.rlim_cur == limit.rlim_max {
        return Ok(None);
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads one rlimit; up to the hard limit needs no
    // privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == -1 {
        return Err(Failure::last_os_error(FailedStep::Fds));
    }
    Ok(Some(limit))
}

/// Ignores the signals in `signals.ignored` and sets the mask.
///
/// # Safety
/// Call only in the child being set up (it changes the process's signal
/// dispositions).
unsafe fn apply_signals(signals: &ChildSignals) -> Result<(), Failure> {
    if let Some(ignored) = &signals.ignored {
        // SAFETY: a zeroed sigaction with SIG_IGN is a valid disposition.
        let mut ignore: libc::sigaction = unsafe { std::mem::zeroed() };
        ignore.sa_sigaction = libc::SIG_IGN;
        for signal in 1..=libc::SIGRTMAX() {
            // SAFETY: the set is initialised (built with sigemptyset).
            if unsafe { libc::sigismember(ignored, signal) } == 1 {
                // SAFETY: as above; the plan checked the numbers.
                if unsafe { libc::sigaction(signal, &ignore, ptr::null_mut()) } == -1 {
                    return Err(Failure::last_os_error(FailedStep::Signals));
                }
            }
        }
    }
    if let Some(mask) = &signals.mask {
        // SAFETY: as above.
        let rc = unsafe { libc::sigprocmask(libc::SIG_SETMASK, mask, ptr::null_mut()) };
        if rc == -1 {
            return Err(Failure::last_os_error(FailedStep::Signals));
        }
    }
    Ok(())
}

/// Step 9: become the program or the worker. Returns only with the failure
/// of an exec.
///
/// # Safety
/// As [`run_with_default_signals`], after [`prepare`].
unsafe fn become_target(
    mut plan: ChildPlan<'_>,
    reporter: &Reporter,
) -> Result<Infallible, Failure> {
    match plan.action {
        // SAFETY: the strings were built before the fork and live on.
        Action::Exec { candidates } => Err(unsafe { exec(&candidates, &plan.argv, &plan.envp) }),
        Action::Worker {
            worker,
            mut context,
        } => {
            // SAFETY: a single-threaded child; the plan outlives the worker.
            unsafe { start_worker(plan.name.as_ref(), &plan.envp, reporter) };
            // From here on the worker's own code runs in a new
            // single-threaded process; it may allocate, lock, print.
            let code =
                panic::catch_unwind(AssertUnwindSafe(|| worker(&mut context))).unwrap_or(101);
            exit_flushed(code)
        }
        Action::Dylib { entry } => {
            // SAFETY: as above.
            unsafe { start_worker(plan.name.as_ref(), &plan.envp, reporter) };
            // The module may permute the argv array (getopt does); it is
            // this process's own copy.
            let argc = plan.argv.len() as libc::c_int;
            // SAFETY: the module's contract: `int SYMBOL(int, char **)`
            // with a NULL-terminated argv, which CStringArray is.
            let code = unsafe { entry(argc, plan.argv.as_mut_ptr().cast()) };
            exit_flushed(code)
        }
        // Only the front plans these, to check them, and never forks them.
        Action::InZygote => Err(Failure::new(FailedStep::Setup, libc::EINVAL)),
    }
}

/// Resource limits, nice, CPU affinity and `oom_score_adj`, as planned.
///
/// # Safety
/// Only in a forked child: async-signal-safe calls on prepared data.
// RLIMIT_* is c_uint on glibc and c_int on musl: the cast is for the latter.
#[allow(clippy::unnecessary_cast)]
unsafe fn apply_controls(controls: &Controls) -> Result<(), Failure> {
    for (resource, limit) in &controls.rlimits {
        // SAFETY: a valid rlimit for a known resource.
        if unsafe { libc::setrlimit(*resource, limit) } == -1 {
            return Err(Failure::last_os_error_about(
                FailedStep::Rlimit,
                *resource as u32,
            ));
        }
    }
    if let Some(nice) = controls.nice {
        // SAFETY: setpriority takes plain integers (who 0: this process).
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } == -1 {
            return Err(Failure::last_os_error(FailedStep::Nice));
        }
    }
    if let Some(cpus) = &controls.cpus {
        // SAFETY: the set and its size describe a cpu_set_t.
        let rc =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), cpus) };
        if rc == -1 {
            return Err(Failure::last_os_error(FailedStep::Cpus));
        }
    }
    if let Some(value) = &controls.oom_score_adj {
        // SAFETY: a NUL-terminated path; the fd is ours and closed here.
        unsafe {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            let written = fd != -1
                && libc::write(fd, value.as_ptr().cast(), value.len()) == value.len() as isize;
            let failure = (!written).then(|| Failure::last_os_error(FailedStep::OomScoreAdj));
            if fd != -1 {
                libc::close(fd);
            }
            if let Some(failure) = failure {
                return Err(failure);
            }
        }
    }
    Ok(())
}

/// Moves this process into the cgroup whose directory is `dir`, by
/// writing its pid to `cgroup.procs`, then closes `dir`.
///
/// # Safety
/// Only in a forked child: `dir` is its own fd.
unsafe fn join_cgroup(dir: RawFd) -> Result<(), Failure> {
    // The pid in decimal, without allocating.
    // SAFETY: getpid cannot fail.
    let mut pid = unsafe { libc::getpid() } as u32;
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    // SAFETY: a NUL-terminated name relative to our fd; a local buffer.
    unsafe {
        let procs = libc::openat(
            dir,
            c"cgroup.procs".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        let len = digits.len() - at;
        let written =
            procs != -1 && libc::write(procs, digits[at..].as_ptr().cast(), len) == len as isize;
        let failure = (!written).then(|| Failure::last_os_error(FailedStep::Cgroup));
        if procs != -1 {
            libc::close(procs);
        }
        libc::close(dir);
        failure.map_or(Ok(()), Err)
    }
}

/// Every disposition back to the default, and an empty signal mask.
///
/// # Safety
/// Only in a forked child: it removes the server's handlers.
pub(crate) unsafe fn reset_signals() {
    // SAFETY: sigaction and sigset_t are plain data, filled in here; the
    // calls change only this process's signal state.
    unsafe {
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        for signal in 1..=libc::SIGRTMAX() {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                // Fails only for numbers libc reserves (32, 33); nothing to
                // reset there.
                libc::sigaction(signal, &default, ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, ptr::null_mut());
    }
}

/// Exec, trying each candidate path as execvp does: keep going past "not
/// here" errors, remember that some candidate was not executable, and stop
/// at any other error. Returns only with the failure to report.
///
/// # Safety
/// The arrays must be NULL-terminated arrays of NUL-terminated strings.
unsafe fn exec(candidates: &[CString], argv: &CStringArray, envp: &CStringArray) -> Failure {
    let mut saw_eacces = false;
    let mut failure = Failure::new(FailedStep::Exec, libc::ENOENT);
    for path in candidates {
        // SAFETY: as the caller guarantees.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        failure = Failure::last_os_error(FailedStep::Exec);
        match failure.errno {
            libc::EACCES => saw_eacces = true,
            errno if is_not_found(errno) => {}
            _ => break,
        }
    }
    // glibc's rule: if some candidate existed but was not executable, and
    // the search ended on "not found", report EACCES.
    if saw_eacces && is_not_found(failure.errno) {
        failure.errno = libc::EACCES;
    }
    failure
}

fn is_not_found(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT
    )
}

/// For workers: name the process, install the environment, and close the
/// report pipe, which tells the server the worker has started.
///
/// # Safety
/// Single-threaded (nothing reads `environ` concurrently), and `envp` must
/// outlive the process: it ends in `_exit` without dropping the plan.
unsafe fn start_worker(name: Option<&CString>, envp: &CStringArray, reporter: &Reporter) {
    if let Some(name) = name {
        // SAFETY: name is NUL-terminated.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
    // SAFETY: as the caller guarantees.
    unsafe { environ = envp.as_ptr() };
    reporter.close_as_started();
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

/// Closes every fd from `from` up except those in `keep` (any order;
/// numbers below `from` are ignored).
///
/// # Safety
/// As [`close_range`].
pub(crate) unsafe fn close_except<const N: usize>(from: RawFd, mut keep: [RawFd; N]) {
    keep.sort_unstable();
    let mut next = from;
    for fd in keep {
        if fd < next {
            continue;
        }
        if fd > next {
            // SAFETY: as the caller guarantees.
            unsafe { close_range(next, fd - 1) };
        }
        next = fd + 1;
    }
    // SAFETY: as the caller guarantees.
    unsafe { close_range(next, RawFd::MAX) };
}

/// close_range(2); falls back to closing one by one up to the fd limit on
/// kernels older than 5.9.
///
/// # Safety
/// Only in a forked child about to exec or become a worker: nothing that
/// owns an fd in the range (the server's copies of its `OwnedFd`s) may use
/// or close it afterwards.
pub(crate) unsafe fn close_range(first: RawFd, last: RawFd) {
    // SAFETY: as the caller guarantees; closing has no memory effects.
    unsafe {
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
}
