//! [`ServeOptions`]: everything a server is started with.

use std::path::PathBuf;
use std::time::Duration;

use forkserver_protocol::Limits;

use crate::{Level, PeerPolicy, ThreadPolicy};

/// How to run a server.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// Where to listen.
    pub socket: PathBuf,
    /// The limits enforced and announced in `Welcome`.
    pub limits: Limits,
    /// How long a child gets between SIGTERM and SIGKILL when its client
    /// disconnects or the server shuts down.
    pub kill_grace: Duration,
    /// What the thread guard tolerates besides the server's own thread.
    pub threads: ThreadPolicy,
    /// Dynamic modules to load at start: `(name, path to a shared library)`.
    pub dylibs: Vec<(String, PathBuf)>,
    /// Who may connect besides the server's uid and root.
    pub policy: PeerPolicy,
    /// Give the socket to this group, mode 0660 (else mode 0600).
    pub group: Option<u32>,
    /// Write a line to this fd (then close it) once ready.
    pub ready_fd: Option<i32>,
    /// Stop once this fd (a pipe's read end) reports end-of-file.
    pub lifeline_fd: Option<i32>,
    /// Once started, make this fd the server's stderr (and close it).
    pub stderr_after_ready: Option<i32>,
    /// Remove the socket's directory, once empty, with the socket.
    pub remove_socket_dir: bool,
    /// How much to log; `FORKSERVER_LOG` (default info) if None.
    pub log_level: Option<Level>,
    /// Prefork pools: `(worker, number of idle children to keep)`.
    pub pools: Vec<(String, u32)>,
    /// Reload by itself when a preloaded file changes on disk (once the
    /// files have stayed as they are for a second).
    pub reload_on_change: bool,
}

impl ServeOptions {
    /// Defaults for everything but the socket path.
    pub fn new(socket: PathBuf) -> ServeOptions {
        ServeOptions {
            socket,
            limits: Limits::default(),
            kill_grace: Duration::from_secs(5),
            threads: ThreadPolicy::Refuse,
            dylibs: Vec::new(),
            policy: PeerPolicy::default(),
            group: None,
            ready_fd: None,
            lifeline_fd: None,
            stderr_after_ready: None,
            remove_socket_dir: false,
            log_level: None,
            pools: Vec::new(),
            reload_on_change: false,
        }
    }
}
