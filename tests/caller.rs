//! The caller's child: a child started through the server gets its caller's
//! environment, working directory, umask and PATH lookup, as if the caller
//! had started it; each can be opted out of for the server's own. The
//! server here runs elsewhere on purpose: in its own directory (with its
//! own `prog.sh`), with `PATH=/usr/bin:/bin`, umask 077, and without the
//! caller's variables.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;

use forkserver::client::{Error, ErrorKind};

use crate::util::{example, new_dir, Server, FORKSERVER};

/// What `report` prints: pwd, $CALLER_ONLY, umask, $PATH, one per line.
const REPORT: &str = r#"pwd; echo "${CALLER_ONLY-unset}"; umask; echo "$PATH""#;

struct Elsewhere {
    server: Server,
    /// The server's working directory.
    home: PathBuf,
}

fn script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A stock server started in its own directory, PATH, umask and environment.
fn server_elsewhere() -> Elsewhere {
    let dir = new_dir();
    let home = dir.path().join("server-home");
    fs::create_dir(&home).unwrap();
    script(&home, "prog.sh", "echo \"the server's prog.sh\"");
    let start = format!(
        "umask 077 && cd '{}' && exec env -u CALLER_ONLY -u HOME PATH=/usr/bin:/bin \"$@\"",
        home.display()
    );
    let server = Server::launch_in(
        dir,
        &["sh", "-c", &start, "sh"],
        Path::new(FORKSERVER),
        &[],
        &[],
    );
    Elsewhere { server, home }
}

/// A caller's directory with its own `prog.sh`, and a `bin` directory only
/// the caller has on its PATH, holding `only-here`.
fn caller_dir() -> tempfile::TempDir {
    let dir = new_dir();
    script(dir.path(), "prog.sh", "echo \"the caller's prog.sh\"");
    fs::create_dir(dir.path().join("bin")).unwrap();
    script(
        &dir.path().join("bin"),
        "only-here",
        "echo \"found on the caller's PATH\"",
    );
    dir
}

/// Runs `forkserver spawn [FLAGS] -- CMD…` from a shell in `dir` whose
/// umask is 027, with CALLER_ONLY set and `dir/bin` first on PATH.
fn cli_from(dir: &Path, server: &Server, flags: &str, command: &str) -> String {
    let line = format!(
        "umask 027 && PATH='{}/bin':\"$PATH\" CALLER_ONLY=yes exec '{FORKSERVER}' spawn --socket '{}' {flags} -- {command}",
        dir.display(),
        server.socket.display()
    );
    let output = StdCommand::new("sh")
        .args(["-c", &line])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{line}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_cli_gives_the_child_the_shells_directory_environment_umask_and_path() {
    let elsewhere = server_elsewhere();
    let dir = caller_dir();
    let caller_path = format!(
        "{}/bin:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap()
    );
    let report = format!("sh -c '{}'", REPORT.replace('\'', r"'\''"));

    let out = cli_from(dir.path(), &elsewhere.server, "", &report);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            dir.path().to_str().unwrap(),
            "yes",
            "0027",
            caller_path.as_str()
        ]
    );
    // ./prog.sh is the caller's; a program only on the caller's PATH runs.
    assert_eq!(
        cli_from(dir.path(), &elsewhere.server, "", "./prog.sh"),
        "the caller's prog.sh\n"
    );
    assert_eq!(
        cli_from(dir.path(), &elsewhere.server, "", "only-here"),
        "found on the caller's PATH\n"
    );
    // --cwd is relative to the caller's directory.
    assert_eq!(
        cli_from(dir.path(), &elsewhere.server, "--cwd bin", "pwd"),
        format!("{}/bin\n", dir.path().display())
    );

    // Each opt-out gives the server's own.
    let out = cli_from(
        dir.path(),
        &elsewhere.server,
        "--server-env --server-cwd --server-umask",
        &report,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            elsewhere.home.to_str().unwrap(),
            "unset",
            "0077",
            "/usr/bin:/bin"
        ]
    );
    assert_eq!(
        cli_from(dir.path(), &elsewhere.server, "--server-cwd", "./prog.sh"),
        "the server's prog.sh\n"
    );
}

#[test]
fn a_directory_renamed_after_the_caller_entered_it_still_works() {
    let elsewhere = server_elsewhere();
    let dir = new_dir();
    let line = format!(
        "mkdir before && cd before && mv ../before ../after && exec '{FORKSERVER}' spawn --socket '{}' -- pwd",
        elsewhere.server.socket.display()
    );
    let output = StdCommand::new("sh")
        .args(["-c", &line])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!("{}/after\n", dir.path().display())
    );
}

/// This test process's umask, as the child should show it.
fn own_umask() -> String {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .unwrap();
    mask.trim().to_owned()
}

