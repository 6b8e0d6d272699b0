"""forkserver_rs.Client against a real server: spawn, wait, kill, exit codes,
exceptions, stdio, fds, environment, and errors that leave the server
serving."""

import errno
import hashlib
import os
import signal
import subprocess
import sys

import pytest

import forkserver_rs
from conftest import run_script, wait_until


def test_exec_with_piped_stdout(server):
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn(["echo", "hello", "world"], stdout=subprocess.PIPE)
        assert child.stdout.read() == b"hello world\n"
        assert child.wait(10) == 0
        assert child.returncode == 0


def test_python_worker_gets_args_and_kwargs(server):
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn(
            "py:workers:args_and_kwargs", args=[1, "two", [3.0]], kwargs={"k": None},
            stdout=subprocess.PIPE,
        )
        out, _ = child.communicate(timeout=10)
        assert out == b"(1, 'two', [3.0]) [('k', None)]\n"
        assert child.returncode == 0


@pytest.mark.parametrize(
    "target, args, code",
    [
        ("py:workers:exit_with", [0], 0),
        ("py:workers:exit_with", [7], 7),
        ("py:workers:exit_with", [300], 300 & 0xFF),
        ("py:workers:sys_exit", [5], 5),
        ("py:workers:add", [1, 2], 0),
        (["sh", "-c", "exit 9"], [], 9),
    ],
)
def test_exit_codes(server, target, args, code):
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn(target, args=args, stdout=subprocess.DEVNULL)
        assert child.wait(10) == code


def test_an_exception_exits_1_with_its_traceback_on_stderr(server):
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn("py:workers:fail", args=["no good"], stderr=subprocess.PIPE)
        _, err = child.communicate(timeout=10)
        assert child.returncode == 1
        assert b"Traceback" in err and b"ValueError: no good" in err


def test_a_non_int_result_is_printed_and_exits_1(server):
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn("py:workers:say", args=["bad input"], stderr=subprocess.PIPE)
        _, err = child.communicate(timeout=10)
        assert (child.returncode, err) == (1, b"bad input\n")


def test_kill_terminate_and_send_signal(server):
    with forkserver_rs.Client(server.socket) as client:
        sleepers = [client.spawn("py:workers:sleep", args=[60]) for _ in range(3)]
        assert all(s.poll() is None for s in sleepers)
        sleepers[0].kill()
        sleepers[1].terminate()
        sleepers[2].send_signal(signal.SIGUSR1)
        assert [s.wait(10) for s in sleepers] == [-signal.SIGKILL, -signal.SIGTERM, -signal.SIGUSR1]
        sleepers[0].kill()  # after the end: a no-op, as with Popen


def test_sigint_raises_keyboard_interrupt_in_a_python_worker(server):
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn("py:workers:sigint_is_keyboard_interrupt")
        assert child.wait(10) == 42


def test_wait_timeout_and_poll(server):
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn("py:workers:sleep", args=[0.5])
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(0.05)
        assert child.poll() is None
        assert wait_until(lambda: child.poll() is not None)
        assert child.returncode == 0


