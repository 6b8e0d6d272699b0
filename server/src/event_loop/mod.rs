//! The event loop: one epoll set, one thread, O(1) work per event.
//!
//! Sources, each identified by the `u64` in its epoll event:
//! - the listener ([`LISTENER`]) — accept new connections;
//! - the signal pipe ([`SIGNALS`]) — reap children, shut down;
//! - the lifeline fd, if any ([`LIFELINE`]) — shut down at its end-of-file;
//! - each connection (`conn_token`) — read requests, flush queued replies;
//! - each starting child's report pipe (`pipe_token`) — EOF means it
//!   started (`Spawned`), a record means it failed (`SpawnFailed`);
//! - the serving zygote's socket ([`ZYGOTE`]) — the pool children it made
//!   for us, or its end; a preloading zygote's ([`NEXT_ZYGOTE`]) — whether
//!   it is ready (`generations.rs`).
//!
//! Connections are accepted, read and written in `connections.rs`; each
//! request kind has its handler in `requests.rs`. Children are made by the
//! launch layer and recorded by the ledger, whose replies are sent from
//! here.
//!
//! Nothing here blocks on a child: the only waits are `epoll_wait` (bounded
//! by the nearest timer) and non-blocking reads.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use forkserver_protocol::{ChildStatus, Limits, ModuleInfo};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::connection::Connection;
use crate::handover::{Handover, Image};
use crate::launch::{report, Launcher};
use crate::ledger::{ConnId, Ledger, Settled};
use crate::listener::Listener;
use crate::log::{log, Level};
use crate::modules::Modules;
use crate::peer::PeerPolicy;
use crate::pool::Pools;
use crate::readiness::Readiness;
use crate::signals::SignalPipe;
use crate::sys::SiblingFork;
use crate::threads::ForkGuard;
use crate::{sys, ServeError, ServeOptions};

mod budgets;
mod connections;
mod generations;
mod inspect;
mod requests;
mod upgrade;

const LISTENER: u64 = 0;
const SIGNALS: u64 = 1;
/// `4 & 3` is no tag, and no connection or pipe token equals 4.
const LIFELINE: u64 = 4;
/// As for [`LIFELINE`], `8 & 3` and `12 & 3` are no tags.
const ZYGOTE: u64 = 8;
const NEXT_ZYGOTE: u64 = 12;
const TAG_CONN: u64 = 2;
/// How long a pool refill waits for the latest spawn to report its start.
const REFILL_WAITS_FOR_A_START: Duration = Duration::from_millis(100);
const TAG_PIPE: u64 = 3;

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
    launcher: Launcher,
    limits: Limits,
    kill_grace: Duration,
    connections: HashMap<ConnId, Connection>,
    /// What each uid's connections hold (budgets.rs).
    usage: budgets::Usage,
    /// How many refusals each uid had logged lately.
    refusal_log: budgets::RefusalLog,
    /// Requests read per uid in this round of events (connections.rs).
    reads_this_round: HashMap<u32, usize>,
    next_conn: ConnId,
    ledger: Ledger,
    /// Set while the listener is out of the epoll set after EMFILE/ENFILE.
    accept_paused_until: Option<Instant>,
    policy: PeerPolicy,
    /// SIGTERM or SIGINT arrived; shut down after this round of events.
    stop_requested: bool,
    /// Prefork pools, refilled when nothing else waits.
    pools: Pools,
    /// After a failed refill, no refill before this.
    refill_paused_until: Option<Instant>,
    /// The CPU was yielded since the last events, so a refill may fork now.
    yielded_for_refill: bool,
    /// The zygotes: the one serving, one preloading (generations.rs).
    generations: generations::Generations,
    /// systemd's notify socket and `--ready-fd`, once serving.
    readiness: Option<Readiness>,
    /// Our own uid (a root server runs children as their peer).
    server_uid: u32,
    started: Instant,
    /// The binary and arguments to run again for an upgrade in place, or
    /// why they are unknown.
    image: Result<Rc<Image>, String>,
}

