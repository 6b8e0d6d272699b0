"""CPython's multiprocessing tests (threads) with forkserver_rs's start method."""

import unittest

import _setup

_setup.install(globals(), only_type="threads")

if __name__ == "__main__":
    unittest.main()
