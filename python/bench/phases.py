"""Where a Python worker's start and end go, ours against `fork`: for N
sequential workers (Polars preloaded), the medians and p90s of
  start()       Process.start() returned (ours: the server said Spawned)
  running       the child's target ran (its perf_counter: CLOCK_MONOTONIC,
                shared by processes)
  message       the parent received the child's first message
  exited        after that message, the child is gone (its sentinel, a
                pidfd for ours, a pipe for fork, is readable)
  joined        after that message, join() returned (ours: the server's
                Exited report arrived)
all from just before Process() was called, except the last two (from the
message). One fresh interpreter per method, as bench.py does.

    target/python-venv/bin/python python/bench/phases.py [--runs 60] [--pool 2]
"""

import os
import sys
import time


def child(conn):
    conn.send(time.perf_counter())


def measure(method, runs, pool):
    import multiprocessing
    import select

    if method == "forkserver-rs":
        import forkserver_rs

        ctx = forkserver_rs.get_context(preload=["polars"], pool=pool)
    else:
        import polars  # noqa: F401 (the parent fork copies has it too)

        ctx = multiprocessing.get_context(method)
    rows = []
    for i in range(runs + 10):
        receive, send = ctx.Pipe(duplex=False)
        before = time.perf_counter()
        process = ctx.Process(target=child, args=(send,))
        process.start()
        started = time.perf_counter()
        running = receive.recv()
        message = time.perf_counter()
        select.select([process.sentinel], [], [])
        exited = time.perf_counter()
        process.join()
        joined = time.perf_counter()
        send.close()
        receive.close()
        if i >= 10:  # the first starts warm the server's pool and caches up
            rows.append({
                "start()": started - before,
                "running": running - before,
                "message": message - before,
                "exited": exited - message,
                "joined": joined - message,
            })
    return rows


def main():
    import argparse
    import json
    import statistics
    import subprocess

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--pool", type=int, default=2)
    parser.add_argument("--method")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(measure(args.method, args.runs, args.pool)))
        return
    print(f"{'phase':10} {'forkserver-rs':>22} {'fork':>22}   (ms, median (p90), {args.runs} runs)")
    results = {}
    for method in ("forkserver-rs", "fork"):
        out = subprocess.run([sys.executable, __file__, "--method", method, "--runs", str(args.runs),
                              "--pool", str(args.pool)], check=True, capture_output=True, text=True)
        results[method] = json.loads(out.stdout)
    for phase in results["fork"][0]:
        cells = []
        for method in ("forkserver-rs", "fork"):
            values = sorted(row[phase] * 1e3 for row in results[method])
            cells.append(f"{statistics.median(values):8.2f} ({values[int(len(values) * 0.9)]:6.2f})")
        print(f"{phase:10} {cells[0]:>22} {cells[1]:>22}")


if __name__ == "__main__":
    main()
