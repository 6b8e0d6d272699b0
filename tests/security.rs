//! Who may connect and what they get: peer credentials, a root server
//! running children as their peer, run-as, the socket's mode and directory.
//! The server runs as root here (as CI does); a second user, `nobody`, is
//! played with setpriv(1).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::util::{Server, FORKSERVER};

/// A server that `nobody` can reach: the socket is given to group
/// `nogroup` (mode 0660) and its directory is opened to others for
/// traversal. Also returns a copy of the CLI that `nobody` can execute.
fn server_for_nobody(test: &str, extra_args: &[&str]) -> Option<(Server, PathBuf)> {
    if !crate::util::root_or_skip(test) {
        return None;
    }
    let mut args = vec!["--group", "nogroup"];
    args.extend_from_slice(extra_args);
    let server = Server::start_with(&args);
    let cli = crate::util::open_to_nobody(&server);
    Some((server, cli))
}

/// Runs `CLI spawn --socket S ARGS…` as user nobody.
fn spawn_as_nobody(server: &Server, cli: &Path, args: &[&str]) -> Output {
    crate::util::cli_as_nobody(server, cli, "spawn", args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_group_flag_makes_the_socket_0660_for_that_group() {
    let Some((server, _)) = server_for_nobody(
        "security::the_group_flag_makes_the_socket_0660_for_that_group",
        &[],
    ) else {
        return;
    };
    let meta = std::fs::metadata(&server.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
}

#[test]
fn a_peer_that_is_not_allowed_is_refused_by_uid_and_logged() {
    let Some((server, cli)) = server_for_nobody(
        "security::a_peer_that_is_not_allowed_is_refused_by_uid_and_logged",
        &[],
    ) else {
        return;
    };
    let output = spawn_as_nobody(&server, &cli, &["--", "id", "-u"]);
    assert_eq!(output.status.code(), Some(125));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("uid 65534 is not allowed"), "{stderr}");
    assert!(stderr.contains("--allow-uid 65534"), "{stderr}");
    // The refusal names the socket too.
    assert!(
        stderr.contains(&server.socket.display().to_string()),
        "{stderr}"
    );
    assert!(server.log().contains("refused pid "), "{}", server.log());
    assert!(
        server.log().contains("uid 65534 gid 65534"),
        "{}",
        server.log()
    );
    // Others are still served.
    assert!(server.client().command("true").status().unwrap().success());
}

/// A socket closed to the user (the default 0600, in a directory it can
/// enter): the error names the socket, the uid, and the flags that would
/// open it, not "no forkserver is listening".
#[test]
fn a_socket_closed_to_the_user_is_named_with_the_flags_that_would_open_it() {
    if !crate::util::root_or_skip(
        "security::a_socket_closed_to_the_user_is_named_with_the_flags_that_would_open_it",
    ) {
        return;
    }
    let server = Server::start();
    let cli = crate::util::open_to_nobody(&server);
    let output = spawn_as_nobody(&server, &cli, &["--", "true"]);
    assert_eq!(output.status.code(), Some(125));
    let stderr = text(&output.stderr);
    for needle in [
        server.socket.display().to_string().as_str(),
        "closed to uid 65534",
        "Permission denied",
        "--group GROUP",
        "--allow-uid USER",
        "--allow-gid GROUP",
    ] {
        assert!(stderr.contains(needle), "{needle:?} in {stderr}");
    }
    assert!(!stderr.contains("no forkserver is listening"), "{stderr}");
}

#[test]
fn an_allowed_user_s_children_run_as_that_user() {
    let Some((server, cli)) = server_for_nobody(
        "security::an_allowed_user_s_children_run_as_that_user",
        &["--allow-uid", "nobody"],
    ) else {
        return;
    };
    let output = spawn_as_nobody(&server, &cli, &["--", "sh", "-c", "id -u; id -g; id -G"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "65534\n65534\n65534\n");

    // Asking for another user is root's privilege alone.
    let output = spawn_as_nobody(&server, &cli, &["--user", "root", "--", "id", "-u"]);
    assert_eq!(output.status.code(), Some(125));
    assert!(
        text(&output.stderr).contains("may not run a child as uid 0"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn allow_gid_admits_a_group() {
    let Some((server, cli)) = server_for_nobody(
        "security::allow_gid_admits_a_group",
        &["--allow-gid", "nogroup"],
    ) else {
        return;
    };
    let output = spawn_as_nobody(&server, &cli, &["--", "id", "-u"]);
    assert_eq!(text(&output.stdout), "65534\n", "{}", text(&output.stderr));
}

#[test]
fn root_may_run_a_child_as_another_user() {
    if !crate::util::root_or_skip("security::root_may_run_a_child_as_another_user") {
        return;
    }
    let server = Server::start();
    let output = server
        .client()
        .command("sh")
        .args(["-c", "id -u; id -g"])
        .user(65534, 65534, &[])
        .output()
        .unwrap();
    assert_eq!(
        text(&output.stdout),
        "65534\n65534\n",
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn no_new_privs_is_set_on_request() {
    let server = Server::start();
    let client = server.client();
    let field = |on: bool| {
        let output = client
            .command("grep")
            .args(["NoNewPrivs", "/proc/self/status"])
            .no_new_privs(on)
            .output()
            .unwrap();
        text(&output.stdout)
    };
    assert_eq!(field(true), "NoNewPrivs:\t1\n");
    assert_eq!(field(false), "NoNewPrivs:\t0\n");
}

#[test]
fn a_world_writable_directory_without_sticky_bit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("fs.sock");
    let output = Command::new(FORKSERVER)
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("writable by everyone without the sticky bit"),
        "{}",
        text(&output.stderr)
    );
    assert!(!socket.exists());

    // With the sticky bit (like /tmp) it is fine.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let _server = crate::util::KillOnDrop(
        Command::new(FORKSERVER)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .spawn()
            .unwrap(),
    );
    crate::util::wait_until("the server listens", || {
        forkserver::protocol::connect_seqpacket(&socket).is_ok()
    });
}

#[test]
fn a_symlink_at_the_socket_path_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious");
    std::fs::write(&precious, "data").unwrap();
    let link = dir.path().join("fs.sock");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    let output = Command::new(FORKSERVER)
        .arg("serve")
        .arg("--socket")
        .arg(&link)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("is not a socket"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "data");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_user_cannot_see_or_kill_another_user_s_children() {
    let Some((server, cli)) = server_for_nobody(
        "security::a_user_cannot_see_or_kill_another_user_s_children",
        &["--allow-uid", "nobody"],
    ) else {
        return;
    };
    let roots = server
        .client()
        .command("sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    let as_nobody = |args: &[&str]| {
        let (command, rest) = args.split_first().unwrap();
        crate::util::cli_as_nobody(&server, &cli, command, rest)
    };
    let pid = roots.id().to_string();
    let output = as_nobody(&["kill", &pid]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("may signal only its own children"),
        "{}",
        text(&output.stderr)
    );
    assert!(crate::util::is_running(roots.id()));
    let ps = as_nobody(&["ps", "--json"]);
    assert_eq!(text(&ps.stdout).trim(), "[]", "nobody sees root's children");
    // --all touches only what nobody may: nothing here.
    assert!(as_nobody(&["kill", "--all"]).status.success());
    assert!(crate::util::is_running(roots.id()));
}
