//! The protocol from another language: examples/python/spawn.py, written from
//! protocol/README.md alone, drives a real server. Needs a Python with the
//! `msgpack` package: `$FORKSERVER_TEST_PYTHON` (tests/all.sh points it at
//! the project's virtualenv, where it installs msgpack), else `python3`;
//! skipped, saying so, where neither has it.

use std::process::Command;

use crate::util::Server;

/// The Python to run the example with.
fn python() -> String {
    std::env::var("FORKSERVER_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn python_client(server: &Server, program_and_args: &[&str]) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/spawn.py");
    Command::new(python())
        .arg(script)
        .arg(&server.socket)
        .args(program_and_args)
        .output()
        .expect("the Python exists: it imported msgpack")
}

#[test]
fn a_python_client_spawns_through_the_documented_protocol() {
    let has_msgpack = Command::new(python())
        .args(["-c", "import msgpack"])
        .output()
        .is_ok_and(|o| o.status.success());
    let what = format!(
        "needs {} with the msgpack package (tests/all.sh installs it in its virtualenv)",
        python()
    );
    if !crate::util::available_or_skip(
        "python::a_python_client_spawns_through_the_documented_protocol",
        has_msgpack,
        &what,
    ) {
        return;
    }
    let server = Server::start();
    let output = python_client(&server, &["sh", "-c", "echo from python; exit 4"]);
    assert_eq!(output.stdout, b"from python\n");
    assert_eq!(output.status.code(), Some(4));

    let missing = python_client(&server, &["no-such-program"]);
    assert_eq!(missing.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("exec: cannot run the program"));
}
