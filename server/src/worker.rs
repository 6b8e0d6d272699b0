//! [`WorkerContext`]: what a preloaded worker sees when it runs in its child.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::os::fd::{FromRawFd, OwnedFd};

use serde::de::DeserializeOwned;

/// The values preloads built, by module name.
pub(crate) type Preloaded = HashMap<String, Box<dyn Any>>;

/// A worker's entry point: runs in the forked child and returns its exit code.
pub(crate) type WorkerFn = Box<dyn Fn(&mut WorkerContext<'_>) -> i32>;

/// What a worker gets: its arguments, its payload, the fds its client passed,
/// and the preloaded modules. By the time the worker runs, its stdin,
/// stdout, stderr, environment and working directory are in place.
pub struct WorkerContext<'a> {
    pub(crate) target: String,
    pub(crate) args: Vec<String>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) fd_targets: Vec<i32>,
    pub(crate) preloaded: &'a Preloaded,
}

impl WorkerContext<'_> {
    /// The worker's name as the request gave it (for a worker family, the
    /// whole name, prefix included).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The arguments from the spawn request.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Decodes the request's MessagePack payload as a `T`.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        let bytes = self.payload.as_deref().ok_or(PayloadError::Missing)?;
        rmp_serde::from_slice(bytes).map_err(|e| PayloadError::Decode(e.to_string()))
    }

    /// The payload as MessagePack bytes, if the request had one.
    pub fn raw_payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }

    /// The fd numbers the client installed in this process besides 0–2.
    pub fn fd_targets(&self) -> &[i32] {
        &self.fd_targets
    }

    /// Takes ownership of passed fd `target` (a number the client asked for);
    /// None if no fd was passed there or it was already taken.
    pub fn take_fd(&mut self, target: i32) -> Option<OwnedFd> {
        let position = self.fd_targets.iter().position(|&t| t == target)?;
        self.fd_targets.remove(position);
        // SAFETY: the child setup installed a passed fd at `target`, and it is
        // handed out at most once (removed from the list above).
        Some(unsafe { OwnedFd::from_raw_fd(target) })
    }

    /// The value module `name`'s preload built, shared copy-on-write with the
    /// server. Panics (so the worker exits 101 naming the problem) if there is
    /// no such module or its value is not a `T`.
    pub fn preloaded<T: Any>(&self, name: &str) -> &T {
        match self.try_preloaded(name) {
            Some(value) => value,
            None if self.preloaded.contains_key(name) => panic!(
                "preloaded module '{name}' is not a {}",
                std::any::type_name::<T>()
            ),
            None => panic!("no preloaded module named '{name}'"),
        }
    }

    /// Like [`preloaded`](Self::preloaded), but None instead of a panic.
    pub fn try_preloaded<T: Any>(&self, name: &str) -> Option<&T> {
        self.preloaded.get(name)?.downcast_ref()
    }
}

/// A payload that is missing or is not the type asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PayloadError {
    /// The request carried no payload.
    Missing,
    /// The payload does not decode as the type asked for; the text says why.
    Decode(String),
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadError::Missing => f.write_str("the worker was started without a payload"),
            PayloadError::Decode(why) => write!(f, "the payload does not decode: {why}"),
        }
    }
}

impl std::error::Error for PayloadError {}
