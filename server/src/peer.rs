//! Who is on the other end of a connection, and whether they may use us.
//!
//! The kernel tells us the peer's pid, uid and gid at connect time
//! (`SO_PEERCRED`) and its supplementary groups (`SO_PEERGROUPS`, Linux 4.13+);
//! neither can be forged by the client. See unix(7).
//!
//! By default only the server's own uid and root may connect; `--allow-uid`
//! and `--allow-gid` widen that. The socket file's mode is a second, separate
//! gate: a uid allowed here still needs permission to open the socket (use
//! `--group`).

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;

use forkserver_protocol::{RunAs, Spawn};
use serde::{Deserialize, Serialize};

use crate::sys;

/// A connected client's credentials, as the kernel reports them.
/// (Serialized only inside the server's own hand-off to a pool child.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Peer {
    pub(crate) pid: i32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Supplementary groups.
    pub(crate) groups: Vec<u32>,
    /// What the connecting process could do to itself, read when it
    /// connected; or why it could not be read (then every request that
    /// needs it is refused). Not read for root, who may ask anything.
    pub(crate) own: Result<OwnControls, String>,
}

/// A process's own nice value, `oom_score_adj` and hard resource limits:
/// what a peer that is not root may ask for its children (no lower nice or
/// `oom_score_adj`, no higher hard limit), read from `/proc/PID` when it
/// connects. Read then, from the process that connected: read later, that
/// process may have exited and left the connection to a child, or its pid
/// may be another process's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OwnControls {
    pub(crate) nice: i32,
    pub(crate) oom_score_adj: i32,
    /// `(resource, hard limit)` for every resource of `/proc/PID/limits`;
    /// `RLIM_INFINITY` for unlimited.
    pub(crate) hard_limits: Vec<(u32, u64)>,
}

/// The rows of `/proc/PID/limits`, in the kernel's order (the resource
/// numbers 0 to 15), as the kernel names them (fs/proc/base.c).
const LIMIT_ROWS: [&str; 16] = [
    "Max cpu time",
    "Max file size",
    "Max data size",
    "Max stack size",
    "Max core file size",
    "Max resident set",
    "Max processes",
    "Max open files",
    "Max locked memory",
    "Max address space",
    "Max file locks",
    "Max pending signals",
    "Max msgqueue size",
    "Max nice priority",
    "Max realtime priority",
    "Max realtime timeout",
];

impl OwnControls {
    /// Reads process `pid`'s, which must run as effective uid `uid`.
    pub(crate) fn read(pid: i32, uid: u32) -> Result<OwnControls, String> {
        let [stat, oom_score_adj, limits, status] =
            sys::read_proc_files(pid, [c"stat", c"oom_score_adj", c"limits", c"status"]).map_err(
                |e| format!("cannot read /proc/{pid} of the process that connected: {e}"),
            )?;
        // Read last: the files above were this uid's process's.
        let euid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|euid| euid.parse::<u32>().ok());
        if euid != Some(uid) {
            return Err(format!(
                "process {pid} runs as uid {euid:?}, not the connecting uid {uid}: it is not the process that connected"
            ));
        }
        let bad = |what: &str| format!("cannot parse /proc/{pid}/{what}");
        // Field 19 of proc(5): nice.
        let nice = sys::stat_field(stat.as_bytes(), 19)
            .and_then(|nice| nice.parse().ok())
            .ok_or_else(|| bad("stat"))?;
        let oom_score_adj = oom_score_adj
            .trim()
            .parse()
            .map_err(|_| bad("oom_score_adj"))?;
        Ok(OwnControls {
            nice,
            oom_score_adj,
            hard_limits: parse_hard_limits(&limits).ok_or_else(|| bad("limits"))?,
        })
    }

    /// The hard limit of `resource`, if `/proc` showed it.
    pub(crate) fn hard_limit(&self, resource: u32) -> Option<u64> {
        self.hard_limits
            .iter()
            .find(|(r, _)| *r == resource)
            .map(|&(_, hard)| hard)
    }
}

