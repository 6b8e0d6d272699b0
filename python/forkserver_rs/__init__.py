"""forkserver for Python: start workers from a preloaded, single-threaded
server instead of paying for ``spawn`` or risking ``fork``.

- ``python -m forkserver_rs serve --preload numpy,polars`` runs a server that
  imported those modules once; clients start ``py:MODULE:FUNCTION`` workers
  (forked, already warm) or any program.
- :class:`Client` speaks the wire protocol (protocol/README.md);
  ``Client.spawn`` returns a ``subprocess.Popen``-like :class:`Child`.
- :func:`get_context` is a ``multiprocessing`` context whose processes the
  server starts: ``Pool``, ``Process``, ``ProcessPoolExecutor`` unchanged.
- :func:`register` makes such a context a start method by name
  (``multiprocessing.set_start_method(name)``, Dask's and joblib's
  settings), in this process and the processes it starts.
"""

from .client import (
    Child,
    Client,
    ServerError,
    ServerGone,
    ServerLost,
    SpawnError,
    Worker,
    default_socket_path,
)
from .context import ForkserverContext, get_context, register

__all__ = [
    "Child",
    "Client",
    "ForkserverContext",
    "ServerError",
    "ServerGone",
    "ServerLost",
    "SpawnError",
    "Worker",
    "default_socket_path",
    "get_context",
    "register",
]
