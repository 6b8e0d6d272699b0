//! The event loop: one epoll set, one thread, O(1) work per event.
//!
//! Sources, each identified by the `u64` in its epoll event:
//! - the listener ([`LISTENER`]) — accept new connections;
//! - the signal pipe ([`SIGNALS`]) — reap children, shut down;
//! - each connection (`conn_token`) — read requests, flush queued replies;
//! - each starting child's exec error pipe (`pipe_token`) — EOF means exec
//!   succeeded (`Spawned`), a record means it failed (`SpawnFailed`).
//!
//! Nothing here blocks on a child: the only waits are `epoll_wait` (bounded
//! by the nearest SIGKILL deadline) and non-blocking reads.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use forkserver_protocol::{
    decode, recv_datagram, ChildInfo, ChildStatus, ClientMessage, ErrorKind, Limits, OnDisconnect,
    ServerMessage, Spawn, StatusReport, Target, PROTOCOL_VERSION,
};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::child::FailedStep;
use crate::children::{read_exec_outcome, ChildRecord, Children, ConnId, ExecOutcome, Stage};
use crate::connection::{Connection, Sent};
use crate::listener::Listener;
use crate::log::{log, Level};
use crate::modules::Modules;
use crate::peer::{child_credentials, Peer, PeerPolicy};
use crate::pool::Pools;
use crate::readiness::Readiness;
use crate::signals::SignalPipe;
use crate::spawner::{self, ClientEnds, SpawnError, Spawner};
use crate::{sys, ServeError, ServeOptions};

const LISTENER: u64 = 0;
const SIGNALS: u64 = 1;
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
        for (worker, _) in &options.pools {
            modules
                .find(worker)
                .map_err(|why| ServeError::Config(format!("--pool {worker}: {why}")))?;
        }
        let spawner = Spawner::new(modules, !options.allow_threads)
            .map_err(|e| ServeError::Setup("opening /dev/null", e))?;
        Ok(EventLoop {
            epoll,
            listener: Some(listener),
            signals,
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
            let next_timer = [self.children.next_deadline(), self.accept_paused_until]
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
            if n == 0 && refill_due {
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
        match self.spawner.prefork(&self.limits) {
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

    fn hello(&mut self, id: ConnId, protocol: u32, client: String) {
        let Some(conn) = self.connections.get_mut(&id) else {
            return;
        };
        let reply = if conn.greeted {
            request_error(
                None,
                ErrorKind::Protocol,
                "hello was already received".into(),
            )
        } else if protocol != PROTOCOL_VERSION {
            fatal(
                ErrorKind::Version,
                format!(
                    "client speaks protocol version {protocol}; this server (forkserver {}) speaks version {PROTOCOL_VERSION}",
                    env!("CARGO_PKG_VERSION")
                ),
            )
        } else {
            conn.greeted = true;
            log!(Level::Debug, "client '{client}' connected");
            conn.client = client;
            ServerMessage::Welcome {
                protocol: PROTOCOL_VERSION,
                server_version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                modules: self.spawner.modules.infos.clone(),
                workers: self.spawner.modules.worker_names(),
                limits: self.limits,
            }
        };
        self.reply(id, reply, Vec::new());
    }

    fn spawn(&mut self, conn_id: ConnId, request: Spawn, fds: Vec<OwnedFd>) {
        let Some(conn) = self.connections.get(&conn_id) else {
            return;
        };
        let refusal = if conn.children.contains_key(&request.id) {
            Some(SpawnError::new(
                ErrorKind::Invalid,
                format!(
                    "id {} is already used by a live child of this connection",
                    request.id
                ),
            ))
        } else if conn.children.len() >= self.limits.max_children_per_connection as usize {
            Some(SpawnError::new(
                ErrorKind::Limit,
                format!(
                    "this connection already has {} live children (the limit max_children_per_connection)",
                    conn.children.len()
                ),
            ))
        } else if conn.pending >= self.limits.max_pending_per_connection {
            Some(SpawnError::new(
                ErrorKind::Limit,
                format!(
                    "this connection already has {} spawns waiting to start (the limit max_pending_per_connection)",
                    conn.pending
                ),
            ))
        } else {
            None
        };
        let credentials = child_credentials(&conn.peer, request.user.as_ref(), self.server_uid)
            .map_err(|message| SpawnError::new(ErrorKind::Denied, message));
        let pooled = match (&refusal, &credentials, &request.target) {
            (None, Ok(_), Target::Worker { name, .. }) => self.pools.take(name),
            _ => None,
        };
        let result = match (refusal, credentials, pooled) {
            (Some(error), _, _) | (None, Err(error), _) => Err(error),
            (None, Ok(_), Some(child)) => {
                self.spawner
                    .hand_off(child, &request, fds, &self.limits, &conn.peer)
            }
            (None, Ok(run_as), None) => self.spawner.spawn(&request, fds, &self.limits, run_as),
        };
        let started = match result {
            Ok(started) => started,
            Err(error) => {
                log!(
                    Level::Warn,
                    "spawn {} of {:?} for client '{}' ({}) refused: {}",
                    request.id,
                    spawner::describe(&request),
                    conn.client,
                    conn.peer,
                    error.message
                );
                let reply = ServerMessage::SpawnFailed {
                    id: request.id,
                    kind: error.kind,
                    errno: error.errno,
                    message: error.message,
                };
                self.failures += 1;
                self.reply(conn_id, reply, Vec::new());
                return;
            }
        };
        log!(
            Level::Debug,
            "spawn {} of {:?}: pid {}",
            request.id,
            spawner::describe(&request),
            started.pid
        );
        if let Err(e) = self.epoll.add(
            &started.error_pipe,
            EpollEvent::new(EpollFlags::EPOLLIN, pipe_token(started.pid)),
        ) {
            // Cannot happen short of memory exhaustion; the reaper still
            // resolves the child when it exits, but say so.
            log!(
                Level::Error,
                "cannot watch pid {}'s exec pipe: {e}",
                started.pid
            );
        }
        let conn = self
            .connections
            .get_mut(&conn_id)
            .expect("a connection stays open while its request is handled");
        conn.children.insert(request.id, started.pid);
        conn.pending += 1;
        self.starting += 1;
        self.spawns += 1;
        self.children.insert(
            started.pid,
            ChildRecord {
                owner: Some(conn_id),
                id: request.id,
                pidfd: started.pidfd,
                stage: Stage::Starting {
                    error_pipe: started.error_pipe,
                    client_ends: started.client_ends,
                },
                on_disconnect: request.on_disconnect,
                kill_at: None,
                early_exit: None,
                target: spawner::describe(&request).to_string_lossy().into_owned(),
                owner_pid: conn.peer.pid,
                owner_uid: conn.peer.uid,
                started: Instant::now(),
            },
        );
    }

    fn status(&self, id: u64) -> StatusReport {
        let modules = &self.spawner.modules;
        StatusReport {
            id,
            pid: std::process::id(),
            server_version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            rss_bytes: sys::resident_bytes().unwrap_or(0),
            modules: modules.infos.clone(),
            workers: modules.worker_names(),
            children: self.children.len() as u32,
            connections: self.connections.len() as u32,
            socket: self
                .listener
                .as_ref()
                .map(|l| l.path().display().to_string())
                .unwrap_or_default(),
            spawns: self.spawns,
            failures: self.failures,
            pools: self.pools.info(),
        }
    }

    /// Whether a peer may see and signal a child: its own uid's children,
    /// or all of them for root and the server's own uid.
    fn may_touch(&self, peer: &Peer, record: &ChildRecord) -> bool {
        peer.uid == 0 || peer.uid == self.server_uid || peer.uid == record.owner_uid
    }

    fn list(&self, conn_id: ConnId, id: u64) -> ServerMessage {
        let Some(peer) = self.connections.get(&conn_id).map(|c| &c.peer) else {
            return request_error(Some(id), ErrorKind::Protocol, "no connection".into());
        };
        let mut children: Vec<ChildInfo> = self
            .children
            .iter()
            .filter(|(_, record)| self.may_touch(peer, record))
            .map(|(pid, record)| ChildInfo {
                pid: pid as u32,
                target: record.target.clone(),
                owner_pid: record.owner_pid,
                owner_uid: record.owner_uid,
                owner_connected: record.owner.is_some(),
                age_ms: record.started.elapsed().as_millis() as u64,
                detached: record.on_disconnect == OnDisconnect::Detach,
            })
            .collect();
        children.sort_by_key(|c| c.pid);
        ServerMessage::Children { id, children }
    }

    fn kill(&self, conn_id: ConnId, id: u64, pid: Option<u32>, signal: i32) -> ServerMessage {
        let Some(peer) = self.connections.get(&conn_id).map(|c| &c.peer) else {
            return request_error(Some(id), ErrorKind::Protocol, "no connection".into());
        };
        if !(1..=libc::SIGRTMAX()).contains(&signal) {
            return request_error(
                Some(id),
                ErrorKind::Invalid,
                format!("signal {signal} is out of range 1..={}", libc::SIGRTMAX()),
            );
        }
        let targets: Vec<(libc::pid_t, &ChildRecord)> = match pid {
            Some(pid) => match self.children.get(pid as libc::pid_t) {
                None => {
                    return request_error(
                        Some(id),
                        ErrorKind::NoSuchChild,
                        format!("pid {pid} is not a live child of this server"),
                    )
                }
                Some(record) if !self.may_touch(peer, record) => {
                    return request_error(
                        Some(id),
                        ErrorKind::Denied,
                        format!(
                        "pid {pid} was started by uid {}; uid {} may signal only its own children",
                        record.owner_uid, peer.uid
                    ),
                    )
                }
                Some(record) => vec![(pid as libc::pid_t, record)],
            },
            None => self
                .children
                .iter()
                .filter(|(_, record)| self.may_touch(peer, record))
                .collect(),
        };
        let pids = targets
            .into_iter()
            .filter(|(_, record)| sys::pidfd_send_signal(record.pidfd.as_fd(), signal).is_ok())
            .map(|(pid, _)| pid as u32)
            .collect();
        ServerMessage::Killed { id, pids }
    }

    fn signal(&mut self, conn_id: ConnId, child_id: u64, signal: i32) {
        let reply = if !(1..=libc::SIGRTMAX()).contains(&signal) {
            request_error(
                Some(child_id),
                ErrorKind::Invalid,
                format!("signal {signal} is out of range 1..={}", libc::SIGRTMAX()),
            )
        } else {
            let pid = self
                .connections
                .get(&conn_id)
                .and_then(|c| c.children.get(&child_id).copied());
            match pid.and_then(|pid| self.children.get(pid)) {
                None => request_error(
                    Some(child_id),
                    ErrorKind::NoSuchChild,
                    format!("no live child with id {child_id} on this connection"),
                ),
                Some(record) => match sys::pidfd_send_signal(record.pidfd.as_fd(), signal) {
                    Ok(()) => ServerMessage::Signaled {
                        id: child_id,
                        signal,
                    },
                    Err(e) => request_error(
                        Some(child_id),
                        ErrorKind::NoSuchChild,
                        format!("cannot signal child {child_id}: {e}"),
                    ),
                },
            }
        };
        self.reply(conn_id, reply, Vec::new());
    }

    fn exec_pipe_ready(&mut self, pid: libc::pid_t) {
        let Some(ChildRecord {
            stage: Stage::Starting { error_pipe, .. },
            ..
        }) = self.children.get(pid)
        else {
            return;
        };
        match read_exec_outcome(error_pipe) {
            ExecOutcome::Pending => {}
            outcome => self.resolve_start(pid, outcome),
        }
    }

    /// The exec pipe has spoken: tell the owner `Spawned` or `SpawnFailed`,
    /// and `Exited` too if the child was already reaped.
    fn resolve_start(&mut self, pid: libc::pid_t, outcome: ExecOutcome) {
        let Some(record) = self.children.get_mut(pid) else {
            return;
        };
        let succeeded = outcome == ExecOutcome::Exec;
        let Stage::Starting {
            error_pipe,
            client_ends,
        } = std::mem::replace(
            &mut record.stage,
            if succeeded {
                Stage::Running
            } else {
                Stage::Failed
            },
        )
        else {
            return;
        };
        let _ = self.epoll.delete(&error_pipe);
        drop(error_pipe);
        self.starting -= 1;
        let (owner, id, early_exit) = (record.owner, record.id, record.early_exit);
        let reply = match outcome {
            ExecOutcome::Exec => {
                let (message, fds) = spawned_reply(id, pid, record, client_ends);
                Some((message, fds))
            }
            ExecOutcome::Failed(step, errno) => {
                self.failures += 1;
                let (kind, doing) = match step {
                    FailedStep::Exec => (ErrorKind::Exec, "cannot run the program"),
                    FailedStep::Chdir => (ErrorKind::Chdir, "cannot change to the directory"),
                    FailedStep::Setup => (ErrorKind::Setup, "cannot set up the child"),
                };
                let message = format!("{doing}: {}", io::Error::from_raw_os_error(errno));
                Some((
                    ServerMessage::SpawnFailed {
                        id,
                        kind,
                        errno: Some(errno),
                        message,
                    },
                    Vec::new(),
                ))
            }
            ExecOutcome::Pending => None,
        };
        if let (Some(conn), Some((message, fds))) = (owner, reply) {
            if let Some(c) = self.connections.get_mut(&conn) {
                c.pending = c.pending.saturating_sub(1);
                if !succeeded {
                    c.children.remove(&id);
                }
            }
            self.reply(conn, message, fds);
        }
        if let Some(status) = early_exit {
            self.child_reaped(pid, status);
        }
    }

    fn child_reaped(&mut self, pid: libc::pid_t, status: ChildStatus) {
        let Some(record) = self.children.get_mut(pid) else {
            if self.pools.remove(pid) {
                log!(
                    Level::Warn,
                    "idle pool child {pid} died ({status:?}); refilling"
                );
            } else {
                log!(Level::Debug, "reaped pid {pid} that was not ours to report");
            }
            return;
        };
        if let Stage::Starting { error_pipe, .. } = &record.stage {
            // The child is dead, so its end of the pipe is closed and the
            // outcome is there to read now.
            record.early_exit = Some(status);
            let outcome = match read_exec_outcome(error_pipe) {
                ExecOutcome::Pending => ExecOutcome::Exec,
                outcome => outcome,
            };
            self.resolve_start(pid, outcome);
            return;
        }
        let Some(record) = self.children.remove(pid) else {
            return;
        };
        log!(
            Level::Debug,
            "pid {pid} (id {}) ended: {status:?}",
            record.id
        );
        let (Stage::Running, Some(conn)) = (record.stage, record.owner) else {
            return;
        };
        if let Some(c) = self.connections.get_mut(&conn) {
            c.children.remove(&record.id);
        }
        let message = ServerMessage::Exited {
            id: record.id,
            pid: pid as u32,
            status,
        };
        self.reply(conn, message, Vec::new());
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

/// `Spawned` and its fds: the pidfd first, then the pipe ends asked for.
fn spawned_reply(
    id: u64,
    pid: libc::pid_t,
    record: &ChildRecord,
    ends: ClientEnds,
) -> (ServerMessage, Vec<OwnedFd>) {
    let mut fds = Vec::with_capacity(4);
    // The server keeps its own pidfd to signal the child; the client gets a
    // duplicate. If dup fails (EMFILE), the client gets no fd and is told.
    match record.pidfd.try_clone() {
        Ok(pidfd) => fds.push(pidfd),
        Err(e) => {
            return (
                request_error(
                    Some(id),
                    ErrorKind::Resource,
                    format!("child {pid} started but its pidfd could not be duplicated: {e}"),
                ),
                Vec::new(),
            )
        }
    }
    let mut index = |end: Option<OwnedFd>| {
        end.map(|fd| {
            fds.push(fd);
            (fds.len() - 1) as u32
        })
    };
    let stdin = index(ends.stdin);
    let stdout = index(ends.stdout);
    let stderr = index(ends.stderr);
    let message = ServerMessage::Spawned {
        id,
        pid: pid as u32,
        pidfd: 0,
        stdin,
        stdout,
        stderr,
    };
    (message, fds)
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