/// `(resource, hard limit)` from the text of `/proc/PID/limits`; None if a
/// row is not where and what the kernel writes.
fn parse_hard_limits(text: &str) -> Option<Vec<(u32, u64)>> {
    let mut rows = text.lines().skip(1);
    let mut limits = Vec::with_capacity(LIMIT_ROWS.len());
    for (resource, name) in LIMIT_ROWS.iter().enumerate() {
        let row = rows.next()?.strip_prefix(name)?;
        let hard = row.split_whitespace().nth(1)?;
        let hard = match hard {
            "unlimited" => libc::RLIM_INFINITY,
            number => number.parse().ok()?,
        };
        limits.push((resource as u32, hard));
    }
    Some(limits)
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)
    }
}

impl Peer {
    /// Reads the credentials of the peer of a connected Unix socket.
    pub(crate) fn of(socket: BorrowedFd<'_>) -> io::Result<Peer> {
        let (pid, uid, gid) = sys::peer_credentials(socket)?;
        let own = if uid == 0 {
            Err("not read for root".into())
        } else {
            OwnControls::read(pid, uid)
        };
        Ok(Peer {
            pid,
            uid,
            gid,
            groups: sys::peer_groups(socket)?,
            own,
        })
    }
}

/// Which peers may connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    /// Users allowed besides the server's own uid and root.
    pub allow_uids: Vec<u32>,
    /// Groups whose members (primary or supplementary) are allowed.
    pub allow_gids: Vec<u32>,
}

impl PeerPolicy {
    /// Ok if `peer` may connect to a server running as `server_uid`; else a
    /// sentence saying why not and how to allow it.
    pub(crate) fn check(&self, peer: &Peer, server_uid: u32) -> Result<(), String> {
        let allowed = peer.uid == server_uid
            || peer.uid == 0
            || self.allow_uids.contains(&peer.uid)
            || std::iter::once(&peer.gid)
                .chain(&peer.groups)
                .any(|gid| self.allow_gids.contains(gid));
        if allowed {
            return Ok(());
        }
        Err(format!(
            "uid {} is not allowed to use this forkserver (it serves uid {server_uid} and root{}); its owner can add --allow-uid {} or --allow-gid",
            peer.uid,
            if self.allow_uids.is_empty() && self.allow_gids.is_empty() {
                String::new()
            } else {
                format!(
                    ", uids {:?} and gids {:?}",
                    self.allow_uids, self.allow_gids
                )
            },
            peer.uid
        ))
    }
}

/// What a child that `peer` asks for with `request` may be, on a server
/// running as `server_uid`: the credentials it runs with
/// ([`child_credentials`]), once the request asks for nothing only the
/// server's own user may have. That is the server's session
/// (`new_session: false`): its controlling terminal, when it has one, is
/// the operator's, and a child in the server's session could open it as
/// `/dev/tty` and type into it (`TIOCSTI`) or read from it.
pub(crate) fn child_rights(
    peer: &Peer,
    request: &Spawn,
    server_uid: u32,
) -> Result<Option<RunAs>, String> {
    if !request.new_session && peer.uid != server_uid && peer.uid != 0 {
        return Err(format!(
            "new_session: false: uid {} may not start a child in the server's session (only uid {server_uid}, the server's own, and root may); leave new_session true, the default",
            peer.uid
        ));
    }
    child_credentials(peer, request.user.as_ref(), server_uid)
}

