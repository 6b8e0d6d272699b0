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
