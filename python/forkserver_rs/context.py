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
"""

import io
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
from multiprocessing import popen_fork, popen_spawn_posix, process, reduction, spawn, util

from .client import Client, ServerError

__all__ = ["get_context", "ForkserverContext"]

_CHILD_TARGET = "py:forkserver_rs.context:_start_child"


def get_context(preload=(), socket=None, *, pool=2, allow_dormant_threads=True, server_args=()):
    """A multiprocessing context backed by a forkserver.

    ``preload``: modules the server imports once (``["numpy", "polars"]``).
    ``socket``: a server to use; when nothing listens there (or when it is
    None) the first process started starts one, which stops when this
    process ends. ``allow_dormant_threads`` is passed on as
    ``--allow-dormant-threads`` (Polars 2.x starts sleeping threads at
    import; the server then forks only while they sleep). ``pool``: how
    many children a server started here keeps forked and warmed up ahead
    (``--pool``; 0 for none). ``server_args``: more ``serve`` flags for it.
    """
    if pool:
        server_args = ("--pool", f"{_CHILD_TARGET}={pool}", *server_args)
    return ForkserverContext(tuple(preload), socket, allow_dormant_threads, tuple(server_args))


class ForkserverContext(mp_context.BaseContext):
    _name = "forkserver-rs"

    def __init__(self, preload, socket, allow_dormant_threads, server_args):
        self._server = _ServerHandle.get(preload, socket, allow_dormant_threads, server_args)

    def Process(self, *args, **kwargs):
        """A ``multiprocessing.Process`` this context's server starts."""
        started = ForkserverProcess(*args, **kwargs)
        started._forkserver_key = self._server.key
        return started

    def client(self):
        """The connection to this context's server (started if need be)."""
        return self._server.client()


class ForkserverProcess(process.BaseProcess):
    """A Process started by a forkserver (pickled by reference, so it lives
    at module level; the server it uses is named by `_forkserver_key`)."""

    # None: the child keeps the start method the parent's preparation data
    # names (``spawn._main`` sets it).
    _start_method = None

    @staticmethod
    def _Popen(process_obj):
        return Popen(process_obj, _ServerHandle.get(*process_obj._forkserver_key))


class Popen(popen_fork.Popen):
    """Starts one process through the server; see the module docstring."""

    method = "forkserver-rs"
    DupFd = popen_spawn_posix._DupFd

    def __init__(self, process_obj, server):
        self._fds = []
        self._server = server
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
        mp_context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, data)
            reduction.dump(process_obj, data)
        finally:
            mp_context.set_spawning_popen(None)
        child_r, parent_w = os.pipe()
        try:
            self._child = self._server.client().spawn(
                _CHILD_TARGET,
                args=(child_r, tracker_fd),
                stdin=subprocess.DEVNULL,
                pass_fds=sorted(set(self._fds + [child_r])),
                env=dict(os.environ),
                # Like a spawned process, it outlives the parent's handle.
                detach=True,
            )
            self.pid = self._child.pid
            self.sentinel = self._child.pidfd
            with open(parent_w, "wb", closefd=False) as pipe:
                pipe.write(data.getbuffer())
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
    """One server per (preload, socket, flags) in this process: found at
    `socket`, or started on first use and stopped when this process exits."""

    _handles = {}
    _handles_lock = threading.Lock()

    @classmethod
    def get(cls, preload, socket, allow_dormant_threads, server_args):
        key = (preload, socket, allow_dormant_threads, server_args)
        with cls._handles_lock:
            if key not in cls._handles:
                cls._handles[key] = cls(*key)
            return cls._handles[key]

    def __init__(self, preload, socket, allow_dormant_threads, server_args):
        self.key = (preload, socket, allow_dormant_threads, server_args)
        self.preload = preload
        self.socket = socket
        self.allow_dormant_threads = allow_dormant_threads
        self.server_args = server_args
        self._lock = threading.Lock()
        self._client = None
        self._process = None
        self._lifeline = None
        self._directory = None

    def client(self):
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self):
        if self.socket is not None:
            try:
                return Client(self.socket, name="forkserver_rs.context")
            except ConnectionError:
                pass  # nothing listens there yet: start one
        path = self.socket
        if path is None:
            self._directory = tempfile.mkdtemp(prefix="forkserver-")
            path = os.path.join(self._directory, "forkserver.sock")
        self._start(path)
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
        if not {"-v", "--verbose", "-q", "--quiet", "-qq"} & set(self.server_args):
            command.append("-q")  # warnings and errors only, unless asked otherwise
        command += ["--lifeline-fd", str(lifeline_r), "--ready-fd", str(ready_w)]
        command += ["--stderr-after-ready", str(later_stderr)]
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
        util.Finalize(None, self._stop, exitpriority=-100)

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
