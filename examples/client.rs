//! A client starting preloaded workers and ordinary programs side by side on
//! one connection, reading each one's output from a pipe.
//!
//! ```sh
//! cargo run --release --example zygote -- --socket /tmp/zygote.sock &
//! cargo run --release --example client -- /tmp/zygote.sock
//! ```
//!
//! The socket is the one argument (no `--socket` flag).

use std::io::Read;
use std::process::ExitCode;

use forkserver::client::{Client, Error, Stdio};

fn run(socket: &str) -> Result<(), Error> {
    let client = Client::connect(socket)?;
    let server = client.server();
    println!(
        "connected to forkserver {} (pid {})",
        server.version, server.pid
    );
    for module in &server.modules {
        println!(
            "  module {} preloaded in {:.1} ms",
            module.name, module.preload_ms
        );
    }

    // Start all three before reading any: they run at the same time.
    let mut children = vec![
        client
            .worker("pi")
            .arg("1000000")
            .stdout(Stdio::piped())
            .spawn()?,
        client
            .command("uname")
            .arg("-sr")
            .stdout(Stdio::piped())
            .spawn()?,
        client
            .worker("isprime")
            .args(["97", "91"])
            .stdout(Stdio::piped())
            .spawn()?,
    ];
    for child in &mut children {
        let mut output = String::new();
        child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut output)?;
        let status = child.wait()?;
        print!("[pid {} {status}] {output}", child.id());
    }
    Ok(())
}

fn main() -> ExitCode {
    let socket = std::env::args().nth(1).unwrap_or_else(|| {
        forkserver::client::default_socket_path()
            .display()
            .to_string()
    });
    match run(&socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("client: {e}");
            ExitCode::FAILURE
        }
    }
}
