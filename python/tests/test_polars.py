"""The Polars scenario: a parent whose Polars thread pool is running starts
workers. With `fork` they can deadlock; through our context, forked from a
server that only imported Polars, none may hang."""

from concurrent.futures import ProcessPoolExecutor

import polars as pl
import pytest

import forkserver_rs

WORKERS = 8


def filter_frame(seed):
    frame = pl.DataFrame({"n": list(range(10_000)), "seed": [seed] * 10_000})
    kept = frame.filter((pl.col("n") % 10) == seed).select(pl.col("n").sum())
    return kept.item()


def expected(seed):
    return sum(n for n in range(10_000) if n % 10 == seed)


@pytest.fixture
def busy_parent(tmp_path):
    """The parent reads a parquet file and filters it: Polars' pool is up."""
    path = tmp_path / "numbers.parquet"
    pl.DataFrame({"x": list(range(200_000)), "y": [i % 13 for i in range(200_000)]}).write_parquet(path)
    frame = pl.read_parquet(path).filter(pl.col("y") == 3)
    assert frame.height == len([i for i in range(200_000) if i % 13 == 3])
    with open("/proc/self/status") as status:
        threads = int(next(line for line in status if line.startswith("Threads:")).split()[1])
    assert threads > 1, "Polars' thread pool should be running in the parent"
    return frame


def test_eight_polars_workers_through_the_context_none_hangs(busy_parent):
    ctx = forkserver_rs.get_context(preload=["polars"])
    with ProcessPoolExecutor(max_workers=WORKERS, mp_context=ctx) as executor:
        futures = {seed: executor.submit(filter_frame, seed) for seed in range(WORKERS)}
        results = {seed: future.result(timeout=10) for seed, future in futures.items()}
    assert results == {seed: expected(seed) for seed in range(WORKERS)}


def test_eight_polars_processes_through_pool(busy_parent):
    ctx = forkserver_rs.get_context(preload=["polars"])
    with ctx.Pool(WORKERS) as pool:
        outcome = pool.map_async(filter_frame, range(WORKERS))
        assert outcome.get(timeout=10) == [expected(seed) for seed in range(WORKERS)]