def test_stdin_pipe_and_communicate(server):
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn("py:workers:echo_stdin", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        out, err = child.communicate(b"shout this" * 10000, timeout=10)
        assert out == b"SHOUT THIS" * 10000 and err is None
        assert child.returncode == 0


def test_stderr_to_stdout_shares_one_pipe(server):
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn(
            ["sh", "-c", "echo out; echo err >&2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        out, _ = child.communicate(timeout=10)
        assert sorted(out.split()) == [b"err", b"out"]


def test_pass_fds_env_and_cwd(server, tmp_path):
    read_end, write_end = os.pipe()
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn("py:workers:write_fd", args=[write_end, "through a passed fd"],
                             pass_fds=[write_end])
        os.close(write_end)
        assert child.wait(10) == 0
        assert os.read(read_end, 100) == b"through a passed fd"
        os.close(read_end)
        child = client.spawn(
            "py:workers:environment", args=["FS_TEST_VAR"], env={"FS_TEST_VAR": "set here"},
            env_clear=False, cwd=tmp_path, stdout=subprocess.PIPE,
        )
        out, _ = child.communicate(timeout=10)
        assert out.decode() == f"set here {tmp_path} True\n"


def test_text_mode(server):
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn(["printf", "é\\n"], stdout=subprocess.PIPE, text=True)
        assert child.communicate(timeout=10) == ("é\n", None)


def test_errors_name_the_problem_and_the_server_keeps_serving(server, tmp_path):
    with forkserver_rs.Client(server.socket) as client:
        with pytest.raises(forkserver_rs.SpawnError) as missing_module:
            client.spawn("py:no_such_module_here:main")
        assert missing_module.value.kind == "unknown_worker"
        assert "no Python module named 'no_such_module_here'" in str(missing_module.value)
        with pytest.raises(forkserver_rs.SpawnError, match="has no 'nothing_here'"):
            client.spawn("py:workers:nothing_here")
        with pytest.raises(forkserver_rs.SpawnError, match="not py:MODULE:FUNCTION"):
            client.spawn("py:workers")
        with pytest.raises(forkserver_rs.SpawnError) as missing_program:
            client.spawn("/no/such/program")
        assert missing_program.value.errno == errno.ENOENT
        assert missing_program.value.kind == "exec"
        # As subprocess.Popen raises them: the OSError subclass, naming
        # the program.
        assert isinstance(missing_program.value, FileNotFoundError)
        assert missing_program.value.filename == "/no/such/program"
        assert "'/no/such/program'" in str(missing_program.value)
        plain = tmp_path / "not-executable"
        plain.write_text("")
        with pytest.raises(PermissionError) as not_executable:
            client.spawn(str(plain))
        assert not_executable.value.filename == str(plain)
        # The same connection still works.
        assert client.spawn("py:workers:exit_with", args=[3]).wait(10) == 3


def test_no_server_is_a_clear_connection_error(tmp_path):
    with pytest.raises(ConnectionError, match="no forkserver is listening on .*python -m forkserver_rs serve"):
        forkserver_rs.Client(str(tmp_path / "nothing.sock"))


def test_children_are_reaped_and_killed_when_the_client_goes(server):
    client = forkserver_rs.Client(server.socket)
    for _ in range(5):
        assert client.spawn("py:workers:exit_with", args=[0]).wait(10) == 0
    sleeper = client.spawn("py:workers:sleep", args=[60])
    assert wait_until(lambda: [pid for pid, _ in server.children()] == [sleeper.pid])
    client.close()  # not detached: the server stops it
    assert wait_until(lambda: server.children() == []), server.children()


def test_status_lists_the_preload_and_the_family(server):
    with forkserver_rs.Client(server.socket) as client:
        status = client.status()
        assert [m["name"] for m in status["modules"]] == ["workers"]
        assert status["workers"] == ["py:*"]
        assert status["pid"] == server.pid


def test_concurrent_waits_from_threads_share_one_connection(server):
    import threading

    with forkserver_rs.Client(server.socket) as client:
        children = [client.spawn("py:workers:exit_with", args=[i]) for i in range(16)]
        codes = {}

        def wait(child, i):
            codes[i] = child.wait(10)

        threads = [threading.Thread(target=wait, args=(c, i)) for i, c in enumerate(children)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert codes == {i: i for i in range(16)}


def test_a_poll_does_not_wait_for_another_thread_s_wait(server):
    # multiprocessing's Process.start polls every child (process._cleanup)
    # while another thread may be in join(): found by Dask under -X dev.
    import threading
    import time

    with forkserver_rs.Client(server.socket) as client:
        long = client.spawn([sys.executable, "-c", "import time; time.sleep(3)"])
        running = client.spawn([sys.executable, "-c", "import time; time.sleep(60)"])
        waiter = threading.Thread(target=long.wait, args=(10,))
        waiter.start()
        time.sleep(0.3)  # the waiter is now the connection's reader, blocked
        started = time.monotonic()
        assert running.poll() is None
        assert time.monotonic() - started < 1.0, "poll() waited for the other thread's wait()"
        running.kill()
        assert running.wait(10) == -9
        waiter.join(10)
        assert long.returncode == 0


def test_threads_polling_one_child_all_see_its_return_code(server):
    # multiprocessing's pool polls a worker from its worker-handler thread
    # while the main thread polls the same worker (is_alive): the thread
    # that lost the race for the exit report once waited for it forever
    # (CPython's test_pool_worker_lifetime hung so).
    import socket
    import threading

    with forkserver_rs.Client(server.socket) as client:
        for round in range(20):
            child = client.spawn("py:workers:exit_with", args=[round % 7])
            seen = []

            def poll_until_ended(child=child, seen=seen):
                while child.poll() is None:
                    pass
                seen.append(child.returncode)

            threads = [threading.Thread(target=poll_until_ended, daemon=True) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            if any(t.is_alive() for t in threads):
                client._conn._sock.shutdown(socket.SHUT_RDWR)  # frees the stuck thread
                pytest.fail(f"round {round}: a poll() never returned after the child ended")
            assert seen == [round % 7] * 4


def test_a_worker_is_a_fork_of_the_warm_server(server):
    """The preloaded module was imported once, in the server's zygote (the
    process that runs the preloads; the server itself never imports them):
    the worker's copy remembers the zygote's pid, and the server is its
    parent."""
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn("py:workers:where_loaded", stdout=subprocess.PIPE)
        out, _ = child.communicate(timeout=10)
        assert out.decode().split() == [str(server.zygote()), str(server.pid)]


def test_a_closed_stdio_of_ours_becomes_dev_null_for_the_child(server, tmp_path):
    done = run_script(tmp_path, "closed_stdout.py", """
        import os, sys, forkserver_rs
        with forkserver_rs.Client(sys.argv[1]) as client:
            os.close(1)
            show = "import os, sys; sys.stderr.write(os.readlink('/proc/self/fd/1'))"
            child = client.spawn([sys.executable, '-c', show], stderr=2)
            sys.exit(child.wait(10))
    """, server.socket)
    assert done.stderr == "/dev/null"


def test_a_rust_zygote_s_embedded_worker(tmp_path):
    """Worker(NAME) starts any worker a server offers: here the Rust test
    zygote's (built by cargo's tests), with string args and a payload."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(root, "target")
    zygote = os.path.join(root, target, "debug", "examples", "test_zygote")
    if not os.path.exists(zygote):
        pytest.skip(f"needs the Rust test zygote at {zygote}: cargo build --example test_zygote")
    socket_path = str(tmp_path / "zygote.sock")
    server = subprocess.Popen([zygote, "--socket", socket_path, "-q"], stdin=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: os.path.exists(socket_path))
        with forkserver_rs.Client(socket_path) as client:
            assert "args" in client.welcome["workers"]
            child = client.spawn(forkserver_rs.Worker("args", ["one", "two"]), stdout=subprocess.PIPE)
            out, _ = child.communicate(timeout=10)
            assert (child.returncode, out) == (2, b"one two\n")  # it exits with len(args)
            order = {"customer": "ada", "lines": [], "tags": {"rush": 1}, "note": None}
            child = client.spawn(forkserver_rs.Worker("payload", payload=order), stdout=subprocess.PIPE)
            out, _ = child.communicate(timeout=10)
            assert child.returncode == 0 and b'customer: "ada"' in out
            with pytest.raises(forkserver_rs.SpawnError, match="no worker named 'nope'"):
                client.spawn(forkserver_rs.Worker("nope"))
    finally:
        server.terminate()
        server.wait(10)


def test_the_child_gets_this_process_s_directory_environment_and_umask(server, tmp_path):
    """As with subprocess.Popen: the caller's cwd (a relative cwd is relative
    to it), os.environ, umask and PATH lookup; each opt-out gives the
    server's (the test server runs in python/tests, without CALLER_ONLY)."""
    here = tmp_path / "caller"
    (here / "sub").mkdir(parents=True)
    (here / "bin").mkdir()
    only_here = here / "bin" / "only-here"
    only_here.write_text("#!/bin/sh\necho \"found on the caller's PATH\"\n")
    only_here.chmod(0o755)
    script = f"""
import os, subprocess, sys
import forkserver_rs
os.umask(0o027)
os.environ["CALLER_ONLY"] = "yes"
os.environ["PATH"] = {str(here / "bin")!r} + ":" + os.environ["PATH"]
report = 'pwd; echo "${{CALLER_ONLY-unset}}"; umask'
with forkserver_rs.Client({server.socket!r}) as client:
    for options in ({{}}, {{"cwd": "sub"}},
                    {{"server_env": True, "server_cwd": True, "server_umask": True}}):
        child = client.spawn(["sh", "-c", report], stdout=subprocess.PIPE, **options)
        print(child.communicate(timeout=10)[0].decode().replace(chr(10), " "))
    child = client.spawn("only-here", stdout=subprocess.PIPE)
    print(child.communicate(timeout=10)[0].decode().strip())
    big = {{f"BIG_{{i:03}}": chr(97 + i % 26) * 4096 for i in range(256)}}
    child = client.spawn(["sh", "-c", "env | grep ^BIG_ | sort | md5sum"],
                         env={{**os.environ, **big}}, stdout=subprocess.PIPE)
    print(child.communicate(timeout=10)[0].decode().split()[0])
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=here, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # The server inherited this test process's umask.
    server_umask = forkserver_rs.client._own_status()[0]
    expected_big = "".join(
        f"BIG_{i:03}={chr(97 + i % 26) * 4096}\n" for i in range(256)
    )
    lines = result.stdout.splitlines()
    assert lines == [
        f"{here} yes 0027 ",
        f"{here / 'sub'} yes 0027 ",
        f"{os.path.dirname(os.path.abspath(__file__))} unset {server_umask:04o} ",
        "found on the caller's PATH",
        hashlib.md5(expected_big.encode()).hexdigest(),
    ]


def test_the_caller_s_signal_mask_and_ignored_signals_as_popen_gives_them(server):
    """The calling thread's mask and the ignored signals reach the child
    (but SIGPIPE and SIGXFSZ, which Popen's restore_signals puts back);
    server_signals=True gives nothing blocked and nothing ignored."""
    script = f"""
import signal, subprocess
import forkserver_rs
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1, signal.SIGINT])
signal.signal(signal.SIGHUP, signal.SIG_IGN)
report = ["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]
with forkserver_rs.Client({server.socket!r}) as client:
    for options in ({{}}, {{"restore_signals": False}}, {{"server_signals": True}}):
        child = client.spawn(report, stdout=subprocess.PIPE, **options)
        print(child.communicate(timeout=10)[0].decode().replace(chr(10), " "))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr

    def bits(*signals):
        return f"{sum(1 << (s - 1) for s in signals):016x}"

    blocked = bits(signal.SIGINT, signal.SIGUSR1)
    assert result.stdout.splitlines() == [
        f"SigBlk:\t{blocked} SigIgn:\t{bits(signal.SIGHUP)} ",
        f"SigBlk:\t{blocked} SigIgn:\t{bits(signal.SIGHUP, signal.SIGPIPE, signal.SIGXFSZ)} ",
        f"SigBlk:\t{bits()} SigIgn:\t{bits()} ",
    ]


def test_resource_limits_nice_cpus_and_oom_score_adj(server):
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn(
            ["sh", "-c", "ulimit -n; ulimit -Hn; nice; cat /proc/self/oom_score_adj"],
            rlimits={"NOFILE": (64, 128)}, nice=4, cpus=[0], oom_score_adj=300,
            stdout=subprocess.PIPE,
        )
        out, _ = child.communicate(timeout=10)
        assert out.decode().split() == ["64", "128", "4", "300"]
        with pytest.raises(forkserver_rs.SpawnError, match="'FILES' is not one of"):
            client.spawn("true", rlimits={"FILES": (1, 1)})


def test_a_terminal_of_its_own(server):
    with forkserver_rs.Client(server.socket) as client:
        child = client.spawn(["sh", "-c", "tty; stty size"], pty=(30, 100))
        out = b""
        while True:
            try:
                chunk = os.read(child.pty.fileno(), 4096)
            except OSError:  # EIO: the child's side is closed
                break
            if not chunk:
                break
            out += chunk
        assert child.wait(10) == 0
        lines = out.decode().split()
        assert lines[0].startswith("/dev/pts/") and lines[1:] == ["30", "100"], out


def test_run_and_check_output_as_subprocess_has_them(server):
    with forkserver_rs.Client(server.socket) as client:
        done = client.run(["sh", "-c", "cat; echo err >&2; exit 3"], input=b"in\n", capture_output=True)
        assert isinstance(done, subprocess.CompletedProcess)
        assert (done.args, done.returncode, done.stdout, done.stderr) == (
            ["sh", "-c", "cat; echo err >&2; exit 3"], 3, b"in\n", b"err\n")
        with pytest.raises(subprocess.CalledProcessError) as failed:
            client.run(["false"], check=True)
        assert failed.value.returncode == 1
        assert client.check_output(["echo", "hi"], text=True) == "hi\n"
        with pytest.raises(subprocess.TimeoutExpired):
            client.run(["sleep", "30"], timeout=0.2)
        child = client.spawn(["true"])
        assert child.args == ["true"]
        child.wait(10)
