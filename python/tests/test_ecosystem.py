"""The libraries Python users start processes with, through a forkserver
context: concurrent.futures (test_context.py), loky, joblib and Dask
distributed, each with the real package. Each runs in a script of its own:
start methods and the libraries' settings are process-wide."""

import subprocess
import sys

import pytest

from conftest import run_script

# Shared by the scripts: the start method, with Polars preloaded as the
# users these recipes are for would.
PRELUDE = """
import os
import forkserver_rs

NAME = forkserver_rs.register("forkserver-rs-eco", preload=["polars"])

def parent_pid(_):
    return os.getppid()

def column_sum(n):
    import polars as pl
    return pl.DataFrame({"a": range(n)})["a"].sum()
"""


@pytest.fixture
def startup_hook():
    """The .pth hook in this interpreter's site-packages, for a test whose
    library starts helper interpreters of its own; removed afterwards."""
    subprocess.run([sys.executable, "-m", "forkserver_rs", "install-hook"], check=True,
                   capture_output=True)
    yield
    subprocess.run([sys.executable, "-m", "forkserver_rs", "install-hook", "--remove"],
                   check=True, capture_output=True)


def test_loky_executors_take_the_context(tmp_path):
    done = run_script(tmp_path, "with_loky.py", PRELUDE + """
import multiprocessing
import loky

if __name__ == "__main__":
    ctx = multiprocessing.get_context(NAME)
    server = ctx.client().status()["pid"]
    executor = loky.get_reusable_executor(max_workers=2, context=ctx)
    assert set(executor.map(parent_pid, range(4))) == {server}
    # loky pickles with cloudpickle: lambdas travel.
    assert list(executor.map(lambda x: 2 * x, range(3))) == [0, 2, 4]
    assert executor.submit(column_sum, 10).result() == 45
    executor.shutdown(wait=True)
    with loky.ProcessPoolExecutor(max_workers=2, context=ctx) as pool:
        assert set(pool.map(parent_pid, range(4))) == {server}
    print("ok", flush=True)
""")
    assert done.stdout.strip() == "ok"


def test_joblib_parallel_by_start_method(tmp_path, startup_hook):
    # JOBLIB_START_METHOD is read when joblib is imported, also by the
    # helper interpreters joblib starts (its resource tracker): the hook
    # lets those resolve the name.
    done = run_script(tmp_path, "with_joblib.py", PRELUDE + """
os.environ["JOBLIB_START_METHOD"] = NAME
import multiprocessing
from joblib import Parallel, delayed

if __name__ == "__main__":
    server = multiprocessing.get_context(NAME).client().status()["pid"]
    parents = Parallel(n_jobs=2, backend="multiprocessing")(delayed(parent_pid)(i) for i in range(6))
    assert set(parents) == {server}, (parents, server)
    sums = Parallel(n_jobs=2, backend="multiprocessing")(delayed(column_sum)(n) for n in (10, 100))
    assert sums == [45, 4950], sums
    print("ok", flush=True)
""")
    assert done.stdout.strip() == "ok"


def test_dask_local_cluster_nannies_start_workers_through_the_server(tmp_path):
    done = run_script(tmp_path, "with_dask.py", PRELUDE + """
import multiprocessing
import dask
import dask.dataframe as dd
import pandas as pd
from distributed import Client, LocalCluster

if __name__ == "__main__":
    dask.config.set({"distributed.worker.multiprocessing-method": NAME})
    server = multiprocessing.get_context(NAME).client().status()["pid"]
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        parents = client.run(os.getppid)
        assert len(parents) == 2 and set(parents.values()) == {server}, (parents, server)
        assert client.submit(column_sum, 10).result() == 45
        frame = dd.from_pandas(pd.DataFrame({"a": range(1000)}), npartitions=4)
        assert frame.a.sum().compute() == 499500
    print("ok", flush=True)
""")
    assert done.stdout.strip() == "ok"


def _free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_dask_host_whose_server_is_killed_keeps_its_workers_and_rejoins(
    tmp_path, start_server, startup_hook
):
    """The README's multi-host recipe on one machine: two "hosts", each a
    server and a `dask worker --nworkers 2` whose FORKSERVER_RS_CONTEXTS
    names it, and one scheduler. Host A's server is SIGKILLed three times
    during a stream of Polars tasks, a new one started on its socket 1 s
    later: every task finishes right, no `dask worker` exits, the cluster
    stays at 4 workers, and workers restarted afterwards are children of
    their host's server of now."""
    import json
    import os
    import signal
    import time

    from distributed import Client

    flags = ("--preload", "distributed,polars", "--allow-dormant-threads")
    servers = {"a": start_server(*flags), "b": start_server(*flags)}
    for server in servers.values():
        assert server.ready, server.failure()
    port = _free_port()
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    scheduler = subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )
    hosts = {}
    try:
        for host, server in servers.items():
            settings = {"forkserver-rs": {"socket": server.socket, "preload": ["distributed", "polars"]}}
            env = {
                **os.environ,
                "FORKSERVER_RS_CONTEXTS": json.dumps(settings),
                "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD": "forkserver-rs",
            }
            hosts[host] = subprocess.Popen(
                [dask, "worker", f"tcp://127.0.0.1:{port}", "--nworkers", "2", "--nthreads", "1",
                 "--no-dashboard"],
                env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"worker-{host}.log", "w"),
                cwd=tmp_path,
            )

        def column_sum(n):
            import polars as pl

            return pl.DataFrame({"a": range(n)})["a"].sum()

        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(4, timeout=120)
            for round in range(3):
                futures = client.map(column_sum, [100 + round * 1000 + i for i in range(40)], pure=False)
                time.sleep(0.2)
                os.kill(servers["a"].pid, signal.SIGKILL)
                servers["a"].process.wait()
                time.sleep(1)
                servers["a"] = start_server(*flags, socket=servers["a"].socket)
                assert servers["a"].ready, servers["a"].failure()
                expected = [(n - 1) * n // 2 for n in [100 + round * 1000 + i for i in range(40)]]
                assert client.gather(futures) == expected
                client.wait_for_workers(4, timeout=30)
            assert [host.poll() for host in hosts.values()] == [None, None], (
                (tmp_path / "worker-a.log").read_text()
            )
            # The nannies restart their workers through the servers there
            # are now: host A's is the last one started.
            client.restart(timeout=120)
            parents = sorted(client.run(os.getppid).values())
            assert parents == sorted([servers["a"].pid] * 2 + [servers["b"].pid] * 2), (
                parents, servers["a"].pid, servers["b"].pid,
            )
    finally:
        for process in [*hosts.values(), scheduler]:
            process.terminate()
        for process in [*hosts.values(), scheduler]:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
