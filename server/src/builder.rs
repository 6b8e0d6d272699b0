//! [`Server::builder`]: a zygote with embedded preloads and workers.

use std::any::Any;
use std::ffi::OsString;
use std::fmt::Display;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::event_loop::EventLoop;
use crate::log::{self, log, Level};
use crate::modules::{ForkHooks, ModuleSpecs, Modules, WorkerFamily};
use crate::readiness::Readiness;
use crate::worker::WorkerContext;
use crate::{
    handover, launch, listener, signals, sys, threads, ServeArgs, ServeError, ServeOptions,
};

/// The smallest `max_message_bytes`: a reply page must hold one child with
/// a target cut to 4096 bytes, and every error text.
const MIN_MESSAGE_BYTES: u32 = 16384;

/// The largest: above it a reply may not fit a socket's send buffer, and
/// requests that large travel as `bulk` files anyway.
const MAX_MESSAGE_BYTES: u32 = 1 << 20;

/// The entry point for building a server; see [`Server::builder`].
#[derive(Debug)]
pub struct Server;

impl Server {
    /// A server with no modules yet. Add preloads and workers, then
    /// [`run`](ServerBuilder::run) or [`serve`](ServerBuilder::serve).
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            specs: ModuleSpecs::default(),
            pools: Vec::new(),
        }
    }
}

/// Collects preloads and workers; nothing runs until `run` or `serve`.
#[must_use = "a builder does nothing until .run() or .serve()"]
pub struct ServerBuilder {
    specs: ModuleSpecs,
    pools: Vec<(String, u32)>,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let preloads: Vec<&String> = self.specs.preloads.iter().map(|(n, _)| n).collect();
        let workers: Vec<&String> = self.specs.workers.iter().map(|(n, _)| n).collect();
        f.debug_struct("ServerBuilder")
            .field("preloads", &preloads)
            .field("workers", &workers)
            .field("dylibs", &self.specs.dylibs)
            .finish()
    }
}

/// The command line of a zygote built with [`ServerBuilder::run`]: the same
/// flags as `forkserver serve`.
#[derive(Parser)]
#[command(
    about = "A forkserver zygote: preloads its modules, then serves workers on a Unix socket"
)]
struct ZygoteCommand {
    #[command(flatten)]
    serve: ServeArgs,
}

impl ServerBuilder {
    /// Adds a module whose value `build` computes once, at start, before any
    /// thread exists. Workers reach it with
    /// [`WorkerContext::preloaded`]. A panic in `build` fails the start,
    /// naming the module.
    pub fn preload<T: Any>(self, name: &str, build: impl FnOnce() -> T + 'static) -> Self {
        self.try_preload(name, move || Ok::<T, std::convert::Infallible>(build()))
    }

    /// Like [`preload`](Self::preload), for a build that can fail: an `Err`
    /// fails the start with the module's name and the error.
    pub fn try_preload<T: Any, E: Display>(
        mut self,
        name: &str,
        build: impl FnOnce() -> Result<T, E> + 'static,
    ) -> Self {
        self.specs.preloads.push((
            name.to_owned(),
            Box::new(move || {
                build()
                    .map(|value| Box::new(value) as Box<dyn Any>)
                    .map_err(|e| e.to_string())
            }),
        ));
        self
    }

