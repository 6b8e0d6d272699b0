"""A preload that starts a Python thread which sleeps until woken: the thread
guard must name it."""

import threading

wake = threading.Event()
thread = threading.Thread(target=wake.wait, name="starts-thread-waiter", daemon=True)
thread.start()
