"""The child side of a ``py:MODULE:FUNCTION`` worker.

The native code calls `run` in the forked child once its fds, environment,
directory and credentials are in place and PyOS_AfterFork_Child has brought
the interpreter up to date. `run` returns the exit status; the native code
then ends the process with ``_exit`` (the server's atexit handlers are not
this process's to run; the worker's own are run here).
"""

import atexit
import importlib
import os
import signal
import sys
import threading
import traceback

import msgpack



def run(target, payload, args, environ):
    """Calls the function `target` names with the request's string `args`
    followed by the payload's ``args`` (and its ``kwargs``); its return
    value is the exit status as ``sys.exit`` would make it."""
    _become_a_fresh_process(target, args, environ)
    try:
        module, function = parse_target(target)
        value = importlib.import_module(module)
        for name in function.split("."):
            value = getattr(value, name)
        positional, keywords = list(args), {}
        if payload is not None:
            decoded = msgpack.unpackb(payload, raw=False)
            if isinstance(decoded, dict):
                positional += list(decoded.get("args", ()))
                keywords = dict(decoded.get("kwargs", {}))
            else:
                positional += list(decoded) if isinstance(decoded, list) else [decoded]
        code = _exit_status(value(*positional, **keywords))
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except BaseException:  # an uncaught exception: its traceback, status 1
        traceback.print_exc()
        code = 1
    return _finish(code)


def parse_target(target):
    """``py:MODULE:FUNCTION`` -> (MODULE, FUNCTION); FUNCTION may be dotted
    (``Class.method``). Raises ValueError naming what is wrong."""
    _, _, rest = target.partition("py:")
    module, sep, function = rest.partition(":")
    names = module.split(".") + function.split(".")
    if not sep or not all(name.isidentifier() for name in names):
        raise ValueError(
            f"'{target}' is not py:MODULE:FUNCTION (dotted Python names, e.g. py:json:dumps)"
        )
    return module, function


def prewarm(target):
    """In an idle pool child, before any request: do what every start of
    `target` does, so the memory it touches (a forked child copies each page
    on its first write; Python writes reference counts on every access) is
    copied now rather than while a client waits. A function may offer more
    of its own start path as its ``_forkserver_prewarm`` attribute."""
    _restore_python_signals()
    dict(os.environ)
    msgpack.unpackb(msgpack.packb({"args": [0, "", 0.0, None], "kwargs": {}}), raw=False)
    module, function = parse_target(target)
    value = importlib.import_module(module)
    for name in function.split("."):
        value = getattr(value, name)
    more = getattr(value, "_forkserver_prewarm", None)
    if more is not None:
        more()


def _restore_python_signals():
    # The server set every disposition back to the default; Python starts
    # with SIGINT raising KeyboardInterrupt and SIGPIPE/SIGXFSZ ignored
    # (so a closed pipe is a BrokenPipeError, not death).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _become_a_fresh_process(target, args, environ):
    """What a new `python` process would have that a copy of the server
    does not."""
    _restore_python_signals()
    # os.environ is a copy made when the server started; the child's real
    # environment is the request's.
    environ = dict(environ)
    for name in [name for name in os.environ if name not in environ]:
        del os.environ[name]
    for name, value in environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    sys.argv = [target, *args]
    # stdout was line-buffered or not for the server's fd 1, not this one.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(line_buffering=stream is sys.stderr or os.isatty(stream.fileno()))
            except (OSError, ValueError):
                pass


def _exit_status(value):
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _finish(code):
    """Ends like an interpreter would: join non-daemon threads the worker
    started, run atexit handlers, flush."""
    try:
        threading._shutdown()
    except Exception:  # pragma: no cover - interpreter internals differ by version
        traceback.print_exc()
    atexit._run_exitfuncs()
    return _flush_std_streams(code)


def _flush_std_streams(code):
    """As the interpreter flushes at exit (``flush_std_files`` in CPython's
    pylifecycle.c): a stream set to None or closed is skipped, and any
    failure to flush makes the status 120, whatever it was."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None or getattr(stream, "closed", False):
            continue
        try:
            stream.flush()
        except Exception:  # whatever a replacement stream's flush raises
            if stream is sys.stdout and sys.stderr is not None:
                traceback.print_exc()
            code = 120
    return code
