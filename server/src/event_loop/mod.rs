//! The event loop: one epoll set, one thread, O(1) work per event.
//!
//! Sources, each identified by the `u64` in its epoll event:
//! - the listener ([`LISTENER`]) — accept new connections;
//! - the signal pipe ([`SIGNALS`]) — reap children, shut down;
//! - the lifeline fd, if any ([`LIFELINE`]) — shut down at its end-of-file;
//! - each connection (`conn_token`) — read requests, flush queued replies;
//! - each starting child's exec error pipe (`pipe_token`) — EOF means exec
//!   succeeded (`Spawned`), a record means it failed (`SpawnFailed`).
//!
//! The handler of each request kind is in `requests.rs`; what happens when a
//! child's exec is confirmed or it is reaped is in `starts.rs`.
//!
//! Nothing here blocks on a child: the only waits are `epoll_wait` (bounded
//! by the nearest SIGKILL deadline) and non-blocking reads.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use forkserver_protocol::{decode, recv_datagram, ClientMessage, ErrorKind, Limits, ServerMessage};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::children::{Children, ConnId};
use crate::connection::{Connection, Sent};
use crate::listener::Listener;
use crate::log::{log, Level};
use crate::modules::Modules;
use crate::peer::{Peer, PeerPolicy};
use crate::pool::Pools;
use crate::readiness::Readiness;
use crate::signals::SignalPipe;
use crate::spawner::Spawner;
use crate::{sys, ServeError, ServeOptions};

mod requests;
mod starts;

const LISTENER: u64 = 0;
const SIGNALS: u64 = 1;
/// `4 & 3` is no tag, and no connection or pipe token equals 4.
const LIFELINE: u64 = 4;
const TAG_CONN: u64 = 2;
const TAG_PIPE: u64 = 3;

/// How long to stop accepting after running out of fds (EMFILE/ENFILE):
/// epoll is level-triggered, so a listener we cannot accept from would
/// otherwise wake us in a busy loop.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Requests read from one connection per wake-up, so one busy client cannot
/// starve the rest (epoll is level-triggered and comes back for more).
const READS_PER_WAKEUP: usize = 64;

fn conn_token(id: ConnId) -> u64 {
    (id << 2) | TAG_CONN
}

fn pipe_token(pid: libc::pid_t) -> u64 {
    ((pid as u64) << 2) | TAG_PIPE
}

pub(crate) struct EventLoop {
    epoll: Epoll,
    listener: Option<Listener>,
    signals: SignalPipe,
    /// `--lifeline-fd`: the starting process's pipe; its EOF stops us.
    lifeline: Option<OwnedFd>,
    spawner: Spawner,
    limits: Limits,
    kill_grace: Duration,
    connections: HashMap<ConnId, Connection>,
    next_conn: ConnId,
    children: Children,
    /// Set while the listener is out of the epoll set after EMFILE/ENFILE.
    accept_paused_until: Option<Instant>,
    policy: PeerPolicy,
    /// SIGTERM or SIGINT arrived; shut down after this round of events.
    stop_requested: bool,
    /// Children started and spawn requests failed, for `Status`.
    spawns: u64,
    failures: u64,
    /// Prefork pools, refilled when nothing else waits.
    pools: Pools,
    /// After a failed refill, no refill before this.
    refill_paused_until: Option<Instant>,
    /// The CPU was yielded since the last events, so a refill may fork now.
    yielded_for_refill: bool,
    /// Children whose start (exec or worker setup) is not yet reported.
    starting: usize,
    /// Our own uid and whether we are root (children then run as their peer).
    server_uid: u32,
    started: Instant,
}

