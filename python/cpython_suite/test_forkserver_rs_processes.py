"""CPython's multiprocessing tests (processes) with forkserver_rs's start method."""

import unittest

import _setup

_setup.install(globals(), only_type="processes")

if __name__ == "__main__":
    unittest.main()
