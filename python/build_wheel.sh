#!/usr/bin/env bash
# Builds the Python package's wheel: one manylinux2014 (glibc 2.17+) abi3
# wheel for every CPython from 3.9 on, x86_64, into target/wheels/.
# Needs Rust and python3 with venv; maturin and zig (the ziglang package,
# which links against old glibc symbols) come from PyPI into a build-only
# virtualenv. The wheel then installs with pip on machines without Rust.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target"
target="$(cd "$target" && pwd)"
tools="$target/wheel-tools"
[ -x "$tools/bin/maturin" ] || {
  python3 -m venv "$tools"
  "$tools/bin/pip" install --quiet --disable-pip-version-check "maturin==1.16.0" "ziglang==0.17.1"
}
rm -f "$target"/wheels/forkserver_rs-*.whl
(cd python && PATH="$tools/bin:$PATH" maturin build --quiet --release --zig \
  --compatibility manylinux2014 --out "$target/wheels")
ls "$target"/wheels/forkserver_rs-*.whl
