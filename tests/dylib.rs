//! Dynamic modules: examples/dylib_module, built here with cargo, loaded by
//! `forkserver serve --module demo=PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use forkserver::client::{Error, ErrorKind};

use crate::util::{failed_start, Server, FORKSERVER};

/// Builds the module once per test run, in its own target directory (so the
/// build does not wait on the workspace's lock), and returns the library.
pub(crate) fn demo_module() -> &'static Path {
    static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("target").join("dylib_module");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--offline", "--manifest-path"])
            .arg(root.join("examples/dylib_module/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .status()
            .expect("run cargo to build examples/dylib_module");
        assert!(status.success(), "building examples/dylib_module failed");
        target.join("debug/libforkserver_demo_module.so")
    })
}

fn serve_demo() -> Server {
    let module = format!("demo={}", demo_module().display());
    Server::start_with(&["--module", &module])
}

#[test]
fn argv_reaches_the_entry_point_and_its_return_is_the_exit_code() {
    let server = serve_demo();
    let output = server
        .cli_spawn(&["--worker", "demo:hello", "--", "big", "world"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    // The init ran once, in the zygote (which loads the modules; the
    // server itself never does, unless it has no zygote), before the fork.
    let zygote = crate::util::zygote_of(&server).unwrap_or(server.pid());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("hello from pid {zygote}'s init; demo:hello says: big world\n")
    );
    let code = server
        .client()
        .worker("demo:exit_with")
        .arg("42")
        .status()
        .unwrap();
    assert_eq!(code.code(), Some(42));
    let info = server.client().server().clone();
    assert_eq!(info.modules.len(), 1);
    assert_eq!(info.modules[0].name, "demo");
}

#[test]
fn an_unknown_symbol_or_module_is_a_clean_spawn_failure() {
    let server = serve_demo();
    let client = server.client();
    for (name, expected) in [
        (
            "demo:nosuch",
            "dynamic module 'demo' has no symbol 'nosuch'",
        ),
        ("other:hello", "no dynamic module named 'other'"),
    ] {
        match client.worker(name).spawn() {
            Err(Error::SpawnFailed {
                kind: ErrorKind::UnknownWorker,
                message,
                ..
            }) => {
                assert!(message.contains(expected), "{message}")
            }
            other => panic!("{name}: expected an unknown-worker failure, got {other:?}"),
        }
    }
    // A payload is for embedded workers only.
    match client.worker("demo:hello").payload(&1).unwrap().spawn() {
        Err(Error::SpawnFailed {
            kind: ErrorKind::Invalid,
            message,
            ..
        }) => {
            assert!(message.contains("target.payload"), "{message}")
        }
        other => panic!("expected an invalid payload, got {other:?}"),
    }
    assert!(client
        .worker("demo:exit_with")
        .arg("0")
        .status()
        .unwrap()
        .success());
}

#[test]
fn a_failing_init_or_a_missing_library_fails_the_start() {
    let module = format!("demo={}", demo_module().display());
    let forkserver = Path::new(FORKSERVER);
    let (_, stderr) = failed_start(
        forkserver,
        &["--module", &module],
        &[("DEMO_MODULE_INIT_FAIL", "1")],
    );
    assert!(
        stderr.contains("preloading module 'demo' failed: forkserver_module_init()"),
        "{stderr}"
    );
    assert!(stderr.contains("returned 3"), "{stderr}");

    let (_, stderr) = failed_start(forkserver, &["--module", "gone=/no/such/lib.so"], &[]);
    assert!(
        stderr.contains("preloading module 'gone' failed"),
        "{stderr}"
    );
    assert!(stderr.contains("/no/such/lib.so"), "{stderr}");
}