#[test]
fn the_rust_client_gives_the_child_this_processs_context() {
    let elsewhere = server_elsewhere();
    let client = elsewhere.server.client();
    let report = r#"pwd; echo "${HOME-unset}"; umask; echo "$PATH""#;
    let out = client.command("sh").args(["-c", report]).output().unwrap();
    let here = std::env::current_dir().unwrap();
    // The server runs without HOME; the child has this process's.
    let home = std::env::var("HOME").unwrap_or_else(|_| "unset".into());
    let path = std::env::var("PATH").unwrap();
    let umask = own_umask();
    let expected = [
        here.to_str().unwrap(),
        home.as_str(),
        umask.as_str(),
        path.as_str(),
    ];
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().collect::<Vec<_>>(), expected);

    // current_dir(relative) is relative to this process's directory.
    let out = client.command("pwd").current_dir("tests").output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}/tests\n", here.display())
    );

    let out = client
        .command("sh")
        .args(["-c", report])
        .server_env(true)
        .server_cwd(true)
        .server_umask(true)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            elsewhere.home.to_str().unwrap(),
            "unset",
            "0077",
            "/usr/bin:/bin"
        ]
    );
}

/// `count` variables (or arguments) of `size` bytes each, all different.
fn big_strings(count: usize, size: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let fill = char::from(b'a' + (i % 26) as u8);
            format!("{i:05}{}", fill.to_string().repeat(size - 5))
        })
        .collect()
}

#[test]
fn a_megabyte_of_environment_and_of_arguments_arrive_intact() {
    let server = Server::start();
    let client = server.client();
    // 256 variables of 4 KiB: 1 MiB, over a datagram's size, so the request
    // travels as a bulk file.
    let values = big_strings(256, 4096);
    let mut command = client.command("env");
    for (i, value) in values.iter().enumerate() {
        command.env(format!("BIG_{i:03}"), value);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut got: Vec<&str> = text.lines().filter(|l| l.starts_with("BIG_")).collect();
    got.sort();
    let expected: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!("BIG_{i:03}={v}"))
        .collect();
    assert_eq!(got, expected);

    let args = big_strings(256, 4096);
    let out = client
        .command("printf")
        .arg("%s\\n")
        .args(&args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        args.iter().map(|a| format!("{a}\n")).collect::<String>()
    );

    // The CLI carries a megabyte-sized caller environment too.
    let out = server
        .cli_spawn(&["--", "sh", "-c", "env | grep -c ^BIG_"])
        .envs(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("BIG_{i:03}"), v)),
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "256\n");
}

#[test]
fn one_byte_over_a_size_limit_is_a_limit_error_naming_it() {
    let server = Server::start_with(&["--limit", "max_env_bytes=1000"]);
    let client = server.client();
    let spawn = |bytes: usize| {
        client
            .command("true")
            .server_env(true)
            .env_clear()
            .env("K", "v".repeat(bytes - 1))
            .status()
    };
    assert!(spawn(1000).unwrap().success());
    match spawn(1001).unwrap_err() {
        Error::SpawnFailed { kind, message, .. } => {
            assert_eq!(kind, ErrorKind::Limit);
            assert!(
                message.contains("1001 bytes") && message.contains("max_env_bytes is 1000"),
                "{message}"
            );
        }
        other => panic!("expected a limit error, got {other:?}"),
    }
    // The caller's whole environment counts when it is sent.
    let err = client.command("true").status().unwrap_err();
    assert!(err.to_string().contains("max_env_bytes"), "{err}");
}

#[test]
fn a_nul_byte_is_invalid_input_as_with_std() {
    let server = Server::start();
    let client = server.client();
    let mut ours = [
        client.command("tr\0ue"),
        client.command("true"),
        client.command("true"),
        client.command("true"),
    ];
    let mut std = [
        StdCommand::new("tr\0ue"),
        StdCommand::new("true"),
        StdCommand::new("true"),
        StdCommand::new("true"),
    ];
    ours[1].arg("a\0b");
    std[1].arg("a\0b");
    ours[2].env("K", "a\0b");
    std[2].env("K", "a\0b");
    ours[3].current_dir("a\0b");
    std[3].current_dir("a\0b");
    for (ours, std) in ours.iter_mut().zip(&mut std) {
        let std_kind = std.status().unwrap_err().kind();
        let err = ours.status().unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::InvalidInput,
            "{ours:?}: {err}"
        );
        assert_eq!(err.kind(), std_kind, "{ours:?}");
        assert_eq!(std::io::Error::from(err).kind(), std_kind);
    }
    // A program that is not there is NotFound, as with std.
    let err = client.command("/no/such/program").status().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(client.command("true").status().unwrap().success());
}

#[test]
fn getters_and_debug_read_like_std() {
    let server = Server::start();
    let client = server.client();
    let mut ours = client.command("prog");
    let mut std = StdCommand::new("prog");
    std.arg("1")
        .arg("two words")
        .env("FOO", "bar")
        .current_dir("/p");
    ours.arg("1")
        .arg("two words")
        .env("FOO", "bar")
        .current_dir("/p");
    assert_eq!(format!("{ours:?}"), format!("{std:?}"));
    assert_eq!(
        format!("{ours:?}"),
        r#"cd "/p" && FOO="bar" "prog" "1" "two words""#
    );
    assert_eq!(ours.get_program(), std.get_program());
    assert!(ours.get_args().eq(std.get_args()));
    assert!(ours.get_envs().eq(std.get_envs()));
    assert_eq!(ours.get_current_dir(), std.get_current_dir());

    ours.env_remove("GONE");
    std.env_remove("GONE");
    assert_eq!(format!("{ours:?}"), format!("{std:?}"));
    ours.env_clear().env("ONLY", "1");
    std.env_clear().env("ONLY", "1");
    assert_eq!(format!("{ours:?}"), format!("{std:?}"));
}

