"""A preload whose thread sleeps at start and later wakes every few
milliseconds (to wait for the GIL, which the serving thread never releases):
dormant at start, then asleep between short wake-ups, as Polars' cleaner."""

import os
import threading
import time

WAKE_AFTER = float(os.environ.get("WAKES_LATER_SECONDS", "2"))


def _nap_then_wake_often():
    time.sleep(WAKE_AFTER)
    while True:
        time.sleep(0.005)


threading.Thread(target=_nap_then_wake_often, name="wakes-later", daemon=True).start()
