//! Signals reach the event loop through a self-pipe.
//!
//! signal-hook's handlers set a flag per signal and write a byte to a
//! non-blocking pipe the loop watches; the loop drains the pipe and reads the
//! flags. No thread is started. SIGPIPE is ignored: a client that goes away
//! must cost us an `EPIPE`, not our life. SIGUSR2 is caught too: it is the
//! upgrade-in-place signal of other preforking servers (and of this one's
//! plans), and its default action would end the server and every child.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use signal_hook::SigId;

use crate::sys;

/// What arrived since the last [`SignalPipe::take`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrived {
    pub(crate) child: bool,
    pub(crate) terminate: bool,
    pub(crate) hangup: bool,
    pub(crate) upgrade: bool,
}

pub(crate) struct SignalPipe {
    read: OwnedFd,
    child: Arc<AtomicBool>,
    terminate: Arc<AtomicBool>,
    hangup: Arc<AtomicBool>,
    upgrade: Arc<AtomicBool>,
    ids: Vec<SigId>,
}

impl SignalPipe {
    pub(crate) fn install() -> io::Result<SignalPipe> {
        let (read, write) = sys::pipe(true)?;
        sys::set_nonblocking(write.as_raw_fd())?;
        let mut pipe = SignalPipe {
            read,
            child: Arc::default(),
            terminate: Arc::default(),
            hangup: Arc::default(),
            upgrade: Arc::default(),
            ids: Vec::new(),
        };
        for (signal, flag) in [
            (SIGCHLD, pipe.child.clone()),
            (SIGTERM, pipe.terminate.clone()),
            (SIGINT, pipe.terminate.clone()),
            (SIGHUP, pipe.hangup.clone()),
            (SIGUSR2, pipe.upgrade.clone()),
        ] {
            // The flag is registered first so it is set before the wake-up
            // byte is written.
            pipe.ids.push(signal_hook::flag::register(signal, flag)?);
            // Each registration owns a duplicate of the write end.
            pipe.ids.push(signal_hook::low_level::pipe::register_raw(
                signal,
                write.try_clone()?,
            )?);
        }
        sys::ignore_sigpipe()?;
        Ok(pipe)
    }

    /// Drains the pipe and returns (and clears) the flags.
    pub(crate) fn take(&self) -> Arrived {
        let mut buf = [0u8; 64];
        while sys::read(self.read.as_fd(), &mut buf).is_ok_and(|n| n > 0) {}
        Arrived {
            child: self.child.swap(false, Ordering::SeqCst),
            terminate: self.terminate.swap(false, Ordering::SeqCst),
            hangup: self.hangup.swap(false, Ordering::SeqCst),
            upgrade: self.upgrade.swap(false, Ordering::SeqCst),
        }
    }
}

impl AsFd for SignalPipe {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