/// The credentials a child of `peer` must run with, on a server running as
/// `server_uid`:
/// - a root server runs a non-root peer's children as that peer (uid, gid,
///   supplementary groups): a root daemon never hands root to a user;
/// - only a root peer may name another user (`requested`); anyone may name
///   their own uid and gid, which changes nothing;
/// - otherwise the child keeps the server's credentials (None).
fn child_credentials(
    peer: &Peer,
    requested: Option<&RunAs>,
    server_uid: u32,
) -> Result<Option<RunAs>, String> {
    match requested {
        Some(user) if peer.uid == 0 => Ok(Some(user.clone())),
        // Naming one's own uid and gid (std's `CommandExt::uid(getuid())`)
        // asks for nothing new: the peer's children run as the peer anyway.
        Some(user) if user.uid == peer.uid && user.gid == peer.gid => {
            child_credentials(peer, None, server_uid)
        }
        Some(user) => Err(format!(
            "uid {} may not run a child as uid {} gid {}: only root may ask for another user or group",
            peer.uid, user.uid, user.gid
        )),
        None if server_uid == 0 && peer.uid != 0 => Ok(Some(RunAs {
            uid: peer.uid,
            gid: peer.gid,
            groups: peer.groups.clone(),
        })),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
            own: Err("not read in this test".into()),
        }
    }

    #[test]
    // RLIMIT_NOFILE is a u32 with glibc, an i32 with musl.
    #[allow(clippy::unnecessary_cast)]
    fn own_controls_are_this_process_s() {
        let me = std::process::id() as i32;
        // SAFETY: geteuid cannot fail.
        let own = OwnControls::read(me, unsafe { libc::geteuid() }).unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(
            own.hard_limit(libc::RLIMIT_NOFILE as u32),
            Some(limit.rlim_max)
        );
        assert_eq!(own.hard_limits.len(), 16);
        // SAFETY: getpriority takes plain integers.
        let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        assert_eq!(own.nice, nice);
        let adj = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap();
        assert_eq!(own.oom_score_adj.to_string(), adj.trim());
        // Another uid's view of this process is refused, not used.
        // SAFETY: as above.
        let other = unsafe { libc::geteuid() } + 1;
        assert!(OwnControls::read(me, other)
            .unwrap_err()
            .contains("not the process that connected"));
        assert!(OwnControls::read(i32::MAX, other)
            .unwrap_err()
            .contains("cannot read /proc/"));
    }

    #[test]
    fn limits_rows_must_be_the_kernel_s() {
        let mut text = String::from("Limit  Soft Limit  Hard Limit  Units\n");
        for (i, name) in LIMIT_ROWS.iter().enumerate() {
            text += &format!(
                "{name:<25} 10 {} units\n",
                if i == 7 { "4096" } else { "unlimited" }
            );
        }
        let limits = parse_hard_limits(&text).unwrap();
        assert_eq!(limits[7], (7, 4096));
        assert_eq!(limits[0], (0, libc::RLIM_INFINITY));
        assert!(parse_hard_limits(&text.replace("Max open files", "Max open filez")).is_none());
        assert!(parse_hard_limits("Limit\n").is_none());
    }

    #[test]
    fn own_uid_and_root_by_default_then_what_is_allowed() {
        let policy = PeerPolicy::default();
        assert!(policy.check(&peer(1000, 1000, &[]), 1000).is_ok());
        assert!(policy.check(&peer(0, 0, &[]), 1000).is_ok());
        let refusal = policy.check(&peer(1001, 1001, &[]), 1000).unwrap_err();
        assert!(refusal.starts_with("uid 1001 is not allowed"), "{refusal}");

        let widened = PeerPolicy {
            allow_uids: vec![1001],
            allow_gids: vec![50],
        };
        assert!(widened.check(&peer(1001, 1001, &[]), 1000).is_ok());
        assert!(widened.check(&peer(1002, 1002, &[7, 50]), 1000).is_ok());
        assert!(widened.check(&peer(1003, 1003, &[7]), 1000).is_err());
    }

    #[test]
    fn a_root_server_never_hands_root_to_a_user() {
        let user = peer(1000, 100, &[100, 27]);
        let as_user = child_credentials(&user, None, 0).unwrap().unwrap();
        assert_eq!(
            (as_user.uid, as_user.gid, as_user.groups),
            (1000, 100, vec![100, 27])
        );
        assert_eq!(child_credentials(&peer(0, 0, &[]), None, 0).unwrap(), None);
        assert_eq!(child_credentials(&user, None, 1000).unwrap(), None);

        let other = RunAs {
            uid: 33,
            gid: 33,
            groups: vec![],
        };
        assert!(child_credentials(&user, Some(&other), 0).is_err());
        let itself = RunAs {
            uid: 1000,
            gid: 100,
            groups: vec![],
        };
        assert_eq!(
            child_credentials(&user, Some(&itself), 0).unwrap(),
            child_credentials(&user, None, 0).unwrap()
        );
        assert_eq!(child_credentials(&user, Some(&itself), 1000).unwrap(), None);
        assert_eq!(
            child_credentials(&peer(0, 0, &[]), Some(&other), 0).unwrap(),
            Some(other)
        );
    }
}
