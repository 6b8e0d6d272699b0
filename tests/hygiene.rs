//! The server's own health after many spawns: fds, zombies, threads.

use forkserver::client::{Client, Stdio};

use crate::util::{
    assert_no_new_fds, fd_table, threads_of, wait_until, zombie_children_of, Server,
};

/// 200 spawns that end every way there is: success, failure codes, death by
/// signal, exec failure, chdir failure; with piped and inherited stdio.
fn mixed_spawns(client: &Client) {
    for i in 0..200 {
        let mut command = match i % 5 {
            0 => client.command("true"),
            1 => {
                let mut c = client.command("sh");
                c.args(["-c", "echo out; exit 3"]).stdout(Stdio::piped());
                c
            }
            2 => {
                let mut c = client.command("sh");
                c.args(["-c", "kill -KILL $$"]).stdin(Stdio::piped());
                c
            }
            3 => client.command("no-such-program-here"),
            _ => {
                let mut c = client.command("true");
                c.current_dir("/no/such/dir");
                c
            }
        };
        match command.spawn() {
            Ok(child) => {
                let output = child.wait_with_output().unwrap();
                assert!(output.status.code() != Some(127), "{output:?}");
            }
            Err(e) => assert!(i % 5 >= 3, "spawn {i} failed: {e}"),
        }
    }
}

#[test]
fn server_fd_count_returns_to_its_baseline_after_200_spawns() {
    let server = Server::start();
    let client = server.client();
    assert!(client.command("true").status().unwrap().success());
    let baseline = fd_table(server.pid());
    mixed_spawns(&client);
    // Exec failures are reaped asynchronously after SpawnFailed; give the
    // loop a moment to close their records, but no more than TIMEOUT.
    assert_no_new_fds(server.pid(), &baseline);
}

#[test]
fn no_zombies_and_still_one_thread_after_200_spawns() {
    let server = Server::start();
    let client = server.client();
    mixed_spawns(&client);
    wait_until("no zombie children remain", || {
        zombie_children_of(server.pid()).is_empty()
    });
    assert_eq!(threads_of(server.pid()), 1);
}
