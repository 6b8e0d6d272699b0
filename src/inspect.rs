//! `forkserver status`, `ps`, `kill` and `reload`: looking at and steering
//! a running server.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use forkserver::client::{ChildInfo, Error, StatusReport};

use crate::{failed, SocketArg};

#[derive(Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct PsArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct KillArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// The signal, by name (TERM, SIGKILL…) or number.
    #[arg(short, long, default_value = "TERM", value_parser = parse_signal)]
    signal: i32,
    /// Every child you may touch.
    #[arg(long, conflicts_with = "pid")]
    all: bool,
    /// The child's pid (or --all for every child you may touch).
    #[arg(required_unless_present = "all", value_name = "PID|--all")]
    pid: Option<u32>,
}

#[derive(Args)]
pub(crate) struct ReloadArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Upgrade in place: run the server's binary again, keeping its pid,
    /// connections and children (SIGUSR2 does the same).
    #[arg(long)]
    exec: bool,
}

fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(number) = s.parse() {
        return Ok(number);
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let signal = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "WINCH" => libc::SIGWINCH,
        _ => {
            return Err(format!(
                "unknown signal '{s}'; use a name like TERM or a number"
            ))
        }
    };
    Ok(signal)
}

pub(crate) fn status(args: StatusArgs) -> ExitCode {
    let report = match args.socket.connect().and_then(|c| c.status()) {
        Ok(report) => report,
        Err(e) => return failed(&e),
    };
    print_json_or(args.json, &report, status_text)
}

/// Prints `value` as JSON, or as the text `text` makes of it.
fn print_json_or<T: serde::Serialize + ?Sized>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("replies serialize")
        );
    } else {
        print!("{}", text(value));
    }
    ExitCode::SUCCESS
}

fn status_text(r: &StatusReport) -> String {
    let mut text = format!(
        "forkserver {} (pid {}) on {}\n  up {}, RSS {:.1} MiB\n  children {} live, {} started, {} failed; connections {}\n",
        r.server_version,
        r.pid,
        r.socket,
        human_duration(Duration::from_millis(r.uptime_ms)),
        r.rss_bytes as f64 / (1 << 20) as f64,
        r.children,
        r.spawns,
        r.failures,
        r.connections,
    );
    for module in &r.modules {
        text += &format!(
            "  module {} ({:?}) preloaded in {:.1} ms\n",
            module.name, module.kind, module.preload_ms
        );
    }
    if !r.workers.is_empty() {
        text += &format!("  workers: {}\n", r.workers.join(", "));
    }
    for pool in &r.pools {
        text += &format!(
            "  pool {}: {} of {} idle ({} ready), {} hits, {} misses\n",
            pool.worker, pool.idle, pool.size, pool.ready, pool.hits, pool.misses
        );
    }
    match (r.zygote_pid, r.generation) {
        (Some(pid), 0) => text += &format!("  forker: pid {pid} (forks the pools' children)\n"),
        (Some(pid), generation) => {
            text += &format!(
                "  zygote: pid {pid}, generation {generation}, rss {:.1} MiB (preloads, forks the workers)\n",
                r.zygote_rss_bytes as f64 / (1 << 20) as f64
            )
        }
        (None, 0) => {}
        (None, _) => text += "  zygote: none serving (the next is starting)\n",
    }
    if let Some(why) = &r.reload_failure {
        text += &format!("  the latest reload failed: {why}\n");
    }
    if r.stale_count > 0 {
        text += &format!(
            "  stale: {} preloaded file(s) changed on disk since they were loaded (workers run the older version; `forkserver reload` loads them):\n",
            r.stale_count
        );
        for path in &r.stale {
            text += &format!("    {path}\n");
        }
        if r.stale_count as usize > r.stale.len() {
            text += &format!(
                "    ... and {} more\n",
                r.stale_count as usize - r.stale.len()
            );
        }
    }
    text
}

pub(crate) fn ps(args: PsArgs) -> ExitCode {
    let children = match args.socket.connect().and_then(|c| c.list()) {
        Ok(children) => children,
        Err(e) => return failed(&e),
    };
    print_json_or(args.json, children.as_slice(), ps_table)
}

fn ps_table(children: &[ChildInfo]) -> String {
    let mut table = format!(
        "{:>8} {:>10} {:>8} {:>6} {:>9}  TARGET\n",
        "PID", "AGE", "OWNER", "UID", "DETACHED"
    );
    for c in children {
        let owner = if c.owner_connected {
            c.owner_pid.to_string()
        } else {
            format!("({})", c.owner_pid)
        };
        table += &format!(
            "{:>8} {:>10} {:>8} {:>6} {:>9}  {}\n",
            c.pid,
            human_duration(Duration::from_millis(c.age_ms)),
            owner,
            c.owner_uid,
            if c.detached { "yes" } else { "no" },
            c.target
        );
    }
    table
}

pub(crate) fn kill(args: KillArgs) -> ExitCode {
    let result = args
        .socket
        .connect()
        .and_then(|c| c.kill(args.pid, args.signal));
    match result {
        Ok(pids) if pids.is_empty() && args.pid.is_none() => {
            eprintln!("forkserver: no children to signal");
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e @ Error::Refused { .. }) => {
            eprintln!("forkserver: {e}");
            ExitCode::from(1)
        }
        Err(e) => failed(&e),
    }
}

fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

pub(crate) fn reload(args: ReloadArgs) -> ExitCode {
    if args.exec {
        return upgrade(args.socket);
    }
    match args.socket.connect().and_then(|c| c.reload()) {
        Ok((generation, modules)) => {
            let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
            println!(
                "generation {generation} serves ({} module(s){}{})",
                modules.len(),
                if names.is_empty() { "" } else { ": " },
                names.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e @ Error::Refused { .. }) => {
            eprintln!("forkserver: reload failed: {e}");
            ExitCode::from(1)
        }
        Err(e) => failed(&e),
    }
}

fn upgrade(socket: SocketArg) -> ExitCode {
    match socket.connect().and_then(|c| c.upgrade()) {
        Ok((version, previous)) => {
            println!("upgraded in place: forkserver {version} serves (was {previous})");
            ExitCode::SUCCESS
        }
        Err(e @ Error::Refused { .. }) => {
            eprintln!("forkserver: upgrade failed: {e}");
            ExitCode::from(1)
        }
        Err(e) => failed(&e),
    }
}
