//! The soak test: many clients on several threads spawn, wait, kill,
//! disconnect mid-flight and send garbage for SOAK_TIME and at least
//! SOAK_CONNECTIONS connections; then the server must be exactly as it was:
//! no zombies, no extra fds, no children, one thread, and every child a
//! connected client started was accounted for by an exit status.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use forkserver::client::{Client, Stdio};
use forkserver::protocol::{ClientMessage, Spawn};

use crate::util::{
    assert_no_new_fds, fd_table, threads_of, wait_until, zombie_children_of, RawConnection, Server,
    TIMEOUT,
};

const SOAK_TIME: Duration = Duration::from_secs(30);
const SOAK_CONNECTIONS: u64 = 1000;
const THREADS: u64 = 4;

/// xorshift64*: a deterministic random stream per thread, no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[derive(Default)]
struct Tally {
    connections: AtomicU64,
    /// Children whose exit status a connected client received.
    accounted: AtomicU64,
    /// Children left behind on a closing connection (the server kills them).
    abandoned: AtomicU64,
    garbage: AtomicU64,
}

/// One connection's worth of random work.
fn session(server: &Server, rng: &mut Rng, tally: &Tally) {
    tally.connections.fetch_add(1, Ordering::Relaxed);
    if rng.below(10) == 0 {
        let conn = RawConnection::greeted(server);
        conn.send_bytes(&[0xc1, 0xff, 0x00, 0x13], &[]);
        tally.garbage.fetch_add(1, Ordering::Relaxed);
        if rng.below(2) == 0 {
            conn.send(
                &ClientMessage::Spawn(Spawn::exec(1, "sleep", vec!["30".into()])),
                &[],
            );
            tally.abandoned.fetch_add(1, Ordering::Relaxed);
        }
        return; // dropped mid-conversation
    }
    let client = Client::connect(&server.socket).expect("connect");
    let mut waiting = Vec::new();
    for _ in 0..1 + rng.below(6) {
        match rng.below(4) {
            0 => {
                let code = rng.below(256) as i32;
                let child = client
                    .command("sh")
                    .args(["-c", &format!("exit {code}")])
                    .spawn()
                    .unwrap();
                waiting.push((child, Some(code), None));
            }
            1 => {
                let mut child = client.command("sleep").arg("30").spawn().unwrap();
                child.kill().unwrap();
                waiting.push((child, None, Some(libc::SIGKILL)));
            }
            2 => {
                let output = client.command("echo").arg("soak").output().unwrap();
                assert_eq!(output.stdout, b"soak\n");
                tally.accounted.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                // Left running: the disconnect at the end of the session
                // kills it.
                let child = client
                    .command("sleep")
                    .arg("30")
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap();
                tally.abandoned.fetch_add(1, Ordering::Relaxed);
                drop(child);
            }
        }
    }
    // Wait in a random order.
    while !waiting.is_empty() {
        let (mut child, code, signal) =
            waiting.swap_remove(rng.below(waiting.len() as u64) as usize);
        let status = child
            .wait()
            .expect("an Exited event for a connected client");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!((status.code(), status.signal()), (code, signal));
        tally.accounted.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn soak_many_clients_then_back_to_baseline() {
    let server = Arc::new(Server::start_with(&[
        "--kill-grace",
        "0.5",
        "--limit",
        "max_connections_per_uid=256",
    ]));
    let baseline = fd_table(server.pid());
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let (done_tx, done_rx) = mpsc::channel();
    for seed in 0..THREADS {
        let (server, tally, done) = (server.clone(), tally.clone(), done_tx.clone());
        thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (seed + 1));
            while started.elapsed() < SOAK_TIME
                || tally.connections.load(Ordering::Relaxed) < SOAK_CONNECTIONS
            {
                session(&server, &mut rng, &tally);
            }
            done.send(()).unwrap();
        });
    }
    drop(done_tx);
    for _ in 0..THREADS {
        // A lost Exited event leaves a wait() blocked forever: this bound
        // turns that into a failure.
        done_rx
            .recv_timeout(SOAK_TIME + TIMEOUT * 3)
            .expect("a soak thread hung or panicked (lost Exited event?)");
    }
    let connections = tally.connections.load(Ordering::Relaxed);
    assert!(connections >= SOAK_CONNECTIONS, "{connections} connections");
    assert!(tally.accounted.load(Ordering::Relaxed) > 0);

    let client = server.client();
    wait_until("every abandoned child is killed and reaped", || {
        client.status().unwrap().children == 0
    });
    drop(client);
    assert!(zombie_children_of(server.pid()).is_empty());
    assert_no_new_fds(server.pid(), &baseline);
    assert_eq!(threads_of(server.pid()), 1);
    eprintln!(
        "soak: {connections} connections in {:.1?}: {} exits accounted, {} children abandoned to the server, {} garbage messages",
        started.elapsed(),
        tally.accounted.load(Ordering::Relaxed),
        tally.abandoned.load(Ordering::Relaxed),
        tally.garbage.load(Ordering::Relaxed)
    );
}
