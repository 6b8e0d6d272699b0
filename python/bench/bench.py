"""Worker start latency, sequential throughput and memory of Python workers:
our context with Polars preloaded versus multiprocessing's spawn,
forkserver (with set_forkserver_preload) and fork.

    target/python-venv/bin/python python/bench/bench.py [--runs N]

Each start method runs in its own fresh interpreter (so `fork` forks a
parent that imported Polars but never ran it, and no method's state leaks
into another's). Prints a table of medians and p90s and the ratios the
README quotes; writes target/python-bench.json.

The children of spawn, forkserver and ours re-run this script as
`__mp_main__` (that is how they find functions defined in it), so its top
level imports only what every method has loaded anyway; the rest is
imported inside the functions that use it.
"""

import os
import sys
import time

METHODS = ["forkserver-rs", "fork", "forkserver", "spawn"]
IDLE_WORKERS = 8
SEQUENTIAL = 50


def child_running(conn):
    conn.send("up")


def child_polars(conn):
    import polars as pl

    frame = pl.DataFrame({"n": list(range(1000))})
    conn.send(frame.filter(pl.col("n") % 7 == 0).select(pl.col("n").sum()).item())


def child_idle(conn):
    conn.send("up")
    time.sleep(3600)  # until terminated


def noop():
    pass


def context_for(method):
    import multiprocessing

    if method == "forkserver-rs":
        import forkserver_rs

        return forkserver_rs.get_context(preload=["polars"])
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["polars"])
    return ctx


def timed_start(ctx, target):
    """Seconds from Process.start() to the child's first message, and the
    message."""
    receive, send = ctx.Pipe(duplex=False)
    started = time.perf_counter()
    process = ctx.Process(target=target, args=(send,))
    process.start()
    message = receive.recv()
    elapsed = time.perf_counter() - started
    process.join()
    send.close()
    receive.close()
    return elapsed, message


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def measure(method, runs):
    """Runs in a fresh interpreter for one start method; returns its results."""
    import polars  # noqa: F401 - the parent has Polars imported, never run

    ctx = context_for(method)
    for _ in range(2):  # starts the server / forkserver / resource tracker
        timed_start(ctx, child_running)
    running = [timed_start(ctx, child_running)[0] for _ in range(runs)]
    polars_result = []
    for _ in range(runs):
        elapsed, value = timed_start(ctx, child_polars)
        assert value == sum(n for n in range(1000) if n % 7 == 0)
        polars_result.append(elapsed)
    started = time.perf_counter()
    for _ in range(SEQUENTIAL):
        process = ctx.Process(target=noop)
        process.start()
        process.join()
        assert process.exitcode == 0
    sequential = time.perf_counter() - started
    # PSS of idle workers, each up and asleep.
    idle = []
    for _ in range(IDLE_WORKERS):
        up_r, up_w = ctx.Pipe(duplex=False)
        process = ctx.Process(target=child_idle, args=(up_w,))
        process.start()
        assert up_r.recv() == "up"
        idle.append(process)
    time.sleep(0.5)
    workers_pss = sum(pss_kib(p.pid) for p in idle)
    for process in idle:
        process.terminate()
        process.join()
    return {
        "method": method,
        "start_to_running_s": running,
        "start_to_polars_result_s": polars_result,
        "sequential_50_s": sequential,
        "idle_workers_pss_kib": workers_pss,
    }


def median(values):
    import statistics

    return statistics.median(values)


def p90(values):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def report(results):
    by = {r["method"]: r for r in results}
    print(f"{'method':<15} {'start->running':>22} {'start->Polars result':>22} {'50 sequential':>14} {'PSS of 8 idle':>14}")
    print(f"{'':<15} {'median (p90) ms':>22} {'median (p90) ms':>22} {'s':>14} {'MiB':>14}")
    for method in METHODS:
        r = by[method]
        run, pol = r["start_to_running_s"], r["start_to_polars_result_s"]
        print(
            f"{method:<15} {median(run) * 1e3:>13.2f} ({p90(run) * 1e3:6.2f}) "
            f"{median(pol) * 1e3:>13.2f} ({p90(pol) * 1e3:6.2f}) "
            f"{r['sequential_50_s']:>14.3f} {r['idle_workers_pss_kib'] / 1024:>14.1f}"
        )
    ours = by["forkserver-rs"]
    print("\nratios (ours = forkserver-rs; medians of start->running):")
    for other in ("fork", "forkserver", "spawn"):
        a = median(ours["start_to_running_s"])
        b = median(by[other]["start_to_running_s"])
        c = median(ours["start_to_polars_result_s"])
        d = median(by[other]["start_to_polars_result_s"])
        print(f"  {other:<11} start->running {b / a:6.2f}x ours' time ... start->Polars result {d / c:6.2f}x")


def main():
    import argparse
    import json
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:  # one method, in its own interpreter
        print(json.dumps(measure(args.method, args.runs)))
        return
    results = []
    for method in METHODS:
        done = subprocess.run(
            [sys.executable, __file__, "--method", method, "--runs", str(args.runs)],
            capture_output=True, text=True, check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    report(results)
    os.makedirs("target", exist_ok=True)
    with open("target/python-bench.json", "w") as out:
        json.dump({"runs": args.runs, "results": results}, out, indent=1)


if __name__ == "__main__":
    main()
