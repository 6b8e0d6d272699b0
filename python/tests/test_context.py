"""forkserver_rs.get_context(): multiprocessing's Process, Pool, Queue and
concurrent.futures' ProcessPoolExecutor with processes our server starts."""

import os
from concurrent.futures import ProcessPoolExecutor

import pytest

import forkserver_rs
from conftest import run_script, wait_until


def square(x):
    return x * x


def whoami(_):
    return os.getpid(), os.getppid()


def put_env(queue, name):
    queue.put((os.environ.get(name), os.getcwd()))


def raise_error():
    raise KeyError("from the child")


def main_thread_clocks(queue):
    import threading
    import time

    # Burn 50 ms of this thread's CPU, then read it two ways: the kernel's
    # "calling thread" clock, and the clock glibc picks by the thread id it
    # caches for pthread_self(), which is what a fork made by hand (not by
    # glibc's fork) could leave as the forker's.
    end = time.thread_time() + 0.05
    while time.thread_time() < end:
        pass
    by_pthread = time.clock_gettime(time.pthread_getcpuclockid(threading.get_ident()))
    queue.put((by_pthread, time.thread_time()))


def exit_with_digest(blob, expected):
    import hashlib

    raise SystemExit(0 if hashlib.sha256(blob).hexdigest() == expected else 3)


@pytest.fixture(scope="module")
def ctx():
    return forkserver_rs.get_context(preload=["json"])


def test_pool_map(ctx):
    with ctx.Pool(4) as pool:
        assert pool.map(square, range(20)) == [x * x for x in range(20)]
        pids = pool.map(whoami, range(8))
    server_pid = ctx.client().status()["pid"]
    # Forked by the server, not by us.
    assert {parent for _, parent in pids} == {server_pid}
    assert os.getpid() not in {pid for pid, _ in pids}


