#!/usr/bin/env bash
# Every test: the Rust workspace's (cargo test), then the Python package's
# (pytest), against a fresh build of python/ installed into a virtualenv
# under target/ (needs python3 with venv and pip, and PyPI for maturin,
# msgpack, pytest, polars and numpy).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace

venv=target/python-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "./python[test]"
# From the repository root, so python/forkserver (sources without the built
# extension) does not shadow the installed package.
"$venv/bin/python" -m pytest -q python/tests
