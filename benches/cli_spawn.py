"""What the CLI costs a shell user: `forkserver spawn -- /bin/true` against
`/bin/true` run directly, and `forkserver --version` (the binary's own
start, no connection), medians of N runs each, in interleaved rounds of one
run. Starts its own server on a temporary socket.

    cargo build --release
    python3 benches/cli_spawn.py [--runs 200] [--binary target/release/forkserver]

Build with `cargo build --release` first: `cargo bench` leaves a binary of
the bench profile (with debug line tables, several times larger) at the
same path, which is not what a user runs.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def timed(command):
    started = time.perf_counter()
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--binary", default="target/release/forkserver")
    args = parser.parse_args()
    binary = os.path.abspath(args.binary)
    size_mb = os.path.getsize(binary) / 1e6
    with tempfile.TemporaryDirectory() as directory:
        socket = os.path.join(directory, "cli-bench.sock")
        server = subprocess.Popen(
            [binary, "serve", "-q", "--ready-fd", "1", "--socket", socket],
            stdout=subprocess.PIPE,
        )
        try:
            ready = server.stdout.readline()
            if not ready.startswith(b"ready"):
                sys.exit(f"the server did not start: {ready!r}")
            commands = {
                "/bin/true": ["/bin/true"],
                "forkserver --version": [binary, "--version"],
                "forkserver spawn -- /bin/true": [binary, "spawn", "--socket", socket, "--", "/bin/true"],
            }
            times = {name: [] for name in commands}
            for _ in range(args.runs):
                for name, command in commands.items():
                    times[name].append(timed(command))
        finally:
            server.terminate()
            server.wait()
    print(f"binary: {binary} ({size_mb:.1f} MB); {args.runs} interleaved rounds; ms")
    print(f"{'command':<32} {'median':>8} {'p90':>8}")
    medians = {}
    for name, samples in times.items():
        samples.sort()
        medians[name] = statistics.median(samples) * 1000
        p90 = samples[int(len(samples) * 0.9)] * 1000
        print(f"{name:<32} {medians[name]:8.2f} {p90:8.2f}")
    ratio = medians["forkserver spawn -- /bin/true"] / medians["/bin/true"]
    print(f"spawn via the CLI / /bin/true directly: {ratio:.2f}x")


if __name__ == "__main__":
    main()
