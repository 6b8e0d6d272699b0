//! The modules a server preloads before serving, and the workers it offers.
//!
//! Preloads run one at a time, before any thread should exist. After each
//! one the thread guard checks the process is still single-threaded, so a
//! module that started threads is named. They run in the zygote of each
//! generation (`launch/zygote/`), each a fresh fork of the front, which
//! never runs them itself: that is why the preloads are kept unrun
//! ([`Modules::unrun`]) and what they load is set once per process
//! ([`Modules::loaded`]). A server that cannot split (see
//! `launch/zygote/`) runs them in the front, once.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::ffi::CString;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Instant;

use forkserver_protocol::{ModuleInfo, ModuleKind};

use crate::dylib::{Dylib, EntryPoint};
use crate::log::{log, Level};
use crate::threads::{self, ThreadPolicy};
use crate::watch::PreloadedFile;
use crate::worker::{Preloaded, WorkerFn};
use crate::ServeError;

/// Builds a module's value; `Err` fails the start with the module's name.
pub(crate) type PreloadFn = Box<dyn FnOnce() -> Result<Box<dyn std::any::Any>, String>>;

/// Refuses a worker family's target name before the fork, with a message.
pub(crate) type NameCheck = Box<dyn Fn(&str) -> Result<(), String>>;

/// Warms an idle pool child up for its worker; see
/// [`ServerBuilder::pool_prewarm`](crate::ServerBuilder::pool_prewarm).
pub(crate) type PrewarmFn = Box<dyn Fn(&str)>;

/// Names the files the preloads loaded; see
/// [`ServerBuilder::preloaded_files`](crate::ServerBuilder::preloaded_files).
pub(crate) type FilesFn = Box<dyn Fn() -> Vec<PathBuf>>;

/// Runs in the server around every fork; see
/// [`ServerBuilder::fork_hooks`](crate::ServerBuilder::fork_hooks).
pub(crate) struct ForkHooks {
    pub(crate) before: Box<dyn Fn()>,
    pub(crate) after_in_parent: Box<dyn Fn()>,
}

/// Workers for every target name starting with `prefix`; see
/// [`ServerBuilder::worker_family`](crate::ServerBuilder::worker_family).
pub(crate) struct WorkerFamily {
    pub(crate) prefix: String,
    pub(crate) check: NameCheck,
    pub(crate) run: WorkerFn,
}

/// What a builder collected, not yet run.
#[derive(Default)]
pub(crate) struct ModuleSpecs {
    pub(crate) preloads: Vec<(String, PreloadFn)>,
    pub(crate) workers: Vec<(String, WorkerFn)>,
    pub(crate) families: Vec<WorkerFamily>,
    pub(crate) prewarm: Option<PrewarmFn>,
    pub(crate) fork_hooks: Option<ForkHooks>,
    pub(crate) dylibs: Vec<(String, PathBuf)>,
    pub(crate) files: Option<FilesFn>,
}

/// The workers a server offers, and what its preloads loaded (in the
/// process that ran them).
#[derive(Default)]
pub(crate) struct Modules {
    pub(crate) workers: HashMap<String, WorkerFn>,
    families: Vec<WorkerFamily>,
    prewarm: Option<PrewarmFn>,
    fork_hooks: Option<ForkHooks>,
    files: Option<FilesFn>,
    /// The preloads, not run in this process yet: each fork of the front
    /// (a zygote) takes its own copy and runs it.
    unrun: RefCell<Option<Preloads>>,
    /// What the preloads made, once run in this process.
    loaded: OnceCell<Loaded>,
}

/// The preloads a builder collected, not run.
#[derive(Default)]
pub(crate) struct Preloads {
    embedded: Vec<(String, PreloadFn)>,
    dylibs: Vec<(String, PathBuf)>,
}

/// What the preloads made.
#[derive(Default)]
struct Loaded {
    preloaded: Preloaded,
    dylibs: HashMap<String, Dylib>,
    /// The dylibs' files, in the order loaded.
    dylib_paths: Vec<PathBuf>,
    infos: Vec<ModuleInfo>,
}