def test_process_queue_environment_and_exit_codes(ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("FS_CONTEXT_VAR", "from the parent")
    monkeypatch.chdir(tmp_path)
    queue = ctx.Queue()
    process = ctx.Process(target=put_env, args=(queue, "FS_CONTEXT_VAR"))
    process.start()
    assert queue.get(timeout=10) == ("from the parent", str(tmp_path))
    process.join(10)
    assert process.exitcode == 0

    failing = ctx.Process(target=raise_error)
    failing.start()
    failing.join(10)
    assert failing.exitcode == 1


def test_a_pooled_child_s_main_thread_is_its_own_for_pthread_functions(ctx):
    # Pool children are made by the server's forker with clone3, not
    # glibc's fork; glibc's cached thread id must still be the child's.
    for _ in range(3):
        queue = ctx.Queue()
        process = ctx.Process(target=main_thread_clocks, args=(queue,))
        process.start()
        by_pthread, by_kernel = queue.get(timeout=10)
        process.join(10)
        assert by_kernel >= 0.05
        assert abs(by_pthread - by_kernel) < 0.02, (by_pthread, by_kernel)


@pytest.mark.parametrize("size", [10, 60_000, 3_000_000])
def test_a_process_object_of_any_size_reaches_the_child(ctx, size):
    # The pickled process object goes through a pipe: what fits before the
    # spawn, the rest after it (a pipe holds 64 KiB).
    import hashlib

    blob = os.urandom(size)
    process = ctx.Process(
        target=exit_with_digest, args=(blob, hashlib.sha256(blob).hexdigest())
    )
    process.start()
    process.join(30)
    assert process.exitcode == 0


def test_terminate_kill_and_sentinel(ctx):
    from multiprocessing.connection import wait

    import time

    sleeper = ctx.Process(target=time.sleep, args=(60,))
    sleeper.start()
    assert sleeper.is_alive()
    assert wait([sleeper.sentinel], timeout=0.1) == []
    sleeper.terminate()
    assert wait([sleeper.sentinel], timeout=10) == [sleeper.sentinel]
    sleeper.join(10)
    assert sleeper.exitcode == -15
    killed = ctx.Process(target=time.sleep, args=(60,))
    killed.start()
    killed.kill()
    killed.join(10)
    assert killed.exitcode == -9
    killed.close()


def test_process_pool_executor(ctx):
    with ProcessPoolExecutor(max_workers=3, mp_context=ctx) as executor:
        assert list(executor.map(square, range(10))) == [x * x for x in range(10)]


def test_a_broken_pool_is_detected(ctx):
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as executor:
        future = executor.submit(os._exit, 3)
        with pytest.raises(BrokenProcessPool):
            future.result(timeout=10)


def test_a_preload_failure_is_an_exception_naming_the_module():
    broken = forkserver_rs.get_context(preload=["no_such_module_for_context"])
    with pytest.raises(RuntimeError) as failure:
        broken.Process(target=print).start()
    message = str(failure.value)
    assert "did not start" in message
    assert "ModuleNotFoundError: No module named 'no_such_module_for_context'" in message


def break_stream(name, how):
    import io
    import sys

    stream = None
    if how == "closed":
        stream = io.StringIO()
        stream.close()
    setattr(sys, name, stream)


@pytest.mark.parametrize("name", ["stdout", "stderr"])
@pytest.mark.parametrize("how", ["None", "closed"])
def test_a_child_that_drops_its_stdio_exits_0(ctx, name, how):
    # As a python child does: the interpreter skips a stream that is None
    # or closed when it flushes at exit (CPython's
    # test_error_on_stdio_flush_2).
    process = ctx.Process(target=break_stream, args=(name, how))
    process.start()
    process.join(10)
    assert process.exitcode == 0


def test_using_a_context_leaves_no_thread_and_no_unclosed_file(tmp_path):
    # What a test runner (CPython's regrtest) checks after every test: no
    # thread left running, no ResourceWarning. The server's output after it
    # is ready reaches our stderr with nothing relaying it.
    done = run_script(tmp_path, "hygiene.py", """
        import threading
        import forkserver_rs

        if __name__ == "__main__":
            ctx = forkserver_rs.get_context(preload=["json"], server_args=("-v",))
            with ctx.Pool(2) as pool:
                assert pool.map(abs, [-1, -2]) == [1, 2]
            left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
            assert not left, left
            print("done", flush=True)
    """)
    assert "ResourceWarning" not in done.stderr, done.stderr
    assert done.stdout.strip() == "done"
    # The -v server logged, after it was ready, the spawns and its stop.
    assert 'spawn 1 of "py:forkserver_rs.context:_start_child"' in done.stderr, done.stderr
    assert "stopped" in done.stderr, done.stderr


def test_the_server_it_started_stops_with_the_parent(tmp_path):
    done = run_script(tmp_path, "parent.py", """
        import forkserver_rs

        def double(x):
            return 2 * x

        if __name__ == "__main__":
            ctx = forkserver_rs.get_context(preload=["json"])
            with ctx.Pool(2) as pool:
                assert pool.map(double, [1, 2, 3]) == [2, 4, 6]
            print(ctx.client().status()["pid"], flush=True)
            # Exit without any cleanup of our own: the lifeline does it.
    """)
    server_pid = int(done.stdout.split()[0])
    assert wait_until(lambda: not os.path.exists(f"/proc/{server_pid}")), "the server outlived its parent"


def test_a_killed_parent_leaves_no_private_directory(tmp_path):
    """SIGKILL leaves the parent no chance to clean up: the server, stopped
    by its lifeline, removes its socket and the private directory."""
    done = run_script(tmp_path, "killed.py", """
        import os, signal
        import forkserver_rs

        if __name__ == "__main__":
            ctx = forkserver_rs.get_context(pool=0)
            status = ctx.client().status()
            print(status["pid"], os.path.dirname(status["socket"]), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """, expect_exit=-9)
    server_pid, directory = done.stdout.split()
    assert wait_until(lambda: not os.path.exists(f"/proc/{server_pid}")), "the server outlived its parent"
    assert wait_until(lambda: not os.path.exists(directory)), f"{directory} is left behind"


def test_a_server_at_a_given_socket_is_used(start_server):
    server = start_server("--preload", "json")
    assert server.ready
    ctx = forkserver_rs.get_context(socket=server.socket)
    with ctx.Pool(2) as pool:
        assert {parent for _, parent in pool.map(whoami, range(4))} == {server.pid}


def test_children_rerun_the_main_script_and_see_it_change(tmp_path):
    """Children re-run the parent's main script as spawn's do (the server
    compiled it once, --precompile); after the script changes on disk, they
    run the new version, as spawn's children would."""
    body = """
        import os, sys, time
        import forkserver_rs

        VALUE = {value}

        def value(_):
            return VALUE

        if __name__ == "__main__":
            ctx = forkserver_rs.get_context()
            with ctx.Pool(1) as pool:
                print(pool.map(value, [0])[0], flush=True)
            text = open(__file__).read().replace("VALUE = {value}", "VALUE = {value} + 1")
            time.sleep(0.01)
            with open(__file__, "w") as me:
                me.write(text)
            with ctx.Pool(1) as pool:
                print(pool.map(value, [0])[0], flush=True)
    """
    done = run_script(tmp_path, "changing_main.py", body.replace("{value}", "10"))
    assert done.stdout.split() == ["10", "11"]


def test_many_starts_leave_no_fds_or_zombies_in_the_server(start_server):
    server = start_server("--preload", "json")
    assert server.ready
    ctx = forkserver_rs.get_context(socket=server.socket)

    def server_fds():
        return sorted(os.listdir(f"/proc/{server.pid}/fd"), key=int)

    with ctx.Pool(2) as pool:  # warm: the connection and the resource tracker exist
        pool.map(square, range(4))
    before = server_fds()
    for _ in range(5):
        with ctx.Pool(4) as pool:
            assert pool.map(square, range(40)) == [x * x for x in range(40)]
    for _ in range(10):
        process = ctx.Process(target=square, args=(3,))
        process.start()
        process.join(10)
        assert process.exitcode == 0
    assert wait_until(lambda: server.children() == []), server.children()
    assert wait_until(lambda: server_fds() == before), (before, server_fds())


def test_an_os_fork_child_of_the_parent_does_not_stop_its_server(tmp_path):
    done = run_script(tmp_path, "forks.py", """
        import os, sys
        import forkserver_rs

        def double(x):
            return 2 * x

        if __name__ == "__main__":
            ctx = forkserver_rs.get_context()
            with ctx.Pool(1) as pool:
                assert pool.map(double, [1]) == [2]
            pid = os.fork()
            if pid == 0:
                sys.exit(0)  # runs the exit handlers, in the child
            os.waitpid(pid, 0)
            # The socket is still there: a new client connects.
            forkserver_rs.Client(ctx.client().path).close()
            with ctx.Pool(1) as pool:
                print(pool.map(double, [21])[0], flush=True)
    """)
    assert done.stdout.split() == ["42"]


def test_forkserver_log_is_honoured_by_the_server_a_context_starts(tmp_path, monkeypatch):
    """FORKSERVER_LOG=debug makes the context's server log every spawn, as
    it does for `forkserver serve`; without it the server logs only
    warnings (it starts with -q)."""
    source = """
        import forkserver_rs

        if __name__ == "__main__":
            ctx = forkserver_rs.get_context(pool=0)
            with ctx.Pool(1) as pool:
                assert pool.apply(abs, (-1,)) == 1
    """
    monkeypatch.setenv("FORKSERVER_LOG", "debug")
    assert " debug " in run_script(tmp_path, "logged.py", source).stderr
    monkeypatch.delenv("FORKSERVER_LOG")
    assert " debug " not in run_script(tmp_path, "quiet.py", source).stderr
