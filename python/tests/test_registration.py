"""forkserver_rs.register(): a context selectable by start-method name, in
this interpreter, in its children, and (with the .pth hook) in a fresh
interpreter; and the cloudpickle opt-in."""

import json
import multiprocessing
import os
import pickle
import subprocess
import sys

import pytest

import forkserver_rs
from conftest import run_script


def test_selected_by_name_here_and_in_children(tmp_path):
    done = run_script(tmp_path, "by_name.py", """
        import multiprocessing, os
        import forkserver_rs

        def child(queue):
            # spawn.prepare set the parent's start method by name here.
            grandchild = multiprocessing.Process(target=os.getppid)
            grandchild.start()
            grandchild.join()
            pool = multiprocessing.Pool(1)
            parents = pool.apply(os.getppid)
            pool.close(); pool.join()
            queue.put((multiprocessing.get_start_method(), os.getppid(), grandchild.exitcode, parents))

        if __name__ == "__main__":
            name = forkserver_rs.register(preload=["json"])
            assert name == "forkserver-rs"
            ctx = multiprocessing.get_context(name)
            assert issubclass(ctx.Process, multiprocessing.process.BaseProcess)
            multiprocessing.set_start_method(name)
            queue = multiprocessing.Queue()
            process = multiprocessing.Process(target=child, args=(queue,))
            process.start()
            method, parent, grandchild_exit, pool_parent = queue.get(timeout=30)
            process.join(30)
            server = ctx.client().status()["pid"]
            assert process.exitcode == 0, process.exitcode
            assert method == name, method
            # The child and its own children were started by the parent's server.
            assert parent == server and pool_parent == server, (parent, pool_parent, server)
            assert grandchild_exit == 0
            with multiprocessing.Pool(2) as pool:
                assert pool.map(abs, [-1, -2]) == [1, 2]
            print("ok", flush=True)
    """)
    assert done.stdout.strip() == "ok"


def test_register_refuses_clashes(monkeypatch):
    # Restored afterwards: the variable and the table are this process's.
    monkeypatch.delenv(forkserver_rs.context.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(multiprocessing.context, "_concrete_contexts",
                        dict(multiprocessing.context._concrete_contexts))
    with pytest.raises(ValueError, match="multiprocessing's own start methods"):
        forkserver_rs.register("spawn")
    name = forkserver_rs.register("fs-test-clash", preload=["json"])
    assert forkserver_rs.register("fs-test-clash", preload=["json"]) == name
    with pytest.raises(ValueError, match="already registered with other settings"):
        forkserver_rs.register("fs-test-clash", preload=["csv"])
    # Children (and later processes) inherit the name through the environment.
    assert "fs-test-clash" in json.loads(os.environ[forkserver_rs.context.ENVIRONMENT_VARIABLE])


def test_set_forkserver_preload_applies_to_the_server_it_starts():
    ctx = forkserver_rs.get_context(pool=0)
    ctx.set_forkserver_preload(["csv"])
    process = ctx.Process(target=print)
    process.start()
    process.join(10)
    assert process.exitcode == 0
    assert "csv" in [module["name"] for module in ctx.client().status()["modules"]]


def test_a_fresh_interpreter_resolves_the_name_with_the_hook(tmp_path):
    env = {**os.environ, forkserver_rs.context.ENVIRONMENT_VARIABLE: json.dumps(
        {"fs-fresh": {"preload": ["json"], "pool": 0}})}
    check = ("import multiprocessing, site, sys; {}"
             "print(type(multiprocessing.get_context('fs-fresh')).__name__)")
    # Without the hook, an interpreter that never imports forkserver_rs
    # cannot resolve it...
    without = subprocess.run([sys.executable, "-c", check.format("")], env=env,
                             capture_output=True, text=True, timeout=60)
    assert "cannot find context for 'fs-fresh'" in without.stderr
    # ...with it (the .pth file processed as site-packages' are), it can.
    installed = subprocess.run([sys.executable, "-m", "forkserver_rs", "install-hook",
                                "--site-dir", str(tmp_path)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    assert (tmp_path / "forkserver_rs-hook.pth").exists()
    hooked = check.format(f"site.addsitedir({str(tmp_path)!r}); ")
    with_hook = subprocess.run([sys.executable, "-c", hooked], env=env,
                               capture_output=True, text=True, timeout=60)
    assert with_hook.stdout.strip() == "ForkserverContext", with_hook.stderr
    # And the hook does nothing when the variable is unset.
    env.pop(forkserver_rs.context.ENVIRONMENT_VARIABLE)
    quiet = subprocess.run([sys.executable, "-c", hooked.replace(
        "print(type(multiprocessing.get_context('fs-fresh')).__name__)",
        "print('forkserver_rs' in sys.modules)")], env=env, capture_output=True, text=True)
    assert quiet.stdout.strip() == "False", quiet.stderr


def triple(x):
    return 3 * x


def test_cloudpickle_sends_lambdas_and_local_functions():
    ctx = forkserver_rs.get_context(pickler="cloudpickle")

    def add_hundred(x):
        return x + 100

    with ctx.Pool(2) as pool:
        assert pool.map(lambda x: x * x, range(5)) == [0, 1, 4, 9, 16]
        assert pool.apply(add_hundred, (1,)) == 101
        assert pool.map(triple, [1]) == [3]
    queue = ctx.SimpleQueue()
    process = ctx.Process(target=lambda q: q.put("from a lambda"), args=(queue,))
    process.start()
    assert queue.get() == "from a lambda"
    process.join(10)
    assert process.exitcode == 0


def test_the_default_pickler_stays_pickle():
    ctx = forkserver_rs.get_context(preload=["json"])
    with ctx.Pool(1) as pool:
        with pytest.raises((pickle.PicklingError, AttributeError)):
            pool.map(lambda x: x, [1])


def test_contexts_pickle_like_stock_ones(tmp_path):
    """A context pickles (loky hands one to its workers for nested
    executors): a registered one comes back as the one registered under its
    name, a private one as one with its settings, and a child given either
    starts processes with it."""
    done = run_script(tmp_path, "pickled.py", """
        import multiprocessing, pickle
        import forkserver_rs

        def nested(ctx, queue):
            with ctx.Pool(1) as pool:
                queue.put(pool.apply(abs, (-7,)))

        if __name__ == "__main__":
            name = forkserver_rs.register("pickled-rs", preload=["json"])
            registered = multiprocessing.get_context(name)
            assert pickle.loads(pickle.dumps(registered)) is registered
            private = forkserver_rs.get_context(preload=["json"])
            copy = pickle.loads(pickle.dumps(private))
            assert copy is not private and copy._settings == private._settings
            for ctx in (private, registered):
                queue = ctx.Queue()
                child = ctx.Process(target=nested, args=(ctx, queue))
                child.start()
                assert queue.get(timeout=60) == 7
                child.join(30)
                assert child.exitcode == 0, child.exitcode
            print("ok", flush=True)
    """)
    assert done.stdout.strip() == "ok"