    /// Adds a worker clients start by `name`. It runs in a forked child with
    /// its stdio, environment and directory in place; its return value is
    /// the exit code, and a panic exits 101.
    pub fn worker(
        mut self,
        name: &str,
        run: impl Fn(&mut WorkerContext<'_>) -> i32 + 'static,
    ) -> Self {
        self.specs.workers.push((name.to_owned(), Box::new(run)));
        self
    }

    /// Adds a family of workers: every target name that starts with `prefix`
    /// (say `py:` for `py:MODULE:FUNCTION`). `check` runs in the server
    /// before the fork and may refuse a name with a message (the client gets
    /// `spawn_failed` of kind `unknown_worker`); `run` runs in the child like
    /// any worker and reads the name from [`WorkerContext::target`].
    /// Exact worker names win over families; the first matching family wins.
    pub fn worker_family(
        mut self,
        prefix: &str,
        check: impl Fn(&str) -> Result<(), String> + 'static,
        run: impl Fn(&mut WorkerContext<'_>) -> i32 + 'static,
    ) -> Self {
        self.specs.families.push(WorkerFamily {
            prefix: prefix.to_owned(),
            check: Box::new(check),
            run: Box::new(run),
        });
        self
    }

    /// Runs `prewarm(worker)` in every idle pool child right after its fork,
    /// before it waits for a request: whatever it does there (and whatever
    /// memory it touches, which a forked child copies on first write) is
    /// then done while nobody waits. It runs with the server's fds closed
    /// and every signal blocked (dispositions are reset after it, so a
    /// handler it installs does not reach the worker); a panic is ignored.
    /// The child counts as `ready` in `status` once it returns. Python workers use
    /// it to bring the interpreter up to date with the fork and walk the
    /// start path once.
    pub fn pool_prewarm(mut self, prewarm: impl Fn(&str) + 'static) -> Self {
        self.specs.prewarm = Some(Box::new(prewarm));
        self
    }

    /// Runs `before()` in the server just before every fork and
    /// `after_in_parent()` just after it (whether the fork worked or not),
    /// as `pthread_atfork`'s prepare and parent handlers would. Not around
    /// an exec spawn made without a fork (no code of the server's runs in
    /// that child; see ARCHITECTURE.md, "Fork"), as `posix_spawn` runs no
    /// atfork handlers either. An embedded
    /// interpreter needs them: Python 3.13's `PyOS_AfterFork_Child` releases
    /// the import lock that `PyOS_BeforeFork` took in the parent, and
    /// Python's own `os.register_at_fork` handlers run in them.
    pub fn fork_hooks(
        mut self,
        before: impl Fn() + 'static,
        after_in_parent: impl Fn() + 'static,
    ) -> Self {
        self.specs.fork_hooks = Some(ForkHooks {
            before: Box::new(before),
            after_in_parent: Box::new(after_in_parent),
        });
        self
    }

    /// Names the files the preloads loaded (a Python server: every module
    /// imported while preloading), besides the dylibs, which are known. It
    /// runs once per generation, right after the preloads; the server then
    /// looks at those files every 2 s, and `status` lists each that changed
    /// on disk since (stale: workers run the older code until a reload),
    /// as the log does once per change; `--reload-on-change` reloads then.
    pub fn preloaded_files(mut self, files: impl Fn() -> Vec<PathBuf> + 'static) -> Self {
        self.specs.files = Some(Box::new(files));
        self
    }

    /// Keeps `size` idle children forked for worker `name` (as `--pool
    /// NAME=SIZE` does); a request for it skips the fork.
    pub fn pool(mut self, name: &str, size: u32) -> Self {
        self.pools.push((name.to_owned(), size));
        self
    }

    /// Adds a dynamic module: the shared library at `path`, loaded at start
    /// (as `--module NAME=PATH` does).
    pub fn dylib(mut self, name: &str, path: impl Into<PathBuf>) -> Self {
        self.specs.dylibs.push((name.to_owned(), path.into()));
        self
    }

    /// Parses this process's command line as `[serve] [FLAGS]` with the
    /// flags of `forkserver serve`, serves, and returns the exit status to
    /// end `main` with (see [`serve_main`](crate::serve_main), which this
    /// calls). Errors are printed to stderr.
    pub fn run(self) -> ExitCode {
        let mut args: Vec<OsString> = std::env::args_os().collect();
        if args.get(1).is_some_and(|a| a == "serve") {
            args.remove(1);
        }
        let command = ZygoteCommand::parse_from(args);
        crate::serve_main(self, &command.serve).into()
    }

    /// Preloads every module (checking after each that no thread was
    /// started), binds `options.socket`, logs one line when ready, and serves
    /// until SIGTERM or SIGINT. Returns `Ok(())` after a clean shutdown; the
    /// socket file is removed.
    ///
    /// The preloads run in a *zygote*, a fork of this process made before
    /// they run, and again in a new one at each reload (SIGHUP, the
    /// `reload` request); this process (the *front*) never runs them. So
    /// each preload closure runs once per generation, each time in a fresh
    /// copy of the process as it was before any preload.
    pub fn serve(mut self, options: &ServeOptions) -> Result<(), ServeError> {
        match options.log_level {
            Some(level) => log::set_level(level),
            None => log::init_from_env(),
        }
        let message_bytes = options.limits.max_message_bytes;
        if !(MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&message_bytes) {
            return Err(ServeError::Config(format!(
                "max_message_bytes must be between {MIN_MESSAGE_BYTES} (a page of children, an error text) and {MAX_MESSAGE_BYTES} (larger requests go as bulk files), not {message_bytes}"
            )));
        }
        if options.limits.max_fds_per_message as usize + 3 > launch::MAX_MOVES {
            return Err(ServeError::Config(format!(
                "max_fds_per_message must be at most {}",
                launch::MAX_MOVES - 3
            )));
        }
        // A probe of an upgrade in place ends here; an upgrade's new image
        // takes the state handed over (handover.rs).
        handover::answer_probe();
        let handover = handover::take_from_env()
            .transpose()
            .map_err(|why| ServeError::Config(format!("upgrade in place: {why}")))?;
        threads::tolerate("before any preload", options.threads)
            .map_err(ServeError::MultiThreaded)?;
        self.specs.dylibs.extend(options.dylibs.iter().cloned());
        let modules = Modules::new(self.specs);
        let signals = signals::SignalPipe::install()
            .map_err(|e| ServeError::Setup("installing signal handlers", e))?;
        let mut ready_fd = None;
        let listener = match &handover {
            Some((state, _)) => {
                // The old image blocked every signal for the exec.
                sys::set_signal_mask(&state.signal_mask);
                // SAFETY: the handover just taken, once.
                unsafe { listener::Listener::taken_over(state.listener.clone()) }
            }
            None => {
                ready_fd = options
                    .ready_fd
                    .map(sys::inherited_fd)
                    .transpose()
                    .map_err(|e| ServeError::Setup("--ready-fd", e))?;
                let listener = bind_or_inherit(options)?;
                leave_controlling_terminal();
                listener
            }
        };
        let mut readiness = Readiness::from_env(ready_fd);
        let path = listener.path().to_owned();
        let mut options = options.clone();
        options.pools.extend(self.pools);
        let stderr_after_ready = options.stderr_after_ready.filter(|_| handover.is_none());
        let mut event_loop = EventLoop::new(listener, signals, modules, &options, handover)?;
        let summary = format!(
            "listening on {} (protocol {}, version {}, {} module(s))",
            path.display(),
            forkserver_protocol::PROTOCOL_VERSION,
            env!("CARGO_PKG_VERSION"),
            event_loop.module_count()
        );
        if let Some(fd) = stderr_after_ready {
            sys::inherited_fd(fd)
                .and_then(sys::replace_stderr)
                .map_err(|e| ServeError::Setup("--stderr-after-ready", e))?;
        }
        log!(Level::Info, "{summary}");
        readiness.ready(&summary);
        event_loop.run(readiness)?;
        log!(Level::Info, "stopped");
        Ok(())
    }
}

/// The listening socket systemd passed, else one bound at `options.socket`.
fn bind_or_inherit(options: &ServeOptions) -> Result<listener::Listener, ServeError> {
    if let Some(inherited) = listener::Listener::from_systemd()? {
        return Ok(inherited);
    }
    let mut listener = listener::Listener::bind(&options.socket, options.group)?;
    listener.remove_dir_too(options.remove_socket_dir);
    Ok(listener)
}

/// Gives up the server's controlling terminal, if it was started from one:
/// a child in the server's session (`new_session: false`) could otherwise
/// open it as `/dev/tty` and read from it or type into it (`TIOCSTI`). Only
/// the server's own uid and root may ask for that session (peer.rs), and
/// after this even their children find no terminal there.
fn leave_controlling_terminal() {
    match sys::leave_controlling_terminal() {
        Ok(sys::Terminal::None) => {}
        Ok(sys::Terminal::Left) => log!(
            Level::Debug,
            "gave up the controlling terminal (children in the server's session have none)"
        ),
        Ok(sys::Terminal::KeptAsSessionLeader) => log!(
            Level::Info,
            "the server leads its session and keeps its controlling terminal; children asking for new_session: false (the server's own uid and root only) can reach it"
        ),
        Err(e) => log!(
            Level::Warn,
            "cannot give up the controlling terminal: {e}; children asking for new_session: false (the server's own uid and root only) can reach it"
        ),
    }
}
