"""A multiprocessing context whose processes our server starts.

``get_context(preload=[...])`` works wherever ``multiprocessing.get_context
("spawn")`` does (``Process``, ``Pool``, ``Queue``, ``Lock``, ...,
``ProcessPoolExecutor(mp_context=...)``). A process is started the way the
``spawn`` method starts one, except that instead of exec'ing a new
interpreter that repays every import, the server forks a copy of itself with
the preloads already imported:

1. the parent pickles the preparation data and the Process object exactly as
   ``spawn`` does (so the same things must be picklable);
2. it asks the server for ``py:forkserver_rs.context:_start_child`` with the fds
   ``spawn`` would pass (the data pipe, the resource tracker's fd, pipes and
   fds of queues and connections), installed at the same numbers, the
   parent's stdout and stderr, and the parent's environment;
3. the child reads the pickles and runs ``multiprocessing.spawn._main``,
   like a ``spawn`` or ``forkserver`` child.

Its sentinel is the child's pidfd (readable once it ends); its exit status
comes from the server, over one connection the context shares.

``register(name, ...)`` also makes the context a start method by name
(``multiprocessing.get_context(name)``, ``set_start_method(name)``): it is
added to multiprocessing's table of contexts and its settings are written
to the environment variable ``FORKSERVER_RS_CONTEXTS``, which any process
started afterwards inherits. An interpreter that imports ``forkserver_rs``
registers what that variable names; an interpreter that never imports it
can still resolve the names with the opt-in ``.pth`` hook (``python -m
forkserver_rs install-hook``). Our own children get the variable with the
socket of the server in use added, and register it before ``spawn._main``
(whose ``prepare`` sets the parent's start method by name), so they and
their children share that server.
"""

import dataclasses
import functools
import io
import json
import os
import pickle
import runpy
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import types

from multiprocessing import context as mp_context
from multiprocessing import pool as mp_pool
from multiprocessing import popen_fork, popen_spawn_posix, process, reduction, spawn, util

from .client import Client, ServerError, ServerGone

__all__ = ["get_context", "register", "ForkserverContext"]

_CHILD_TARGET = "py:forkserver_rs.context:_start_child"

#: The environment variable that carries registered names to children.
ENVIRONMENT_VARIABLE = "FORKSERVER_RS_CONTEXTS"

