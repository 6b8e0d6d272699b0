"""Shared by the four test modules: registers the start method the suite
runs with and installs CPython's tests for it, as CPython's
test_multiprocessing_forkserver package does for its own.

No test is excluded: every skip the run reports is CPython's own (a test
for another start method or another test type, a resource regrtest was not
given, another platform)."""

from test import _test_multiprocessing

import forkserver_rs

NAME = forkserver_rs.register("forkserver-rs")


def install(globs, **kwargs):
    _test_multiprocessing.install_tests_in_module_dict(globs, NAME, **kwargs)
