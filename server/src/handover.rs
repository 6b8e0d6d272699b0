//! Upgrade in place: what one image of the front hands the next across
//! execve(2), and the exec itself.
//!
//! The front runs its binary again (the file on disk now, so a package
//! upgrade takes effect) with the same pid. A process keeps its children,
//! and its fds unless close-on-exec, across an exec: so the children stay
//! the front's, and the listener, the connections, the children's pidfds
//! and report pipes and the replies' fds are handed over by number — their
//! close-on-exec flag cleared just before the exec — with a [`Handover`]
//! (what the ledger and each connection hold) in a memfd named by
//! `FORKSERVER_HANDOVER_FD`. Everything else is close-on-exec and goes: the
//! zygotes and idle pool children read their socket's end-of-file and
//! exit, and the new image starts a fresh generation.
//!
//! An upgrade must not lose the state if the new binary cannot take it:
//! 1. Before anything, the new binary is run once as a *probe*
//!    (`FORKSERVER_UPGRADE_PROBE=FORMAT`, the same arguments): it exits 0
//!    at the start of `serve` if it reads this [`FORMAT`]. A missing file,
//!    a broken dynamic library, arguments it no longer takes or a format it
//!    cannot read fail the probe, and the old image serves on.
//! 2. An exec that fails returns, and the old image sets the flags back and
//!    serves on.
//! 3. A new image that cannot read the state runs the old binary again,
//!    from an `O_PATH` fd to it (`/proc/self/exe`, opened before the exec,
//!    so it is the old file even if it was replaced), with the same state
//!    and `FORKSERVER_UPGRADE_FAILED` saying why (`FORKSERVER_UPGRADE_FALLBACK`
//!    names both fds).
//!
//! Not covered: a new binary that passes the probe and then dies before it
//! reads the state (the probe ran the same start-up with the same
//! arguments a moment before).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkserver_protocol::{decode, encode, memfd_holding};
use serde::{Deserialize, Serialize};

use crate::connection::ConnectionState;
use crate::ledger::{ConnId, LedgerState};
use crate::listener::ListenerState;
use crate::log::{log, Level};
use crate::sys::{self, Passed};

/// The version of [`Handover`]'s layout; a new image reads only its own.
pub(crate) const FORMAT: u32 = 1;

const STATE: &str = "FORKSERVER_HANDOVER_FD";
const FALLBACK: &str = "FORKSERVER_UPGRADE_FALLBACK";
const FAILED: &str = "FORKSERVER_UPGRADE_FAILED";
const PROBE: &str = "FORKSERVER_UPGRADE_PROBE";

/// How long the probe may take to start and answer.
const PROBE_WAIT: Duration = Duration::from_secs(10);

/// The largest state read back (a million children's records is less).
const MAX_STATE_BYTES: usize = 256 << 20;

/// What the front hands the next image.
#[derive(Serialize, Deserialize)]
pub(crate) struct Handover {
    pub(crate) format: u32,
    /// The old image's version, for the log and the `upgraded` reply.
    pub(crate) version: String,
    pub(crate) listener: ListenerState,
    pub(crate) connections: Vec<ConnectionState>,
    pub(crate) next_conn: ConnId,
    pub(crate) ledger: LedgerState,
    /// The latest generation's number: the new image's first is the next.
    pub(crate) generation: u64,
    pub(crate) uptime_ms: u64,
    /// systemd's notify socket (the front took it out of its environment).
    pub(crate) notify_socket: Option<Vec<u8>>,
    /// The signal mask before the exec blocked every signal, by number.
    pub(crate) signal_mask: Vec<i32>,
    /// Who asked for the upgrade: (connection, request id).
    pub(crate) asker: Option<(ConnId, u64)>,
    /// Reloads asked and not yet answered: the new image's first
    /// generation answers them.
    pub(crate) reloads_waiting: Vec<(ConnId, u64)>,
}

/// The binary and arguments the front was started with, read at start:
/// an upgrade runs the file at that path again (whatever is there then).
pub(crate) struct Image {
    exe: PathBuf,
    argv: Vec<CString>,
}

