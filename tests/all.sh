#!/usr/bin/env bash
# Every test: the Rust workspace's (cargo test), then the Python package's
# (pytest) and CPython's multiprocessing suite with its start method,
# against a fresh build of python/ installed into a project-local
# virtualenv under the cargo target directory (never the system Python),
# then the wheel in each CPython it claims (tests/wheel.sh). Needs Rust, and
# python3 with venv and pip; the rest (maturin, msgpack, pytest, polars,
# numpy, ...) comes from PyPI into virtualenvs.
#
# Tests that need root (or a tool the machine lacks) are skipped when it is
# missing, each saying why; the last line counts them. With
# FORKSERVER_NO_SKIP=1 (as .ci/run sets) a skip is a failure instead.
set -uo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target"
target="$(cd "$target" && pwd)"
venv="$target/python-venv"
skips="$target/test-skips.log"
: > "$skips"

if ! python3 -m venv --help >/dev/null 2>&1; then
  echo "tests/all.sh: needs python3 with the venv module (Debian: apt-get install python3-venv)" >&2
  exit 2
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" || exit 2
echo "tests/all.sh: building the Python package into $venv"
if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "./python[test]"; then
  echo "tests/all.sh: building the Python package failed (see above)" >&2
  exit 2
fi

export FORKSERVER_TEST_PYTHON="$venv/bin/python"
export FORKSERVER_SKIP_LOG="$skips"

cargo test --workspace 2>&1 | tee "$target/cargo-test.log"
rust=${PIPESTATUS[0]}
# The integration tests again with the zygote's clone3(CLONE_PARENT) turned
# off: the servers then preload in themselves, as on musl or with threads
# tolerated (README, "Reload"), and the tests of reloads and of the zygote
# say they are skipped.
FORKSERVER_SIBLING_FORK=0 cargo test --test tests 2>&1 | tee -a "$target/cargo-test.log"
single=${PIPESTATUS[0]}
[ "$single" -ne 0 ] && rust=$single

# From the repository root, so python/forkserver (sources without the built
# extension) does not shadow the installed package.
"$venv/bin/python" -m pytest -q -rs python/tests 2>&1 | tee "$target/pytest.log"
python=${PIPESTATUS[0]}

# CPython's multiprocessing test suite against the registered start method
# (its own summary counts the tests; env changed, i.e. a dangling thread or
# process, fails it too). A test file that runs 20 minutes has hung (a whole
# run takes 1 minute, or 6 when CPython's own thread-pool test_terminate
# waits out a 300 s sleep): regrtest then dumps every stack and fails it.
tests/cpython_multiprocessing.sh "$venv/bin/python" -j2 -u all --timeout 1200 2>&1 | tee "$target/cpython-suite.log"
cpython=${PIPESTATUS[0]}
suite_line=$(grep -E '^Total tests: run=' "$target/cpython-suite.log" | tail -n 1)
suite_run=$(echo "$suite_line" | grep -oE 'run=[0-9]+' | grep -oE '[0-9]+')
suite_failed=$(echo "$suite_line" | grep -oE '(failures|errors)=[0-9]+' | grep -oE '[0-9]+' | awk '{n += $1} END {print n + 0}')
suite_skipped=$(echo "$suite_line" | grep -oE 'skipped=[0-9]+' | grep -oE '[0-9]+')
if [ "$cpython" -eq 2 ]; then
  # The Python has no test package: say so, as a skip (a failure in CI).
  echo "skipped: CPython's multiprocessing suite: $venv/bin/python has no test package (see above)"
  suite_skipped=1
  cpython=0
  [ "${FORKSERVER_NO_SKIP:-0}" = 1 ] && cpython=1
fi

# The wheel, installed without Rust into each CPython the package claims.
tests/wheel.sh 2>&1 | tee "$target/wheel.log"
wheel=${PIPESTATUS[0]}
wheel_line=$(grep -E '^wheel: [0-9]+ passed' "$target/wheel.log" | tail -n 1)
wheel_passed=$(echo "$wheel_line" | grep -oE '[0-9]+ passed' | awk '{print $1 + 0}')
wheel_failed=$(echo "$wheel_line" | grep -oE '[0-9]+ failed' | awk '{print $1 + 0}')
wheel_skipped=$(echo "$wheel_line" | grep -oE '[0-9]+ skipped' | awk '{print $1 + 0}')

# One summary line for all suites. cargo counts a skipped test as passed.
rust_passed=$(grep -E '^test result:' "$target/cargo-test.log" | grep -oE '[0-9]+ passed' | awk '{n += $1} END {print n + 0}')
rust_failed=$(grep -E '^test result:' "$target/cargo-test.log" | grep -oE '[0-9]+ failed' | awk '{n += $1} END {print n + 0}')
rust_skipped=$(wc -l < "$skips")
py_line=$(tail -n 1 "$target/pytest.log")
py_passed=$(echo "$py_line" | grep -oE '[0-9]+ passed' | awk '{print $1 + 0}')
py_failed=$(echo "$py_line" | grep -oE '[0-9]+ (failed|error|errors)' | awk '{n += $1} END {print n + 0}')
py_skipped=$(echo "$py_line" | grep -oE '[0-9]+ skipped' | awk '{print $1 + 0}')
if [ "$rust_skipped" -gt 0 ]; then
  echo "skipped Rust tests:"
  sed 's/^/  /' "$skips"
fi
passed=$(( rust_passed - rust_skipped + ${py_passed:-0} + ${suite_run:-0} - ${suite_failed:-0} - ${suite_skipped:-0} + ${wheel_passed:-0} ))
failed=$(( rust_failed + ${py_failed:-0} + ${suite_failed:-0} + ${wheel_failed:-0} ))
skipped=$(( rust_skipped + ${py_skipped:-0} + ${suite_skipped:-0} + ${wheel_skipped:-0} ))
[ "$rust" -ne 0 ] && [ "$rust_failed" -eq 0 ] && failed=$(( failed + 1 ))   # a build failure
[ "$python" -ne 0 ] && [ "${py_failed:-0}" -eq 0 ] && failed=$(( failed + 1 ))
[ "$cpython" -ne 0 ] && [ "${suite_failed:-0}" -eq 0 ] && failed=$(( failed + 1 ))   # env changed, a crash
[ "$wheel" -ne 0 ] && [ "${wheel_failed:-0}" -eq 0 ] && failed=$(( failed + 1 ))    # the build, or a skip in CI
echo "all: $passed passed, $failed failed, $skipped skipped"
[ "$rust" -eq 0 ] && [ "$python" -eq 0 ] && [ "$cpython" -eq 0 ] && [ "$wheel" -eq 0 ]
