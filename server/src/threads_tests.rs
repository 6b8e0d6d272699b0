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
