"""A site's cores for block work (node config ``threads``).

A site computes its GLM sums block by block. With ``threads`` > 1 each block's rows are split
into the kernels' own blocks, which a pool of that many threads computes: numpy's element-wise loops and BLAS
release the GIL, so the chunks run on separate cores. While the pool runs, BLAS is held to one
thread per call (``threadpoolctl``), so that the pool's threads and BLAS's own do not compete for
the same cores. Results do not depend on ``threads``: the blocks are the ones a single thread computes
one after the other, so every variant's sums come from the same arithmetic on the same values.

``threads`` defaults to every core the site's process may use (``os.sched_getaffinity``); the
local launcher, which starts every site on one machine, gives each site its share.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def site_pool(cohort: Any) -> ThreadPoolExecutor | None:
    """The shared pool for the cohort's ``threads`` setting, or None for one thread."""
    n = int(getattr(cohort, "threads", 0) or 0) or available_cores()
    if n <= 1:
        return None
    with _LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            pool = _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="fedgen-site")
    return pool


def chunk_slices(n_rows: int, step: int) -> list[slice]:
    """Row ranges of ``step`` rows covering ``n_rows`` (the kernels' own block boundaries)."""
    step = max(1, int(step))
    return [slice(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


@contextlib.contextmanager
def blas_single_threaded(active: bool) -> Iterator[None]:
    """BLAS limited to one thread while ``active`` (the pool's threads take the cores instead)."""
    if not active:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield
