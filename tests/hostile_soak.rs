//! The hostile soak (issue 26's findings 1–5 at once), alone in a test
//! binary of its own: cargo runs test binaries one after another, so no
//! other test's servers and clients share the machine while it measures a
//! client's latency. Three hostile `nobody` peers of a root server and one
//! well-behaved root client; 30 s in CI, `HOSTILE_SOAK_SECS` to change it
//! (SECURITY.md has a 10-minute run).

// The soak uses a few of the shared fixtures.
#[allow(dead_code)]
mod util;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use util::{peer_program, status_kb, Server};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// How long the hostile soak runs: 30 s, or `HOSTILE_SOAK_SECS`.
fn hostile_soak_secs() -> u64 {
    std::env::var("HOSTILE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

/// The `percent`th percentile of `samples`.
fn percentile(samples: &mut [Duration], percent: usize) -> Duration {
    samples.sort();
    samples[(samples.len() * percent / 100).min(samples.len() - 1)]
}

/// Root's spawns of `true` on one connection, at least `runs` of them and
/// until `until`: their latencies, each spawn to exit status.
fn good_spawns(server: &Server, runs: usize, until: Option<Instant>) -> Vec<Duration> {
    let client = server.client();
    let mut latencies = Vec::new();
    while latencies.len() < runs || until.is_some_and(|at| Instant::now() < at) {
        let start = Instant::now();
        let status = client.command("true").status().unwrap();
        assert!(status.success());
        latencies.push(start.elapsed());
    }
    latencies
}

/// Three hostile `nobody` peers — a flood of refused requests on
/// connections that never read, a hog of children and fds, escalation
/// attempts — against a root server at 1024 fds, and one well-behaved root
/// client: all of its spawns succeed, its p90 stays within 5× its p90
/// alone and its p99 within 15× that (a starved client waits hundreds of
/// ms), nothing hostile is granted, and the server ends as it began.
///
/// The yardstick is the p90 alone, not the p99: on a shared 2-core machine
/// the p99 of 1000 spawns alone is whatever stall the machine had then
/// (2–14 ms across runs of the same code, while the p90 stayed 2.8–4.5 ms),
/// and a ratio to it failed or passed by the luck of the quiet moment.
#[test]
fn a_hostile_soak_leaves_a_good_client_its_spawns() {
    if !util::root_or_skip("hostile_soak::a_hostile_soak_leaves_a_good_client_its_spawns") {
        return;
    }
    let server = util::server_nobody_may_use(&["prlimit", "--nofile=1024:1024", "--"]);
    let fds_before = util::fd_table(server.pid());
    let rss_before = status_kb(server.pid(), "VmRSS:");
    // Enough spawns alone that their p99 is not one lucky run's.
    let solo_p90 = percentile(&mut good_spawns(&server, 1000, None), 90);

    let secs = hostile_soak_secs();
    let program = peer_program(&server);
    let attackers: Vec<std::process::Child> = ["flood", "hog", "escalate"]
        .iter()
        .map(|kind| {
            Command::new("setpriv")
                .args(["--reuid=nobody", "--regid=nogroup", "--init-groups", "--"])
                .arg(&program)
                .arg(&server.socket)
                .args(["hostile", kind, &secs.to_string()])
                .current_dir("/")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Let the attack get going before measuring.
    std::thread::sleep(Duration::from_secs(1));
    let until = Instant::now() + Duration::from_secs(secs.saturating_sub(2));
    let mut during = good_spawns(&server, 1, Some(until));
    let count = during.len();
    let attack_p90 = percentile(&mut during, 90);
    let attack_p99 = percentile(&mut during, 99);
    let reports: Vec<String> = attackers
        .into_iter()
        .map(|a| text(&a.wait_with_output().unwrap().stdout))
        .collect();
    let summary = format!(
        "{secs} s: {count} good spawns, p90 {attack_p90:?} and p99 {attack_p99:?} vs p90 {solo_p90:?} alone; {}",
        reports.concat().replace('\n', "; ")
    );
    eprintln!("hostile soak: {summary}");
    assert!(attack_p90 <= solo_p90 * 5, "{summary}");
    assert!(attack_p99 <= solo_p90 * 15, "{summary}");
    assert!(reports[2].contains(" 0 granted"), "{summary}");
    assert!(!reports[0].starts_with("flood: 0 "), "{summary}");
    assert!(reports[1].contains("max_fds_per_uid"), "{summary}");
    // Everything the attackers had is given back.
    util::wait_until("the attackers' children are gone", || {
        server.client().list().unwrap().is_empty()
    });
    util::wait_until("the server's fds are back", || {
        util::fd_table(server.pid()).len() == fds_before.len()
    });
    util::assert_no_new_fds(server.pid(), &fds_before);
    assert!(util::zombie_children_of(server.pid()).is_empty());
    util::wait_until("the server's memory is back near where it was", || {
        status_kb(server.pid(), "VmRSS:") < rss_before + 8 * 1024
    });
}
