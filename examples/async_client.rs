//! The async client on tokio: many children on one connection at once, a
//! child raced against a timeout, a worker's output.
//!
//! ```sh
//! cargo run --release -- serve --socket /tmp/async.sock &
//! cargo run --release --example async_client -- /tmp/async.sock
//! ```
//!
//! The socket is the one argument (the default socket if none).

use std::time::Duration;

use forkserver::client::tokio::AsyncClient;
use forkserver::client::Error;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let client = match std::env::args().nth(1) {
        Some(socket) => AsyncClient::connect(socket).await?,
        None => AsyncClient::connect_default().await?,
    };

    // Ten children at once on one connection; their outputs in order.
    let runs: Vec<_> = (1..=10)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .command("sh")
                    .args(["-c", &format!("sleep 0.$((RANDOM % 5)); echo {n}")])
                    .output()
                    .await
            })
        })
        .collect();
    let mut lines = Vec::new();
    for run in runs {
        let output = run.await.expect("the task ran")?;
        lines.push(String::from_utf8_lossy(&output.stdout).trim().to_owned());
    }
    println!("ten children: {}", lines.join(" "));

    // A child that outlives its welcome.
    let mut child = client.command("sleep").arg("30").spawn().await?;
    // As tokio's, the pid is known until the child has been waited for.
    let pid = child.id().expect("not waited for yet");
    tokio::select! {
        status = child.wait() => println!("sleep ended early: {status:?}"),
        _ = tokio::time::sleep(Duration::from_millis(100)) => {
            child.kill().await?;
            println!("killed pid {pid} after 100 ms");
        }
    }
    Ok(())
}
