"""The papyros Task types of the workloads: the functions of :mod:`workloads`, as Tasks.

Each body here is a copy of its twin in :mod:`workloads` (keep them
identical), so papyros and the peer libraries do the same work per task. The
copies exist because of how tasks reach a worker process:

- ``@papyros.Task.subclass()`` rebinds a function's name to its Task class, so
  the plain function that ``multiprocessing`` and ``concurrent.futures``
  pickle by name cannot live in the same module under the same name;
- a Task class takes its function's module, so it must be defined where its
  function is, for a worker to find it by name;
- and keeping papyros out of :mod:`workloads` means a peer's worker process
  does not pay for importing papyros (~20 ms) when it unpickles a task, which
  would skew the start-up measurement (W4a) against the peers.

Calling the :mod:`workloads` function from a Task instead would add a call
per task to papyros only.
"""

from __future__ import annotations

import papyros

__all__ = ["echo", "noop", "spin"]


@papyros.Task.subclass()
def noop(x: int) -> int:
    """W1 and W4: no work at all."""
    return x


@papyros.Task.subclass()
def spin(loops: int) -> int:
    """W2: pure-Python CPU work that holds the GIL."""
    total = 0
    for i in range(loops):
        total += i
    return total


@papyros.Task.subclass()
def echo(payload: bytes) -> bytes:
    """W3: the payload crosses the worker boundary both ways."""
    return payload
