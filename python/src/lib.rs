//! `forkserver_rs._native`: the Rust server, driven from Python.
//!
//! `python -m forkserver_rs serve` calls [`serve`], which imports each
//! `--preload` module through `forkserver_rs._server.preload` (one forkserver
//! preload per module, so the thread guard runs after each), then serves
//! with the ordinary event loop. Targets named `py:MODULE:FUNCTION` are a
//! worker family: the server checks the name before forking
//! (`forkserver_rs._server.check_target`), and the child calls
//! `forkserver_rs._worker.run`, which calls the function.
//!
//! The whole serve runs on the thread that called it, holding the GIL: the
//! server is single-threaded, so nothing else needs the GIL, and a forked
//! child starts out holding it, as CPython's own `os.fork()` child does.

use std::sync::atomic::{AtomicI32, Ordering};

use clap::Parser;
use forkserver_server::{exit, serve_main, ServeArgs, Server, WorkerContext};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// The command line of `python -m forkserver_rs serve`.
#[derive(Parser)]
#[command(
    name = "python -m forkserver_rs serve",
    about = "Import Python modules once, then fork workers from this warm, single-threaded process",
    after_help = "Clients start a function with the target py:MODULE:FUNCTION (see forkserver_rs.Client)."
)]
struct PythonServe {
    /// Import these modules before serving, in order (comma-separated;
    /// repeatable). A failing import fails the start, naming the module.
    #[arg(long, value_name = "MODULE[,MODULE...]", value_delimiter = ',')]
    preload: Vec<String>,
    /// Compile this script at start, without running it (repeatable), so
    /// children that run it skip compiling: a multiprocessing child re-runs
    /// its parent's main script. A script changed since is compiled afresh.
    #[arg(long, value_name = "SCRIPT.py")]
    precompile: Vec<String>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// Runs the server with `argv` (the flags after `serve`) until SIGTERM,
/// SIGINT or its lifeline closes; returns the process exit status.
#[pyfunction]
fn serve(argv: Vec<String>) -> i32 {
    let args = std::iter::once("python -m forkserver_rs serve".to_owned()).chain(argv);
    let command = match PythonServe::try_parse_from(args) {
        Ok(command) => command,
        Err(e) => {
            // --help and --version print to stdout and succeed.
            let _ = e.print();
            return e.exit_code();
        }
    };
    // This process is up to date with itself: only its forks need
    // PyOS_AfterFork_Child.
    CAUGHT_UP.store(std::process::id() as i32, Ordering::Relaxed);
    // The helpers (and what every child runs through) are imported once,
    // here, before the preloads and the thread guard.
    if let Err(e) = Python::attach(|py| py.import("forkserver_rs._server").map(drop)) {
        eprintln!("forkserver: importing forkserver_rs._server: {e}");
        return exit::FAILED.into();
    }
    for script in &command.precompile {
        if let Err(message) = call_helper("forkserver_rs._server", "precompile", script) {
            eprintln!("forkserver: --precompile {script}: {message} (children will compile it)");
        }
    }
    let mut builder = Server::builder();
    for module in command.preload {
        let name = module.clone();
        builder = builder.try_preload(&name, move || preload(&module));
    }
    let builder = builder
        .worker_family("py:", check_target, run_worker)
        .pool_prewarm(prewarm)
        .preloaded_files(preloaded_files)
        .fork_hooks(before_fork, after_fork_in_parent);
    serve_main(builder, &command.serve).into()
}

/// Imports `module` (through `forkserver_rs._server.preload`, which also
/// flushes what the import printed and names any Python threads it
/// started); Err carries the exception as text. Runs in the zygote, a fork
/// of the server that has not caught up with its fork yet.
fn preload(module: &str) -> Result<(), String> {
    after_fork_in_child();
    call_helper("forkserver_rs._server", "preload", module)
}

/// The files of the modules the preloads imported (in the zygote, right
/// after them), for the server to watch; none if they cannot be listed.
fn preloaded_files() -> Vec<std::path::PathBuf> {
    Python::attach(|py| {
        py.import("forkserver_rs._server")
            .and_then(|m| m.getattr("preloaded_files"))
            .and_then(|f| f.call0())
            .and_then(|files| files.extract::<Vec<std::path::PathBuf>>())
            .unwrap_or_else(|e| {
                e.print(py);
                Vec::new()
            })
    })
}

/// The check of a `py:MODULE:FUNCTION` name, before the fork (in the
/// zygote, which has the preloaded modules to look in).
fn check_target(target: &str) -> Result<(), String> {
    after_fork_in_child();
    call_helper("forkserver_rs._server", "check_target", target)
}

/// Calls `helper(arg)` in `module`, which returns None when all is well or a
/// message saying what is wrong.
fn call_helper(module: &str, helper: &str, arg: &str) -> Result<(), String> {
    Python::attach(|py| {
        let outcome = py
            .import(module)
            .and_then(|m| m.getattr(helper))
            .and_then(|f| f.call1((arg,)))
            .and_then(|message| message.extract::<Option<String>>());
        match outcome {
            Ok(None) => Ok(()),
            Ok(Some(message)) => Err(message),
            Err(e) => Err(format!("{module}.{helper} failed: {e}")),
        }
    })
}

/// Before every fork, in the server: what `os.fork()` does first (takes the
/// import lock, runs `os.register_at_fork(before=...)` handlers). Python
/// 3.13's `PyOS_AfterFork_Child` releases that lock and aborts if it is not
/// held.
fn before_fork() {
    // A zygote forks too, and must first catch up with its own fork.
    after_fork_in_child();
    // SAFETY: called on the server's only thread, which holds the GIL for
    // the whole serve (see the module comment), as PyOS_BeforeFork requires.
    unsafe { pyo3::ffi::PyOS_BeforeFork() };
}

/// After every fork, in the server: releases what [`before_fork`] took and
/// runs the `after_in_parent` handlers.
fn after_fork_in_parent() {
    // SAFETY: as for before_fork; paired with the PyOS_BeforeFork just made.
    unsafe { pyo3::ffi::PyOS_AfterFork_Parent() };
}

/// The pid of the process whose interpreter is up to date with its fork:
/// the server's (set by `serve`), then each child's once
/// PyOS_AfterFork_Child has run in it. A fork copies the value, so a child
/// (the zygote, a worker, the zygote's children) sees another's pid.
static CAUGHT_UP: AtomicI32 = AtomicI32::new(0);

/// Brings the interpreter's state up to date with the fork, once per
/// process: in the zygote before its first Python code, in a worker or
/// pool child before its own.
fn after_fork_in_child() {
    let pid = std::process::id() as i32;
    if CAUGHT_UP.swap(pid, Ordering::Relaxed) != pid {
        // SAFETY: we are a forked child of a process whose only thread held
        // the GIL when it forked (serve runs with the GIL held) and that had
        // run PyOS_BeforeFork (the fork hooks), which is the state
        // PyOS_AfterFork_Child requires. It resets the interpreter's thread
        // and lock state and runs the os.register_at_fork child hooks.
        unsafe { pyo3::ffi::PyOS_AfterFork_Child() };
    }
}

/// In an idle pool child of a `py:` worker: catch up with the fork and walk
/// the start path once (`forkserver_rs._worker.prewarm`), so a request does
/// not wait for the memory that copies.
fn prewarm(worker: &str) {
    if !worker.starts_with("py:") {
        return;
    }
    after_fork_in_child();
    Python::attach(|py| {
        let outcome = py
            .import("forkserver_rs._worker")
            .and_then(|m| m.getattr("prewarm"))
            .and_then(|prewarm| prewarm.call1((worker,)));
        if let Err(e) = outcome {
            // A cold child still works; say why it is cold.
            e.print(py);
        }
    });
}

/// Runs in the forked child: brings the interpreter's state up to date with
/// the fork, then calls the function; returns the exit status.
fn run_worker(context: &mut WorkerContext<'_>) -> i32 {
    after_fork_in_child();
    Python::attach(|py| {
        let payload = context.raw_payload().map(|bytes| PyBytes::new(py, bytes));
        // The environment the server installed for this child (os.environ
        // is still the server's copy).
        let environ: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os().collect();
        let args = (context.target(), payload, context.args().to_vec(), environ);
        let outcome = py
            .import("forkserver_rs._worker")
            .and_then(|m| m.getattr("run"))
            .and_then(|run| run.call1(args))
            .and_then(|code| code.extract::<i32>());
        outcome.unwrap_or_else(|e| {
            e.print(py);
            1
        })
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(serve, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
