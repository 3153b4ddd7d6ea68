"""The task functions of the workloads: plain, module-level, importable by worker processes.

A worker process (papyros's, ``multiprocessing``'s, ``concurrent.futures``'s,
loky's) finds a task function by its module and name, so the functions live
here and not in ``run.py``: a spawned child imports this module (``run.py``
puts ``benchmarks/`` on the children's ``PYTHONPATH``) and never re-runs the
harness.

This module imports nothing but the standard library, so a peer library's
worker does not pay for importing papyros when it unpickles a task; the
papyros Task types, built from these same function objects, are in
:mod:`papyros_tasks`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["echo", "noop", "noop_chunk", "spin", "spin_server"]


def noop(x: int) -> int:
    """W1 and W4: no work at all, so only the framework's overhead is measured."""
    return x


def noop_chunk(items: list[int]) -> list[int]:
    """W1 at chunksize > 1, for peers without chunking (Dask, Parallel Python): one task runs
    ``noop`` on each item of a chunk and returns the list of the results."""
    return [noop(x) for x in items]


def spin(loops: int) -> int:
    """W2: pure-Python CPU work that holds the GIL; ``loops`` is calibrated to ~10 ms."""
    total = 0
    for i in range(loops):
        total += i
    return total


def spin_server(connection: Any, taken: Any, lock: Any) -> None:
    """W2's ceiling: a bare process that, for each ``(loops, count)`` it receives on
    ``connection``, runs ``spin(loops)`` as long as fewer than ``count`` have been taken
    (``taken``: a count in shared memory, that all such processes take from under
    ``lock``), and sends back the sum of its results; it stops at ``None``."""
    while (order := connection.recv()) is not None:
        loops, count = order
        total = 0
        while True:
            with lock:
                if taken.value >= count:
                    break
                taken.value += 1
            total += spin(loops)
        connection.send(total)


def echo(payload: bytes) -> bytes:
    """W3: take a payload and return it, so it crosses the worker boundary both ways."""
    return payload
