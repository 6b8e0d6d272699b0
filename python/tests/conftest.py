"""Fixtures: real servers (`python -m forkserver_rs serve`) on sockets in a
temporary directory, started and stopped around each test that needs one."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

try:
    import forkserver_rs._native  # noqa: F401 (the server the tests start)
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "forkserver is not built: run tests/all.sh, or `pip install ./python` "
        "(then run pytest from the repository root, not from python/)"
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


class Server:
    """A `python -m forkserver_rs serve` process; `start` waits for its
    --ready-fd line, or returns its exit status and stderr if it fails."""

    def __init__(self, socket, args):
        self.socket = socket
        read_end, write_end = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "forkserver_rs", "serve", "--socket", socket,
             "--ready-fd", str(write_end), *args],
            pass_fds=(write_end,),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # The test helpers (workers.py, ...) are importable by the server,
            # and so is what a test puts on PYTHONPATH.
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))},
            cwd=HERE,
        )
        os.close(write_end)
        with os.fdopen(read_end, "rb") as ready:
            self.ready = ready.read().startswith(b"ready")
        self.pid = self.process.pid

    def stop(self):
        """SIGTERM, wait, and return everything it logged."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, stderr = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        return stderr.decode(errors="replace")

    def failure(self):
        """For a server that did not start: (exit status, stderr)."""
        _, stderr = self.process.communicate(timeout=60)
        return self.process.returncode, stderr.decode(errors="replace")

    def _children(self):
        """(pid, name, state) of every child of the server (live or zombie)."""
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        head, rest = stat.read().rsplit(")", 1)
                except OSError:
                    continue
                fields = rest.split()
                if int(fields[1]) == self.pid:
                    yield int(entry), head.split("(", 1)[1], fields[0]

    def children(self):
        """(pid, state) of the children the server made (live or zombie):
        every child of the server but its zygote (which preloads)."""
        return [(pid, state) for pid, name, state in self._children() if name != "zygote"]

    def zygote(self):
        """The pid of the server's zygote, if it has one."""
        return next((pid for pid, name, _ in self._children() if name == "zygote"), None)


@pytest.fixture
def start_server(tmp_path):
    """start_server(*serve_flags, socket=None) -> Server (ready or not), on
    `socket` or a new one; all are stopped at the end of the test."""
    started = []

    def start(*args, socket=None):
        server = Server(socket or str(tmp_path / f"fs{len(started)}.sock"), args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server):
    """A ready server that preloaded the `workers` test module."""
    running = start_server("--preload", "workers")
    assert running.ready, running.failure()
    return running


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def run_script(directory, name, source, *args, expect_exit=0):
    """Writes `source` (dedented) to DIRECTORY/NAME, runs it with this
    Python in `directory`, asserts it exited `expect_exit` (0; -N for death
    by signal N), and returns the result (text stdout and stderr)."""
    script = directory / name
    script.write_text(textwrap.dedent(source))
    done = subprocess.run([sys.executable, "-X", "dev", "-W", "error::ResourceWarning", str(script), *args],
                          capture_output=True, text=True,
                          timeout=60, cwd=directory)
    assert done.returncode == expect_exit, done.stderr
    return done