impl Image {
    pub(crate) fn of_this_process() -> io::Result<Image> {
        let exe = std::fs::read_link("/proc/self/exe")?;
        let cmdline = std::fs::read("/proc/self/cmdline")?;
        let argv = cmdline
            .split(|&b| b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| CString::new(arg).expect("split at NUL"))
            .collect();
        Ok(Image { exe, argv })
    }

    pub(crate) fn exe(&self) -> &Path {
        &self.exe
    }

    /// Runs the binary as a probe (see the module's docs): Ok if it says it
    /// can take this [`FORMAT`] over; else what it did. Waits up to
    /// [`PROBE_WAIT`], holding the caller (the event loop) that long at most.
    pub(crate) fn probe(&self) -> Result<(), String> {
        let mut command = std::process::Command::new(&self.exe);
        if let Some((first, rest)) = self.argv.split_first() {
            std::os::unix::process::CommandExt::arg0(
                &mut command,
                OsStr::from_bytes(first.as_bytes()),
            );
            command.args(rest.iter().map(|a| OsStr::from_bytes(a.as_bytes())));
        }
        command
            .env(PROBE, FORMAT.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        let exe = self.exe.display();
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot run {exe}: {e}"))?;
        let deadline = Instant::now() + PROBE_WAIT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(format!(
                        "{exe}, run to check that it can take over, ended with {status} (its stderr is in this server's log)"
                    ))
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{exe}, run to check that it can take over, did not answer within {} s",
                        PROBE_WAIT.as_secs()
                    ));
                }
                Err(e) => return Err(format!("waiting for {exe}: {e}")),
            }
        }
    }

    /// Execs the binary with `state`, handing over `passed`; returns only
    /// if the exec failed (then every flag is as it was). The caller has
    /// blocked every signal.
    pub(crate) fn exec(&self, state: &Handover, passed: &Passed) -> io::Error {
        let bytes = match encode(state) {
            Ok(bytes) => bytes,
            Err(e) => return io::Error::other(format!("encoding the state: {e}")),
        };
        let (memfd, old_exe) = match memfd_holding(&bytes).and_then(|memfd| {
            let old_exe = sys::open_path(c"/proc/self/exe")?;
            Ok((memfd, old_exe))
        }) {
            Ok(fds) => fds,
            Err(e) => return e,
        };
        let mut handed = Passed::default();
        let state_fd = handed.pass(memfd.as_fd());
        let exe_fd = handed.pass(old_exe.as_fd());
        let mut env = environment(&[STATE, FALLBACK, FAILED, PROBE]);
        env.push(pair(STATE, &state_fd.to_string()));
        env.push(pair(FALLBACK, &format!("{exe_fd},{state_fd}")));
        if let Some(path) = &state.notify_socket {
            env.push(pair_bytes("NOTIFY_SOCKET", path));
        }
        let path = match CString::new(self.exe.as_os_str().as_bytes()) {
            Ok(path) => path,
            Err(_) => return io::Error::other("the binary's path holds a NUL"),
        };
        if let Err(e) = passed.set_cloexec(false).and(handed.set_cloexec(false)) {
            let _ = passed.set_cloexec(true);
            return e;
        }
        let error = sys::execve(&path, &self.argv, &env);
        // Still here: nothing was handed over. (`memfd` and `old_exe` close
        // when dropped.)
        let _ = passed.set_cloexec(true);
        error
    }
}

/// In a new image, at the start of `serve`: the state handed over, if this
/// image was started by an upgrade (None at a plain start), with the
/// handover's variables taken out of the environment (children must not
/// see them). A state that cannot be read makes the old binary run again
/// with it (so this returns only if there is no old binary to run: Err).
/// `Err` as well for an upgrade that failed and came back here: then the
/// state is `Ok` inside, with why.
pub(crate) fn take_from_env() -> Option<Result<(Handover, Option<String>), String>> {
    let state_fd = std::env::var_os(STATE);
    let fallback = std::env::var_os(FALLBACK);
    let failed = std::env::var_os(FAILED).map(|why| why.to_string_lossy().into_owned());
    for name in [STATE, FALLBACK, FAILED] {
        // SAFETY: the server is single-threaded; nothing reads the
        // environment concurrently.
        unsafe { std::env::remove_var(name) };
    }
    let state_fd = state_fd?;
    let fallback = fallback.as_deref().and_then(parse_fallback);
    Some(match (read_state(&state_fd), fallback) {
        (Ok(state), fallback) => {
            if let Some((exe_fd, _)) = fallback {
                // SAFETY: the old image's binary, handed over once; not
                // needed any more.
                drop(unsafe { sys::take_passed(exe_fd) });
            }
            Ok((state, failed))
        }
        (Err(why), Some((exe_fd, real_state))) => Err(fall_back(exe_fd, real_state, &why)),
        (Err(why), None) => Err(why),
    })
}

