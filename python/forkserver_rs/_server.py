"""Server-side helpers the native event loop calls (in the server process).

`preload` runs once per ``--preload`` module before serving; `check_target`
runs before each fork of a ``py:MODULE:FUNCTION`` worker. Each returns None
when all is well, or a message saying what is wrong.
"""

import gc
import importlib
import importlib.util
import inspect
import os
import sys
import threading
import traceback

# Imported here, in the server, so no child imports them again: the code a
# py: worker runs through (msgpack included), the multiprocessing machinery
# every context child needs, and what multiprocessing.spawn.prepare runs the
# parent's main script with (runpy, and pkgutil, which imports typing: 3 ms
# a child otherwise).
import multiprocessing.connection  # noqa: F401
import multiprocessing.pool  # noqa: F401
import multiprocessing.queues  # noqa: F401
import multiprocessing.resource_tracker  # noqa: F401
import multiprocessing.synchronize  # noqa: F401
import concurrent.futures.process  # noqa: F401
import pkgutil  # noqa: F401
import runpy  # noqa: F401

from . import context  # noqa: F401
from ._worker import parse_target


def _flush():
    # Output a module printed while importing must not sit in the buffers
    # every child inherits (each would print it again at exit).
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


def _freeze():
    # What the gc module's documentation advises before fork() without
    # exec(): everything imported so far moves to the permanent generation,
    # so a collection in a child never writes to (and so never copies, page
    # by page) the objects it shares with the server.
    gc.freeze()


# --precompile: path -> (mtime_ns, size, code object), read by children.
_PRECOMPILED = {}


def precompile(path):
    """Compiles the script at `path` (without running it) for children that
    will run it; None, or why it could not."""
    try:
        with open(path, "rb") as script:
            stat = os.fstat(script.fileno())
            source = script.read()
        code = compile(source, path, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError) as exc:
        return str(exc)
    _PRECOMPILED[path] = (stat.st_mtime_ns, stat.st_size, code)
    return None


def precompiled(path):
    """The code object `precompile` made of `path`, if the file has not
    changed since; else None."""
    cached = _PRECOMPILED.get(path)
    if cached is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    mtime_ns, size, code = cached
    return code if (stat.st_mtime_ns, stat.st_size) == (mtime_ns, size) else None


def preload(module):
    """Imports `module`. The server's thread guard runs next; this names the
    Python threads the import started, which the guard sees only as native
    threads called after the interpreter."""
    before = set(threading.enumerate())
    try:
        importlib.import_module(module)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: it is one module's failure
        traceback.print_exc()
        return "".join(traceback.format_exception_only(type(exc), exc)).strip()
    finally:
        _flush()
    _freeze()
    for thread in threading.enumerate():
        if thread not in before:
            print(
                f"forkserver: importing '{module}' started the Python thread "
                f"'{thread.name}' (tid {thread.native_id}, "
                f"{'daemon' if thread.daemon else 'not a daemon'}). Workers will not "
                "have it, and a lock it holds when the server forks stays held in the "
                "worker; start it in the worker instead",
                file=sys.stderr,
                flush=True,
            )
    return None


def check_target(target):
    """Refuses, before the fork, a target that cannot run: a malformed name,
    a module not on the server's sys.path, or a preloaded module without
    the function. Modules not preloaded are imported by the child, so only
    their top-level package's existence is checked here (importing it in
    the server would change the server)."""
    try:
        module, function = parse_target(target)
    except ValueError as exc:
        return str(exc)
    loaded = sys.modules.get(module)
    if loaded is None:
        top = module.split(".")[0]
        if top not in sys.modules and importlib.util.find_spec(top) is None:
            return f"no Python module named '{top}' on the server's sys.path ({', '.join(sys.path)})"
        return None
    # Static lookups: the name comes from a peer, and a module's __getattr__
    # or a property must not run in the server on its say-so.
    value = loaded
    for name in function.split("."):
        value = inspect.getattr_static(value, name, None)
        if value is None:
            return f"module '{module}' (preloaded) has no '{function}'"
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if not callable(value):
        return f"'{module}.{function}' is a {type(value).__name__}, not a function"
    return None


def preloaded_files():
    """The files of every module imported since this module was (by the
    preloads, in the server's zygote), for the server to watch for changes
    on disk."""
    files = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name not in _BEFORE_PRELOADS and isinstance(path, str) and os.path.isfile(path):
            files.add(os.path.abspath(path))
    return sorted(files)


_freeze()
# What the server imported before any preload (the helpers above): not the
# preloads' files.
_BEFORE_PRELOADS = frozenset(sys.modules)