#[test]
fn a_childs_pipes_can_be_moved_out_as_with_std() {
    let server = Server::start();
    let client = server.client();
    let child = client
        .command("echo")
        .arg("moved")
        .stdout(forkserver::Stdio::piped())
        .spawn()
        .unwrap();
    // Moving a field out of the child, as std code does.
    let mut stdout = child.stdout.unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
    assert_eq!(text, "moved\n");
}

#[test]
fn forkserver_command_is_a_drop_in_for_std_process_command() {
    let server = Server::start();
    let out = StdCommand::new(example("std_drop_in"))
        .env("FORKSERVER_SOCKET", &server.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text,
        "status: exit status: 3\noutput: \"hello\\n\"\nspawned pid's parent is the server: true\n"
    );
    // Its children went through the server.
    assert!(server.log().contains("sh"), "{}", server.log());
}

/// The `SigBlk` and `SigIgn` lines of a child's /proc/self/status.
fn signal_lines(command: &mut forkserver::client::Command) -> String {
    let output = command
        .args(["-E", "^Sig(Blk|Ign)", "/proc/self/status"])
        .output()
        .unwrap();
    without_glibc_s_own(&String::from_utf8(output.stdout).unwrap())
}

/// Signal lines without signals 32 and 33, glibc's own: its sigaction and
/// sigaddset refuse them, so neither a client nor the server can pass or
/// reset them, and a child has them as the server's environment had.
fn without_glibc_s_own(lines: &str) -> String {
    lines
        .lines()
        .map(|line| match line.split_once(":\t") {
            Some((name, hex)) => {
                let bits = u64::from_str_radix(hex, 16).unwrap() & !(0b11 << 31);
                format!("{name}:\t{bits:016x}\n")
            }
            None => format!("{line}\n"),
        })
        .collect()
}

/// A /proc signal set of `signals`, with those this test process ignores
/// (but SIGPIPE, which the Rust runtime ignores for itself) when
/// `inherited`.
fn signal_bits(signals: &[i32], inherited: bool) -> String {
    let mut bits: u64 = signals.iter().map(|s| 1u64 << (s - 1)).sum();
    if inherited {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let ignored = status
            .lines()
            .find_map(|line| line.strip_prefix("SigIgn:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap();
        bits |= ignored & !(1 << (libc::SIGPIPE - 1)) & !(0b11 << 31);
    }
    format!("{bits:016x}")
}

/// std's test_process_mask, through the server: the calling thread's
/// blocked signals are the child's; SIGPIPE, which the Rust runtime
/// ignores, is back at its default, as std gives it; server_signals opts
/// out.
#[test]
fn the_calling_thread_s_signal_mask_reaches_the_child() {
    let server = Server::start();
    let client = server.client();
    // SAFETY: sigset_t is plain data, initialised by sigemptyset; the mask
    // is this test thread's alone and restored below.
    let old = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    };
    let caller = signal_lines(&mut client.command("grep"));
    let server_s = signal_lines(client.command("grep").server_signals(true));
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    assert_eq!(
        caller,
        format!(
            "SigBlk:\t{}\nSigIgn:\t{}\n",
            signal_bits(&[libc::SIGINT, libc::SIGUSR2], false),
            signal_bits(&[], true)
        )
    );
    let nothing = signal_bits(&[], false);
    assert_eq!(
        server_s,
        format!("SigBlk:\t{nothing}\nSigIgn:\t{nothing}\n")
    );
}

/// `nohup forkserver spawn ...`: a signal ignored by the command's caller
/// stays ignored in the child (exec keeps SIG_IGN); the signals the CLI
/// blocks for itself, to forward them, are not the child's.
#[test]
fn a_signal_ignored_by_the_cli_s_caller_stays_ignored_in_the_child() {
    let server = Server::start();
    let socket = server.socket.to_str().unwrap().to_owned();
    let run = |extra: &str| {
        let script = format!(
            "trap '' HUP; exec {FORKSERVER} spawn --socket {socket} {extra} -- grep -E '^Sig(Blk|Ign)' /proc/self/status"
        );
        let output = StdCommand::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        without_glibc_s_own(&String::from_utf8(output.stdout).unwrap())
    };
    let nothing = signal_bits(&[], false);
    assert_eq!(
        run(""),
        format!(
            "SigBlk:\t{nothing}\nSigIgn:\t{}\n",
            signal_bits(&[libc::SIGHUP], true)
        )
    );
    assert_eq!(
        run("--server-signals"),
        format!("SigBlk:\t{nothing}\nSigIgn:\t{nothing}\n")
    );
}
