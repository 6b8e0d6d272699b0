#!/usr/bin/env bash
# Runs every command block of README.md and examples/*/README.md as written,
# so the docs cannot rot: ```sh blocks with bash, ```python blocks with the
# Python of the project's virtualenv (tests/all.sh builds it), in the order
# a reader meets them, from the repository root. A file's blocks share one
# session: what a block starts in the background (`... serve &`) serves the
# blocks after it, and is stopped when the file is done. Every block must
# exit 0 within its time limit.
#
# Not run: ```text/```toml/```rust blocks (output, config, and Rust that
# cargo compiles as doctests), the test command itself (`tests/all.sh`),
# and a ```sh block whose first line says
# `# not run by tests/readme_commands.sh: WHY` (they change the system or
# need systemd as PID 1); each is listed with its reason.
#
# Usage: tests/readme_commands.sh [FILE.md...]   (default: all of them)
set -uo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
block_timeout=900

# The Python a reader has at that point: README's own `.venv` once a block
# made it, else the one tests/all.sh builds, else the system's.
python_now() {
  if [ -x .venv/bin/python ]; then
    echo .venv/bin/python
  elif [ -x "$target/python-venv/bin/python" ]; then
    echo "$target/python-venv/bin/python"
  else
    echo python3
  fi
}

files=("$@")
[ ${#files[@]} -gt 0 ] || files=(README.md examples/*/README.md)

run=0 failed=0 skipped=0
for file in "${files[@]}"; do
  work=$(mktemp -d)
  # Split the file into its blocks: work/N.sh, work/N.py, work/N.skip.
  awk -v dir="$work" '
    /^```/ && !inside {
      inside = 1; n++
      lang = substr($0, 4)
      ext = (lang == "sh") ? "sh" : (lang == "python") ? "py" : "skip"
      out = sprintf("%s/%03d.%s", dir, n, ext)
      printf "" > out
      next
    }
    /^```/ && inside { inside = 0; close(out); next }
    inside { print > out }
  ' "$file"
  # Each file in its own session with a private default socket, so its
  # servers are stopped together and never meet another file's.
  export FORKSERVER_SOCKET="$work/default.sock"
  session_pids=()
  for block in "$work"/*; do
    name="$file block $(basename "${block%.*}")"
    case "$block" in
      *.skip) continue ;;
      *.sh)
        first=$(head -n 1 "$block")
        if [[ "$first" == "# not run by tests/readme_commands.sh:"* ]]; then
          echo "readme: skipped $name: ${first#*: }"
          skipped=$((skipped + 1))
          continue
        fi
        if grep -qx 'tests/all.sh' "$block"; then
          echo "readme: skipped $name: the test command itself (.ci/run runs it)"
          skipped=$((skipped + 1))
          continue
        fi
        command=(bash -e "$block")
        ;;
      *.py) command=("$(python_now)" "$block") ;;
    esac
    echo "readme: running $name"
    sed 's/^/    | /' "$block"
    # setsid: the block's background jobs form a group we can stop later.
    setsid timeout "$block_timeout" "${command[@]}" < /dev/null &
    pid=$!
    wait "$pid"
    status=$?
    session_pids+=("$pid")
    run=$((run + 1))
    if [ "$status" -ne 0 ]; then
      echo "readme: FAILED $name (exit $status)"
      failed=$((failed + 1))
    fi
  done
  # Stop what the file's blocks left running (their servers), then wait a
  # moment for them to remove their sockets.
  for pid in "${session_pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null
  done
  sleep 0.5
  rm -rf "$work"
done
echo "readme: $((run - failed)) passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
