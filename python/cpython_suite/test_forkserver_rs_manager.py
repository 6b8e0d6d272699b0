"""CPython's multiprocessing tests (manager) with forkserver_rs's start method."""

import unittest

import _setup

_setup.install(globals(), only_type="manager")

if __name__ == "__main__":
    unittest.main()