/// What a worker target names, found before the fork.
pub(crate) enum WorkerRef<'m> {
    Embedded(&'m WorkerFn, &'m Preloaded),
    Dylib(EntryPoint),
    /// A name that may be valid, which only what the preloads loaded can
    /// tell (a dylib's symbol, a family's check), in a process that has not
    /// run them (the front of a split server): the zygote resolves it.
    InZygote,
}

impl Modules {
    /// The workers of `specs`, with their preloads kept unrun.
    pub(crate) fn new(specs: ModuleSpecs) -> Modules {
        Modules {
            workers: specs.workers.into_iter().collect(),
            families: specs.families,
            prewarm: specs.prewarm,
            fork_hooks: specs.fork_hooks,
            files: specs.files,
            unrun: RefCell::new(Some(Preloads {
                embedded: specs.preloads,
                dylibs: specs.dylibs,
            })),
            loaded: OnceCell::new(),
        }
    }

    /// The modules preloaded here, with their preload times (none before
    /// [`load`](Self::load)).
    pub(crate) fn infos(&self) -> &[ModuleInfo] {
        self.loaded.get().map_or(&[], |l| &l.infos)
    }

    /// The files the preloads loaded (the dylibs', and what the builder's
    /// [`preloaded_files`](crate::ServerBuilder::preloaded_files) names),
    /// as they are now: right after the preloads, what they loaded.
    pub(crate) fn preloaded_files(&self) -> Vec<PreloadedFile> {
        let dylibs = self.loaded.get().map_or(&[][..], |l| &l.dylib_paths);
        let named = self.files.as_ref().map(|files| files()).unwrap_or_default();
        dylibs
            .iter()
            .chain(&named)
            .map(|path| PreloadedFile::record(path))
            .collect()
    }

    /// Runs every preload and loads every dylib, in the order given, checking
    /// the thread guard after each; once per process (a second call finds
    /// nothing left to run and fails).
    pub(crate) fn load(&self, policy: ThreadPolicy) -> Result<(), ServeError> {
        let Some(preloads) = self.unrun.borrow_mut().take() else {
            return Err(ServeError::Config(
                "the preloads already ran in this process".into(),
            ));
        };
        let loaded = Loaded::run(preloads, policy)?;
        let _ = self.loaded.set(loaded);
        Ok(())
    }
}

impl Loaded {
    fn run(preloads: Preloads, policy: ThreadPolicy) -> Result<Loaded, ServeError> {
        let mut modules = Loaded::default();
        for (name, preload) in preloads.embedded {
            let started = Instant::now();
            let outcome = panic::catch_unwind(AssertUnwindSafe(preload))
                .unwrap_or_else(|panic| Err(format!("panicked: {}", panic_message(&*panic))));
            let value = outcome.map_err(|message| ServeError::Preload {
                module: name.clone(),
                message,
            })?;
            modules.preloaded.insert(name.clone(), value);
            modules.finish(name, ModuleKind::Embedded, started, policy)?;
        }
        for (name, path) in preloads.dylibs {
            let started = Instant::now();
            let failed = |message: String| ServeError::Preload {
                module: name.clone(),
                message,
            };
            let dylib = Dylib::open(&path).map_err(&failed)?;
            if let Some(status) = dylib.init() {
                if status != 0 {
                    return Err(failed(format!(
                        "forkserver_module_init() in {} returned {status}",
                        path.display()
                    )));
                }
            }
            modules.dylibs.insert(name.clone(), dylib);
            modules.dylib_paths.push(path.clone());
            modules.finish(name, ModuleKind::Dylib, started, policy)?;
        }
        Ok(modules)
    }

    /// Records a module's preload time and applies the thread guard.
    fn finish(
        &mut self,
        name: String,
        kind: ModuleKind,
        started: Instant,
        policy: ThreadPolicy,
    ) -> Result<(), ServeError> {
        let preload_ms = started.elapsed().as_secs_f64() * 1000.0;
        log!(
            Level::Info,
            "preloaded module '{name}' in {preload_ms:.1} ms"
        );
        threads::tolerate(&format!("after preloading '{name}'"), policy).map_err(|threads| {
            ServeError::PreloadStartedThreads {
                module: name.clone(),
                threads,
            }
        })?;
        self.infos.push(ModuleInfo {
            name,
            kind,
            preload_ms,
        });
        Ok(())
    }
}

