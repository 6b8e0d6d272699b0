//! The prefork pool: children forked ahead of time for a worker, waiting to
//! be handed a request (Android's "unspecialized app process" idea).
//!
//! A pool child is forked off the critical path, drops the server's fds,
//! warms up (maps code in, runs the builder's prewarm), resets its signal
//! dispositions, says it is ready with one byte on its control socket, and
//! blocks on it. A request for its worker is validated by the server as
//! usual, then sent to the child as an `Assignment` (launch/pool_child.rs) with its fds; the
//! child checks it again (credentials included: it recomputes who it may
//! become from the peer's identity), installs it exactly as a freshly forked
//! child would, and runs. The server watches its report pipe as for any
//! spawn, so `Spawned`/`SpawnFailed` and `Exited` are unchanged. Refills
//! happen only when the event loop has nothing waiting, after yielding the
//! CPU once. An assigned child is in the children table, never in the
//! pool, so a flush (SIGHUP, shutdown) can only kill idle, unspecialised ones.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};

use forkserver_protocol::PoolInfo;

use crate::sys;

/// An idle pool child, as the server holds it.
pub(crate) struct PoolChild {
    pub(crate) pid: libc::pid_t,
    pub(crate) pidfd: OwnedFd,
    /// Our end of its control socket.
    pub(crate) control: OwnedFd,
    /// The read end of its report pipe.
    pub(crate) report: OwnedFd,
    /// It has said it finished warming up (one byte on its control socket).
    pub(crate) ready: bool,
}

impl PoolChild {
    /// Whether the child has finished warming up, reading its report if it
    /// has just come. A child that is still mapping code in or running the
    /// prewarm would make a request handed to it wait, and competes for a
    /// CPU with whoever gets it.
    fn is_ready(&mut self) -> bool {
        if !self.ready {
            let mut byte = [0u8];
            self.ready =
                sys::recv_nonblocking(self.control.as_fd(), &mut byte).is_ok_and(|n| n == 1);
        }
        self.ready
    }
}

struct Pool {
    worker: String,
    size: usize,
    idle: VecDeque<PoolChild>,
    /// Children asked of the zygote and not answered yet.
    asked: usize,
    hits: u64,
    misses: u64,
}

/// Every worker's pool.
#[derive(Default)]
pub(crate) struct Pools {
    pools: Vec<Pool>,
}

impl Pools {
    pub(crate) fn new(sizes: &[(String, u32)]) -> Pools {
        Pools {
            pools: sizes
                .iter()
                .map(|(worker, size)| Pool {
                    worker: worker.clone(),
                    size: *size as usize,
                    idle: VecDeque::new(),
                    asked: 0,
                    hits: 0,
                    misses: 0,
                })
                .collect(),
        }
    }

    /// An idle child for `worker`, the oldest that is ready if any is (else
    /// the oldest, which will take the request when its warm-up ends: still
    /// sooner than a fork), counting a hit or (for a pooled worker whose
    /// pool is empty) a miss.
    pub(crate) fn take(&mut self, worker: &str) -> Option<PoolChild> {
        let pool = self.pools.iter_mut().find(|p| p.worker == worker)?;
        let at = pool.idle.iter_mut().position(PoolChild::is_ready);
        let child = pool.idle.remove(at.unwrap_or(0));
        if child.is_some() {
            pool.hits += 1;
        } else {
            pool.misses += 1;
        }
        child
    }

    /// A worker whose pool is below its size, counting the children asked
    /// of the zygote, if any.
    pub(crate) fn short(&self) -> Option<&str> {
        self.pools
            .iter()
            .find(|p| p.idle.len() + p.asked < p.size)
            .map(|p| p.worker.as_str())
    }

    /// A child for `worker` was asked of the zygote.
    pub(crate) fn asked(&mut self, worker: &str) {
        if let Some(pool) = self.pools.iter_mut().find(|p| p.worker == worker) {
            pool.asked += 1;
        }
    }

    /// The zygote answered one of `worker`'s: with the child, or without
    /// (it failed).
    pub(crate) fn answered(&mut self, worker: &str, child: Option<PoolChild>) {
        if let Some(pool) = self.pools.iter_mut().find(|p| p.worker == worker) {
            pool.asked = pool.asked.saturating_sub(1);
            pool.idle.extend(child);
        }
    }

    /// The zygote is gone, and with it every answer still owed.
    pub(crate) fn forget_asked(&mut self) {
        for pool in &mut self.pools {
            pool.asked = 0;
        }
    }

    /// Forgets an idle child that died; true if it was one of ours.
    pub(crate) fn remove(&mut self, pid: libc::pid_t) -> bool {
        for pool in &mut self.pools {
            if let Some(at) = pool.idle.iter().position(|c| c.pid == pid) {
                pool.idle.remove(at);
                return true;
            }
        }
        false
    }

    /// Kills every idle child. They hold no request, so nothing is lost; the
    /// reaper collects them.
    pub(crate) fn flush(&mut self) {
        for pool in &mut self.pools {
            for child in pool.idle.drain(..) {
                let _ = sys::pidfd_send_signal(child.pidfd.as_fd(), libc::SIGKILL);
            }
        }
    }

    pub(crate) fn info(&mut self) -> Vec<PoolInfo> {
        self.pools
            .iter_mut()
            .map(|p| PoolInfo {
                worker: p.worker.clone(),
                size: p.size as u32,
                idle: p.idle.len() as u32,
                ready: p
                    .idle
                    .iter_mut()
                    .map(PoolChild::is_ready)
                    .filter(|&r| r)
                    .count() as u32,
                hits: p.hits,
                misses: p.misses,
            })
            .collect()
    }
}
