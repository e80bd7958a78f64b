"""numpy's BLAS on the scan's thread budget.

The CPU scans score float32 rows with numpy's BLAS (OpenBLAS in numpy's wheels): for the few-column products of a
scan (``[rows, D] @ [D, B]``, B from 1 to a few dozen queries) it measured 1.3-6x faster than torch's CPU matmul
on the same shapes (benchmarks/batch_scoring.py). A scan runs its products on several threads of its own, and
OpenBLAS called from two threads at once while it runs a team of its own per call measured 15x slower than on one
thread each, so before it scans gradstore sets numpy's BLAS threads to the CPUs each scan thread may use
(:func:`blas_threads_for`). The setting is process-wide and is not restored (concurrent scans agree on it; a
restore between them would race): a script with torch's default threads keeps numpy's default, a served process
(one torch thread) and a batch scorer's pool get one BLAS thread per worker.
"""

from __future__ import annotations

import threading
from typing import Any

_LOCK = threading.Lock()
_LIBRARIES: list[Any] = []  # threadpoolctl's controllers of numpy's BLAS, found once (~0.1 s)


def blas_threads_for(workers: int) -> int:
    """Set numpy's BLAS to the CPUs each of ``workers`` concurrent scan threads may use (at least 1); returns it."""
    from .search import usable_cpus

    threads = max(1, usable_cpus() // max(workers, 1))
    with _LOCK:
        if not _LIBRARIES:
            import numpy  # noqa: F401  (its BLAS must be loaded to be found)
            from threadpoolctl import ThreadpoolController

            _LIBRARIES.extend(ThreadpoolController().select(user_api="blas").lib_controllers or [None])
        for library in _LIBRARIES:
            if library is not None and library.num_threads != threads:
                library.set_num_threads(threads)
    return threads
