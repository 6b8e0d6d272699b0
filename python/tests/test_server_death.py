"""A server that dies: the client connects to the next one on its socket, a
context starts a new private server with the same settings, and the
children of the lost server follow their pidfds to a return code of 255."""

import os
import signal
import subprocess
import sys
import time

import forkserver_rs
from conftest import run_script, wait_until


def test_a_client_outlives_its_server(start_server):
    first = start_server()
    assert first.ready, first.failure()
    client = forkserver_rs.Client(first.socket, reconnect_wait=0.3)
    orphan = client.spawn(["sleep", "30"], detach=True)
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait()
    # Still running, so not ended: the lost server's report cannot come,
    # and the pidfd says it runs.
    assert orphan.poll() is None
    assert isinstance(orphan.server_lost, forkserver_rs.ServerLost)
    # No server yet: the next request waits a little, then says so.
    started = time.monotonic()
    try:
        client.status()
        raise AssertionError("a request with no server must fail")
    except forkserver_rs.ServerGone as exc:
        assert "forkserver_rs serve --socket" in str(exc)
    assert time.monotonic() - started >= 0.3
    # A new server on the socket: the same client uses it.
    second = start_server(socket=first.socket)
    assert second.ready, second.failure()
    assert client.status()["pid"] == second.pid
    assert client.run(["true"]).returncode == 0
    # The orphan still takes signals through its pidfd, and then ends 255.
    orphan.kill()
    assert orphan.wait(10) == 255
    client.close()


def test_a_private_server_killed_during_a_pool_map_is_replaced(tmp_path):
    done = run_script(tmp_path, "private.py", """
        import os, signal, time
        import forkserver_rs

        def slow_square(x):
            time.sleep(0.05)
            return x * x

        if __name__ == "__main__":
            ctx = forkserver_rs.get_context(preload=["json"])
            with ctx.Pool(4) as pool:
                server = ctx.client().status()["pid"]
                result = pool.map_async(slow_square, range(40))
                time.sleep(0.3)
                workers = [p.pid for p in pool._pool]
                os.kill(server, signal.SIGKILL)
                assert result.get(60) == [x * x for x in range(40)]
                # Its workers outlive the server (detached): the pool keeps
                # them, as their pidfds say they run.
                assert [p.pid for p in pool._pool] == workers
                assert all(p.is_alive() for p in pool._pool)
                # The pool keeps its workers that still live, and starts
                # what it needs through a new server.
                assert pool.map(slow_square, range(8)) == [x * x for x in range(8)]
            new_server = ctx.client().status()["pid"]
            assert new_server != server
            with ctx.Pool(2) as pool:
                assert pool.map(abs, [-1, -2]) == [1, 2]
            fresh = forkserver_rs.get_context(preload=["json"])
            with fresh.Pool(2) as pool:
                assert pool.map(abs, [-3]) == [3]
            print("done", flush=True)
    """)
    assert done.stdout.strip() == "done"
    assert "Traceback" not in done.stderr, done.stderr
    assert "BrokenPipeError" not in done.stderr, done.stderr


def test_a_shared_server_restarted_is_used_by_the_next_start(start_server, tmp_path):
    first = start_server("--preload", "json", "--allow-dormant-threads")
    assert first.ready, first.failure()
    # A file, not `-c`: the pool's children import the parent's main module.
    script = tmp_path / "shared.py"
    script.write_text(f"""
import sys
import forkserver_rs

def parent():
    import os
    return os.getppid()

if __name__ == "__main__":
    ctx = forkserver_rs.get_context(socket={first.socket!r})
    for line in sys.stdin:
        with ctx.Pool(1) as pool:
            print(pool.apply(parent), flush=True)
""")
    done = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    done.stdin.write("go\n")
    done.stdin.flush()
    assert int(done.stdout.readline()) == first.pid
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait()
    second = start_server("--preload", "json", "--allow-dormant-threads", socket=first.socket)
    assert second.ready, second.failure()
    done.stdin.write("go\n")
    done.stdin.flush()
    assert int(done.stdout.readline()) == second.pid
    done.stdin.close()
    assert done.wait(30) == 0


def test_nothing_waits_for_ever_on_a_lost_server(start_server):
    server = start_server()
    assert server.ready, server.failure()
    with forkserver_rs.Client(server.socket, reconnect_wait=0) as client:
        child = client.spawn(["sleep", "0.5"])
        os.kill(server.pid, signal.SIGKILL)
        assert wait_until(lambda: child.poll() is not None, timeout=10)
        assert child.returncode == 255