impl Modules {
    /// Resolves a worker target's name: an embedded worker, or
    /// `MODULE:SYMBOL` in a dylib. The message names what is missing. In
    /// a process that has not run the preloads, [`WorkerRef::InZygote`].
    pub(crate) fn find(&self, name: &str) -> Result<WorkerRef<'_>, String> {
        // Names that cannot be valid are refused here, in the front too: a
        // flood of them must cost no round trip to the zygote.
        let loaded = self.loaded.get();
        if let Some(worker) = self.workers.get(name) {
            return Ok(match loaded {
                Some(loaded) => WorkerRef::Embedded(worker, &loaded.preloaded),
                None => WorkerRef::InZygote,
            });
        }
        if let Some(family) = self.families.iter().find(|f| name.starts_with(&f.prefix)) {
            // The check may look at what the preloads loaded.
            let Some(loaded) = loaded else {
                return Ok(WorkerRef::InZygote);
            };
            (family.check)(name)?;
            return Ok(WorkerRef::Embedded(&family.run, &loaded.preloaded));
        }
        let Some((module, symbol)) = name.split_once(':') else {
            return Err(format!(
                "no worker named '{name}' (this server offers: {})",
                self.offered()
            ));
        };
        if !self.has_dylib(module) {
            return Err(format!(
                "no dynamic module named '{module}' (this server offers: {})",
                self.offered()
            ));
        }
        let Some(dylib) = loaded.and_then(|l| l.dylibs.get(module)) else {
            return Ok(WorkerRef::InZygote);
        };
        let c_symbol =
            CString::new(symbol).map_err(|_| "the symbol contains a NUL byte".to_owned())?;
        dylib
            .entry_point(&c_symbol)
            .map(WorkerRef::Dylib)
            .ok_or_else(|| format!("dynamic module '{module}' has no symbol '{symbol}'"))
    }

    /// Whether `module` names a dylib: loaded here, or to be loaded by a
    /// zygote.
    fn has_dylib(&self, module: &str) -> bool {
        match self.loaded.get() {
            Some(loaded) => loaded.dylibs.contains_key(module),
            None => (self.unrun.borrow().iter())
                .any(|preloads| preloads.dylibs.iter().any(|(name, _)| name == module)),
        }
    }

    /// The dylibs' module names: loaded here, or to be loaded by a zygote.
    fn dylib_names(&self) -> Vec<String> {
        match self.loaded.get() {
            Some(loaded) => loaded.dylibs.keys().cloned().collect(),
            None => (self.unrun.borrow().iter())
                .flat_map(|preloads| preloads.dylibs.iter().map(|(name, _)| name.clone()))
                .collect(),
        }
    }

    /// Runs the builder's pool warm-up for `worker`, if there is one (in an
    /// idle pool child).
    pub(crate) fn prewarm(&self, worker: &str) {
        if let Some(prewarm) = &self.prewarm {
            prewarm(worker);
        }
    }

    /// Runs the builder's before-fork hook, if there is one.
    pub(crate) fn before_fork(&self) {
        if let Some(hooks) = &self.fork_hooks {
            (hooks.before)();
        }
    }

    /// Runs the builder's after-fork hook for the parent, if there is one.
    pub(crate) fn after_fork_in_parent(&self) {
        if let Some(hooks) = &self.fork_hooks {
            (hooks.after_in_parent)();
        }
    }

    /// Embedded worker names, sorted, then each family as `PREFIX*`.
    pub(crate) fn worker_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.workers.keys().cloned().collect();
        names.sort();
        names.extend(self.families.iter().map(|f| format!("{}*", f.prefix)));
        names
    }

    fn offered(&self) -> String {
        let mut offered = self.worker_names();
        offered.extend(self.dylib_names().iter().map(|m| format!("{m}:SYMBOL")));
        if offered.is_empty() {
            "nothing".into()
        } else {
            offered.join(", ")
        }
    }
}

/// What a panic carried, as text.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".into())
}
