//! The thread guard: the server forks only while it is the only thread.
//!
//! `fork()` copies just the calling thread. Every lock another thread held at
//! that instant (malloc arenas, loggers, runtimes' queues) stays locked forever
//! in the child, which then deadlocks the first time it touches one. So the
//! server counts its threads in `/proc/self/task` at start and before every
//! fork and refuses to fork when there is more than one.
//!
//! Two ways past that, chosen by the operator ([`ThreadPolicy`]):
//! - *dormant* threads: asleep, and not scheduled since the preloads ended
//!   (their context-switch counts in `/proc/self/task/TID/status` have not
//!   moved), or, if one woke up since, asleep and unscheduled again for
//!   2 ms (back in its idle wait). A fork copies such a thread's memory as
//!   it was when it went to sleep. Polars 2.x starts three like that at
//!   import (two jemalloc background threads, its out-of-core cleaner, which
//!   wakes up now and then). It is safe unless a thread sleeps holding a lock
//!   other code needs, which an idle pool waiting on a condition variable
//!   does not (the wait releases the lock). A thread that appears after the
//!   preloads, or keeps running, makes the fork fail with kind `threads`.
//! - `--allow-threads`: no check at all.

use std::cell::RefCell;
use std::fmt;
use std::fs;
use std::time::{Duration, Instant};

use crate::log::{log, Level};
use crate::sys;

/// What the server tolerates besides its own thread when it forks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThreadPolicy {
    /// Fork only while single-threaded (after fork handlers had their
    /// chance to stop their pools; see
    /// [`ensure_single_threaded_after_fork_handlers`]).
    #[default]
    Refuse,
    /// Also fork while every other thread is dormant: asleep, and not run
    /// since the preloads ended or for the last 2 ms
    /// (`--allow-dormant-threads`).
    AllowDormant,
    /// Never check (`--allow-threads`); children may deadlock.
    Allow,
}

/// Applies `policy` to the threads this process has now (`when` says when,
/// for the log): Ok to go on serving, logging what was stopped or tolerated;
/// Err names the threads that make forking unsafe.
pub(crate) fn tolerate(when: &str, policy: ThreadPolicy) -> Result<(), MultiThreaded> {
    let threads = match ensure_single_threaded_after_fork_handlers() {
        Ok(stopped) if stopped.is_empty() => return Ok(()),
        Ok(stopped) => {
            log!(
                Level::Info,
                "{when}: {} thread(s) were stopped by their library's fork handler (pthread_atfork), so forking stays safe: {}",
                stopped.len(),
                names(&stopped)
            );
            return Ok(());
        }
        Err(threads) => threads,
    };
    match policy {
        ThreadPolicy::Refuse => Err(threads),
        ThreadPolicy::AllowDormant => match sleeping_threads() {
            Ok(sleeping) => {
                let sleeping: Vec<ThreadInfo> = sleeping.into_iter().map(|t| t.info).collect();
                log!(
                    Level::Info,
                    "{when}: tolerating {} dormant thread(s) (--allow-dormant-threads): {}; a fork waits while one of them runs, and is refused if it keeps running",
                    sleeping.len(),
                    names(&sleeping)
                );
                Ok(())
            }
            Err(why) => {
                log!(Level::Error, "{when}: {why}");
                Err(threads)
            }
        },
        ThreadPolicy::Allow => {
            log!(
                Level::Warn,
                "--allow-threads: {when}, {threads}. Serving anyway; children may deadlock.{}",
                remedies(&threads)
            );
            Ok(())
        }
    }
}

