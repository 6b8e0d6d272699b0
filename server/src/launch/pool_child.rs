//! A prefork pool child's life, in the child: drop the server's fds, warm
//! up, say it is ready, wait for one request, and become it.
//!
//! Unlike the fork-to-exec path, an idle pool child is a process of its
//! own: a copy of the single-threaded server, so it may allocate and
//! decode. It checks the request again as a fresh fork would (who may it
//! become? USAP's re-check), then runs the ordinary child setup.

use std::convert::Infallible;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};

use forkserver_protocol::Spawn;
use serde::{Deserialize, Serialize};

use super::plan::PlanFds;
use super::report::{FailedStep, Failure, Reporter};
use super::setup::{self, close_except};
use super::Launcher;
use crate::peer::{child_rights, Peer};

/// What the server sends a pool child: the request (pipes already replaced
/// by passed fds) and who asked, for the child's own credential check.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Assignment {
    pub(crate) spawn: Spawn,
    pub(crate) peer: Peer,
    pub(crate) server_uid: u32,
    /// Its stdio is a terminal the server made, to become the controlling
    /// terminal (the request's `pty`, already made).
    pub(crate) controlling_tty: bool,
}

/// The largest assignment sent as the datagram itself; a bigger one (a
/// request with 300 KB of arguments, say) is written to a memfd sent as the
/// last fd of a datagram holding [`IN_THE_LAST_FD`].
pub(crate) const INLINE_ASSIGNMENT_BYTES: usize = 64 * 1024;

/// The datagram that says the assignment is in its last fd (never a
/// MessagePack map, which starts with a byte of 0x80 and up).
pub(crate) const IN_THE_LAST_FD: &[u8] = b"memfd";

/// Decodes an assignment (or a message holding one): a client's request,
/// decoded once within the protocol's nesting limit, in a few more levels.
pub(crate) fn decode_assignment<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, forkserver_protocol::CodecError> {
    // An Assignment adds one level; the zygote's message around it one more.
    forkserver_protocol::decode_wrapped(bytes, 2)
}

/// The most fds an assignment carries: the request's (`max_fds_per_message`
/// is at most `MAX_MOVES - 3`), its pipes and terminal, a memfd.
pub(crate) const MAX_FDS: usize = 512;

/// The largest assignment read from a memfd: a request within the
/// protocol's limits (`max_bulk_bytes` and the argument and environment
/// limits) is far smaller.
const MAX_ASSIGNMENT_BYTES: usize = 64 << 20;

/// Runs an idle pool child for `worker`, right after `fork()`.
///
/// Keeps 0–2 (replaced when the request comes), the control socket, the
/// report pipe and /dev/null (for `null` stdio), closing every other fd;
/// maps code in; runs the builder's prewarm (a panic there is ignored) with
/// signals still blocked; resets signal dispositions; sends one byte
/// ("ready") on the control socket; then waits for its [`Assignment`]. If
/// the server closes the control socket first (a flush, or shutdown), the
/// child exits 0.
///
/// # Safety
/// Call only in a freshly forked child of a single-threaded process, with
/// `control` and the reporter's pipe open.
pub(super) unsafe fn run(
    launcher: &Launcher,
    worker: &str,
    control: RawFd,
    reporter: &Reporter,
) -> Infallible {
    // Signals stay blocked (as the server forked) until the warm-up is
    // over: the server's handlers are still installed, and one would write
    // into whatever file reuses the number of the server's signal pipe.
    // SAFETY: this child never uses the server's objects owning the closed
    // fds again: it becomes its request or exits.
    unsafe { close_except(3, [control, reporter.fd(), launcher.dev_null.as_raw_fd()]) };
    map_code_in();
    // Best effort: a failed warm-up leaves a cold child, still usable.
    let _ = panic::catch_unwind(AssertUnwindSafe(|| launcher.modules.prewarm(worker)));
    // Default dispositions from here on (what a prewarm installed goes too,
    // as it would in a forked worker), so the request's path need not reset
    // them again.
    // SAFETY: a forked child; the server's handlers are not needed here.
    unsafe { setup::reset_signals() };
    // SAFETY: control is ours alone now; the borrow lasts for this function.
    let socket = unsafe { BorrowedFd::borrow_raw(control) };
    // Ready: one byte the server reads before choosing a child for a
    // request (ignored if the server has gone; the recv below sees EOF).
    let _ = forkserver_protocol::send_datagram(
        socket,
        b"r",
        &[],
        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
    );
    let assignment = match forkserver_protocol::recv_datagram(socket, 1 << 20, MAX_FDS, 0) {
        Ok(Some(datagram)) if !datagram.truncated && !datagram.fds_truncated => datagram,
        // EOF: flushed before use. Anything else: nothing to become.
        // SAFETY: _exit never returns.
        _ => unsafe { libc::_exit(0) },
    };
    // SAFETY: closing our own socket, never used again.
    unsafe { libc::close(control) };
    let (bytes, mut fds) = (assignment.bytes, assignment.fds);
    let bytes = if bytes == IN_THE_LAST_FD {
        let file = fds.pop();
        match file.map(|file| crate::sys::read_regular_file(file.as_fd(), MAX_ASSIGNMENT_BYTES)) {
            Some(Ok(bytes)) => bytes,
            _ => reporter.fail(Failure::new(FailedStep::Setup, libc::EPROTO)),
        }
    } else {
        bytes
    };
    let failure = become_assigned(launcher, &bytes, fds, reporter);
    reporter.fail(failure)
}

