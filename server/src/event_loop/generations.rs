//! The zygote generations, as the front keeps them: which zygote serves,
//! which one is preloading to replace it (a reload), and what happens when
//! one dies.
//!
//! The front never runs its preloads: each generation's zygote (a fresh
//! fork of the front, `launch/zygote/`) runs them, and forks every worker
//! and pool child. So a reload (SIGHUP, the `reload` request) is a
//! new zygote that loads what is on disk now; until it is ready the old one
//! serves, and if it fails the old one serves on. Once it is ready, new
//! spawns go to it, the old generation's idle pool children are retired,
//! and the old zygote exits. Children and connections are the front's and
//! are untouched; so is the front's pid.
//!
//! A zygote that dies (a segfault in preloaded code, SIGKILL, the OOM
//! killer) costs no child and no connection: its children are the front's.
//! The front logs it, and starts the next generation after a back-off that
//! doubles while generations keep failing, so a preload that crashes at
//! import cannot make a respawn storm. Meanwhile worker spawns fail with a
//! message saying so; exec spawns never needed a zygote.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use forkserver_protocol::{ErrorKind, ModuleInfo, ServerMessage};
use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::connections::request_error;
use super::{EventLoop, NEXT_ZYGOTE, ZYGOTE};
use crate::launch::zygote::{Ready, Zygote};
use crate::ledger::ConnId;
use crate::log::{log, Level};
use crate::sys::SiblingFork;
use crate::threads::ThreadPolicy;
use crate::watch::{self, Watch};
use crate::ServeError;

/// The first wait before restarting a zygote that died.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A generation that served this long resets the back-off: its death was
/// not a preload that cannot start.
const STEADY: Duration = Duration::from_secs(30);

/// The front's generations.
pub(super) struct Generations {
    /// How zygotes make their children the front's.
    fork: SiblingFork,
    /// The thread guard's policy, which each zygote applies to its preloads
    /// and before each fork.
    policy: ThreadPolicy,
    /// The pools' workers, which each zygote checks it offers.
    pools: Vec<String>,
    /// The generation that serves.
    pub(super) current: Option<Generation>,
    /// One preloading to replace it.
    next: Option<Generation>,
    /// The latest generation's number.
    latest: u64,
    /// No zygote serves, and the next is due then.
    restart_at: Option<Instant>,
    backoff: Duration,
    /// Why the latest reload or restart failed; cleared by the next success.
    failure: Option<String>,
    /// Reload requests waiting for `next`: (connection, request id).
    waiting: Vec<(ConnId, u64)>,
    /// A reload was asked while `next` preloaded: another follows it.
    again: bool,
    /// The requests for that one.
    queued: Vec<(ConnId, u64)>,
    /// The serving code's files, and which changed on disk since.
    watch: Watch,
    /// When to look at them next.
    watch_at: Option<Instant>,
    /// `--reload-on-change`.
    reload_on_change: bool,
}

/// One zygote and what it loaded.
pub(super) struct Generation {
    pub(super) zygote: Zygote,
    number: u64,
    /// What it loaded (empty until it says it is ready).
    ready: Ready,
    ready_at: Instant,
}

impl Generations {
    pub(super) fn new(
        fork: SiblingFork,
        policy: ThreadPolicy,
        pools: Vec<String>,
        reload_on_change: bool,
    ) -> Generations {
        Generations {
            fork,
            policy,
            pools,
            current: None,
            next: None,
            latest: 0,
            restart_at: None,
            backoff: FIRST_BACKOFF,
            failure: None,
            waiting: Vec::new(),
            again: false,
            queued: Vec::new(),
            watch: Watch::default(),
            watch_at: None,
            reload_on_change,
        }
    }

    /// The serving zygote's modules (none while none serves).
    pub(super) fn modules(&self) -> &[ModuleInfo] {
        self.current.as_ref().map_or(&[], |g| &g.ready.modules)
    }

    pub(super) fn zygote_pid(&self) -> Option<u32> {
        self.current.as_ref().map(|g| g.zygote.pid() as u32)
    }

    /// The serving generation's number; 0 while none serves.
    pub(super) fn number(&self) -> u64 {
        self.current.as_ref().map_or(0, |g| g.number)
    }

    /// The latest generation's number (serving or not).
    pub(super) fn latest(&self) -> u64 {
        self.latest
    }

