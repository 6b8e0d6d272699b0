//! Telling a supervisor the server is ready: systemd's notify protocol
//! (sd_notify(3): `READY=1`, `STATUS=…`, `STOPPING=1` datagrams to
//! `$NOTIFY_SOCKET`) and, for everyone else, a line on a file descriptor
//! (`--ready-fd N`).

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use crate::log::{log, Level};

pub(crate) struct Readiness {
    notify: Option<(UnixDatagram, SocketAddr)>,
    /// `NOTIFY_SOCKET` as it was, for the next image of an upgrade.
    notify_path: Option<Vec<u8>>,
    ready_fd: Option<OwnedFd>,
}

impl Readiness {
    /// Reads (and removes, so children do not inherit it) `NOTIFY_SOCKET`;
    /// keeps `ready_fd` for the ready line.
    pub(crate) fn from_env(ready_fd: Option<OwnedFd>) -> Readiness {
        let path = std::env::var_os("NOTIFY_SOCKET");
        let notify_path = path.as_ref().map(|p| p.as_encoded_bytes().to_vec());
        // SAFETY: the server is single-threaded; nothing reads the
        // environment concurrently.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let notify = path.and_then(|path| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
            // "@name" is an abstract socket (systemd uses those too).
            let addr = match bytes.strip_prefix(b"@") {
                Some(name) => SocketAddr::from_abstract_name(name),
                None => SocketAddr::from_pathname(&path),
            };
            match (UnixDatagram::unbound(), addr) {
                (Ok(socket), Ok(addr)) => Some((socket, addr)),
                (Err(e), _) | (_, Err(e)) => {
                    log!(Level::Warn, "cannot notify {path:?}: {e}");
                    None
                }
            }
        });
        Readiness {
            notify,
            notify_path,
            ready_fd,
        }
    }

    /// `NOTIFY_SOCKET`'s value, if systemd set one.
    pub(crate) fn socket_path(&self) -> Option<Vec<u8>> {
        self.notify_path.clone()
    }

    /// Everything is preloaded and the socket is listening.
    pub(crate) fn ready(&mut self, status: &str) {
        self.notify(&format!(
            "READY=1\nSTATUS={status}\nMAINPID={}",
            std::process::id()
        ));
        if let Some(fd) = self.ready_fd.take() {
            let mut file = std::fs::File::from(fd);
            // One write, so a supervisor that reads once gets the whole
            // line (a pipe write this short is atomic).
            let line = format!("ready {status}\n");
            if let Err(e) = file.write_all(line.as_bytes()) {
                log!(Level::Warn, "cannot write to --ready-fd: {e}");
            }
        }
    }

    /// A reload has begun (sd_notify(3): `RELOADING=1` with the monotonic
    /// clock's time in µs); [`ready`](Self::ready) again when it is over.
    pub(crate) fn reloading(&self) {
        self.notify(&format!(
            "RELOADING=1\nSTATUS=reloading\nMONOTONIC_USEC={}",
            crate::sys::monotonic_usec()
        ));
    }

    /// The server has begun to shut down.
    pub(crate) fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=stopping");
    }

    fn notify(&self, message: &str) {
        if let Some((socket, addr)) = &self.notify {
            if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
                log!(Level::Warn, "cannot notify systemd: {e}");
            }
        }
    }
}
