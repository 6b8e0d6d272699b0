//! The protocol from another language: examples/python/spawn.py, written from
//! protocol/README.md alone, drives a real server. Needs python3 with the
//! `msgpack` package (`.ci/run` installs it).

use std::process::Command;

use crate::util::Server;

fn python_client(server: &Server, program_and_args: &[&str]) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/spawn.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(&server.socket)
        .args(program_and_args)
        .output()
        .expect("python3 must be installed to run this test");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("No module named 'msgpack'"),
        "install the msgpack package: pip install msgpack"
    );
    output
}

#[test]
fn a_python_client_spawns_through_the_documented_protocol() {
    let server = Server::start();
    let output = python_client(&server, &["sh", "-c", "echo from python; exit 4"]);
    assert_eq!(output.stdout, b"from python\n");
    assert_eq!(output.status.code(), Some(4));

    let missing = python_client(&server, &["no-such-program"]);
    assert_eq!(missing.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("exec: cannot run the program"));
}