    /// The reloads asked and not answered yet: (connection, request id).
    pub(super) fn waiting_reloads(&self) -> Vec<(ConnId, u64)> {
        self.waiting.iter().chain(&self.queued).copied().collect()
    }

    /// In a new image (an upgrade in place): numbers go on from `latest`,
    /// and the first generation answers the reloads `waiting`.
    pub(super) fn taken_over(&mut self, latest: u64, waiting: Vec<(ConnId, u64)>) {
        self.latest = latest;
        self.waiting = waiting;
    }

    pub(super) fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The next time something is due: a zygote's restart, a look at the
    /// preloaded files.
    pub(super) fn next_timer(&self) -> Option<Instant> {
        [self.restart_at, self.watch_at].into_iter().flatten().min()
    }

    /// The preloaded files changed on disk since they were loaded.
    pub(super) fn stale(&self) -> &Watch {
        &self.watch
    }

    /// Watches `files`, what the serving code was loaded from.
    fn watch(&mut self, files: Vec<watch::PreloadedFile>) {
        self.watch = Watch::new(files);
        self.watch_at = self.watch.any().then(|| Instant::now() + watch::INTERVAL);
    }

    /// Whether this pid is one of the zygotes.
    fn which(&self, pid: libc::pid_t) -> Option<Which> {
        if self.current.as_ref().is_some_and(|g| g.zygote.pid() == pid) {
            Some(Which::Current)
        } else if self.next.as_ref().is_some_and(|g| g.zygote.pid() == pid) {
            Some(Which::Next)
        } else {
            None
        }
    }

    /// Why a worker cannot be forked now: no zygote serves.
    pub(super) fn why_none(&self) -> String {
        let when = self
            .restart_at
            .map(|at| {
                format!(
                    "; the next starts in {} ms",
                    at.saturating_duration_since(Instant::now()).as_millis()
                )
            })
            .unwrap_or_else(|| "; the next is preloading".into());
        match &self.failure {
            Some(why) => format!("no zygote is serving (the latest failed: {why}){when}"),
            None => format!("no zygote is serving{when}"),
        }
    }
}

#[derive(Clone, Copy)]
enum Which {
    Current,
    Next,
}

impl EventLoop {
    /// Starts the first generation and waits for it (as long as the
    /// preloads take): the server is not ready before.
    pub(super) fn first_generation(
        &mut self,
        stderr_after_ready: Option<RawFd>,
    ) -> Result<(), ServeError> {
        let mut generation = self
            .fork_zygote(stderr_after_ready)
            .map_err(ServeError::Zygote)?;
        generation.ready = generation.zygote.wait_ready().map_err(ServeError::Zygote)?;
        self.watch(&generation, ZYGOTE)
            .map_err(|e| ServeError::Setup("watching the zygote's socket", e))?;
        self.serving(generation);
        Ok(())
    }

    /// Forks the next generation's zygote.
    fn fork_zygote(&mut self, stderr_after_ready: Option<RawFd>) -> Result<Generation, String> {
        let generations = &self.generations;
        let zygote = self
            .launcher
            .start_zygote(
                generations.fork,
                generations.policy,
                &generations.pools,
                stderr_after_ready,
            )
            .map_err(|e| format!("cannot start a zygote: {}", e.message))?;
        self.generations.latest += 1;
        log!(
            Level::Debug,
            "generation {}: zygote {} started",
            self.generations.latest,
            zygote.pid()
        );
        Ok(Generation {
            zygote,
            number: self.generations.latest,
            ready: Ready::default(),
            ready_at: Instant::now(),
        })
    }

    fn watch(&self, generation: &Generation, token: u64) -> std::io::Result<()> {
        self.epoll
            .add(
                &generation.zygote,
                EpollEvent::new(EpollFlags::EPOLLIN, token),
            )
            .map_err(std::io::Error::from)
    }