impl EventLoop {
    pub(crate) fn new(
        listener: Listener,
        signals: SignalPipe,
        modules: Modules,
        options: &ServeOptions,
        handover: Option<(Handover, Option<String>)>,
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
                let fd = sys::inherited_fd(fd)
                    .and_then(|fd| sys::set_cloexec_nonblocking(fd.as_raw_fd()).map(|()| fd))
                    .map_err(|e| ServeError::Setup("--lifeline-fd", e))?;
                epoll
                    .add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, LIFELINE))
                    .map_err(setup("watching --lifeline-fd"))?;
                Some(fd)
            }
            None => None,
        };
        // Every child of a zygote is the front's: made so by clone3 or
        // adopted (`sys::sibling`), which needs this either way (a zygote
        // turns to adoption if its clone fails).
        sys::become_subreaper().map_err(|e| ServeError::Setup("becoming a child subreaper", e))?;
        let (fork, why_not_clone) = SiblingFork::choose();
        if let Some(why) = why_not_clone {
            log!(
                Level::Debug,
                "zygotes fork each child twice (adopted by the server): {why}"
            );
        }
        let pool_workers = options.pools.iter().map(|(w, _)| w.clone()).collect();
        let fork_guard = ForkGuard::arm(options.threads)
            .map_err(|why| ServeError::Config(format!("--allow-dormant-threads: {why}")))?;
        // By default one uid may hold a quarter of the server's fds, so the
        // others always have some.
        let mut limits = options.limits;
        if limits.max_fds_per_uid == 0 {
            limits.max_fds_per_uid = sys::open_files_limit() / 4;
        }
        let launcher = Launcher::new(modules, options.limits, fork_guard)
            .map_err(|e| ServeError::Setup("opening /dev/null", e))?;
        let mut event_loop = EventLoop {
            epoll,
            listener: Some(listener),
            signals,
            lifeline,
            launcher,
            limits,
            kill_grace: options.kill_grace,
            connections: HashMap::new(),
            usage: budgets::Usage::default(),
            refusal_log: budgets::RefusalLog::default(),
            reads_this_round: HashMap::new(),
            next_conn: 1,
            ledger: Ledger::default(),
            accept_paused_until: None,
            policy: options.policy.clone(),
            stop_requested: false,
            pools: Pools::new(&options.pools),
            refill_paused_until: None,
            yielded_for_refill: false,
            generations: generations::Generations::new(
                fork,
                options.threads,
                pool_workers,
                options.reload_on_change,
            ),
            readiness: None,
            server_uid: sys::getuid(),
            started: Instant::now(),
            image: Image::of_this_process()
                .map(Rc::new)
                .map_err(|e| format!("/proc/self: {e}")),
        };
        let Some((state, failed)) = handover else {
            event_loop.first_generation(options.stderr_after_ready)?;
            return Ok(event_loop);
        };
        // SAFETY: the handover `serve` took from the environment, once.
        let taken = unsafe { event_loop.take_over(state, failed) };
        // --stderr-after-ready was applied by the first image.
        event_loop.first_generation(None)?;
        event_loop.upgrade_answered(taken);
        Ok(event_loop)
    }

    /// How many modules are preloaded, for the "listening on" line.
    pub(crate) fn module_count(&self) -> usize {
        self.modules().len()
    }

    /// The modules preloaded: by the serving zygote, or by the front.
    fn modules(&self) -> &[ModuleInfo] {
        self.generations.modules()
    }

    /// Tells systemd (and `--ready-fd`, the first time) that the server
    /// serves, with `status`.
    fn readiness_ready(&mut self, status: &str) {
        if let Some(readiness) = &mut self.readiness {
            readiness.ready(status);
        }
    }

    /// Tells systemd a reload has begun.
    fn readiness_reloading(&mut self) {
        if let Some(readiness) = &mut self.readiness {
            readiness.reloading();
        }
    }

    /// Serves until SIGTERM or SIGINT, then drains: stops listening, closes
    /// every connection (killing their non-detached children), and returns
    /// once those children are gone.
    pub(crate) fn run(&mut self, readiness: Readiness) -> Result<(), ServeError> {
        self.readiness = Some(readiness);
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            if self.listener.is_none() && self.ledger.being_killed() == 0 {
                self.ledger.kill_dying_groups();
                return Ok(());
            }
            let refill_timer = self
                .refill_paused_until
                .filter(|_| self.pools.short().is_some());
            // A pool to refill once the latest start has had its moment.
            let start_timer = self
                .ledger
                .latest_launch()
                .filter(|_| self.ledger.starting() > 0 && self.pools.short().is_some())
                .map(|at| at + REFILL_WAITS_FOR_A_START)
                .filter(|&at| at > Instant::now());
            let next_timer = [
                self.ledger.next_deadline(),
                self.accept_paused_until,
                refill_timer,
                start_timer,
                self.generations.next_timer(),
            ]
            .into_iter()
            .flatten()
            .min();
            // Not while a spawn of the last moments waits to be reported: a
            // refill's fork would delay its `Spawned`. One that has not
            // reported for longer (a child stuck in a frozen cgroup, say)
            // holds up no one's refills.
            let refill_due = self.listener.is_some()
                && (self.ledger.starting() == 0
                    || self
                        .ledger
                        .latest_launch()
                        .is_some_and(|at| at.elapsed() >= REFILL_WAITS_FOR_A_START))
                && self.pools.short().is_some()
                && self.generations.current.is_some()
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
            self.reads_this_round.clear();
            for event in &events[..n] {
                self.dispatch(event.data(), event.events());
            }
            if n > 0 {
                self.yielded_for_refill = false;
            } else if refill_due && !self.yielded_for_refill {
                // First let whoever our replies woke on this CPU run (a
                // client reading its `Spawned`): a refill's fork holds the
                // CPU in the kernel, not preemptible, for as long as copying
                // the preload's page tables takes, and the woken client would
                // wait all of it. Then look for new work again before forking.
                sys::yield_cpu();
                self.yielded_for_refill = true;
            } else if refill_due {
                self.refill_one();
            }
            if self.stop_requested {
                self.stop_requested = false;
                if let Some(readiness) = &self.readiness {
                    readiness.stopping();
                }
                self.begin_shutdown();
            }
            let now = Instant::now();
            if self.listener.is_some() {
                self.restart_if_due(now);
                self.watch_if_due(now);
            }
            self.ledger.kill_overdue(now);
            if self.accept_paused_until.is_some_and(|until| until <= now) {
                self.resume_accepting();
            }
        }
    }

    /// Asks the zygote for one pool child for a pool below its size (none
    /// while no zygote serves: the pools refill from the next). Called only
    /// when no event is waiting, so a refill never delays a request.
    fn refill_one(&mut self) {
        let Some(worker) = self.pools.short().map(str::to_owned) else {
            return;
        };
        let Some(current) = &mut self.generations.current else {
            return;
        };
        match current.zygote.ask(&worker) {
            Ok(()) => self.pools.asked(&worker),
            Err(e) => self.refill_failed(&worker, &e.message),
        }
    }

    fn refill_failed(&mut self, worker: &str, why: &str) {
        log!(
            Level::Warn,
            "pool '{worker}': refill failed, retrying in 1 s: {why}"
        );
        self.refill_paused_until = Some(Instant::now() + Duration::from_secs(1));
    }

    fn dispatch(&mut self, token: u64, flags: EpollFlags) {
        match (token, token & 3) {
            (LISTENER, _) => self.accept(),
            (SIGNALS, _) => self.handle_signals(),
            (LIFELINE, _) => self.lifeline_ready(),
            (ZYGOTE | NEXT_ZYGOTE, _) => self.zygote_event(token),
            (_, TAG_CONN) => self.connection_ready(token >> 2, flags),
            (_, TAG_PIPE) => self.report_ready((token >> 2) as libc::pid_t),
            _ => log!(Level::Error, "event for unknown token {token}"),
        }
    }

    /// A starting child's report pipe is readable.
    fn report_ready(&mut self, pid: libc::pid_t) {
        let Some(pipe) = self.ledger.report_pipe(pid) else {
            return;
        };
        let outcome = report::read_outcome(pipe);
        let settled = self.ledger.start_reported(pid, outcome);
        self.send_settled(settled);
    }

    fn child_reaped(&mut self, pid: libc::pid_t, status: ChildStatus) {
        match self.ledger.reaped(pid, status) {
            Some(settled) => {
                log!(Level::Debug, "pid {pid} ended: {status:?}");
                self.send_settled(settled);
            }
            None if self.pools.remove(pid) => log!(
                Level::Warn,
                "idle pool child {pid} died ({status:?}); refilling"
            ),
            None if self.zygote_reaped(pid, &format!("{status:?}")) => {}
            None => log!(Level::Debug, "reaped pid {pid} that was not ours to report"),
        }
    }

    /// Sends what the ledger owes, after it stopped watching a report pipe.
    fn send_settled(&mut self, settled: Settled) {
        if let Some(report) = settled.report {
            let _ = self.epoll.delete(&report);
        }
        for reply in settled.replies {
            self.reply(reply.conn, reply.message, reply.fds);
        }
    }

    fn handle_signals(&mut self) {
        let arrived = self.signals.take();
        if arrived.child {
            while let Some((pid, status)) = sys::reap_one() {
                self.child_reaped(pid, status);
            }
        }
        if arrived.hangup {
            self.reload("SIGHUP", None);
        }
        if arrived.upgrade && self.listener.is_some() {
            self.upgrade("SIGUSR2", None);
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
        match sys::read(fd.as_fd(), &mut buf) {
            Ok(n) if n > 0 => return,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
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
            self.connections
                .keys()
                .map(|&id| self.ledger.owned_by(id))
                .sum::<usize>(),
            self.kill_grace
        );
        self.pools.flush();
        self.drop_generations();
        // Dropping the listener removes the socket file.
        if let Some(listener) = self.listener.take() {
            let _ = self.epoll.delete(&listener);
        }
        let ids: Vec<ConnId> = self.connections.keys().copied().collect();
        for id in ids {
            self.close_connection(id);
        }
    }
}
