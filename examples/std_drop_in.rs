//! `use forkserver::Command;` in place of `use std::process::Command;`: the
//! same code, its children started by the forkserver at `$FORKSERVER_SOCKET`
//! (else the default socket), with this process's environment, directory
//! and umask.
//!
//! ```sh
//! cargo run --release -- serve &
//! cargo run --release --example std_drop_in
//! ```

// use std::process::Command;
use forkserver::Command;

fn main() -> std::io::Result<()> {
    let status = Command::new("sh").args(["-c", "exit 3"]).status()?;
    println!("status: {status}");

    let output = Command::new("echo").arg("hello").output()?;
    println!("output: {:?}", String::from_utf8_lossy(&output.stdout));

    let mut child = Command::new("sleep").arg("10").spawn()?;
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id()))?;
    let ppid: u32 = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|ppid| ppid.parse().ok())
        .unwrap_or(0);
    println!(
        "spawned pid's parent is the server: {}",
        ppid != std::process::id() && ppid != 0
    );
    child.kill()?;
    child.wait()?;
    Ok(())
}