/// The state at the fd `STATE` names, checked for this image's format.
fn read_state(fd: &OsStr) -> Result<Handover, String> {
    let fd: RawFd = fd
        .to_str()
        .and_then(|fd| fd.parse().ok())
        .ok_or_else(|| format!("{STATE}={fd:?} is not an fd number"))?;
    // Checked open first: a number that is not ours must not be closed.
    let bytes = sys::inherited_fd(fd)
        .and_then(|file| sys::read_regular_file(file.as_fd(), MAX_STATE_BYTES))
        .map_err(|e| format!("cannot read the state handed over (fd {fd}): {e}"))?;
    let format = decode::<FormatOnly>(&bytes).map(|f| f.format).unwrap_or(0);
    if format != FORMAT {
        return Err(format!(
            "the state handed over is in format {format}; this image reads format {FORMAT}"
        ));
    }
    decode(&bytes).map_err(|e| format!("cannot decode the state handed over: {e}"))
}

/// The first field alone, to tell a format apart before decoding the rest.
#[derive(Deserialize)]
struct FormatOnly {
    format: u32,
}

fn parse_fallback(value: &OsStr) -> Option<(RawFd, RawFd)> {
    let (exe, state) = value.to_str()?.split_once(',')?;
    Some((exe.parse().ok()?, state.parse().ok()?))
}

/// Runs the old binary (`exe_fd`) again, with the state at `state_fd` and
/// why this image could not take it; returns why even that failed.
fn fall_back(exe_fd: RawFd, state_fd: RawFd, why: &str) -> String {
    log!(
        Level::Error,
        "this binary cannot take the server over ({why}); running the old one again"
    );
    let Ok(argv) = Image::of_this_process().map(|image| image.argv) else {
        return format!("{why}; and the old binary cannot be run again: /proc/self/cmdline");
    };
    let mut env = environment(&[STATE, FALLBACK, FAILED, PROBE]);
    env.push(pair(STATE, &state_fd.to_string()));
    env.push(pair(FAILED, why));
    // Closed by the exec (a binary, not a script, so the kernel needs it
    // no longer once it has loaded it): the old image must not inherit it.
    let _ = sys::set_cloexec(exe_fd, true);
    let error = sys::execveat_empty_path(exe_fd, &argv, &env);
    format!("{why}; and running the old binary again failed: {error}")
}

/// At the start of `serve`: a probe (see the module's docs) ends here,
/// with 0 if this image reads the format asked about.
pub(crate) fn answer_probe() {
    let Some(asked) = std::env::var_os(PROBE) else {
        return;
    };
    let version = env!("CARGO_PKG_VERSION");
    if asked.to_str() == Some(FORMAT.to_string().as_str()) {
        log!(
            Level::Debug,
            "probe: forkserver {version} can take over (state format {FORMAT})"
        );
        std::process::exit(0);
    }
    log!(
        Level::Error,
        "probe: forkserver {version} cannot take over: the running server hands over state format {}, this binary reads format {FORMAT}",
        asked.to_string_lossy()
    );
    std::process::exit(3);
}

/// This process's environment without `drop`, as `NAME=VALUE` strings.
fn environment(drop: &[&str]) -> Vec<CString> {
    std::env::vars_os()
        .filter(|(name, _)| !drop.iter().any(|d| name == d))
        .filter_map(|(name, value)| {
            let mut entry = name.into_vec();
            entry.push(b'=');
            entry.extend(value.into_vec());
            CString::new(entry).ok()
        })
        .collect()
}

fn pair(name: &str, value: &str) -> CString {
    pair_bytes(name, value.as_bytes())
}

fn pair_bytes(name: &str, value: &[u8]) -> CString {
    let mut entry = OsString::from(name).into_vec();
    entry.push(b'=');
    entry.extend_from_slice(value);
    CString::new(entry).unwrap_or_default()
}
