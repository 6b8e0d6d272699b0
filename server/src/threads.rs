//! The thread guard: the server forks only while it is the only thread.
//!
//! `fork()` copies just the calling thread. Every lock another thread held at
//! that instant (malloc arenas, loggers, runtimes' queues) stays locked forever
//! in the child, which then deadlocks the first time it touches one. So the
//! server counts its threads in `/proc/self/task` at start and before every
//! fork and refuses to fork when there is more than one.

use std::fmt;
use std::fs;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_thread_is_named() {
        // The test harness itself may run tests on threads; make sure there is
        // at least one named thread of ours to find.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("guard-probe".into())
            .spawn(move || {
                // std names the thread from inside it, once it runs.
                started_tx.send(()).unwrap();
                rx.recv().ok()
            })
            .unwrap();
        started.recv().unwrap();
        let err = ensure_single_threaded().unwrap_err();
        assert!(err.threads.iter().any(|t| t.name == "guard-probe"), "{err}");
        assert!(err.to_string().contains("deadlock"));
        drop(tx);
        handle.join().unwrap();
    }
}