fn names(threads: &[ThreadInfo]) -> String {
    threads
        .iter()
        .map(|t| format!("{} '{}'", t.tid, t.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How long a tolerated thread that woke up must stay asleep, unscheduled,
/// before a fork goes ahead; and how long a fork waits for that at most.
/// Short, because Polars' cleaner wakes up often while other processes
/// work, and every fork would wait for it (BENCHMARKS.md has the figures).
/// What the window guards against is a thread caught between two steps; a
/// sleeping thread's locks are the same after 2 ms as after 50.
const QUIET: Duration = Duration::from_millis(2);
const QUIET_WAIT_LIMIT: Duration = Duration::from_millis(200);

/// The check made before every fork, armed once the preloads are done.
#[derive(Debug)]
pub(crate) enum ForkGuard {
    Strict(ThreadCount),
    /// The threads tolerated and their context-switch counts when last
    /// seen quiet.
    Dormant(ThreadCount, RefCell<Vec<ThreadState>>),
    Off,
}

/// This process's number of threads, as the `num_threads` field of
/// `/proc/self/stat` (proc(5)) says, read through a file opened once: one
/// pread(2) per check. Listing `/proc/self/task` instead costs an open, two
/// getdents and a close, and an allocation per entry, before every child
/// the server makes. Only "one thread, yes or no" is read this way; the
/// names in an error still come from the listing.
#[derive(Debug)]
pub(crate) struct ThreadCount {
    /// None if /proc could not be opened: then every check lists the
    /// threads, as [`ensure_single_threaded`] does.
    stat: Option<fs::File>,
}

impl ThreadCount {
    pub(crate) fn open() -> ThreadCount {
        ThreadCount {
            stat: fs::File::open("/proc/self/stat").ok(),
        }
    }

    /// Ok when this process has exactly one thread.
    pub(crate) fn ensure_one(&self) -> Result<(), MultiThreaded> {
        match self.stat.as_ref().and_then(num_threads) {
            Some(1) => Ok(()),
            _ => ensure_single_threaded(),
        }
    }
}

/// `num_threads` of a `/proc/PID/stat`, read afresh (a read at offset 0
/// makes the kernel generate the line again).
fn num_threads(stat: &fs::File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    // The line is about 300 bytes; the command name in it at most 64.
    let mut line = [0u8; 1024];
    let len = stat.read_at(&mut line, 0).ok()?;
    parse_num_threads(&line[..len])
}

/// The 20th field of a `/proc/PID/stat` line, `num_threads`.
fn parse_num_threads(line: &[u8]) -> Option<u64> {
    crate::sys::stat_field(line, 20)?.parse().ok()
}

/// Why [`ForkGuard::check`] refused a fork.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) why: String,
    /// Every later fork would be refused too.
    pub(crate) lasting: bool,
}

impl ForkGuard {
    /// The guard for `policy`, recording the dormant threads now.
    pub(crate) fn arm(policy: ThreadPolicy) -> Result<ForkGuard, String> {
        Ok(match policy {
            ThreadPolicy::Refuse => ForkGuard::Strict(ThreadCount::open()),
            ThreadPolicy::Allow => ForkGuard::Off,
            ThreadPolicy::AllowDormant => {
                ForkGuard::Dormant(ThreadCount::open(), RefCell::new(sleeping_threads()?))
            }
        })
    }

    /// Ok when forking now is allowed; otherwise says why not, and whether
    /// that lasts (a thread that is not one of those tolerated) or may pass
    /// (a tolerated one that would not settle).
    ///
    /// A tolerated thread may wake up now and then (Polars' out-of-core
    /// cleaner does, rarely, for reasons of its own). Then the fork waits, up
    /// to [`QUIET_WAIT_LIMIT`], for every such thread to be asleep and
    /// unscheduled for [`QUIET`] (back in its idle wait, its burst of work
    /// done), and re-records the counts. The wait blocks the event loop, which
    /// is why it is bounded. A thread that appeared after the preloads is
    /// never tolerated.
    pub(crate) fn check(&self) -> Result<(), Refusal> {
        let lasting = |why: String| Refusal { why, lasting: true };
        let (count, armed) = match self {
            ForkGuard::Off => return Ok(()),
            ForkGuard::Strict(count) => {
                return count.ensure_one().map_err(|e| lasting(e.to_string()))
            }
            ForkGuard::Dormant(count, armed) => (count, armed),
        };
        if count.ensure_one().is_ok() {
            return Ok(());
        }
        let mut armed = armed.borrow_mut();
        let mut seen = thread_states();
        if let Some(new) = seen
            .iter()
            .find(|s| !armed.iter().any(|a| a.info.tid == s.info.tid))
        {
            return Err(lasting(format!(
                "thread {} '{}' started after the preloads; forking now could copy a lock it holds",
                new.info.tid, new.info.name
            )));
        }
        if seen
            .iter()
            .all(|s| s.asleep && armed.iter().any(|a| a.same_as(s)))
        {
            return Ok(());
        }
        let started = Instant::now();
        let mut quiet_since = started;
        loop {
            std::thread::sleep(Duration::from_micros(500));
            let now = thread_states();
            let unchanged = now.len() == seen.len()
                && now
                    .iter()
                    .all(|n| n.asleep && seen.iter().any(|s| s.same_as(n)));
            if !unchanged {
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= QUIET {
                let woke: Vec<ThreadInfo> = now
                    .iter()
                    .filter(|n| !armed.iter().any(|a| a.same_as(n)))
                    .map(|n| n.info.clone())
                    .collect();
                log!(
                    Level::Debug,
                    "dormant thread(s) {} woke up and are quiet again after {:?}: forking",
                    names(&woke),
                    started.elapsed()
                );
                *armed = now;
                return Ok(());
            }
            if started.elapsed() >= QUIET_WAIT_LIMIT {
                let busy = now
                    .iter()
                    .find(|n| !n.asleep || !seen.iter().any(|s| s.same_as(n)))
                    .or(now.first());
                let why = match busy {
                    Some(t) => format!(
                        "thread {} '{}' keeps running (not asleep and quiet for {QUIET:?} within {QUIET_WAIT_LIMIT:?}), so it is not dormant; forking now could copy a lock it holds",
                        t.info.tid, t.info.name
                    ),
                    None => "the tolerated threads did not settle".to_owned(),
                };
                return Err(Refusal {
                    why,
                    lasting: false,
                });
            }
            seen = now;
        }
    }
}

/// A thread other than the caller, as `/proc/self/task/TID/status` shows it.
#[derive(Debug, Clone)]
pub(crate) struct ThreadState {
    info: ThreadInfo,
    asleep: bool,
    /// Voluntary plus involuntary context switches: changes whenever the
    /// thread has been scheduled.
    switches: u64,
}

impl ThreadState {
    /// The same thread, asleep in both, and not scheduled in between.
    fn same_as(&self, other: &ThreadState) -> bool {
        self.info.tid == other.info.tid && self.switches == other.switches
    }
}

/// Every thread but the caller; an error names one that is not asleep.
pub(crate) fn sleeping_threads() -> Result<Vec<ThreadState>, String> {
    let states = thread_states();
    if let Some(awake) = states.iter().find(|s| !s.asleep) {
        return Err(format!(
            "thread {} '{}' is not asleep; only sleeping threads can be tolerated",
            awake.info.tid, awake.info.name
        ));
    }
    Ok(states)
}

fn thread_states() -> Vec<ThreadState> {
    let me = nix::unistd::gettid().as_raw() as u32;
    let mut found = Vec::new();
    for info in list_threads().into_iter().filter(|t| t.tid != me) {
        let status = fs::read_to_string(format!("/proc/self/task/{}/status", info.tid));
        // A thread that ended between the listing and now is no concern.
        let Ok(status) = status else { continue };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .map(str::trim)
        };
        let asleep = field("State:").is_some_and(|state| state.starts_with('S'));
        let switches = ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
            .iter()
            .filter_map(|key| field(key)?.parse::<u64>().ok())
            .sum();
        found.push(ThreadState {
            info,
            asleep,
            switches,
        });
    }
    found
}

/// A thread found in `/proc/self/task`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadInfo {
    /// Its kernel thread id.
    pub tid: u32,
    /// Its name (`comm`), as `ps -L` shows it.
    pub name: String,
}

/// The process has threads besides the one that calls fork.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiThreaded {
    /// Every thread of the process, including the main one.
    pub threads: Vec<ThreadInfo>,
}

