"""What the opt-in start-up hook (python -m forkserver_rs install-hook)
costs an interpreter: `python -c pass`, median of N runs, without the hook,
with it and FORKSERVER_RS_CONTEXTS unset, and with it set. Installs the
hook into this interpreter's site-packages for the measurement and removes
it afterwards (unless it was there before).

    python python/bench/startup_hook.py [--runs 40]
"""

import argparse
import os
import statistics
import subprocess
import sys
import sysconfig
import time

VARIABLE = "FORKSERVER_RS_CONTEXTS"


def median_ms(env, runs):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def hook(*flags):
    subprocess.run([sys.executable, "-m", "forkserver_rs", "install-hook", *flags], check=True,
                   capture_output=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    runs = parser.parse_args().runs
    unset = {name: value for name, value in os.environ.items() if name != VARIABLE}
    set_ = {**unset, VARIABLE: '{"forkserver-rs":{}}'}
    installed = os.path.exists(os.path.join(sysconfig.get_paths()["purelib"], "forkserver_rs-hook.pth"))
    hook("--remove")
    rows = [("no hook", median_ms(unset, runs))]
    hook()
    try:
        rows.append(("hook, variable unset", median_ms(unset, runs)))
        rows.append(("hook, variable set", median_ms(set_, runs)))
    finally:
        if not installed:
            hook("--remove")
    rows.append(("no hook (again)", median_ms(unset, runs)))
    print(f"| `python -c pass`, median of {runs} | ms |\n|---|---|")
    for label, ms in rows:
        print(f"| {label} | {ms:.2f} |")


if __name__ == "__main__":
    main()
