"""`python -m forkserver_rs serve`: preload failures and the thread guard."""

import subprocess
import sys
import time

import forkserver_rs
from conftest import wait_until


def test_a_missing_preload_fails_the_start_naming_the_module(start_server):
    server = start_server("--preload", "json,no_such_module_anywhere")
    assert not server.ready
    code, stderr = server.failure()
    assert code == 1
    assert "preloading module 'no_such_module_anywhere' failed" in stderr
    assert "ModuleNotFoundError: No module named 'no_such_module_anywhere'" in stderr


def test_a_preload_that_raises_fails_the_start_with_its_exception(start_server):
    server = start_server("--preload", "fails_to_import")
    code, stderr = server.failure()
    assert code == 1
    assert "preloading module 'fails_to_import' failed: RuntimeError: this module refuses to be imported" in stderr
    assert "Traceback" in stderr  # the whole traceback, for the operator


def test_a_python_thread_started_by_a_preload_is_named_and_refused(start_server):
    server = start_server("--preload", "starts_thread")
    code, stderr = server.failure()
    assert code == 1
    assert "importing 'starts_thread' started the Python thread 'starts-thread-waiter'" in stderr
    assert "refusing to serve: preloading module 'starts_thread' started threads" in stderr
    assert "deadlock" in stderr and "--allow-dormant-threads" in stderr


def test_a_dormant_thread_that_wakes_now_and_then_is_tolerated(start_server, monkeypatch):
    """The thread sleeps through the preloads, then wakes every few
    milliseconds; each fork waits until it has been asleep for a moment and
    goes ahead. (A thread that keeps running, or a new one, is refused: the
    Rust fixture tests that, tests/zygote.rs, since a Python thread cannot
    run at all while the server holds the GIL.)"""
    monkeypatch.setenv("WAKES_LATER_SECONDS", "1")
    server = start_server("--preload", "workers,wakes_later", "--allow-dormant-threads")
    assert server.ready, server.failure()
    with forkserver_rs.Client(server.socket) as client:
        assert client.spawn("py:workers:exit_with", args=[4]).wait(10) == 4
        time.sleep(1.5)  # the thread now wakes every 5 ms
        for i in range(20):
            assert client.spawn("py:workers:exit_with", args=[i]).wait(10) == i
    log = server.stop()
    assert "tolerating 1 dormant thread(s)" in log, log


def test_numpy_threads_are_stopped_by_their_fork_handler(start_server):
    """OpenBLAS starts a thread pool when numpy is imported and stops it in a
    pthread_atfork handler: after the guard's test fork the server is single
    threaded again, so no flag is needed, and workers use numpy."""
    server = start_server("--preload", "numpy")
    assert server.ready, server.failure()
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn("py:workers:numpy_dot", args=[[1, 2, 3], [4, 5, 6]])
        assert child.wait(10) == 32  # the dot product, as the exit status
    log = server.stop()
    assert "stopped by their library's fork handler (pthread_atfork)" in log


def test_serve_help_lists_preload_and_the_serve_flags():
    out = subprocess.run(
        [sys.executable, "-m", "forkserver_rs", "serve", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout
    for flag in ("--preload", "--socket", "--allow-dormant-threads", "--lifeline-fd", "--pool"):
        assert flag in out


def test_a_pool_of_python_workers(start_server):
    server = start_server("--preload", "workers", "--pool", "py:workers:exit_with=2")
    assert server.ready, server.failure()
    with forkserver_rs.Client(server.socket) as client:
        assert wait_until(lambda: client.status()["pools"][0]["idle"] == 2)
        assert [client.spawn("py:workers:exit_with", args=[i]).wait(10) for i in (1, 2, 3)] == [1, 2, 3]
        assert client.status()["pools"][0]["hits"] >= 2


RELOADABLE = '''
import sys

VERSION = {version!r}


def version():
    print(VERSION, flush=True)


def version_after_stdin():
    sys.stdin.read()
    print(VERSION, flush=True)
'''


def reload_cli(server):
    return subprocess.run([sys.executable, "-m", "forkserver_rs", "reload", "--socket", server.socket],
                          capture_output=True, text=True, timeout=60)


def test_a_reload_imports_the_code_on_disk_and_a_running_worker_keeps_the_old(start_server, tmp_path,
                                                                              monkeypatch):
    module = tmp_path / "edited_on_disk.py"
    module.write_text(RELOADABLE.format(version="old"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    server = start_server("--preload", "workers,edited_on_disk")
    assert server.ready, server.failure()
    with forkserver_rs.Client(server.socket) as client:
        assert client.check_output("py:edited_on_disk:version") == b"old\n"
        first_zygote = server.zygote()
        running = client.spawn("py:edited_on_disk:version_after_stdin", stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE)
        module.write_text(RELOADABLE.format(version="the new one"))
        # The server notices the preloaded module changed on disk.
        assert wait_until(lambda: client.status()["stale"] == [str(module)]), client.status()
        done = reload_cli(server)
        assert done.returncode == 0, done.stderr
        assert "generation 2 serves" in done.stdout
        # New workers import the new code, from a new zygote; the server is
        # the same process, on the same connection.
        assert client.check_output("py:edited_on_disk:version") == b"the new one\n"
        assert server.zygote() not in (None, first_zygote)
        assert client.status()["pid"] == server.pid
        assert client.status()["stale"] == []
        # The worker started before the reload finishes with the old code.
        out, _ = running.communicate(b"", timeout=20)
        assert (out, running.returncode) == (b"old\n", 0)

        # New code that fails to import: the reload fails, quoting why, and
        # the generation before serves on.
        module.write_text("raise ImportError('the edited module is broken')\n")
        done = reload_cli(server)
        assert done.returncode == 1, done
        assert "the edited module is broken" in done.stderr
        assert "generation 2 serves on" in done.stderr
        assert client.check_output("py:edited_on_disk:version") == b"the new one\n"
        assert "the edited module is broken" in client.status()["reload_failure"]
    log = server.stop()
    assert "ImportError: the edited module is broken" in log, log