impl EventLoop {
    pub(crate) fn new(
        listener: Listener,
        signals: SignalPipe,
        modules: Modules,
        options: &ServeOptions,
    ) -> Result<EventLoop, ServeError> {
        let setup = |doing: &'static str| move |e: nix::Error| ServeError::Setup(doing, e.into());
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(setup("creating epoll"))?;
        epoll
            .add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))
            .map_err(setup("watching the listener"))?;
        epoll
            .add(&signals, EpollEvent::new(EpollFlags::EPOLLIN, SIGNALS))
            .map_err(setup("watching the signal pipe"))?;
        let lifeline = match options.lifeline_fd {
            Some(fd) => {
                // SAFETY: the operator passed this fd for this purpose
                // (--lifeline-fd); we are its only user from here on.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                sys::set_cloexec_nonblocking(fd.as_raw_fd())
                    .map_err(|e| ServeError::Setup("--lifeline-fd", e))?;
                epoll
                    .add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, LIFELINE))
                    .map_err(setup("watching --lifeline-fd"))?;
                Some(fd)
            }
            None => None,
        };
        for (worker, _) in &options.pools {
            modules
                .find(worker)
                .map_err(|why| ServeError::Config(format!("--pool {worker}: {why}")))?;
        }
        let fork_guard = crate::threads::ForkGuard::arm(options.threads)
            .map_err(|why| ServeError::Config(format!("--allow-dormant-threads: {why}")))?;
        let spawner = Spawner::new(modules, fork_guard)
            .map_err(|e| ServeError::Setup("opening /dev/null", e))?;
        Ok(EventLoop {
            epoll,
            listener: Some(listener),
            signals,
            lifeline,
            spawner,
            limits: options.limits,
            kill_grace: options.kill_grace,
            connections: HashMap::new(),
            next_conn: 1,
            children: Children::default(),
            accept_paused_until: None,
            policy: options.policy.clone(),
            stop_requested: false,
            spawns: 0,
            failures: 0,
            pools: Pools::new(&options.pools),
            refill_paused_until: None,
            yielded_for_refill: false,
            starting: 0,
            server_uid: sys::getuid(),
            started: Instant::now(),
        })
    }

    /// Serves until SIGTERM or SIGINT, then drains: stops listening, closes
    /// every connection (killing their non-detached children), and returns
    /// once those children are gone.
    pub(crate) fn run(&mut self, readiness: &Readiness) -> Result<(), ServeError> {
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            if self.listener.is_none() && self.children.being_killed() == 0 {
                return Ok(());
            }
            let refill_timer = self
                .refill_paused_until
                .filter(|_| self.pools.short().is_some());
            let next_timer = [
                self.children.next_deadline(),
                self.accept_paused_until,
                refill_timer,
            ]
            .into_iter()
            .flatten()
            .min();
            // Never while a spawn waits to be reported: a refill's fork would
            // delay its `Spawned`.
            let refill_due = self.listener.is_some()
                && self.starting == 0
                && self.pools.short().is_some()
                && self
                    .refill_paused_until
                    .is_none_or(|until| until <= Instant::now());
            let timeout = match next_timer {
                // A pool to refill: look for waiting work without sleeping.
                _ if refill_due => EpollTimeout::ZERO,
                None => EpollTimeout::NONE,
                Some(at) => {
                    let ms = at.saturating_duration_since(Instant::now()).as_millis() + 1;
                    EpollTimeout::from(ms.min(u16::MAX as u128) as u16)
                }
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::Error::EINTR) => 0,
                Err(e) => return Err(ServeError::Setup("waiting on epoll", e.into())),
            };
            for event in &events[..n] {
                self.dispatch(event.data(), event.events());
            }
            if n > 0 {
                self.yielded_for_refill = false;
            } else if refill_due && !self.yielded_for_refill {
                // First let whoever our replies woke on this CPU run (a
                // client reading its `Spawned`): a refill's fork holds the
                // CPU in the kernel, not preemptible, for as long as copying
                // the preload's page tables takes (4 ms at 512 MB; the woken
                // client waited all of it, seen in a sched trace). Then look
                // for new work again before forking.
                sys::yield_cpu();
                self.yielded_for_refill = true;
            } else if refill_due {
                self.refill_one();
            }
            if self.stop_requested {
                self.stop_requested = false;
                readiness.stopping();
                self.begin_shutdown();
            }
            let now = Instant::now();
            self.children.kill_overdue(now);
            if self.accept_paused_until.is_some_and(|until| until <= now) {
                self.resume_accepting();
            }
        }
    }

    /// Forks one pool child for a pool below its size. Called only when no
    /// event is waiting, so a refill never delays a request.
    fn refill_one(&mut self) {
        let Some(worker) = self.pools.short().map(str::to_owned) else {
            return;
        };
        match self.spawner.prefork(&worker, &self.limits) {
            Ok(child) => {
                log!(
                    Level::Debug,
                    "pool '{worker}': forked idle child {}",
                    child.pid
                );
                self.pools.add(&worker, child);
                self.refill_paused_until = None;
            }
            Err(e) => {
                log!(
                    Level::Warn,
                    "pool '{worker}': refill failed, retrying in 1 s: {}",
                    e.message
                );
                self.refill_paused_until = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }

    fn pause_accepting(&mut self) {
        if let Some(listener) = &self.listener {
            let _ = self.epoll.delete(listener);
            self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
        }
    }

    fn resume_accepting(&mut self) {
        self.accept_paused_until = None;
        if let Some(listener) = &self.listener {
            if let Err(e) = self
                .epoll
                .add(listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))
            {
                log!(Level::Error, "cannot watch the listener again: {e}");
            }
        }
    }

    fn dispatch(&mut self, token: u64, flags: EpollFlags) {
        match (token, token & 3) {
            (LISTENER, _) => self.accept(),
            (SIGNALS, _) => self.handle_signals(),
            (LIFELINE, _) => self.lifeline_ready(),
            (_, TAG_CONN) => self.connection_ready(token >> 2, flags),
            (_, TAG_PIPE) => self.exec_pipe_ready((token >> 2) as libc::pid_t),
            _ => log!(Level::Error, "event for unknown token {token}"),
        }
    }

    fn handle_signals(&mut self) {
        let arrived = self.signals.take();
        if arrived.child {
            for (pid, status) in crate::children::reap() {
                self.child_reaped(pid, status);
            }
        }
        if arrived.hangup {
            log!(
                Level::Info,
                "SIGHUP: flushing the prefork pools; they refill from the current state"
            );
            self.pools.flush();
        }
        if arrived.terminate && self.listener.is_some() {
            self.stop_requested = true;
        }
    }

    /// The lifeline is readable: at end-of-file (or an error) the process
    /// that started us is gone, so stop as on SIGTERM. Bytes written to it
    /// mean nothing and are dropped.
    fn lifeline_ready(&mut self) {
        let Some(fd) = &self.lifeline else {
            return;
        };
        let mut buf = [0u8; 64];
        match nix::unistd::read(fd, &mut buf) {
            Ok(n) if n > 0 => return,
            Err(nix::Error::EAGAIN | nix::Error::EINTR) => return,
            _ => {}
        }
        log!(Level::Info, "--lifeline-fd reached end-of-file: stopping");
        let _ = self.epoll.delete(fd);
        self.lifeline = None;
        if self.listener.is_some() {
            self.stop_requested = true;
        }
    }

    fn begin_shutdown(&mut self) {
        log!(
            Level::Info,
            "shutting down: closing {} connection(s); {} child(ren) get SIGTERM, SIGKILL after {:?}",
            self.connections.len(),
            self.connections.values().map(|c| c.children.len()).sum::<usize>(),
            self.kill_grace
        );
        self.pools.flush();
        // Dropping the listener removes the socket file.
        if let Some(listener) = self.listener.take() {
            let _ = self.epoll.delete(&listener);
        }
        let ids: Vec<ConnId> = self.connections.keys().copied().collect();
        for id in ids {
            self.close_connection(id);
        }
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            // SAFETY: accept4 with null address pointers returns a new fd or -1.
            let fd = unsafe {
                libc::accept4(
                    listener.as_fd().as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if fd == -1 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => return,
                    Some(libc::EINTR) | Some(libc::ECONNABORTED) => continue,
                    // Out of fds: the connection waits in the backlog until
                    // some are freed; stop watching the listener meanwhile.
                    Some(libc::EMFILE) | Some(libc::ENFILE) => {
                        log!(Level::Warn, "accept failed, pausing accepts: {err}");
                        self.pause_accepting();
                        return;
                    }
                    _ => {
                        log!(Level::Warn, "accept failed: {err}");
                        return;
                    }
                }
            }
            // SAFETY: accept4 succeeded, so fd is new and ours alone.
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            let peer = match Peer::of(socket.as_fd()) {
                Ok(peer) => peer,
                Err(e) => {
                    log!(
                        Level::Warn,
                        "refused a connection: cannot read its credentials: {e}"
                    );
                    continue;
                }
            };
            let same_uid = self
                .connections
                .values()
                .filter(|c| c.peer.uid == peer.uid)
                .count();
            let refusal = if let Err(why) = self.policy.check(&peer, self.server_uid) {
                Some((ErrorKind::Denied, why))
            } else if self.connections.len() >= self.limits.max_connections as usize {
                Some((
                    ErrorKind::Limit,
                    format!(
                        "the server already holds {} connections (the limit max_connections)",
                        self.limits.max_connections
                    ),
                ))
            } else if same_uid >= self.limits.max_connections_per_uid as usize {
                Some((
                    ErrorKind::Limit,
                    format!(
                        "uid {} already has {same_uid} connections (the limit max_connections_per_uid)",
                        peer.uid
                    ),
                ))
            } else {
                None
            };
            let mut conn = Connection::new(socket, peer, self.limits.max_queued_replies);
            if let Some((kind, message)) = refusal {
                log!(Level::Warn, "refused {}: {message}", conn.peer);
                conn.send(&fatal(kind, message), Vec::new());
                continue;
            }
            let id = self.next_conn;
            self.next_conn += 1;
            if let Err(e) = self
                .epoll
                .add(&conn, EpollEvent::new(EpollFlags::EPOLLIN, conn_token(id)))
            {
                log!(Level::Warn, "cannot watch a new connection: {e}");
                continue;
            }
            self.connections.insert(id, conn);
        }
    }

    fn connection_ready(&mut self, id: ConnId, flags: EpollFlags) {
        if flags.contains(EpollFlags::EPOLLOUT) {
            if let Some(conn) = self.connections.get_mut(&id) {
                if conn.flush() {
                    self.watch_output(id, false);
                }
            }
        }
        if flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
            for _ in 0..READS_PER_WAKEUP {
                if !self.read_one(id) {
                    break;
                }
            }
        }
        if self.connections.get(&id).is_some_and(|c| c.dead) {
            self.close_connection(id);
        }
    }

    /// Reads and handles one request; false when there is nothing more to
    /// read now (or the connection is gone).
    fn read_one(&mut self, id: ConnId) -> bool {
        let Some(conn) = self.connections.get_mut(&id) else {
            return false;
        };
        let limits = self.limits;
        let datagram = match recv_datagram(
            conn.as_fd(),
            limits.max_message_bytes as usize,
            limits.max_fds_per_message as usize,
            libc::MSG_DONTWAIT,
        ) {
            Ok(Some(datagram)) => datagram,
            Ok(None) => {
                conn.dead = true;
                return false;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) => {
                log!(Level::Debug, "reading from client '{}': {e}", conn.client);
                conn.dead = true;
                return false;
            }
        };
        let discarded = if datagram.truncated {
            Some(format!(
                "a message was longer than {} bytes (the limit max_message_bytes)",
                limits.max_message_bytes
            ))
        } else if datagram.fds_truncated {
            Some(format!(
                "a message carried more than {} fds (the limit max_fds_per_message)",
                limits.max_fds_per_message
            ))
        } else {
            None
        };
        if let Some(what) = discarded {
            let message = format!("{what} and was discarded");
            self.reply(
                id,
                request_error(None, ErrorKind::Limit, message),
                Vec::new(),
            );
            return true;
        }
        match decode::<ClientMessage>(&datagram.bytes) {
            Ok(message) => self.handle(id, message, datagram.fds),
            Err(e) => {
                let greeted = conn.greeted;
                let error = if greeted {
                    request_error(None, ErrorKind::Protocol, e.to_string())
                } else {
                    fatal(
                        ErrorKind::Protocol,
                        format!("{e}; expected a hello message"),
                    )
                };
                self.reply(id, error, Vec::new());
            }
        }
        true
    }

    fn handle(&mut self, id: ConnId, message: ClientMessage, fds: Vec<OwnedFd>) {
        let greeted = self.connections.get(&id).is_some_and(|c| c.greeted);
        match message {
            ClientMessage::Hello { protocol, client } => self.hello(id, protocol, client),
            _ if !greeted => self.reply(
                id,
                fatal(
                    ErrorKind::Protocol,
                    "the first message on a connection must be hello".into(),
                ),
                Vec::new(),
            ),
            ClientMessage::Spawn(request) => self.spawn(id, request, fds),
            ClientMessage::Signal { id: child, signal } => self.signal(id, child, signal),
            ClientMessage::Status { id: request } => {
                let report = self.status(request);
                self.reply(id, ServerMessage::Status(report), Vec::new());
            }
            ClientMessage::List { id: request } => {
                let reply = self.list(id, request);
                self.reply(id, reply, Vec::new());
            }
            ClientMessage::Kill {
                id: request,
                pid,
                signal,
            } => {
                let reply = self.kill(id, request, pid, signal);
                self.reply(id, reply, Vec::new());
            }
        }
    }

    /// Sends a reply on a connection, watching for writability if it had to
    /// be queued and closing the connection if it is dead or fatal.
    fn reply(&mut self, id: ConnId, message: ServerMessage, fds: Vec<OwnedFd>) {
        let is_fatal = matches!(message, ServerMessage::Error { fatal: true, .. });
        let Some(conn) = self.connections.get_mut(&id) else {
            return;
        };
        let sent = conn.send(&message, fds);
        if is_fatal {
            if let ServerMessage::Error { message, .. } = &message {
                log!(Level::Warn, "closing client '{}': {message}", conn.client);
            }
            conn.dead = true;
        }
        if sent == Sent::Queued {
            self.watch_output(id, true);
        }
        if self.connections.get(&id).is_some_and(|c| c.dead) {
            self.close_connection(id);
        }
    }

    fn watch_output(&mut self, id: ConnId, on: bool) {
        let Some(conn) = self.connections.get(&id) else {
            return;
        };
        let mut flags = EpollFlags::EPOLLIN;
        if on || conn.has_queued() {
            flags |= EpollFlags::EPOLLOUT;
        }
        let mut event = EpollEvent::new(flags, conn_token(id));
        let _ = self.epoll.modify(conn, &mut event);
    }

    /// Forgets a connection and applies each of its children's
    /// `on_disconnect`.
    fn close_connection(&mut self, id: ConnId) {
        let Some(conn) = self.connections.remove(&id) else {
            return;
        };
        let _ = self.epoll.delete(&conn);
        let deadline = Instant::now() + self.kill_grace;
        self.children
            .disown(conn.children.values().copied(), deadline);
        log!(
            Level::Debug,
            "client '{}' disconnected with {} live child(ren)",
            conn.client,
            conn.children.len()
        );
    }
}

fn request_error(id: Option<u64>, kind: ErrorKind, message: String) -> ServerMessage {
    ServerMessage::Error {
        id,
        kind,
        message,
        fatal: false,
    }
}

fn fatal(kind: ErrorKind, message: String) -> ServerMessage {
    ServerMessage::Error {
        id: None,
        kind,
        message,
        fatal: true,
    }
}
