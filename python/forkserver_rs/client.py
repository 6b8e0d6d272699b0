"""A forkserver client in pure Python, written from protocol/README.md.

One :class:`Client` is one connection at a time (a new one if its server
dies). It may be shared by threads: whoever needs a message the server has
not sent yet becomes the reader, the others wait on a condition variable
(there is no background thread).
"""

import io
import os
import select
import signal
import socket
import subprocess
import threading
import time

import msgpack

__all__ = [
    "Client",
    "Child",
    "SpawnError",
    "ServerError",
    "ServerGone",
    "ServerLost",
    "Worker",
    "default_socket_path",
]

PROTOCOL_VERSION = 1
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT

# The server answers `welcome` with its real limits; these bound what we read
# before it does.
_HELLO_LIMITS = {"max_message_bytes": 65536, "max_fds_per_message": 64}


def default_socket_path():
    """Where a client looks when no path is given, as the protocol says:
    ``$FORKSERVER_SOCKET``, else ``$XDG_RUNTIME_DIR/forkserver.sock``, else
    ``/tmp/forkserver-UID/forkserver.sock``."""
    if os.environ.get("FORKSERVER_SOCKET"):
        return os.environ["FORKSERVER_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "forkserver.sock")
    return f"/tmp/forkserver-{os.getuid()}/forkserver.sock"


class ServerError(Exception):
    """The server refused a request or broke the protocol. ``kind`` is the
    protocol's error kind (``denied``, ``limit``, ``protocol``, ...)."""

    def __init__(self, kind, message):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class SpawnError(OSError):
    """A child did not start. ``kind`` is the protocol's error kind (``exec``,
    ``unknown_worker``, ``invalid``, ...); ``errno`` is set for OS errors
    (e.g. ``errno.ENOENT`` for a program that does not exist). As with
    ``subprocess.Popen``, an OS error raises the matching ``OSError``
    subclass too — ``FileNotFoundError``, ``PermissionError``, ... — with
    ``filename`` the program that could not be run."""

    def __init__(self, kind, err, message, filename=None):
        super().__init__(err or 0, message, filename)
        self.kind = kind
        self.message = message

    def __str__(self):
        if self.filename is not None:
            return f"{self.kind}: {self.message}: {self.filename!r}"
        return f"{self.kind}: {self.message}"


# SpawnError classes that are also FileNotFoundError, PermissionError, ...
_SPAWN_ERRORS = {}


def _spawn_error(kind, err, message, filename):
    """The SpawnError to raise: of the OSError subclass Python itself gives
    errno ``err`` (``OSError(err, ...)`` picks it), when there is one."""
    base = type(OSError(err, "")) if err else OSError
    if base is OSError:
        return SpawnError(kind, err, message, filename)
    if base not in _SPAWN_ERRORS:
        _SPAWN_ERRORS[base] = type(f"Spawn{base.__name__}", (SpawnError, base), {})
    return _SPAWN_ERRORS[base](kind, err, message, filename)


def _os_string(value):
    """A path or argument as the wire wants it: str when it is UTF-8, else bytes."""
    value = os.fspath(value)
    if isinstance(value, bytes):
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:  # surrogate-escaped bytes from the OS
        return os.fsencode(value)


class Worker:
    """A worker the server offers by name (``welcome["workers"]``), with its
    string arguments and an optional MessagePack-able payload:
    ``client.spawn(Worker("resize", ["--width", "64"], payload={...}))``."""

    def __init__(self, name, args=(), payload=None):
        self.name = name
        self.args = [str(a) for a in args]
        self.payload = payload

    def _wire(self):
        target = {"kind": "worker", "name": self.name, "args": self.args}
        if self.payload is not None:
            target["payload"] = self.payload
        return target

    def __repr__(self):
        return f"Worker({self.name!r}, {self.args!r})"


def _connect(path):
    """A socket connected to the server at `path`; the errors name the socket
    and what to do."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise ConnectionError(
            f"no forkserver is listening on {path} ({exc.strerror}); "
            "start one with `python -m forkserver_rs serve --socket PATH`"
        ) from exc
    except PermissionError as exc:
        sock.close()
        raise PermissionError(
            exc.errno,
            f"the forkserver socket {path} is closed to uid {os.getuid()} ({exc.strerror}): "
            "the socket or a directory above it does not let you in. The server's owner can open "
            "it with `serve --group GROUP` (the socket becomes 0660 for GROUP; its directory must "
            "let you through) and admit you with `--allow-uid USER` or `--allow-gid GROUP`",
            path,
        ) from exc
    return sock


class ServerLost(ConnectionError):
    """The server went away (it died, or was restarted) before it answered.
    A child started on the lost connection still runs until it ends (its
    pidfd says when, and still signals it); its return code is then 255, as
    with CPython's forkserver, and ``child.server_lost`` says why."""


class ServerGone(ServerLost):
    """No server listens on the socket, and none came within the client's
    ``reconnect_wait``: nothing was sent."""


class _Connection:
    """One connection: its socket, the replies and exit reports read from it
    and not yet taken. It may be shared by threads: whoever needs a message
    the server has not sent yet becomes the reader, the others wait on a
    condition variable (there is no background thread)."""

    def __init__(self, path, name):
        self.path = path
        self._sock = _connect(path)
        self.limits = dict(_HELLO_LIMITS)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._reading = False
        self._broken = None  # why the connection can no longer be read
        # id -> [(message, fds), ...]: replies not yet taken, in order (a
        # list or kill answer comes in pages with one id)
        self._replies = {}
        self._exits = {}  # id -> exit status map
        self._next_id = 1
        try:
            self._send({"type": "hello", "protocol": PROTOCOL_VERSION, "client": name})
        except (BrokenPipeError, ConnectionResetError):
            pass  # a server that refuses us says why, and closes: read it
        welcome, _ = self._recv(None)
        if welcome.get("type") == "error":
            self._sock.close()
            raise ServerError(welcome.get("kind"), welcome.get("message"))
        if welcome.get("type") != "welcome":
            self._sock.close()
            raise ServerError("protocol", f"expected welcome, got {welcome.get('type')!r}")
        self.welcome = welcome
        self.limits.update(welcome.get("limits", {}))

    def alive(self):
        """Whether the server is still on the other end: the connection has
        not failed, and the server has not hung up (died, or closed it)
        without our having read so yet."""
        if self._broken is not None or self._sock.fileno() < 0:
            return False
        poller = select.poll()
        poller.register(self._sock, select.POLLRDHUP)
        return not any(
            events & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, events in poller.poll(0)
        )

    def close(self):
        self._sock.close()

    def _send(self, message, fds=()):
        data = msgpack.packb(message, use_bin_type=True)
        bulk = None
        if len(data) > self.limits["max_message_bytes"]:
            # Too big for one datagram: the message goes in a memfd, passed
            # as the last fd of a small `bulk` message (protocol/README.md).
            limit = self.limits.get("max_bulk_bytes", 0)
            if len(data) > limit:
                raise ValueError(
                    f"the request holds {len(data)} bytes; the server's limit "
                    f"max_bulk_bytes is {limit}"
                )
            bulk = os.memfd_create("forkserver-request", os.MFD_CLOEXEC)
            view, written = memoryview(data), 0
            while written < len(data):
                written += os.write(bulk, view[written:])
            fds = [*fds, bulk]
            data = msgpack.packb({"type": "bulk", "fd": len(fds) - 1}, use_bin_type=True)
        try:
            self._send_datagram(data, fds)
        finally:
            if bulk is not None:
                os.close(bulk)

    def _send_datagram(self, data, fds):
        with self._send_lock:
            if fds:
                socket.send_fds(self._sock, [data], list(fds), socket.MSG_NOSIGNAL)
            else:
                self._sock.sendmsg([data], [], socket.MSG_NOSIGNAL)

    def _recv(self, timeout):
        """One message and its fds, or None if none came within `timeout`."""
        if timeout is not None:
            ready, _, _ = select.select([self._sock], [], [], max(timeout, 0))
            if not ready:
                return None
        data, fds, flags, _ = socket.recv_fds(
            self._sock,
            self.limits["max_message_bytes"],
            self.limits["max_fds_per_message"] + 4,
            socket.MSG_CMSG_CLOEXEC,
        )
        if not data:
            for fd in fds:
                os.close(fd)
            raise ServerLost(f"the forkserver at {self.path} closed the connection")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise ServerError("protocol", "a message from the server was truncated")
        return msgpack.unpackb(data, raw=False), fds

    def _dispatch(self, message, fds):
        kind = message.get("type")
        if kind == "exited":
            self._exits[message["id"]] = message["status"]
        elif kind == "error" and message.get("fatal"):
            self._broken = ServerError(message.get("kind"), message.get("message"))
        elif "id" in message:
            self._replies.setdefault(message["id"], []).append((message, fds))
            return
        for fd in fds:
            os.close(fd)

    def _wait_for(self, done, timeout=None):
        """Reads messages until `done()` holds; False if `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if done():
                    return True
                if self._broken is not None:
                    raise self._broken
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0 and timeout != 0:
                    return False
                if self._reading:
                    if timeout == 0:
                        # Another thread reads (and may block there for
                        # long): a poll must not wait for it.
                        return done()
                    self._cond.wait(remaining)
                    continue
                self._reading = True
                self._cond.release()
                try:
                    received = self._recv(remaining)
                except (OSError, ServerError) as exc:
                    received = None
                    self._broken = exc
                finally:
                    self._cond.acquire()
                    self._reading = False
                    self._cond.notify_all()
                if received is not None:
                    self._dispatch(*received)
                elif timeout == 0 and self._broken is None:
                    return done()

    def _new_id(self):
        with self._cond:
            request_id = self._next_id
            self._next_id += 1
        return request_id

    def _answer(self, request_id):
        """The reply to request `request_id`, waiting for it."""
        self._wait_for(lambda: request_id in self._replies)
        with self._cond:
            queue = self._replies[request_id]
            reply = queue.pop(0)
            if not queue:
                del self._replies[request_id]
            return reply


class Client:
    """A connection to a forkserver.

    >>> with Client("/run/forkserver.sock") as client:        # doctest: +SKIP
    ...     child = client.spawn(["echo", "hi"], stdout=PIPE)
    ...     child.stdout.read(), child.wait()
    (b'hi\\n', 0)

    If the server dies, the next request connects to the socket again
    (waiting up to ``reconnect_wait`` seconds, 3 by default, for a server to
    listen there) and goes to the new server. Children started on the lost
    connection get return code 255 (the server that would have reported
    their exit is gone), as with CPython's forkserver.
    """

    def __init__(self, path=None, *, name="forkserver_rs.py", reconnect_wait=3.0):
        self.path = os.fspath(path) if path is not None else default_socket_path()
        self.reconnect_wait = reconnect_wait
        self._name = name
        self._lock = threading.Lock()
        self._closed = False
        self._conn = _Connection(self.path, name)

    @property
    def welcome(self):
        """What the server said about itself when this client last connected."""
        return self._conn.welcome

    @property
    def limits(self):
        return self._conn.limits

    # -- the connection -----------------------------------------------------

    def fileno(self):
        return self._conn._sock.fileno()

    def close(self):
        """Closes the connection. Children not started with ``detach=True``
        get SIGTERM (then SIGKILL) from the server."""
        if not self._closed:
            self._closed = True
            self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _connection(self, dead=None):
        """The connection to use now: the current one while its server is
        there, else a new one (`dead`: one found closed as a request was
        sent on it). Waits up to ``reconnect_wait`` for a server to listen."""
        with self._lock:
            if self._closed:
                raise ValueError("the client is closed")
            if self._conn is not dead and self._conn.alive():
                return self._conn
            deadline = time.monotonic() + self.reconnect_wait
            while True:
                try:
                    self._conn = _Connection(self.path, self._name)
                    return self._conn
                except ConnectionError as exc:
                    if time.monotonic() >= deadline or isinstance(exc, ServerLost):
                        raise ServerGone(
                            f"the forkserver on {self.path} is gone, and none listened there again "
                            f"within {self.reconnect_wait:g} s; start one with "
                            "`python -m forkserver_rs serve --socket PATH`"
                        ) from exc
                    time.sleep(0.02)

    def _request(self, message, fds=()):
        """Sends `message` and returns the reply, with the connection it came
        on. A send that finds the connection closed goes again on a new one
        (the old server never read it); a request the server took and did
        not answer is not sent again (it may have acted on it)."""
        conn = self._connection()
        message["id"] = conn._new_id()
        try:
            conn._send(message, fds)
        except (BrokenPipeError, ConnectionResetError):
            conn = self._connection(dead=conn)
            message["id"] = conn._new_id()
            conn._send(message, fds)
        reply, reply_fds = conn._answer(message["id"])
        return reply, reply_fds, conn

    # -- requests -----------------------------------------------------------

    def status(self):
        """The server's status map (pid, modules, children, pools, ...)."""
        reply, _, _ = self._request({"type": "status"})
        return reply

    def list(self):
        """The server's live children this client may see (all of them for
        root and the server's own uid, else those its uid started), as the
        protocol's maps: ``pid``, ``age_ms``, ``owner_pid``, ``owner_uid``,
        ``owner_connected``, ``detached``, ``target``, ... Every page read."""
        return self._pages({"type": "list"}, "children", "children")

    def kill(self, pid=None, sig=signal.SIGTERM):
        """Sends `sig` to the child `pid`, or to every child this client may
        touch (None), whoever spawned it; returns the pids signalled. A
        child of another uid is refused (ServerError ``denied``) unless this
        client is root or the server's own uid."""
        return self._pages({"type": "kill", "pid": pid, "signal": int(sig)}, "killed", "pids")

    def _pages(self, message, kind, field):
        """The items of an answer that comes in pages (``more``)."""
        reply, _, conn = self._request(message)
        items = []
        while True:
            if reply.get("type") == "error":
                raise ServerError(reply.get("kind"), reply.get("message"))
            if reply.get("type") != kind:
                raise ServerError("protocol", f"expected {kind}, got {reply.get('type')!r}")
            items.extend(reply.get(field, []))
            if not reply.get("more"):
                return items
            reply, _ = conn._answer(message["id"])

    def reload(self):
        """Has the server load its preloads afresh from disk in a new
        generation, and waits until it serves; returns its number. Running
        children and connections are untouched. Root and the server's uid
        only. A reload that fails raises ServerError quoting why (the old
        generation serves on)."""
        reply, _, _ = self._request({"type": "reload"})
        if reply.get("type") == "error":
            raise ServerError(reply.get("kind"), reply.get("message"))
        return reply["generation"]

    def upgrade(self):
        """Upgrades the server in place: it runs its program again (the
        file on disk now) with the same pid, keeping every connection (this
        one too) and every child, and starts a fresh generation; waits until
        the new image serves. Returns ``(version, previous_version)``. Root
        and the server's uid only. If the new program cannot take over,
        raises ServerError saying why, and the old image serves on with
        everything it had."""
        reply, _, _ = self._request({"type": "upgrade"})
        if reply.get("type") == "error":
            raise ServerError(reply.get("kind"), reply.get("message"))
        return reply["version"], reply["previous"]

    def run(self, target, args=(), *, input=None, capture_output=False, timeout=None, check=False,
            **options):
        """Runs a child to completion, as ``subprocess.run``: returns a
        ``subprocess.CompletedProcess``. ``input`` goes to its stdin;
        ``capture_output=True`` pipes stdout and stderr; past ``timeout`` it
        is killed and ``subprocess.TimeoutExpired`` raised; ``check=True``
        raises ``subprocess.CalledProcessError`` for a non-zero status.
        ``options`` are :meth:`spawn`'s."""
        if capture_output:
            if options.get("stdout") is not None or options.get("stderr") is not None:
                raise ValueError("stdout and stderr arguments may not be used with capture_output.")
            options["stdout"] = options["stderr"] = subprocess.PIPE
        if input is not None:
            if options.get("stdin") is not None:
                raise ValueError("stdin and input arguments may not both be used.")
            options["stdin"] = subprocess.PIPE
        with self.spawn(target, args, **options) as child:
            try:
                stdout, stderr = child.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                raise
        completed = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
        if check:
            completed.check_returncode()
        return completed

    def check_output(self, target, args=(), *, timeout=None, **options):
        """A child's stdout, as ``subprocess.check_output``: it must exit 0
        (else ``subprocess.CalledProcessError``)."""
        if "stdout" in options:
            raise ValueError("stdout argument not allowed, it will be overridden.")
        return self.run(target, args, stdout=subprocess.PIPE, timeout=timeout, check=True, **options).stdout

    def spawn(
        self,
        target,
        args=(),
        kwargs=None,
        *,
        stdin=None,
        stdout=None,
        stderr=None,
        pass_fds=(),
        env=None,
        env_clear=None,
        cwd=None,
        text=False,
        detach=False,
        new_session=True,
        die_with_server=False,
        server_env=False,
        server_cwd=False,
        server_umask=False,
        server_signals=False,
        restore_signals=True,
        rlimits=None,
        nice=None,
        cpus=None,
        oom_score_adj=None,
        cgroup=None,
        pty=None,
    ):
        """Starts a child and returns its :class:`Child`, like
        ``subprocess.Popen``.

        ``target`` is a program (``"ls"``, a path, or a list
        ``["ls", "-l"]`` whose tail is prepended to ``args``), or
        ``"py:MODULE:FUNCTION"``: the server forks itself and calls
        ``MODULE.FUNCTION(*args, **kwargs)`` (values that MessagePack
        carries); its return value is the exit status, as with
        ``sys.exit``. A :class:`Worker` names any other worker the server
        offers (a Rust zygote's embedded workers, ``MODULE:SYMBOL`` of a
        dynamic module).

        ``stdin``/``stdout``/``stderr``: None (the default) gives the child
        ours, ``PIPE`` a pipe (the :class:`Child` gets our end),
        ``DEVNULL`` /dev/null, an fd or a file object that fd;
        ``stderr=STDOUT`` shares stdout's. ``pass_fds``: fds installed at
        the same numbers in the child. ``detach``: the child outlives this
        connection (otherwise closing it stops the child).

        The child starts as if this process had started it, as with
        ``subprocess.Popen``: with ``os.environ`` (or ``env``, the whole
        environment, when given), in this process's working directory (passed
        as a directory fd; a relative ``cwd`` is relative to it) and with its
        umask. ``rlimits`` maps resource names (``"NOFILE"``, as prlimit(1)
        has them) to ``(soft, hard)`` (None: unlimited); ``nice``, ``cpus``
        (CPU numbers) and ``oom_score_adj`` set those for the child; a
        non-root caller may not ask for more than it has. ``cgroup``: a
        cgroup v2 directory the child is created in (the caller must be able
        to write its ``cgroup.procs``). ``pty=(rows, cols)``: the child gets
        a terminal of its own as its stdin, stdout and stderr; its master end
        is ``child.pty``. With
        ``env_clear=False``, ``env`` holds changes instead (a
        None value removes a variable). ``server_env=True`` starts from the
        server's environment rather than ``os.environ``; ``server_cwd=True`` the server's directory (a relative
        ``cwd`` is then relative to it); ``server_umask=True`` the server's
        umask.

        Signals, as ``subprocess.Popen`` has them: the child blocks what the
        calling thread blocks and ignores what this process ignores, except
        SIGPIPE and SIGXFSZ (which Python ignores for itself) when
        ``restore_signals`` is true, the default. ``server_signals=True``
        starts it with nothing blocked and nothing ignored.
        """
        if isinstance(target, (list, tuple)):
            target, args = target[0], [*target[1:], *args]
        if not isinstance(target, Worker):
            target = os.fspath(target)
        keep_open = []  # our pipe ends the child's stdio uses; closed after the spawn
        fds = []

        def attach(fd):
            fds.append(fd)
            return len(fds) - 1

        def stdio(spec, our_fd, name):
            if spec is None:
                try:
                    os.fstat(our_fd)
                except OSError:  # ours is closed: the child gets /dev/null
                    return {"kind": "null"}
                return {"kind": "fd", "index": attach(our_fd)}
            if spec == PIPE:
                return {"kind": "pipe"}
            if spec == DEVNULL:
                return {"kind": "null"}
            if isinstance(spec, int) and spec >= 0:
                return {"kind": "fd", "index": attach(spec)}
            if hasattr(spec, "fileno"):
                return {"kind": "fd", "index": attach(spec.fileno())}
            raise ValueError(f"{name}: expected None, PIPE, DEVNULL, an fd or a file, got {spec!r}")

        message = {"type": "spawn", "new_session": new_session}
        if isinstance(target, Worker):
            if args or kwargs:
                raise TypeError("a Worker carries its own args and payload")
            message["target"] = target._wire()
        elif isinstance(target, str) and target.startswith("py:"):
            payload = {"args": list(args)}
            if kwargs:
                payload["kwargs"] = dict(kwargs)
            message["target"] = {"kind": "worker", "name": target, "payload": payload}
        else:
            if kwargs:
                raise TypeError("kwargs are only for py:MODULE:FUNCTION targets")
            message["target"] = {
                "kind": "exec",
                "program": _os_string(target),
                "args": [_os_string(a) for a in args],
            }
        shared_stdout = None
        if stderr == STDOUT:
            if stdout == PIPE:
                # One pipe for both: made here, since the server makes one per stream.
                read_end, write_end = os.pipe()
                keep_open.append(write_end)
                shared_stdout = read_end
                stdout = stderr = write_end
            else:
                stderr = stdout if stdout is not None else 1
        if pty is not None:
            message["pty"] = {"rows": pty[0], "cols": pty[1]}
            stdin = stdout = stderr = DEVNULL
        message["stdin"] = stdio(stdin, 0, "stdin")
        message["stdout"] = stdio(stdout, 1, "stdout")
        message["stderr"] = stdio(stderr, 2, "stderr")
        message["fds"] = [{"index": attach(fd), "target": fd} for fd in pass_fds]
        message.update(_environment(env, env_clear, server_env))
        if not server_cwd:
            here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            keep_open.append(here)
            message["cwd_fd"] = attach(here)
        if not (server_umask and server_signals):
            umask, blocked, ignored = _own_status()
            if not server_umask:
                if umask is None:
                    raise OSError("this kernel does not show the umask; pass server_umask=True")
                message["umask"] = umask
            if not server_signals:
                if restore_signals:
                    ignored = [s for s in ignored if s not in _RESTORED_SIGNALS]
                message["signal_mask"] = blocked
                message["ignored_signals"] = ignored
        if cwd is not None:
            message["cwd"] = _os_string(cwd)
        if rlimits:
            message["rlimits"] = [
                {"resource": name, "soft": soft, "hard": hard}
                for name, (soft, hard) in rlimits.items()
            ]
        if nice is not None:
            message["nice"] = nice
        if cgroup is not None:
            directory = os.open(cgroup, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            keep_open.append(directory)
            message["cgroup"] = attach(directory)
        if cpus is not None:
            message["cpus"] = list(cpus)
        if oom_score_adj is not None:
            message["oom_score_adj"] = oom_score_adj
        if detach:
            message["on_disconnect"] = "detach"
        if die_with_server:
            message["die_with_server"] = True
        try:
            reply, reply_fds, conn = self._request(message, fds)
        except BaseException:
            if shared_stdout is not None:
                os.close(shared_stdout)
            raise
        finally:
            for fd in keep_open:
                os.close(fd)
        if reply.get("type") == "spawned":
            child = Child(conn, reply, reply_fds, shared_stdout, text)
            child.args = [target, *args]
            return child
        if shared_stdout is not None:
            os.close(shared_stdout)
        for fd in reply_fds:
            os.close(fd)
        if reply.get("type") == "spawn_failed":
            kind = reply.get("kind")
            program = target if kind == "exec" and not isinstance(target, Worker) else None
            raise _spawn_error(kind, reply.get("errno"), reply.get("message"), program)
        raise ServerError(reply.get("kind", "protocol"), reply.get("message", repr(reply)))


def _returncode(status):
    """Popen's convention: the exit code, or -N for death by signal N."""
    if "code" in status:
        return status["code"]
    return -status["signal"]


class Child:
    """A running child, like ``subprocess.Popen``: ``pid``, ``pidfd``,
    ``stdin``/``stdout``/``stderr`` (for pipes), ``returncode``, and
    ``poll``, ``wait``, ``communicate``, ``send_signal``, ``terminate``,
    ``kill``. Its exit status comes from the server, which reaps it."""

    def __init__(self, conn, reply, fds, shared_stdout, text):
        self._conn = conn
        self._id = reply["id"]
        self.pid = reply["pid"]
        self.pidfd = fds[reply["pidfd"]]
        self.returncode = None
        # Why the exit status is unknown, if the server was lost first.
        self.server_lost = None

        def stream(index, mode):
            if index is None:
                return None
            raw = open(fds[index], mode + "b", buffering=0 if mode == "w" else -1)
            return io.TextIOWrapper(raw, write_through=True) if text else raw

        self.stdin = stream(reply.get("stdin"), "w")
        self.stdout = stream(reply.get("stdout"), "r")
        self.stderr = stream(reply.get("stderr"), "r")
        # The master end of the child's terminal, if it asked for one.
        self.pty = None if reply.get("pty") is None else open(fds[reply["pty"]], "r+b", buffering=0)
        if shared_stdout is not None:
            raw = open(shared_stdout, "rb")
            self.stdout = io.TextIOWrapper(raw) if text else raw

    def __repr__(self):
        return f"<forkserver_rs.Child pid={self.pid} returncode={self.returncode}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self.wait()

    def __del__(self):
        pidfd = getattr(self, "pidfd", None)
        if pidfd is not None:
            os.close(pidfd)
            self.pidfd = None

    def _collect(self):
        """Takes this child's exit status from the client once its report
        has come; True once the child has a return code. Called with the
        client's condition held (as `_wait_for` calls it), so two threads
        that poll or wait on one child at once (multiprocessing's pool does)
        cannot both take the status: the second sees the first's return
        code instead of waiting for a report that was already taken."""
        if self.returncode is None:
            status = self._conn._exits.pop(self._id, None)
            if status is not None:
                self.returncode = _returncode(status)
        return self.returncode is not None

    def poll(self):
        """The return code if the child has ended, else None. Does not block,
        except for the moment between the child's exit and the server's
        report of it."""
        if self.returncode is None:
            ended = select.select([self.pidfd], [], [], 0)[0] if self.pidfd is not None else True
            # Once the pidfd says the process is gone, the report is on its way.
            self._wait(None if ended else 0)
        return self.returncode

    def wait(self, timeout=None):
        """Waits for the child to end and returns its return code; raises
        ``subprocess.TimeoutExpired`` after `timeout` seconds."""
        if self.returncode is None and not self._wait(timeout):
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
        return self.returncode

    def _wait(self, timeout):
        """Waits up to `timeout` for the exit report. Once the server is
        lost no report can come: the pidfd alone says when the child ends,
        and its return code is then 255 (`server_lost` says why)."""
        try:
            return self._conn._wait_for(self._collect, timeout)
        except (OSError, ServerError) as exc:
            self.server_lost = exc
            if self.pidfd is None or select.select([self.pidfd], [], [], timeout)[0]:
                self.returncode = 255
                return True
            return False

    def communicate(self, input=None, timeout=None):
        """Writes `input` to stdin (then closes it), reads stdout and stderr
        to their ends, waits; returns ``(stdout, stderr)``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks = {s: [] for s in (self.stdout, self.stderr) if s is not None}
        reading = set(chunks)
        pending = b"" if input is None else (input.encode() if isinstance(input, str) else input)
        writer = self.stdin
        if writer is not None and not pending:
            writer.close()
            writer = None
        while reading or writer is not None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            writers = [writer] if writer is not None else []
            readable, writable, _ = select.select(list(reading), writers, [], remaining)
            for stream in readable:
                chunk = os.read(stream.fileno(), 65536)
                if chunk:
                    chunks[stream].append(chunk)
                else:
                    reading.discard(stream)
            if writable:
                try:
                    pending = pending[os.write(writer.fileno(), pending[:65536]) :]
                except BrokenPipeError:
                    pending = b""
                if not pending:
                    writer.close()
                    writer = None
        outputs = []
        for stream in (self.stdout, self.stderr):
            data = None if stream is None else b"".join(chunks[stream])
            if data is not None and isinstance(stream, io.TextIOWrapper):
                data = data.decode(stream.encoding)
            outputs.append(data)
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
        return tuple(outputs)

    def send_signal(self, sig):
        """Sends `sig` through the pidfd (never to a recycled pid); a no-op
        once the child has ended."""
        if self.returncode is not None or self.pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass  # it has exited; the server will report it

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def _environment(env, env_clear, server_env):
    """The spawn fields for the child's environment: ``env`` is the whole
    environment unless ``env_clear`` is False (then it holds changes: None
    removes a variable) to ``os.environ``, or to the server's with
    ``server_env``."""
    whole = env is not None and env_clear is not False
    changes = {} if whole or env is None else env
    if server_env and not whole:
        fields = {"env_clear": bool(env_clear)}
    else:
        base = dict(env) if whole else {} if env_clear else dict(os.environ)
        base.update(changes)
        changes = {k: v for k, v in base.items() if v is not None}
        fields = {"env_clear": True}
    if changes:
        fields["env"] = {
            _os_string(k): (None if v is None else _os_string(v)) for k, v in changes.items()
        }
    return fields


# What subprocess.Popen's restore_signals puts back at their defaults.
_RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


def _own_status():
    """(umask, blocked signals, ignored signals) of the calling thread, read
    without changing any of them from /proc/thread-self/status (the umask
    needs Linux 4.7+; None without it), in one read of the whole file (no
    file object: this runs on every spawn)."""
    fd = os.open("/proc/thread-self/status", os.O_RDONLY | os.O_CLOEXEC)
    try:
        text = os.read(fd, 4096)
    finally:
        os.close(fd)
    fields = {}
    for line in text.split(b"\n"):
        name, _, value = line.partition(b":")
        if name in (b"Umask", b"SigBlk", b"SigIgn"):
            fields[name] = value.strip()

    def signals(name):
        bits = int(fields[name], 16)
        return [n for n in range(1, 65) if bits >> (n - 1) & 1]

    umask = int(fields[b"Umask"], 8) if b"Umask" in fields else None
    return umask, signals(b"SigBlk"), signals(b"SigIgn")
