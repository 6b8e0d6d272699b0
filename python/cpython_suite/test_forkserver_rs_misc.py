"""CPython's multiprocessing tests (misc: those not run per type) with
forkserver_rs's start method."""

import unittest

import _setup

_setup.install(globals(), exclude_types=True)

if __name__ == "__main__":
    unittest.main()
