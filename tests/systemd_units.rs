//! The systemd units in examples/systemd pass `systemd-analyze verify`
//! (pointed at this build's binary, since they name the installed path).

use std::path::Path;
use std::process::Command;

use crate::util::FORKSERVER;

/// Copies a .socket/.service pair into `dir` as NAME.socket/NAME.service,
/// with ExecStart= pointing at this build, and verifies it.
fn verify_pair(from: &Path, name: &str, installed_binary: &str) {
    let dir = tempfile::tempdir().unwrap();
    for kind in ["socket", "service"] {
        let text = std::fs::read_to_string(from.join(format!("forkserver.{kind}"))).unwrap();
        let text = text
            .replace(installed_binary, FORKSERVER)
            .replace("forkserver.socket", &format!("{name}.socket"));
        std::fs::write(dir.path().join(format!("{name}.{kind}")), text).unwrap();
    }
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join(format!("{name}.socket")))
        .arg(dir.path().join(format!("{name}.service")))
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.is_empty(),
        "{name}: {stderr}"
    );
}

#[test]
fn the_example_units_verify() {
    if !crate::util::available_or_skip(
        "systemd_units::the_example_units_verify",
        crate::util::have("systemd-analyze"),
        "needs systemd-analyze (Debian package systemd)",
    ) {
        return;
    }
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd");
    verify_pair(&examples, "forkserver-system", "/usr/local/bin/forkserver");
    // The per-user pair, checked as system units (no user manager here).
    verify_pair(
        &examples.join("user"),
        "forkserver-user",
        "%h/.cargo/bin/forkserver",
    );
}
