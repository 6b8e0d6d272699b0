#!/usr/bin/env bash
# CPython's own multiprocessing test suite (test._test_multiprocessing, as
# CPython runs it for each start method) against forkserver_rs's start
# method, in CPython's four groups: processes, threads, manager, misc.
#
#   tests/cpython_multiprocessing.sh PYTHON [regrtest flags...]
#
# PYTHON must have forkserver_rs installed and CPython's test package (pyenv
# and python.org builds include it; Debian's python3.X needs the package
# libpython3.X-testsuite). The tests that cannot apply to this start method
# are skipped by python/cpython_suite/_setup.py, each with its reason.
set -uo pipefail
cd "$(dirname "$0")/.."

python="${1:?usage: tests/cpython_multiprocessing.sh PYTHON [regrtest flags...]}"
shift
# An absolute path (the suite runs from its own directory), not resolved:
# a virtualenv's python is a symbolic link.
case "$python" in
  */*) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;;
  *) python="$(command -v "$python")" ;;
esac
if ! "$python" -c "import test._test_multiprocessing" 2>/dev/null; then
  echo "tests/cpython_multiprocessing.sh: $python has no CPython test suite (test._test_multiprocessing);" \
    "Debian: apt-get install libpython3.X-testsuite for /usr/bin/python3.X; pyenv builds include it" >&2
  exit 2
fi

# As a user of the name would: its settings in the environment before the
# interpreter starts (so register() in the suite changes nothing that
# regrtest watches), and the start-up hook, so the interpreters the suite
# starts itself (the spawn method's, script_helper's) resolve the name too.
export FORKSERVER_RS_CONTEXTS='{"forkserver-rs":{}}'
hook=$("$python" -m forkserver_rs install-hook) || exit 2
trap '"$python" -m forkserver_rs install-hook --remove >/dev/null' EXIT
echo "tests/cpython_multiprocessing.sh: $hook"

# Some tests send SIGINT to the test process and expect KeyboardInterrupt.
# A shell without job control starts background jobs with SIGINT ignored,
# and Python keeps an ignored SIGINT ignored: so the suite starts from a
# default SIGINT, whatever started this script.
cd python/cpython_suite
"$python" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])' \
  "$python" -W error::ResourceWarning -m test --testdir . "$@" \
  test_forkserver_rs_processes test_forkserver_rs_threads test_forkserver_rs_manager test_forkserver_rs_misc
