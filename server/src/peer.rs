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
        Ok(Peer {
            pid,
            uid,
            gid,
            groups: sys::peer_groups(socket)?,
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
        }
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
