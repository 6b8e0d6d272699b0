//! The thread guard against real threads of the test process.

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

#[test]
fn a_thread_that_outlives_a_fork_still_counts() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::spawn(move || rx.recv().ok());
    let err = ensure_single_threaded_after_fork_handlers().unwrap_err();
    assert!(err.threads.len() >= 2, "{err}");
    drop(tx);
    handle.join().unwrap();
}

#[test]
fn num_threads_is_counted_from_the_last_parenthesis() {
    // A command name may hold ") " itself (prctl(PR_SET_NAME) takes any
    // bytes); fields 3..19 here are 3..19, num_threads 7.
    let line = b"4242 (a) b (c) 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 7 21 22\n";
    assert_eq!(parse_num_threads(line), Some(7));
    assert_eq!(parse_num_threads(b"4242 (no closing"), None);
    assert_eq!(parse_num_threads(b"4242 (short) S 1 2"), None);
}

#[test]
fn the_open_stat_file_reads_this_process() {
    // Its exact value moves with the test harness's threads; a process
    // always has at least this one.
    let count = ThreadCount::open();
    let threads = num_threads(count.stat.as_ref().expect("/proc/self/stat opens"));
    assert!(threads.is_some_and(|n| n >= 1), "{threads:?}");
}