    /// `generation` is ready: it serves from now on, the one before it is
    /// retired (with its idle pool children, which hold its code), and
    /// whoever asked for the reload is told.
    fn serving(&mut self, mut generation: Generation) {
        generation.ready_at = Instant::now();
        let retired = self.generations.current.take();
        let number = generation.number;
        let modules = generation.ready.modules.clone();
        let files = std::mem::take(&mut generation.ready.files);
        self.generations.watch(files);
        let zygote = generation.zygote.pid();
        self.generations.current = Some(generation);
        self.generations.failure = None;
        self.generations.restart_at = None;
        if let Some(old) = retired {
            let _ = self.epoll.delete(&old.zygote);
            self.pools.forget_asked();
            self.pools.flush();
            log!(
                Level::Info,
                "generation {number} serves (zygote {zygote}, {} module(s)); generation {} retired",
                modules.len(),
                old.number
            );
        } else if number > 1 {
            log!(
                Level::Info,
                "generation {number} serves (zygote {zygote}, {} module(s))",
                modules.len()
            );
        }
        for (conn, id) in std::mem::take(&mut self.generations.waiting) {
            let reply = ServerMessage::Reloaded {
                id,
                generation: number,
                modules: modules.clone(),
            };
            self.reply(conn, reply, Vec::new());
        }
        if number > 1 {
            let summary = format!("generation {number} serves");
            self.readiness_ready(&summary);
        }
        self.reload_again();
    }

    /// Starts a new generation, which replaces the current one once ready
    /// ([`Self::serving`]); `asker` (a reload request) is answered then. A
    /// reload asked while another generation preloads follows it: it must
    /// load what is on disk after the ask, which the one under way may not.
    pub(super) fn reload(&mut self, why: &str, asker: Option<(ConnId, u64)>) {
        if self.generations.next.is_some() {
            log!(
                Level::Debug,
                "{why}: a new generation follows the one preloading"
            );
            self.generations.again = true;
            self.generations.queued.extend(asker);
            return;
        }
        self.generations.waiting.extend(asker);
        log!(Level::Info, "{why}: starting a new generation");
        self.readiness_reloading();
        let generation = match self.fork_zygote(None) {
            Ok(generation) => generation,
            Err(why) => return self.next_failed(why),
        };
        if let Err(e) = self.watch(&generation, NEXT_ZYGOTE) {
            return self.next_failed(format!("cannot watch the zygote's socket: {e}"));
        }
        self.generations.next = Some(generation);
    }

    /// Starts the reload asked while the last generation preloaded, if one
    /// was.
    fn reload_again(&mut self) {
        if std::mem::take(&mut self.generations.again) {
            let askers = std::mem::take(&mut self.generations.queued);
            self.generations.waiting.extend(askers);
            self.reload("a reload asked while the last one preloaded", None);
        }
    }

    /// A `reload` request from `conn`: root and the server's uid only.
    pub(super) fn reload_request(&mut self, conn: ConnId, id: u64) {
        if let Some(peer) = self.operator(conn, id, "reload") {
            self.reload(&format!("reload asked by {peer}"), Some((conn, id)));
        }
    }

    /// A zygote's socket is readable.
    pub(super) fn zygote_event(&mut self, token: u64) {
        if token == NEXT_ZYGOTE {
            let Some(next) = &mut self.generations.next else {
                return;
            };
            match next.zygote.ready() {
                None => {}
                Some(Ok(ready)) => {
                    let mut next = self.generations.next.take().expect("checked above");
                    next.ready = ready;
                    if let Err(e) = self.epoll.modify(
                        &next.zygote,
                        &mut EpollEvent::new(EpollFlags::EPOLLIN, ZYGOTE),
                    ) {
                        self.next_failed(format!("cannot watch the zygote's socket: {e}"));
                        return;
                    }
                    self.serving(next);
                }
                Some(Err(why)) => {
                    self.next_failed(why);
                }
            }
            return;
        }
        self.zygote_answers();
    }

    /// Takes the pool children the serving zygote made, and notices its end.
    pub(super) fn zygote_answers(&mut self) {
        let Some(current) = &mut self.generations.current else {
            return;
        };
        let (answers, end) = current.zygote.answers();
        let zygote = current.zygote.pid();
        for (worker, child) in answers {
            match child {
                Ok(child) => {
                    log!(
                        Level::Debug,
                        "pool '{worker}': zygote {zygote} made idle child {}",
                        child.pid
                    );
                    self.pools.answered(&worker, Some(child));
                    self.refill_paused_until = None;
                }
                Err(e) => {
                    self.pools.answered(&worker, None);
                    self.refill_failed(&worker, &e.message);
                }
            }
        }
        if let Some(why) = end {
            self.generation_lost(&why);
        }
    }

