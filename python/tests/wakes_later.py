"""A preload whose thread sleeps at start and later keeps running: dormant
at start, so --allow-dormant-threads serves, until it never settles."""

import os
import threading
import time

WAKE_AFTER = float(os.environ.get("WAKES_LATER_SECONDS", "2"))


def _nap_then_work():
    time.sleep(WAKE_AFTER)
    while True:
        time.sleep(0.005)


threading.Thread(target=_nap_then_work, name="wakes-later", daemon=True).start()
