//! Per-spawn process controls — resource limits, nice, CPU affinity,
//! `oom_score_adj` — checked before the fork, applied by the child before
//! it takes its peer's credentials (raising a hard limit, a nice value
//! below the current one or a lower `oom_score_adj` needs privilege).
//!
//! Who may ask what: root peers anything the kernel allows. Any other peer
//! may only do what it could do to itself: no hard limit above its own, no
//! nice value below its own, no `oom_score_adj` below its own, as read from
//! the process that connected when it connected ([`OwnControls`]). Where
//! they could not be read, such a request is refused: a check that cannot
//! be made fails closed, never falling back to the server's own values.

use std::os::fd::BorrowedFd;

use forkserver_protocol::{ErrorKind, Spawn, RLIMITS};

use super::fields::invalid;
use super::LaunchError;
use crate::peer::{OwnControls, Peer};
use crate::sys;

/// The type setrlimit(2) takes a resource as: glibc's enum, or an int
/// (musl).
#[cfg(target_env = "gnu")]
pub(crate) type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
pub(crate) type Resource = libc::c_int;

/// The name of resource `resource`, for messages.
pub(crate) fn resource_name(resource: u32) -> &'static str {
    RLIMITS
        .iter()
        .find(|(_, r)| *r == resource)
        .map_or("?", |(name, _)| name)
}

/// What the child applies, prepared so that it only reads.
#[derive(Default)]
pub(crate) struct Controls {
    pub(crate) rlimits: Vec<(Resource, libc::rlimit)>,
    pub(crate) nice: Option<i32>,
    pub(crate) cpus: Option<libc::cpu_set_t>,
    /// The value to write to /proc/self/oom_score_adj, as text.
    pub(crate) oom_score_adj: Option<Vec<u8>>,
}

/// Checks the request's controls against the peer's rights.
pub(crate) fn controls(request: &Spawn, peer: &Peer) -> Result<Controls, LaunchError> {
    let privileged = peer.uid == 0;
    let denied = |message: String| LaunchError::new(ErrorKind::Denied, message);
    // The peer's own values, for a check of `what` by a peer that is not
    // root: refused if they are unknown.
    let own = |what: &str| -> Result<&OwnControls, LaunchError> {
        peer.own.as_ref().map_err(|why| {
            denied(format!(
                "{what}: cannot check it against uid {}'s own ({why}), so it is refused",
                peer.uid
            ))
        })
    };
    let mut controls = Controls::default();
    for (i, limit) in request.rlimits.iter().enumerate() {
        let field = format!("rlimits[{i}]");
        let Some(&(name, resource)) = RLIMITS.iter().find(|(n, _)| *n == limit.resource) else {
            return Err(invalid(format!(
                "{field}.resource '{}' is not one of {}",
                limit.resource,
                RLIMITS.map(|(n, _)| n).join(", ")
            )));
        };
        let value = |v: Option<u64>| v.unwrap_or(libc::RLIM_INFINITY);
        let (soft, hard) = (value(limit.soft), value(limit.hard));
        if soft > hard {
            return Err(invalid(format!(
                "{field}: the soft limit of {name} ({soft}) is above its hard limit ({hard})"
            )));
        }
        if !privileged {
            let Some(own_hard) = own(&field)?.hard_limit(resource) else {
                return Err(denied(format!(
                    "{field}: uid {}'s own hard limit of {name} is unknown, so it is refused",
                    peer.uid
                )));
            };
            if hard > own_hard {
                return Err(denied(format!(
                    "{field}: uid {} may not raise the hard limit of {name} to {} above its own {}",
                    peer.uid,
                    shown(hard),
                    shown(own_hard)
                )));
            }
        }
        controls.rlimits.push((
            resource as Resource,
            libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            },
        ));
    }
    if let Some(nice) = request.nice {
        if !(-20..=19).contains(&nice) {
            return Err(invalid(format!("nice {nice} is outside -20..=19")));
        }
        if !privileged {
            let own = own("nice")?.nice;
            if nice < own {
                return Err(denied(format!(
                    "nice {nice}: uid {} may not raise priority above its own (nice {own})",
                    peer.uid
                )));
            }
        }
        controls.nice = Some(nice);
    }
    if let Some(cpus) = &request.cpus {
        controls.cpus = Some(cpu_set(cpus)?);
    }
    if let Some(adj) = request.oom_score_adj {
        if !(-1000..=1000).contains(&adj) {
            return Err(invalid(format!(
                "oom_score_adj {adj} is outside -1000..=1000"
            )));
        }
        if !privileged {
            let own = own("oom_score_adj")?.oom_score_adj;
            if adj < own {
                return Err(denied(format!(
                    "oom_score_adj {adj}: uid {} may only raise it from its own {own}",
                    peer.uid
                )));
            }
        }
        controls.oom_score_adj = Some(adj.to_string().into_bytes());
    }
    Ok(controls)
}

/// Whether `peer` may place a child in the cgroup v2 directory `dir`: it
/// must be one, and the peer must be able to write its `cgroup.procs`
/// (owner, group or other write bit, as cgroup delegation works; root
/// always). The kernel also checks the server's own right when it places
/// the child.
pub(crate) fn check_cgroup(dir: BorrowedFd<'_>, peer: &Peer) -> Result<(), LaunchError> {
    let os = |doing: &str, e| LaunchError::os(ErrorKind::Invalid, doing, e);
    if !sys::is_cgroup2(dir).map_err(|e| os("cgroup: reading the directory's file system", e))? {
        return Err(invalid(
            "cgroup: the fd is not a directory of a cgroup v2 file system (cgroup2)".into(),
        ));
    }
    let procs = sys::stat_at(dir, c"cgroup.procs")
        .map_err(|e| os("cgroup: reading its cgroup.procs", e))?;
    let mode = procs.st_mode;
    let in_group = peer.gid == procs.st_gid || peer.groups.contains(&procs.st_gid);
    let writable = peer.uid == 0
        || (peer.uid == procs.st_uid && mode & 0o200 != 0)
        || (in_group && mode & 0o020 != 0)
        || mode & 0o002 != 0;
    if !writable {
        return Err(LaunchError::new(
            ErrorKind::Denied,
            format!(
                "cgroup: uid {} may not write that cgroup's cgroup.procs (owner {}, group {}, mode {:o}); its owner can delegate it with chown",
                peer.uid,
                procs.st_uid,
                procs.st_gid,
                mode & 0o777
            ),
        ));
    }
    Ok(())
}

/// A CPU set from CPU numbers; refuses an empty list or a number beyond
/// what a set holds. (A CPU that is offline or outside the server's cpuset
/// fails in the child, reported as `cpus`.)
fn cpu_set(cpus: &[u32]) -> Result<libc::cpu_set_t, LaunchError> {
    if cpus.is_empty() {
        return Err(invalid(
            "cpus is empty: a child must be allowed some CPU".into(),
        ));
    }
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let capacity = 8 * std::mem::size_of::<libc::cpu_set_t>();
    for &cpu in cpus {
        if cpu as usize >= capacity {
            return Err(invalid(format!(
                "cpus: CPU {cpu} is beyond the {capacity} a CPU set holds"
            )));
        }
        // SAFETY: cpu is below the set's capacity (checked above).
        unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    }
    Ok(set)
}

fn shown(limit: u64) -> String {
    if limit == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        limit.to_string()
    }
}
