//! Spawn-to-exit latency of `/bin/true` through a running forkserver, against
//! `std::process::Command` from this process, measured in one run.
//!
//! ```sh
//! cargo run --release -- serve --socket /tmp/fs.sock &
//! cargo run --release --example exec_latency -- /tmp/fs.sock 2000
//! ```
//!
//! A first look only; the benchmark harness proper belongs in benches/.

use std::time::{Duration, Instant};

use forkserver::client::Client;

fn median_and_p90(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort_unstable();
    (samples[samples.len() / 2], samples[samples.len() * 9 / 10])
}

fn measure(runs: usize, mut once: impl FnMut()) -> (Duration, Duration) {
    for _ in 0..runs / 10 {
        once(); // warm-up
    }
    let samples = (0..runs)
        .map(|_| {
            let start = Instant::now();
            once();
            start.elapsed()
        })
        .collect();
    median_and_p90(samples)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("exec_latency: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let socket = args.next().ok_or("usage: exec_latency SOCKET [RUNS]")?;
    let runs: usize = args.next().map_or(Ok(1000), |n| n.parse())?;
    let client = Client::connect(&socket)?;

    let server = measure(runs, || {
        let status = client.command("/bin/true").status().unwrap();
        assert!(status.success());
    });
    let local = measure(runs, || {
        let status = std::process::Command::new("/bin/true").status().unwrap();
        assert!(status.success());
    });
    println!("/bin/true spawn→exit, {runs} runs each (median / p90):");
    println!(
        "  through forkserver      {:>8.1?} / {:>8.1?}",
        server.0, server.1
    );
    println!(
        "  std::process::Command   {:>8.1?} / {:>8.1?}",
        local.0, local.1
    );
    println!(
        "  ratio (forkserver / std) {:.2}",
        server.0.as_secs_f64() / local.0.as_secs_f64()
    );
    Ok(())
}
