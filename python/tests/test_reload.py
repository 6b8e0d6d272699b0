"""Reload in a Python server started as every context's is (with
``--allow-dormant-threads``): a preloaded module edited on disk is reported
stale, ``python -m forkserver_rs reload`` imports it afresh in a new
generation, and a worker started before the reload finishes with the code
it started with."""

import subprocess
import sys

import pytest

import forkserver_rs
from conftest import wait_until

SOURCE = '''
import sys

VERSION = {version!r}


def show():
    print(VERSION)


def show_after_stdin():
    sys.stdin.read()
    print(VERSION)
'''


@pytest.fixture
def versioned(start_server, tmp_path, monkeypatch):
    """A server started as every context's is, preloading `versioned` from a
    directory of the test's; (server, the module's file)."""
    code = tmp_path / "code"
    code.mkdir()
    module = code / "versioned.py"
    module.write_text(SOURCE.format(version="one"))
    monkeypatch.setenv("PYTHONPATH", str(code))
    server = start_server("--preload", "versioned", "--allow-dormant-threads")
    assert server.ready, server.failure()
    return server, module


def test_an_edited_preload_is_stale_until_a_reload_and_a_running_worker_keeps_its_code(versioned):
    server, module = versioned
    zygote = server.zygote()
    assert zygote is not None, "a server that tolerates threads splits too"

    def version(client):
        child = client.spawn("py:versioned:show", stdout=subprocess.PIPE)
        out, _ = child.communicate(timeout=30)
        assert child.returncode == 0
        return out

    with forkserver_rs.Client(server.socket) as client:
        assert version(client) == b"one\n"
        before = client.spawn("py:versioned:show_after_stdin", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        # A different size, so that no cached bytecode passes for it.
        module.write_text(SOURCE.format(version="second"))
        assert wait_until(lambda: client.status()["stale"] == [str(module)], timeout=15), client.status()
        assert client.status()["generation"] == 1

        done = subprocess.run(
            [sys.executable, "-m", "forkserver_rs", "reload", "--socket", server.socket],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        status = client.status()
        assert (status["generation"], status["stale"], status["pid"]) == (2, [], server.pid)
        assert server.zygote() not in (None, zygote)

        assert version(client) == b"second\n"
        out, _ = before.communicate(b"", timeout=30)
        assert (out, before.returncode) == (b"one\n", 0)


def test_a_reload_whose_import_fails_says_why_and_the_old_generation_serves_on(versioned):
    server, module = versioned
    module.write_text("import no_such_module_for_reload\n")

    done = subprocess.run(
        [sys.executable, "-m", "forkserver_rs", "reload", "--socket", server.socket],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "no_such_module_for_reload" in done.stderr, done.stderr
    with forkserver_rs.Client(server.socket) as client:
        status = client.status()
        assert status["generation"] == 1
        assert "no_such_module_for_reload" in status["reload_failure"]
        child = client.spawn("py:versioned:show", stdout=subprocess.PIPE)
        assert child.communicate(timeout=30)[0] == b"one\n"


def test_an_upgrade_in_place_keeps_the_pid_the_connection_and_a_running_worker(versioned):
    server, module = versioned
    zygote = server.zygote()
    with forkserver_rs.Client(server.socket) as client:
        before = client.spawn("py:versioned:show_after_stdin", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        module.write_text(SOURCE.format(version="second"))

        done = subprocess.run(
            [sys.executable, "-m", "forkserver_rs", "reload", "--exec", "--socket", server.socket],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "upgraded in place" in done.stdout
        # The same process, on the same connection, with a new generation.
        status = client.status()
        assert (status["pid"], status["generation"]) == (server.pid, 2)
        assert server.zygote() not in (None, zygote)
        child = client.spawn("py:versioned:show", stdout=subprocess.PIPE)
        assert child.communicate(timeout=30)[0] == b"second\n"
        out, _ = before.communicate(b"", timeout=30)
        assert (out, before.returncode) == (b"one\n", 0)