    /// The serving zygote is gone or of no use: forget it, and start the
    /// next generation after the back-off (unless one is preloading).
    pub(super) fn generation_lost(&mut self, why: &str) {
        let Some(lost) = self.generations.current.take() else {
            return;
        };
        let _ = self.epoll.delete(&lost.zygote);
        self.pools.forget_asked();
        if lost.ready_at.elapsed() >= STEADY {
            self.generations.backoff = FIRST_BACKOFF;
        }
        let backoff = self.generations.backoff;
        log!(
            Level::Warn,
            "the zygote of generation {} (pid {}) {why}; no child or connection is lost; generation {} starts in {} ms",
            lost.number,
            lost.zygote.pid(),
            self.generations.latest + 1,
            backoff.as_millis()
        );
        self.generations.failure = Some(format!("the zygote of generation {} {why}", lost.number));
        if self.generations.next.is_none() {
            self.schedule_restart();
        }
    }

    /// A generation that was preloading failed: the serving one (if any)
    /// serves on, and whoever asked for the reload is told why; without
    /// one, the next try is after the back-off.
    fn next_failed(&mut self, why: String) {
        if let Some(next) = self.generations.next.take() {
            let _ = self.epoll.delete(&next.zygote);
        }
        let message = match &self.generations.current {
            Some(current) => format!(
                "the new generation failed, generation {} serves on: {why}",
                current.number
            ),
            None => {
                self.schedule_restart();
                format!(
                    "the new generation failed; the next try is in {} ms: {why}",
                    self.generations.backoff.as_millis()
                )
            }
        };
        log!(Level::Error, "{message}");
        self.generations.failure = Some(why);
        for (conn, id) in std::mem::take(&mut self.generations.waiting) {
            let reply = request_error(Some(id), ErrorKind::Invalid, message.clone());
            self.reply(conn, reply, Vec::new());
        }
        self.readiness_ready("the reload failed; the old generation serves on");
        self.reload_again();
    }

    fn schedule_restart(&mut self) {
        let backoff = self.generations.backoff;
        self.generations.restart_at = Some(Instant::now() + backoff);
        self.generations.backoff = (backoff * 2).min(MAX_BACKOFF);
    }

    /// The restart's time has come.
    pub(super) fn restart_if_due(&mut self, now: Instant) {
        if self.generations.restart_at.is_some_and(|at| at <= now) {
            self.generations.restart_at = None;
            self.reload("restarting the zygote", None);
        }
    }

    /// Looks at the preloaded files, if it is time: logs each newly
    /// changed one, and with `--reload-on-change` reloads once they settle.
    pub(super) fn watch_if_due(&mut self, now: Instant) {
        if self.generations.watch_at.is_none_or(|at| at > now) {
            return;
        }
        self.generations.watch_at = Some(now + watch::INTERVAL);
        for path in self.generations.watch.check() {
            log!(
                Level::Warn,
                "preloaded file {} changed on disk since it was loaded; workers run the older version; a reload (`forkserver reload`, SIGHUP) loads it",
                path.display()
            );
        }
        if self.generations.reload_on_change && self.generations.watch.take_reload() {
            let why = format!(
                "--reload-on-change: {} preloaded file(s) changed on disk",
                self.generations.watch.changed_count()
            );
            self.reload(&why, None);
        }
    }

    /// A zygote was reaped: if it is one we still use, it is lost.
    pub(super) fn zygote_reaped(&mut self, pid: libc::pid_t, status: &str) -> bool {
        match self.generations.which(pid) {
            Some(Which::Current) => self.generation_lost(&format!("ended ({status})")),
            Some(Which::Next) => {
                self.next_failed(format!("its zygote ended while preloading ({status})"));
            }
            None => return false,
        }
        true
    }

    /// Shutting down: every zygote exits at its socket's end-of-file, and
    /// reloads still waiting are told.
    pub(super) fn drop_generations(&mut self) {
        for generation in [
            self.generations.current.take(),
            self.generations.next.take(),
        ]
        .into_iter()
        .flatten()
        {
            let _ = self.epoll.delete(&generation.zygote);
        }
        self.generations.restart_at = None;
        self.generations.again = false;
        self.pools.forget_asked();
        let queued = std::mem::take(&mut self.generations.queued);
        let waiting = std::mem::take(&mut self.generations.waiting);
        for (conn, id) in waiting.into_iter().chain(queued) {
            let message = "the server is shutting down".to_owned();
            let reply = request_error(Some(id), ErrorKind::Invalid, message);
            self.reply(conn, reply, Vec::new());
        }
    }
}