#: The start methods multiprocessing defines itself.
_STOCK_METHODS = ("fork", "spawn", "forkserver")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a context's server is: its preloads, where it listens, its
    flags, and how processes and tasks are pickled."""

    preload: tuple = ()
    socket: "str | None" = None
    pool: int = 2
    allow_dormant_threads: bool = True
    server_args: tuple = ()
    pickler: str = "pickle"

    def __post_init__(self):
        if self.pickler not in ("pickle", "cloudpickle"):
            raise ValueError(f"pickler must be 'pickle' or 'cloudpickle', not {self.pickler!r}")
        if self.pickler == "cloudpickle":
            try:
                import cloudpickle  # noqa: F401
            except ImportError:
                raise ValueError(
                    "pickler='cloudpickle' needs the cloudpickle package: pip install cloudpickle"
                ) from None

    def to_json(self):
        return {**dataclasses.asdict(self), "preload": list(self.preload),
                "server_args": list(self.server_args)}

    @classmethod
    def from_json(cls, fields):
        known = {field.name for field in dataclasses.fields(cls)}
        fields = {name: value for name, value in fields.items() if name in known}
        fields["preload"] = tuple(fields.get("preload", ()))
        fields["server_args"] = tuple(fields.get("server_args", ()))
        return cls(**fields)


def get_context(preload=(), socket=None, *, pool=2, allow_dormant_threads=True, server_args=(),
                pickler="pickle"):
    """A multiprocessing context backed by a forkserver.

    ``preload``: modules the server imports once (``["numpy", "polars"]``).
    ``socket``: a server to use; when nothing listens there (or when it is
    None) the first process started starts one, which stops when this
    process ends. ``allow_dormant_threads`` is passed on as
    ``--allow-dormant-threads`` (Polars 2.x starts sleeping threads at
    import; the server then forks only while they sleep). ``pool``: how
    many children a server started here keeps forked and warmed up ahead
    (``--pool``; 0 for none). ``server_args``: more ``serve`` flags for it.
    ``pickler``: ``"pickle"`` (as ``spawn``), or ``"cloudpickle"`` to send
    what only cloudpickle can (lambdas, local functions) as Process
    targets and arguments and as Pool tasks (needs the cloudpickle package
    in the parent and importable by the server).

    The context is not registered; :func:`register` makes one selectable by
    name.
    """
    settings = _settings(preload, socket, pool, allow_dormant_threads, server_args, pickler)
    return ForkserverContext("forkserver-rs", settings)


def _settings(preload, socket, pool, allow_dormant_threads, server_args, pickler):
    preload = tuple(preload)
    if pickler == "cloudpickle" and "cloudpickle" not in preload:
        # Every child unpickles with it: import it once, in the server.
        preload += ("cloudpickle",)
    return Settings(preload, socket, pool, allow_dormant_threads, tuple(server_args), pickler)


def register(name="forkserver-rs", preload=(), socket=None, *, pool=2, allow_dormant_threads=True,
             server_args=(), pickler="pickle", export=True):
    """Makes a context (the settings are :func:`get_context`'s) a start method
    named `name`, here and in every process started from here on; returns
    `name`.

    Then ``multiprocessing.get_context(name)``,
    ``multiprocessing.set_start_method(name)`` (with ``multiprocessing.Process``
    and ``Pool``), and anything configured by start-method name (Dask's
    ``distributed.worker.multiprocessing-method``, ``JOBLIB_START_METHOD``)
    use it. Registering the same name again with the same settings does
    nothing; with other settings it is an error (choose another name).

    ``export``: also write the settings to ``os.environ``
    (``FORKSERVER_RS_CONTEXTS``), so that processes started by other means
    (``subprocess``, the ``spawn`` method) know the name too: when they
    import forkserver_rs, or always with the ``.pth`` hook. Our own
    children know it either way.
    """
    if name in _STOCK_METHODS:
        raise ValueError(f"{name!r} is one of multiprocessing's own start methods; choose another name")
    settings = _settings(preload, socket, pool, allow_dormant_threads, server_args, pickler)
    existing = mp_context._concrete_contexts.get(name)
    if isinstance(existing, ForkserverContext):
        if existing._settings == settings:
            return name
        raise ValueError(
            f"the start method {name!r} is already registered with other settings "
            f"({existing._settings}); register these under another name"
        )
    if existing is not None:
        raise ValueError(f"multiprocessing already has a start method {name!r}; choose another name")
    context = ForkserverContext(name, settings)
    context._register()
    if export:
        context._exported = True
        _export_settings()
    return name


def _export_settings():
    os.environ[ENVIRONMENT_VARIABLE] = _registrations(with_running=False)


def _registrations(with_running):
    """Every registered context, as ENVIRONMENT_VARIABLE carries them; with
    the socket of the server each uses, for our own children, which share
    it; None if there are none."""
    registered = {
        name: {**ctx._settings.to_json(), **({"running": ctx._running_socket()} if with_running else {})}
        for name, ctx in mp_context._concrete_contexts.items()
        if isinstance(ctx, ForkserverContext)
    }
    return json.dumps(registered, separators=(",", ":")) if registered else None


def _register_from_environment():
    """Registers the contexts ENVIRONMENT_VARIABLE names (as the process
    that started us registered them); a malformed value is ignored with a
    warning, since it must not stop an interpreter from starting."""
    value = os.environ.get(ENVIRONMENT_VARIABLE)
    if not value:
        return
    try:
        registered = {name: (Settings.from_json(fields), fields.get("running"))
                      for name, fields in json.loads(value).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        import warnings

        warnings.warn(f"forkserver_rs: ignoring {ENVIRONMENT_VARIABLE}: {exc}", RuntimeWarning)
        return
    for name, (settings, running) in registered.items():
        existing = mp_context._concrete_contexts.get(name)
        if name in _STOCK_METHODS or (existing is not None and not isinstance(existing, ForkserverContext)):
            continue
        if existing is not None and existing._settings == settings:
            existing._adopt(running)
            continue
        ForkserverContext(name, settings, running)._register()


class ForkserverContext(mp_context.BaseContext):
    """A multiprocessing context whose processes a forkserver starts; see
    :func:`get_context` and :func:`register`. ``ctx.Process`` is a Process
    class of its own, as in multiprocessing's contexts."""

    def __init__(self, name, settings, running=None):
        self._name = name
        self._settings = settings
        self._running = running
        self._handle = None
        # register(export=True) wrote its settings to os.environ.
        self._exported = False
        self.Process = type(
            "ForkserverProcess", (ForkserverProcess,), {"_context": self, "__module__": __name__}
        )

    def _register(self):
        mp_context._concrete_contexts[self._name] = self
        self.Process._start_method = self._name

    def __reduce__(self):
        # As stock contexts pickle (loky passes one to its workers for
        # nested executors): the process that unpickles it gets the context
        # registered under this name there, or one with these settings,
        # using the same server while it runs. (Its Process class is made
        # per context, so the object itself cannot be pickled.)
        registered = mp_context._concrete_contexts.get(self._name) is self
        return (
            _unpickle_context,
            (self._name, self._settings.to_json(), self._running_socket(), registered),
        )

    @property
    def _server(self):
        if self._handle is None:
            self._handle = _ServerHandle.get(self._settings)
            self._handle.adopt(self._running)
        return self._handle

    def _adopt(self, running):
        self._running = running
        if self._handle is not None:
            self._handle.adopt(running)

    def _running_socket(self):
        return self._handle.running_socket() if self._handle is not None else self._running

    def client(self):
        """The connection to this context's server (started if need be)."""
        return self._server.client()

    def Pool(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None):
        """A ``multiprocessing.Pool`` of this context's processes (with
        ``pickler="cloudpickle"``, its tasks are sent with cloudpickle)."""
        pool_class = _CloudpicklePool if self._settings.pickler == "cloudpickle" else mp_pool.Pool
        return pool_class(processes, initializer, initargs, maxtasksperchild, context=self)

    def set_forkserver_preload(self, module_names):
        """The modules a server this context starts imports first, as
        CPython's forkserver context has it: it changes nothing for a server
        already in use."""
        if self._handle is not None and self._handle.in_use():
            return
        self._settings = dataclasses.replace(self._settings, preload=tuple(module_names))
        self._handle = None
        self._running = None
        if self._exported:
            _export_settings()


def _unpickle_context(name, fields, running, registered):
    """The context a pickled ForkserverContext stands for, here."""
    settings = Settings.from_json(fields)
    existing = mp_context._concrete_contexts.get(name)
    if registered and isinstance(existing, ForkserverContext) and existing._settings == settings:
        return existing
    context = ForkserverContext(name, settings, running)
    if registered and existing is None:
        context._register()
    return context


class ForkserverProcess(process.BaseProcess):
    """A Process a forkserver starts. Each context has a subclass bound to
    it (``ctx.Process``); an instance pickles as this class, which a child
    unpickles without knowing the context."""

    _context = None
    # The child's default start method, as a stock context's Process sets
    # it (BaseProcess._bootstrap): a registered context's name (the child
    # knows it), else None: the parent's default, which spawn.prepare sets.
    _start_method = None

    @classmethod
    def _Popen(cls, process_obj):
        return Popen(process_obj, cls._context)

    def __reduce__(self):
        # The child's instance carries the start method its class had here.
        return (_new_process, (), {**self.__dict__, "_start_method": self._start_method})


def _new_process():
    return ForkserverProcess.__new__(ForkserverProcess)


@functools.lru_cache(maxsize=None)
def _cloudpickler():
    """cloudpickle's Pickler with multiprocessing's reducers (connections,
    sockets, fds: ForkingPickler's), for ``pickler="cloudpickle"``."""
    import collections

    import cloudpickle

    class CloudForkingPickler(cloudpickle.Pickler):
        # A class attribute: the C pickler reads it once, in __init__, and
        # cloudpickle's own class attribute hides the instance slot that
        # ForkingPickler assigns to.
        dispatch_table = collections.ChainMap(
            reduction.ForkingPickler._extra_reducers, cloudpickle.Pickler.dispatch_table
        )

    return CloudForkingPickler


def _cloudpickle_dump(obj, file):
    _cloudpickler()(file).dump(obj)


def _cloudpickle_dumps(obj):
    buffer = io.BytesIO()
    _cloudpickle_dump(obj, buffer)
    return buffer.getbuffer()


class _CloudpickleSender:
    """What a Pool puts its tasks with (``Pool._quick_put``), cloudpickling
    them; the workers unpickle them with plain pickle."""

    def __init__(self, connection):
        self._connection = connection

    def __call__(self, task):
        self._connection.send_bytes(_cloudpickle_dumps(task))


class _CloudpicklePool(mp_pool.Pool):
    def _setup_queues(self):
        super()._setup_queues()
        self._quick_put = _CloudpickleSender(self._inqueue._writer)


class Popen(popen_fork.Popen):
    """Starts one process through the server; see the module docstring."""

    method = "forkserver-rs"
    DupFd = popen_spawn_posix._DupFd

    def __init__(self, process_obj, context):
        self._fds = []
        self._context = context
        self._child = None
        super().__init__(process_obj)

    def duplicate_for_child(self, fd):
        # Installed at the same number in the child, as spawn does.
        self._fds.append(fd)
        return fd

    def _launch(self, process_obj):
        from multiprocessing import resource_tracker

        tracker_fd = resource_tracker.getfd()
        self._fds.append(tracker_fd)
        prep_data = spawn.get_preparation_data(process_obj._name)
        data = io.BytesIO()
        dump = _cloudpickle_dump if self._context._settings.pickler == "cloudpickle" else reduction.dump
        mp_context.set_spawning_popen(self)
        try:
            dump(prep_data, data)
            dump(process_obj, data)
        finally:
            mp_context.set_spawning_popen(None)
        server = self._context._server
        # Connected (or started) first: the child is told the running
        # server's socket, to use it in turn.
        server.client()
        environ = dict(os.environ)
        registered = _registrations(with_running=True)
        if registered:
            environ[ENVIRONMENT_VARIABLE] = registered
        child_r, parent_w = os.pipe()
        payload = data.getbuffer()
        # The child reads the process object as soon as it is set up: what
        # fits in the pipe goes in before the spawn, so that the child need
        # not wait for this process to hear it started and write then (a
        # wake-up on each side). The rest, if any, is written after.
        os.set_blocking(parent_w, False)
        try:
            written = os.write(parent_w, payload)
        except BlockingIOError:
            written = 0
        os.set_blocking(parent_w, True)
        try:
            self._child = server.spawn(
                _CHILD_TARGET,
                args=(child_r, tracker_fd),
                stdin=subprocess.DEVNULL,
                pass_fds=sorted(set(self._fds + [child_r])),
                env=environ,
                # Like a spawned process, it outlives the parent's handle.
                detach=True,
            )
            self.pid = self._child.pid
            self.sentinel = self._child.pidfd
            if written < len(payload):
                with open(parent_w, "wb", closefd=False) as pipe:
                    pipe.write(payload[written:])
        finally:
            # The child holds its copy of child_r; parent_w stays open until
            # this Popen is finalized: its end-of-file tells the child the
            # parent is gone (its parent_sentinel).
            os.close(child_r)
            self.finalizer = util.Finalize(self, util.close_fds, (parent_w,))

    def poll(self, flag=os.WNOHANG):
        if self.returncode is None and self._child is not None:
            try:
                if flag == os.WNOHANG:
                    self.returncode = self._child.poll()
                else:
                    self.returncode = self._child.wait()
            except (OSError, ServerError):
                # The server is gone and the status with it (CPython's
                # forkserver method says 255 in this case too).
                self.returncode = 255
        return self.returncode

    def _send_signal(self, sig):
        if self.returncode is None and self._child is not None:
            self._child.send_signal(sig)


def _start_child(pipe_handle, tracker_fd):
    """In the forked child: what ``spawn.spawn_main`` does after exec."""
    from multiprocessing import resource_tracker

    # The parent's names, before spawn.prepare sets its start method.
    _register_from_environment()
    resource_tracker._resource_tracker._fd = tracker_fd
    parent_sentinel = os.dup(pipe_handle)
    spawn._fixup_main_from_path = _fixup_main_from_precompiled_path
    return spawn._main(pipe_handle, parent_sentinel)


def _prewarm_child():
    """The part of a child's start that needs no request: pickling and
    unpickling preparation data and a Process (the pool warm-up runs it)."""
    buffer = io.BytesIO()
    # Pickling a Process (its authkey) is allowed only while "spawning".
    mp_context.set_spawning_popen(object())
    try:
        reduction.dump(spawn.get_preparation_data("prewarm"), buffer)
        reduction.dump(process.BaseProcess(target=print, name="prewarm"), buffer)
    finally:
        mp_context.set_spawning_popen(None)
    buffer.seek(0)
    pickle.load(buffer)
    pickle.load(buffer)


_start_child._forkserver_prewarm = _prewarm_child

_fixup_main_from_path = spawn._fixup_main_from_path


def _fixup_main_from_precompiled_path(main_path):
    """``spawn._fixup_main_from_path`` (re-running the parent's main script
    as ``__mp_main__``), with the code the server compiled at start
    (``--precompile``, which get_context passes) when the script is unchanged:
    compiling it in every child costs milliseconds. Everything else, and
    every special case, is left to multiprocessing's own."""
    from . import _server

    code = _server.precompiled(main_path)
    current_main = sys.modules["__main__"]
    if (
        code is None
        or getattr(current_main, "__file__", None) == main_path
        or os.path.splitext(os.path.basename(main_path))[0] == "ipython"
    ):
        return _fixup_main_from_path(main_path)
    spawn.old_main_modules.append(current_main)
    main_module = types.ModuleType("__mp_main__")
    # As runpy.run_path(main_path, run_name="__mp_main__") runs a script.
    main_content = runpy._run_module_code(
        code, None, "__mp_main__", pkg_name="", script_name=main_path
    )
    main_module.__dict__.update(main_content)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main_module


class _ServerHandle:
    """One server per server settings (the pickler aside) in this process:
    the one the process that started us uses (`adopt`), or found at
    `socket`, or started on first use and stopped when this process exits."""

    _handles = {}
    _handles_lock = threading.Lock()

    @classmethod
    def get(cls, settings):
        key = dataclasses.replace(settings, pickler="pickle")
        with cls._handles_lock:
            if key not in cls._handles:
                cls._handles[key] = cls(key)
            return cls._handles[key]

    def __init__(self, settings):
        self.preload = settings.preload
        self.socket = settings.socket
        self.allow_dormant_threads = settings.allow_dormant_threads
        self.server_args = settings.server_args
        if settings.pool:
            self.server_args = ("--pool", f"{_CHILD_TARGET}={settings.pool}", *self.server_args)
        self._lock = threading.Lock()
        self._adopted = None
        self._connected = None
        self._client = None
        self._process = None
        self._lifeline = None
        self._directory = None
        self._stop_registered = False

    def adopt(self, running):
        """The socket of the server the process that started us used (tried
        first; it stops with that process)."""
        self._adopted = running

    def in_use(self):
        return self._client is not None

    def running_socket(self):
        return self._connected or self._adopted or self.socket

    def client(self):
        """The client to spawn with: connected to the server in use, or to
        a new one if the server this process started has died (with the
        same settings, as CPython's forkserver starts a new one)."""
        with self._lock:
            if self._process is not None and self._process.poll() is not None:
                self._forget_dead_server()
            if self._client is None:
                self._client = self._connect()
            return self._client

    def spawn(self, *args, **kwargs):
        """``Client.spawn`` on :meth:`client`. A shared server that is gone
        and does not come back within the client's wait (nothing was sent)
        is replaced by one of this process's own, as at first use."""
        client = self.client()
        try:
            return client.spawn(*args, **kwargs)
        except ServerGone:
            with self._lock:
                if self._client is client:
                    self._client = None
                    self._connected = None
            return self.client().spawn(*args, **kwargs)

    def _forget_dead_server(self):
        """The server this process started died: its client, lifeline and
        directory go; the next :meth:`client` starts another."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self._connected = None
        self._process = None
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def _connect(self):
        for path in (self._adopted, self.socket):
            if path is not None:
                try:
                    client = Client(path, name="forkserver_rs.context")
                except (ConnectionError, FileNotFoundError):
                    continue  # gone, or nothing listens there yet
                self._connected = path
                return client
        path = self.socket
        if path is None:
            self._directory = tempfile.mkdtemp(prefix="forkserver-")
            path = os.path.join(self._directory, "forkserver.sock")
        self._start(path)
        self._connected = path
        return Client(path, name="forkserver_rs.context")

    def _start(self, path):
        """Starts ``python -m forkserver_rs serve`` at `path` and waits until it
        is ready; raises RuntimeError with its error output if it fails."""
        lifeline_r, lifeline_w = os.pipe()
        ready_r, ready_w = os.pipe()
        # The server's stderr is a pipe until it is ready (what it prints
        # while importing goes into a failure's RuntimeError), then our own
        # fd 2, as for the children: nothing here has to relay it.
        later_stderr = _duplicate_stderr()
        command = [sys.executable, "-m", "forkserver_rs", "serve", "--socket", path]
        # Warnings and errors only, unless asked otherwise: by server_args
        # (-v, -q) or, as for every server, by FORKSERVER_LOG.
        asked = {"-v", "--verbose", "-q", "--quiet", "-qq"} & set(self.server_args)
        if not asked and not os.environ.get("FORKSERVER_LOG"):
            command.append("-q")
        command += ["--lifeline-fd", str(lifeline_r), "--ready-fd", str(ready_w)]
        command += ["--stderr-after-ready", str(later_stderr)]
        if self._directory is not None:
            # Ours alone: the server removes it when it stops, should this
            # process be killed before it could.
            command.append("--remove-socket-dir")
        if self.preload:
            command += ["--preload", ",".join(self.preload)]
        if self.allow_dormant_threads:
            command.append("--allow-dormant-threads")
        # The script every child re-runs (the path as children are told it);
        # compiled once, there.
        main_path = spawn.get_preparation_data("forkserver").get("init_main_from_path")
        if main_path and main_path.endswith(".py") and os.path.isfile(main_path):
            command += ["--precompile", main_path]
        command += list(self.server_args)
        try:
            server = subprocess.Popen(
                command,
                pass_fds=(lifeline_r, ready_w, later_stderr),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                # The parent's sys.path, so preloads and workers import what
                # the parent can.
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
                start_new_session=True,
            )
        finally:
            os.close(lifeline_r)
            os.close(ready_w)
            os.close(later_stderr)
        ready, early_errors = _await_ready(ready_r, server.stderr)
        if not ready:
            server.wait()
            server.stderr.close()
            os.close(lifeline_w)
            raise RuntimeError(
                f"the forkserver for preload={list(self.preload)} did not start "
                f"(exit status {server.returncode}):\n{early_errors.strip()}"
            )
        # Past ready the server writes to our fd 2 instead; a process a
        # preload started may still hold the pipe, but nobody reads it now.
        server.stderr.close()
        self._process = server
        self._lifeline = lifeline_w
        # What it printed while starting (preload warnings), where this
        # process's Python output goes (a notebook shows sys.stderr).
        if early_errors and sys.stderr is not None:
            sys.stderr.write(early_errors)
        # After multiprocessing's own exit handler has joined or terminated
        # the children (it runs finalizers of negative priority last). A
        # Finalize runs only in the process that made it, so an os.fork()
        # child of the parent leaves the server alone.
        if not self._stop_registered:
            util.Finalize(None, self._stop, exitpriority=-100)
            self._stop_registered = True

    def _stop(self):
        """Closes the lifeline (the server then stops) and cleans up."""
        if self._client is not None:
            self._client.close()
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self._process is not None:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)


def _await_ready(ready_r, stderr):
    """Reads the server's --ready-fd line and, meanwhile, its stderr: (True,
    what it printed) once ready, (False, what it printed) if it exits first."""
    printed = []
    streams = [ready_r, stderr.fileno()]
    ready = False
    while ready_r in streams:
        for fd in select.select(streams, [], [])[0]:
            chunk = os.read(fd, 65536)
            if fd == ready_r:
                ready = ready or chunk.startswith(b"ready")
                if not chunk:
                    streams.remove(ready_r)
            elif chunk:
                printed.append(chunk)
            else:
                streams.remove(fd)
    os.close(ready_r)
    # The rest of what it printed before the ready line (it switched its
    # stderr before writing it), without waiting for an end-of-file that a
    # process a preload started could hold back.
    os.set_blocking(stderr.fileno(), False)
    while stderr.fileno() in streams:
        try:
            chunk = os.read(stderr.fileno(), 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        printed.append(chunk)
    return ready, b"".join(printed).decode(errors="replace")


def _duplicate_stderr():
    """A new fd for our stderr (fd 2), or for /dev/null if it is closed."""
    try:
        return os.dup(2)
    except OSError:
        return os.open(os.devnull, os.O_WRONLY)


# The names the process that started this interpreter registered.
_register_from_environment()