impl fmt::Display for MultiThreaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the server has {} threads (", self.threads.len())?;
        for (i, t) in self.threads.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{} '{}'", t.tid, t.name)?;
        }
        write!(
            f,
            "); forking now would copy locks other threads hold and the child could deadlock"
        )
    }
}

impl std::error::Error for MultiThreaded {}

/// Ok when this process has exactly one thread; otherwise names every thread.
pub fn ensure_single_threaded() -> Result<(), MultiThreaded> {
    // A process always has at least its own thread; if /proc is unreadable we
    // cannot tell, and say so as one nameless thread rather than guess.
    let count = match fs::read_dir("/proc/self/task") {
        Ok(entries) => entries.count(),
        Err(_) => 2,
    };
    if count <= 1 {
        return Ok(());
    }
    Err(MultiThreaded {
        threads: list_threads(),
    })
}

/// Like [`ensure_single_threaded`], but threads a test fork makes go away do
/// not count. Some libraries stop their thread pools in a `pthread_atfork`
/// prepare handler and start them again only when next used (OpenBLAS, which
/// numpy loads, does): after one fork such a process is single-threaded
/// again, and the per-fork guard catches the pools if they ever come back.
/// The probe child only calls `_exit`, so the threads' locks cannot hurt it.
///
/// Returns the threads the fork stopped (empty if there were none).
pub fn ensure_single_threaded_after_fork_handlers() -> Result<Vec<ThreadInfo>, MultiThreaded> {
    let Err(before) = ensure_single_threaded() else {
        return Ok(Vec::new());
    };
    probe_fork();
    // A stopped thread is joined before fork returns, but its /proc entry
    // can outlive the join by a moment.
    for _ in 0..20 {
        if ensure_single_threaded().is_ok() {
            let main = std::process::id();
            return Ok(before
                .threads
                .into_iter()
                .filter(|t| t.tid != main)
                .collect());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    ensure_single_threaded().map(|()| Vec::new())
}

/// Forks a child that exits at once and reaps it, running the process's
/// fork handlers.
fn probe_fork() {
    // SAFETY: the child calls only _exit, which is async-signal-safe, so it
    // needs nothing the other threads (whose locks it copied) hold.
    let forked = unsafe { sys::fork(|| libc::_exit(0)) };
    if let Ok(pid) = forked {
        let _ = sys::wait_for(pid);
    }
}

fn list_threads() -> Vec<ThreadInfo> {
    let Ok(entries) = fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut threads: Vec<ThreadInfo> = entries
        .flatten()
        .filter_map(|entry| {
            let tid = entry.file_name().to_str()?.parse().ok()?;
            let name = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            Some(ThreadInfo {
                tid,
                name: name.trim_end().to_owned(),
            })
        })
        .collect();
    threads.sort_by_key(|t| t.tid);
    threads
}

/// Known ways to stop threads that libraries start on their own.
pub(crate) fn remedies(threads: &MultiThreaded) -> String {
    let mut advice = String::new();
    for thread in &threads.threads {
        let hint = match thread.name.as_str() {
            "jemalloc_bg_thd" => {
                " jemalloc's background threads: set _RJEM_MALLOC_CONF=background_thread:false (MALLOC_CONF for a system jemalloc)."
            }
            name if name.starts_with("tokio-rt") => {
                " a tokio runtime: build it in the worker, not in the preload."
            }
            "polars-ooc-clea" => {
                " Polars' out-of-core cleaner: Polars 2.x starts it at import and no setting stops it; it sleeps until Polars spills to disk, so --allow-dormant-threads serves while it stays asleep."
            }
            name if name.starts_with("polars") => {
                " Polars' thread pool: preload without running a query; the pool starts on first use."
            }
            _ => continue,
        };
        if !advice.contains(hint) {
            advice.push_str(hint);
        }
    }
    advice
}

#[cfg(test)]
#[path = "threads_tests.rs"]
mod tests;
