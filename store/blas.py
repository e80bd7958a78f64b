"""numpy's BLAS on one thread while gradstore scans.

The CPU scans score float32 rows with numpy's BLAS (OpenBLAS in numpy's wheels): for the few-column products of a
scan (``[rows, D] @ [D, B]``, B from 1 to a few dozen queries) it measured 1.3-6x faster than torch's CPU matmul
on the same shapes. A scan runs its products on threads of its own, piece by cache-sized piece, so each product
belongs on the thread that asked for it: OpenBLAS running a team of its own per call measured 10-15x slower on a
busy 2-core box (its threads spin while other threads want the cores), and 15x slower when two scan threads call
it at once. So while any scan runs, numpy's BLAS is set to one thread; the setting is process-wide, shared by
concurrent scans, and the library's own is restored when the last of them ends. A served process keeps it at one
(:meth:`~gradstore.server.run.Run.serving_threads`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"libraries": None, "scans": 0, "saved": []}


def _libraries() -> list[Any]:
    """threadpoolctl's controllers of the BLAS libraries loaded in this process (found once: ~0.1 s)."""
    if _STATE["libraries"] is None:
        import numpy  # noqa: F401  (its BLAS must be loaded to be found)
        from threadpoolctl import ThreadpoolController

        _STATE["libraries"] = ThreadpoolController().select(user_api="blas").lib_controllers
    return _STATE["libraries"]


def one_blas_thread() -> None:
    """Set numpy's BLAS to one thread for good (a process that serves queries)."""
    with _LOCK:
        for library in _libraries():
            library.set_num_threads(1)
        _STATE["saved"] = [1 for _ in _libraries()]


@contextmanager
def scanning() -> Iterator[None]:
    """numpy's BLAS on one thread while the block runs (and while any other scan does)."""
    with _LOCK:
        if _STATE["scans"] == 0:
            _STATE["saved"] = [library.get_num_threads() for library in _libraries()]
            for library in _libraries():
                library.set_num_threads(1)
        _STATE["scans"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _STATE["scans"] -= 1
            if _STATE["scans"] == 0:
                for library, threads in zip(_libraries(), _STATE["saved"], strict=True):
                    library.set_num_threads(threads)
