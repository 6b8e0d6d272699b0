#!/usr/bin/env bash
# The wheel as a user gets it: built by python/build_wheel.sh, installed
# with pip into a fresh virtualenv of every CPython that pyproject.toml's
# requires-python claims (3.9 to 3.13), with no cargo or rustc on PATH, and
# a smoke test run in each (a multiprocessing Pool, a start method by name,
# a program spawned through the client).
#
# Pythons are looked up as pyenv's ($PYENV_ROOT/versions/3.X.*) or
# python3.X on PATH. A missing one is a skip, said on the last line (a
# failure with FORKSERVER_NO_SKIP=1, as CI sets).
set -uo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target"
target="$(cd "$target" && pwd)"
python/build_wheel.sh || { echo "wheel: the build failed"; exit 1; }
wheel=$(ls "$target"/wheels/forkserver_rs-*.whl)

# A script, not python -c: the Pool's workers import its functions from
# the main module, as with the spawn method.
smoke='
import multiprocessing, os, subprocess, sys
import forkserver_rs

def square(x):
    return x * x

if __name__ == "__main__":
    name = forkserver_rs.register("forkserver-rs", preload=["json"])
    multiprocessing.set_start_method(name)
    with multiprocessing.Pool(2) as pool:
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
    client = multiprocessing.get_context(name).client()
    child = client.spawn(["echo", "spawned"], stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=10)
    assert out == b"spawned\n" and child.returncode == 0, (out, child.returncode)
    print("smoke test passed on", sys.version.split()[0])
'

find_python() {
  local version=$1 found
  found=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python"$version" 2>/dev/null | sort -V | tail -n 1)
  [ -n "$found" ] || found=$(command -v "python$version" || true)
  echo "$found"
}

passed=0 failed=0 skipped=0
for version in 3.9 3.10 3.11 3.12 3.13; do
  python=$(find_python "$version")
  if [ -z "$python" ]; then
    echo "wheel: skipped Python $version: not found (pyenv install $version, or python$version on PATH)"
    skipped=$((skipped + 1))
    continue
  fi
  venv="$target/wheel-venvs/$version"
  rm -rf "$venv"
  # No Rust on PATH from here on: pip must not find anything to build with.
  if env -i HOME="$HOME" PATH=/usr/bin:/bin "$python" -m venv "$venv" \
    && env -i HOME="$HOME" PATH="$venv/bin:/usr/bin:/bin" PIP_DISABLE_PIP_VERSION_CHECK=1 \
      sh -c '! command -v cargo && ! command -v rustc && pip install --quiet --only-binary=:all: "$0"' "$wheel" \
    && printf '%s' "$smoke" > "$venv/smoke.py" \
    && (cd "$venv" && env -i HOME="$HOME" PATH="$venv/bin:/usr/bin:/bin" timeout 120 python smoke.py); then
    passed=$((passed + 1))
  else
    echo "wheel: FAILED on Python $version ($python)"
    failed=$((failed + 1))
  fi
done
echo "wheel: $passed passed, $failed failed, $skipped skipped ($(basename "$wheel"))"
[ "$failed" -eq 0 ] && { [ "$skipped" -eq 0 ] || [ "${FORKSERVER_NO_SKIP:-0}" != 1 ]; }