/// Decodes the assignment, checks it again, plans it like a fresh spawn,
/// and runs it. Returns only with the failure to report.
fn become_assigned(
    launcher: &Launcher,
    bytes: &[u8],
    fds: Vec<OwnedFd>,
    reporter: &Reporter,
) -> Failure {
    let setup_failed = |errno| Failure::new(FailedStep::Setup, errno);
    let Ok(assignment) = decode_assignment::<Assignment>(bytes) else {
        return setup_failed(libc::EPROTO);
    };
    let request = assignment.spawn;
    let Ok(credentials) = child_rights(&assignment.peer, &request, assignment.server_uid) else {
        return setup_failed(libc::EPERM);
    };
    let mut made = PlanFds::default();
    match launcher.plan(&request, &assignment.peer, &fds, credentials, &mut made) {
        Ok(mut plan) => {
            plan.controlling_tty |= assignment.controlling_tty;
            // SAFETY: a forked, single-threaded pool child with the plan's
            // fds (in `fds`) open, and its signals already reset (above).
            unsafe { setup::run_with_default_signals(plan, reporter) }
        }
        Err(_) => setup_failed(libc::EINVAL),
    }
}

/// Enters into this idle pool child's page tables the code and read-only
/// data of the file holding the server's code and of the C library. fork
/// copies no page-table entries for file mappings, so without this each
/// code page the request's decode, plan and setup run faults on first use
/// (BENCHMARKS.md has the figures). MADV_POPULATE_READ (Linux 5.14) fills
/// them now, off the request's path; on older kernels it fails and the
/// child stays as it was.
fn map_code_in() {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let mappings: Vec<Mapping<'_>> = maps.lines().filter_map(Mapping::parse).collect();
    let file_of = |address: usize| {
        mappings
            .iter()
            .find(|m| (m.start..m.end).contains(&address))
            .map(|m| m.path)
    };
    let files = [
        file_of(map_code_in as *const () as usize),
        file_of(libc::close as *const () as usize),
    ];
    for m in &mappings {
        if files.contains(&Some(m.path)) && !m.perms.contains('w') {
            // SAFETY: advice on a range this process has mapped; populating
            // page-table entries for readable pages changes no contents.
            unsafe {
                libc::madvise(
                    m.start as *mut libc::c_void,
                    m.end - m.start,
                    libc::MADV_POPULATE_READ,
                )
            };
        }
    }
}

/// One line of /proc/self/maps (proc(5)): `START-END PERMS OFFSET DEV INODE PATH`.
struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    path: &'a str,
}

impl<'a> Mapping<'a> {
    fn parse(line: &'a str) -> Option<Mapping<'a>> {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let perms = fields.next()?;
        let path = fields.nth(3)?;
        Some(Mapping {
            start: usize::from_str_radix(start, 16).ok()?,
            end: usize::from_str_radix(end, 16).ok()?,
            perms,
            path,
        })
    }
}
